"""How the Ray Serve deployment spreads over a cluster: the `adaptkit serve --ray` flags (no Ray needed)."""

from __future__ import annotations

from dataclasses import dataclass, field

from adaptkit.core.errors import AdapterError


@dataclass(frozen=True)
class RayOptions:
    """How the service spreads over a Ray cluster; each is an `adaptkit serve --ray` flag."""

    replicas: int = field(default=2, metadata={"help": "replicas, each with its own backbone"})
    adapters_per_replica: int = field(default=4, metadata={
        "help": "adapters one replica holds at most (Ray's max_num_models_per_replica)"})
    replica_cpus: float = field(default=1.0, metadata={"help": "CPUs Ray reserves for each replica"})
    replica_gpus: float = field(default=0.0, metadata={"help": "GPUs Ray reserves for each replica"})
    torch_threads: int | None = field(default=None, metadata={
        "help": "torch threads in each replica (default: replica_cpus rounded, at least 1)"})
    max_ongoing_requests: int = field(default=64, metadata={
        "help": "requests one replica takes at once (more wait in Ray's router); their rows batch together"})
    ingress_cpus: float = field(default=0.25, metadata={"help": "CPUs Ray reserves for the ingress"})
    route_by_adapter: bool = field(default=True, metadata={
        "help": "send each adapter's rows to a replica that holds it (Ray's multiplexed routing); off: to any "
                "replica, which then loads it (for comparison)"})

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.adapters_per_replica < 1 or self.max_ongoing_requests < 1:
            raise AdapterError("RayOptions: replicas, adapters_per_replica and max_ongoing_requests must be >= 1")

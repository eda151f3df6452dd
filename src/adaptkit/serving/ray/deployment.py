"""The Ray Serve application: an ingress deployment and a replica deployment with model multiplexing.

Ray is imported inside `build_app`, which makes the deployment classes there: the multiplexing
capacity K is an argument of the `@serve.multiplexed` decorator.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from adaptkit.core.errors import AdapterError
from adaptkit.serving.ray.ingress import create_ingress_app
from adaptkit.serving.ray.options import RayOptions
from adaptkit.serving.ray.replica import ReplicaCore, Resident
from adaptkit.serving.settings import ServeSettings

INGRESS = "AdapterIngress"
REPLICA = "AdapterReplica"


def build_app(backbone: str, store: str, *, options: RayOptions | None = None, settings: ServeSettings | None = None,
              api_keys: tuple[str, ...] = (), dtype: str | None = None, device: str | None = None,
              quantize: str | None = None, cache: str | None = None) -> Any:
    """The application to pass to `serve.run` (a `ray.serve.Application`).

    >>> from ray import serve
    >>> from adaptkit.serving.ray import RayOptions, build_app
    >>> serve.run(build_app("gemma3-270m", "s3://bucket/adapters", options=RayOptions(replicas=4)),
    ...           name="adaptkit", route_prefix="/")

    `store` is a directory every node sees, or an fsspec URL; `cache` is where replicas copy files of
    a URL store (default: a temporary directory per replica).
    """
    from ray import serve

    options = options or RayOptions()
    settings = settings or ServeSettings()
    threads = options.torch_threads or max(1, round(options.replica_cpus))

    class AdapterReplica:
        def __init__(self) -> None:
            self.core = ReplicaCore(backbone, store, settings, options.adapters_per_replica, dtype=dtype,
                                    device=device, quantize=quantize, torch_threads=threads, cache=cache,
                                    replica_id=serve.get_replica_context().replica_tag)

        @serve.multiplexed(max_num_models_per_replica=options.adapters_per_replica)
        async def adapter(self, name: str) -> Resident:
            return await self.core.load(name)

        async def run(self, key: dict[str, Any], rows: list[dict[str, Any]], adapter: str = "") -> dict[str, Any]:
            # the adapter comes as the multiplexed model id; as an argument only when routing ignores it
            return await self.core.run(serve.get_multiplexed_model_id() or adapter, self.adapter, key, rows)

        async def ready(self) -> dict[str, Any]:
            model = self.core.model
            return {"backbone": model.backbone_id, "family": model.family, "resident": len(model.adapters)}

        def __del__(self) -> None:
            core = getattr(self, "core", None)
            if core is not None:
                core.stop()

    def ingress_app() -> Any:  # runs in the ingress replica, so nothing of the app is pickled
        return create_ingress_app(store, settings, lambda: serve.get_deployment_handle(REPLICA),
                                  adapters_per_replica=options.adapters_per_replica, api_keys=api_keys,
                                  route_by_adapter=options.route_by_adapter)

    class AdapterIngress:
        def __init__(self, replicas: Any) -> None:
            self.replicas = replicas  # bound so Ray deploys the replicas with the ingress; routes look it up by name

    replica_actor = {"num_cpus": options.replica_cpus}
    if options.replica_gpus:
        replica_actor["num_gpus"] = options.replica_gpus
    replica = serve.deployment(AdapterReplica, name=REPLICA, num_replicas=options.replicas,
                               ray_actor_options=replica_actor, max_ongoing_requests=options.max_ongoing_requests)
    ingress = serve.deployment(serve.ingress(ingress_app)(AdapterIngress), name=INGRESS, num_replicas=1,
                               ray_actor_options={"num_cpus": options.ingress_cpus},
                               max_ongoing_requests=max(256, options.max_ongoing_requests * options.replicas))
    return ingress.bind(replica.bind())


def app_builder(args: dict[str, Any]) -> Any:
    """For Ray's own CLI and config files: `serve run adaptkit.serving.ray:app_builder backbone=... store=...`
    (any RayOptions or ServeSettings field may be given too, e.g. replicas=4 adapters_per_replica=8)."""
    args = dict(args)
    try:
        backbone, store = args.pop("backbone"), args.pop("store")
    except KeyError as missing:
        raise AdapterError(f"app_builder needs {missing.args[0]}=...: e.g. serve run adaptkit.serving.ray:app_builder "
                           "backbone=gemma3-270m store=/shared/adapters") from None
    option_fields = set(asdict(RayOptions()))
    setting_fields = set(asdict(ServeSettings()))
    unknown = set(args) - option_fields - setting_fields - {"dtype", "device", "quantize", "cache"}
    if unknown:
        raise AdapterError(f"app_builder: unknown arguments {sorted(unknown)}; known: backbone, store, dtype, device, "
                           f"quantize, cache, {', '.join(sorted(option_fields | setting_fields))}")
    options = RayOptions(**{k: _typed(RayOptions, k, v) for k, v in args.items() if k in option_fields})
    settings = ServeSettings(**{k: _typed(ServeSettings, k, v) for k, v in args.items() if k in setting_fields})
    return build_app(backbone, store, options=options, settings=settings, dtype=args.get("dtype"),
                     device=args.get("device"), quantize=args.get("quantize"), cache=args.get("cache"))


def _typed(cls: type, name: str, value: Any) -> Any:
    """`serve run` passes every argument as a string; the dataclass default says what it should be."""
    if not isinstance(value, str):
        return value
    default = getattr(cls(), name)
    if isinstance(default, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if value.lower() == "none":
        return None
    return int(value) if value.isdigit() else float(value) if _is_float(value) else value


def _is_float(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True

"""What an efficiency benchmark run is: the methods compared, its options, and the plan of jobs.

Shared by the runner, its peft peers and the CLI; it imports nothing else of the benchmark.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from adaptkit.training.config import known_options, option

# name → (family, family options); the family also picks the learning rate. Ranks, targets and widths follow the anchors
# in the literature: LoRA on all linear projections, Houlsby / Pfeiffer at reduction 16, 16 prefix tokens.
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "lora-r8": ("lora", {"r": 8, "alpha": 16.0, "targets": "all-linear"}),
    "lora-r32": ("lora", {"r": 32, "alpha": 64.0, "targets": "all-linear"}),
    "adalora": ("adalora", {"init_r": 12, "target_r": 8, "alpha": 32.0, "targets": "all-linear"}),
    "prefix": ("prefix", {"length": 16}),
    "bottleneck-pfeiffer": ("bottleneck", {"placement": "pfeiffer", "reduction": 16}),
    "bottleneck-houlsby": ("bottleneck", {"placement": "houlsby", "reduction": 16}),
}
PEER_METHODS = ("lora-r8", "lora-r32", "adalora", "prefix")
# One schedule shape for all; the peak learning rate is the family's usual one (full fine-tuning
# diverges at adapter rates, prefixes barely move at them) — the same choice Hu et al. and peft's
# method comparison make.
DEFAULT_LRS = {"full": 5e-5, "lora": 5e-4, "adalora": 1e-3, "prefix": 5e-3, "bottleneck": 5e-4}
LIBRARIES = ("bare", "adaptkit", "peft")


@dataclasses.dataclass
class BenchConfig:
    """Every option of `adaptkit bench efficiency` (flags and the `[bench]` table of a config file)."""

    name: str = option("efficiency", help="results/<name>.json, .md, -quality.png, -cost.png")
    backbone: str = option("gemma3-270m", help="zoo name, local dir or Hub id of the backbone")
    domains: list[str] = option(factory=lambda: ["libreoffice-help-en-de", "bible-en-es"],
                                help="shipped samples, one per domain; the first gets every method")
    methods: list[str] = option(factory=lambda: list(METHODS), help="methods trained on the first domain")
    other_methods: list[str] | None = option(None, help="methods on the other domains (default: the same as methods)")
    peers: list[str] = option(factory=lambda: ["lora-r8", "adalora", "prefix"],
                              help=f"methods also trained with peft on the first domain (of {', '.join(PEER_METHODS)})")
    mixed: str | None = option("lora-r8", help="one adapter of this method trained on all domains' data together")
    cross: str | None = option("lora-r8", help="this method's per-domain adapters are scored on every domain's "
                                               "test set")
    budget_steps: int = option(30, help="optimizer steps of every training job")
    batch_size: int = option(8, help="rows per step")
    warmup_steps: int | None = option(None, help="warm-up steps (default: 10% of budget_steps)")
    schedule: Literal["linear", "cosine", "constant"] = option("linear", help="learning-rate decay after warm-up")
    lrs: dict[str, float] = option(factory=lambda: dict(DEFAULT_LRS), help="peak learning rate per family")
    max_source_len: int = option(128, help="source tokens kept per row")
    max_target_len: int = option(128, help="target tokens kept per row")
    eval_samples: int = option(16, help="dev sentences scored after training")
    test_samples: int = option(32, help="test sentences per domain")
    eval_batch_size: int = option(16, help="rows per evaluation batch")
    max_new_tokens: int = option(48, help="new tokens at most per generated translation")
    latency_sentences: int = option(3, help="sentences timed for latency")
    latency_tokens: int = option(16, help="new tokens generated per timed sentence (exactly)")
    latency_repeats: int = option(2, help="times each sentence is timed")
    seed: int = option(0, help="seed of data order and adapter initialisation, the same for every job")
    activation_checkpointing: bool = option(False, help="every job, peft's too, recomputes activations in the "
                                                        "backward pass (less memory, more compute)")
    threads: int | None = option(None, help="torch CPU threads per job (default: torch's; 1 helps on a busy machine)")
    isolate: bool = option(True, help="a forked worker per job (honest peak RSS); --no-isolate: in-process")
    output_dir: str = option("benchmarks/results", help="where the report's JSON, markdown and plots go")
    work_dir: str | None = option(None, help="adapter files and logs (default: a temporary directory)")
    progress: bool = option(True, help="progress on stderr")

    def __post_init__(self) -> None:
        unknown = sorted({*self.methods, *(self.other_methods or []), *self.peers,
                          *([self.mixed] if self.mixed else []), *([self.cross] if self.cross else [])} - set(METHODS))
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
        if bad := sorted(set(self.peers) - set(PEER_METHODS)):
            raise ValueError(f"peft peers cover {list(PEER_METHODS)}; got {bad}")
        if not self.domains:
            raise ValueError("need at least one domain")
        if self.budget_steps < 1:
            raise ValueError("budget_steps must be at least 1")

    def lr(self, family: str) -> float:
        return {**DEFAULT_LRS, **self.lrs}[family]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchConfig:
        return cls(**known_options(cls, data, "bench"))


def quick_config(**overrides: Any) -> BenchConfig:
    """The `--quick` run: SmolLM2-135M, 3 steps, 6 sentences — every code path in minutes on 2 cores."""
    values: dict[str, Any] = dict(name="quick", backbone="smollm2-135m", budget_steps=3, batch_size=4,
                                  eval_samples=6, test_samples=6, max_new_tokens=16, latency_sentences=2,
                                  latency_tokens=4, latency_repeats=1, other_methods=["lora-r8"],
                                  threads=1)  # CI machines are shared: 2 threads on 1 free core crawl
    values.update(overrides)
    return BenchConfig(**values)


@dataclasses.dataclass
class Job:
    """One method trained on one domain (or on all, `mixed`), or the bare backbone scored."""

    domain: str  # the domain it is trained on, or "mixed"
    method: str  # a METHODS key, or "bare"
    library: str  # bare | adaptkit | peft
    train_domains: list[str]
    test_domains: list[str]

    @property
    def key(self) -> str:
        return f"{self.domain}/{self.method}" + ("" if self.library != "peft" else "@peft")

    @property
    def family(self) -> str:
        return "bare" if self.method == "bare" else METHODS[self.method][0]


def plan(cfg: BenchConfig) -> list[Job]:
    """Bare floor, full fine-tuning and every adapter per domain; peers; the mixed adapter."""
    jobs = []
    for i, domain in enumerate(cfg.domains):
        everywhere = list(cfg.domains)
        methods = cfg.methods if i == 0 or cfg.other_methods is None else cfg.other_methods
        if cfg.cross and cfg.cross not in methods and len(cfg.domains) > 1:
            methods = [*methods, cfg.cross]
        jobs.append(Job(domain, "bare", "bare", [], everywhere))
        for method in methods:
            tests = everywhere if method == cfg.cross else [domain]
            jobs.append(Job(domain, method, "adaptkit", [domain], tests))
        if i == 0:
            jobs += [Job(domain, method, "peft", [domain], [domain]) for method in cfg.peers]
    if cfg.mixed and len(cfg.domains) > 1:
        jobs.append(Job("mixed", cfg.mixed, "adaptkit", list(cfg.domains), list(cfg.domains)))
    return jobs

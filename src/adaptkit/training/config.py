"""`TrainConfig`: every training option, and the config files (TOML / YAML) that set them.

The CLI derives one flag per field (`cli/train.py`); `ak.train(**options)` takes the same names.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from adaptkit.evaluation.scoring import MODES


@dataclasses.dataclass
class TrainConfig:
    """Every training option. The CLI derives one flag per field (`--batch-size`, `--no-generate`)."""

    # what to train
    backbone: str | None = None  # zoo name, local dir or Hub id (CLI; ak.train takes a loaded model)
    adapter: str = "adapter"  # the adapter's name in the bank and in the file
    method: str = "lora"  # family of a new adapter: lora | adalora | prefix | bottleneck
    adapter_options: dict = dataclasses.field(default_factory=dict)  # the family's config, e.g. {"r": 16}
    full: bool = False  # fine-tune the whole backbone instead (the baseline adapters are measured against)
    # data
    data: str | None = None  # shipped sample name, directory of {train,dev,test}.jsonl, or a file
    train_split: str = "train"
    dev_split: str = "dev"
    src_lang: str | None = None  # routing keys saved in the adapter file; default: the data's columns
    tgt_lang: str | None = None
    domain: str | None = None
    prompt: str | None = None  # decoder LM prompt template (default: data.PromptFormat's)
    chat_template: bool = False
    max_source_len: int = 256
    max_target_len: int = 256
    # schedule
    batch_size: int = 8  # per process
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "linear"  # linear | cosine | constant
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "auto"  # auto (bf16/fp16 where the hardware has it) | no | bf16 | fp16
    seed: int = 0
    # evaluation
    eval_every: int | None = 100  # optimizer steps; the run also evaluates at its end
    eval_samples: int | None = None  # first N dev rows only
    eval_batch_size: int = 16
    generate: bool = True  # BLEU / chrF / TER of generated translations, not just the loss
    num_beams: int = 1
    max_new_tokens: int = 128
    metric: str | None = None  # early stopping / best: loss | bleu | chrf | ter (default chrf, or loss)
    patience: int | None = None  # evaluations without improvement before stopping
    min_delta: float = 0.0
    slice_head: bool = True  # decoder LMs: LM head only at target positions (exact, much faster)
    # output
    output_dir: str | None = None  # default runs/<adapter>
    checkpoint_every: int | None = None  # default: eval_every; 0 = never
    resume: bool = True  # continue from output_dir/checkpoints if present
    progress: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant; got {self.schedule!r}")
        if self.metric is not None and self.metric not in MODES:
            raise ValueError(f"metric must be one of {sorted(MODES)}; got {self.metric!r}")
        if self.metric not in (None, "loss") and not self.generate:
            raise ValueError(f"metric {self.metric!r} is computed on generated output; set generate=True")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")

    @property
    def best_metric(self) -> str:
        return self.metric or ("chrf" if self.generate else "loss")

    @property
    def checkpoint_interval(self) -> int:
        return (self.eval_every if self.checkpoint_every is None else self.checkpoint_every) or 0

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / slug(self.adapter))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_config_file(path))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (`.toml`) or YAML (`.yaml`/`.yml`) file of TrainConfig fields; `[train]` may wrap them."""
    path = Path(path)
    if path.suffix == ".toml":
        import tomllib

        data = tomllib.loads(path.read_text(encoding="utf-8"))
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    else:
        raise ValueError(f"config files are .toml, .yaml or .yml; got {path.name!r}")
    return data.get("train", data)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "adapter"

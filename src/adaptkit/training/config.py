"""`TrainConfig`: every training option, and the config files (TOML / YAML) that set them.

The CLI derives one flag per field (`cli/train.py`); `ak.train(**options)` takes the same names.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, Literal

import yaml

from adaptkit.core.errors import InferenceOnlyBackbone
from adaptkit.core.quantize import HELP as QUANTIZE_HELP
from adaptkit.core.quantize import INFERENCE_ONLY
from adaptkit.evaluation.scoring import MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10 has no TOML reader: YAML config files still work
    tomllib = None


def option(default: Any = dataclasses.MISSING, *, help: str, factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its help text, which the CLI shows for the field's flag."""
    return dataclasses.field(default=default, default_factory=factory, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """Every training option. The CLI derives one flag per field (`--batch-size`, `--no-generate`)."""

    # what to train
    backbone: str | None = option(None, help="zoo name, local dir or Hub id (CLI; ak.train takes a loaded model)")
    quantize: str | None = option(None, help=QUANTIZE_HELP)
    adapter: str = option("adapter", help="the adapter's name in the bank and in the file")
    method: str = option("lora", help="family of a new adapter: lora | adalora | prefix | bottleneck")
    adapter_options: dict = option(factory=dict, help='the family\'s config, e.g. r=16,alpha=32 or \'{"r": 16}\'')
    full: bool = option(False, help="fine-tune the whole backbone instead (the baseline adapters are measured against)")
    task: Literal["translate", "style", "dialogue", "classify"] = option(
        "translate", help="translate: text pairs, seq2seq or decoder LM; style: rewrite src as tgt (same language); "
                          "dialogue: src turn(s) → tgt reply; classify: {text, label} rows, an encoder "
                          "adapter with a classification head saved in its file")
    pooling: Literal["mean", "cls"] = option("mean", help="classify: the head pools the mean over the attention "
                                                         "mask, or the first token")
    class_weights: bool = option(True, help="classify: weight the loss by inverse class frequency (balanced classes)")
    # data
    data: str | None = option(None, help="shipped sample name, directory of {train,dev,test}.jsonl, or a file")
    train_split: str = option("train", help="split to train on")
    dev_split: str = option("dev", help="split to evaluate on during training")
    src_lang: str | None = option(None, help="source language saved in the adapter file for routing "
                                              "(default: the data's src_lang column)")
    tgt_lang: str | None = option(None, help="target language saved for routing (default: the data's tgt_lang)")
    domain: str | None = option(None, help="domain saved in the adapter file for routing")
    reverse: bool = option(False, help="swap the data's sides (src ↔ tgt, src_lang ↔ tgt_lang): an en→de corpus "
                                       "trains a de→en adapter, e.g. for back-translation")
    synthetic: str | None = option(None, help="synthetic pairs mixed into training (e.g. `adaptkit augment "
                                              "backtranslate` output): directory, file or sample name")
    synthetic_ratio: float = option(0.5, help="with synthetic: the synthetic share of every batch, exactly "
                                              "(batch g holds floor((g+1)rB) - floor(grB) synthetic rows)")
    synthetic_tag: str | None = option(None, help='with synthetic: prefix of synthetic sources only (tagged '
                                                  'back-translation), e.g. "<BT> "; real sources, and sources at '
                                                  "translation time, stay untagged")
    prompt: str | None = option(None, help="decoder LM prompt template (default: data.PromptFormat's)")
    chat_template: bool = option(False, help="decoder LMs: wrap the prompt in the tokenizer's chat template")
    max_source_len: int = option(256, help="source tokens kept per row")
    max_target_len: int = option(256, help="target tokens kept per row")
    # schedule
    batch_size: int = option(8, help="rows per step per process")
    grad_accum: int = option(1, help="micro-batches accumulated into one optimizer step")
    epochs: int = option(1, help="passes over the training data (unless max_steps is set)")
    max_steps: int | None = option(None, help="optimizer steps; overrides epochs")
    lr: float = option(2e-4, help="peak learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay of matrices (never of biases and norms)")
    loraplus_lr_ratio: float | None = option(
        None, help="LoRA+ (Hayou et al. 2024): the B factors (LoRA/DoRA lora_B, AdaLoRA's P) and, as peft's "
                   "create_loraplus_optimizer does, 1-D parameters (DoRA's magnitude, head biases) train at "
                   "lr × this ratio, the rest at lr; e.g. 16. Families without a B factor (prefix, bottleneck) "
                   "refuse it")
    warmup_steps: int = option(0, help="optimizer steps of linear warm-up to the peak rate")
    schedule: Literal["linear", "cosine", "constant"] = option("linear", help="learning-rate decay after warm-up")
    max_grad_norm: float | None = option(1.0, help="clip the gradient norm to this (none: no clipping)")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = option(
        "auto", help="auto: bf16 or fp16 where the hardware has it, else full precision")
    seed: int = option(0, help="seed of the adapter's initialisation and the data order")
    # evaluation
    eval_every: int | None = option(100, help="optimizer steps between evaluations; the run also evaluates "
                                              "at its end (none: only at the end)")
    eval_samples: int | None = option(None, help="first N dev rows only")
    eval_batch_size: int = option(16, help="rows per evaluation batch")
    generate: bool = option(True, help="BLEU / chrF / TER of generated translations, not just the loss")
    num_beams: int = option(1, help="beams when generating for evaluation")
    max_new_tokens: int = option(128, help="new tokens at most per generated translation")
    metric: str | None = option(None, help="early stopping and the best adapter: loss | bleu | chrf | ter "
                                            "(default chrf, or loss without --generate)")
    patience: int | None = option(None, help="evaluations without improvement before stopping (none: never stop)")
    min_delta: float = option(0.0, help="the least change of the metric that counts as an improvement")
    slice_head: bool = option(True, help="decoder LMs: LM head only at target positions (exact, much faster)")
    chunked_loss: bool = option(True, help="with slice_head: LM head + cross-entropy a chunk of positions at a "
                                           "time, so the logits and their gradient never exist whole (exact)")
    activation_checkpointing: bool = option(False, help="recompute each layer's activations in the backward pass "
                                                        "instead of keeping them: less memory, ~1/3 more compute")
    # output
    output_dir: str | None = option(None, help="where the adapter and checkpoints go (default runs/<adapter>)")
    checkpoint_every: int | None = option(None, help="optimizer steps between checkpoints (default: eval_every; "
                                                      "0: never)")
    resume: bool = option(True, help="continue from output_dir/checkpoints if present")
    progress: bool = option(True, help="show a progress bar")

    def __post_init__(self) -> None:
        if self.schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"schedule must be linear, cosine or constant; got {self.schedule!r}")
        if self.metric is not None and self.metric not in MODES:
            raise ValueError(f"metric must be one of {sorted(MODES)}; got {self.metric!r}")
        if self.task not in ("translate", "style", "dialogue", "classify"):
            raise ValueError(f"task must be translate, style, dialogue or classify; got {self.task!r}")
        if self.task == "dialogue" and self.metric in ("bleu", "chrf", "ter"):
            raise ValueError(f"a reply has no single right answer to score {self.metric} against; dialogue runs "
                             "keep the adapter with the lowest loss (metric=loss)")
        if self.task == "classify":
            if self.full:
                raise ValueError("task=classify trains an adapter and its head; full fine-tuning is for translation")
            if self.metric not in (None, "loss", "accuracy", "macro_f1"):
                raise ValueError(f"classify runs score loss, accuracy and macro_f1; got metric {self.metric!r}")
        elif self.metric in ("accuracy", "macro_f1"):
            raise ValueError(f"metric {self.metric!r} scores classification; set task=classify")
        elif self.metric not in (None, "loss") and not self.generate:
            raise ValueError(f"metric {self.metric!r} is computed on generated output; set generate=True")
        if not 0 < self.synthetic_ratio < 1:
            raise ValueError(f"synthetic_ratio is the synthetic share of a batch, between 0 and 1 (exclusive); "
                             f"got {self.synthetic_ratio}")
        if (self.reverse or self.synthetic is not None) and self.task == "classify":
            raise ValueError("reverse and synthetic are for text pairs; task=classify trains on {text, label} rows")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError("batch_size and grad_accum must be at least 1")
        if self.loraplus_lr_ratio is not None:
            if not self.loraplus_lr_ratio > 0:
                raise ValueError(f"loraplus_lr_ratio multiplies B's learning rate; it must be positive, got "
                                 f"{self.loraplus_lr_ratio}")
            if self.full:
                raise ValueError("loraplus_lr_ratio sets the learning rate of LoRA's B factors; full fine-tuning "
                                 "has none")
        if self.quantize in INFERENCE_ONLY:
            raise InferenceOnlyBackbone(self.quantize)
        if self.quantize is not None and self.full:
            raise ValueError("full fine-tuning updates the backbone's weights, which quantize= would freeze in int8 / "
                             "nf4: drop quantize for full=True, or train an adapter over the quantised backbone")

    @property
    def best_metric(self) -> str:
        if self.task == "classify":
            return self.metric or "macro_f1"
        return self.metric or ("chrf" if self.generate and self.task != "dialogue" else "loss")

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
        return cls(**known_options(cls, data, "training"))

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(read_config_file(path))


def known_options(cls: type, data: dict[str, Any], what: str) -> dict[str, Any]:
    """`data` if every key is a field of dataclass `cls`; else a ValueError naming the unknown ones."""
    known = {f.name for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - known):
        raise ValueError(f"unknown {what} option(s) {unknown}; known: {sorted(known)}")
    return data


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A TOML (`.toml`) or YAML (`.yaml`/`.yml`) file of TrainConfig fields; `[train]` may wrap them."""
    path = Path(path)
    if path.suffix == ".toml":
        if tomllib is None:
            raise ValueError(f"{path.name}: TOML config files need Python 3.11 or later; use a .yaml file")
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    elif path.suffix in (".yaml", ".yml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    else:
        raise ValueError(f"config files are .toml, .yaml or .yml; got {path.name!r}")
    return data.get("train", data)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-") or "adapter"

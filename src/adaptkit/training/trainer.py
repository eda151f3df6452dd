"""One trainer on `accelerate` for one adapter, or for the whole backbone (`full=True`).

Read it top to bottom like a torchtune recipe: `train()` (the entry point), then `Recipe`:
setup → loop → evaluate → save, and the checkpoints that make a killed run continue where it
stopped. Every option is a `TrainConfig` field (train_config.py); the checkpoint files are
checkpoint.py's.

The trainer never asks which adapter family it trains: it optimises
`model.adapter_parameters(name)`, runs `model(**batch, adapter=name)` (the bank adds any
regularisation loss), calls `adapter.on_train_begin(total_steps)` once with the run's number of
optimizer steps (AdaLoRA fits its budget schedule to it) and `adapter.on_step_end(step)` after
every optimizer step, before the gradients are zeroed (AdaLoRA reads them there).

Loss normalisation is by target tokens over the whole optimizer step — across gradient
accumulation and across processes — so 2 processes × batch 4 give the same update as
1 process × batch 8, and accumulation equals a bigger batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptkit import corpora
from adaptkit import data as D
from adaptkit.core.adapterfile import read_adapter_file
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError, InferenceOnlyBackbone
from adaptkit.core.quantize import INFERENCE_ONLY
from adaptkit.core.registry import METHODS, adapter_class_for
from adaptkit.core.regularizer import add_regularizers
from adaptkit.data import PromptFormat
from adaptkit.evaluation.classification import evaluate_classifier
from adaptkit.evaluation.generation import dialogue_metrics
from adaptkit.evaluation.loss import can_slice_head, label_tokens, target_loss
from adaptkit.evaluation.scoring import is_better
from adaptkit.evaluation.translation import evaluate
from adaptkit.methods.base import AdapterConfig
from adaptkit.tasks import classify as C
from adaptkit.training import checkpoint as ckpt
from adaptkit.training import mixing
from adaptkit.training.config import TrainConfig, read_config_file, slug
from adaptkit.training.optimizer import check_loraplus, param_groups

__all__ = ["EpochSampler", "Recipe", "TrainConfig", "lr_factor", "read_config_file", "train"]


def train(model: Any, adapter: str | None = None, train: Any = None, dev: Any = None, *,
          config: TrainConfig | None = None, adapter_config: AdapterConfig | None = None,
          synthetic: Any = None, **options: Any) -> dict[str, Any]:
    """Train one adapter (or, with `full=True`, the whole backbone); returns the run summary.

    `model` is an `AdaptedModel` (or a backbone name to load); `train`/`dev` are datasets, files,
    directories or shipped sample names (default: `data`'s splits); `options` are `TrainConfig`
    fields. A new adapter is built from `adapter_config`, else from `method` + `adapter_options`.
    `synthetic` (a dataset, file or directory, e.g. back-translated pairs) is mixed into every batch
    at `synthetic_ratio` (training/mixing.py).

    >>> ak.train(model, adapter="en-de/it", train="libreoffice-help-en-de", max_steps=40, r=16)
    """
    values = config.to_dict() if config is not None else {}
    family_fields = _family_option_names(options.get("method", values.get("method", "lora")))
    family_options = {k: options.pop(k) for k in list(options) if k in family_fields}
    values.update(options)
    if adapter is not None:
        values["adapter"] = adapter
    if family_options:
        values["adapter_options"] = {**values.get("adapter_options", {}), **family_options}
    if isinstance(synthetic, (str, os.PathLike)):  # a path is recorded in the adapter's training record
        values["synthetic"], synthetic = str(synthetic), None
    cfg = TrainConfig.from_dict(values)
    recipe = Recipe(cfg)
    try:
        recipe.setup(model, train, dev, adapter_config, synthetic=synthetic)
        return recipe.run()
    finally:
        recipe.cleanup()


def _family_option_names(method: str) -> set[str]:
    """Family config fields may be passed to `train()` directly (`r=16`) when no TrainConfig field clashes."""
    if method not in METHODS:
        return set()
    own = {f.name for f in dataclasses.fields(TrainConfig)}
    return {f.name for f in dataclasses.fields(METHODS[method].config_class)} - own


def _precision(choice: str) -> str:
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "no"


def _cpu_processes() -> bool:
    """Several processes and no accelerator: accelerate needs `cpu=True` to join them over gloo
    (`accelerate launch --multi_gpu --num_processes N` or `torchrun` on a CPU-only machine)."""
    has_accelerator = getattr(torch, "accelerator", None) is not None and torch.accelerator.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not (has_accelerator or torch.cuda.is_available())


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warmup to the peak, then linear or cosine decay to zero (or constant)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return max(0.0, 1.0 - progress)


class EpochSampler(torch.utils.data.Sampler):
    """A fresh permutation per epoch from (seed, epoch): the data position is just two integers."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed, self.epoch = size, seed, 0

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


@dataclasses.dataclass
class RunState:
    """Everything about progress that a checkpoint must restore, besides tensors."""

    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of `epoch` already consumed (per process)
    best_value: float | None = None
    best_step: int | None = None
    best_metrics: dict | None = None
    bad_evals: int = 0
    last_eval_step: int | None = None
    last_metrics: dict | None = None
    stopped_early: bool = False
    tokens: int = 0
    train_loss: float | None = None


class Recipe:
    """setup → run (loop, evaluate, save) → cleanup. One instance trains one adapter once."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.state = RunState()
        self.step_times: list[tuple[float, int]] = []  # (seconds, tokens) per optimizer step
        self._requires_grad: dict[torch.nn.Parameter, bool] = {}

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, model: Any, train_data: Any, dev_data: Any, adapter_config: AdapterConfig | None,
              synthetic: Any = None) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed


        cfg = self.cfg
        self.accelerator = Accelerator(mixed_precision=_precision(cfg.mixed_precision), cpu=_cpu_processes())
        set_seed(cfg.seed)  # before the adapter is built: its initial weights come from this seed
        if not isinstance(model, AdaptedModel):
            model = AdaptedModel.from_pretrained(model or cfg.backbone, quantize=cfg.quantize)
        model.require_tokenizer("training")
        scheme = (model.quantization or {}).get("scheme")
        if scheme in INFERENCE_ONLY:  # before any work: its matmuls pass no gradient (core/int8dynamic.py)
            raise InferenceOnlyBackbone(scheme)
        if cfg.quantize is not None and (model.quantization or {}).get("scheme") != cfg.quantize:
            raise AdapterError(f"quantize={cfg.quantize!r} applies when the trainer loads the backbone by name; this "
                               "model was loaded without it: pass ak.load(name, quantize=...) instead")
        if cfg.full and model.quantization is not None:
            raise AdapterError(f"full fine-tuning updates the backbone's weights, and this backbone's Linear weights "
                               f"are quantised ({model.quantization['scheme']}): load it without quantize= for "
                               "full=True, or train an adapter over the quantised backbone")
        if cfg.task == "classify":
            C.check_encoder(model)
        elif model.family not in ("seq2seq", "decoder"):
            raise AdapterError("the trainer trains seq2seq and decoder LMs on text pairs; "
                               f"this backbone is {model.family}")
        self.model, self.family, self.tokenizer = model, model.family, model.tokenizer
        self._was_training = model.training  # steps run in train mode; cleanup() gives the mode back
        # cleanup() turns it off again, unless the model came with it on. A model that came with transformers'
        # own checkpointing gets the routing-aware one: its recomputation would run without the adapter.
        self._checkpointing_before = bool(getattr(model.model, "is_activation_checkpointing", False))
        if cfg.activation_checkpointing or self._checkpointing_before:
            model.enable_activation_checkpointing()

        # data: pairs → tokens; the prompt (decoder LMs) is part of the recipe, saved with the adapter
        source = train_data if train_data is not None else self._need_data()
        train_rows = D.load_pairs(source, cfg.train_split)
        if dev_data is None:  # a directory or sample with a dev split brings its own
            dev_data = _dev_split_of(source, cfg.dev_split)
        dev_rows = D.load_pairs(dev_data, cfg.dev_split) if dev_data is not None else None
        if dev_rows is not None and cfg.eval_samples:
            dev_rows = dev_rows.select(range(min(cfg.eval_samples, len(dev_rows))))
        if cfg.reverse:  # before the routing keys are read from the rows: they then name the reversed pair
            train_rows = mixing.swap_sides(train_rows)
            dev_rows = mixing.swap_sides(dev_rows) if dev_rows is not None else None
        self.labels: list[str] | None = None  # task=classify: the head's label set
        self.dev_rows = dev_rows
        if cfg.task == "classify":
            train_enc = self._classification_data(train_rows, dev_rows)
        else:
            self._routing_keys(train_rows)
            self.prompt = self._prompt_format() if self.family == "decoder" else None
            encode = dict(tokenizer=self.tokenizer, family=self.family, prompt=self.prompt,
                          max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len,
                          src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang)
            train_enc, report = D.encode_pairs(train_rows, **encode)
            if report.truncated and self.accelerator.is_main_process:
                print(f"train data: {report}")
            self.dev_enc = D.encode_pairs(dev_rows, **encode)[0] if dev_rows is not None else None
            self.collate = D.Collator(self.tokenizer, self.family)
        synthetic = synthetic if synthetic is not None else cfg.synthetic
        if synthetic is not None and cfg.task == "classify":
            raise ValueError("synthetic pairs are for text-pair tasks; task=classify trains on {text, label} rows")
        if synthetic is not None:
            train_enc = self._with_synthetic(train_enc, synthetic, encode)
        else:
            self.sampler = EpochSampler(len(train_enc), cfg.seed)
        loader = torch.utils.data.DataLoader(train_enc, batch_size=cfg.batch_size, sampler=self.sampler,
                                             collate_fn=self.collate)

        # what trains: the adapter's parameters, or every backbone parameter on the full path
        for parameter in model.parameters():
            self._requires_grad[parameter] = parameter.requires_grad
            parameter.requires_grad_(False)
        if cfg.full:
            self.route = None
            named = list(model.model.named_parameters())
        else:
            if cfg.loraplus_lr_ratio is not None:  # before the bank or any parameter changes
                check_loraplus(type(model.get_adapter(cfg.adapter)) if cfg.adapter in model.adapters else
                               adapter_class_for(adapter_config.method if adapter_config else cfg.method))
            if cfg.adapter not in model.adapters:  # routing keys as in its file: Translator / Generator find it
                model.add_adapter(cfg.adapter, adapter_config or adapter_class_for(cfg.method).config_class
                                  .from_dict(cfg.adapter_options), task=cfg.task, src_lang=cfg.src_lang,
                                  tgt_lang=cfg.tgt_lang, domain=cfg.domain)
            if self.labels is not None:
                C.ensure_head(model, cfg.adapter, self.labels, cfg.pooling)
            self.route = cfg.adapter
            named = [(n, p) for n, p in model.get_adapter(cfg.adapter).named_parameters()
                     if self._requires_grad.get(p, True)]
        for _, parameter in named:
            parameter.requires_grad_(True)
        self.params = [p for _, p in named]
        self.slice_head = cfg.slice_head and can_slice_head(model)

        optimizer = torch.optim.AdamW(param_groups(named, cfg, None if cfg.full else model.get_adapter(cfg.adapter)),
                                      lr=cfg.lr)
        # Not prepared by accelerate: its scheduler wrapper steps once per process.
        self.wrapped, self.optimizer, self.loader = self.accelerator.prepare(model, optimizer, loader)
        per_epoch = math.ceil(len(self.loader) / cfg.grad_accum)
        self.total_steps = cfg.max_steps or cfg.epochs * per_epoch
        total, warmup, schedule = self.total_steps, cfg.warmup_steps, cfg.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lambda step: lr_factor(step, total, warmup, schedule))
        if not cfg.full:
            model.get_adapter(cfg.adapter).on_train_begin(self.total_steps)

        self.run_dir = cfg.run_dir
        self.checkpoints = self.run_dir / "checkpoints"
        self.log_path = self.run_dir / "eval_log.jsonl"
        self.output = (self.run_dir / "model") if cfg.full else (self.run_dir / f"{slug(cfg.adapter)}.safetensors")
        resume_from = ckpt.latest(self.checkpoints) if cfg.resume else None
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        elif self.accelerator.is_main_process:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")

    def _classification_data(self, train_rows: Any, dev_rows: Any) -> Any:
        """{text, label} rows → encoded rows; the label set and (balanced) class weights of the loss."""
        cfg = self.cfg
        self.prompt = None
        self.labels = C.label_names(train_rows)
        train_enc = C.encode_examples(train_rows, self.tokenizer, self.labels, cfg.max_source_len)
        self.class_weights = (C.balanced_weights(train_enc["labels"], len(self.labels)) if cfg.class_weights
                              else None)
        self.dev_enc = (C.encode_examples(dev_rows, self.tokenizer, self.labels, cfg.max_source_len)
                        if dev_rows is not None else None)
        self.collate = C.ClassificationCollator(self.tokenizer)
        return train_enc

    def _with_synthetic(self, train_enc: Any, synthetic: Any, encode: dict[str, Any]) -> Any:
        """Real rows then synthetic ones (tagged if asked) in one dataset; the sampler mixes each batch."""
        from datasets import concatenate_datasets

        cfg = self.cfg
        rows = D.load_pairs(synthetic, "train")
        mixing.check_direction(rows, cfg.src_lang, cfg.tgt_lang)
        if cfg.synthetic_tag:
            rows = mixing.tag_sources(rows, cfg.synthetic_tag)
        synthetic_enc, report = D.encode_pairs(rows, **encode)
        if report.truncated and self.accelerator.is_main_process:
            print(f"synthetic data: {report}")
        self.synthetic_rows = len(synthetic_enc)
        self.sampler = mixing.MixedSampler(len(train_enc), len(synthetic_enc), cfg.batch_size,
                                           cfg.synthetic_ratio, cfg.seed)
        return concatenate_datasets([train_enc, synthetic_enc])

    def _need_data(self) -> str:
        if self.cfg.data is None:
            raise ValueError("no training data: pass train=... or set data (a sample name, directory or file)")
        return self.cfg.data

    def _routing_keys(self, rows: Any) -> None:
        """Routing keys the file will carry, from the data only where every row agrees: a corpus that mixes
        domains (or pairs) trains an adapter for none of them in particular, the pair's general fallback,
        not one labelled with whatever its first row happened to be."""
        for key in ("src_lang", "tgt_lang", "domain"):
            if getattr(self.cfg, key) is None:
                values = set(_column(rows, key))
                if len(values) == 1 and (value := values.pop()):
                    setattr(self.cfg, key, value)

    def _prompt_format(self) -> PromptFormat:
        """The task's prompt (`cfg.prompt` replaces its text): what Generator / Translator prompt with later."""
        return PromptFormat.for_task(self.cfg.task, self.cfg.chat_template, self.cfg.prompt)

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        cfg, acc, state = self.cfg, self.accelerator, self.state
        started, tokens_at_start = time.perf_counter(), state.tokens
        bar = tqdm(total=self.total_steps, initial=state.step, desc="full" if cfg.full else cfg.adapter,
                   disable=not (cfg.progress and acc.is_main_process), unit="step")
        batches = self._batches()
        while state.step < self.total_steps and not state.stopped_early:
            window = [next(batches) for _ in range(cfg.grad_accum)]
            step_started = time.perf_counter()
            loss, tokens = self._optimizer_step(window)  # float(loss) waits for the device
            self.step_times.append((time.perf_counter() - step_started, tokens))  # benchmarks read these
            state.step += 1
            state.tokens += tokens
            state.train_loss = loss
            elapsed = time.perf_counter() - started
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{(state.tokens - tokens_at_start) / max(elapsed, 1e-9):.0f}")
            bar.update(1)
            if cfg.eval_every and state.step % cfg.eval_every == 0:
                self.evaluate_and_keep_best()
            every = cfg.checkpoint_interval
            if every and state.step % every == 0 and state.step < self.total_steps and not state.stopped_early:
                self.save_checkpoint()
        bar.close()
        if state.last_eval_step != state.step:
            self.evaluate_and_keep_best()
        if cfg.checkpoint_interval:
            self.save_checkpoint()
        self.finish()
        return self.summary(time.perf_counter() - started, state.tokens - tokens_at_start)

    def _batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """Batches forever, epoch after epoch, from the saved position on; the position is kept in state."""
        while True:
            self.sampler.epoch = self.state.epoch
            skip = self.state.batch
            loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            for batch in loader:
                self.state.batch += 1
                yield batch
            self.state.epoch += 1
            self.state.batch = 0

    def _optimizer_step(self, window: list[dict[str, torch.Tensor]]) -> tuple[float, int]:
        """One optimizer step over `grad_accum` micro-batches; returns (mean token loss, tokens seen)."""
        acc = self.accelerator
        counts = [len(b["labels"]) if self.labels is not None else label_tokens(b["labels"], self.family)
                  for b in window]
        n_global = int(acc.reduce(torch.tensor(sum(counts), device=acc.device), "sum"))
        self.wrapped.train()
        loss_sum = 0.0
        for i, (batch, count) in enumerate(zip(window, counts)):
            last = i == len(window) - 1
            with acc.no_sync(self.wrapped) if not last else contextlib.nullcontext():
                loss = self._loss(batch)
                # out.loss is this micro-batch's token mean; re-weight it to a share of the global
                # token mean (DDP averages gradients over processes, hence × num_processes).
                acc.backward(loss * (count * acc.num_processes / max(n_global, 1)))
            loss_sum += float(loss.detach()) * count
        if self.cfg.max_grad_norm:
            acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        if not self.cfg.full:
            self.model.get_adapter(self.cfg.adapter).on_step_end(self.state.step)
        self.optimizer.zero_grad(set_to_none=True)
        seen = sum(int(b["attention_mask"].sum()) for b in window)
        totals = acc.reduce(torch.tensor([loss_sum, float(seen)], device=acc.device), "sum")
        return float(totals[0]) / max(n_global, 1), int(totals[1])

    def _loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One micro-batch's mean loss: per target token (translation) or per row (classification)."""
        if self.labels is None:
            return target_loss(self.model, batch, self.route, slice_head=self.slice_head,
                               chunked=self.cfg.chunked_loss, forward=self.wrapped)
        logits = C.classification_logits(self.model, batch, self.route, forward=self.wrapped)
        loss = C.classification_loss(logits, batch["labels"], self.class_weights)
        return add_regularizers(loss, [self.model.get_adapter(self.route)])  # the bank adds it only to a model's loss

    # -- evaluate -------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Dev loss and, with `generate`, BLEU / chrF / TER of greedy or beam output."""
        cfg = self.cfg
        if self.labels is not None:
            return evaluate_classifier(self.model, self.dev_enc, self.route, self.labels,
                                       batch_size=cfg.eval_batch_size, weights=self.class_weights)
        if cfg.task == "dialogue":
            with self.accelerator.autocast():
                return dialogue_metrics(self.model, self.dev_rows, self.route, prompt=self.prompt, encoded=self.dev_enc,
                                        generate=cfg.generate, batch_size=cfg.eval_batch_size,
                                        max_new_tokens=cfg.max_new_tokens, max_source_len=cfg.max_source_len,
                                        slice_head=cfg.slice_head)
        with self.accelerator.autocast():
            return evaluate(self.model, self.dev_rows, self.route, prompt=self.prompt, encoded=self.dev_enc,
                              generate=cfg.generate, batch_size=cfg.eval_batch_size, num_beams=cfg.num_beams,
                              max_new_tokens=cfg.max_new_tokens, max_source_len=cfg.max_source_len,
                              src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang, slice_head=cfg.slice_head)

    def evaluate_and_keep_best(self) -> None:
        """Evaluate on the main process, share the result, log it, save the best, decide on stopping."""
        from accelerate.utils import broadcast_object_list

        cfg, state, acc = self.cfg, self.state, self.accelerator
        state.last_eval_step = state.step
        if self.dev_enc is None:
            return
        box = [self.evaluate() if acc.is_main_process else None]
        if acc.num_processes > 1:
            broadcast_object_list(box)
        results = {k: round(v, 6) for k, v in box[0].items()}
        state.last_metrics = results
        name = cfg.best_metric
        if is_better(results[name], state.best_value, name, cfg.min_delta):
            state.best_value, state.best_step, state.bad_evals = results[name], state.step, 0
            state.best_metrics = results
            self.save_output(results)
        else:
            state.bad_evals += 1
            if cfg.patience is not None and state.bad_evals >= cfg.patience:
                state.stopped_early = True
        if acc.is_main_process:
            entry = {"step": state.step, "epoch": state.epoch, "lr": self.scheduler.get_last_lr()[0],
                     "train_loss": state.train_loss, **results, "best": state.best_step == state.step}
            with self.log_path.open("a", encoding="utf-8") as log:
                log.write(json.dumps(entry) + "\n")
            if cfg.progress:
                tqdm.write(f"step {state.step}: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))

    # -- save -----------------------------------------------------------------------------------
    def training_metadata(self) -> dict[str, Any]:
        record = {**self.cfg.to_dict(), "step": self.state.step, "num_processes": self.accelerator.num_processes,
                  "backbone_id": self.model.backbone_id}
        if hasattr(self, "synthetic_rows"):
            record["synthetic_rows"] = self.synthetic_rows
        return record

    def save_output(self, results: dict[str, float] | None) -> None:
        """The adapter file (routing keys, metrics, training config in its header) or the full checkpoint."""
        acc, cfg = self.accelerator, self.cfg
        if acc.is_main_process:
            metrics = {**(results or {}), "step": self.state.step}
            if cfg.full:
                ckpt.save_full(self.model, self.output, metrics, self.training_metadata())
            else:
                self.model.save_adapter(cfg.adapter, self.output, metrics=metrics, training=self.training_metadata(),
                                        src_lang=cfg.src_lang, tgt_lang=cfg.tgt_lang, domain=cfg.domain,
                                        task=cfg.task)
        acc.wait_for_everyone()

    def finish(self) -> None:
        """Without a dev set the last weights are the output; with one, the best are put back in the model."""
        if self.state.best_step is None:
            self.save_output(self.state.last_metrics)
        elif not self.cfg.full and self.state.best_step != self.state.step:

            tensors, info = read_adapter_file(self.output)
            self.model.get_adapter(self.cfg.adapter).load_file(tensors, info)

    def summary(self, seconds: float, tokens: int) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        counts = self.model.num_parameters(None if cfg.full else cfg.adapter)
        out = {
            "adapter": None if cfg.full else cfg.adapter, "method": "full" if cfg.full else
            self.model.get_adapter(cfg.adapter).method, "steps": state.step,
            "epochs": round(state.epoch + state.batch / max(len(self.loader), 1), 3),
            "stopped_early": state.stopped_early, "metric": cfg.best_metric, "best_value": state.best_value,
            "best_step": state.best_step, "best_metrics": state.best_metrics, "last_metrics": state.last_metrics,
            "train_loss": state.train_loss,
            "trainable_parameters": sum(p.numel() for p in self.params),
            "backbone_parameters": counts["backbone"], "seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / max(seconds, 1e-9), 1), "output": str(self.output),
            "log": str(self.log_path),
            # per optimizer step of this run (evaluation excluded): what bench.py reports
            "step_seconds": [round(t, 4) for t, _ in self.step_times],
            "step_tokens": [n for _, n in self.step_times],
        }
        if self.accelerator.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(out, indent=2) + "\n")
            shown = {k: v for k, v in out.items() if k not in ("step_seconds", "step_tokens")}
            print(json.dumps(shown, indent=2))
        return out

    def cleanup(self) -> None:
        """Give the model back as found: its train/eval mode, frozen except what was trainable before, no
        accelerate wrappers."""
        for parameter, flag in self._requires_grad.items():
            parameter.requires_grad_(flag)
        if hasattr(self, "wrapped"):
            self.accelerator.unwrap_model(self.wrapped, keep_fp32_wrapper=False)
            self.accelerator.free_memory()
        if hasattr(self, "accelerator"):
            from accelerate.state import AcceleratorState

            # accelerate keeps one process-wide state: without this, a second train() in the same
            # process could not choose another mixed precision. The process group (PartialState) stays.
            AcceleratorState._reset_state()
        if hasattr(self, "model"):
            self.model.train(self._was_training)
            if self.cfg.activation_checkpointing and not self._checkpointing_before:
                self.model.disable_activation_checkpointing()

    # -- checkpoints (the file layout is checkpoint.py's) ----------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        if self.cfg.full:
            return {n: p.detach() for n, p in self.model.model.named_parameters() if p.requires_grad}
        return dict(self.model.get_adapter(self.cfg.adapter).state_dict())  # buffers too (AdaLoRA's masks)

    def save_checkpoint(self) -> None:
        acc, step = self.accelerator, self.state.step
        staging = ckpt.staging_dir(self.checkpoints, step)
        if acc.is_main_process:
            ckpt.prepare(staging)
        acc.wait_for_everyone()
        if acc.is_main_process:
            adapter_state = None if self.cfg.full else self.model.get_adapter(self.cfg.adapter).training_state()
            ckpt.write(staging, ckpt.Checkpoint(
                trainable=self._trainable_state(), optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(), run_state=dataclasses.asdict(self.state),
                adapter_state=adapter_state))
        ckpt.write_rng(staging, acc.process_index)
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.commit(self.checkpoints, staging, step)
        acc.wait_for_everyone()

    def load_checkpoint(self, where: Path) -> None:
        acc = self.accelerator
        saved = ckpt.read(where)
        if self.cfg.full:
            params = dict(self.model.model.named_parameters())
            with torch.no_grad():
                for name, tensor in saved.trainable.items():
                    params[name].copy_(tensor)
        else:
            adapter = self.model.get_adapter(self.cfg.adapter)
            adapter.load_state_dict(saved.trainable)
            if saved.adapter_state is not None:
                adapter.load_training_state(*saved.adapter_state)
        self.optimizer.load_state_dict(saved.optimizer)
        self.scheduler.load_state_dict(saved.scheduler)
        self.state = RunState(**saved.run_state)
        ckpt.restore_rng(where, acc.process_index)
        if acc.is_main_process and self.log_path.is_file():  # evals after the checkpoint will run again
            kept = [line for line in self.log_path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= self.state.step]
            self.log_path.write_text("".join(line + "\n" for line in kept))
        if acc.is_main_process:
            print(f"resuming from {where} (step {self.state.step})", flush=True)


def _dev_split_of(source: Any, split: str) -> Any:
    """The `split` of a directory or shipped sample that has one; None for files and datasets."""

    if not isinstance(source, (str, os.PathLike)):
        return None
    path = Path(source)
    if path.is_dir():
        return source if any(p.name.split(".")[0] == split for p in path.iterdir()) else None
    if str(source) in corpora.list_samples():
        return source if (corpora.SAMPLES_DIR / str(source) / f"{split}.jsonl.gz").is_file() else None
    return None


def _column(rows: Any, key: str) -> list[Any]:
    """One field of every row, from a `datasets.Dataset` (by column) or a list of dicts."""
    if hasattr(rows, "column_names"):
        return list(rows[key]) if key in rows.column_names else [None]
    return [row.get(key) for row in rows]

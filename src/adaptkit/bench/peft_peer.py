"""The peft peer of the efficiency benchmark: the same method, settings, data order and schedule,
trained with `peft.get_peft_model` and a plain torch loop over the project's collation.

The loop is the trainer's optimizer step without accelerate: the same `EpochSampler` order, the
same AdamW groups, `lr_factor` schedule, gradient clipping and target-only loss (`loss_inputs`),
and for AdaLoRA peft's own `update_and_allocate(step)` after every optimizer step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from adaptkit.bench.jobs import METHODS
from adaptkit.bench.measure import step_figures
from adaptkit.core.registry import adapter_class_for
from adaptkit.data import Collator, PromptFormat, encode_pairs
from adaptkit.evaluation import evaluate
from adaptkit.evaluation.loss import can_slice_head, loss_inputs
from adaptkit.methods import AdaLoRA
from adaptkit.training.trainer import EpochSampler, lr_factor

TASK_TYPES = {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}


class PeftScorer:
    """What `evaluation.evaluate` needs of a model (`family`, `tokenizer`, `model`, call and generate
    with an `adapter=` keyword), over a peft model: the adapter is always the peft one."""

    def __init__(self, peft_model: Any, tokenizer: Any, family: str):
        self.model, self.tokenizer, self.family = peft_model, tokenizer, family

    def require_tokenizer(self, purpose: str) -> Any:
        return self.tokenizer  # always the adaptkit model's, which the peer was trained with

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> PeftScorer:
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> PeftScorer:
        self.model.train(mode)
        return self

    def __call__(self, *args: Any, adapter: Any = None, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def generate(self, *args: Any, adapter: Any = None, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return self.model.generate(*args, **kwargs)


def peft_config(method: str, model: Any, budget_steps: int) -> Any:
    """The peft config of a benchmark method, with exactly the projections adaptkit targets."""
    import peft

    family, options = METHODS[method]
    task = TASK_TYPES[model.family]
    if family == "prefix":
        return peft.PrefixTuningConfig(task_type=task, num_virtual_tokens=options["length"], prefix_projection=False)
    targets = [site.name for site in model.arch.select_linears(options["targets"])]
    if family == "lora":
        return peft.LoraConfig(task_type=task, r=options["r"], lora_alpha=options["alpha"], lora_dropout=0.0,
                               target_modules=targets)
    if family == "adalora":
        c = AdaLoRA(**options, total_steps=budget_steps)  # the same tinit / tfinal defaults
        return peft.AdaLoraConfig(task_type=task, init_r=c.init_r, target_r=c.target_r, total_step=c.total_steps,
                                  tinit=c.tinit, tfinal=c.tfinal, deltaT=c.delta_t, beta1=c.beta1, beta2=c.beta2,
                                  orth_reg_weight=c.orth_reg_weight, lora_alpha=c.alpha, lora_dropout=0.0,
                                  target_modules=targets)
    raise ValueError(f"no peft peer for {method!r}")


def train_peft(model: Any, method: str, cfg: Any, train_rows: Any, dev_rows: Any, out_dir: Path,
               device: torch.device) -> tuple[PeftScorer, dict[str, Any], Callable]:
    """Train `method` with peft on `model`'s backbone (wrapped in place); returns (scorer, figures,
    latency(run, fixed) → ms of bare / unmerged / merged generation)."""
    import peft
    from accelerate.utils import set_seed

    family = METHODS[method][0]
    slice_head = can_slice_head(model)
    set_seed(cfg.seed)  # as the trainer does before building the adapter
    config = peft_config(method, model, cfg.budget_steps)
    pm = peft.get_peft_model(model.model, config)
    if cfg.activation_checkpointing:  # as peft's docs do it; the adapters sit in the modules, so no routing
        pm.base_model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False})
    prompt = PromptFormat() if model.family == "decoder" else None
    encoded, _ = encode_pairs(train_rows, model.tokenizer, model.family, prompt=prompt,
                              max_source_len=cfg.max_source_len, max_target_len=cfg.max_target_len)
    sampler = EpochSampler(len(encoded), cfg.seed)
    loader = torch.utils.data.DataLoader(encoded, batch_size=cfg.batch_size, sampler=sampler,
                                         collate_fn=Collator(model.tokenizer, model.family))
    params = [p for p in pm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.0},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr(family))
    total, warmup = cfg.budget_steps, cfg.budget_steps // 10 if cfg.warmup_steps is None else cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule))
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
                if device.type == "cuda" else torch.autocast("cpu", enabled=False))

    def batches():
        epoch = 0
        while True:
            sampler.epoch = epoch
            yield from loader
            epoch += 1

    seconds, tokens, loss = [], [], None
    stream = batches()
    pm.train()
    for step in tqdm(range(total), desc=f"peft:{method}", disable=not cfg.progress, unit="step"):
        batch = {k: v.to(device) for k, v in next(stream).items()}
        start = time.perf_counter()
        with autocast:
            out = pm(**loss_inputs(batch, slice_head))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if family == "adalora":
            pm.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())  # also waits for the device: the step is done
        seconds.append(time.perf_counter() - start)
        tokens.append(int(batch["attention_mask"].sum()))
    pm.eval()
    scorer = PeftScorer(pm, model.tokenizer, model.family)
    dev = evaluate(scorer, dev_rows, None, prompt=prompt, batch_size=cfg.eval_batch_size,
                     max_new_tokens=cfg.max_new_tokens, max_source_len=cfg.max_source_len,
                     max_target_len=cfg.max_target_len)
    pm.save_pretrained(str(out_dir))
    weights = out_dir / "adapter_model.safetensors"
    record = {"trainable_parameters": sum(p.numel() for p in params), "train_loss": loss, "dev": dev,
              "file_bytes": weights.stat().st_size, "file": weights.name, "peft_version": peft.__version__,
              **step_figures(seconds, tokens)}

    def measure(run: Callable[[dict], dict[str, float]], fixed: dict) -> dict[str, float]:
        def bare(x: dict) -> Any:
            with pm.disable_adapter():
                return scorer.generate(**x, **fixed)

        ms = run({"bare": bare, "unmerged": lambda x: scorer.generate(**x, **fixed)})
        if adapter_class_for(family).mergeable:  # peft merges the same families
            pm.merge_adapter()
            try:
                ms["merged"] = run({"merged": lambda x: scorer.generate(**x, **fixed)})["merged"]
            finally:
                pm.unmerge_adapter()
        return ms

    return scorer, record, measure

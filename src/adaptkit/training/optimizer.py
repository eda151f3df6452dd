"""The optimizer's parameter groups: AdamW with weight decay on matrices only, and LoRA+ (Hayou et al. 2024)
when `loraplus_lr_ratio` is set — the adapter's B side at a higher learning rate, grouped as peft does."""

from __future__ import annotations

from typing import Any

import torch

from adaptkit.training.config import TrainConfig


def check_loraplus(adapter_class: type) -> None:
    if not adapter_class.loraplus_b:
        raise ValueError(f"loraplus_lr_ratio raises the learning rate of LoRA's B factor; the "
                         f"{adapter_class.method or adapter_class.__name__} family has none (LoRA+ applies to "
                         "lora, DoRA and adalora adapters): leave loraplus_lr_ratio unset")


def param_groups(named: list[tuple[str, torch.nn.Parameter]], cfg: TrainConfig,
                 adapter: Any = None) -> list[dict[str, Any]]:
    """AdamW's groups: matrices with weight decay, vectors without, at lr. With LoRA+ (`loraplus_lr_ratio`)
    the adapter's B side takes two more groups at lr × ratio, grouped as peft's create_loraplus_optimizer:
    the family's `loraplus_b` parameters (lora_B, DoRA's magnitude, AdaLoRA's P) and the head's 1-D ones
    (peft's `param.ndim == 1` rule); its embedding group never fills (adaptkit's LoRA adapts linears only).
    The schedule scales every group's lr alike, so the ratio holds throughout; the first group is at lr."""
    def group(params: list, lr: float, decay: bool) -> dict[str, Any]:
        return {"params": [p for p in params if (p.dim() >= 2) == decay], "lr": lr,
                "weight_decay": cfg.weight_decay if decay else 0.0}

    ratio = cfg.loraplus_lr_ratio
    if ratio is None or adapter is None:
        params = [p for _, p in named]
        return [group(params, cfg.lr, True), group(params, cfg.lr, False)]
    check_loraplus(type(adapter))

    def fast(name: str, p: torch.nn.Parameter) -> bool:
        return p.dim() == 1 if name.startswith("head.") else name.rsplit(".", 1)[-1] in adapter.loraplus_b

    base = [p for n, p in named if not fast(n, p)]
    b_side = [p for n, p in named if fast(n, p)]
    return [group(base, cfg.lr, True), group(base, cfg.lr, False),
            group(b_side, cfg.lr * ratio, True), group(b_side, cfg.lr * ratio, False)]

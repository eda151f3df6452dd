"""DoRA: LoRA split into a learned magnitude and a direction (Liu et al. 2024, weight-decomposed LoRA).

        W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_c        ‖·‖_c: the norm of each output row over the input
        y  = W' x + b = g ⊙ (W x + s·B A x) + b       g = m / ‖W + s·B A‖_c, one factor per output feature

`ak.LoRA(..., use_dora=True)` builds a `DoRAUpdate` (lora.py: `DoRA` below mixed into its `LoRAUpdate`, so that
this module needs nothing from lora.py): a LoRA update plus `lora_magnitude` (out), initialised
to ‖W‖_c so that a new adapter is the identity. The norm is detached from the graph (the paper's §4.3,
peft's only mode): m, A and B train, no gradient flows through the norm.

On the hook, the projection's own output W x + b is shared by every row; a DoRA row adds

        (g − 1) ⊙ (W x) + g ⊙ s·B A x          W x = the hook's output less the bias

peft's `DoraLinearLayer.forward` term for term. With dropout on (training), as peft does, x is dropped
once and W x is recomputed from the dropped x (the bias is never scaled): the rows then get
W x + b + (g − 1) ⊙ W·drop(x) + g ⊙ s·B A·drop(x).

The gathered fast path (lora.py) keeps serving a mixed batch's plain LoRA rows; DoRA rows take this exact
path first (its factor scales the projection's output, which the in-place gathered product would overwrite).
The norm is recomputed per forward in training (as peft) and cached at inference until a weight changes.

A stack adds each member's change to the projection's output, every change computed from the
projection's own output: W + Σᵢ (W'ᵢ − W) for a stack of DoRA and LoRA updates (the LoRA rule, where W'ᵢ − W
is s·B A). peft instead feeds each adapter the output the previous ones produced, an order-dependent rule.

Merging writes W' into the projection and keeps a copy of W, so that unmerging restores it bit for bit.
Files: `<module path>.lora_magnitude` beside `lora_A` and `lora_B`, `use_dora: true` in the config; peft's
name for it is `lora_magnitude_vector`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaptkit.core.errors import AdapterError
from adaptkit.core.safebuild import loading_from_file


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The projection's weight as a plain (out × in) tensor: Conv1D's transposed, a quantised one dequantised."""
    weight = module.weight
    if isinstance(module, Conv1D):
        return weight.T
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:  # bitsandbytes 4-bit (nf4)
        import bitsandbytes.functional as bnb_functional

        return bnb_functional.dequantize_4bit(weight.data, quant_state)
    if type(weight) in (torch.Tensor, nn.Parameter):
        return weight
    if hasattr(weight, "SCB") or hasattr(weight, "CB"):
        raise AdapterError("DoRA over a bitsandbytes int8 backbone is not supported: load it with quantize='nf4', "
                           "or without quantize")
    return weight.dequantize()  # torchao's int8 weight (a tensor subclass)


def column_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖·‖_c: the L2 norm of each output row over the input dimension, as peft's `get_weight_norm`."""
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


class DoRA(nn.Module):
    """What DoRA adds to a LoRA update (lora_A, lora_B, scale, dropout, delta_weight): mixed in before it."""

    dora = True
    lora_A: nn.Parameter
    lora_B: nn.Parameter
    scale: float
    dropout: nn.Module

    def __init__(self, in_features: int, out_features: int, *args: Any):
        super().__init__(in_features, out_features, *args)
        self.lora_magnitude = nn.Parameter(torch.ones(out_features))  # init_magnitude sets ‖W‖_c
        self._norm_cache: tuple[tuple, torch.Tensor] | None = None

    @torch.no_grad()
    def init_magnitude(self, module: nn.Module) -> None:
        """m = ‖W + s·B A‖_c (B is zero: ‖W‖_c), computed in W's dtype as peft does: a new adapter is the identity."""
        weight = dense_weight(module)
        norm = column_norm(weight + (self.delta_weight().to(weight.device, weight.dtype)))
        self.lora_magnitude.copy_(norm)

    @torch.no_grad()
    def weight_norm(self, module: nn.Module) -> torch.Tensor:
        """‖W + s·B A‖_c, detached, in the adapter's dtype; reused within inference while no weight changed."""
        weight = module.weight
        key = (id(weight), weight._version, self.lora_A._version, self.lora_B._version,
               self.lora_A.device, self.lora_A.dtype)
        cached = self._norm_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        dense = dense_weight(module).to(self.lora_A.device, self.lora_A.dtype)
        norm = column_norm(dense + self.scale * (self.lora_B @ self.lora_A))
        if not torch.is_grad_enabled():  # inference: a training step changes A and B in place anyway
            self._norm_cache = (key, norm)
        return norm

    def dora_delta(self, x: torch.Tensor, output: torch.Tensor, module: nn.Module) -> torch.Tensor:
        """What turns these rows' projection output W x + b (`output`) into DoRA's: peft's `result_dora`."""
        x = x.to(self.lora_A.dtype)
        factor = self.lora_magnitude / self.weight_norm(module)
        if self.training and not isinstance(self.dropout, nn.Identity):
            x = self.dropout(x)
            base = nn.functional.linear(x, dense_weight(module).to(x.dtype))
        else:
            bias = getattr(module, "bias", None)
            base = (output if bias is None else output - bias).to(x.dtype)
        lora = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)
        return ((factor - 1) * base + factor * lora * self.scale).to(output.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AdapterError("a DoRA update needs the projection's output: it runs only through the projection's hook")

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        raise AdapterError("a DoRA update needs the projection's output: it runs only through the projection's hook")

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """W' = m / ‖W + s·B A‖_c ⊙ (W + s·B A) for W (out × in) in W's dtype, as peft's `merge_safe`.

        `delta_weight()` stays s·B A, the direction's low-rank part: DoRA's whole change of W is
        `merged_weight(W) − W`, which needs W."""
        combined = weight + self.delta_weight().to(weight.device, weight.dtype)
        factor = self.lora_magnitude.to(weight.device, weight.dtype) / column_norm(combined)
        return factor[:, None] * combined


def new_dora_updates(updates: list[tuple[nn.Module, DoRA]]) -> None:
    """Set each new update's magnitude from its projection's weight; a build for a file load skips it (the file's
    magnitude overwrites it next), as does the meta-device dry run of a file's config (core/safebuild.py)."""
    for module, update in updates:
        if loading_from_file() or update.lora_magnitude.is_meta:  # a dry run on the meta device: no values
            return
        update.init_magnitude(module)

"""`quantize="int8-dynamic"`: int8 weights times int8 activations, for inference only.

        x (float) ─► per token: s_x = max|x|/127, q_x = round(x/s_x) ──┐
                                                                       ├─► torch._int_mm ─► · s_x · s_w (+ b)
        W (float, once, at load) ─► per output row: s_w, q_W (int8) ───┘    (int32, exact)

The weight lives in `Int8DynamicWeight`, a tensor subclass inside the same `nn.Linear` (so hooks and the
role map see the modules they saw before), built on torchao's `TorchAOBaseTensor` for the tensor plumbing
(detach, `.to`, flattening for `storage_bytes`); the matmul is torch's own `torch._int_mm`, the kernel
torchao's `Int8DynamicActivationInt8WeightConfig` also ends in on CPU. That config itself was measured
and not used (benchmarks/fast_weights.py, part 1): its Python path weighs on small calls, so at 1-4
tokens gemma3-270m's projections ran 2-18x slower than float32 (640→256, one token: ~0.35 ms a call,
this path ~0.09 ms, float32 ~0.03 ms); the head and larger batches gain under both.
torch.ao's dynamic quantisation (fbgemm) is faster still, but it is deprecated, swaps each Linear for its
own module, and scales the activations per tensor: a row's output would depend on its batch-mates.

Per-token activation scales and an exact integer product make every token's output independent of the
other rows in the batch: a row routed to one adapter computes the same backbone values alone or in a
mixed batch. No gradient flows through `torch._int_mm`, hence inference only: a forward that needs one
raises `InferenceOnlyBackbone` instead of silently leaving the adapters below without a gradient.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchao.utils import TorchAOBaseTensor

from adaptkit.core.errors import InferenceOnlyBackbone

# keeps an all-zero row (padding) finite: its int8 values are 0 whatever the scale
_EPS = torch.finfo(torch.float32).eps


class Int8DynamicWeight(TorchAOBaseTensor):
    """An (out × in) Linear weight as int8 values `qdata` and one float scale per output row; it reports
    the float dtype it was built from, so code that reads `weight.dtype` sees the backbone's dtype."""

    tensor_data_names = ["qdata", "scale"]
    tensor_attribute_names = ["dtype"]

    def __new__(cls, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> Int8DynamicWeight:
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device,
                                                   requires_grad=False)

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.qdata = qdata
        self.scale = scale

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> Int8DynamicWeight:
        """Symmetric per-row int8: q = round(W / s), s = max|W_row| / 127 (scales in float32, or float64
        for a float64 weight, so a float64 test backbone is quantised without float32 rounding)."""
        weight = weight.detach()
        work = weight.to(torch.promote_types(weight.dtype, torch.float32))
        scale = work.abs().amax(dim=1).clamp_min(_EPS) / 127
        qdata = torch.round(work / scale[:, None]).to(torch.int8)
        return cls(qdata.contiguous(), scale, weight.dtype)

    def dequantize(self, output_dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight these int8 values stand for (DoRA's column norm reads it)."""
        return (self.qdata.to(self.scale.dtype) * self.scale[:, None]).to(output_dtype or self.dtype)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, scale) per row of a 2-D input, in float32 or wider. The scale is max|x|/127 and
    q = round(x / scale): |x / scale| <= 127 up to two roundings (~3e-5), so q never leaves [-127, 127]."""
    scale = torch.linalg.vector_norm(x, float("inf"), dim=-1, keepdim=True).clamp_min_(_EPS).div_(127)
    return (x / scale).round_().to(torch.int8), scale


@Int8DynamicWeight.implements_torch_function(F.linear)
def _linear(func: Any, types: Any, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if torch.is_grad_enabled() and x.requires_grad:
        raise InferenceOnlyBackbone()
    work = x.reshape(-1, x.shape[-1]).to(torch.promote_types(x.dtype, torch.float32))
    values, row_scale = quantize_activations(work)
    # int32 × the scales promotes to the activation's float dtype: one pass per scale, in place after the first
    out = (torch._int_mm(values, weight.qdata.t()) * row_scale).mul_(weight.scale)
    if bias is not None:
        out = out.add_(bias)
    return out.reshape(*x.shape[:-1], out.shape[-1]).to(x.dtype)

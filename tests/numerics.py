"""How far apart two evaluations of one function may honestly be: a bound derived from the computation.

Two evaluations of the same function that round in a different order — a row in a batch vs the row
alone, W x + B A x vs (W + B A) x, sdpa vs eager, a pruned vs a zero-masked rank — differ by rounding
only. Each floating-point operation is off by at most eps relative to the values it handles, and a
transformer carries those errors through its layers, where independent errors add up like a random
walk. So the difference is bounded by

    atol = C · eps(dtype) · scale · sqrt(depth)

scale: the largest |logit| of the reference; depth: the transformer layers the error passes through;
C: what eps · scale · sqrt(depth) leaves out — dot products of a few hundred terms, the softmax (it
turns an absolute error in a score into a relative error of its output: large scores amplify) and a
layer norm of a nearly constant vector (it divides by a small spread). C = 1e4, from measurement: over
60 random draws of each of nine tiny architectures in the mixed-family and merge set-ups, in float64,
the median difference was 1–40 eps·scale, the 90th percentile <= 170, and the worst 3,200 at depth 4
(1,600 · sqrt(depth): a BART draw whose post-layer-norm input is nearly constant; in float32 the same
draw gives 14,000, so it is the input's conditioning, not noise of the routing). C sits 6x above it.

These comparisons run in float64 (the `float64` fixture in conftest.py). There the bound is
~5e-12 of the logits: rounding cannot reach it, and an adapter applied to the wrong rows or loaded
wrong — which moves the logits by >= 1e-1 of their scale — is ten orders of magnitude beyond it. In
float32 the same C would allow ~1e-3 of the logits, too loose to call two results the same, hence
the refusal below. Why a fixed atol=1e-5 in float32 failed on T5: its tied head multiplies by
embeddings of std 1 (the others' are 0.02), so its logits are ~10x larger, and its attention has no
1/sqrt(d_kv) scaling, so random LoRA weights on q and k give scores up to ~66 (BART's stay ~12),
which the softmax amplifies: ~200 eps·scale against the 1e-5 / (eps · 4) ≈ 20 that atol allowed.
"""

from __future__ import annotations

import math

import torch

C = 1.0e4


def rounding_bound(expected: torch.Tensor, depth: int, precision: torch.dtype | None = None) -> float:
    """The largest difference rounding alone can explain between two evaluations that give `expected`.

    precision: the coarsest dtype any step of either computation rounds to, when coarser than the
    tensors' own (transformers' eager attention of Llama and Gemma takes its softmax in float32).
    """
    eps = torch.finfo(precision or expected.dtype).eps
    scale = expected.detach().abs().max().item()
    return C * eps * max(scale, 1.0e-30) * math.sqrt(max(depth, 1))


def assert_close_to_rounding(actual: torch.Tensor, expected: torch.Tensor, depth: int, msg: str = "",
                             precision: torch.dtype | None = None) -> None:
    """actual equals expected up to the rounding of a depth-layer float64 computation (see the module docstring)."""
    assert expected.dtype == torch.float64, (
        f"{msg}: compare in float64 (the float64 fixture, or model.double()); got {expected.dtype}")
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (actual.shape, actual.dtype, msg)
    atol = rounding_bound(expected, depth, precision)
    diff = (actual.detach() - expected.detach()).abs().max().item()
    assert diff <= atol, f"{msg}: max |difference| {diff:.3g} > rounding bound {atol:.3g}"


def depth_of(model: torch.nn.Module) -> int:
    """Transformer layers of an AdaptedModel's backbone, encoder and decoder together."""
    return len(model.arch.layers)

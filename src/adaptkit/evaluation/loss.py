"""The loss on target tokens only: shared by the training step and the dev evaluation.

Decoder LMs run their output layer only at positions that predict a target token
(`logits_to_keep`): exact, and with a 262k vocabulary most of a step's time and memory saved.

Chunked (Liger's fused linear cross-entropy, torchtune's chunked loss): the LM head and the
cross-entropy run over `chunk` target positions at a time, and each chunk's gradients with
respect to the hidden states (and the head, when it trains) are taken right there, so neither
the (N × vocab) logits nor their gradient ever exist whole — on gemma3-270m (262k vocabulary)
those are ~1 MB per target position each, in float32:

    hidden[keep] (N × d) ──► for each chunk c:  z = h_c Wᵀ (+ b) [→ cap · tanh(z / cap)]
                                                loss += Σ lse(z) − z[target]
                                                ∂h_c = (softmax(z) − onehot) W / N,  ∂W += (…)ᵀ h_c / N
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from adaptkit.core.regularizer import add_regularizers

# Logit elements of one chunk: 2^24 float32 (64 MiB), e.g. 64 positions of gemma3's 262k vocabulary
# or 512 of a 32k one; the chunk's softmax is taken in place, so this is about the whole extra memory.
CHUNK_LOGITS = 2**24

# Causal LMs whose forward is exactly `lm_head(hidden)` at the kept positions, with Gemma's optional
# `final_logit_softcapping`: the chunked loss reproduces their logits. Others (a logit scale, an
# auxiliary router loss) keep the model's own loss.
CHUNKABLE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                                   "gpt2", "phi3", "olmo2", "smollm3"})


def label_tokens(labels: torch.Tensor, family: str) -> int:
    """Tokens that carry a loss: decoder LMs predict position t+1 from t, so the first never counts."""
    if family == "decoder":
        labels = labels[:, 1:]
    return int((labels != -100).sum())


def loss_inputs(batch: dict[str, torch.Tensor], slice_head: bool) -> dict[str, Any]:
    """Model inputs with labels. With `slice_head` (decoder LMs) the LM head runs only at positions
    that predict a target token: exact, and with a 262k vocabulary it is most of the step saved."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    if not slice_head:
        inputs["labels"] = labels
        return inputs
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    # hidden[keep] → head → (N, vocab); `shift_labels` tells the model's loss these are the targets.
    inputs.update(logits_to_keep=keep, labels=targets, shift_labels=targets)
    return inputs


def can_slice_head(model: Any) -> bool:
    """Decoder LMs whose forward takes `logits_to_keep` (transformers 5 causal LMs do)."""
    return model.family == "decoder" and "logits_to_keep" in inspect.signature(model.model.forward).parameters


def chunked_head(model: Any) -> tuple[nn.Linear, float | None] | None:
    """(LM head, logit softcap) where the chunked loss reproduces the model's logits; None elsewhere."""
    backbone = model.model
    head = backbone.get_output_embeddings() if hasattr(backbone, "get_output_embeddings") else None
    if not can_slice_head(model) or not isinstance(head, nn.Linear):
        return None
    if backbone.config.model_type not in CHUNKABLE_MODEL_TYPES:
        return None
    softcap = getattr(backbone.config, "final_logit_softcapping", None)
    return head, (float(softcap) if softcap else None)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          targets: torch.Tensor, softcap: float | None = None,
                          chunk: int | None = None) -> torch.Tensor:
    """mean over rows of cross_entropy(hidden Wᵀ + b, targets), `chunk` rows at a time (default: CHUNK_LOGITS
    logits per chunk); with gradients, the (rows × vocab) logits and their gradient are never whole."""
    if hidden.shape[0] == 0:  # a micro-batch without targets adds nothing (the model's own mean gives NaN)
        return (hidden.sum() + weight.sum()) * 0.0
    chunk = chunk or max(1, CHUNK_LOGITS // weight.shape[0])
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    if grads:
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, softcap, chunk)
    total = sum(_chunk_loss(hidden[i:i + chunk], weight, bias, targets[i:i + chunk], softcap)[0].sum()
                for i in range(0, hidden.shape[0], chunk))
    return total / hidden.shape[0]


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                softcap: float | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(per-row loss, float32 logits, their logsumexp, tanh of the capped logits or None)."""
    logits = nn.functional.linear(h, weight, bias)
    logits = logits.to(_at_least_float32(logits.dtype))  # as the model's loss: its logits, upcast
    capped = None
    if softcap is not None:
        capped = torch.tanh(logits / softcap)
        logits = capped * softcap
    lse = torch.logsumexp(logits, dim=-1)
    return lse - logits.gather(1, targets[:, None]).squeeze(1), logits, lse, capped


def _at_least_float32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """The loss and, in the same pass over the chunks, its gradients; backward only scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, softcap: float | None, chunk: int) -> torch.Tensor:
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        n = hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # accumulated over chunks: in float32 even for a bf16 head, cast once at the end
        accumulate = _at_least_float32(weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if need_bias else None
        total = torch.zeros((), dtype=_at_least_float32(hidden.dtype), device=hidden.device)
        for start in range(0, n, chunk):
            h, t = hidden[start:start + chunk], targets[start:start + chunk]
            losses, logits, lse, capped = _chunk_loss(h, weight, bias, t, softcap)
            total += losses.sum()
            grad = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            grad[torch.arange(len(t), device=grad.device), t] -= 1.0
            grad /= n
            if capped is not None:
                grad *= 1.0 - capped * capped  # d(cap · tanh(z / cap)) / dz
            if need_hidden:
                grad_hidden[start:start + chunk] = grad.to(weight.dtype) @ weight
            if need_weight:
                grad_weight += grad.T.to(accumulate) @ h.to(accumulate)
            if need_bias:
                grad_bias += grad.sum(0)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total / n

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple:
        grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
        weight_dtype, bias_dtype = ctx.dtypes
        return (grad_hidden * grad_output.to(grad_hidden.dtype) if grad_hidden is not None else None,
                (grad_weight * grad_output).to(weight_dtype) if grad_weight is not None else None,
                (grad_bias * grad_output).to(bias_dtype) if grad_bias is not None else None,
                None, None, None)


def target_loss(model: Any, batch: dict[str, torch.Tensor], adapter: Any, *, slice_head: bool = True,
                chunked: bool = True, chunk: int | None = None, forward: Any = None) -> torch.Tensor:
    """The mean loss over a batch's target tokens (plus, in training, the routed adapter's regulariser).

    `forward` runs the model (the trainer passes its accelerate-wrapped one, so gradients synchronise
    across processes); by default `model`. Decoder LMs with `slice_head` run the head only at target
    positions, and with `chunked` (where `chunked_head` allows) `chunk` positions at a time.
    """
    forward = forward or model
    slice_head = slice_head and can_slice_head(model)
    found = chunked_head(model) if slice_head and chunked else None
    if found is None:
        return forward(**loss_inputs(batch, slice_head), adapter=adapter).loss
    head, softcap = found
    inputs = loss_inputs(batch, slice_head=True)
    keep, targets = inputs.pop("logits_to_keep"), inputs.pop("labels")
    del inputs["shift_labels"]
    # No position kept: the model's own head runs on zero rows; the hidden states feed the chunks.
    output = forward(**inputs, logits_to_keep=torch.zeros_like(keep), output_hidden_states=True, adapter=adapter)
    loss = chunked_cross_entropy(output.hidden_states[-1][keep], head.weight, head.bias, targets, softcap, chunk)
    if model.training and isinstance(adapter, str):  # what the bank adds to a model's own loss
        loss = add_regularizers(loss, [model.get_adapter(adapter)])
    return loss


@torch.no_grad()
def dev_loss(model: Any, encoded: Any, collate: Any, adapter: Any, batch_size: int = 16,
             slice_head: bool = True) -> float:
    """Token-weighted mean loss of `model` with `adapter` over a tokenized split."""
    device = next(model.model.parameters()).device
    slice_head = slice_head and can_slice_head(model)
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        n = label_tokens(batch["labels"], model.family)
        if n:
            total += float(target_loss(model, batch, adapter, slice_head=slice_head)) * n
            tokens += n
    return total / max(tokens, 1)

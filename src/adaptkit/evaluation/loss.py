"""The loss on target tokens only: shared by the training step and the dev evaluation.

Decoder LMs run their output layer only at positions that predict a target token
(`logits_to_keep`): exact, and with a 262k vocabulary most of a step's time and memory saved.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch


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
            total += float(model(**loss_inputs(batch, slice_head), adapter=adapter).loss) * n
            tokens += n
    return total / max(tokens, 1)

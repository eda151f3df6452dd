"""Task heads: small trainable modules that ride inside an adapter, whatever its family.

An adapter of any family may carry one head (`Adapter.set_head`). The head's tensors go into the
same adapter file under `head.*`, its description (kind, labels, sizes) into the header as
`adaptkit.head`, and `load_adapter` rebuilds it from there before the tensors are loaded. The
bank never looks inside: it only moves `file_tensors()` / `file_metadata()` to and from the file.

    hidden states [B, T, H] ──pool over the attention mask──▶ [B, H] ──dropout, Linear──▶ logits [B, K]

Pooling is the mean over unmasked tokens by default (what sentence encoders such as
all-MiniLM-L6-v2 were trained with), or the first token (`cls`, BERT's pretraining pooling).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from adaptkit.core.errors import AdapterError

POOLINGS = ("mean", "cls")


class ClassificationHead(nn.Module):
    """Pool the encoder's last hidden states, then one Linear to one logit per label."""

    kind: ClassVar[str] = "classification"

    def __init__(self, hidden_size: int, labels: list[str], pooling: str = "mean", dropout: float = 0.1):
        super().__init__()
        labels = [str(label) for label in labels]
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise AdapterError(f"a classification head needs at least two distinct labels; got {labels}")
        if pooling not in POOLINGS:
            raise AdapterError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
        self.hidden_size = hidden_size
        self.labels = labels
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(hidden_size, len(labels))
        # BERT's initialisation for task heads: small logits at first, so no class starts favoured
        nn.init.normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(dim=1)
        mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        pooled = self.pool(hidden, attention_mask).to(self.linear.weight.dtype)
        return self.linear(self.dropout(pooled))

    def spec(self) -> dict[str, Any]:
        """What rebuilds this head: written to the file header as `adaptkit.head`."""
        return {"kind": self.kind, "hidden_size": self.hidden_size, "labels": list(self.labels),
                "pooling": self.pooling, "dropout": self.dropout.p}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ClassificationHead:
        try:
            return cls(int(spec["hidden_size"]), list(spec["labels"]), spec.get("pooling", "mean"),
                       float(spec.get("dropout", 0.0)))
        except KeyError as missing:
            raise AdapterError(f"the file's classification head has no {missing}; it is damaged or from "
                               "another tool") from None


HEADS: dict[str, type[nn.Module]] = {ClassificationHead.kind: ClassificationHead}


def head_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Rebuild a head from the `adaptkit.head` description saved with an adapter."""
    kind = spec.get("kind") if isinstance(spec, dict) else None
    if kind not in HEADS:
        raise AdapterError(f"unknown head kind {kind!r} in the adapter file; this adaptkit knows {sorted(HEADS)} "
                           "— upgrade adaptkit to read it")
    return HEADS[kind].from_spec(spec)

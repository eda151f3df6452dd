"""The one rule for a training loss's adapter terms: each routed adapter's regulariser (AdaLoRA's
orthogonality, `Adapter.regularization_loss`) is added to the loss, in the order given.

The bank adds them to a loss the backbone computed itself; the chunked target loss and the classifier
loss are computed outside the forward and add them here, by the same rule.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def add_regularizers(loss: torch.Tensor, adapters: Iterable[Any]) -> torch.Tensor:
    """`loss` plus every adapter's `regularization_loss()` that is not None, each moved to the loss's device."""
    for adapter in adapters:
        term = adapter.regularization_loss()
        if term is not None:
            loss = loss + term.to(loss.device)
    return loss

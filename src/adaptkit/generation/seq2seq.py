"""Encoder–decoder rows in the continuous batch: each row's own decoder positions.

`generate` runs one row's decoder at positions 0, 1, 2, ...; in the batch, rows have written different
numbers of tokens, but these decoders derive one position for the whole batch from the cache length. Inside
`own_positions(model, lengths, ids)` each row gets its own, computed by the model's own position modules
(forward hooks; nothing of the model is copied):

    Marian                sinusoidal table                 the module's embedding at each row's positions
    BART, mBART           learned table, offset 2          the same, at position + the module's offset
    M2M100                sinusoidal, pad ids → pad slot   its `create_position_ids_from_input_ids`, per-row length
    T5                    relative bias (key − query)      its `compute_bias`, each row's entries of it

Known by class name, so that importing this module loads no model code. Other decoders are `unsupported`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def _table(module: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return nn.Embedding.forward(module, positions)


def _offset_table(module: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return nn.Embedding.forward(module, positions + module.offset)


def _m2m100(module: nn.Module, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    # The module counts a pad id as no position (its padding slot); its own function does that per row.
    own = module.create_position_ids_from_input_ids(ids, module.padding_idx, positions[:, :1])
    return module.weights.index_select(0, own.view(-1).to(module.weights.device)).view(*ids.shape, -1).detach()


# Position module class → its output at per-row positions [rows, tokens], given the step's decoder ids.
POSITION_MODULES: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "MarianSinusoidalPositionalEmbedding": _table,
    "BartLearnedPositionalEmbedding": _offset_table,
    "MBartLearnedPositionalEmbedding": _offset_table,
    "M2M100SinusoidalPositionalEmbedding": _m2m100,
}
RELATIVE_BIAS_MODULES = ("T5Attention",)


def _position_site(model: nn.Module) -> tuple[str, nn.Module] | None:
    """("table" | "bias", module): where the decoder's positions enter."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None:
        return None
    table = getattr(decoder, "embed_positions", None)
    if table is not None and type(table).__name__ in POSITION_MODULES:
        return "table", table
    for module in decoder.modules():
        if type(module).__name__ in RELATIVE_BIAS_MODULES and getattr(module, "has_relative_attention_bias", False):
            return "bias", module
    return None


def positions_unsupported(model: nn.Module) -> str | None:
    """Why this encoder–decoder's rows cannot each get their own decoder positions (None: they can)."""
    if _position_site(model) is not None:
        return None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    found = type(getattr(decoder, "embed_positions", decoder)).__name__
    return (f"continuous batching gives each row its own decoder positions for Marian, M2M100, (m)BART and T5 "
            f"decoders; this decoder's positions come from {found}")


@contextlib.contextmanager
def own_positions(model: nn.Module, lengths: torch.Tensor, ids: torch.Tensor, keys: int) -> Iterator[None]:
    """Inside the block, the decoder puts row i's tokens `ids[i]` at positions lengths[i], lengths[i] + 1, ...
    (`keys`: the columns its self-attention attends over, past and new)."""
    site = _position_site(model)
    assert site is not None, positions_unsupported(model)
    kind, module = site
    device = next(model.parameters()).device
    positions = (lengths[:, None] + torch.arange(ids.shape[1])).to(device)
    if kind == "table":
        own = POSITION_MODULES[type(module).__name__]

        def table_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor
                       ) -> torch.Tensor:
            return own(module, ids.to(device), positions).to(output.dtype)

        handle = module.register_forward_hook(table_hook, with_kwargs=True)
    else:
        def bias_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
            if kwargs.get("position_bias") is None:
                kwargs["position_bias"] = _row_bias(module, positions, keys)
            return args, kwargs

        handle = module.register_forward_pre_hook(bias_hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def _row_bias(module: nn.Module, positions: torch.Tensor, keys: int) -> torch.Tensor:
    """T5's relative bias [rows, heads, tokens, keys] with each row's queries at its own positions. The module's
    bias depends on key − query only: one line of it, key − query from −(furthest query) to keys − 1, serves
    every row (computing it per query would cost queries × keys per step)."""
    reach = int(positions.max())
    line = module.compute_bias(1, reach + keys, device=positions.device, past_seen_tokens=reach)[0, :, 0]
    index = torch.arange(keys, device=positions.device)[None, None, :] - positions[:, :, None] + reach
    return line[:, index].permute(1, 0, 2, 3)

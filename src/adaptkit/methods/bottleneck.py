"""Bottleneck adapters: a small down–up MLP at the sublayer boundaries (Houlsby, Pfeiffer, parallel).

    sequential (houlsby, pfeiffer)             parallel (He et al. 2022)
    h = sublayer(x)                            h = ffn(x)
    h ──────────────────────┐                  x ──► ffn ─────────────────────┐
    └─► down ─► act ─► up ──+─► h'             └─► down ─► act ─► up ─────────+─► h'
        h' = h + s · up(act(down(h)))              h' = ffn(x) + s · up(act(down(x)))

Houlsby puts one after every attention output projection (self and cross) and one after the
FFN output; Pfeiffer only after the FFN; parallel sits beside the FFN, reading the FFN's input.
All of them act on the sublayer output before the residual add, as in Houlsby et al. 2019, so
the backbone's own layer norms and residuals are untouched. `up` starts at zero: a new adapter
is exactly the identity. They hold a nonlinearity, so they cannot be merged into the weights.

The sequential update rides on a forward hook of the output projection. The parallel one needs
the FFN input too: a forward pre-hook on the FFN's input projection leaves it in the call's
`routing.scratch` (per call, so concurrent calls never see each other's tensors), and the hook
on the FFN output projection takes it from there.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptkit.core.arch import Arch, LinearSite
from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import register_method
from adaptkit.core.routing import Routing
from adaptkit.methods.base import Adapter, AdapterConfig, HookSite, add_rows, block_input, release_inputs, select_rows

PLACEMENTS = ("pfeiffer", "houlsby", "parallel")
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
STACKS = ("encoder", "decoder")


@dataclass
class Bottleneck(AdapterConfig):
    """reduction: bottleneck width = hidden size // reduction; placement: "pfeiffer" (after the FFN),
    "houlsby" (after attention and FFN) or "parallel" (beside the FFN); scaling: s in h + s · up(act(down(·)));
    stacks: None for every layer, or "encoder" / "decoder" (or both) to restrict where adapters go."""

    method = "bottleneck"
    reduction: int = 16
    placement: str = "pfeiffer"
    activation: str = "relu"
    scaling: float = 1.0
    dropout: float = 0.0
    stacks: str | tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.reduction, int) or self.reduction < 1:
            raise AdapterError(f"Bottleneck reduction must be a positive integer, got {self.reduction!r}")
        if self.placement not in PLACEMENTS:
            raise AdapterError(f"unknown Bottleneck placement {self.placement!r}; use one of {list(PLACEMENTS)}")
        if self.activation not in ACTIVATIONS:
            raise AdapterError(f"unknown Bottleneck activation {self.activation!r}; use one of {list(ACTIVATIONS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise AdapterError(f"Bottleneck dropout must be in [0, 1), got {self.dropout}")
        if self.stacks is not None:
            # a list arrives from the JSON header; a single name is the common spelling
            self.stacks = (self.stacks,) if isinstance(self.stacks, str) else tuple(self.stacks)
            bad = [s for s in self.stacks if s not in STACKS]
            if bad or not self.stacks:
                raise AdapterError(f"Bottleneck stacks must be None or a subset of {list(STACKS)}, got {self.stacks!r}")


class BottleneckBlock(nn.Module):
    """s · up(act(down(x))) for one site. `input_key` set: parallel, x is the FFN input from scratch."""

    def __init__(self, dim: int, width: int, activation: str, scaling: float, dropout: float,
                 input_key: str | None = None):
        super().__init__()
        self.down = nn.Linear(dim, width)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(width, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.input_key = input_key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.up(self.act(self.down(x.to(self.down.weight.dtype))))) * self.scaling


def capture_input(site: HookSite, module: nn.Module, args: tuple, output: Any, routing: Routing, *, key: str) -> None:
    """Pre-hook on the FFN input projection: keep its input for the parallel adapters of this call."""
    routing.scratch[key] = args[0]


def apply_bottleneck(site: HookSite, module: nn.Module, args: tuple, output: Any, routing: Routing) -> torch.Tensor:
    """Forward hook on a sublayer output projection: each routed adapter, in stack order, on its rows.

    Sequential blocks read the running output, so a stack (a, b) is b(a(h)); parallel blocks read
    the FFN input and add beside it.
    """
    out = output
    used: set[str] = set()
    for block, rows in site.routed(routing, out.shape[0], out.device):
        source = block_input(block.input_key, out, args, routing, used)
        out = add_rows(out, lambda r, b=block, x=source, dtype=out.dtype: b(select_rows(x, r)).to(dtype), rows)
    release_inputs(routing, used)
    return out


@register_method
class BottleneckAdapter(Adapter):
    method = "bottleneck"
    config_class = Bottleneck

    HOOK_KEY = "bottleneck"
    INPUT_HOOK_KEY = "bottleneck_input"

    def __init__(self, name: str, config: Bottleneck, arch: Arch):
        super().__init__(name, config, arch)
        layers = [layer for layer in arch.layers if config.stacks is None or layer.stack in config.stacks]
        if not layers:
            raise AdapterError(
                f"no {config.stacks} layers in this {arch.family} model ({arch.model_type}) for a bottleneck adapter; "
                f"use stacks=None or one of {sorted({layer.stack for layer in arch.layers})}"
            )
        # (output projection hooked, FFN input projection whose input parallel blocks read, or None)
        self.targets: list[tuple[LinearSite, LinearSite | None]] = []
        for layer in layers:
            if config.placement == "houlsby":
                self.targets += [(site, None) for site in layer.attn_out]
            self.targets.append((layer.ffn_out, layer.ffn_in if config.placement == "parallel" else None))
        for out_site, in_site in self.targets:
            dim = out_site.out_features
            self.add_site(out_site.name, BottleneckBlock(
                dim, max(1, dim // config.reduction), config.activation, config.scaling, config.dropout,
                input_key=None if in_site is None else f"{self.INPUT_HOOK_KEY}:{in_site.name}",
            ))
        self._hook_sites: list[HookSite] = []

    def attach(self) -> None:
        holders = dict(self.site_items())
        for out_site, in_site in self.targets:
            block = holders[out_site.name]
            if in_site is not None:
                capture = functools.partial(capture_input, key=block.input_key)
                self._hook_sites.append(
                    HookSite.join(in_site.module, self.INPUT_HOOK_KEY, capture, self.name, block, pre=True))
            self._hook_sites.append(HookSite.join(out_site.module, self.HOOK_KEY, apply_bottleneck, self.name, block))

    def detach(self) -> None:
        for site in self._hook_sites:
            site.leave(self.name)
        self._hook_sites.clear()

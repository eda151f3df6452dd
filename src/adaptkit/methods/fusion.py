"""AdapterFusion (Pfeiffer et al. 2021): a learned attention over frozen adapters of the bank.

    h = the sublayer output at a site where every member adds its output d_i (bottleneck: s · up(act(down(·)));
        LoRA: s · B A x on one projection)
    p = softmax_i(Q(h) · K(d_i) / T)          h' = h + V(Σ_i p_i d_i)   (= h + Σ_i p_i V(d_i): Σ p_i = 1)

Q starts at zero (so p is uniform), K at N(0, 0.02) (so Q gets a gradient from the first step) and V at the
identity: a new fusion is exactly the mean of its members' outputs. T is a constant (AdapterHub's schedule
from 50 down to 1 is not implemented). The members stay ordinary adapters of the bank, frozen while the
fusion trains (the trainer only gives the optimizer `model.adapter_parameters(fusion)`), and are never
registered as submodules of the fusion: its parameters and its file hold Q, K, V only.

The bank knows nothing of fusions: it asks every adapter `requires()` (the members), hands them to `bind()`
before `attach()`, keeps them resident and pinned while the fusion is loaded or used, and refuses to remove
one. The file's config names the members, their family and config (to rebuild the sites before binding),
and their files' checksums where known; a member loaded from a different file is refused.

The fusion rides on its own forward hook on each member site, so rows routed to the fusion get the fused
output and every other row of the batch is untouched. In a stack with other adapters on the same module,
hooks apply in the order the families were first hooked there (the members', then the fusion's).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adaptkit.core.arch import Arch
from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import adapter_class_for, register_method
from adaptkit.core.routing import Routing
from adaptkit.core.safebuild import loading_from_file
from adaptkit.methods.base import (
    MODULE_INPUT,
    Adapter,
    AdapterConfig,
    HookSite,
    add_rows,
    block_input,
    release_inputs,
    select_rows,
)
from adaptkit.methods.bottleneck import capture_input

FUSABLE = ("bottleneck", "lora")


@dataclass
class Fusion(AdapterConfig):
    """adapters: the member names (≥ 2, all bottleneck of one placement, or all plain LoRA of the same targets),
    already in the bank; temperature: T in softmax(q·k / T). The member_* fields are filled in when the fusion
    is bound to its members and saved with it; leave them out."""

    method = "fusion"
    adapters: tuple[str, ...] = ()
    temperature: float = 1.0
    member_method: str | None = None
    member_config: dict[str, Any] | None = None
    member_versions: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.adapters, str) or not all(isinstance(a, str) for a in self.adapters):
            raise AdapterError(f"Fusion adapters must be a list of adapter names, got {self.adapters!r}")
        self.adapters = tuple(self.adapters)
        if len(self.adapters) < 2 or len(set(self.adapters)) != len(self.adapters):
            raise AdapterError(f"a Fusion needs at least two distinct member adapters, got {list(self.adapters)}")
        if not self.temperature > 0:
            raise AdapterError(f"Fusion temperature must be positive, got {self.temperature}")
        if self.member_method is not None and self.member_method not in FUSABLE:
            raise AdapterError(f"Fusion members must be one of {list(FUSABLE)}, got {self.member_method!r}")
        if (self.member_method is None) != (self.member_config is None):
            raise AdapterError("Fusion member_method and member_config go together")


class FusionLayer(nn.Module):
    """Q, K, V over the members' outputs at one site; `members` (a tuple: not registered) is set by bind()."""

    def __init__(self, dim: int, temperature: float, input_key: str | None):
        super().__init__()
        self.query, self.key, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        if not loading_from_file():
            with torch.no_grad():
                nn.init.zeros_(self.query.weight)
                nn.init.normal_(self.key.weight, std=0.02)
                nn.init.eye_(self.value.weight)
                for linear in (self.query, self.key, self.value):
                    nn.init.zeros_(linear.bias)
        self.temperature = temperature
        self.input_key = input_key  # None: the running output (sequential bottleneck); else MODULE_INPUT / scratch
        self.members: tuple[nn.Module, ...] = ()

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if not self.members:
            raise AdapterError("a fusion layer ran without its members: the fusion is not bound (a bank bug)")
        dtype = self.query.weight.dtype
        deltas = torch.stack([m(x).to(dtype) for m in self.members], dim=-2)  # (..., n, d)
        q = self.query(h.to(dtype))
        scores = (self.key(deltas) @ q.unsqueeze(-1)).squeeze(-1) / self.temperature  # (..., n)
        probs = scores.softmax(-1)
        return self.value((probs.unsqueeze(-1) * deltas).sum(-2))


def apply_fusion(site: HookSite, module: nn.Module, args: tuple, output: Any, routing: Routing) -> torch.Tensor:
    """Forward hook on a member site: each routed fusion adds its fused output on its rows."""
    out = output
    used: set[str] = set()
    for layer, rows in site.routed(routing, out.shape[0], out.device):
        source = block_input(layer.input_key, out, args, routing, used)
        out = add_rows(out, lambda r, f=layer, h=out, x=source: f(select_rows(h, r), select_rows(x, r)).to(h.dtype),
                       rows)
    release_inputs(routing, used)
    return out


@register_method
class FusionAdapter(Adapter):
    method = "fusion"
    config_class = Fusion

    HOOK_KEY = "fusion"
    INPUT_HOOK_KEY = "fusion_input"

    def __init__(self, name: str, config: Fusion, arch: Arch):
        super().__init__(name, config, arch)
        self._targets: list[tuple[str, nn.Module, nn.Module | None, str | None]] = []  # path, module, in-module, key
        self._hook_sites: list[HookSite] = []
        if config.member_method is not None:  # from a file: the sites are built before the members are known
            self._build_sites(config.member_method, config.member_config)

    def _build_sites(self, method: str, member_config: dict[str, Any]) -> None:
        """The sites a member of this family and config adapts, read off a stand-in built on the meta device."""
        member_class = adapter_class_for(method)
        with torch.device("meta"):
            stand_in = member_class(f"{self.name}:member", member_class.config_class.from_dict(member_config),
                                    self.arch)
        if method == "bottleneck":
            for out_site, in_site in stand_in.targets:
                key = None if in_site is None else f"{self.INPUT_HOOK_KEY}:{in_site.name}"
                self._targets.append((out_site.name, out_site.module, in_site and in_site.module, key))
                self.add_site(out_site.name, FusionLayer(out_site.out_features, self.config.temperature, key))
        else:
            for target, update in stand_in.updates():
                self._targets.append((target.name, target.module, None, MODULE_INPUT))
                self.add_site(target.name, FusionLayer(update.lora_B.shape[0], self.config.temperature, MODULE_INPUT))

    # -- the members (the bank calls these) -------------------------------------------------------
    def requires(self) -> tuple[str, ...]:
        return self.config.adapters

    def bind(self, members: dict[str, Adapter], versions: dict[str, str | None]) -> None:
        config = self.config
        methods = {name: member.method for name, member in members.items()}
        if len(set(methods.values())) != 1 or next(iter(methods.values())) not in FUSABLE:
            raise AdapterError(f"fusion {self.name!r}: its members must all be bottleneck adapters or all LoRA "
                               f"adapters; got {methods}")
        method = next(iter(methods.values()))
        dora = [n for n, m in members.items() if getattr(m.config, "use_dora", False)]
        if dora:
            raise AdapterError(f"fusion {self.name!r}: DoRA members ({dora}) cannot be fused; use plain LoRA members")
        if config.member_method is not None and config.member_method != method:
            raise AdapterError(f"fusion {self.name!r} was trained over {config.member_method} adapters; "
                               f"its members {list(members)} are {method}")
        recorded = config.member_versions or {}
        changed = [n for n in members if recorded.get(n) and versions.get(n) and recorded[n] != versions[n]]
        if changed:
            raise AdapterError(f"fusion {self.name!r} was trained over other files of {changed} (checksums "
                               f"{[recorded[n][:12] for n in changed]}, loaded {[versions[n][:12] for n in changed]}): "
                               "load the member files it was trained with")
        if config.member_method is None:
            first = members[config.adapters[0]]
            self.config = dataclasses.replace(
                config, member_method=method, member_config=first.config.to_dict(),
                member_versions={n: v for n, v in versions.items() if v} or None)
            self._build_sites(method, self.config.member_config)
        own = dict(self.site_items())
        for name, member in members.items():
            holders = dict(member.site_items())
            if set(holders) != set(own):
                raise AdapterError(f"fusion {self.name!r}: member {name!r} adapts other modules than "
                                   f"{config.adapters[0]!r}; fused members need the same sites (same placement "
                                   "and stacks, or the same LoRA targets)")
            for path, layer in own.items():
                member_key = getattr(holders[path], "input_key", None)
                mine = layer.input_key if layer.input_key not in (None, MODULE_INPUT) else None
                if (member_key is None) != (mine is None):
                    raise AdapterError(f"fusion {self.name!r}: member {name!r} has another placement than the "
                                       "fusion's (parallel and sequential bottlenecks do not fuse)")
        for path, layer in own.items():
            layer.members = tuple(dict(members[n].site_items())[path] for n in config.adapters)

    # -- hooks ------------------------------------------------------------------------------------
    def attach(self) -> None:
        holders = dict(self.site_items())
        for path, module, in_module, key in self._targets:
            layer = holders[path]
            if in_module is not None:
                capture = functools.partial(capture_input, key=key)
                self._hook_sites.append(HookSite.join(in_module, self.INPUT_HOOK_KEY, capture, self.name, layer,
                                                      pre=True))
            self._hook_sites.append(HookSite.join(module, self.HOOK_KEY, apply_fusion, self.name, layer))

    def detach(self) -> None:
        for site in self._hook_sites:
            site.leave(self.name)
        self._hook_sites.clear()
        for _, layer in self.site_items():
            layer.members = ()

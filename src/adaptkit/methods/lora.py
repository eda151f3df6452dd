"""LoRA: a low-rank update beside each targeted projection.

        x ──► W (frozen) ──────────────┐
        │                              + ──► y = W x + (alpha / r) · B A x
        └──► A (r × in) ──► B (out × r)┘      B starts at zero: a new adapter is the identity

The update rides on a forward hook of the projection; rows routed to other adapters (or to
none) pass through untouched. Merging writes B A into W for zero-overhead inference and keeps
a copy of W so that unmerging restores it bit for bit.

A batch that routes its rows to several adapters on one module applies them all at once: each
row's A and scale · B, rank-padded and stacked, in one `bmm` pair over rows (Punica / S-LoRA's
gathered form), built once per call and reused by every generate step.

peft form: the same module paths, `lora_A.weight` (r × in) and `lora_B.weight` (out × r), one
rank for all modules, and DoRA's `lora_magnitude_vector` (methods/dora.py); biases, per-module alpha and
modules_to_save are refused on import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaptkit.core.arch import Arch, LinearSite, linear_shape
from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import register_method
from adaptkit.core.routing import Routing
from adaptkit.core.safebuild import loading_from_file
from adaptkit.methods.base import Adapter, AdapterConfig, HookSite, add_rows, select_rows
from adaptkit.methods.dora import DoRA, new_dora_updates


@dataclass
class LoRA(AdapterConfig):
    """r: rank; alpha: scale numerator (update scaled by alpha / r, or alpha / sqrt(r) with rslora);
    targets: "attention" | "qv" | "ffn" | "all-linear" | roles like ("q", "v") | module names;
    use_dora: DoRA, a learned magnitude per output feature (methods/dora.py);
    init: A's starting draw, B always zero (a new adapter is the identity): "default" is peft's
    `init_lora_weights=True` (kaiming-uniform, a=√5), "gaussian" its `init_lora_weights="gaussian"`
    (A ~ N(0, std 1/r)).

    peft's PiSSA, OLoRA, CorDA and LoftQ inits are not offered: they start B A from the backbone's own
    weight and rewrite that weight to the residual W − s·B A. adaptkit's backbone is frozen and shared
    by every adapter in the bank (and by rows routed to none), so no single adapter may change it; a
    residual stored per adapter would double the memory of every targeted projection. Their peft
    files (unconverted) are refused on import for the same reason. EVA (data-driven A, untouched W)
    is a possible later addition. Alternative: train with init="default" or "gaussian", or convert a
    PiSSA/OLoRA adapter to a plain LoRA in peft (`path_initial_model_for_weight_conversion`) and import that."""

    method = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "attention"
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"

    def __post_init__(self) -> None:
        self.targets = normalize_targets(self.targets)
        if self.r < 1:
            raise AdapterError(f"LoRA rank r must be at least 1, got {self.r}")
        check_init(self.init)

    def to_dict(self) -> dict[str, Any]:
        """Without `use_dora` when False and `init` when "default": a plain LoRA's header stays what older
        adaptkit writes and reads."""
        data = super().to_dict()
        if not self.use_dora:
            del data["use_dora"]
        if self.init == "default":
            del data["init"]
        return data

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


LORA_INITS = ("default", "gaussian")
# peft inits that rewrite the backbone's weight to a residual (W − s·B A): impossible on a shared backbone
RESIDUAL_INITS = ("pissa", "olora", "corda", "loftq")


def check_init(init: str) -> None:
    if init in LORA_INITS:
        return
    if isinstance(init, str) and init.lower().startswith(RESIDUAL_INITS):
        raise AdapterError(
            f"LoRA init {init!r} rewrites the backbone's weight to the residual W − B A, which a frozen backbone "
            "shared by many adapters cannot take (every other adapter, and rows routed to none, would see the "
            "changed weight); use init=\"default\" or \"gaussian\", or convert the adapter to a plain LoRA in peft "
            "(path_initial_model_for_weight_conversion) and import that")
    raise AdapterError(f"LoRA init must be one of {', '.join(LORA_INITS)}; got {init!r}")


def normalize_targets(targets: str | list[str] | tuple[str, ...]) -> str | tuple[str, ...]:
    """A group name stays a string; a list of roles or module names (JSON gives a list) becomes a tuple."""
    return targets if isinstance(targets, str) else tuple(targets)


# kaiming_uniform_(a=√5)'s bound is √3 · (gain / √fan_in) with gain = √(2 / (1 + a²)), computed in
# kaiming's order so the values are bit for bit its own; drawn directly, without its argument checks,
# it builds a 630-projection adapter ~5 ms faster (a hot-load builds one before loading the file).
_KAIMING_GAIN = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))


# Every update without dropout shares this one module: a hot-load builds hundreds of updates, and a fresh
# nn.Identity for each was one more module construction per projection.
NO_DROPOUT = nn.Identity()


class LoRAUpdate(nn.Module):
    """B A x for one projection. `merged` marks that B A currently lives inside W."""

    dora = False  # DoRAUpdate (methods/dora.py): the hook gives it the projection's output

    def __init__(self, in_features: int, out_features: int, r: int, scale: float, dropout: float,
                 init: str = "default"):
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, r))
        if not loading_from_file():  # a strict load overwrites A and B next: no need to draw A or zero B
            with torch.no_grad():  # peft's reset_lora_parameters, draw for draw, so parity tests can share weights
                if init == "gaussian":  # nn.init.normal_(A, std=1 / r)
                    self.lora_A.normal_(0.0, 1.0 / r)
                else:  # kaiming_uniform_(A, a=√5)
                    bound = math.sqrt(3.0) * (_KAIMING_GAIN / math.sqrt(in_features))
                    self.lora_A.uniform_(-bound, bound)
                self.lora_B.zero_()
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else NO_DROPOUT
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(x.to(self.lora_A.dtype))
        # F.linear takes the (out × in) weights as stored; `x @ A.T @ B.T` ran ~2× slower on CPU.
        return nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B) * self.scale

    def add_to(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """out + scale · B A x on every row, the product accumulated into a copy of `out` by one addmm
        (in place under no_grad, where `out` is the projection's fresh output): no separate delta
        tensor, scaling pass and addition pass over the (tokens × out) output."""
        low = nn.functional.linear(self.dropout(x.to(self.lora_A.dtype)), self.lora_A)
        # addmm does not autocast: under bf16/fp16 autocast `low` follows `out` but lora_B stays float32.
        if not out.dtype == low.dtype == self.lora_B.dtype or not out.is_contiguous():
            return out + (nn.functional.linear(low, self.lora_B) * self.scale).to(out.dtype)
        flat, low = out.view(-1, out.shape[-1]), low.reshape(-1, low.shape[-1])
        if torch.is_grad_enabled():
            return torch.addmm(flat, low, self.lora_B.t(), alpha=self.scale).view(out.shape)
        return flat.addmm_(low, self.lora_B.t(), alpha=self.scale).view(out.shape)

    def delta_weight(self) -> torch.Tensor:
        """The (out × in) matrix that merging adds to W."""
        return (self.lora_B @ self.lora_A) * self.scale

    def low_rank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(A (r × in), B (out × r), scale): the update is scale · x Aᵀ Bᵀ; what the gathered path stacks."""
        return self.lora_A, self.lora_B, self.scale

    def versions(self) -> tuple[int, int]:
        """In-place writes bump these: a gathered stack built from older weights is stale."""
        return self.lora_A._version, self.lora_B._version


class DoRAUpdate(DoRA, LoRAUpdate):
    """A LoRA update with a magnitude per output feature (`use_dora=True`); the math is methods/dora.py's."""


def apply_low_rank(site: HookSite, module: nn.Module, args: tuple, output: Any, routing: Routing) -> torch.Tensor:
    """Forward hook shared by LoRA and AdaLoRA: add each routed adapter's update on its rows."""
    x = args[0]
    out = output
    dora = getattr(site, "dora_names", None)
    if dora and not dora.isdisjoint(routing.names):
        # DoRA first: each reads the projection's own output W x + b before anything is added to it (or,
        # by the in-place paths below, into it); the others then add to the new tensor.
        for update, rows in site.routed(routing, x.shape[0], x.device):
            if getattr(update, "dora", False) and not update.merged:
                out = add_rows(out, lambda r, u=update: u.dora_delta(select_rows(x, r), select_rows(output, r),
                                                                     module), rows)
    if routing.uniform is None and not torch.is_grad_enabled():
        gathered = gathered_updates(site, routing, x.shape[0], x.device)
        if gathered is not None:
            return gathered.apply(x, out)
    for update, rows in site.routed(routing, x.shape[0], x.device):
        if update.merged or (dora and getattr(update, "dora", False)):
            continue
        if rows is None and hasattr(update, "add_to"):
            out = update.add_to(x, out)
        else:
            out = add_rows(out, lambda r, u=update: u(select_rows(x, r)), rows)
    return out


# -- gathered per-row updates (Punica's SGMV / S-LoRA's idea, with batched matmuls) -------------------

# A mixed batch whose rows use at least this many distinct low-rank adapters on a module takes the
# gathered path; fewer (one adapter on some rows, the rest bare) keep the loop, a single index_add
# with no per-row copy of the weights. Measured per q_proj hook (d 512, r 16, 1 thread, min of 100
# interleaved runs): time added to the bare projection, loop vs gathered, 8 rows × 64 tokens:
# 2 adapters 1102 vs 503 µs, 8 adapters 1349 vs 496 µs; decoding 32 rows × 1 token: 2 adapters 86 vs
# 59 µs, 32 adapters 890 vs 159 µs. So the gathered path wins from 2 adapters on.
GATHER_MIN_ADAPTERS = 2


class GatheredUpdates:
    """Every input row's low-rank factors, rank-padded with zeros and stacked: one `bmm` pair per module.

    A row with a stack of two adapters gets both factors side by side along the rank (the updates add).
    Rows are *input* rows: `generate` repeats each one `factor` times in a block (beams,
    num_return_sequences), so the runtime batch is viewed as (input rows, factor · tokens, features)
    and the stacks are shared by the block's rows and by every step of a generate call.
    """

    def __init__(self, members: list[nn.Module], per_row: list[tuple[nn.Module, ...]], device: torch.device):
        self.members = members
        self.versions = self.current_versions()
        self.input_rows = len(per_row)
        factors = {id(m): m.low_rank_factors() for m in members}
        adapted = [i for i, stack in enumerate(per_row) if stack]
        width = max(sum(factors[id(m)][0].shape[0] for m in per_row[i]) for i in adapted)
        stacks = {}
        for stack in dict.fromkeys(per_row[i] for i in adapted):
            parts = [factors[id(m)] for m in stack]
            # A stack's ranks side by side (its updates add up); zero ranks up to the widest row add nothing.
            down = torch.cat([a for a, _, _ in parts]) if len(parts) > 1 else parts[0][0]
            up = torch.cat([b for _, b, _ in parts], dim=1) if len(parts) > 1 else parts[0][1]
            pad = width - down.shape[0]
            if pad:
                down, up = nn.functional.pad(down, (0, 0, 0, pad)), nn.functional.pad(up, (0, pad))
            scales = [float(scale) for a, _, scale in parts for _ in range(a.shape[0])] + [0.0] * pad
            stacks[stack] = (down, up, scales)
        # Stacked as stored, (R × in) and (out × R) per row, and transposed as views: bmm reads them
        # transposed at no cost, where copying the transposes cost more than the whole gathered product.
        # The scales multiply the rank-R intermediate, not B: no scaled copy of every B per call.
        self.down = torch.stack([stacks[per_row[i]][0] for i in adapted]).to(device).transpose(1, 2)
        self.up = torch.stack([stacks[per_row[i]][1] for i in adapted]).to(device).transpose(1, 2)
        self.scales = torch.tensor([stacks[per_row[i]][2] for i in adapted], dtype=self.down.dtype,
                                   device=device)[:, None]
        self.rows = None if len(adapted) == len(per_row) else torch.tensor(adapted, device=device)

    def current_versions(self) -> tuple:
        return tuple(m.versions() for m in self.members)

    def apply(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        x3 = x.reshape(self.input_rows, -1, x.shape[-1])
        if self.rows is not None:
            x3 = x3.index_select(0, self.rows)
        low = torch.bmm(x3.to(self.down.dtype), self.down).mul_(self.scales)
        if self.rows is None and output.dtype == low.dtype == self.up.dtype and output.is_contiguous():
            # into the projection's fresh output, in place (the gathered path runs only without gradients)
            return output.view(self.input_rows, -1, output.shape[-1]).baddbmm_(low, self.up).view(output.shape)
        delta = torch.bmm(low, self.up).to(output.dtype)
        if self.rows is None:
            return output + delta.view(output.shape)
        out3 = output.reshape(self.input_rows, -1, output.shape[-1])
        return out3.index_add(0, self.rows, delta).view(output.shape)


def gathered_updates(site: HookSite, routing: Routing, batch_size: int,
                     device: torch.device) -> GatheredUpdates | None:
    """This module's gathered factors for the call, built once per call (`routing.scratch`), or None
    where the per-adapter loop applies: few adapters, dropout on, a merged or non-LoRA update."""
    key = ("low_rank_gathered", id(site), device)
    cached = routing.scratch.get(key)
    if cached is False:
        return None
    if cached is not None and cached.current_versions() == cached.versions:
        return cached
    if batch_size % len(routing.rows):
        return None  # the loop raises the routing's own error
    dora = getattr(site, "dora_names", ())  # DoRA rows took the exact path already: the others gather
    per_row = [tuple(site.members[n] for n in stack if n in site.members and n not in dora)
               for stack in routing.rows]
    members = list(dict.fromkeys(m for stack in per_row for m in stack))
    if len(members) < GATHER_MIN_ADAPTERS or not all(_gatherable(m) for m in members):
        routing.scratch[key] = False
        return None
    gathered = routing.scratch[key] = GatheredUpdates(members, per_row, device)
    return gathered


def _gatherable(member: nn.Module) -> bool:
    dropout_on = member.training and not isinstance(getattr(member, "dropout", None), nn.Identity)
    return hasattr(member, "low_rank_factors") and not member.merged and not dropout_on


class LowRankAdapter(Adapter):
    """What LoRA and AdaLoRA share: one update per targeted projection, hooked, mergeable."""

    HOOK_KEY = "low_rank"
    mergeable: ClassVar[bool] = True

    def __init__(self, name: str, config: AdapterConfig, arch: Arch):
        super().__init__(name, config, arch)
        self.targets: list[LinearSite] = arch.select_linears(config.targets)
        for target in self.targets:
            in_features, out_features = linear_shape(target.module)
            self.add_site(target.name, self.make_update(in_features, out_features))
        self._hook_sites: list[HookSite] = []
        self._backups: dict[str, torch.Tensor] = {}

    def make_update(self, in_features: int, out_features: int) -> nn.Module:
        raise NotImplementedError

    def updates(self) -> list[tuple[LinearSite, nn.Module]]:
        holders = dict(self.site_items())
        return [(target, holders[target.name]) for target in self.targets]

    def attach(self) -> None:
        for target, update in self.updates():
            site = HookSite.join(target.module, self.HOOK_KEY, apply_low_rank, self.name, update)
            self._hook_sites.append(site)
            _note_dora(site)

    def detach(self) -> None:
        if self._backups:
            self.unmerge()
        for site in self._hook_sites:
            site.leave(self.name)
            _note_dora(site)
        self._hook_sites.clear()

    @torch.no_grad()
    def merge(self) -> None:
        for target, update in self.updates():
            if update.merged:
                continue
            weight = target.module.weight
            self._backups[target.name] = weight.detach().clone()
            conv1d = isinstance(target.module, Conv1D)
            if getattr(update, "dora", False):  # W' = m / ‖W + s·B A‖_c ⊙ (W + s·B A), from the copy kept for unmerging
                merged = update.merged_weight(self._backups[target.name].T if conv1d else self._backups[target.name])
                weight.copy_(merged.T if conv1d else merged)
            else:
                delta = update.delta_weight().to(weight.dtype)
                weight += delta.T if conv1d else delta
            update.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        for target, update in self.updates():
            if update.merged:
                target.module.weight.copy_(self._backups.pop(target.name))
                update.merged = False

    def peft_targets(self) -> dict[str, Any]:
        """The peft config fields that say where the updates sit (GPT-2's Conv1D stores W transposed)."""
        return dict(target_modules=[target.name for target in self.targets],
                    fan_in_fan_out=any(isinstance(target.module, Conv1D) for target in self.targets))


def _note_dora(site: HookSite) -> None:
    """The site's DoRA members by name, for the hook: a site without DoRA pays one attribute read per call."""
    site.dora_names = frozenset(n for n, m in site.members.items() if getattr(m, "dora", False))


def refuse_peft_options(peft_config: dict[str, Any], checks: dict[str, bool]) -> None:
    """Raise, naming them, if the peft adapter uses options this family cannot reproduce exactly."""
    bad = [what for what, failed in checks.items() if failed]
    if bad:
        raise AdapterError(f"this peft {peft_config.get('peft_type')} adapter uses {', '.join(bad)}, "
                           "which adaptkit does not support; it cannot be imported exactly")


def peft_low_rank_tensors(arch: Arch, tensors: dict[str, torch.Tensor], suffixes: dict[str, str]
                          ) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """peft tensors `<module path><peft suffix>` → (module paths in backbone order, tensors under our names)."""
    ours, paths, unknown = {}, set(), []
    for key, tensor in tensors.items():
        match = next(((key[: -len(s)], mine) for s, mine in suffixes.items() if key.endswith(s)), None)
        if match is None:
            unknown.append(key)
            continue
        path, mine = match
        paths.add(path)
        ours[f"{path}.{mine}"] = tensor
    if unknown:
        raise AdapterError(f"unsupported tensors in the peft adapter (embeddings, biases, DoRA, modules_to_save?): "
                           f"{sorted(unknown)[:3]}")
    known = [site.name for site in arch.linears]
    outside = sorted(paths - set(known))
    if outside:
        raise AdapterError(f"the peft adapter targets modules adaptkit does not adapt on this backbone: {outside[:3]}")
    return tuple(p for p in known if p in paths), ours


@register_method
class LoRAAdapter(LowRankAdapter):
    method = "lora"
    config_class = LoRA

    peft_types = ("LORA",)
    # peft's LoRA+ rule is `"lora_B" in name or param.ndim == 1`: B, and DoRA's magnitude vector (1-D)
    loraplus_b = frozenset({"lora_B", "lora_magnitude"})

    def __init__(self, name: str, config: LoRA, arch: Arch):
        super().__init__(name, config, arch)
        if config.use_dora:
            new_dora_updates([(target.module, update) for target, update in self.updates()])

    def make_update(self, in_features: int, out_features: int) -> nn.Module:
        c = self.config
        if c.use_dora:
            return DoRAUpdate(in_features, out_features, c.r, c.scale, c.dropout, c.init)
        return LoRAUpdate(in_features, out_features, c.r, c.scale, c.dropout, c.init)

    def to_peft(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        c: LoRA = self.config
        tensors = {}
        for path, update in self.site_items():
            tensors[f"{path}.lora_A.weight"] = update.lora_A
            tensors[f"{path}.lora_B.weight"] = update.lora_B
            if c.use_dora:
                tensors[f"{path}.lora_magnitude_vector"] = update.lora_magnitude
        config = dict(peft_type="LORA", r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, use_rslora=c.use_rslora,
                      use_dora=c.use_dora, init_lora_weights="gaussian" if c.init == "gaussian" else True,
                      **self.peft_targets())
        return config, tensors

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], arch: Arch
                  ) -> tuple[LoRA, dict[str, torch.Tensor]]:
        c = peft_config
        refuse_peft_options(c, {f"bias={c.get('bias')!r}": c.get("bias", "none") != "none",
                                "modules_to_save": bool(c.get("modules_to_save")),
                                "per-module alpha (alpha_pattern)": bool(c.get("alpha_pattern"))})
        use_dora = bool(c.get("use_dora", False))
        # True / False / "gaussian" / "eva" / "orthogonal" …: only A's starting draw, kept where adaptkit has it;
        # PiSSA, OLoRA, CorDA, LoftQ files need their rewritten backbone: check_init refuses them.
        peft_init = c.get("init_lora_weights", True)
        if isinstance(peft_init, str) and peft_init.lower().startswith(RESIDUAL_INITS):
            check_init(peft_init)
        init = "gaussian" if peft_init == "gaussian" else "default"
        suffixes = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"}
        if use_dora:
            suffixes[".lora_magnitude_vector"] = "lora_magnitude"
        targets, ours = peft_low_rank_tensors(arch, tensors, suffixes)
        ranks = {t.shape[0] for k, t in ours.items() if k.endswith(".lora_A")}
        if len(ranks) != 1:
            raise AdapterError(f"the peft LoRA adapter has per-module ranks {sorted(ranks)}; "
                               "adaptkit LoRA has one rank")
        lora = LoRA(r=ranks.pop(), alpha=float(c.get("lora_alpha", 8)), dropout=float(c.get("lora_dropout", 0)),
                    targets=targets, use_rslora=bool(c.get("use_rslora", False)), use_dora=use_dora,
                    init=init)
        return lora, ours

"""Per-architecture facts: which projection does what, declared per `model_type`.

A role map says, for one `model_type`, where its layer stacks sit (the module path in front of
the layer number) and which projection inside a layer plays which role — q, k, v (or a fused
qkv), o, ffn_in, ffn_gate, ffn_out — and, for attention projections, in which kind of attention
(self or cross). Reading the tree once against that map gives each projection a `LinearSite`,
each attention module an `AttentionSite` and each layer its sublayer boundaries; the adapter
methods only ever ask this map.

A `model_type` without a map falls back to guessing from the usual names (q_proj / query / q,
fc1 / up_proj / wi / c_fc, ...) and warns, naming the model_type: a guess can give a gated FFN's
projections the wrong roles, so add a map (a few lines below) rather than rely on it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

Family = str  # "seq2seq" | "decoder" | "encoder"

ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
FFN_ROLES = ("ffn_in", "ffn_gate", "ffn_out")
ROLES = ATTENTION_ROLES + FFN_ROLES
TARGET_GROUPS = {
    "attention": ATTENTION_ROLES,
    "qv": ("q", "v", "qkv"),
    "ffn": FFN_ROLES,
    "all-linear": ATTENTION_ROLES + FFN_ROLES,
}


# -- the declarative role maps ---------------------------------------------------------------------

@dataclass(frozen=True)
class RoleMap:
    """stacks: regex of the path in front of a layer number → "encoder" / "decoder";
    projections: regex of the path after the layer number → (role, "self" / "cross" / None).
    Both are matched whole (`re.fullmatch`)."""

    stacks: dict[str, str]
    projections: dict[str, tuple[str, str | None]]


def _attention(module: str, kind: str, q: str, k: str, v: str, o: str) -> dict[str, tuple[str, str | None]]:
    return {rf"{module}\.{leaf}": (role, kind) for role, leaf in (("q", q), ("k", k), ("v", v), ("o", o))}


def _ffn(**leaves: str) -> dict[str, tuple[str, str | None]]:
    """role=regex of the FFN projection that plays it."""
    return {leaf: (role, None) for role, leaf in leaves.items()}


_ANY = r"(?:.*\.)?"  # whatever head class wraps the stack: `model.`, `bert.`, none
_BART_LIKE = RoleMap(
    stacks={rf"{_ANY}encoder\.layers": "encoder", rf"{_ANY}decoder\.layers": "decoder"},
    projections={**_attention("self_attn", "self", "q_proj", "k_proj", "v_proj", "out_proj"),
                 **_attention("encoder_attn", "cross", "q_proj", "k_proj", "v_proj", "out_proj"),
                 **_ffn(ffn_in="fc1", ffn_out="fc2")},
)
# T5 v1.0 has one input projection `wi`; v1.1 / mT5 are gated: wo(act(wi_0(x)) * wi_1(x)), so wi_0 is
# the gate (transformers' T5DenseGatedActDense).
_T5_LIKE = RoleMap(
    stacks={rf"{_ANY}encoder\.block": "encoder", rf"{_ANY}decoder\.block": "decoder"},
    projections={**_attention(r"layer\.\d+\.SelfAttention", "self", "q", "k", "v", "o"),
                 **_attention(r"layer\.\d+\.EncDecAttention", "cross", "q", "k", "v", "o"),
                 **_ffn(ffn_in=r"layer\.\d+\.DenseReluDense\.wi(?:_1)?", ffn_gate=r"layer\.\d+\.DenseReluDense\.wi_0",
                        ffn_out=r"layer\.\d+\.DenseReluDense\.wo")},
)
_GPT2 = RoleMap(
    stacks={rf"{_ANY}h": "decoder"},
    projections={r"attn\.c_attn": ("qkv", "self"), r"attn\.c_proj": ("o", "self"),
                 **_ffn(ffn_in=r"mlp\.c_fc", ffn_out=r"mlp\.c_proj")},
)
# Llama's FFN: down(act(gate(x)) * up(x)); Gemma 3's text model (gemma3_text) is laid out the same.
_LLAMA_LIKE = RoleMap(
    stacks={r"(?:model\.)?layers": "decoder"},
    projections={**_attention("self_attn", "self", "q_proj", "k_proj", "v_proj", "o_proj"),
                 **_ffn(ffn_in=r"mlp\.up_proj", ffn_gate=r"mlp\.gate_proj", ffn_out=r"mlp\.down_proj")},
)
_BERT = RoleMap(
    stacks={rf"{_ANY}encoder\.layer": "encoder"},
    projections={r"attention\.self\.query": ("q", "self"), r"attention\.self\.key": ("k", "self"),
                 r"attention\.self\.value": ("v", "self"), r"attention\.output\.dense": ("o", "self"),
                 **_ffn(ffn_in=r"intermediate\.dense", ffn_out=r"output\.dense")},
)
ROLE_MAPS: dict[str, RoleMap] = {
    "bart": _BART_LIKE, "mbart": _BART_LIKE, "marian": _BART_LIKE, "m2m_100": _BART_LIKE,
    "t5": _T5_LIKE, "mt5": _T5_LIKE,
    "gpt2": _GPT2,
    "llama": _LLAMA_LIKE, "gemma3_text": _LLAMA_LIKE,
    "bert": _BERT,
}


class RoleMapWarning(UserWarning):
    """The roles of a backbone's projections were guessed, not read from a role map."""


# -- what the map yields ---------------------------------------------------------------------------

@dataclass(frozen=True)
class LinearSite:
    """One projection inside a transformer layer, with what it does there."""

    name: str
    module: nn.Module
    role: str  # q k v qkv o ffn_in ffn_gate ffn_out
    stack: str  # "encoder" or "decoder"
    layer: int
    attention: str | None  # "self" / "cross" for attention projections, None in the FFN

    @property
    def in_features(self) -> int:
        return linear_shape(self.module)[0]

    @property
    def out_features(self) -> int:
        return linear_shape(self.module)[1]


@dataclass(frozen=True)
class AttentionSite:
    """A module that calls the attention function: where prefix keys/values go."""

    name: str
    module: nn.Module
    stack: str
    layer: int
    kind: str  # "self" or "cross"
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class LayerSites:
    """The sublayer boundaries of one transformer layer, for bottleneck adapters."""

    stack: str
    layer: int
    attn_out: tuple[LinearSite, ...]  # self-attention (and cross-attention) output projections
    ffn_in: LinearSite
    ffn_out: LinearSite


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or GPT-2's transposed Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def family_of(model: nn.Module) -> Family:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    if hasattr(model, "generate") and re.search(r"(ForCausalLM|LMHeadModel)$", type(model).__name__):
        return "decoder"
    if getattr(config, "is_decoder", False):
        return "decoder"
    return "encoder"


class Arch:
    """The map of one backbone: linears by role, attention modules, layer boundaries."""

    def __init__(self, model: nn.Module):
        self.family = family_of(model)
        self.model_type = getattr(model.config, "model_type", type(model).__name__)
        role_map = ROLE_MAPS.get(self.model_type)
        linears = _mapped_linears(model, role_map, self.model_type) if role_map is not None else []
        if not linears:
            why = ("has no role map" if role_map is None
                   else f"has a role map that matches none of {type(model).__name__}'s modules")
            warnings.warn(
                f"model_type {self.model_type!r} {why}: the roles of its projections (q, k, v, o, ffn_in, "
                "ffn_gate, ffn_out) are guessed from their names and may be wrong (a gated FFN's gate and input, "
                "for one). Check model.arch.linears, or add the model_type to adaptkit.core.arch.ROLE_MAPS",
                RoleMapWarning, stacklevel=3)
            linears = list(_guessed_linears(model, self.family))
        self.linears = linears
        if not self.linears:
            raise ValueError(
                f"found no transformer-layer projections in {type(model).__name__}; "
                "pass explicit module names to the adapter config (targets=[...])"
            )
        self._modules = dict(model.named_modules())
        self.sliding_window = _sliding_window(model.config)  # tokens a sliding-window layer looks back; None: none
        self.attentions = self._find_attentions(model)
        self.layers = self._find_layers()

    # -- discovery -------------------------------------------------------------------------------
    def _find_attentions(self, model: nn.Module) -> list[AttentionSite]:
        sites = []
        for lin in self.linears:
            if lin.role not in ("q", "qkv"):
                continue
            parent_name = lin.name.rsplit(".", 1)[0]
            parent = self._modules[parent_name]
            head_dim = _head_dim(parent, model.config, lin)
            key_site = next(
                (s for s in self.linears if s.role == "k" and s.name.rsplit(".", 1)[0] == parent_name), None
            )
            kv_width = key_site.out_features if key_site else lin.out_features // 3
            sites.append(AttentionSite(parent_name, parent, lin.stack, lin.layer, lin.attention or "self",
                                       kv_width // head_dim, head_dim))
        return sites

    def _find_layers(self) -> list[LayerSites]:
        by_layer: dict[tuple[str, int], list[LinearSite]] = {}
        for site in self.linears:
            by_layer.setdefault((site.stack, site.layer), []).append(site)
        layers = []
        for (stack, layer), sites in sorted(by_layer.items(), key=lambda kv: (kv[0][0] != "encoder", kv[0][1])):
            ffn_in = next((s for s in sites if s.role == "ffn_in"), None)
            ffn_out = next((s for s in sites if s.role == "ffn_out"), None)
            if ffn_in is None or ffn_out is None:
                continue
            attn_out = tuple(s for s in sites if s.role == "o")
            layers.append(LayerSites(stack, layer, attn_out, ffn_in, ffn_out))
        return layers

    # -- queries ---------------------------------------------------------------------------------
    def select_linears(self, targets: str | Iterable[str]) -> list[LinearSite]:
        """`"attention"`, `"ffn"`, `"all-linear"`, `"qv"`, a list of roles, or a list of module-name regexes."""
        if isinstance(targets, str):
            if targets not in TARGET_GROUPS:
                raise ValueError(
                    f"unknown target group {targets!r}; use one of {sorted(TARGET_GROUPS)}, "
                    "a list of roles (q, k, v, o, ffn_in, ffn_gate, ffn_out) or a list of module names"
                )
            roles = set(TARGET_GROUPS[targets])
            return [s for s in self.linears if s.role in roles]
        targets = list(targets)
        if all(t in ROLES for t in targets):
            fused = {"q", "k", "v"} & set(targets)  # GPT-2's c_attn holds q, k and v in one projection
            return [s for s in self.linears if s.role in targets or (s.role == "qkv" and fused)]
        chosen = [s for s in self.linears if any(re.fullmatch(t, s.name) or s.name.endswith("." + t) for t in targets)]
        if not chosen:
            raise ValueError(f"no projection of this {self.model_type} model matches {targets}; "
                             f"examples of names: {[s.name for s in self.linears[:4]]}")
        return chosen

    def attention_of(self, module: nn.Module) -> AttentionSite | None:
        for site in self.attentions:
            if site.module is module:
                return site
        return None


def _projections(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            yield name, module


def _mapped_linears(model: nn.Module, role_map: RoleMap, model_type: str) -> list[LinearSite]:
    """The projections the role map names; a projection inside a layer stack it does not name is warned about."""
    sites, unmapped = [], []
    for name, module in _projections(model):
        parts = name.split(".")
        for i, part in enumerate(parts):
            if not part.isdigit():
                continue
            prefix = ".".join(parts[:i])
            stack = next((s for pattern, s in role_map.stacks.items() if re.fullmatch(pattern, prefix)), None)
            if stack is None:
                continue
            tail = ".".join(parts[i + 1:])
            found = next((v for pattern, v in role_map.projections.items() if re.fullmatch(pattern, tail)), None)
            if found is None:
                unmapped.append(name)
            else:
                sites.append(LinearSite(name, module, found[0], stack, int(part), found[1]))
            break
    if unmapped:
        warnings.warn(f"the role map of model_type {model_type!r} does not name {len(unmapped)} projection(s) "
                      f"inside its layers, e.g. {unmapped[:3]}; they are not adapted. Add them to "
                      "adaptkit.core.arch.ROLE_MAPS", RoleMapWarning, stacklevel=4)
    return sites


# -- the fallback: roles guessed from the usual names ----------------------------------------------

_ROLE_BY_LEAF = {
    "q_proj": "q", "q": "q", "query": "q",
    "k_proj": "k", "k": "k", "key": "k",
    "v_proj": "v", "v": "v", "value": "v",
    "c_attn": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "o_proj": "o", "out_proj": "o", "o": "o",
    "fc1": "ffn_in", "up_proj": "ffn_in", "wi": "ffn_in", "wi_1": "ffn_in", "c_fc": "ffn_in",
    "gate_proj": "ffn_gate", "wi_0": "ffn_gate",
    "fc2": "ffn_out", "down_proj": "ffn_out", "wo": "ffn_out",
}
_CROSS_PARTS = {"encoder_attn", "encdecattention", "crossattention", "cross_attn"}


def _guessed_linears(model: nn.Module, family: Family) -> Iterable[LinearSite]:
    default_stack = "encoder" if family == "encoder" else "decoder"
    for name, module in _projections(model):
        parts = name.split(".")
        layer = next((int(p) for p in parts if p.isdigit()), None)
        if layer is None:
            continue  # heads, poolers and embeddings sit outside the layer stacks
        lowered = [p.lower() for p in parts[:-1]]
        in_attention = any("attn" in p or "attention" in p for p in lowered)
        role = _ROLE_BY_LEAF.get(parts[-1])
        if parts[-1] == "dense":  # BERT-like: attention.output.dense / intermediate.dense / output.dense
            role = "o" if in_attention else ("ffn_in" if lowered[-1] == "intermediate" else "ffn_out")
        elif parts[-1] == "c_proj":  # GPT-2-like: c_proj in both sublayers
            role = "o" if in_attention else "ffn_out"
        if role is None:
            role = "o" if in_attention else "ffn_out"
        if role in FFN_ROLES and in_attention:
            continue
        stack = "encoder" if "encoder" in lowered else "decoder" if "decoder" in lowered else default_stack
        attention = None
        if role in ATTENTION_ROLES:
            attention = "cross" if any(p in _CROSS_PARTS for p in lowered) else "self"
        yield LinearSite(name, module, role, stack, layer, attention)


def _sliding_window(config) -> int | None:
    """The window of the model's sliding-window layers, or None when every layer attends globally."""
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or window <= 0:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    return window if getattr(config, "use_sliding_window", True) else None


def _head_dim(attention: nn.Module, config, q_site: LinearSite) -> int:
    for attr in ("head_dim", "attention_head_size", "key_value_proj_dim"):
        value = getattr(attention, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    value = getattr(config, "head_dim", None)
    if isinstance(value, int) and value > 0:
        return value
    heads = next(
        (getattr(attention, a) for a in ("num_heads", "n_heads", "num_attention_heads") if hasattr(attention, a)),
        None,
    ) or getattr(config, "num_attention_heads", None)
    width = q_site.out_features // (3 if q_site.role == "qkv" else 1)
    return width // int(heads)

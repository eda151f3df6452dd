"""Per-architecture facts, found from the module tree rather than typed in per model.

Every transformers architecture we target names its projections after a handful of
conventions (q_proj / q / query, fc1 / up_proj / wi / c_fc, ...). Reading the tree once gives
each Linear a role, each attention module its kind (encoder self, decoder self, cross) and
each layer its sublayer outputs; the adapter methods only ever ask this map.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

Family = str  # "seq2seq" | "decoder" | "encoder"

_ROLE_BY_LEAF = {
    "q_proj": "q", "q": "q", "query": "q",
    "k_proj": "k", "k": "k", "key": "k",
    "v_proj": "v", "v": "v", "value": "v",
    "c_attn": "qkv", "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv",
    "o_proj": "o", "out_proj": "o", "o": "o",
    "fc1": "ffn_in", "up_proj": "ffn_in", "wi": "ffn_in", "wi_0": "ffn_in", "c_fc": "ffn_in",
    "gate_proj": "ffn_gate", "wi_1": "ffn_gate",
    "fc2": "ffn_out", "down_proj": "ffn_out", "wo": "ffn_out",
}
_CROSS_PARTS = {"encoder_attn", "encdecattention", "crossattention", "cross_attn"}
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
FFN_ROLES = ("ffn_in", "ffn_gate", "ffn_out")
TARGET_GROUPS = {
    "attention": ATTENTION_ROLES,
    "qv": ("q", "v", "qkv"),
    "ffn": FFN_ROLES,
    "all-linear": ATTENTION_ROLES + FFN_ROLES,
}


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
        self.linears = list(self._find_linears(model))
        if not self.linears:
            raise ValueError(
                f"found no transformer-layer projections in {type(model).__name__}; "
                "pass explicit module names to the adapter config (targets=[...])"
            )
        self._modules = dict(model.named_modules())
        self.attentions = self._find_attentions(model)
        self.layers = self._find_layers()

    # -- discovery -------------------------------------------------------------------------------
    def _find_linears(self, model: nn.Module) -> Iterable[LinearSite]:
        default_stack = "encoder" if self.family == "encoder" else "decoder"
        for name, module in model.named_modules():
            if not isinstance(module, (nn.Linear, Conv1D)):
                continue
            parts = name.split(".")
            layer = next((int(p) for p in parts if p.isdigit()), None)
            if layer is None:
                continue  # heads, poolers and embeddings sit outside the layer stacks
            lowered = [p.lower() for p in parts[:-1]]
            in_attention = any("attn" in p or "attention" in p for p in lowered)
            role = _ROLE_BY_LEAF.get(parts[-1])
            if parts[-1] == "dense":  # BERT: attention.output.dense / intermediate.dense / output.dense
                role = "o" if in_attention else ("ffn_in" if lowered[-1] == "intermediate" else "ffn_out")
            elif parts[-1] == "c_proj":  # GPT-2 uses c_proj in both sublayers
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
        role_names = set(_ROLE_BY_LEAF.values())
        if all(t in role_names for t in targets):
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


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def first_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device

"""Prefix tuning at the attention-function level: learned keys and values in front of the real ones.

        query ──────────────────────────────┐
        key   ──► [ prefix_key   | key   ] ─┼─► the model's own attention function (sdpa, eager)
        value ──► [ prefix_value | value ] ─┘   mask extended so every query sees the prefix

transformers 5 calls every attention through `ALL_ATTENTION_FUNCTIONS`. The first prefix adapter
on a backbone switches the attention modules' configs from `impl` to `"adaptkit:" + impl`, a
wrapper that adds the routed prefixes and then calls `impl` itself; the last one to leave switches
them back. The KV cache only ever holds real keys (the prefix is added at every call), so any
cache class, beam search and the encoder, decoder and cross-attention all work alike.

Rows routed to different prefixes are padded to the longest prefix in the batch; padded slots are
masked out, so a row without a prefix attends exactly to the keys the bare backbone would.

peft prefix tuning (import only): peft puts its prefix in the KV cache, so the real tokens'
positions start at `num_virtual_tokens` (T); here the prefix moves no position. An imported prefix
therefore gives peft's outputs exactly only
  - on a decoder-only model, in a forward pass given `position_ids = arange(T, T + length)`, and
  - on sliding-window layers, only while T + sequence length ≤ the window (past it, peft's layers
    stop seeing the prefix; ours keep seeing it).
In `generate` (positions from 0), on seq2seq decoders (their positions cannot be shifted from
outside; T5 adds no relative bias towards our prefix) and on encoder-only models (not checked)
the outputs differ from peft's; import warns, saying which.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from adaptkit.core.arch import Arch, AttentionSite
from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import register_method
from adaptkit.core.routing import Routing, current_routing
from adaptkit.methods.base import Adapter, AdapterConfig

PLACES = ("encoder", "decoder", "cross")
WRAPPER_PREFIX = "adaptkit:"
SUPPORTED_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class Prefix(AdapterConfig):
    """length: prefix tokens per attention; where: "encoder" / "decoder" self-attention and "cross"
    attention (absent places are skipped, so the default suits every family); reparam: train the
    prefixes through a 2-layer MLP of width reparam_hidden (Li & Liang), folded away on save;
    init_std: std of the initial prefixes (with reparam, the MLP's input embedding starts at std 1,
    as peft's nn.Embedding does; init_std is then unused)."""

    method = "prefix"
    length: int = 16
    where: tuple[str, ...] = PLACES
    reparam: bool = False
    reparam_hidden: int = 256
    init_std: float = 0.02

    def __post_init__(self) -> None:
        self.where = (self.where,) if isinstance(self.where, str) else tuple(self.where)
        if self.length < 1:
            raise AdapterError(f"prefix length must be at least 1, got {self.length}")
        unknown = set(self.where) - set(PLACES)
        if unknown or not self.where:
            raise AdapterError(f"Prefix(where=...) takes places among {PLACES}; got {self.where}")
        if self.reparam and self.reparam_hidden < 1:
            raise AdapterError(f"reparam_hidden must be at least 1, got {self.reparam_hidden}")


class PeftImportWarning(UserWarning):
    """An imported peft adapter does not give peft's outputs everywhere; the message says where not."""


def place_of(site: AttentionSite) -> str:
    return "cross" if site.kind == "cross" else site.stack


class PrefixMLP(nn.Module):
    """Li & Liang's reparametrisation: prefixes = MLP(embedding), one output slice per attention module."""

    def __init__(self, length: int, hidden: int, widths: list[int]):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(length, hidden))
        self.hidden = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, sum(widths))
        starts = [sum(widths[:i]) for i in range(len(widths))]
        self.slices = [slice(s, s + w) for s, w in zip(starts, widths)]

    def site_output(self, index: int) -> torch.Tensor:
        # Only this site's rows of the output layer: each attention module pays for its own slice.
        h = torch.tanh(self.hidden(self.embedding))
        rows = self.slices[index]
        return nn.functional.linear(h, self.out.weight[rows], self.out.bias[rows])


class PrefixKV(nn.Module):
    """The prefix of one attention module: keys and values of shape [kv_heads, length, head_dim]."""

    def __init__(self, kv_heads: int, length: int, head_dim: int, init_std: float,
                 source: tuple[PrefixMLP, int] | None = None):
        super().__init__()
        self.length = length
        self.shape = (kv_heads, length, head_dim)
        self.source = source  # a plain tuple: the MLP is registered once, on the adapter
        if source is None:
            self.prefix_key = nn.Parameter(torch.randn(self.shape) * init_std)
            self.prefix_value = nn.Parameter(torch.randn(self.shape) * init_std)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.source is None:
            return self.prefix_key, self.prefix_value
        mlp, index = self.source
        kv_heads, length, head_dim = self.shape
        out = mlp.site_output(index).view(length, 2, kv_heads, head_dim).permute(1, 2, 0, 3)
        return out[0], out[1]


# -- which prefixes sit on which attention module --------------------------------------------------

class PrefixSite:
    """The prefix adapters on one attention module, and how to stack them for a routed batch."""

    def __init__(self, module: nn.Module):
        # Weak: this site is the value of `_SITES[module]`, and a value holding its key keeps it alive for ever.
        self._module = weakref.ref(module)
        self.members: dict[str, PrefixKV] = {}
        # A later `set_attn_implementation(...)` would silently route around the wrapper:
        # point this module's config back at it just before the module reads it.
        self.hook = module.register_forward_pre_hook(_keep_wrapped)

    @property
    def module(self) -> nn.Module | None:
        """The attention module; None once it was freed (its model dropped with prefix adapters attached)."""
        return self._module()

    def close(self) -> None:
        self.hook.remove()

    def prefix_for(self, routing: Routing, batch: int, device: torch.device, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """(keys, values, valid) to put before the real keys, or None when no row has a prefix here.

        keys/values are [batch or 1, kv_heads, P, head_dim]; valid is [batch, P] (None: all valid).
        """
        if routing.uniform is not None:
            names = [n for n in routing.uniform if n in self.members]
            if not names:
                return None
            pairs = [self.members[n]() for n in names]
            keys = torch.cat([k for k, _ in pairs], dim=1).unsqueeze(0).to(dtype)
            values = torch.cat([v for _, v in pairs], dim=1).unsqueeze(0).to(dtype)
            return keys, values, None
        stacks, row_index, valid = self._layout(routing, batch, device)
        if stacks == [()]:
            return None
        width = valid.shape[1]
        computed = {n: self.members[n]() for stack in stacks for n in stack}
        padded_keys, padded_values = [], []
        for stack in stacks:
            parts_k = [computed[n][0] for n in stack]
            parts_v = [computed[n][1] for n in stack]
            missing = width - sum(self.members[n].length for n in stack)
            if missing:
                kv_heads, _, head_dim = next(iter(self.members.values())).shape
                pad = next(iter(computed.values()))[0].new_zeros(kv_heads, missing, head_dim)
                parts_k.append(pad)
                parts_v.append(pad)
            padded_keys.append(torch.cat(parts_k, dim=1))
            padded_values.append(torch.cat(parts_v, dim=1))
        keys = torch.stack(padded_keys).to(dtype).index_select(0, row_index)
        values = torch.stack(padded_values).to(dtype).index_select(0, row_index)
        return keys, values, valid

    def _layout(self, routing: Routing, batch: int, device: torch.device
                ) -> tuple[list[tuple[str, ...]], torch.Tensor, torch.Tensor]:
        """Distinct prefix stacks, each row's stack index, and which prefix slots each row may see.

        Cached per call: every layer with the same adapters shares it, and generate's steps reuse it.
        """
        key = ("prefix", batch, device, tuple(sorted(self.members)))
        cached = routing.scratch.get(key)
        if cached is None:
            per_row = [tuple(n for n in stack if n in self.members) for stack in routing.row_stacks(batch)]
            stacks = list(dict.fromkeys(per_row))
            lengths = torch.tensor([sum(self.members[n].length for n in s) for s in stacks], device=device)
            row_index = torch.tensor([stacks.index(s) for s in per_row], device=device)
            width = int(lengths.max())
            valid = (torch.arange(width, device=device) < lengths[:, None]).index_select(0, row_index)
            cached = routing.scratch[key] = (stacks, row_index, valid)
        return cached


_SITES: weakref.WeakKeyDictionary[nn.Module, PrefixSite] = weakref.WeakKeyDictionary()


# -- the attention wrapper -------------------------------------------------------------------------

def _original_function(original: str, module: nn.Module) -> Callable:
    if original in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[original]
    # "eager" is each model file's own `eager_attention_forward` (T5 adds its position bias there).
    eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if eager is None:
        raise AdapterError(f"cannot find the {original!r} attention of {type(module).__name__} to wrap with prefixes")
    return eager


def _extend_mask(mask: torch.Tensor | None, valid: torch.Tensor | None, q_len: int, k_len: int, width: int,
                 causal: bool, device: torch.device) -> torch.Tensor:
    """The mask over [prefix | keys]: prefix slots visible to every query unless padded (valid False)."""
    if mask is None:
        # No mask means sdpa would have used `is_causal` (top-left aligned) or attended everywhere.
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        mask = (allowed.tril() if causal else allowed)[None, None]
    visible = valid[:, None, None, :] if valid is not None else torch.ones(1, 1, 1, width, dtype=torch.bool,
                                                                          device=device)
    if mask.dtype == torch.bool:
        prefix_mask = visible
    else:  # additive float mask (eager): 0 where visible, the dtype's minimum where not
        prefix_mask = torch.zeros(visible.shape, dtype=mask.dtype, device=device)
        prefix_mask = prefix_mask.masked_fill(~visible, torch.finfo(mask.dtype).min)
    rows = max(mask.shape[0], prefix_mask.shape[0])
    prefix_mask = prefix_mask.expand(rows, mask.shape[1], mask.shape[2], width)
    return torch.cat([prefix_mask, mask.expand(rows, -1, -1, -1)], dim=-1)


def _make_wrapper(original: str) -> Callable:
    def prefixed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           attention_mask: torch.Tensor | None, **kwargs):
        attend = _original_function(original, module)
        site = _SITES.get(module)
        routing = current_routing()
        if site is None or routing is None or routing.names.isdisjoint(site.members):
            return attend(module, query, key, value, attention_mask, **kwargs)
        prefix = site.prefix_for(routing, query.shape[0], key.device, key.dtype)
        if prefix is None:
            return attend(module, query, key, value, attention_mask, **kwargs)
        prefix_keys, prefix_values, valid = prefix
        batch, width = key.shape[0], prefix_keys.shape[2]
        is_causal = kwargs.get("is_causal")
        is_causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        mask = _extend_mask(attention_mask, valid, query.shape[2], key.shape[2], width,
                            bool(is_causal) and query.shape[2] > 1, key.device)
        key = torch.cat([prefix_keys.expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_values.expand(batch, -1, -1, -1), value], dim=2)
        bias = kwargs.get("position_bias")
        if bias is not None:  # T5: no relative-position bias towards prefix slots
            kwargs["position_bias"] = torch.cat([bias.new_zeros(*bias.shape[:-1], width), bias], dim=-1)
        out, weights = attend(module, query, key, value, mask, **kwargs)
        return out, (weights[..., width:] if weights is not None else None)

    return prefixed_attention


def _wrapper_name(original: str) -> str:
    name = WRAPPER_PREFIX + original
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _make_wrapper(original))
        # Masks are looked up by the same name; the wrapped implementation's masks are the right ones.
        if original in ALL_MASK_ATTENTION_FUNCTIONS:
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def _switch_on(modules: list[nn.Module]) -> None:
    """Point every config these attention modules read at the wrapper; check all before changing any."""
    configs = _configs_of(modules)
    for config in configs:
        impl = config._attn_implementation
        if impl.startswith(WRAPPER_PREFIX):
            continue
        if impl not in SUPPORTED_IMPLEMENTATIONS:
            raise AdapterError(
                f"prefix tuning runs on the {' / '.join(SUPPORTED_IMPLEMENTATIONS)} attention, not {impl!r}; "
                "call model.set_attn_implementation('sdpa') before adding prefix adapters"
            )
    for config in configs:
        impl = config._attn_implementation
        if not impl.startswith(WRAPPER_PREFIX):
            config._attn_implementation_internal = _wrapper_name(impl)


def _keep_wrapped(module: nn.Module, args: tuple) -> None:
    if not module.config._attn_implementation.startswith(WRAPPER_PREFIX):
        _switch_on([module])  # wraps the newly chosen implementation, or refuses it with the fix


def _switch_off_unused(modules: list[nn.Module]) -> None:
    """Give back the original attention to configs that no prefix adapter needs any more."""
    in_use = {id(module.config) for module, site in list(_SITES.items()) if site.members}
    for config in _configs_of(modules):
        impl = config._attn_implementation
        if id(config) not in in_use and impl.startswith(WRAPPER_PREFIX):
            config._attn_implementation_internal = impl.removeprefix(WRAPPER_PREFIX)


def _configs_of(modules: list[nn.Module]) -> list:
    configs = {}
    for module in modules:
        config = getattr(module, "config", None)
        if config is None or not isinstance(getattr(config, "_attn_implementation", None), str):
            raise AdapterError(f"{type(module).__name__} has no config with an attention implementation; "
                               "prefix tuning needs a transformers model that uses the attention interface")
        configs[id(config)] = config
    return list(configs.values())


# -- the adapter -----------------------------------------------------------------------------------

@register_method
class PrefixAdapter(Adapter):
    method = "prefix"
    config_class = Prefix
    peft_types: ClassVar[tuple[str, ...]] = ("PREFIX_TUNING",)

    def __init__(self, name: str, config: Prefix, arch: Arch):
        super().__init__(name, config, arch)
        self.targets = [s for s in arch.attentions if place_of(s) in config.where]
        if not self.targets:
            found = sorted({place_of(s) for s in arch.attentions})
            raise AdapterError(f"Prefix(where={config.where}) selects no attention of this {arch.family} model; "
                               f"it has {found}")
        self.mlp = None
        if config.reparam:
            widths = [2 * s.num_kv_heads * s.head_dim for s in self.targets]
            self.mlp = PrefixMLP(config.length, config.reparam_hidden, widths)
        for index, site in enumerate(self.targets):
            source = (self.mlp, index) if self.mlp is not None else None
            self.add_site(site.name, PrefixKV(site.num_kv_heads, config.length, site.head_dim, config.init_std, source))

    def attach(self) -> None:
        modules = [s.module for s in self.targets]
        _switch_on(modules)
        holders = dict(self.site_items())
        for site in self.targets:
            _SITES.setdefault(site.module, PrefixSite(site.module)).members[self.name] = holders[site.name]

    def detach(self) -> None:
        for site in self.targets:
            prefix_site = _SITES.get(site.module)
            if prefix_site is not None:
                prefix_site.members.pop(self.name, None)
                if not prefix_site.members:
                    prefix_site.close()
                    del _SITES[site.module]
        _switch_off_unused([s.module for s in self.targets])

    # The file holds plain [kv_heads, length, head_dim] tensors; a reparametrised prefix is folded.
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {}
        with torch.no_grad():
            for path, holder in self.site_items():
                keys, values = holder()
                tensors[f"{path}.prefix_key"] = keys.detach().contiguous()
                tensors[f"{path}.prefix_value"] = values.detach().contiguous()
        return tensors

    def _load_checked(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.mlp is not None:
            raise AdapterError("a file holds folded prefixes; load it into Prefix(reparam=False), "
                               "which is the config saved with it")
        super()._load_checked(tensors)

    def config_for_file(self) -> Prefix:
        return dataclasses.replace(self.config, reparam=False)

    # -- peft (import only: a folded prefix has no peft form that peft would read back as trained) -----
    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], arch: Arch
                  ) -> tuple[Prefix, dict[str, torch.Tensor]]:
        """peft's prompt_embeddings [T, layers · 2 · kv_heads · head_dim] → <attention>.prefix_key / .prefix_value."""
        if set(tensors) != {"prompt_embeddings"}:
            raise AdapterError("a peft prefix-tuning adapter holds one tensor, prompt_embeddings; "
                               f"found {sorted(tensors)}")
        length = int(peft_config["num_virtual_tokens"])
        layers, heads = int(peft_config["num_layers"]), int(peft_config["num_attention_heads"])
        head_dim = int(peft_config["token_dim"]) // heads
        embeddings = tensors["prompt_embeddings"]
        if tuple(embeddings.shape) != (length, layers * 2 * heads * head_dim):
            raise AdapterError(f"prompt_embeddings has shape {tuple(embeddings.shape)}; the config promises "
                               f"({length}, {layers * 2 * heads * head_dim})")
        # peft's past_key_values layout: [T, layers·2, heads, head_dim] → [layers·2, heads, T, head_dim]
        kv = embeddings.view(length, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
        ours = {}
        for site, source_layer in _peft_prefix_sites(arch, layers):
            if (site.num_kv_heads, site.head_dim) != (heads, head_dim):
                raise AdapterError(f"peft prefix has {heads} heads × {head_dim} per layer; {site.name} has "
                                   f"{site.num_kv_heads} × {site.head_dim}")
            ours[f"{site.name}.prefix_key"] = kv[2 * source_layer].contiguous()
            ours[f"{site.name}.prefix_value"] = kv[2 * source_layer + 1].contiguous()
        warnings.warn(_peft_exactness(arch, length), PeftImportWarning, stacklevel=3)
        where = ("encoder",) if arch.family == "encoder" else ("decoder",)  # decoder self-attention only
        return Prefix(length=length, where=where), ours


def _peft_prefix_sites(arch: Arch, layers: int) -> list[tuple[AttentionSite, int]]:
    """(attention site, peft layer whose prefix it gets), for the attentions peft's prefix reaches.

    Decoders: every self-attention, layer i ← layer i. Seq2seq: peft doubles the layer axis and
    cuts it into groups of four (self k, self v, cross k, cross v) per decoder layer, then drops
    the cross part: decoder self-attention i gets peft layer 2i mod L; the encoder gets nothing.
    """
    if arch.family == "seq2seq":
        selfs = [s for s in arch.attentions if s.stack == "decoder" and s.kind == "self"]
        return [(site, (2 * i) % layers) for i, site in enumerate(sorted(selfs, key=lambda s: s.layer))]
    selfs = sorted((s for s in arch.attentions if s.kind == "self"), key=lambda s: s.layer)
    if len(selfs) != layers:
        raise AdapterError(f"the peft prefix covers {layers} layers; this backbone has {len(selfs)} self-attentions")
    return [(site, i) for i, site in enumerate(selfs)]


def _peft_exactness(arch: Arch, length: int) -> str:
    """Where an imported peft prefix gives peft's outputs on this backbone, and where not (the module docstring)."""
    if arch.family == "seq2seq":
        return (f"a peft prefix imported into a seq2seq {arch.model_type} model does not give peft's outputs: peft's "
                f"prefix shifts the decoder's positions by {length}, which cannot be done from outside here")
    if arch.family == "encoder":
        return (f"a peft prefix imported into an encoder-only {arch.model_type} model is not checked against peft; "
                "its outputs may differ")
    message = (f"peft keeps its prefix in the KV cache, so the real tokens' positions start at {length}; this "
               f"imported prefix gives peft's outputs only in a forward given position_ids = arange({length}, "
               f"{length} + sequence length), not in generate (positions from 0)")
    if arch.sliding_window is not None:
        message += (f", and only while {length} + sequence length <= {arch.sliding_window} (the sliding window: "
                    "past it peft's sliding-window layers no longer see the prefix, adaptkit's do)")
    return message

"""The role map: every tiny architecture's projections get their roles from the declared map (no
guess, no warning); a gated FFN's gate is the projection that goes through the activation; a
model_type without a map is guessed with a warning that names it."""

import re
import warnings

import pytest
import torch
import transformers as tf
from torch import nn
from transformers.pytorch_utils import Conv1D

from adaptkit.core import arch as arch_module
from adaptkit.core.arch import Arch, RoleMapWarning
from tiny import ARCHS, SMALL, tiny_model

_BART = {"self_attn.q_proj": ("q", "self"), "self_attn.k_proj": ("k", "self"), "self_attn.v_proj": ("v", "self"),
         "self_attn.out_proj": ("o", "self"), "encoder_attn.q_proj": ("q", "cross"),
         "encoder_attn.k_proj": ("k", "cross"), "encoder_attn.v_proj": ("v", "cross"),
         "encoder_attn.out_proj": ("o", "cross"), "fc1": ("ffn_in", None), "fc2": ("ffn_out", None)}
_T5 = {"SelfAttention.q": ("q", "self"), "SelfAttention.k": ("k", "self"), "SelfAttention.v": ("v", "self"),
       "SelfAttention.o": ("o", "self"), "EncDecAttention.q": ("q", "cross"), "EncDecAttention.k": ("k", "cross"),
       "EncDecAttention.v": ("v", "cross"), "EncDecAttention.o": ("o", "cross"),
       "DenseReluDense.wi": ("ffn_in", None), "DenseReluDense.wi_0": ("ffn_gate", None),
       "DenseReluDense.wi_1": ("ffn_in", None), "DenseReluDense.wo": ("ffn_out", None)}
_LLAMA = {"self_attn.q_proj": ("q", "self"), "self_attn.k_proj": ("k", "self"), "self_attn.v_proj": ("v", "self"),
          "self_attn.o_proj": ("o", "self"), "mlp.gate_proj": ("ffn_gate", None), "mlp.up_proj": ("ffn_in", None),
          "mlp.down_proj": ("ffn_out", None)}
# (role, attention kind) by the end of the module path
EXPECTED = {
    "marian": _BART, "m2m100": _BART, "mbart": _BART, "bart": _BART, "t5": _T5, "t5-gated": _T5, "mt5": _T5,
    "gpt2": {"attn.c_attn": ("qkv", "self"), "attn.c_proj": ("o", "self"), "mlp.c_fc": ("ffn_in", None),
             "mlp.c_proj": ("ffn_out", None)},
    "llama": _LLAMA, "gemma3": _LLAMA,
    "bert": {"self.query": ("q", "self"), "self.key": ("k", "self"), "self.value": ("v", "self"),
             "output.dense": ("o", "self"), "intermediate.dense": ("ffn_in", None)},
}
NOT_ADAPTED = {"lm_head", "cls.predictions.transform.dense", "cls.predictions.decoder"}
_T5_GATED = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                 feed_forward_proj="gated-gelu", decoder_start_token_id=0, **SMALL)
EXTRA = {  # T5 v1.1 and mT5: the gated FFN whose roles used to be swapped
    "t5-gated": lambda: tf.T5ForConditionalGeneration(tf.T5Config(**_T5_GATED)),
    "mt5": lambda: tf.MT5ForConditionalGeneration(tf.MT5Config(**_T5_GATED)),
}


def build(name: str) -> nn.Module:
    if name in EXTRA:
        torch.manual_seed(0)
        return EXTRA[name]().eval()
    return tiny_model(name)


def expected_role(arch: str, path: str) -> tuple[str, str | None]:
    if arch == "bert" and path.endswith(".output.dense") and ".attention." not in path:
        return ("ffn_out", None)
    table = EXPECTED[arch]
    return next(table[k] for k in sorted(table, key=len, reverse=True) if path.endswith("." + k))


def expected_stack(arch: str, path: str) -> str:
    if arch == "bert":
        return "encoder"
    return "encoder" if re.search(r"(^|\.)encoder\.", path) else "decoder"


@pytest.mark.parametrize("arch", ARCHS + list(EXTRA))
def test_every_projection_gets_its_role_from_the_map(arch):
    model = build(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RoleMapWarning)
        mapped = Arch(model)
    sites = {s.name: s for s in mapped.linears}
    projections = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert sorted(sites) == sorted(n for n in projections if n not in NOT_ADAPTED)
    for name, site in sites.items():
        assert (site.role, site.attention) == expected_role(arch, name), name
        assert site.stack == expected_stack(arch, name), name
        assert site.layer == int(next(p for p in name.split(".") if p.isdigit())), name
    assert [(layer.stack, layer.layer) for layer in mapped.layers] == sorted(
        {(s.stack, s.layer) for s in sites.values()}, key=lambda k: (k[0] != "encoder", k[1]))


@pytest.mark.parametrize("arch", ["t5-gated", "mt5", "llama"])
def test_the_gate_is_the_projection_inside_the_activation(arch):
    """FFN = out(act(gate(x)) * in(x)): negating `ffn_in` negates the FFN's output exactly; negating the gate
    does not (the activation is not odd). Checked against transformers' own modules, not against the map."""
    model = build(arch)
    mapped = Arch(model)
    modules = dict(model.named_modules())
    gate = next(s for s in mapped.linears if s.role == "ffn_gate")
    up = next(s for s in mapped.linears if s.role == "ffn_in" and s.layer == gate.layer and s.stack == gate.stack)
    ffn = modules[gate.name.rsplit(".", 1)[0]]
    x = torch.randn(2, 3, up.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = ffn(x)
        up.module.weight.neg_()
        torch.testing.assert_close(ffn(x), -reference, atol=0, rtol=0)
        up.module.weight.neg_()
        gate.module.weight.neg_()
        assert (ffn(x) + reference).abs().max() > 0.1 * reference.abs().max()


def test_a_model_type_without_a_map_is_guessed_with_a_warning(monkeypatch):
    model = tiny_model("llama")
    mapped = [(s.name, s.role, s.stack, s.layer, s.attention) for s in Arch(model).linears]
    monkeypatch.delitem(arch_module.ROLE_MAPS, "llama")
    with pytest.warns(RoleMapWarning, match=r"model_type 'llama' has no role map.*guessed"):
        guessed = Arch(model)
    assert [(s.name, s.role, s.stack, s.layer, s.attention) for s in guessed.linears] == mapped


def test_a_projection_the_map_does_not_name_is_warned_about():
    model = tiny_model("llama")
    model.model.layers[1].mlp.extra = nn.Linear(4, 4)
    with pytest.warns(RoleMapWarning, match=r"'llama' does not name 1 projection.*model\.layers\.1\.mlp\.extra"):
        mapped = Arch(model)
    assert "model.layers.1.mlp.extra" not in {s.name for s in mapped.linears}

"""bitsandbytes backbones, run on the CPU: `quantize="nf4"` as users get it on CPU, and the CUDA recipe's
LLM.int8 layers (which adaptkit uses only on CUDA) run here too, so no line of the bitsandbytes path is
left that only a GPU machine executes. Module replacement, hooks on the replaced layers, adapters of
every family on top, training, files and storage accounting are what is checked; bitsandbytes' own
kernels are its own business.

- nf4 + adapter is the *dequantised* backbone + the same adapter, up to float32 rounding: on CPU,
  Linear4bit dequantises its weight to the compute dtype and multiplies in float32;
- LLM.int8 + adapter stays as close to float32 + adapter as the bare int8 backbone is to the bare
  float32 one, within test_quantized's factor;
- adapters train over the nf4 backbone and their files record it; a float32 file loads onto nf4.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import adaptkit as ak
from adaptkit.core import quantize
from adaptkit.core.quantize import storage_bytes
from numerics import assert_close_to_rounding, depth_of
from test_quantized import (
    ARCHS,
    CONFIGS,
    assert_equals_the_dequantised_backbone,
    assert_error_within_the_bare_error,
    dequantised_float64,
    pair,
    quantization_after_training,
)
from tiny import tiny_batch, tiny_model

bnb = pytest.importorskip("bitsandbytes", reason="quantize='nf4' needs bitsandbytes (the quant extra)")


def nf4_weight(layer: nn.Module | None) -> torch.Tensor | None:
    """A bitsandbytes 4-bit layer's weight, dequantised; None for any other module."""
    if not isinstance(layer, bnb.nn.Linear4bit):
        return None
    return bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)


@pytest.fixture
def int8_through_bitsandbytes(monkeypatch):
    """The CUDA int8 recipe (bitsandbytes' LLM.int8) for CPU backbones, where torchao is the default."""
    monkeypatch.setitem(quantize.LIBRARY, ("cpu", "int8"), "bitsandbytes")


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ARCHS)
def test_nf4_plus_adapter_is_the_dequantised_backbone_plus_the_adapter(arch, method, tmp_path):
    _, q = pair(arch, method, tmp_path, "nf4")
    assert_equals_the_dequantised_backbone(q, dequantised_float64(q, arch, nf4_weight), arch, f"{arch}/{method}")


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_llm_int8_plus_adapter_is_close_to_float32_plus_adapter(method, tmp_path, int8_through_bitsandbytes):
    """LLM.int8 quantises activations too, so there is no exact float reference: the bound of test_quantized.
    (nf4's is the exact test above; its bare error, ~20 % of the logits on these tiny layers, is too large
    for a factor of it to say anything.)"""
    fp, q = pair("llama", method, tmp_path, "int8")
    assert (q.quantization["library"], q.quantization["method"]) == ("bitsandbytes", "LLM.int8")
    assert_error_within_the_bare_error(fp, q, "llama", method)


def test_adapter_gradients_through_nf4_are_the_dequantised_backbones_after_an_inference_call(tmp_path):
    """Gradients reach a LoRA below the 4-bit layers exactly as through their dequantised weights, also after
    an inference call (bitsandbytes' repacked CPU kernel, which would take over then, has no backward)."""
    _, q = pair("llama", "lora", tmp_path, "nf4")
    reference = dequantised_float64(q, "llama", nf4_weight)
    batch = tiny_batch("llama")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    gradients = []
    for model in (q, reference):
        with torch.no_grad():
            model(**batch, adapter="a")
        model(**batch, labels=labels, adapter="a").loss.backward()
        gradients.append(torch.cat([p.grad.reshape(-1) for p in model.adapter_parameters("a")]))
    actual, expected = gradients
    assert expected.abs().max() > 0
    # forward and backward: twice the layers for rounding to pass through
    assert_close_to_rounding(actual.double(), expected.double(), 2 * depth_of(q), "gradients", precision=torch.float32)


@pytest.mark.parametrize("scheme, layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_bitsandbytes_replaces_every_projection_and_keeps_the_head(scheme, layer, request):
    if scheme == "int8":
        request.getfixturevalue("int8_through_bitsandbytes")
    float_model = tiny_model("gemma3")
    float_linears = [name for name, m in float_model.named_modules()
                     if type(m) is nn.Linear and m is not float_model.get_output_embeddings()]
    model = ak.AdaptedModel(tiny_model("gemma3"), quantize=scheme)
    modules = dict(model.model.named_modules())
    assert model.quantization["modules"] == len(float_linears) > 0
    assert all(type(modules[name]).__name__ == layer for name in float_linears)
    assert type(model.model.get_output_embeddings()) is nn.Linear
    # the role map was read after the swap: hooks land on the bitsandbytes layers
    assert {id(site.module) for site in model.arch.linears} <= {id(modules[name]) for name in float_linears}
    assert not any(p.requires_grad for p in model.model.parameters())
    assert storage_bytes(model.model) < storage_bytes(float_model)


def test_storage_counts_the_4bit_weights_and_their_scales():
    float_model = tiny_model("gemma3")
    model = ak.AdaptedModel(tiny_model("gemma3"), quantize="nf4")
    layers = [m for m in model.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    weights = sum(m.in_features * m.out_features for m in layers)
    assert sum(m.weight.data.untyped_storage().nbytes() for m in layers) == weights // 2  # two values a byte
    # everything else as in float32, the weights at half a byte each, and their block scales on top
    packed_only = storage_bytes(float_model) - 4 * weights + weights // 2
    scales = sum(m.weight.quant_state.absmax.untyped_storage().nbytes() for m in layers)
    assert storage_bytes(model.model) >= packed_only + scales > packed_only


@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_training_over_the_nf4_backbone_lowers_the_loss(method, tmp_path):
    record = quantization_after_training("nf4", method, tmp_path)
    assert (record["scheme"], record["library"]) == ("nf4", "bitsandbytes")


def test_float32_file_loads_on_nf4_and_merging_is_refused(tmp_path):
    fp, q = pair("llama", "lora", tmp_path, "nf4")  # the float32 adapter's file, loaded onto nf4
    assert q.backbone_record()["shapes_sha256"] == fp.backbone_record()["shapes_sha256"]
    assert q.adapters == ["a"]
    with pytest.raises(ak.AdapterError, match=r"cannot merge 'a'.*quantised \(nf4, bitsandbytes\)"):
        q.merge_adapter("a")


def test_old_bitsandbytes_on_cpu_is_refused_with_the_upgrade(monkeypatch):
    monkeypatch.setattr(quantize, "_library_version", lambda package: "0.45.5")
    with pytest.raises(ak.AdapterError, match=r"quantize='nf4' on CPU needs bitsandbytes 0.50 or later \(found "
                                              r"0.45.5\): pip install -U bitsandbytes"):
        ak.AdaptedModel(tiny_model("llama"), quantize="nf4")


def test_missing_bitsandbytes_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ak.AdapterError, match=r"'nf4' on cpu needs bitsandbytes: pip install 'adaptkit\[quant\]'"):
        ak.AdaptedModel(tiny_model("llama"), quantize="nf4")

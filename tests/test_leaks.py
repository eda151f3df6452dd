"""A model dropped with its adapters still attached is freed: nothing global keeps its layers alive."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import adaptkit as ak
from tiny import tiny_batch, tiny_model

FAMILIES = {
    "lora": ak.LoRA(r=2),
    "adalora": ak.AdaLoRA(init_r=4, target_r=2, total_steps=10),
    "prefix": ak.Prefix(length=2),
    "bottleneck": ak.Bottleneck(),
}


def _dropped_model(arch: str, families: list[str]) -> tuple[weakref.ref, dict[str, weakref.ref]]:
    """Weak references to a model and to every module of its backbone, after the model ran and was dropped."""
    torch.manual_seed(0)
    model = ak.AdaptedModel(tiny_model(arch))
    for family in families:
        model.add_adapter(family, FAMILIES[family])
    model(**tiny_batch(arch), adapter=families[0])  # the hooks have run: their per-call state must go too
    return weakref.ref(model), {name: weakref.ref(module) for name, module in model.model.named_modules()}


@pytest.mark.parametrize("families", [["lora"], ["adalora"], ["prefix"], ["bottleneck"], list(FAMILIES)],
                         ids=lambda f: "+".join(f))
def test_a_dropped_model_is_freed_with_its_adapters_attached(families):
    model, modules = _dropped_model("llama", families)
    gc.collect()
    assert model() is None, "the AdaptedModel outlived its last reference"
    alive = [name for name, module in modules.items() if module() is not None]
    assert alive == [], f"backbone modules outlived their model: {alive}"


def test_a_live_model_keeps_its_adapters_working_after_a_collection():
    """The sites are held through the module only: a collection must not lose a live model's hooks."""
    torch.manual_seed(0)
    model = ak.AdaptedModel(tiny_model("llama"))
    for family, config in FAMILIES.items():
        model.add_adapter(family, config)
        with torch.no_grad():
            for p in model.adapter_parameters(family):
                p.normal_(0, 0.3)
    batch = tiny_batch("llama")
    before = {f: model(**batch, adapter=f).logits for f in FAMILIES}
    gc.collect()
    for family in FAMILIES:
        after = model(**batch, adapter=family).logits
        assert torch.equal(after, before[family]), family
        assert not torch.equal(after, model(**batch, adapter=None).logits), f"{family} no longer applies"
    for family in FAMILIES:
        model.remove_adapter(family)
    assert torch.equal(model(**batch).logits, model(**batch, adapter=None).logits)

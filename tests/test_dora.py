"""DoRA (`ak.LoRA(use_dora=True)`, methods/dora.py): the formula, per-row routing beside every family, stacks,
the gathered fast path, files, merge / unmerge, peft parity both ways, training.

Tolerance: the comparisons run in float64 (the `float64` fixture), bounded by numerics.py's rounding bound
(C · eps · max|logit| · sqrt(depth), ~1e-12 of the logits): two evaluations of the same function — a row in
a batch vs alone, W' x vs g ⊙ (W x + s·B A x), ours vs peft's (peft builds B A as B(A(I))ᵀ, we as B @ A) —
differ by rounding only, while an adapter misapplied moves the logits by > 1e-3 of their scale (asserted).
File round trips, peft round trips and unmerging are compared bit for bit.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import adaptkit as ak
from adaptkit.methods import lora as lora_module
from numerics import assert_close_to_rounding, depth_of, rounding_bound
from tiny import tiny_batch, tiny_model, with_random_adapters

float64 = pytest.mark.usefixtures("float64")


def logits(model, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def random_bank(arch: str, configs: dict) -> ak.AdaptedModel:
    return with_random_adapters(ak.AdaptedModel(tiny_model(arch)), configs, seed=3, scale=0.3)


def dense(module) -> torch.Tensor:
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def reference_backbone(arch: str, model: ak.AdaptedModel, names: tuple[str, ...]) -> torch.nn.Module:
    """A fresh backbone whose projections hold W + Σ (W'ᵢ − W), written from the DoRA / LoRA formulas."""
    reference = tiny_model(arch)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name in names:
            adapter = model.get_adapter(name)
            for target, update in adapter.updates():
                weight = dense(target.module)
                low_rank = adapter.config.scale * update.lora_B @ update.lora_A
                if adapter.config.use_dora:
                    directed = weight + low_rank
                    change = (update.lora_magnitude / directed.norm(dim=1))[:, None] * directed - weight
                else:
                    change = low_rank
                own = modules[target.name].weight
                own += change.T if isinstance(target.module, Conv1D) else change
    return reference


@float64
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_dora_is_the_formula_alone_and_in_stacks(arch):
    """y = m / ‖W + s·B A‖_c ⊙ (W + s·B A) x + b; a stack adds each member's change of W."""
    model = random_bank(arch, {"d": ak.LoRA(r=4, alpha=8, targets="all-linear", use_dora=True),
                               "d2": ak.LoRA(r=2, targets="attention", use_dora=True, use_rslora=True),
                               "l": ak.LoRA(r=3, targets="all-linear")})
    batch, depth = tiny_batch(arch), depth_of(model)
    bare = logits(model, batch, adapter=None)
    for spec in ("d", ("d", "l"), ("l", "d"), ("d", "d2")):
        names = spec if isinstance(spec, tuple) else (spec,)
        ours = logits(model, batch, adapter=spec)
        assert_close_to_rounding(ours, logits(reference_backbone(arch, model, names), batch), depth, str(spec))
        assert (ours - bare).abs().max() > 1e-3 * bare.abs().max()


@float64
def test_a_new_dora_adapter_is_the_identity_and_its_magnitude_is_the_weight_norm():
    model = ak.AdaptedModel(tiny_model("llama"))
    adapter = model.add_adapter("d", ak.LoRA(r=4, targets="all-linear", use_dora=True))
    for target, update in adapter.updates():
        assert torch.equal(update.lora_magnitude, torch.linalg.norm(target.module.weight, dim=1))
    batch = tiny_batch("llama")
    assert torch.equal(logits(model, batch, adapter="d"), logits(model, batch, adapter=None))


@float64
@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_mixed_family_batch_with_dora_rows_equals_each_row_alone(arch):
    model = random_bank(arch, {"dora": ak.LoRA(r=4, targets="all-linear", use_dora=True),
                               "lora": ak.LoRA(r=4, targets="all-linear"),
                               "prefix": ak.Prefix(length=3),
                               "bottleneck": ak.Bottleneck(reduction=4, placement="houlsby"),
                               "adalora": ak.AdaLoRA(init_r=4, target_r=2, total_steps=10)})
    spec = ["dora", "lora", None, "prefix", "bottleneck", ("dora", "lora"), ("dora", "prefix", "bottleneck"),
            "adalora"]
    batch, depth = tiny_batch(arch, batch=len(spec)), depth_of(model)
    mixed, bare = logits(model, batch, adapter=spec), logits(model, batch, adapter=None)
    for row, adapter in enumerate(spec):
        alone = logits(model, {k: v[row:row + 1] for k, v in batch.items()}, adapter=adapter)
        assert_close_to_rounding(mixed[row:row + 1], alone, depth, f"{arch} row {row} {adapter}")
        if adapter is not None:
            assert (mixed[row] - bare[row]).abs().max() > 1e3 * rounding_bound(bare, depth), f"{adapter} acts"
    assert_close_to_rounding(mixed[2], bare[2], depth, "a bare row")  # prefix rows pad the others' keys


@float64
def test_gathered_path_serves_the_lora_rows_and_dora_rows_take_the_exact_path(monkeypatch):
    model = random_bank("llama", {"r2": ak.LoRA(r=2, targets="all-linear"), "r4": ak.LoRA(r=4, alpha=3.0),
                                  "dora": ak.LoRA(r=4, targets="all-linear", use_dora=True)})
    spec = ["r2", "dora", ("r4", "dora"), None, "r4", ("dora", "r2")]
    batch, depth = tiny_batch("llama", batch=len(spec)), depth_of(model)
    calls = []
    original = lora_module.GatheredUpdates.apply
    monkeypatch.setattr(lora_module.GatheredUpdates, "apply", lambda self, x, out: calls.append(1) or original(
        self, x, out))
    gathered = logits(model, batch, adapter=spec)
    assert calls, "the gathered path did not run"
    monkeypatch.setattr(lora_module, "GATHER_MIN_ADAPTERS", 10**9)
    looped = logits(model, batch, adapter=spec)
    assert_close_to_rounding(gathered, looped, depth, "gathered vs loop")
    for row, adapter in enumerate(spec):
        alone = logits(model, {k: v[row:row + 1] for k, v in batch.items()}, adapter=adapter)
        assert_close_to_rounding(gathered[row:row + 1], alone, depth, f"row {row} {adapter}")
    greedy = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    prompts = {k: v for k, v in batch.items()}
    assert torch.equal(model.generate(**prompts, adapter=spec, **greedy)[1],
                       model.generate(**{k: v[1:2] for k, v in prompts.items()}, adapter="dora", **greedy)[0])


@float64
def test_save_load_round_trip_and_older_files(tmp_path):
    model = random_bank("llama", {"d": ak.LoRA(r=4, targets="all-linear", use_dora=True),
                                  "plain": ak.LoRA(r=4)})
    path = model.save_adapter("d", tmp_path / "d.safetensors")
    info = ak.read_adapter_info(path)
    config = info["config"] if isinstance(info["config"], dict) else json.loads(info["config"])
    assert config["use_dora"] is True
    tensors = load_file(str(path))
    assert tensors["model.layers.0.self_attn.q_proj.lora_magnitude"].shape == (32,)
    other = ak.AdaptedModel(tiny_model("llama"))
    name = other.load_adapter(path, name="d")
    batch = tiny_batch("llama")
    assert torch.equal(logits(other, batch, adapter=name), logits(model, batch, adapter="d"))
    # a plain LoRA's header has no use_dora (what adaptkit wrote before DoRA), and loads as plain LoRA
    plain = model.save_adapter("plain", tmp_path / "plain.safetensors")
    plain_info = ak.read_adapter_info(plain)
    plain_config = plain_info["config"] if isinstance(plain_info["config"], dict) else json.loads(plain_info["config"])
    assert "use_dora" not in plain_config
    loaded = other.get_adapter(other.load_adapter(plain, name="plain"))
    assert not loaded.config.use_dora and not any(u.dora for _, u in loaded.updates())
    assert torch.equal(logits(other, batch, adapter="plain"), logits(model, batch, adapter="plain"))


@float64
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_merge_is_the_adapter_and_unmerge_restores_the_backbone_bit_for_bit(arch):
    model = random_bank(arch, {"d": ak.LoRA(r=4, targets="all-linear", use_dora=True)})
    batch, depth = tiny_batch(arch), depth_of(model)
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    unmerged = logits(model, batch, adapter="d")
    model.merge_adapter("d")
    assert any(not torch.equal(v, before[k]) for k, v in model.model.state_dict().items())
    assert_close_to_rounding(logits(model, batch), unmerged, depth, "merged")
    model.unmerge_adapter()
    after = model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert torch.equal(logits(model, batch, adapter="d"), unmerged)


TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bart": "SEQ_2_SEQ_LM"}


@float64
@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
def test_peft_export_and_import_give_peft_logits_and_gradients(arch, tmp_path):
    peft = pytest.importorskip("peft")
    warnings.simplefilter("ignore")  # peft's fan_in_fan_out notice on GPT-2
    model = random_bank(arch, {"d": ak.LoRA(r=4, alpha=6, targets="all-linear", use_dora=True)})
    adapter = model.get_adapter("d")
    batch, depth = tiny_batch(arch), depth_of(model)
    ours = logits(model, batch, adapter="d")
    out = ak.export_peft(model, "d", tmp_path / "export")
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported["use_dora"] is True
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
    assert_close_to_rounding(logits(loaded, batch), ours, depth, "peft from our export")
    # gradients too: peft detaches the norm (DoRA §4.3), as we do
    model(**batch, adapter="d").logits.square().mean().backward()
    named = {n: p.requires_grad_("lora_" in n) for n, p in loaded.named_parameters()}
    loaded(**batch).logits.square().mean().backward()
    for path, update in adapter.site_items():
        for ours_grad, theirs in ((update.lora_magnitude.grad, "lora_magnitude_vector.default.weight"),
                                  (update.lora_A.grad, "lora_A.default.weight"),
                                  (update.lora_B.grad, "lora_B.default.weight")):
            grad = named[f"base_model.model.{path}.{theirs}"].grad
            assert ours_grad is not None and grad is not None
            assert (ours_grad - grad).abs().max() <= rounding_bound(grad, depth), f"{path} {theirs}"

    # peft's own DoRA save (seeded random weights, magnitude included) imports with peft's logits
    paths = [t.name for t in adapter.targets]
    trained = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(
        r=2, lora_alpha=5, target_modules=paths, use_dora=True, task_type=TASK[arch],
        fan_in_fan_out=arch == "gpt2"))
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.3)
    trained.save_pretrained(str(tmp_path / "from_peft"))
    reference = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "from_peft")).eval()
    name = ak.import_peft(tmp_path / "from_peft", model, name="imported")
    assert model.get_adapter(name).config.use_dora
    imported = logits(model, batch, adapter=name)
    assert_close_to_rounding(imported, logits(reference, batch), depth, "ours from peft's save")
    assert (imported - logits(model, batch, adapter=None)).abs().max() > 1e-3 * imported.abs().max()
    # round trip: our export of the import is peft's file, tensor for tensor, bit for bit
    again = ak.export_peft(model, name, tmp_path / "again")
    first, second = load_file(str(tmp_path / "from_peft" / "adapter_model.safetensors")), load_file(
        str(again / "adapter_model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_training_lowers_the_loss_and_trains_the_magnitude(tmp_path):
    from test_train import FAST, bare_loss, pairs, tiny_tokenizer

    model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"))
    dev = pairs(8, 1)
    before = bare_loss(model, dev)
    summary = ak.train(model, "toy", pairs(48, 0), dev, adapter_config=ak.LoRA(r=4, use_dora=True), max_steps=12,
                       output_dir=str(tmp_path), **{**FAST, "lr": 5e-2})
    assert summary["best_metrics"]["loss"] < before - 0.05, (before, summary["best_metrics"])
    adapter = model.get_adapter("toy")
    assert any(not torch.allclose(u.lora_magnitude, torch.linalg.norm(t.module.weight, dim=1))
               for t, u in adapter.updates()), "the magnitude trains"


@float64
def test_dropout_follows_peft_in_training():
    """With dropout on, x is dropped once for both W x and B A x (peft's DoRA path); the bias is not scaled."""
    model = random_bank("llama", {"d": ak.LoRA(r=4, dropout=0.5, targets="all-linear", use_dora=True)})
    model.train()
    update = model.get_adapter("d").updates()[0][1]
    module = model.get_adapter("d").updates()[0][0].module
    x = torch.randn(2, 3, 32)
    torch.manual_seed(0)
    delta = update.dora_delta(x, module(x), module)
    torch.manual_seed(0)
    dropped = update.dropout(x)
    weight, s = module.weight, update.scale
    factor = update.lora_magnitude / torch.linalg.norm(weight + s * update.lora_B @ update.lora_A, dim=1)
    expected = (factor - 1) * (dropped @ weight.T) + factor * (dropped @ update.lora_A.T @ update.lora_B.T) * s
    torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)


def test_dora_over_an_int8_backbone_reads_the_dequantised_weight():
    """The norm and the magnitude's initial value come from the weight the int8 matmul uses: a new adapter is
    the identity there too, bit for bit; a trained one acts; merging stays refused, as for every adapter."""
    pytest.importorskip("torchao", reason="quantize='int8' on CPU needs torchao")
    model = ak.AdaptedModel(tiny_model("llama"), quantize="int8")
    model.add_adapter("d", ak.LoRA(r=4, targets="all-linear", use_dora=True))
    batch = tiny_batch("llama")
    bare = logits(model, batch, adapter=None)
    assert torch.equal(logits(model, batch, adapter="d"), bare)
    with torch.no_grad():
        for p in model.adapter_parameters("d"):
            p.mul_(1.5).add_(0.1)
    acted = logits(model, batch, adapter="d")
    assert torch.isfinite(acted).all() and (acted - bare).abs().max() > 1e-3 * bare.abs().max()
    with pytest.raises(ak.AdapterError, match="quantised"):
        model.merge_adapter("d")

"""Prefix tuning: trains on every architecture, matches a KV-cache reference, saves folded, routes per row."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adaptkit import AdaptedModel, AdapterError, Prefix
from adaptkit.core.adapterfile import read_adapter_file
from tiny import ARCHS, DECODERS, tiny_batch, tiny_model


def adapted(arch: str, attn: str | None = None) -> AdaptedModel:
    model = tiny_model(arch)
    if attn is not None:
        model.set_attn_implementation(attn)
    return AdaptedModel(model)


def logits(model: AdaptedModel, batch: dict, adapter=None) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, adapter=adapter).logits


def scramble(model: AdaptedModel, name: str, std: float = 1.0, seed: int = 0) -> None:
    """Prefixes large enough that attention to them visibly changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.get_adapter(name).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def row(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


# -- 1. every architecture: trains, leaves the backbone alone, None is the bare backbone -------------

@pytest.mark.parametrize("arch", ARCHS)
def test_trains_and_leaves_backbone_untouched(arch):
    model = adapted(arch)
    batch = tiny_batch(arch)
    original_impl = model.model.config._attn_implementation
    backbone = {k: v.clone() for k, v in model.model.state_dict().items()}
    bare = logits(model, batch)

    model.add_adapter("p", Prefix(length=4, init_std=0.5))
    assert torch.equal(logits(model, batch, None), bare)
    assert not torch.allclose(logits(model, batch, "p"), bare, atol=1e-4)

    targets = torch.randint(0, bare.shape[-1], bare.shape[:-1], generator=torch.Generator().manual_seed(3))
    optimizer = torch.optim.AdamW(model.adapter_parameters("p"), lr=5e-2)
    losses = []
    for _ in range(6):
        out = model(**batch, adapter="p").logits
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses

    for name, tensor in model.model.state_dict().items():
        assert torch.equal(tensor, backbone[name]), name
    assert torch.equal(logits(model, batch, None), bare)
    model.remove_adapter("p")
    assert model.model.config._attn_implementation == original_impl
    assert torch.equal(logits(model, batch), bare)


@pytest.mark.parametrize("arch", ["bart", "llama"])
def test_reparam_trains_through_its_mlp(arch):
    model = adapted(arch)
    batch = tiny_batch(arch)
    adapter = model.add_adapter("p", Prefix(length=4, reparam=True, reparam_hidden=16))
    assert adapter.mlp is not None and all(p.requires_grad for p in adapter.parameters())
    first = None
    optimizer = torch.optim.AdamW(model.adapter_parameters("p"), lr=1e-2)
    for _ in range(6):
        loss = model(**batch, adapter="p").logits.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert loss.item() < first


# -- 2. the math: the same prefix given as a filled KV cache gives the same logits ------------------

@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_matches_prefix_in_kv_cache(arch):
    model = adapted(arch)
    batch = tiny_batch(arch)
    length = 5
    adapter = model.add_adapter("p", Prefix(length=length))
    scramble(model, "p")
    ours = logits(model, batch, "p")

    rows, seq = batch["input_ids"].shape
    cache = DynamicCache()
    for layer, (_, holder) in enumerate(adapter.site_items()):
        keys, values = holder()
        cache.update(keys.detach().expand(rows, -1, -1, -1).clone(), values.detach().expand(rows, -1, -1, -1).clone(),
                     layer)
    mask = torch.cat([torch.ones(rows, length, dtype=batch["attention_mask"].dtype), batch["attention_mask"]], 1)
    positions = torch.arange(seq).expand(rows, seq)  # what the uncached forward uses
    with torch.no_grad():
        reference = model.model(input_ids=batch["input_ids"], attention_mask=mask, cache=cache,
                                position_ids=positions).logits
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["t5", "bart", "gemma3", "bert"])
def test_eager_and_sdpa_agree(arch):
    """The float-mask (eager) path, T5's position bias and the boolean-mask (sdpa) path are one computation."""
    batch = tiny_batch(arch)
    results = []
    for attn in ("eager", "sdpa"):
        model = adapted(arch, attn)
        adapter = model.add_adapter("p", Prefix(length=3))
        scramble(model, "p")
        assert {s.module.config._attn_implementation for s in adapter.targets} == {"adaptkit:" + attn}
        results.append(logits(model, batch, "p"))
    mask = batch["attention_mask"].bool() if arch in DECODERS + ["bert"] else slice(None)
    torch.testing.assert_close(results[0][mask], results[1][mask], atol=1e-5, rtol=0)


# -- 3. save folds the reparametrisation; a fresh backbone loads it to identical logits -------------

@pytest.mark.parametrize("arch,reparam", [("t5", True), ("llama", True), ("marian", False), ("gemma3", False)])
def test_save_load_roundtrip(tmp_path, arch, reparam):
    model = adapted(arch)
    batch = tiny_batch(arch)
    config = Prefix(length=3, reparam=reparam, reparam_hidden=16, init_std=0.5)
    adapter = model.add_adapter("p", config)
    expected = logits(model, batch, "p")
    path = model.save_adapter("p", tmp_path / "p.safetensors")

    tensors, info = read_adapter_file(path)
    assert info["method"] == "prefix" and info["config"]["reparam"] is False
    assert set(tensors) == {f"{s.name}.prefix_{kind}" for s in adapter.targets for kind in ("key", "value")}
    for site in adapter.targets:
        assert tensors[f"{site.name}.prefix_key"].shape == (site.num_kv_heads, 3, site.head_dim)

    fresh = adapted(arch)
    fresh.load_adapter(path)
    loaded = fresh.get_adapter("p")
    assert loaded.mlp is None and loaded.num_trainable() == sum(t.numel() for t in tensors.values())
    torch.testing.assert_close(logits(fresh, batch, "p"), expected, atol=1e-6, rtol=0)


# -- 4. per-row routing: each row as if alone, in forward and in generate ---------------------------

MIXED_ARCHS = ["marian", "bart", "llama", "gemma3"]
GENERATE_ARCHS = ["bart", "t5", "llama", "gemma3"]  # tiny random marian greedily says the same for every input


def mixed_model(arch: str) -> AdaptedModel:
    model = adapted(arch)
    model.add_adapter("a", Prefix(length=3))
    model.add_adapter("b", Prefix(length=6))
    scramble(model, "a", seed=1)
    scramble(model, "b", seed=2)
    return model


@pytest.mark.parametrize("arch", MIXED_ARCHS)
def test_mixed_batch_rows_equal_rows_alone(arch):
    model = mixed_model(arch)
    batch = tiny_batch(arch)
    specs = ["a", None, "b", ("a", "b")]
    together = logits(model, batch, specs)
    bare = logits(model, batch, None)
    for i, spec in enumerate(specs):
        alone = logits(model, row(batch, i), spec)[0]
        keep = batch["attention_mask"][i].bool() if arch in DECODERS else slice(None)
        torch.testing.assert_close(together[i][keep], alone[keep], atol=1e-5, rtol=0)
        if spec is None:
            torch.testing.assert_close(together[i][keep], bare[i][keep], atol=1e-5, rtol=0)
        else:
            assert not torch.allclose(together[i][keep], bare[i][keep], atol=1e-3)


@pytest.mark.parametrize("arch", GENERATE_ARCHS)
@pytest.mark.parametrize("beams", [1, 4])
def test_mixed_generate_rows_equal_rows_alone(arch, beams):
    model = mixed_model(arch)
    batch = {k: v for k, v in tiny_batch(arch).items() if k != "decoder_input_ids"}
    specs = ["a", None, "b", "a"]
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=beams, pad_token_id=0)
    together = model.generate(**batch, adapter=specs, **options)
    differs = False
    for i, spec in enumerate(specs):
        alone = model.generate(**row(batch, i), adapter=spec, **options)
        assert torch.equal(together[i], alone[0]), (i, together[i], alone[0])
        differs |= not torch.equal(alone, model.generate(**row(batch, i), adapter=None, **options))
    assert differs  # the prefixes change what is generated, so the equality above means something


# -- the switch and the errors ----------------------------------------------------------------------

def test_attention_switches_back_only_when_last_prefix_leaves():
    model = adapted("bart")
    model.add_adapter("a", Prefix(length=2))
    model.add_adapter("b", Prefix(length=2, where=("cross",)))
    assert model.model.config._attn_implementation == "adaptkit:sdpa"
    model.remove_adapter("a")
    assert model.model.config._attn_implementation == "adaptkit:sdpa"
    model.remove_adapter("b")
    assert model.model.config._attn_implementation == "sdpa"


def test_where_selects_attention_kinds():
    model = adapted("bart")
    adapter = model.add_adapter("x", Prefix(length=2, where=("cross",)))
    assert {s.kind for s in adapter.targets} == {"cross"} and len(adapter.targets) == 2
    with pytest.raises(AdapterError, match="selects no attention"):
        adapted("llama").add_adapter("x", Prefix(where=("cross",)))
    with pytest.raises(AdapterError, match="places among"):
        Prefix(where=("decoder", "middle"))
    with pytest.raises(AdapterError, match="at least 1"):
        Prefix(length=0)


@pytest.mark.parametrize("arch", ["llama", "bart"])
def test_survives_set_attn_implementation_after_attach(arch):
    model = adapted(arch, "sdpa")
    batch = tiny_batch(arch)
    bare = logits(model, batch)
    model.add_adapter("p", Prefix(length=4, init_std=0.5))
    reference = logits(model, batch, "p")
    model.model.set_attn_implementation("eager")  # the user switches after the prefix was attached
    torch.testing.assert_close(logits(model, batch, "p"), reference, atol=1e-4, rtol=1e-4)
    assert model.model.config._attn_implementation == "adaptkit:eager"
    if arch == "llama":  # an implementation the wrapper cannot serve is refused at the call, with the fix
        model.model.config._attn_implementation_internal = "flash_attention_2"
        with pytest.raises(AdapterError, match="set_attn_implementation"):
            logits(model, batch, "p")
        model.model.set_attn_implementation("sdpa")
    model.remove_adapter("p")
    assert not model.model.config._attn_implementation.startswith("adaptkit:")
    torch.testing.assert_close(logits(model, batch), bare, atol=1e-4, rtol=1e-4)


def test_refuses_attention_it_cannot_wrap():
    model = adapted("llama")
    model.model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(AdapterError, match="set_attn_implementation"):
        model.add_adapter("p", Prefix(length=2))
    assert model.model.config._attn_implementation == "flash_attention_2"
    assert model.adapters == []

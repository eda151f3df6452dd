"""Bottleneck adapters (Houlsby, Pfeiffer, parallel) on every tiny architecture."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adaptkit import AdaptedModel, AdapterError, Bottleneck
from adaptkit.core.backbone import contiguous_inputs
from adaptkit.methods.bottleneck import BottleneckBlock
from numerics import assert_close_to_rounding, depth_of
from tiny import ARCHS, SEQ2SEQ, tiny_batch, tiny_model

PLACEMENTS = ["pfeiffer", "houlsby", "parallel"]


def _randomize(model: AdaptedModel, name: str, seed: int) -> None:
    """Give an adapter non-zero weights (a new one is the identity, which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.get_adapter(name).parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def _logits(model: AdaptedModel, batch: dict, adapter) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, adapter=adapter).logits


def _row(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


# -- 1. identity at birth, training moves only the adapter ---------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_new_adapter_is_identity_and_trains(arch: str, placement: str) -> None:
    model = AdaptedModel(tiny_model(arch))
    batch = tiny_batch(arch)
    backbone_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    bare = _logits(model, batch, None)

    adapter = model.add_adapter("a", Bottleneck(placement=placement, reduction=4))
    assert torch.equal(_logits(model, batch, "a"), bare)

    # a toy objective on real tokens only: at padding, a model whose pad embedding is zero (gemma3) has a
    # zero FFN output that its post-FFN RMSNorm blows up to unit scale once any adapter bias is added,
    # which makes a loss over pad positions non-smooth at the identity
    target = torch.randint(0, bare.shape[-1], bare.shape[:-1], generator=torch.Generator().manual_seed(3))
    if arch not in SEQ2SEQ:
        target = target.masked_fill(batch["attention_mask"] == 0, -100)
    params = model.adapter_parameters("a")
    assert params and all(p.requires_grad for p in params)
    down_before = [b.down.weight.detach().clone() for b in adapter.sites.values()]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(6):
        loss = F.cross_entropy(model(**batch, adapter="a").logits.flatten(0, -2), target.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3, losses
    # once up is non-zero, the gradient reaches down as well
    assert any(not torch.equal(b.down.weight, d) for b, d in zip(adapter.sites.values(), down_before))
    assert not torch.equal(_logits(model, batch, "a"), bare)
    # the backbone is untouched, and the bare path still is the backbone
    after = model.model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in backbone_before.items())
    assert all(p.grad is None for p in model.model.parameters())
    assert torch.equal(_logits(model, batch, None), bare)


# -- 2. file round trip --------------------------------------------------------------------------

@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_round_trip(arch: str, placement: str, tmp_path) -> None:
    model = AdaptedModel(tiny_model(arch))
    config = Bottleneck(placement=placement, reduction=8, activation="gelu", scaling=2.0,
                        stacks="decoder" if arch in SEQ2SEQ else None)
    model.add_adapter("a", config)
    _randomize(model, "a", seed=1)
    batch = tiny_batch(arch)
    expected = _logits(model, batch, "a")
    path = model.save_adapter("a", tmp_path / "a.safetensors")

    fresh = AdaptedModel(tiny_model(arch))
    name = fresh.load_adapter(path)
    loaded = fresh.get_adapter(name)
    assert loaded.config == model.get_adapter("a").config
    assert set(loaded.adapter_state_dict()) == set(model.get_adapter("a").adapter_state_dict())
    assert_close_to_rounding(_logits(fresh, batch, name), expected, depth_of(model), f"{arch} {placement}")
    assert not torch.allclose(_logits(fresh, batch, None), expected)


def test_tensor_names_and_width() -> None:
    model = AdaptedModel(tiny_model("marian"))
    tensors = model.add_adapter("h", Bottleneck(placement="houlsby", reduction=16)).adapter_state_dict()
    name = "model.decoder.layers.0.encoder_attn.out_proj"  # cross-attention gets one in Houlsby
    assert tensors[f"{name}.down.weight"].shape == (2, 32)  # d_model 32 // 16
    assert {f"{name}.down.bias", f"{name}.up.weight", f"{name}.up.bias"} <= set(tensors)
    assert not any(".fc1." in k for k in tensors)
    tensors = model.add_adapter("e", Bottleneck(reduction=64, stacks="encoder")).adapter_state_dict()
    assert tensors["model.encoder.layers.1.fc2.down.weight"].shape == (1, 32)  # at least one unit
    assert all(k.startswith("model.encoder.") for k in tensors)


# -- the math at the hooked module, against a direct computation ----------------------------------

@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("arch", ["marian", "llama", "gpt2"])
def test_update_matches_formula(arch: str, placement: str) -> None:
    model = AdaptedModel(tiny_model(arch))
    adapter = model.add_adapter("a", Bottleneck(placement=placement, reduction=4, activation="tanh", scaling=0.5))
    _randomize(model, "a", seed=2)
    layer = model.arch.layers[-1]
    block: BottleneckBlock = dict(adapter.site_items())[layer.ffn_out.name]
    seen = {}
    hooks = [
        layer.ffn_in.module.register_forward_pre_hook(lambda m, a: seen.__setitem__("ffn_x", a[0])),
        layer.ffn_out.module.register_forward_pre_hook(lambda m, a: seen.__setitem__("out_x", a[0])),
        layer.ffn_out.module.register_forward_hook(lambda m, a, o: seen.__setitem__("out", o)),  # after ours
    ]
    with torch.no_grad():
        model(**tiny_batch(arch), adapter="a")
        for h in hooks:
            h.remove()
        raw = layer.ffn_out.module(seen["out_x"])  # outside any routing: the bare projection
        source = seen["ffn_x"] if placement == "parallel" else raw
        expected = raw + 0.5 * block.up(torch.tanh(block.down(source)))
    assert_close_to_rounding(seen["out"], expected, depth=1, msg=f"{arch} {placement}")  # one projection


# -- 3. mixed batch: every row equals itself alone -------------------------------------------------

def _same_generation(batched: torch.Tensor, alone: torch.Tensor, eos: int = 2, pad: int = 0) -> bool:
    """A batched row equals the row generated alone; a row that finished early is filled out with
    pad (greedy) or eos (beam search) up to the batch's length."""
    n = alone.shape[-1]
    tail = batched[n:]
    finished = bool((alone == eos).any()) if n < batched.shape[-1] else True
    return torch.equal(batched[:n], alone) and finished and bool(((tail == pad) | (tail == eos)).all())


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arch", ["marian", "llama"])
def test_mixed_batch_rows_equal_rows_alone(arch: str) -> None:
    model = AdaptedModel(tiny_model(arch))
    for name, placement, seed in [("A", "pfeiffer", 1), ("B", "houlsby", 2), ("C", "parallel", 3)]:
        model.add_adapter(name, Bottleneck(placement=placement, reduction=4))
        _randomize(model, name, seed)
    routes = ["A", None, "B", ("A", "B"), "C"]
    batch = tiny_batch(arch, batch=len(routes))
    mixed = _logits(model, batch, routes)

    for i, route in enumerate(routes):
        alone = _logits(model, _row(batch, i), route)
        assert_close_to_rounding(mixed[i:i + 1], alone, depth_of(model), f"{arch} row {i}")
        if route is not None:  # the adapter really acts on this row
            assert not torch.allclose(alone, _logits(model, _row(batch, i), None), atol=1e-3)
    # a stack is sequential and ordered: (A, B) is neither A nor B, nor (B, A)
    row = _row(batch, 3)
    stacked = _logits(model, row, ("A", "B"))
    for other in ("A", "B", ("B", "A")):
        assert not torch.allclose(stacked, _logits(model, row, other), atol=1e-4)

    inputs = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    for beams in (1, 4):
        kwargs = dict(max_new_tokens=6, num_beams=beams, do_sample=False, pad_token_id=0)
        out = model.generate(**inputs, adapter=routes, **kwargs)
        for i, route in enumerate(routes):
            alone = model.generate(**_row(inputs, i), adapter=route, **kwargs)
            assert _same_generation(out[i], alone[0]), (beams, i, route, out[i], alone[0])


# -- 4. merging is refused with the fix named ----------------------------------------------------

def test_merge_refused() -> None:
    model = AdaptedModel(tiny_model("llama"))
    model.add_adapter("a", Bottleneck(placement="houlsby"))
    with pytest.raises(AdapterError, match="cannot be merged.*only the LoRA family"):
        model.merge_adapter("a")
    assert model.merged_adapter is None


# -- config validation and placement restrictions ------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(placement="sideways"), "placement"),
    (dict(activation="swish"), "activation"),
    (dict(reduction=0), "reduction"),
    (dict(stacks="middle"), "stacks"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(AdapterError, match=message):
        Bottleneck(**kwargs)


def test_config_json_round_trip() -> None:
    config = Bottleneck(placement="parallel", stacks="encoder", activation="silu", scaling=4.0)
    assert config.stacks == ("encoder",)
    assert Bottleneck.from_dict(json.loads(config.to_json())) == config


def test_missing_stack_is_an_error() -> None:
    model = AdaptedModel(tiny_model("llama"))
    with pytest.raises(AdapterError, match="stacks=None"):
        model.add_adapter("a", Bottleneck(stacks="encoder"))


def test_remove_adapter_restores_backbone_path() -> None:
    model = AdaptedModel(tiny_model("bart"))
    batch = tiny_batch("bart")
    bare = _logits(model, batch, None)
    model.add_adapter("p", Bottleneck(placement="parallel"))
    _randomize(model, "p", 5)
    assert not torch.allclose(_logits(model, batch, "p"), bare)
    model.remove_adapter("p")
    assert all(not m._forward_hooks and set(m._forward_pre_hooks.values()) <= {contiguous_inputs}
               for m in model.model.modules())  # (the bank's own hook on the output layer stays)
    assert torch.equal(_logits(model, batch, None), bare)

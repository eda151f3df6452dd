"""The fast paths compute what the plain paths compute.

Gathered per-row LoRA (one batched matmul pair over rows, methods/lora.py) against the per-adapter
loop and against each row run alone: forward, greedy and beam generate, on Llama, GPT-2 (Conv1D)
and BART, with mixed ranks, scalings, stacks and bare rows.

Tolerance, float32: the two paths sum the same products in another order (rank padded with
zeros, the scale folded into B before the product instead of after it), so they differ by
rounding only. Each rounding is at most eps = 2^-23 relative to the values at hand; carried
through L layers and the head, the difference in the logits stays within
    F32_BOUND(logits) = 64 · eps · max|logits| · L
Measured over these cases: <= 27 eps · max|logits| (L = 2–4), 5–13× below the bound; an adapter
applied to the wrong row moves the logits by > 10^4 eps · max|logits| (asserted below).
"""

from __future__ import annotations

import pytest
import torch

import adaptkit as ak
from adaptkit.methods import lora as lora_module
from tiny import tiny_batch, tiny_model

EPS32 = torch.finfo(torch.float32).eps


def f32_bound(reference: torch.Tensor, layers: int) -> float:
    return 64 * EPS32 * reference.abs().max().item() * layers


def lora_bank(arch: str) -> ak.AdaptedModel:
    """Three LoRA adapters with different ranks, alphas (one rsLoRA) and targets, random weights."""
    model = ak.AdaptedModel(tiny_model(arch))
    configs = {
        "r2": ak.LoRA(r=2, alpha=3.0, targets="all-linear"),
        "r4": ak.LoRA(r=4, alpha=16.0, targets="attention"),
        "r8": ak.LoRA(r=8, alpha=4.0, targets="all-linear", use_rslora=True),
    }
    generator = torch.Generator().manual_seed(5)
    for name, config in configs.items():
        model.add_adapter(name, config)
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


SPEC = ["r2", None, ("r4", "r8"), "r8", "r4"]


@pytest.fixture
def per_adapter_loop(monkeypatch):
    """Force the per-adapter loop, the path the gathered one must reproduce."""
    def use_loop():
        monkeypatch.setattr(lora_module, "GATHER_MIN_ADAPTERS", 10**9)
    return use_loop


@pytest.fixture
def gathered_calls(monkeypatch):
    """Counts how often the gathered path ran, so a test cannot pass by never taking it."""
    calls = []
    original = lora_module.GatheredUpdates.apply

    def counting(self, x, output):
        calls.append(x.shape[0])
        return original(self, x, output)

    monkeypatch.setattr(lora_module.GatheredUpdates, "apply", counting)
    return calls


def rows_alone(model, batch, spec, **kwargs):
    return [model(**{k: v[i:i + 1] for k, v in batch.items()}, adapter=a, **kwargs) for i, a in enumerate(spec)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
def test_gathered_forward_equals_loop_and_rows_alone(arch, per_adapter_loop, gathered_calls):
    model = lora_bank(arch)
    batch = tiny_batch(arch, batch=len(SPEC))
    layers = len(model.arch.layers)
    with torch.no_grad():
        gathered = model(**batch, adapter=SPEC).logits
        assert gathered_calls, "the gathered path did not run"
        alone = [out.logits for out in rows_alone(model, batch, SPEC)]
        bare = model(**batch, adapter=None).logits
        per_adapter_loop()
        looped = model(**batch, adapter=SPEC).logits
    bound = f32_bound(looped, layers)
    assert (gathered - looped).abs().max().item() <= bound
    for row, expected in enumerate(alone):
        assert (gathered[row:row + 1] - expected).abs().max().item() <= bound, f"{arch} row {row} {SPEC[row]}"
    assert torch.equal(gathered[1], bare[1]), "a bare row is untouched: exactly zero is added to it"
    for row in (0, 2, 3, 4):
        assert (gathered[row] - bare[row]).abs().max().item() > 1e4 * EPS32 * bare.abs().max().item(), "adapters act"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_gathered_generate_equals_loop_and_rows_alone(arch, num_beams, per_adapter_loop, gathered_calls):
    model = lora_bank(arch)
    batch = {k: v for k, v in tiny_batch(arch, batch=len(SPEC)).items() if k != "decoder_input_ids"}
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    gathered = model.generate(**batch, adapter=SPEC, **kwargs)
    # beams repeat each input row: the gathered stacks are per input row and serve every beam and step
    assert len(gathered_calls) > len(model.arch.layers)
    alone = [model.generate(**{k: v[i:i + 1] for k, v in batch.items()}, adapter=a, **kwargs)
             for i, a in enumerate(SPEC)]
    per_adapter_loop()
    looped = model.generate(**batch, adapter=SPEC, **kwargs)
    assert torch.equal(gathered, looped)
    for row, expected in enumerate(alone):  # a row alone stops at its own EOS; the batch pads after it
        assert torch.equal(gathered[row, : expected.shape[1]], expected[0]), f"{arch} row {row} {SPEC[row]}"
    assert len({tuple(out[0].tolist()) for out in alone}) > 2, "the adapters must change what is generated"


def test_gathered_stacks_follow_in_place_weight_changes():
    """Inside one `using` block the stacks are cached; writing an adapter's weights must not leave them stale."""
    model = lora_bank("llama")
    batch = tiny_batch("llama", batch=len(SPEC))
    with torch.no_grad(), model.using(SPEC):
        before = model(**batch).logits
        for name, p in model.get_adapter("r8").named_parameters():
            if name.endswith("lora_B"):
                p.mul_(-1.0)
        after = model(**batch).logits
    with torch.no_grad():
        fresh = model(**batch, adapter=SPEC).logits
    assert torch.equal(after, fresh)
    assert not torch.allclose(before[3], after[3])
    assert torch.equal(before[0], after[0]), "rows without r8 are unchanged"


def test_gathered_path_is_not_taken_where_the_loop_is_needed(gathered_calls):
    """With gradients (training a mixed batch), with active dropout, or one adapter on some rows: the loop."""
    model = lora_bank("llama")
    batch = tiny_batch("llama", batch=len(SPEC))
    model(**batch, adapter=SPEC).logits.sum().backward()
    assert not gathered_calls
    assert all(p.grad is not None for p in model.adapter_parameters("r2"))
    with torch.no_grad():
        model(**batch, adapter=["r2", None, None, "r2", None])
    assert not gathered_calls
    model.add_adapter("dropout", ak.LoRA(r=2, dropout=0.5))
    model.train()
    with torch.no_grad():
        model(**batch, adapter=["dropout", "r2", None, "r4", None])
    assert not gathered_calls

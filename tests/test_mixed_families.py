"""Adapters of different families on one backbone, routed row by row in one batch and across threads."""

import threading

import pytest
import torch

import adaptkit as ak
from numerics import assert_close_to_rounding, depth_of, rounding_bound
from tiny import tiny_batch, tiny_model, with_random_adapters


def family_bank(arch: str) -> ak.AdaptedModel:
    model = ak.AdaptedModel(tiny_model(arch))
    configs = {
        "lora": ak.LoRA(r=4, targets="all-linear"),
        "prefix": ak.Prefix(length=3),
        "bottleneck": ak.Bottleneck(reduction=4, placement="houlsby"),
        "adalora": ak.AdaLoRA(init_r=4, target_r=2, total_steps=10),
    }
    return with_random_adapters(model, configs, seed=3, scale=0.3)


def rows_alone(model, batch, spec, **kwargs):
    return [model(**{k: v[i:i + 1] for k, v in batch.items()}, adapter=a, **kwargs) for i, a in enumerate(spec)]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arch", ["bart", "t5", "llama", "gemma3"])
def test_mixed_family_batch_equals_rows_alone(arch):
    model = family_bank(arch)
    batch = tiny_batch(arch, batch=5)
    spec = ["lora", "prefix", None, "bottleneck", ("lora", "prefix", "bottleneck")]
    depth = depth_of(model)
    with torch.no_grad():
        mixed = model(**batch, adapter=spec).logits
        bare = model(**batch, adapter=None).logits
        for row, alone in enumerate(rows_alone(model, batch, spec)):
            # float64, bound in units of the computation's own rounding (numerics.py): in float32 a fixed
            # atol=1e-5 failed on T5 by chance (its logits are ~10x larger and its attention is unscaled).
            assert_close_to_rounding(mixed[row:row + 1], alone.logits, depth, f"{arch} row {row} {spec[row]}")
    bound = rounding_bound(bare, depth)
    assert all((mixed[r] - bare[r]).abs().max() > 1e3 * bound for r in (0, 1, 3, 4)), "each adapter acts"
    assert_close_to_rounding(mixed[2], bare[2], depth, "no adapter")


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arch", ["bart", "llama"])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_mixed_family_generate_equals_rows_alone(arch, num_beams):
    model = family_bank(arch)
    batch = {k: v for k, v in tiny_batch(arch, batch=4).items() if k != "decoder_input_ids"}
    spec = ["lora", "prefix", None, "adalora"]
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams)
    mixed = model.generate(**batch, adapter=spec, **kwargs)
    outputs = set()
    for row, adapter in enumerate(spec):
        alone = model.generate(**{k: v[row:row + 1] for k, v in batch.items()}, adapter=adapter, **kwargs)
        assert torch.equal(mixed[row, : alone.shape[1]], alone[0]), (row, adapter)
        outputs.add(tuple(alone[0].tolist()))
    assert len(outputs) > 1, "the adapters must change what is generated"


def test_sampling_per_row_is_reproducible():
    model = family_bank("llama")
    batch = {k: v for k, v in tiny_batch("llama", batch=4).items()}
    spec = ["lora", "bottleneck", None, "prefix"]
    torch.manual_seed(0)
    first = model.generate(**batch, adapter=spec, do_sample=True, max_new_tokens=5, num_return_sequences=2)
    torch.manual_seed(0)
    second = model.generate(**batch, adapter=spec, do_sample=True, max_new_tokens=5, num_return_sequences=2)
    assert first.shape[0] == 8 and torch.equal(first, second)


def test_eight_threads_eight_adapters_of_all_families():
    model = ak.AdaptedModel(tiny_model("bart"))
    families = [ak.LoRA(r=2), ak.Prefix(length=2), ak.Bottleneck(reduction=4), ak.AdaLoRA(init_r=2, target_r=1)]
    names = []
    generator = torch.Generator().manual_seed(7)
    for i in range(8):
        name = f"{families[i % 4].method}{i}"
        model.add_adapter(name, families[i % 4])
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
        names.append(name)
    batch = tiny_batch("bart")
    with torch.no_grad():
        reference = {n: model(**batch, adapter=n).logits for n in names}
    failures = []

    def worker(index):
        with torch.no_grad():
            for call in range(20):
                name = names[(index + call) % 8]
                if not torch.allclose(model(**batch, adapter=name).logits, reference[name], atol=1e-6, rtol=0):
                    failures.append((index, call, name))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures

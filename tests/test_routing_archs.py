"""All four families in one batch, row by row, against each row alone — on the architectures with quirks.

GPT-2 keeps q, k and v in one fused `c_attn` of transformers' `Conv1D` (weights stored in × out);
M2M100 has sinusoidal positions and a pre-norm stack; mBART is pre-norm with final layer norms; BERT
is encoder-only with right padding. Forward on all four, `generate` on the three that generate:
greedy, beam search returning several sequences per input, and sampling.

Everything runs in float64 (the `float64` fixture): rows alone and rows in a batch add in different
orders, and in float64 the rounding that leaves is ~1e-12 of the logits (numerics.py), while a row
that got another row's adapter is off by ~1e-1. The equality below says "same computation".
"""

from __future__ import annotations

import pytest
import torch

import adaptkit as ak
from numerics import assert_close_to_rounding, depth_of, rounding_bound
from tiny import SEQ2SEQ, tiny_batch, tiny_model

pytestmark = pytest.mark.usefixtures("float64")

FAMILIES = {
    "lora": lambda: ak.LoRA(r=4, targets="all-linear"),
    "adalora": lambda: ak.AdaLoRA(init_r=4, target_r=2, total_steps=10),
    "prefix": lambda: ak.Prefix(length=3),
    "bottleneck": lambda: ak.Bottleneck(reduction=4, placement="houlsby"),
}
# Each family alone, no adapter, and all four stacked on one row.
FORWARD_SPEC = ["lora", "prefix", None, "bottleneck", "adalora", ("lora", "prefix", "bottleneck", "adalora")]
GENERATE_SPEC = ["lora", "prefix", None, "bottleneck", "adalora"]


def family_bank(arch: str) -> ak.AdaptedModel:
    """One adapter of each family, with weights large enough to change what the model says."""
    model = ak.AdaptedModel(tiny_model(arch))
    generator = torch.Generator().manual_seed(11)
    for name, make in FAMILIES.items():
        model.add_adapter(name, make())
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def row(batch: dict, i: int) -> dict:
    return {k: v[i:i + 1] for k, v in batch.items()}


def prompts(arch: str, rows: int) -> dict:
    return {k: v for k, v in tiny_batch(arch, batch=rows).items() if k != "decoder_input_ids"}


@pytest.mark.parametrize("arch", ["gpt2", "m2m100", "mbart", "bert"])
def test_forward_rows_equal_rows_alone(arch):
    model = family_bank(arch)
    batch = tiny_batch(arch, batch=len(FORWARD_SPEC))
    depth = depth_of(model)
    with torch.no_grad():
        mixed = model(**batch, adapter=FORWARD_SPEC).logits
        bare = model(**batch).logits
        for i, spec in enumerate(FORWARD_SPEC):
            alone = model(**row(batch, i), adapter=spec).logits[0]
            # Padded positions of a decoder or encoder input carry no meaning (a left-padded query may see
            # no key at all); seq2seq logits are the decoder's, which has no padding here.
            keep = slice(None) if arch in SEQ2SEQ else batch["attention_mask"][i].bool()
            assert_close_to_rounding(mixed[i][keep], alone[keep], depth, f"{arch} row {i} {spec}")
            effect = (alone[keep] - bare[i][keep]).abs().max().item()
            if spec is None:
                assert effect <= rounding_bound(alone[keep], depth), "a row without adapter is the bare backbone"
            else:  # the equality above is only worth something if the adapter moves this row a lot
                assert effect > 1e6 * rounding_bound(alone[keep], depth), (spec, effect)


GENERATE_ARCHS = ["gpt2", "m2m100", "mbart"]


@pytest.mark.parametrize("arch", GENERATE_ARCHS)
@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=4, num_return_sequences=2)],
                         ids=["greedy", "beams4-return2"])
def test_generate_rows_equal_rows_alone(arch, options):
    model = family_bank(arch)
    batch = prompts(arch, len(GENERATE_SPEC))
    # min_new_tokens: no row stops early, so rows alone and rows in the batch have the same length.
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=0, **options)
    returned = options.get("num_return_sequences", 1)
    mixed = model.generate(**batch, adapter=GENERATE_SPEC, **kwargs)
    assert mixed.shape[0] == len(GENERATE_SPEC) * returned
    said = set()
    for i, spec in enumerate(GENERATE_SPEC):
        alone = model.generate(**row(batch, i), adapter=spec, **kwargs)
        assert torch.equal(mixed[i * returned:(i + 1) * returned], alone), (arch, i, spec)
        said.add(tuple(alone[0, -6:].tolist()))
    assert len(said) >= 3, "the adapters must change what is generated, or the equality says little"


def sample(model: ak.AdaptedModel, batch: dict, adapter, seed: int, **kwargs) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.generate(**batch, adapter=adapter, do_sample=True, top_k=0, max_new_tokens=6, min_new_tokens=6,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("arch", ["gpt2", "mbart"])
def test_sampling_rows_equal_rows_alone(arch):
    """Sampled rows match each row sampled on its own, draw for draw.

    A row run alone cannot be compared with the same row in a mixed batch directly: each sampling step
    draws one multinomial over the whole [rows, vocab] tensor, so a batch of 1 consumes the random stream
    differently from a batch of 5. But the draw for row r depends only on row r's probabilities and on
    the generator's state (checked below), so a batch of the same size in which every row is row r with
    row r's adapter, given the same seed, draws row r's token exactly as the mixed batch does — at every
    step. That batch routes one adapter for the whole call (no per-row grouping), so it is row r alone,
    replicated; each row of the mixed batch must equal it.
    """
    model = family_bank(arch)
    batch = prompts(arch, len(GENERATE_SPEC))
    n = len(GENERATE_SPEC)
    returned = 2  # num_return_sequences: generate's own expansion must map back to the right input row
    probe = torch.rand(n, 50, generator=torch.Generator().manual_seed(5))
    for r in range(n):  # the property the design rests on: row r's draw ignores the other rows
        other = probe.clone()
        other[torch.arange(n) != r] = torch.rand(n - 1, 50)
        torch.manual_seed(r)
        first = torch.multinomial(probe, 1)[r]
        torch.manual_seed(r)
        assert torch.equal(torch.multinomial(other, 1)[r], first)

    mixed = sample(model, batch, GENERATE_SPEC, seed=3, num_return_sequences=returned)
    for r, spec in enumerate(GENERATE_SPEC):
        copies = {k: v[r:r + 1].repeat(n, *([1] * (v.dim() - 1))) for k, v in batch.items()}
        alone = sample(model, copies, spec, seed=3, num_return_sequences=returned)
        block = slice(r * returned, (r + 1) * returned)
        assert torch.equal(mixed[block], alone[block]), (arch, r, spec)
    greedy = model.generate(**batch, adapter=GENERATE_SPEC, do_sample=False, max_new_tokens=6, min_new_tokens=6,
                            pad_token_id=0).repeat_interleave(returned, 0)
    assert not torch.equal(mixed, greedy), "sampling must actually sample for the check to mean anything"
    assert not torch.equal(mixed, sample(model, batch, GENERATE_SPEC, seed=4, num_return_sequences=returned))


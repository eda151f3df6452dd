"""Continuous batching of encoder–decoder backbones: rows that join and leave a running batch decode exactly
as each row alone.

The reference for every row is `model.generate` on that row alone (greedy, no padding). Marian, M2M100,
mBART and T5 rows of every adapter family (LoRA, DoRA, AdaLoRA, prefix, bottleneck), bare rows and a
stacked row join at seeded random steps and leave when done: each row's decoder runs at its own positions
(absolute tables, M2M100's pad rule, T5's relative bias) with its own encoder mask. Marian and mBART force
eos at the end of the budget (their configs' forced_eos_token_id); forced first tokens and banned tokens are
checked against generate's logits processors.
"""

from __future__ import annotations

import random
from unittest import mock

import pytest
import torch
from fastapi.testclient import TestClient

import adaptkit as ak
from adaptkit.generation import seq2seq
from adaptkit.generation.continuous import ContinuousBatch, DecodingRow, decode_continuously, unsupported
from adaptkit.serving.app import create_app
from adaptkit.serving.catalog import AdapterCatalog
from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.settings import ServeSettings
from adaptkit.serving.work import BatchKey
from adaptkit.tasks.generate import Generator
from adaptkit.tasks.translate import Translator
from test_continuous import joins_counted, run_joining_at_random, serve_in_waves
from test_train import tiny_tokenizer
from tiny import SMALL, VOCAB, tiny_model, with_random_adapters

FAMILIES = {"lora": ak.LoRA(r=4, targets="all-linear"), "dora": ak.LoRA(r=4, use_dora=True),
            "adalora": ak.AdaLoRA(init_r=4, target_r=2, total_steps=10), "prefix": ak.Prefix(length=3),
            "bottleneck": ak.Bottleneck(reduction=4, placement="houlsby")}
ROUTES = [*FAMILIES, None, ("lora", "bottleneck")]
ARCHS = ["marian", "m2m100", "mbart", "t5"]


def adapted(arch: str, tokenizer=None) -> ak.AdaptedModel:
    return with_random_adapters(ak.AdaptedModel(tiny_model(arch), tokenizer), FAMILIES, seed=5, scale=0.5)


def alone(model: ak.AdaptedModel, row: DecodingRow, **generate_kwargs) -> list[int]:
    """The row decoded by itself through generate: its written ids (after the decoder start), up to eos."""
    ids = torch.tensor([list(row.prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter=row.adapter, do_sample=False,
                         num_beams=1, max_new_tokens=row.max_new_tokens, **generate_kwargs)
    written = out[0, 1:].tolist()
    eos = model.model.generation_config.eos_token_id
    return written[: written.index(eos) + 1] if eos in written else written


def random_rows(rng: random.Random, n: int) -> list[DecodingRow]:
    rows = []
    for i in range(n):
        source = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))] + [SMALL["eos_token_id"]]
        rows.append(DecodingRow(source, ROUTES[i % len(ROUTES)], rng.randint(1, 14)))
    return rows


def with_frequent_eos(model: ak.AdaptedModel, rows: list[DecodingRow]) -> None:
    """Make a token these rows often write (after their first) the end of sequence, so that some rows stop at
    eos and others run out of budget, whatever the random weights prefer."""
    config = model.model.generation_config
    config.eos_token_id = None
    written = [token for row in rows[:10] for token in alone(model, row)[1:-1]]
    config.eos_token_id = max(set(written) - {config.decoder_start_token_id}, key=written.count)


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_joining_and_leaving_decode_as_each_row_alone(arch):
    model = adapted(arch)
    rng = random.Random(11)
    rows = random_rows(rng, 28)
    with_frequent_eos(model, rows)
    expected = [alone(model, row) for row in rows]
    engine = ContinuousBatch(model, max_rows=16, max_tokens=16)
    finished = run_joining_at_random(engine, rows, rng)
    assert sorted(map(id, finished)) == sorted(map(id, rows)) and len(engine) == 0
    assert [row.tokens for row in rows] == expected
    stopped_at_eos = [len(tokens) < row.max_new_tokens for tokens, row in zip(expected, rows)]
    assert any(stopped_at_eos) and not all(stopped_at_eos)  # rows left at different steps, for both reasons
    assert engine.cache.copies == engine.cross.copies == 0  # sized up front: no join copied a running row


def test_decoder_positions_count_each_rows_own_tokens():
    """Rows of very different lengths share steps: were positions the batch's (the decoders' default), the late
    rows would be decoded at the early rows' positions. Checked on M2M100, whose positions also skip pad ids:
    half the rows are forced to write the pad id first, which their next step feeds back at the pad slot."""
    model = adapted("m2m100")
    model.model.generation_config.eos_token_id = None
    rows = [DecodingRow([5, 6, 7, 2], route, 12, first_token=SMALL["pad_token_id"] if i % 2 else None)
            for i, route in enumerate(ROUTES * 2)]
    expected = [alone(model, row, forced_bos_token_id=row.first_token) for row in rows]
    engine = ContinuousBatch(model)
    engine.add(rows[:4])
    for _ in range(5):
        engine.step()
    engine.add(rows[4:])
    while len(engine):
        engine.step()
    assert [row.tokens for row in rows] == expected


@pytest.mark.parametrize("arch", ["mbart", "m2m100"])
def test_forced_first_tokens_and_banned_tokens_are_generates(arch):
    """A target language's forced_bos_token_id (per row, or the config's), and the config's one-token
    bad_words_ids, as generate's logits processors apply them."""
    model = adapted(arch)
    rng = random.Random(5)
    rows = random_rows(rng, 12)
    config = model.model.generation_config
    written = [token for row in rows for token in alone(model, row) if token != config.eos_token_id]
    banned = max(set(written), key=written.count)  # a token these rows would write
    config.bad_words_ids = [[banned], [SMALL["eos_token_id"]]]  # eos is exempt, as in generate
    for i, row in enumerate(rows):
        row.first_token = 40 + i % 3 if i % 2 else None
    config.forced_bos_token_id = 30
    expected = [alone(model, row, forced_bos_token_id=row.first_token or 30) for row in rows]
    assert all(tokens[0] == (row.first_token or 30) for tokens, row in zip(expected, rows))
    assert all(banned not in tokens for tokens in expected)
    decode_continuously(model, rows, 4, lambda row: None)
    assert [row.tokens for row in rows] == expected


def test_a_decoder_whose_positions_are_unknown_says_why():
    model = ak.AdaptedModel(tiny_model("marian"))
    with mock.patch.dict(seq2seq.POSITION_MODULES, clear=True):
        reason = unsupported(model)
        assert "MarianSinusoidalPositionalEmbedding" in reason
        with pytest.raises(ValueError, match="decoder positions"):
            ContinuousBatch(model)
        assert not Translator(ak.AdaptedModel(tiny_model("marian"), tiny_tokenizer("seq2seq")))._continuous_for(1, {})
    assert unsupported(model) is None


# -- the engine's users ------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["marian", "t5"])
def test_translator_and_generator_decode_seq2seq_rows_continuously(arch):
    """More rows than the batch holds, over every family: the answers equal the static path's, row by row."""
    model = adapted(arch, tiny_tokenizer("seq2seq"))
    rng = random.Random(2)
    texts = [" ".join(f"a{rng.randrange(30)}" for _ in range(rng.randint(1, 9))) for _ in range(15)]
    routes = [ROUTES[i % len(ROUTES)] for i in range(15)]
    translator, generator = Translator(model, batch_size=4), Generator(model, batch_size=4)
    with joins_counted() as joined:
        translated = translator.translate(texts, "en", "de", adapter=routes, num_beams=1, max_new_tokens=8)
        styled = generator.generate(texts, adapter=routes, task="style", max_new_tokens=6)
    assert joined() == 2 * len(texts)
    static_translator, static_generator = Translator(model, continuous=False), Generator(model, continuous=False)
    assert translated == [static_translator.translate([text], "en", "de", adapter=route, num_beams=1,
                                                      max_new_tokens=8)[0] for text, route in zip(texts, routes)]
    assert styled == [static_generator.generate([text], adapter=route, task="style", max_new_tokens=6)[0]
                      for text, route in zip(texts, routes)]
    with joins_counted() as joined:  # a target language's first token (M2M100, mBART-50) keeps them continuous
        forced = translator.translate(texts[:5], "en", "de", adapter=routes[:5], num_beams=1, max_new_tokens=8,
                                      forced_bos_token_id=40)
    assert joined() == 5
    assert forced == [static_translator.translate([text], "en", "de", adapter=route, num_beams=1, max_new_tokens=8,
                                                  forced_bos_token_id=40)[0] for text, route in zip(texts[:5], routes)]


def test_the_http_service_translates_with_a_seq2seq_backbone_in_the_continuous_batch(tmp_path):
    """POST /v1/translate on a T5 backbone: the rows decode in the engine (it stepped), and the answers are the
    library's for each text alone."""
    model = ak.AdaptedModel(tiny_model("t5"), tiny_tokenizer("seq2seq"), store=tmp_path / "store")
    with_random_adapters(model, {"A": ak.Prefix(length=3)}, seed=3, scale=0.5)
    model.save_adapter("A", model.store.path_for("A"), src_lang="en", tgt_lang="de")
    model.remove_adapter("A")
    app = create_app(model, settings=ServeSettings(max_wait_ms=0))
    engine = app.state.scheduler.runner.engine
    texts = ["a1 a2 a3", "a4", "a5 a6 a7 a8 a9 a10", "a11 a12"]
    with TestClient(app) as client:
        served = client.post("/v1/translate", json={"texts": texts, "src_lang": "en", "tgt_lang": "de",
                                                    "adapter": "A", "max_new_tokens": 7})
    assert served.status_code == 200, served.text
    assert engine is not None and engine.seq2seq and engine.steps > 0
    reference = ak.AdaptedModel(tiny_model("t5"), tiny_tokenizer("seq2seq"))
    reference.load_adapter(model.store.path_for("A"), "A")
    alone = Translator(reference, continuous=False)
    assert served.json()["translations"] == [alone.translate([text], "en", "de", adapter="A", num_beams=1,
                                                             max_new_tokens=7)[0] for text in texts]


def test_the_service_runs_seq2seq_rows_in_the_continuous_batch(tmp_path):
    """Greedy translations on M2M100 join the scheduler's continuous batch (beam rows stay static); every answer
    equals Translator's for that request alone."""
    model = adapted("m2m100", tiny_tokenizer("seq2seq"))
    model.store = None
    scheduler = Scheduler(model, AdapterCatalog(tmp_path), ServeSettings(max_wait_ms=0, max_batch=5))
    engine = scheduler.runner.engine
    assert engine is not None and engine.seq2seq
    rng = random.Random(4)
    requests = [(" ".join(f"a{rng.randrange(30)}" for _ in range(rng.randint(1, 7))), [*FAMILIES, None][i % 6],
                 BatchKey("translate", 2 if i % 6 == 5 else 1, rng.choice([3, 6, 9]))) for i in range(18)]
    with joins_counted() as joined:
        served, rows = serve_in_waves(scheduler, requests, every=4)
    greedy = [key.num_beams == 1 for _, _, key in requests]
    assert [row.decoding is not None for row in rows] == greedy
    assert joined() == sum(greedy) and engine.steps > 0
    translator = Translator(model, continuous=False)
    for (text, adapter, key), answer in zip(requests, served):
        assert answer == translator.translate([text], "en", "de", adapter=adapter, num_beams=key.num_beams,
                                              max_new_tokens=key.max_new_tokens)

"""Continuous batching: rows that join and leave a running batch decode exactly as each row alone.

The reference for every row is `model.generate` on that row alone (greedy, no padding). Rows of all
four adapter families, bare rows and a stacked row join at seeded random steps and leave when done;
the scheduler runs greedy translations in the engine and everything else (beams, rows too long for
a sliding window) in generate calls, with the same answers either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
from unittest import mock

import pytest
import torch
import transformers as tf

import adaptkit as ak
from adaptkit.generation.continuous import ContinuousBatch, DecodingRow, unsupported
from adaptkit.generation.slots import SlotLayer
from adaptkit.serving.catalog import AdapterCatalog
from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.settings import ServeSettings
from adaptkit.serving.work import BatchKey, Job, RequestRow
from adaptkit.tasks.generate import Generator
from adaptkit.tasks.translate import Translator
from test_train import tiny_tokenizer
from tiny import SMALL, VOCAB, tiny_model, with_random_adapters

FAMILIES = {"lora": ak.LoRA(r=4, targets="all-linear"), "adalora": ak.AdaLoRA(init_r=4, target_r=2, total_steps=10),
            "prefix": ak.Prefix(length=3), "bottleneck": ak.Bottleneck(reduction=4, placement="houlsby")}


def gemma3(sliding_window: int) -> torch.nn.Module:
    """tiny.py's gemma3 with a chosen sliding window (tiny.py's is 4 tokens: too short for any row here)."""
    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                                 sliding_window=sliding_window,
                                 layer_types=["sliding_attention", "sliding_attention", "full_attention"], **SMALL)
    return tf.Gemma3ForCausalLM(config).eval()


def with_adapters(backbone: torch.nn.Module, tokenizer=None) -> ak.AdaptedModel:
    return with_random_adapters(ak.AdaptedModel(backbone, tokenizer), FAMILIES, seed=5, scale=0.5)


def alone(model: ak.AdaptedModel, row: DecodingRow) -> list[int]:
    """The row decoded by itself through generate: its written ids up to and with eos."""
    ids = torch.tensor([list(row.prompt)])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter=row.adapter, do_sample=False,
                         num_beams=1, max_new_tokens=row.max_new_tokens, pad_token_id=SMALL["pad_token_id"])
    written = out[0, ids.shape[1]:].tolist()
    eos = model.model.generation_config.eos_token_id
    return written[: written.index(eos) + 1] if eos in written else written


def with_frequent_eos(model: ak.AdaptedModel, rows: list[DecodingRow]) -> int:
    """Make the token these rows write most often (after their first) the end of sequence, so that some rows
    stop at eos and others run out of budget, whatever the random weights prefer."""
    model.model.generation_config.eos_token_id = None
    written = [token for row in rows[:8] for token in alone(model, row)[1:]]
    eos = max(set(written), key=written.count)
    model.model.generation_config.eos_token_id = eos
    return eos


def random_rows(rng: random.Random, n: int, max_tokens: int) -> list[DecodingRow]:
    routes = [*FAMILIES, None, ("lora", "bottleneck")]
    rows = []
    for i in range(n):
        prompt_length = rng.randint(2, max_tokens // 2)
        prompt = [SMALL["bos_token_id"]] + [rng.randrange(3, VOCAB) for _ in range(prompt_length - 1)]
        rows.append(DecodingRow(prompt, routes[i % len(routes)], rng.randint(1, max_tokens - prompt_length)))
    return rows


def serve_in_waves(scheduler, requests: list[tuple], every: int) -> tuple[list[list[str]], list[RequestRow]]:
    """Submit (text, adapter, [task,] key) requests one job each, pausing after every `every` so later ones
    arrive while earlier ones decode; returns the answers and the rows."""
    rows = []

    async def scenario() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        jobs = []
        scheduler.start()
        try:
            for k, (text, adapter, *task, key) in enumerate(requests):
                job = Job(loop, 1)
                rows.append(RequestRow(job, 0, key, adapter, text, "en", "de", *task))
                scheduler.submit(job, rows[-1:])
                jobs.append(job)
                if k % every == every - 1:
                    await asyncio.sleep(0.01)
            return await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), 120)
        finally:
            await asyncio.to_thread(scheduler.stop)

    return asyncio.run(scenario()), rows


@contextlib.contextmanager
def joins_counted():
    """Counts the rows that join any continuous batch inside the block; yields the count's reader."""
    rows = []
    add = ContinuousBatch.add

    def counting_add(engine, joining):
        rows.extend(joining)
        return add(engine, joining)

    with mock.patch.object(ContinuousBatch, "add", counting_add):
        yield lambda: len(rows)


def run_joining_at_random(engine: ContinuousBatch, rows: list[DecodingRow], rng: random.Random) -> list[DecodingRow]:
    """Rows join a few at a time between steps until all are done; returns them in finishing order."""
    waiting, finished = list(rows), []
    while waiting or len(engine):
        count = rng.randint(0, 4)
        joining, waiting = waiting[:count], waiting[count:]
        if joining:
            finished += engine.add(joining)
        finished += engine.step()
        if engine.max_row_tokens is not None:
            assert engine.width <= engine.max_row_tokens
    return finished


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gemma3"])
def test_rows_joining_and_leaving_decode_as_each_row_alone(arch):
    backbone = gemma3(sliding_window=64) if arch == "gemma3" else tiny_model(arch)
    model = with_adapters(backbone)
    rng = random.Random(7)
    rows = random_rows(rng, 30, max_tokens=40)
    eos = with_frequent_eos(model, rows)
    expected = [alone(model, row) for row in rows]
    engine = ContinuousBatch(model)
    finished = run_joining_at_random(engine, rows, rng)
    assert sorted(map(id, finished)) == sorted(map(id, rows)) and len(engine) == 0
    assert [row.tokens for row in rows] == expected
    stopped_at_eos = [len(t) < row.max_new_tokens for t, row in zip(expected, rows)]
    assert any(stopped_at_eos) and not all(stopped_at_eos)  # rows left at different steps, for both reasons
    assert all(tokens[-1] == eos for tokens, early in zip(expected, stopped_at_eos) if early)


def test_rows_near_the_sliding_window_stay_exact_and_inside_it():
    """Rows that use nearly the whole window, joining and leaving: each row's tokens sit at its own positions
    in its slot, so the cache never spans more columns than the longest running row, however long ago the
    oldest running row joined (the left-padded cache this replaced had to be compacted to stay inside)."""
    model = with_adapters(gemma3(sliding_window=24))
    rng = random.Random(3)
    rows = random_rows(rng, 24, max_tokens=23)
    with_frequent_eos(model, rows)
    expected = [alone(model, row) for row in rows]
    engine = ContinuousBatch(model)
    assert engine.max_row_tokens == 23
    widths = []
    step = engine.step

    def measured_step():
        widths.append(engine.width)
        return step()

    engine.step = measured_step  # the instance attribute shadows the method
    run_joining_at_random(engine, rows, rng)
    assert 20 <= max(widths) <= 23  # near the window, never past it
    assert [row.tokens for row in rows] == expected


def held_keys(engine: ContinuousBatch, rows: list[DecodingRow]) -> list[torch.Tensor]:
    """Copies of the keys and values these rows hold in the slot cache, layer by layer."""
    held = []
    for layer in engine.cache.layers:
        for row in rows:
            slot = engine.slots.index(row)
            if isinstance(layer, SlotLayer):
                length = engine._length[slot]
                held += [layer.key_buffer[slot, :, :length].clone(), layer.value_buffer[slot, :, :length].clone()]
    return held


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_joining_rows_copy_no_running_rows_keys_and_values(arch):
    """Rows that join are prefilled into free slots: the running rows' keys and values stay in the same storage,
    unchanged, and no cache copy is counted. A batch that outgrows the cache it was sized for grows it (one
    counted copy); every row still decodes as alone (llama: grouped-query attention; gemma3: sliding windows)."""
    model = with_adapters(gemma3(sliding_window=40) if arch == "gemma3" else tiny_model("llama"))
    model.model.generation_config.eos_token_id = None  # rows run their whole budget
    rows = random_rows(random.Random(8), 12, max_tokens=30)
    for row in rows[:4]:
        row.max_new_tokens = 10  # still running when the others join
    expected = [alone(model, row) for row in rows]
    engine = ContinuousBatch(model, max_rows=12, max_tokens=30)
    engine.add(rows[:4])
    for _ in range(3):
        engine.step()
    running = engine.rows
    storage, held = engine.cache.key_storage(), held_keys(engine, running)
    assert len(running) == 4 and storage
    engine.add(rows[4:8])
    assert engine.cache.key_storage() == storage and engine.cache.copies == 0
    assert all(torch.equal(before, after) for before, after in zip(held, held_keys(engine, running), strict=True))
    engine.step()
    engine.add(rows[8:])
    while len(engine):
        engine.step()
    assert engine.cache.copies == 0 and [row.tokens for row in rows] == expected

    for row in rows:
        row.tokens = []
    small = ContinuousBatch(model, max_rows=2, max_tokens=8)
    small.add(rows[:2])
    small.step()
    small.add(rows[2:5])  # more rows and longer ones than it holds: it grows, copying the running two once
    assert small.cache.copies == 1
    while len(small):
        small.step()
    assert [row.tokens for row in rows[:5]] == expected[:5]


def test_a_removed_row_leaves_the_others_exact():
    model = with_adapters(tiny_model("llama"))
    rows = random_rows(random.Random(4), 8, max_tokens=40)
    for row in rows:
        row.max_new_tokens = 30
    model.model.generation_config.eos_token_id = None  # every row runs its whole budget
    expected = [alone(model, row)[:30] for row in rows]
    engine = ContinuousBatch(model)
    engine.add(rows)
    for _ in range(3):
        engine.step()
    engine.remove([rows[2], rows[5]])  # their clients went away
    while len(engine):
        engine.step()
    assert [rows[2].tokens, rows[5].tokens] == [expected[2][:4], expected[5][:4]]
    assert [row.tokens for i, row in enumerate(rows) if i not in (2, 5)] == [
        tokens for i, tokens in enumerate(expected) if i not in (2, 5)]


def test_a_join_that_raises_leaves_the_running_rows_as_they_were():
    """The service then lets each newcomer join alone: none of them may stay half-joined."""
    model = with_adapters(tiny_model("llama"))
    model.model.generation_config.eos_token_id = None
    rows = random_rows(random.Random(12), 3, max_tokens=30)
    expected = [alone(model, row) for row in rows]
    engine = ContinuousBatch(model)
    engine.add(rows[:2])
    engine.step()
    unknown = DecodingRow([1, 5, 6], "no-such-adapter", 4)
    with pytest.raises(ak.AdapterError, match="no-such-adapter"):
        engine.add([rows[2], unknown])
    assert engine.rows == rows[:2] and rows[2].tokens == [] and unknown.tokens == []
    engine.add(rows[2:])
    while len(engine):
        engine.step()
    assert [row.tokens for row in rows] == expected


def test_a_row_that_would_pass_the_sliding_window_is_refused_with_the_reason():
    engine = ContinuousBatch(with_adapters(tiny_model("gemma3")))  # tiny.py's gemma3: a 4-token window
    row = DecodingRow([1, 5, 6], "lora", 4)
    assert not engine.fits(row) and engine.fits(DecodingRow([1], "lora", 2))
    with pytest.raises(ValueError, match="sliding window"):
        engine.add([row])
    assert len(engine) == 0


def test_backbones_greedy_search_cannot_copy_say_why():
    assert "this one is encoder" in unsupported(ak.AdaptedModel(tiny_model("bert")))
    assert unsupported(ak.AdaptedModel(tiny_model("marian"))) is None  # tests/test_continuous_seq2seq.py
    model = ak.AdaptedModel(tiny_model("llama"))
    model.model.generation_config.bad_words_ids = [[5], [7, 8]]
    assert "bans token sequences [[7, 8]]" in unsupported(model)
    model.model.generation_config.bad_words_ids = [[5]]  # one-token words are copied (rules.py)
    assert unsupported(model) is None
    model.model.generation_config.repetition_penalty = 1.3
    assert "repetition_penalty=1.3" in unsupported(model)
    with pytest.raises(ValueError, match="repetition_penalty"):
        ContinuousBatch(model)


def test_output_layer_gets_a_contiguous_input():
    """generate keeps the last position per row, a strided slice: torch runs a linear layer on one as a
    batched matmul over a broadcast weight (7x slower for gemma3-270m's output layer); the bank hands it
    a contiguous copy."""
    model = ak.AdaptedModel(tiny_model("llama"))
    seen = []
    model.model.get_output_embeddings().register_forward_pre_hook(
        lambda _module, args: seen.append(args[0].is_contiguous()))
    ids = torch.randint(3, VOCAB, (3, 6))
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert seen and all(seen)


# -- in the scheduler ------------------------------------------------------------------------------

def scheduler_over(model: ak.AdaptedModel, tmp_path, **settings) -> Scheduler:
    model.store = None
    catalog = AdapterCatalog(tmp_path)
    return Scheduler(model, catalog, ServeSettings(max_wait_ms=0, **settings))


@pytest.mark.parametrize("backbone, continuous", [("llama", True), ("llama", False), ("gemma3-4", True)])
def test_scheduler_answers_equal_each_request_alone(tmp_path, backbone, continuous):
    """Translations and style / dialogue rows of several budgets, beam rows and bare rows, over four families:
    every answer equals Translator's or Generator's for that request alone. On gemma3 with a 4-token window
    no row fits the engine, so all run in generate calls."""
    model = with_adapters(tiny_model("gemma3" if backbone == "gemma3-4" else "llama"), tiny_tokenizer("decoder"))
    scheduler = scheduler_over(model, tmp_path, continuous=continuous, max_batch=6)
    assert (scheduler.runner.engine is not None) == continuous
    rng = random.Random(9)
    requests = []
    for i in range(30):
        text = " ".join(f"a{rng.randrange(30)}" for _ in range(rng.randint(1, 6)))
        adapter = [*FAMILIES, None][i % 5]
        task = [None, None, "style", "dialogue"][i % 4]
        key = BatchKey("generate" if task else "translate", 2 if i % 7 == 3 else 1, rng.choice([3, 6, 9]))
        requests.append((text, adapter, task, key))

    with joins_counted() as joined:
        served, rows = serve_in_waves(scheduler, requests, every=5)
    in_engine = [row.decoding is not None for row in rows]
    assert in_engine == [continuous and backbone == "llama" and row.key.num_beams == 1 for row in rows]
    assert joined() == sum(in_engine)  # and no other row decoded continuously: the static path is static
    translator, generator = Translator(model), Generator(model)
    for (text, adapter, task, key), answer in zip(requests, served):
        gen = dict(num_beams=key.num_beams, max_new_tokens=key.max_new_tokens)
        alone = (generator.generate([text], adapter=adapter, task=task, src_lang="en", tgt_lang="de", **gen) if task
                 else translator.translate([text], "en", "de", adapter=adapter, **gen))
        assert answer == alone


def test_rows_stop_joining_while_an_older_row_needs_a_generate_call(tmp_path):
    """Otherwise a steady stream of greedy rows would keep a beam-search row waiting forever."""
    model = with_adapters(tiny_model("llama"), tiny_tokenizer("decoder"))
    scheduler = scheduler_over(model, tmp_path)
    engine = scheduler.runner.engine

    def rows(loop, key):
        job = Job(loop, 1)
        return [RequestRow(job, 0, key, "lora", "a1 a2", "en", "de")]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        beam, greedy = rows(loop, BatchKey("translate", 2, 4)), rows(loop, BatchKey("translate", 1, 4))
        for row in (*beam, *greedy):
            row.decoding = scheduler.runner.decoding_row(row) if row.key.num_beams == 1 else None
        queue, driver = scheduler.admission, scheduler.driver
        queue.pending = [*beam, *greedy]
        with scheduler._lock:
            assert driver._joiners(engine) == []  # the beam row is older: the engine drains first
        queue.pending = [*greedy, *beam]
        with scheduler._lock:
            assert driver._joiners(engine) == greedy
        assert queue.pending == beam

    asyncio.run(scenario())


def test_a_cancelled_request_leaves_the_running_batch_at_its_next_step(tmp_path):
    model = with_adapters(tiny_model("llama"), tiny_tokenizer("decoder"))
    model.model.generation_config.eos_token_id = None  # nothing ends the long row but its budget or the cancel
    scheduler = scheduler_over(model, tmp_path)
    engine = scheduler.runner.engine
    resume = threading.Event()
    step = engine.step

    def gated_step():  # the engine's steps wait until the test has cancelled
        assert resume.wait(60), "the test never released the engine"
        return step()

    engine.step = gated_step  # the instance attribute shadows the method

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        long_job, short_job = Job(loop, 1), Job(loop, 1)
        long_row = RequestRow(long_job, 0, BatchKey("translate", 1, 40), "lora", "a1 a2", "en", "de")
        scheduler.submit(long_job, [long_row])
        scheduler.start()
        try:
            while long_job.first_batch is None:  # joined the engine, waiting at its first step
                await asyncio.sleep(0.001)
            scheduler.cancel(long_job)  # the client went away
            resume.set()
            short_row = RequestRow(short_job, 0, BatchKey("translate", 1, 5), "prefix", "a3", "en", "de")
            scheduler.submit(short_job, [short_row])
            answer = await asyncio.wait_for(short_job.future, 60)
        finally:
            resume.set()
            await asyncio.to_thread(scheduler.stop)
        # its prefill token, and the token of a step already under way when the cancel came (if one was): of 40
        assert len(long_row.decoding.tokens) <= 2
        assert not long_job.future.done()
        assert answer == Translator(model).translate(["a3"], "en", "de", adapter="prefix", num_beams=1,
                                                     max_new_tokens=5)

    asyncio.run(scenario())


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_translator_decodes_greedy_rows_continuously_each_as_alone(arch):
    """More rows than the batch holds, so rows join as others leave; on gemma3 (a 20-token window) the rows
    too long for the window go to generate within the same call, and the answers keep the input order."""
    backbone = gemma3(sliding_window=20) if arch == "gemma3" else tiny_model("llama")
    model = with_adapters(backbone, tiny_tokenizer("decoder"))
    rng = random.Random(2)
    texts = [" ".join(f"a{rng.randrange(30)}" for _ in range(rng.randint(1, 9))) for _ in range(23)]
    routes = [[*FAMILIES, None][i % 5] for i in range(23)]
    translator = Translator(model, batch_size=4)
    with joins_counted() as joined:
        served = translator.translate(texts, "en", "de", adapter=routes, num_beams=1, max_new_tokens=8)
    fits = len(texts)
    if arch == "gemma3":  # prompt and budget within the window's 19 cached tokens
        fits = sum(len(translator.decoding_parts(text, "en", "de")[0]) + 8 <= 19 for text in texts)
        assert 0 < fits < len(texts)
    assert joined() == fits  # the rows that went through the engine
    alone = Translator(model, continuous=False)
    assert served == [alone.translate([text], "en", "de", adapter=route, num_beams=1, max_new_tokens=8)[0]
                      for text, route in zip(texts, routes)]


def test_generator_decodes_greedy_rows_continuously_each_as_alone():
    """Style and dialogue rows (dialogue replies are not cut at a line) over four families and the bare
    backbone, more rows than the batch holds; sampling keeps static batches."""
    model = with_adapters(tiny_model("llama"), tiny_tokenizer("decoder"))
    rng = random.Random(6)
    texts = [" ".join(f"a{rng.randrange(30)}" for _ in range(rng.randint(1, 7))) for _ in range(17)]
    routes = [[*FAMILIES, None][i % 5] for i in range(17)]
    tasks = [["style", "dialogue", "translate"][i % 3] for i in range(17)]
    generator = Generator(model, batch_size=4)
    with joins_counted() as joined:
        served = generator.generate(texts, adapter=routes, task=tasks, src_lang="en", tgt_lang="de", max_new_tokens=7)
        generator.generate(texts[:2], adapter=routes[:2], task=tasks[:2], temperature=0.7, seed=1, max_new_tokens=3)
    assert joined() == len(texts)  # the sampled rows did not go through the engine
    alone = Generator(model, continuous=False)
    assert served == [alone.generate([text], adapter=route, task=task, src_lang="en", tgt_lang="de",
                                     max_new_tokens=7)[0] for text, route, task in zip(texts, routes, tasks)]


def test_static_batches_group_rows_by_length_and_answer_in_input_order():
    """Beam search runs in generate calls; rows of similar length share one (less padding), and the answers
    come back in the order of the input."""
    model = with_adapters(tiny_model("llama"), tiny_tokenizer("decoder"))
    texts = ["a1 a2 a3 a4 a5 a6 a7", "a1", "a2 a3 a4 a5 a6 a7 a8", "a5 a6", "a7 a8 a9 a10 a11", "a3"]
    routes = [*FAMILIES, None, "lora"]
    translator = Translator(model, batch_size=2)
    with mock.patch.object(model, "generate", wraps=model.generate) as generate:
        served = translator.translate(texts, "en", "de", adapter=routes, num_beams=2, max_new_tokens=5)
    widths = [call.kwargs["input_ids"].shape[1] for call in generate.call_args_list]
    assert widths == sorted(widths) and len(widths) == 3  # the two shortest first, the two longest last
    assert served == [translator.translate([text], "en", "de", adapter=route, num_beams=2, max_new_tokens=5)[0]
                      for text, route in zip(texts, routes)]

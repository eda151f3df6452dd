"""The scheduler in-process, as the one owner of the bank: store changes under traffic, failing rows, starving
loads, a dead thread. Each test drives the worker to the moment that matters through the scheduler's own state
(an adapter blocked, a row running), never through sleeps, and checks every answer against the row run alone
under the adapter file version the answer names.
"""

from __future__ import annotations

import asyncio
import shutil
import threading
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")

import adaptkit as ak  # noqa: E402
from adaptkit.core.adapterfile import read_adapter_info  # noqa: E402
from adaptkit.serving.catalog import AdapterCatalog  # noqa: E402
from adaptkit.serving.scheduler import Scheduler  # noqa: E402
from adaptkit.serving.settings import ApiError, ServeSettings  # noqa: E402
from adaptkit.serving.work import BatchKey, Job, RequestRow  # noqa: E402
from adaptkit.tasks.generate import Generator  # noqa: E402
from adaptkit.tasks.translate import Translator  # noqa: E402
from test_train import tiny_tokenizer  # noqa: E402
from tiny import tiny_model  # noqa: E402

KEY = BatchKey("translate", 1, 10)  # greedy: rows run in the continuous engine
BEAMS = BatchKey("translate", 2, 6)  # a static batch (one generate call)
TEXTS = ["a1 a2 a3", "a4 a5", "a6 a7 a8 a9", "a2 a9"]


def write_version(model: ak.AdaptedModel, name: str, config, seed: int, path: Path) -> str:
    """`name` with random weights drawn from `seed`, saved to `path`; returns the file's checksum (its version)."""
    if name in model.adapters:
        model.remove_adapter(name)
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_adapter(name, path)
    model.remove_adapter(name)
    return read_adapter_info(path)["sha256"]


class References:
    """Each (version, text, key) run alone on a model of its own, through the Translator the service uses."""

    def __init__(self, files: dict[str, Path]):
        self.model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"))
        self.files = files
        self.translator = Translator(self.model, continuous=False)

    def __call__(self, version: str | None, text: str, key: BatchKey = KEY) -> str:
        name = None
        if version is not None:
            name = f"v-{version[:12]}"
            if name not in self.model.adapters:
                self.model.load_adapter(self.files[version], name)
        return self.translator.translate([text], "en", "de", adapter=name, num_beams=key.num_beams,
                                         max_new_tokens=key.max_new_tokens)[0]


def service(tmp_path: Path, max_resident: int, **settings) -> tuple[Scheduler, ak.AdaptedModel]:
    model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"), store=tmp_path / "store",
                            max_resident=max_resident)
    catalog = AdapterCatalog(model.store)
    catalog.refresh()
    return Scheduler(model, catalog, ServeSettings(max_wait_ms=0, **settings)), model


def submit(scheduler: Scheduler, adapter: str | None, texts: list[str], key: BatchKey = KEY) -> Job:
    job = Job(asyncio.get_running_loop(), len(texts))
    scheduler.submit(job, [RequestRow(job, i, key, adapter, text, "en", "de") for i, text in enumerate(texts)])
    return job


async def until(predicate, what: str, within_s: float = 60.0) -> None:
    """Wait (on the event loop) until the scheduler's state says so; a bound, not a timing."""
    for _ in range(int(within_s / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def hold_steps_until(scheduler: Scheduler, condition) -> threading.Event:
    """From its second step on, the engine waits until `condition()` holds: a store change is then certain to
    arrive while rows decode. Returns an event set once the first step ran."""
    engine = scheduler.runner.engine
    step, ran, passed = engine.step, threading.Event(), threading.Event()

    def gated_step():
        if ran.is_set() and not passed.is_set():
            for _ in range(12_000):
                if condition():
                    break
                threading.Event().wait(0.005)
            passed.set()
        ran.set()
        return step()

    engine.step = gated_step
    return ran


def test_replace_under_traffic_running_rows_finish_under_their_version_later_rows_get_the_new(tmp_path):
    scheduler, model = service(tmp_path, max_resident=2)
    config = ak.LoRA(r=4, targets="all-linear")
    old = write_version(model, "A", config, 1, model.store.path_for("A"))
    new_file = tmp_path / "A-v2.safetensors"
    new = write_version(model, "A", config, 2, new_file)
    files = {old: tmp_path / "A-v1.safetensors", new: new_file}
    shutil.copy(model.store.path_for("A"), files[old])
    started = hold_steps_until(scheduler, lambda: "A" in scheduler.residency.blocked)

    async def scenario():
        running = submit(scheduler, "A", TEXTS)
        scheduler.start()
        try:
            await until(started.is_set, "the rows of A decode")
            replaced = asyncio.ensure_future(scheduler.call_exclusive(
                lambda: shutil.copy(new_file, model.store.path_for("A")), changes="A"))
            await until(lambda: "A" in scheduler.residency.blocked, "A is blocked for its replacement")
            later = submit(scheduler, "A", TEXTS[:2])
            first = await asyncio.wait_for(running.future, 60)
            await asyncio.wait_for(replaced, 60)
            second = await asyncio.wait_for(later.future, 60)
            return first, list(running.versions), second, list(later.versions)
        finally:
            await asyncio.to_thread(scheduler.stop)

    first, first_versions, second, second_versions = asyncio.run(scenario())
    reference = References(files)
    assert first_versions == [old] * 4 and second_versions == [new] * 2
    assert first == [reference(old, text) for text in TEXTS]
    assert second == [reference(new, text) for text in TEXTS[:2]]
    assert first[:2] != second  # the versions differ in what they answer: the check can tell them apart


def test_deleting_an_adapter_under_traffic_fails_no_other_request(tmp_path):
    scheduler, model = service(tmp_path, max_resident=3)
    files = {}
    for name, config, seed in (("A", ak.LoRA(r=4, targets="all-linear"), 1), ("B", ak.Prefix(length=3), 2)):
        version = write_version(model, name, config, seed, model.store.path_for(name))
        files[version] = tmp_path / f"{name}.safetensors"
        shutil.copy(model.store.path_for(name), files[version])
        model.load_from_store(name)  # resident from the start: both join the first batch
    deleted = None
    started = hold_steps_until(scheduler, lambda: deleted is not None and ("B" in scheduler.residency.blocked
                                                                          or deleted.done()))

    async def scenario():
        nonlocal deleted
        on_a, on_b = submit(scheduler, "A", TEXTS), submit(scheduler, "B", TEXTS[:2])  # one batch
        scheduler.start()
        try:
            await until(started.is_set, "A and B decode")
            b_running = scheduler.residency.running["B"]
            deleted = asyncio.ensure_future(scheduler.call_exclusive(
                lambda: model.store.path_for("B").unlink(), changes="B"))
            await until(lambda: "B" in scheduler.residency.blocked or deleted.done(), "B is blocked for deletion")
            after = submit(scheduler, "B", TEXTS[2:3])
            more_a = submit(scheduler, "A", TEXTS[3:])
            answers = [await asyncio.wait_for(job.future, 60) for job in (on_a, on_b, more_a)]
            await asyncio.wait_for(deleted, 60)
            with pytest.raises(ApiError) as gone:
                await asyncio.wait_for(after.future, 60)
            assert scheduler.alive and scheduler.queue_depth == 0
            return answers, [list(job.versions) for job in (on_a, on_b, more_a)], gone.value, b_running
        finally:
            await asyncio.to_thread(scheduler.stop)

    (a, b, a_more), (va, vb, va_more), gone, b_running = asyncio.run(scenario())
    assert b_running == 2  # the deletion came while B's rows decoded
    reference = References(files)
    assert a == [reference(va[0], t) for t in TEXTS] and a_more == [reference(va_more[0], TEXTS[3])]
    assert b == [reference(vb[0], t) for t in TEXTS[:2]]  # B's running rows finished under B
    assert (gone.status, gone.code) == (404, "unknown_adapter") and "'B'" in gone.message
    assert model.adapters == ["A"]


def test_a_row_whose_stop_rule_raises_fails_alone(tmp_path):
    scheduler, model = service(tmp_path, max_resident=2)
    version = write_version(model, "A", ak.Bottleneck(reduction=4), 3, model.store.path_for("A"))
    files = {version: model.store.path_for("A")}

    async def scenario():
        loop = asyncio.get_running_loop()
        good, bad = Job(loop, 3), Job(loop, 1)
        rows = [RequestRow(good, i, KEY, "A", text, "en", "de") for i, text in enumerate(TEXTS[:3])]
        poisoned = RequestRow(bad, 0, KEY, "A", TEXTS[3], "en", "de")
        poisoned.decoding = scheduler.prepare(poisoned)
        poisoned.decoding.stop = lambda ids: 1 / 0  # this row's own callback raises, at its first token
        scheduler.submit(good, rows[:2])
        scheduler.submit(bad, [poisoned])
        scheduler.submit(good, rows[2:])
        scheduler.start()
        try:
            answers = await asyncio.wait_for(good.future, 60)
            with pytest.raises(ApiError) as failed:
                await asyncio.wait_for(bad.future, 60)
            return answers, failed.value
        finally:
            await asyncio.to_thread(scheduler.stop)

    answers, failed = asyncio.run(scenario())
    reference = References(files)
    assert answers == [reference(version, text) for text in TEXTS[:3]]
    assert (failed.status, failed.code) == (500, "generation_failed") and "ZeroDivisionError" in failed.message


def test_a_static_batch_with_a_row_that_raises_answers_the_others(tmp_path):
    scheduler, model = service(tmp_path, max_resident=2, max_batch=8)
    version = write_version(model, "A", ak.LoRA(r=2), 4, model.store.path_for("A"))
    files = {version: model.store.path_for("A")}
    tokenizer = model.tokenizer
    encode = type(tokenizer).__call__

    def refusing(self, text, *args, **kwargs):  # a text the tokenizer cannot take, inside the worker
        texts = [text] if isinstance(text, str) else text
        if any("☠" in t for t in texts if isinstance(t, str)):
            raise UnicodeEncodeError("utf-8", "☠", 0, 1, "a text this tokenizer refuses")
        return encode(self, text, *args, **kwargs)

    async def scenario():
        jobs = [submit(scheduler, "A", [text], BEAMS) for text in TEXTS[:2]]
        bad = submit(scheduler, "A", ["a1 ☠ a2"], BEAMS)
        jobs.append(submit(scheduler, "A", TEXTS[2:], BEAMS))
        type(tokenizer).__call__ = refusing
        scheduler.start()
        try:
            answers = [await asyncio.wait_for(job.future, 60) for job in jobs]
            with pytest.raises(ApiError) as failed:
                await asyncio.wait_for(bad.future, 60)
            return answers, failed.value
        finally:
            type(tokenizer).__call__ = encode
            await asyncio.to_thread(scheduler.stop)

    answers, failed = asyncio.run(scenario())
    reference = References(files)
    assert answers == [[reference(version, TEXTS[0], BEAMS)], [reference(version, TEXTS[1], BEAMS)],
                       [reference(version, t, BEAMS) for t in TEXTS[2:]]]
    assert (failed.status, failed.code) == (500, "generation_failed") and "UnicodeEncodeError" in failed.message
    assert scheduler.batches_run == 1  # they shared one batch, which failed and was answered row by row


def test_a_load_is_not_starved_by_steady_traffic_on_the_resident_adapter(tmp_path):
    """K=1: four closed-loop clients keep A's rows coming; a request for B must not wait for A's traffic to end
    (the loader drains A: its new rows wait while its running rows finish, then B loads)."""
    scheduler, model = service(tmp_path, max_resident=1)
    for name, config, seed in (("A", ak.LoRA(r=4), 5), ("B", ak.Prefix(length=3), 6)):
        write_version(model, name, config, seed, model.store.path_for(name))
    total = 40

    async def scenario():
        scheduler.start()
        answered = {"A": 0}

        async def client(i: int) -> None:
            while answered["A"] < total:
                await submit(scheduler, "A", [TEXTS[i]]).future
                answered["A"] += 1

        try:
            clients = [asyncio.ensure_future(client(i)) for i in range(4)]
            await until(lambda: answered["A"] >= 2, "A serves")
            b = submit(scheduler, "B", [TEXTS[0]])
            await asyncio.wait_for(b.future, 120)
            a_when_b_answered = answered["A"]
            await asyncio.wait_for(asyncio.gather(*clients), 120)
            return a_when_b_answered, list(b.versions)
        finally:
            await asyncio.to_thread(scheduler.stop)

    a_when_b_answered, b_versions = asyncio.run(scenario())
    assert a_when_b_answered < total, "B was answered only once A's traffic had ended"
    assert b_versions[0] == read_adapter_info(model.store.path_for("B"))["sha256"]
    assert scheduler.peak_resident == 1


def test_a_dead_worker_fails_waiting_requests_and_refuses_new_ones(tmp_path):
    scheduler, _ = service(tmp_path, max_resident=None)

    def broken() -> None:
        raise RuntimeError("a bug in the worker")

    scheduler.driver._next_batch = broken

    async def scenario():
        job = submit(scheduler, None, TEXTS[:1])
        scheduler.start()
        with pytest.raises(ApiError) as failed:
            await asyncio.wait_for(job.future, 60)
        await until(lambda: not scheduler.alive, "the scheduler knows it is not alive")
        with pytest.raises(ApiError) as refused:
            submit(scheduler, None, TEXTS[:1])
        await asyncio.to_thread(scheduler.stop)
        return failed.value, refused.value

    failed, refused = asyncio.run(scenario())
    for error in (failed, refused):
        assert (error.status, error.code) == (503, "not_ready") and "a bug in the worker" in error.message


def test_a_request_past_its_deadline_gets_504_and_its_rows_leave_the_batch(tmp_path):
    """--request-timeout-s: the answer is a JSON 504 at the deadline, not when the rows would have finished; the
    rows leave the continuous batch, and the service answers the next request."""
    from fastapi.testclient import TestClient

    from adaptkit.serving.app import create_app

    model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"), store=tmp_path / "store")
    app = create_app(model, settings=ServeSettings(max_wait_ms=0, request_timeout_s=5))
    scheduler = app.state.scheduler
    engine = scheduler.runner.engine
    step, slow = engine.step, threading.Event()

    def slow_step():
        if slow.is_set():
            threading.Event().wait(0.25)  # forty steps of this pass the deadline
        return step()

    engine.step = slow_step
    body = {"prompts": ["a1 a2 a3"], "adapter": None, "task": "translate", "src_lang": "en", "tgt_lang": "de",
            "max_new_tokens": 40}
    with TestClient(app) as client:
        slow.set()
        late = client.post("/v1/generate", json=body)
        slow.clear()
        assert late.status_code == 504, late.text
        assert late.json()["error"]["code"] == "request_timeout" and "--request-timeout-s" in late.text
        for _ in range(2000):  # the worker notices at its next step
            if not len(engine) and scheduler.in_flight == 0:
                break
            threading.Event().wait(0.005)
        assert not len(engine) and scheduler.in_flight == 0 and scheduler.alive
        quick = client.post("/v1/generate", json={**body, "max_new_tokens": 4})
        assert quick.status_code == 200, quick.text
    alone = Generator(ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder")), continuous=False)
    assert quick.json()["outputs"] == alone.generate(["a1 a2 a3"], adapter=None, task="translate", src_lang="en",
                                                     tgt_lang="de", max_new_tokens=4)


def test_inside_the_service_a_call_never_loads_an_adapter_by_itself(tmp_path):
    """Only the loader changes the bank: a call for an adapter that is in the store but not resident fails
    (the old worker loaded it inside `using()`, where no eviction path could see it)."""
    scheduler, model = service(tmp_path, max_resident=2)
    write_version(model, "A", ak.LoRA(r=2), 7, model.store.path_for("A"))
    scheduler.start()
    try:
        with pytest.raises(ak.AdapterError, match="no adapter named 'A'"):
            with model.using("A"):
                pass
        assert model.adapters == []
    finally:
        scheduler.stop()


def test_a_text_past_the_source_limit_is_translated_whole_by_the_service(tmp_path):
    """Two long texts (over max_source_len tokens) that differ only in their last sentence: the service answers
    each as the library's Translator does, which translates every segment, so the answers differ too."""
    from fastapi.testclient import TestClient

    from adaptkit.serving.app import create_app

    model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"), store=tmp_path / "store")
    write_version(model, "A", ak.LoRA(r=4, targets="all-linear"), 8, model.store.path_for("A"))
    body = ". ".join(" ".join(f"a{(7 * i + j) % 30}" for j in range(9)) for i in range(34))
    texts = [body + ". a1 a2 a3.", body + ". a4 a5 a6."]
    translator = Translator(model, continuous=False)
    assert len(model.tokenizer(texts[0])["input_ids"]) > translator.max_source_len
    app = create_app(model, settings=ServeSettings(max_wait_ms=0, max_text_chars=4000))
    with TestClient(app) as client:
        served = client.post("/v1/translate", json={"texts": texts, "src_lang": "en", "tgt_lang": "de",
                                                    "adapter": "A", "max_new_tokens": 6})
    assert served.status_code == 200, served.text
    reference = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"))
    reference.load_adapter(model.store.path_for("A"), "A")
    expected = Translator(reference, continuous=False).translate(texts, "en", "de", adapter="A", num_beams=1,
                                                                 max_new_tokens=6)
    assert served.json()["translations"] == expected
    assert expected[0] != expected[1]  # the last sentence was translated, not cut away


def test_the_loader_never_evicts_a_member_a_loaded_fusion_runs_over(tmp_path):
    """K=3 holds two bottleneck members and their fusion; a row for a fourth adapter makes room by evicting the
    fusion (idle), never a member (the bank would refuse, and the loader must not die of it)."""
    scheduler, model = service(tmp_path, max_resident=3)
    for name, seed in (("m1", 11), ("m2", 12), ("other", 13)):
        write_version(model, name, ak.Bottleneck(reduction=4), seed, model.store.path_for(name))
    model.load_from_store("m1")
    model.load_from_store("m2")
    model.add_adapter("fusion", ak.Fusion(adapters=["m1", "m2"]))
    model.save_adapter("fusion")
    assert scheduler.residency.victim(wanted=set()) == "fusion"

    async def scenario():
        job = submit(scheduler, "other", TEXTS[:1])
        scheduler.start()
        try:
            await asyncio.wait_for(job.future, 60)
            return list(job.versions), list(model.adapters), scheduler.alive
        finally:
            await asyncio.to_thread(scheduler.stop)

    versions, resident, alive = asyncio.run(scenario())
    assert versions == [read_adapter_info(model.store.path_for("other"))["sha256"]]
    assert sorted(resident) == ["m1", "m2", "other"] and alive

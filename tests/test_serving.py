"""The HTTP service, for real: `adaptkit serve` in its own process on 127.0.0.1, spoken to with httpx.

One server for the module (a tiny llama, 8 adapters of all four families in a store, at most 3
resident, API keys). Every answer is compared with the same request served alone by a `Translator`
in this process. Error answers are checked for their status, JSON code and named limit, and the
service must answer correctly afterwards. The scheduler's queue bound and cancellation are checked
in-process, without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import adaptkit as ak  # noqa: E402
from adaptkit.cli import main as adaptkit_main  # noqa: E402
from adaptkit.serving.catalog import AdapterCatalog  # noqa: E402
from adaptkit.serving.scheduler import Scheduler  # noqa: E402
from adaptkit.serving.settings import ApiError, ServeSettings  # noqa: E402
from adaptkit.serving.work import BatchKey, Job, RequestRow  # noqa: E402
from adaptkit.tasks.generate import Generator  # noqa: E402
from adaptkit.tasks.translate import Translator  # noqa: E402
from test_train import tiny_tokenizer  # noqa: E402
from tiny import tiny_model  # noqa: E402

KEYS = ["key-one-0123456789abcdef", "key-two-0123456789abcdef"]
CONFIGS = [ak.LoRA(r=4, targets="all-linear"), ak.AdaLoRA(init_r=4, target_r=2, total_steps=10),
           ak.Prefix(length=3), ak.Bottleneck(reduction=4, placement="houlsby"),
           ak.LoRA(r=2, targets="attention"), ak.AdaLoRA(init_r=2, target_r=1, total_steps=10),
           ak.Prefix(length=5), ak.Bottleneck(reduction=8, placement="pfeiffer")]
NAMES = [f"en-de/d{i}-{config.method}" for i, config in enumerate(CONFIGS)]
MAX_RESIDENT = 3
MAX_TEXTS = 8
MAX_TEXT_CHARS = 200
MAX_BODY = 16_384
GEN = dict(num_beams=1, max_new_tokens=6)


def words(rng: random.Random) -> str:
    return " ".join(f"a{rng.randrange(30)}" for _ in range(rng.randint(2, 6)))


def build_store(root: Path, names: list[str] = NAMES, configs: list = CONFIGS) -> tuple[Path, Path, ak.AdaptedModel]:
    """A saved tiny backbone, a store of adapters with random weights (en→de, domain d<i>), and a reference
    model over both."""
    backbone = root / "backbone"
    model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"))
    model.model.save_pretrained(backbone)
    model.tokenizer.save_pretrained(backbone)
    store = root / "store"
    reference = ak.load(backbone, store=store)
    generator = torch.Generator().manual_seed(11)
    for i, (name, config) in enumerate(zip(names, configs)):
        reference.add_adapter(name, config)
        with torch.no_grad():
            for p in reference.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        reference.save_adapter(name, src_lang="en", tgt_lang="de", domain=f"d{i}")
    return backbone, store, reference


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    def __init__(self, url: str, store: Path, reference: ak.AdaptedModel, backbone: Path, log: Path):
        self.url, self.store, self.reference, self.backbone, self.log = url, store, reference, backbone, log
        self.translator = Translator(reference)
        self.headers = {"Authorization": f"Bearer {KEYS[0]}"}

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=120, **kwargs)

    def expected(self, texts: list[str], adapter: str, **gen) -> list[str]:
        """The request served alone, in this process."""
        return self.translator.translate(texts, "en", "de", adapter=adapter, **{**GEN, **gen})

    def metrics(self) -> dict[str, float]:
        with self.client() as client:
            text = client.get("/metrics").text
        return {sample.name + _labels(sample.labels): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


def _labels(labels: dict[str, str]) -> str:
    return "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}" if labels else ""


def start_server(command: list[str], log: Path, ready_url: str, within_s: float = 300) -> subprocess.Popen:
    """`command` in its own process (output to `log`), once `ready_url` answers 200."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + within_s
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(ready_url, timeout=5).status_code == 200:
                return process
        if time.monotonic() > deadline:
            process.terminate()
            process.wait(60)
            raise RuntimeError(f"the server was not ready in {within_s} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Service:
    root = tmp_path_factory.mktemp("serving")
    backbone, store, reference = build_store(root)
    keys = root / "keys.txt"
    keys.write_text("# two clients\n" + "\n".join(KEYS) + "\n")
    port = free_port()
    log = root / "server.log"
    command = [sys.executable, "-m", "adaptkit.cli.serve", "--backbone", str(backbone), "--store", str(store),
               "--port", str(port), "--max-resident", str(MAX_RESIDENT), "--max-batch", "16", "--max-wait-ms", "30",
               "--api-key-file", str(keys), "--max-texts", str(MAX_TEXTS), "--max-text-chars", str(MAX_TEXT_CHARS),
               "--max-body-bytes", str(MAX_BODY), "--log-level", "warning"]
    url = f"http://127.0.0.1:{port}"
    process = start_server(command, log, url + "/healthz")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the references are tiny: more threads only contend with the server on a busy box
    yield Service(url, store, reference, backbone, log)
    torch.set_num_threads(threads)
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


def send_concurrently(url: str, bodies: list[dict], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    """Every body POSTed to /v1/translate at once, one connection each."""
    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, headers=headers or {}, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/translate", json=body) for body in bodies))

    return asyncio.run(send_all())


def assert_error(response: httpx.Response, status: int, code: str, limit: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"], error
    if limit is not None:
        assert error["limit"]["name"] == limit and error["limit"]["value"] > 0, error
    return error


def check_still_serving(service: Service) -> None:
    texts = ["a1 a2 a3", "a4 a5"]
    with service.client() as client:
        response = client.post("/v1/translate", json={"texts": texts, "src_lang": "en", "tgt_lang": "de",
                                                      "domain": "d2", **GEN})
    assert response.status_code == 200, response.text
    assert response.json()["translations"] == service.expected(texts, NAMES[2])


# -- batching across adapters ---------------------------------------------------------------------

def test_concurrent_requests_over_eight_adapters_equal_each_served_alone(service):
    rng = random.Random(0)
    requests = []
    for j in range(64):
        i = j % 8
        texts = [words(rng) for _ in range(rng.randint(1, 2))]
        body = {"texts": texts, "src_lang": "en", "tgt_lang": "de", **GEN}
        if j % 2:
            body["domain"] = f"d{i}"  # routed by the file header's routing keys
        else:
            body["adapter"] = NAMES[i]
        if j % 16 == 5:
            body["num_beams"] = 2  # other generation settings: a batch of their own
        requests.append((body, NAMES[i]))

    responses = send_concurrently(service.url, [body for body, _ in requests], service.headers)
    outputs = set()
    for (body, name), response in zip(requests, responses):
        assert response.status_code == 200, response.text
        answer = response.json()
        assert answer["adapters"] == [name] * len(body["texts"])
        expected = service.expected(body["texts"], name, num_beams=body.get("num_beams", 1))
        assert answer["translations"] == expected, (name, body)
        assert answer["timings"]["total_ms"] >= answer["timings"]["compute_ms"] > 0
        outputs.update(expected)
    assert len(outputs) > 32, "the adapters must change what is generated"

    metrics = service.metrics()
    batches = metrics["adaptkit_batch_adapters_count"]
    single = metrics["adaptkit_batch_adapters_bucket{le=1.0}"]
    assert batches > single, "some generate calls must mix requests for different adapters"
    assert metrics["adaptkit_batch_rows_sum"] >= sum(len(body["texts"]) for body, _ in requests)
    assert batches < 64, "requests must share generate calls"
    assert metrics["adaptkit_resident_adapters_peak"] <= MAX_RESIDENT
    assert metrics["adaptkit_resident_adapters"] <= MAX_RESIDENT
    assert metrics["adaptkit_adapter_loads_total{outcome=ok}"] >= 8
    assert metrics["adaptkit_adapter_evictions_total"] >= 8 - MAX_RESIDENT
    assert metrics[f"adaptkit_requests_total{{adapter={NAMES[3]},route=/v1/translate}}"] >= 8


def test_residency_round_robin_keeps_at_most_k_resident_and_outputs_exact(service):
    rng = random.Random(1)
    with service.client() as client:
        for _ in range(2):
            for name in NAMES:
                texts = [words(rng)]
                response = client.post("/v1/translate", json={"texts": texts, "adapter": name, "src_lang": "en",
                                                              "tgt_lang": "de", **GEN})
                assert response.status_code == 200, response.text
                assert response.json()["translations"] == service.expected(texts, name)
                assert service.metrics()["adaptkit_resident_adapters"] <= MAX_RESIDENT
            listing = client.get("/v1/adapters").json()
            assert len(listing["resident"]) <= MAX_RESIDENT and listing["max_resident"] == MAX_RESIDENT
    metrics = service.metrics()
    assert metrics["adaptkit_resident_adapters_peak"] <= MAX_RESIDENT
    assert metrics["adaptkit_adapter_load_seconds_count"] >= 16


def test_generate_route_prompts_by_task(service):
    prompts = ["a3 a4 a5", "a7"]
    with service.client() as client:
        response = client.post("/v1/generate", json={"prompts": prompts, "adapter": [NAMES[0], NAMES[2]],
                                                     "task": "style", "max_new_tokens": 5})
        no_task = client.post("/v1/generate", json={"prompts": prompts, "adapter": NAMES[0]})
    assert response.status_code == 200, response.text
    expected = Generator(service.reference).generate(prompts, adapter=[NAMES[0], NAMES[2]], task="style",
                                                     src_lang="en", tgt_lang="de", max_new_tokens=5)
    assert response.json()["outputs"] == expected
    assert_error(no_task, 422, "no_task")


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of a server-sent event stream; unnamed events are 'message'."""
    events = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


@pytest.mark.parametrize("adapter", [NAMES[0], NAMES[2], None])  # LoRA, prefix, the bare backbone
def test_generate_streams_server_sent_events_that_join_to_the_plain_answer(service, adapter):
    body = {"prompts": ["a3 a4 a5 a6"], "adapter": adapter, "task": "style", "max_new_tokens": 8}
    with service.client() as client:
        plain = client.post("/v1/generate", json=body)
        with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200
            assert streamed.headers["content-type"].startswith("text/event-stream")
            events = sse_events(streamed.read().decode())
    assert plain.status_code == 200, plain.text
    pieces = [data["text"] for name, data in events if name == "message"]
    assert events[-1][0] == "done" and [name for name, _ in events[:-1]] == ["message"] * len(pieces)
    assert pieces and "".join(pieces) == events[-1][1]["output"] == plain.json()["outputs"][0]
    assert events[-1][1]["adapter"] == adapter


def test_streams_are_rows_of_the_continuous_batch_beyond_max_streams(service):
    """Six streams at once, over three families and the bare backbone: more than --max-streams (2), which
    bounds only streams that need a thread of their own; each joins to the plain answer."""
    bodies = [{"prompts": [f"a{i} a{i + 1} a{i + 2}"], "adapter": [NAMES[0], NAMES[1], NAMES[3], None][i % 4],
               "task": "style", "max_new_tokens": 8} for i in range(6)]

    async def stream_all() -> list[tuple[int, str]]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
        async with httpx.AsyncClient(base_url=service.url, headers={"Authorization": f"Bearer {KEYS[0]}"},
                                     timeout=300, limits=limits) as client:
            async def one(body: dict) -> tuple[int, str]:
                async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
                    return response.status_code, (await response.aread()).decode()
            return await asyncio.gather(*(one(body) for body in bodies))

    steps_before = service.metrics()["adaptkit_batch_rows_count"]
    streamed = asyncio.run(stream_all())
    assert service.metrics()["adaptkit_batch_rows_count"] > steps_before  # they decoded in the engine's steps
    with service.client() as client:
        plain = [client.post("/v1/generate", json=body).json()["outputs"][0] for body in bodies]
    for (status, text), expected in zip(streamed, plain):
        assert status == 200, text
        events = sse_events(text)
        assert events[-1][0] == "done"
        assert "".join(data["text"] for name, data in events if name == "message") == expected


def test_stream_takes_one_greedy_prompt(service):
    with service.client() as client:
        two = client.post("/v1/generate", json={"prompts": ["a1", "a2"], "adapter": NAMES[0], "task": "style",
                                                "stream": True})
        beams = client.post("/v1/generate", json={"prompts": ["a1"], "adapter": NAMES[0], "task": "style",
                                                  "num_beams": 2, "stream": True})
    assert_error(two, 422, "stream_one_greedy_prompt")
    assert_error(beams, 422, "stream_one_greedy_prompt")


# -- adapters: list, upload, delete --------------------------------------------------------------

def test_adapter_listing(service):
    with service.client() as client:
        listing = client.get("/v1/adapters").json()
    by_name = {a["name"]: a for a in listing["adapters"]}
    assert set(NAMES) <= set(by_name)
    assert {by_name[n]["method"] for n in NAMES} == {"lora", "adalora", "prefix", "bottleneck"}
    assert by_name[NAMES[1]]["domain"] == "d1" and by_name[NAMES[1]]["src_lang"] == "en"
    assert all(by_name[n]["num_parameters"] > 0 and by_name[n]["file_bytes"] > 0 for n in NAMES)


def test_upload_translate_delete(service, tmp_path):
    model = ak.load(service.backbone)
    model.add_adapter("fresh", ak.LoRA(r=2, targets="all-linear"))
    with torch.no_grad():
        for p in model.adapter_parameters("fresh"):
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(5))
    path = model.save_adapter("fresh", tmp_path / "fresh.safetensors", src_lang="en", tgt_lang="de", domain="new")
    texts = ["a9 a8 a7"]
    expected = Translator(model).translate(texts, "en", "de", adapter="fresh", **GEN)
    with service.client() as client:
        created = client.post("/v1/adapters", params={"name": "uploads/fresh"}, content=path.read_bytes())
        assert created.status_code == 201, created.text
        assert created.json()["name"] == "uploads/fresh" and created.json()["method"] == "lora"
        assert (service.store / "uploads" / "fresh.safetensors").read_bytes() == path.read_bytes()
        again = client.post("/v1/adapters", params={"name": "uploads/fresh"}, content=path.read_bytes())
        assert_error(again, 409, "adapter_exists")
        body = {"texts": texts, "src_lang": "en", "tgt_lang": "de", "domain": "new", **GEN}
        routed = client.post("/v1/translate", json=body)
        assert routed.status_code == 200, routed.text
        assert routed.json()["translations"] == expected and routed.json()["adapters"] == ["uploads/fresh"]
        deleted = client.delete("/v1/adapters/uploads/fresh")
        assert deleted.status_code == 200 and deleted.json() == {"deleted": "uploads/fresh"}
        assert not (service.store / "uploads" / "fresh.safetensors").exists()
        assert_error(client.post("/v1/translate", json=body), 404, "no_adapter_for_pair")
        assert_error(client.delete("/v1/adapters/uploads/fresh"), 404, "unknown_adapter")
    check_still_serving(service)


def test_corrupt_upload_and_path_escape_are_refused_and_nothing_is_written(service):
    good = (service.store / f"{NAMES[0]}.safetensors").read_bytes()
    corrupt = bytearray(good)
    corrupt[-3] ^= 0xFF  # a tensor byte: the header still parses, the checksum does not match
    before = sorted(p.relative_to(service.store) for p in service.store.rglob("*"))
    with service.client() as client:
        refused = client.post("/v1/adapters", params={"name": "bad/corrupt"}, content=bytes(corrupt))
        error = assert_error(refused, 422, "invalid_adapter_file")
        assert "checksum" in error["message"] or "corrupt" in error["message"]
        garbage = client.post("/v1/adapters", params={"name": "bad/garbage"}, content=b"\x80\x04not a file")
        assert_error(garbage, 422, "invalid_adapter_file")
        for name in ("../escaped", "a/../../escaped", "/etc/escaped"):
            assert_error(client.post("/v1/adapters", params={"name": name}, content=good), 400, "bad_adapter_name")
        assert_error(client.delete("/v1/adapters/..%2F..%2Fescaped"), 400, "bad_adapter_name")
        assert_error(client.post("/v1/translate", json={"texts": ["a1"], "src_lang": "en", "tgt_lang": "de",
                                                        "adapter": "../d0"}), 400, "bad_adapter_name")
    assert sorted(p.relative_to(service.store) for p in service.store.rglob("*")) == before
    assert not list(service.store.parent.rglob("escaped*"))
    check_still_serving(service)


def test_broken_file_in_the_store_fails_only_its_requests(service):
    good = bytearray((service.store / f"{NAMES[1]}.safetensors").read_bytes())
    good[-5] ^= 0xFF
    broken = service.store / "broken" / "one.safetensors"
    broken.parent.mkdir()
    broken.write_bytes(bytes(good))
    try:
        with service.client() as client:
            response = client.post("/v1/translate", json={"texts": ["a1 a2"], "src_lang": "en", "tgt_lang": "de",
                                                          "adapter": "broken/one"})
            error = assert_error(response, 500, "adapter_broken")
            assert "broken/one" in error["message"] and "checksum" in error["message"]
        check_still_serving(service)
    finally:
        broken.unlink()


# -- bad requests ---------------------------------------------------------------------------------

def test_bad_requests_get_documented_json_errors_and_service_goes_on(service):
    base = {"src_lang": "en", "tgt_lang": "de", "domain": "d0"}
    with service.client() as client:
        bad_json = client.post("/v1/translate", content=b'{"texts": ["a1",', headers={"content-type":
                                                                                       "application/json"})
        assert_error(bad_json, 400, "bad_json")
        assert_error(client.post("/v1/translate", json={"texts": ["a1"]}), 422, "invalid_request")
        assert_error(client.post("/v1/translate", json={**base, "texts": ["a1"], "adapter": "en-de/nope"}),
                     404, "unknown_adapter")
        assert_error(client.post("/v1/translate", json={**base, "texts": ["a1"], "tgt_lang": "fr"}),
                     404, "no_adapter_for_pair")
        assert_error(client.post("/v1/translate", json={**base, "texts": ["a1"] * (MAX_TEXTS + 1)}),
                     422, "too_many_texts", limit="max_texts")
        assert_error(client.post("/v1/translate", json={**base, "texts": ["a1 " * (MAX_TEXT_CHARS // 3 + 1)]}),
                     422, "text_too_long", limit="max_text_chars")
        assert_error(client.post("/v1/translate", json={**base, "texts": ["a1"], "num_beams": 99}),
                     422, "num_beams_too_large", limit="max_beams")
        assert_error(client.post("/v1/translate", json={**base, "texts": ["a1", "a2"], "tgt_lang": ["de"]}),
                     422, "per_row_length")
        assert_error(client.post("/v1/translate", json={**base, "texts": ["a1" * MAX_BODY]}),
                     413, "body_too_large", limit="max_body_bytes")
    check_still_serving(service)


def test_keys_are_required_everywhere_but_healthz(service):
    body = {"texts": ["a1"], "src_lang": "en", "tgt_lang": "de", "domain": "d0", **GEN}
    with httpx.Client(base_url=service.url, timeout=60) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        for method, path in (("POST", "/v1/translate"), ("GET", "/v1/adapters"), ("GET", "/metrics"),
                             ("GET", "/readyz"), ("GET", "/openapi.json"), ("DELETE", f"/v1/adapters/{NAMES[0]}")):
            response = anonymous.request(method, path, json=body if method == "POST" else None)
            assert_error(response, 401, "unauthorized")
            assert response.headers["www-authenticate"] == "Bearer"
        for wrong in ("Bearer nope", f"Bearer {KEYS[0]}x", f"Basic {KEYS[0]}", KEYS[0], "Bearer"):
            assert_error(anonymous.post("/v1/translate", json=body, headers={"Authorization": wrong}),
                         401, "unauthorized")
        second = anonymous.post("/v1/translate", json=body, headers={"Authorization": f"Bearer {KEYS[1]}"})
        assert second.status_code == 200 and second.json()["translations"] == service.expected(["a1"], NAMES[0])
    assert (service.store / f"{NAMES[0]}.safetensors").exists()


def test_openapi_and_readiness(service):
    with service.client() as client:
        schema = client.get("/openapi.json").json()
        ready = client.get("/readyz")
    assert {"/v1/translate", "/v1/generate", "/v1/adapters", "/v1/adapters/{name}", "/healthz", "/readyz",
            "/metrics"} <= set(schema["paths"])
    for model in ("TranslateRequest", "TranslateResponse", "GenerateRequest", "AdapterInfo", "ErrorBody"):
        assert model in schema["components"]["schemas"]
    assert "413" in schema["paths"]["/v1/translate"]["post"]["responses"]
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


# -- the translate command: same routing as the service -------------------------------------------

def test_translate_command_routes_like_the_service(service, tmp_path):
    rng = random.Random(3)
    texts = [words(rng) for _ in range(5)]
    source = tmp_path / "in.txt"
    source.write_text("\n".join(texts) + "\n")
    out = tmp_path / "out.txt"
    code = adaptkit_main(["translate", "--store", str(service.store), "--backbone", str(service.backbone),
                          "--src", "en", "--tgt", "de", "--domain", "d3", "--max-new-tokens", "6", "--quiet",
                          str(source), "--out", str(out)])
    assert code == 0
    assert out.read_text().splitlines() == service.expected(texts, NAMES[3])
    with service.client() as client:
        served = client.post("/v1/translate", json={"texts": texts, "src_lang": "en", "tgt_lang": "de",
                                                    "domain": "d3", **GEN}).json()["translations"]
    assert served == out.read_text().splitlines()

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"text": "{t}", "domain": "d{i}"}}\n' for i, t in enumerate(texts)))
    code = adaptkit_main(["translate", "--store", str(service.store), "--backbone", str(service.backbone),
                          "--src", "en", "--tgt", "de", "--max-new-tokens", "6", "--quiet", str(rows),
                          "--out", str(tmp_path / "rows.out.jsonl")])
    assert code == 0
    records = [json.loads(line) for line in (tmp_path / "rows.out.jsonl").read_text().splitlines()]
    assert [r["adapter"] for r in records] == NAMES[:5]
    assert [r["translation"] for r in records] == [service.expected([t], NAMES[i])[0] for i, t in enumerate(texts)]
    assert adaptkit_main(["translate", "--store", str(service.store), "--backbone", str(service.backbone),
                          "--src", "en", "--tgt", "fr", "--quiet", str(source)]) == 2


# -- the scheduler in-process: queue bound, cancellation ------------------------------------------

def test_queue_bound_and_cancelled_rows_never_run(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"), store=tmp_path)
    scheduler = Scheduler(model, AdapterCatalog(model.store), ServeSettings(max_queue=4, max_wait_ms=0))
    key = BatchKey("translate", 1, 4)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        first = Job(loop, 3)
        scheduler.submit(first, [RequestRow(first, i, key, None, "a1 a2", "en", "de") for i in range(3)])
        second = Job(loop, 2)
        with pytest.raises(ApiError) as full:
            scheduler.submit(second, [RequestRow(second, i, key, None, "a1", "en", "de") for i in range(2)])
        assert full.value.status == 503 and full.value.code == "queue_full"
        assert full.value.headers["Retry-After"] == "1" and full.value.limit == ("max_queue", 4)
        scheduler.cancel(first)  # the client went away before the worker started
        assert scheduler.queue_depth == 0
        kept = Job(loop, 1)
        scheduler.submit(kept, [RequestRow(kept, 0, key, None, "a3 a4", "en", "de")])
        scheduler.start()
        try:
            result = await asyncio.wait_for(kept.future, 60)
        finally:
            await asyncio.to_thread(scheduler.stop)
        assert result == Translator(model).translate(["a3 a4"], "en", "de", adapter=None, num_beams=1,
                                                     max_new_tokens=4)
        assert scheduler.batches_run == 1 and not first.future.done()

    asyncio.run(scenario())


def small_store(tmp_path: Path, max_resident: int) -> tuple[ak.AdaptedModel, ak.AdaptedModel]:
    """Two adapters (LoRA, prefix) in a store; a served model with none resident, and a reference with both."""
    reference = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"), store=tmp_path)
    generator = torch.Generator().manual_seed(2)
    for name, config in (("A", ak.LoRA(r=4, targets="all-linear")), ("B", ak.Prefix(length=3))):
        reference.add_adapter(name, config)
        with torch.no_grad():
            for p in reference.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        reference.save_adapter(name)
    served = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"), store=tmp_path,
                             max_resident=max_resident)
    return served, reference


def scheduler_for(model: ak.AdaptedModel) -> Scheduler:
    catalog = AdapterCatalog(model.store)
    catalog.refresh()
    return Scheduler(model, catalog, ServeSettings(max_wait_ms=0))


def test_a_slow_load_does_not_hold_up_requests_for_resident_adapters(tmp_path):
    model, reference = small_store(tmp_path, max_resident=2)
    model.load_adapter(model.store.path_for("B"), "B")
    gate = threading.Event()
    load = model.load_adapter

    def slow_load(path, name=None, **kwargs):
        if name == "A":
            assert gate.wait(60), "the test never released the load"
        return load(path, name, **kwargs)

    model.load_adapter = slow_load  # the instance attribute shadows the method: loads of A block on the gate
    scheduler = scheduler_for(model)
    key = BatchKey("translate", 1, 5)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        for_a, for_b = Job(loop, 1), Job(loop, 1)
        scheduler.submit(for_a, [RequestRow(for_a, 0, key, "A", "a1 a2 a3", "en", "de")])
        scheduler.submit(for_b, [RequestRow(for_b, 0, key, "B", "a4 a5", "en", "de")])
        scheduler.start()
        try:
            served_b = await asyncio.wait_for(for_b.future, 60)  # served while A's load is stuck
            assert not for_a.future.done()
            gate.set()
            served_a = await asyncio.wait_for(for_a.future, 60)
        finally:
            gate.set()
            await asyncio.to_thread(scheduler.stop)
        translator = Translator(reference)
        assert served_b == translator.translate(["a4 a5"], "en", "de", adapter="B", num_beams=1, max_new_tokens=5)
        assert served_a == translator.translate(["a1 a2 a3"], "en", "de", adapter="A", num_beams=1,
                                                max_new_tokens=5)

    asyncio.run(scenario())


def test_one_resident_slot_serves_alternating_adapters_without_deadlock(tmp_path):
    model, reference = small_store(tmp_path, max_resident=1)
    scheduler = scheduler_for(model)
    key = BatchKey("translate", 1, 5)
    texts = [f"a{i} a{i + 1}" for i in range(6)]
    names = ["A", "B"] * 3

    async def scenario() -> list[list[str]]:
        loop = asyncio.get_running_loop()
        jobs = [Job(loop, 1) for _ in texts]
        for job, text, name in zip(jobs, texts, names):
            scheduler.submit(job, [RequestRow(job, 0, key, name, text, "en", "de")])
        scheduler.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(job.future for job in jobs)), 120)
        finally:
            await asyncio.to_thread(scheduler.stop)

    served = asyncio.run(scenario())
    translator = Translator(reference)
    for text, name, answer in zip(texts, names, served):
        assert answer == translator.translate([text], "en", "de", adapter=name, num_beams=1, max_new_tokens=5)
    assert scheduler.peak_resident == 1


def test_service_on_an_int8_backbone_answers_as_the_int8_model_in_process(tmp_path):
    """`adaptkit serve --quantize int8`: every family's rows are answered as `ak.load(..., quantize="int8")` answers."""
    pytest.importorskip("torchao")
    backbone, store, _ = build_store(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server([sys.executable, "-m", "adaptkit.cli.serve", "--backbone", str(backbone), "--store",
                            str(store), "--port", str(port), "--quantize", "int8", "--log-level", "warning"],
                           tmp_path / "server.log", url + "/readyz")
    try:
        assert httpx.get(url + "/readyz", timeout=30).json()["quantization"] == "int8"
        reference = ak.load(backbone, store=store, quantize="int8")
        translator = Translator(reference)
        texts = ["a1 a2 a3", "a4 a5", "a6 a7 a8 a9"]
        for name in NAMES[:4]:  # LoRA, AdaLoRA, prefix, bottleneck
            response = httpx.post(url + "/v1/translate", json={"texts": texts, "src_lang": "en", "tgt_lang": "de",
                                                                "adapter": name, **GEN}, timeout=120)
            assert response.status_code == 200, response.text
            assert response.json()["translations"] == translator.translate(texts, "en", "de", adapter=name, **GEN), name
    finally:
        process.terminate()
        process.wait(60)


def test_sigterm_under_load_answers_every_request_or_says_shutting_down_and_exits_0(tmp_path):
    """SIGTERM with 48 requests of 8 texts in flight, one row decoding at a time: the first requests finish
    within the one-second grace (each takes well under it), the rest cannot (all take several times it). Each
    gets its right answer or 503 shutting_down, none is dropped or left hanging, and the process exits 0."""
    import signal

    backbone, store, reference = build_store(tmp_path, NAMES[:2], CONFIGS[:2])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = start_server([sys.executable, "-m", "adaptkit.cli.serve", "--backbone", str(backbone), "--store",
                            str(store), "--port", str(port), "--max-batch", "1", "--shutdown-grace-s", "1",
                            "--log-level", "warning"], tmp_path / "server.log", url + "/readyz")
    rng = random.Random(5)
    bodies = [{"texts": [words(rng) for _ in range(8)], "src_lang": "en", "tgt_lang": "de",
               "adapter": NAMES[i % 2], **GEN} for i in range(48)]

    async def load_then_sigterm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=len(bodies), max_keepalive_connections=len(bodies))
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            sent = [asyncio.ensure_future(client.post("/v1/translate", json=body)) for body in bodies]
            for _ in range(6000):  # every request accepted (counted once queued), then the signal
                metrics = (await client.get("/metrics")).text
                accepted = sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                               if line.startswith("adaptkit_requests_total{"))
                if accepted >= len(bodies):
                    break
                await asyncio.sleep(0.01)
            process.send_signal(signal.SIGTERM)
            return await asyncio.gather(*sent)

    try:
        responses = asyncio.run(load_then_sigterm())
        code = process.wait(60)
    finally:
        if process.poll() is None:
            process.kill()
    translator = Translator(reference)
    answered = 0
    for body, response in zip(bodies, responses):
        if response.status_code == 200:
            answered += 1
            assert response.json()["translations"] == translator.translate(body["texts"], "en", "de",
                                                                            adapter=body["adapter"], **GEN)
        else:
            assert_error(response, 503, "shutting_down")
    assert code == 0, (tmp_path / "server.log").read_text()[-2000:]
    assert 0 < answered < len(bodies)  # in flight at the signal: some finished within the grace, some did not

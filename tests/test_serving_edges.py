"""The service's edges, against a real uvicorn server on 127.0.0.1 (in this process, in a thread).

Clients that never finish — half-sent request heads, bodies a byte at a time, uploads that stall —
at twice the connection cap, while /healthz and a translation still answer; uploads streamed into
the store (a cap on concurrent ones, leftovers of killed uploads cleaned at start-up, long names,
file modes, bad names, NaN or integer weights refused); per-adapter metrics gone with their adapter;
text UTF-8 cannot encode refused in every field; no route answering plain text. Each test is bounded
by the short limits the server runs with (SETTINGS) plus a margin.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

import adaptkit as ak  # noqa: E402
from adaptkit.core.atomicfile import TEMP_OVERHEAD  # noqa: E402
from adaptkit.serving.app import create_app  # noqa: E402
from adaptkit.serving.server import FD_RESERVE, configure_server, connection_cap  # noqa: E402
from adaptkit.serving.settings import ApiError, ServeSettings  # noqa: E402
from adaptkit.tasks.translate import Translator  # noqa: E402
from test_adapterfile import edit_first_float  # noqa: E402
from tiny import random_lora_file, saved_tiny_llama, with_random_adapters  # noqa: E402

SETTINGS = ServeSettings(max_connections=16, header_timeout_s=1.5, body_timeout_s=1.5, min_body_rate=200,
                         keep_alive_s=1.0, max_header_bytes=4096, max_uploads=1, max_wait_ms=0)
CONFIGS = {"en-de/lora": ak.LoRA(r=4, targets="all-linear"), "en-de/bottleneck": ak.Bottleneck(reduction=4)}
GEN = dict(num_beams=1, max_new_tokens=6)
MARGIN_S = 2.5  # scheduling slack on a shared 2-core machine


@dataclass
class Edge:
    url: str
    port: int
    server: object
    app: object
    store: Path
    backbone: Path
    reference: ak.AdaptedModel

    def translate_body(self, adapter: str = "en-de/lora", texts: list[str] | None = None) -> dict:
        return {"texts": texts or ["a1 a2 a3"], "src_lang": "en", "tgt_lang": "de", "adapter": adapter, **GEN}

    def expected(self, adapter: str = "en-de/lora", texts: list[str] | None = None) -> list[str]:
        return Translator(self.reference).translate(texts or ["a1 a2 a3"], "en", "de", adapter=adapter, **GEN)

    def adapter_file(self, tmp_path: Path, name: str = "upload", seed: int = 3) -> Path:
        """A LoRA for this backbone with random weights, saved under `name` in its header."""
        return random_lora_file(self.backbone, tmp_path, name, seed, "uploaded")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_store(root: Path) -> tuple[Path, Path, ak.AdaptedModel]:
    backbone, store = saved_tiny_llama(root / "backbone"), root / "store"
    reference = with_random_adapters(ak.load(backbone, store=store), CONFIGS, 11, 0.5)
    for name in CONFIGS:
        reference.save_adapter(name, src_lang="en", tgt_lang="de", domain=name.split("/")[1])
    return backbone, store, reference


@contextlib.contextmanager
def running(app, settings: ServeSettings):
    """`app` served by `configure_server` in a thread of this process, until the block ends."""
    port = free_port()
    server = configure_server(app, settings, port=port, log_level="critical")
    thread = threading.Thread(target=server.run, name="uvicorn-under-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield server, port
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def edge(tmp_path_factory) -> Edge:
    backbone, store, reference = build_store(tmp_path_factory.mktemp("edges"))
    app = create_app(ak.load(backbone, store=store), settings=SETTINGS)
    with running(app, SETTINGS) as (server, port):
        yield Edge(f"http://127.0.0.1:{port}", port, server, app, store, backbone, reference)


# -- raw sockets ------------------------------------------------------------------------------------

def connect(edge: Edge, first: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", edge.port), timeout=5)
    if first:
        sock.sendall(first)
    return sock


def read_answer(sock: socket.socket, until: float) -> tuple[int | None, dict | None]:
    """What the server writes until it closes the connection: (status, JSON body), or (None, None) for a close
    without an answer. Fails when the connection is still open at time.monotonic() `until`."""
    data = b""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            pytest.fail(f"the server kept the connection open past its deadline; it wrote {data[:300]!r}")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    if not data:
        return None, None
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), data[:300]
    return int(head.split()[1]), json.loads(body)


def open_connections(edge: Edge) -> int:
    return len(edge.server.server_state.connections)  # uvicorn's own count of its live protocols


def wait_for(condition, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    return error


# -- A. connections --------------------------------------------------------------------------------

def test_twice_the_cap_of_half_sent_heads_and_slow_bodies_leave_the_service_answering(edge):
    cap = SETTINGS.max_connections
    started = time.monotonic()
    slow = [connect(edge, b"POST /v1/translate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 400\r\n\r\n{") for _ in range(4)]
    heads = [connect(edge, b"GET /heal") for _ in range(2 * cap)]  # half a request line each
    stop = threading.Event()

    def trickle() -> None:  # a byte at a time: 4 bytes/s, under --min-body-rate
        while not stop.wait(0.25):
            for sock in slow:
                with contextlib.suppress(OSError):
                    sock.send(b" ")

    trickler = threading.Thread(target=trickle, daemon=True)
    trickler.start()
    try:
        wait_for(lambda: open_connections(edge) <= cap, 2, f"more than {cap} connections stayed open")
        health = httpx.get(f"{edge.url}/healthz", timeout=5)
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        answer = httpx.post(f"{edge.url}/v1/translate", json=edge.translate_body(), timeout=30)
        assert answer.status_code == 200, answer.text
        assert answer.json()["translations"] == edge.expected()
        assert open_connections(edge) <= cap
        # every half-sent head is closed: made room for a newcomer (503), or at its header timeout (408)
        for sock in heads:
            status, body = read_answer(sock, started + SETTINGS.header_timeout_s + MARGIN_S)
            assert (status, body and body["error"]["code"]) in {
                (None, None), (503, "too_many_connections"), (408, "header_timeout")}, (status, body)
        for sock in slow:
            status, body = read_answer(sock, started + SETTINGS.body_timeout_s + MARGIN_S)
            assert status == 408 and body["error"]["code"] == "body_timeout", body
            assert body["error"]["limit"] == {"name": "min_body_rate", "value": SETTINGS.min_body_rate}
    finally:
        stop.set()
        trickler.join(5)
        for sock in heads + slow:
            sock.close()
    wait_for(lambda: open_connections(edge) == 0, 2, "connections stayed open after their clients left")


def test_a_head_sent_a_byte_at_a_time_is_cut_at_the_header_timeout(edge):
    sock = connect(edge)
    started = time.monotonic()
    stop = threading.Event()

    def drip() -> None:  # 20 bytes/s of a head that would take a minute
        for byte in b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: " + b"a" * 1200:
            if stop.wait(0.05):
                return
            try:
                sock.send(bytes([byte]))
            except OSError:
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        status, body = read_answer(sock, started + SETTINGS.header_timeout_s + MARGIN_S)
    finally:
        stop.set()
        dripper.join(5)
    assert status == 408 and body["error"]["code"] == "header_timeout", body
    assert time.monotonic() - started >= SETTINGS.header_timeout_s - 0.1


def test_heads_over_the_size_limit_and_bad_http_get_json_errors(edge):
    big = connect(edge, b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * (SETTINGS.max_header_bytes + 10))
    status, body = read_answer(big, time.monotonic() + MARGIN_S)
    assert status == 431 and body["error"]["code"] == "header_too_large", body
    assert body["error"]["limit"] == {"name": "max_header_bytes", "value": SETTINGS.max_header_bytes}
    bad = connect(edge, b"NOT HTTP AT ALL\r\n\r\n")
    status, body = read_answer(bad, time.monotonic() + MARGIN_S)
    assert status == 400 and body["error"]["code"] == "bad_http_request", body


def test_an_idle_keep_alive_connection_closes_after_keep_alive_s(edge):
    sock = connect(edge, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    answered = b""
    while b'"ok"}' not in answered:
        answered += sock.recv(4096)
    assert answered.startswith(b"HTTP/1.1 200")
    idle_from = time.monotonic()
    assert read_answer(sock, idle_from + SETTINGS.keep_alive_s + MARGIN_S) == (None, None)
    assert time.monotonic() - idle_from >= SETTINGS.keep_alive_s - 0.1


def test_the_connection_cap_fits_the_open_file_limit(monkeypatch):
    resource = pytest.importorskip("resource")
    monkeypatch.setattr(resource, "getrlimit", lambda which: (300, 300))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: pytest.fail("raised past the hard limit"))
    assert connection_cap(ServeSettings(max_connections=1024)) == 300 - FD_RESERVE
    raised = []
    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, 1 << 20))
    monkeypatch.setattr(resource, "setrlimit", lambda which, limits: raised.append(limits))
    assert connection_cap(ServeSettings(max_connections=1024)) == 1024
    assert raised == [(1024 + FD_RESERVE, 1 << 20)]  # the soft limit, raised to hold the cap


# -- B. uploads ------------------------------------------------------------------------------------

def scratch_files(store: Path) -> list[Path]:
    return sorted(store.glob(".upload-*.tmp"))


def test_a_stalled_upload_streams_into_the_store_holds_a_slot_and_gets_a_json_408(edge, tmp_path):
    sock = connect(edge, b"POST /v1/adapters?name=stalled/x HTTP/1.1\r\nHost: t\r\nContent-Length: 60000\r\n\r\n"
                   + b"\0" * 1000)
    sent = time.monotonic()
    wait_for(lambda: scratch_files(edge.store), 2, "the upload is not streaming into the store")
    good = edge.adapter_file(tmp_path).read_bytes()
    busy = httpx.post(f"{edge.url}/v1/adapters", params={"name": "other/x"}, content=good, timeout=10)
    assert_error(busy, 503, "uploads_busy")
    assert busy.headers["Retry-After"] == str(SETTINGS.retry_after_s)
    status, body = read_answer(sock, sent + SETTINGS.body_timeout_s + MARGIN_S)
    assert status == 408 and body["error"]["code"] == "body_timeout", body
    wait_for(lambda: not scratch_files(edge.store), 2, "the stalled upload's scratch file stayed")
    assert not (edge.store / "stalled").exists()
    created = httpx.post(f"{edge.url}/v1/adapters", params={"name": "other/x"}, content=good, timeout=30)
    assert created.status_code == 201, created.text  # the slot was given back
    assert httpx.delete(f"{edge.url}/v1/adapters/other/x", timeout=30).status_code == 200


def test_start_up_removes_what_killed_uploads_left_in_the_store(edge, tmp_path):
    store = tmp_path / "store"
    (store / "en-de").mkdir(parents=True)
    left = [store / ".upload-0123abcd.tmp", store / "en-de" / ".lora.safetensors.0123abcd.tmp"]
    for path in left:
        path.write_bytes(b"half an adapter")
    live = store / ".upload-89abcdef.tmp"  # another service's upload, streaming now: kept
    live.write_bytes(b"in progress")
    with open(live, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        app = create_app(ak.load(edge.backbone, store=store), settings=SETTINGS)

        async def start_and_stop() -> None:
            async with app.router.lifespan_context(app):
                pass

        asyncio.run(start_and_stop())
    assert not any(path.exists() for path in left)
    assert live.exists()


def test_a_name_as_long_as_the_store_allows_is_uploaded(edge, tmp_path):
    part = "n" * (os.pathconf(edge.store, "PC_NAME_MAX") - len(".safetensors") - TEMP_OVERHEAD)
    name = f"long/{part}"
    created = httpx.post(f"{edge.url}/v1/adapters", params={"name": name}, content=edge.adapter_file(tmp_path)
                         .read_bytes(), timeout=30)
    assert created.status_code == 201, created.text
    assert (edge.store / "long" / f"{part}.safetensors").is_file()
    too_long = httpx.post(f"{edge.url}/v1/adapters", params={"name": name + "n"}, content=b"x", timeout=10)
    assert_error(too_long, 400, "bad_adapter_name")
    assert httpx.delete(f"{edge.url}/v1/adapters/{name}", timeout=30).status_code == 200


def test_uploaded_files_follow_the_umask_and_a_replaced_file_keeps_its_mode(edge, tmp_path):
    data = edge.adapter_file(tmp_path).read_bytes()
    previous = os.umask(0o027)
    try:
        created = httpx.post(f"{edge.url}/v1/adapters", params={"name": "modes/x"}, content=data, timeout=30)
    finally:
        os.umask(previous)
    assert created.status_code == 201, created.text
    path = edge.store / "modes" / "x.safetensors"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    path.chmod(0o604)
    replaced = httpx.post(f"{edge.url}/v1/adapters", params={"name": "modes/x", "replace": "true"}, content=data,
                          timeout=30)
    assert replaced.status_code == 201, replaced.text
    assert stat.S_IMODE(path.stat().st_mode) == 0o604
    assert httpx.delete(f"{edge.url}/v1/adapters/modes/x", timeout=30).status_code == 200


def test_a_name_whose_folder_is_an_adapter_file_is_a_bad_name_not_a_conflict(edge, tmp_path):
    data = edge.adapter_file(tmp_path).read_bytes()
    refused = httpx.post(f"{edge.url}/v1/adapters", params={"name": "en-de/lora.safetensors/x"}, content=data,
                         timeout=30)
    error = assert_error(refused, 400, "bad_adapter_name")
    assert "en-de/lora.safetensors" in error["message"] and "not a folder" in error["message"]
    assert (edge.store / "en-de" / "lora.safetensors").is_file()


@pytest.mark.parametrize("edit, reason", [(dict(value=float("nan")), "non-finite"),
                                          (dict(value=float("inf")), "non-finite"),
                                          (dict(dtype="I32"), "torch.int32")])
def test_non_finite_or_integer_weights_are_refused_with_the_reason(edge, tmp_path, edit, reason):
    bad = tmp_path / "bad.safetensors"
    edit_first_float(edge.adapter_file(tmp_path), bad, **edit)
    refused = httpx.post(f"{edge.url}/v1/adapters", params={"name": "bad/weights"}, content=bad.read_bytes(),
                         timeout=30)
    assert reason in assert_error(refused, 422, "invalid_adapter_file")["message"]
    assert not (edge.store / "bad").exists() and not scratch_files(edge.store)


# -- C. metrics ------------------------------------------------------------------------------------

def test_a_deleted_adapter_leaves_no_series_in_metrics(edge, tmp_path):
    data = edge.adapter_file(tmp_path).read_bytes()
    with httpx.Client(base_url=edge.url, timeout=30) as client:
        for i in range(20):
            name = f"churn/a{i}"
            assert client.post("/v1/adapters", params={"name": name}, content=data).status_code == 201
            body = {**edge.translate_body(name), "max_new_tokens": 2}
            assert client.post("/v1/translate", json=body).status_code == 200
            assert f'adapter="{name}"' in client.get("/metrics").text
            assert client.delete(f"/v1/adapters/{name}").status_code == 200
        scrape = client.get("/metrics").text
    assert [line for line in scrape.splitlines() if "churn/" in line] == []


# -- D. text UTF-8 cannot encode -------------------------------------------------------------------

def post_json(edge: Edge, path: str, body: dict) -> httpx.Response:
    # json.dumps escapes a lone surrogate as \ud800, as a client would send it (httpx's json= cannot encode it)
    return httpx.post(f"{edge.url}{path}", content=json.dumps(body).encode(),
                      headers={"content-type": "application/json"}, timeout=30)


BAD = "a\ud800b"
CASES = [("/v1/translate", "texts", {"texts": ["fine", BAD]}), ("/v1/translate", "src_lang", {"src_lang": BAD}),
         ("/v1/translate", "tgt_lang", {"tgt_lang": [BAD]}), ("/v1/translate", "domain", {"domain": BAD}),
         ("/v1/translate", "adapter", {"adapter": BAD}),
         ("/v1/generate", "prompts", {"prompts": [BAD]}), ("/v1/generate", "adapter", {"adapter": BAD}),
         ("/v1/generate", "task", {"task": BAD}), ("/v1/generate", "src_lang", {"src_lang": BAD}),
         ("/v1/generate", "tgt_lang", {"tgt_lang": BAD}),
         ("/v1/generate", "prompts", {"prompts": [BAD], "stream": True})]


@pytest.mark.parametrize("path, field, change", CASES, ids=[f"{p[4:]}-{f}-{i}" for i, (p, f, _) in enumerate(CASES)])
def test_a_lone_surrogate_in_any_field_is_a_422_naming_the_field(edge, path, field, change):
    base = (edge.translate_body() if path == "/v1/translate"
            else {"prompts": ["a1 a2"], "adapter": "en-de/lora", "task": "translate", **GEN})
    error = assert_error(post_json(edge, path, {**base, **change}), 422, "invalid_text")
    assert error["message"].startswith(f"{field}: ") and "\\ud800" in error["message"], error
    assert httpx.get(f"{edge.url}/healthz", timeout=5).status_code == 200


def test_an_error_message_holding_unencodable_text_still_renders_as_json(edge, monkeypatch):
    def echoes(src: str, tgt: str, domain: str | None) -> str:  # as the no_adapter_for_pair message once did
        raise ApiError(404, "no_adapter_for_pair", f"no adapter translates {src}{BAD}→{tgt}")

    monkeypatch.setattr(edge.app.state.catalog, "route", echoes)
    body = {"texts": ["a1"], "src_lang": "en", "tgt_lang": "de", **GEN}
    error = assert_error(httpx.post(f"{edge.url}/v1/translate", json=body, timeout=30), 404, "no_adapter_for_pair")
    assert error["message"] == "no adapter translates ena\\ud800b→de"


def test_an_unexpected_exception_is_a_json_500(edge, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(edge.app.state.catalog, "route", broken)
    body = {"texts": ["a1"], "src_lang": "en", "tgt_lang": "de", **GEN}  # routed: no adapter named
    error = assert_error(httpx.post(f"{edge.url}/v1/translate", json=body, timeout=30), 500, "internal_error")
    assert "RuntimeError" in error["message"]

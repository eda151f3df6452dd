"""The playground page (`/`) in a real browser: headless Chromium, Debian's package, driven over the Chrome
DevTools protocol (a websocket; no chromedriver). The service runs a tiny llama with two en→de adapters of
two families behind an API key; the test types the key and a sentence into the page, clicks, and reads the
outputs from the DOM: each adapter's equals /v1/translate, the bare backbone's /v1/generate with `adapter: null`,
streamed and not.

The browser tests skip only where /usr/bin/chromium is missing (`.ci/run` installs it). To rewrite the
screenshot in the docs: `ADAPTKIT_PLAYGROUND_SCREENSHOT=docs/playground.png pytest tests/test_playground.py`.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
httpx = pytest.importorskip("httpx")

import adaptkit as ak  # noqa: E402
from adaptkit.serving.app import create_app  # noqa: E402
from adaptkit.serving.settings import ServeSettings  # noqa: E402
from test_serving_edges import running  # noqa: E402
from tiny import saved_tiny_llama, with_random_adapters  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                    "(apt-get install chromium; .ci/run installs it)")
KEY = "playground-key-0123456789"
# two families; one domain holds markup, which the page must show as text
ADAPTERS = {"en-de/lora": (ak.LoRA(r=4, targets="all-linear"), "software", {"bleu": 31.42, "chrf": 58.1}),
            "en-de/bottleneck": (ak.Bottleneck(reduction=4), "<b>bible</b>", {"bleu": 27.9})}
TEXT = "a3 a14 a7 a21 a5"
MAX_NEW = 6
SETTINGS = ServeSettings(max_wait_ms=0)


@dataclass
class Service:
    url: str

    def call(self, path: str, body: dict) -> dict:
        response = httpx.post(self.url + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30,
                              trust_env=False)
        assert response.status_code == 200, response.text
        return response.json()


@pytest.fixture(scope="module")
def service(tmp_path_factory) -> Iterator[Service]:
    root = tmp_path_factory.mktemp("playground")
    backbone, store = saved_tiny_llama(root / "backbone"), root / "store"
    configs = {name: config for name, (config, _, _) in ADAPTERS.items()}
    model = with_random_adapters(ak.load(backbone, store=store), configs, 5, 0.5)
    for name, (_, domain, metrics) in ADAPTERS.items():
        model.save_adapter(name, src_lang="en", tgt_lang="de", domain=domain, metrics=metrics)
    app = create_app(ak.load(backbone, store=store), settings=SETTINGS, api_keys=[KEY])
    with running(app, SETTINGS) as (_, port):
        yield Service(f"http://127.0.0.1:{port}")


def test_the_page_is_open_its_data_is_not_and_it_loads_nothing_from_elsewhere(service):
    static = resources.files("adaptkit.serving") / "static"
    for path, name, media in [("/", "index.html", "text/html"), ("/playground.js", "playground.js", "text/javascript"),
                              ("/playground.css", "playground.css", "text/css")]:
        response = httpx.get(service.url + path, trust_env=False)
        assert response.status_code == 200 and response.headers["content-type"].startswith(media)
        assert response.content == (static / name).read_bytes()
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert "http://" not in response.text and "https://" not in response.text  # no CDN, no fonts
    script = (static / "playground.js").read_text()
    assert not re.search(r"\.(inner|outer)HTML|insertAdjacentHTML|document\.write", script)  # data goes in as text
    for path in ["/v1/adapters", "/docs", "/openapi.json", "/playground.txt"]:
        response = httpx.get(service.url + path, trust_env=False)
        assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"


# -- the browser -------------------------------------------------------------------------------------------

class Page:
    """One Chromium tab over the DevTools protocol: commands by id, events kept in `events`."""

    def __init__(self, ws):
        self.ws = ws
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 15, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait(self, expression: str, what: str, within: float = 20):
        """Until `expression` is true (an exception, e.g. while the page loads, counts as false)."""
        deadline = time.monotonic() + within
        guarded = f"(() => {{ try {{ return {expression}; }} catch (e) {{ return null; }} }})()"
        while not (value := self.evaluate(guarded)):
            assert time.monotonic() < deadline, f"waited {within} s for {what}"
            time.sleep(0.1)
        return value

    def type(self, selector: str, text: str) -> None:
        """Focus, select what is there, and type over it (as a paste would)."""
        self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.focus(); "
                      "e.select(); })()")
        self.send("Input.insertText", text=text)

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element."""
        x, y = self.evaluate(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                             "e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect(); "
                             "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def text(self, selector: str) -> str:
        return self.evaluate(f"document.querySelector({json.dumps(selector)}).textContent")


@contextlib.contextmanager
def chromium(profile: Path) -> Iterator[Page]:
    """Headless Chromium with a fresh profile, its DevTools on a port it picks (written to DevToolsActivePort)."""
    from websockets.sync.client import connect

    log = (profile.parent / "chromium.log").open("wb")
    process = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
         "--no-proxy-server", "--no-default-browser-check", "--remote-debugging-port=0", f"--user-data-dir={profile}",
         "--window-size=1280,900", "about:blank"], stdout=log, stderr=log, start_new_session=True)
    try:
        active = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 20
        while not (active.exists() and len(active.read_text().split()) == 2):
            assert process.poll() is None, f"chromium exited ({process.returncode}); see {log.name}"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port within 20 s"
            time.sleep(0.05)
        port = int(active.read_text().split()[0])
        while not (pages := [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False,
                                                  timeout=10).json() if t["type"] == "page"]):
            assert time.monotonic() < deadline, "chromium opened no tab within 20 s"
            time.sleep(0.05)
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as ws:
            yield Page(ws)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)  # the group this test started: the browser and its children
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


CARDS = """[...document.querySelectorAll('#outputs .card')].map(c => ({adapter: c.dataset.adapter,
    state: c.dataset.state, via: c.dataset.via || null, output: c.querySelector('.output').textContent,
    error: (c.querySelector('.error') || {}).textContent || null}))"""


@needs_chromium
def test_the_page_translates_with_two_adapters_and_the_bare_backbone_as_the_api_does(service, tmp_path):
    started = time.monotonic()
    expected = {name: service.call("/v1/translate", {"texts": [TEXT], "src_lang": "en", "tgt_lang": "de",
                                                     "adapter": name, "max_new_tokens": MAX_NEW})["translations"][0]
                for name in ADAPTERS}
    expected[""] = service.call("/v1/generate", {"prompts": [TEXT], "adapter": None, "task": "translate",
                                                 "src_lang": "en", "tgt_lang": "de",
                                                 "max_new_tokens": MAX_NEW})["outputs"][0]
    assert len(set(expected.values())) == 3, f"the adapters should answer differently: {expected}"

    with chromium(tmp_path / "profile") as page:
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        page.send("Page.navigate", url=service.url + "/")
        page.wait("document.getElementById('key-note').textContent.includes('needs an API key')",
                  "the page to ask for a key")
        assert page.evaluate("document.querySelectorAll('#adapters tbody tr').length") == 0

        page.type("#key", "not-the-key")
        page.click("#key-save")
        page.wait("document.getElementById('key-note').textContent.includes('refused')", "a wrong key to be refused")
        page.type("#key", KEY)
        page.click("#key-save")
        page.wait("document.querySelectorAll('#adapters tbody tr').length === 2", "the adapters table")
        assert page.evaluate("sessionStorage.getItem('adaptkit.apiKey')") == KEY
        rows = page.evaluate("[...document.querySelectorAll('#adapters tbody tr')].map(r => "
                             "[...r.cells].map(c => c.textContent))")
        by_name = {row[0]: row for row in rows}
        assert by_name["en-de/lora"][1:4] == ["lora", "en → de", "software"]
        assert all(row[5] and row[6].endswith("KiB") for row in rows), rows  # parameters, file size
        assert by_name["en-de/lora"][7] == "bleu 31.42 · chrf 58.10"
        assert by_name["en-de/bottleneck"][1:4] == ["bottleneck", "en → de", "<b>bible</b>"]  # as text
        assert page.evaluate("document.querySelectorAll('#adapters b, #outputs b').length") == 0

        page.type("#source", TEXT)
        page.type("#max-new", str(MAX_NEW))
        for streamed in (True, False):
            if not streamed:
                page.click("#stream")
                assert page.evaluate("document.getElementById('stream').checked") is False
            page.click("#translate")
            page.wait("document.getElementById('outputs').dataset.state === 'done'", "the outputs")
            cards = page.evaluate(CARDS)
            assert cards[0]["adapter"] == "" and sorted(c["adapter"] for c in cards[1:]) == sorted(ADAPTERS)
            for c in cards:
                assert c["state"] == "done", c
                assert c["output"] == expected[c["adapter"]], c
                assert c["via"] == ("stream" if streamed else "translate" if c["adapter"] else "generate"), c
            assert page.evaluate("document.querySelectorAll('#adapters b, #outputs b').length") == 0
            if streamed and (shot := os.environ.get("ADAPTKIT_PLAYGROUND_SCREENSHOT")):
                height = page.evaluate("Math.ceil(document.querySelector('footer').getBoundingClientRect().bottom)")
                page.send("Emulation.setDeviceMetricsOverride", width=1280, height=height, deviceScaleFactor=1,
                          mobile=False)
                Path(shot).write_bytes(base64.b64decode(page.send("Page.captureScreenshot", format="png")["data"]))

        problems = [e for e in page.events if e.get("method") == "Runtime.exceptionThrown"
                    or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["source"] in ("security",
                                                                                                  "javascript"))]
        assert not problems, problems  # no script errors, no Content-Security-Policy violations
    assert time.monotonic() - started < 30

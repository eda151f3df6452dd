"""Chaos for the HTTP service: seeded traffic and store churn, injected faults, and the oracle that judges
every answer. Used by tests/test_serving_chaos.py (tiny llama, uvicorn in-process, tokenizer and load faults)
and benchmarks/serve_soak.py (a zoo backbone, `adaptkit serve` in a subprocess, corrupt and foreign files).

The contract checked (issue 21): every /v1/translate and /v1/generate request ends within its deadline with
either (a) the answer each of its rows gets alone under the adapter version the response names
(`adapter_versions`: per row the sha256 in the header of the file whose weights produced it, null for bare
rows), or (b) a documented JSON error whose code has a cause that held while the request was in flight.

Timing may change which version a row gets or which error a request meets, never whether the outcome is
right: the churn script records what the store held for each adapter name and when (a change lasts from its
start to its end, so both states count meanwhile), and the oracle accepts exactly the outcomes consistent
with some moment of the request's own interval.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.errors import AdapterError

# code -> HTTP status: the errors a request may end with under churn and faults
DOCUMENTED = {"unknown_adapter": 404, "no_adapter_for_pair": 404, "adapter_broken": 500, "generation_failed": 500,
              "invalid_request": 422, "invalid_text": 422, "text_too_long": 422, "queue_full": 503,
              "shutting_down": 503, "request_timeout": 504}
LOAD_CODES = {"queue_full", "request_timeout"}  # about the service's load, not the request: fine at any time
FAILURES = ("hang", "transport", "not_sent", "mixed", "stale", "wrong_route", "answered_bad_row", "undocumented",
            "wrong_cause", "unverified")  # unverified: a 200 without adapter_versions
SURROGATE = "\ud800"  # a lone surrogate: JSON can carry it (as an escape), UTF-8 and tokenizers cannot
INF = math.inf


# -- what is sent ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdapterSpec:
    name: str
    src: str
    tgt: str
    domain: str


@dataclass(frozen=True)
class RowSpec:
    kind: str  # "translate" | "generate"
    text: str
    adapter: str | None  # the adapter the row must run with (None: the bare backbone)
    by_pair: bool = False  # translate rows routed by (src, tgt, domain) instead of named
    src: str = "en"
    tgt: str = "de"
    domain: str | None = None
    task: str | None = None  # generate rows
    beams: int = 1
    max_new: int = 6
    marker: bool = False  # carries the word the tokenizer is made to raise on (in-process faults)
    surrogate: bool = False  # bad input: a lone surrogate


@dataclass
class RequestSpec:
    id: int
    client: int
    rows: list[RowSpec]

    @property
    def route(self) -> str:
        return "/v1/" + self.rows[0].kind

    def body(self) -> dict[str, Any]:
        rows, first = self.rows, self.rows[0]

        def col(attr: str) -> Any:
            values = [getattr(r, attr) for r in rows]
            return values[0] if all(v == values[0] for v in values) else values

        body: dict[str, Any] = {"src_lang": col("src"), "tgt_lang": col("tgt"), "num_beams": first.beams,
                                "max_new_tokens": first.max_new}
        if first.kind == "translate":
            body["texts"] = [r.text for r in rows]
            body["domain" if first.by_pair else "adapter"] = col("domain" if first.by_pair else "adapter")
        else:
            body.update(prompts=[r.text for r in rows], adapter=col("adapter"), task=col("task"))
        return body

    def describe(self) -> str:
        first = self.rows[0]
        how = "generate" if first.kind == "generate" else "translate/" + ("pair" if first.by_pair else "name")
        flags = "".join(f" +{f}" for f in ("marker", "surrogate") if any(getattr(r, f) for r in self.rows))
        names = ",".join(r.adapter or "bare" for r in self.rows)
        return f"#{self.id} c{self.client} {how} beams={first.beams} [{names}]{flags}"


class RequestMaker:
    """Seeded requests of 1..max_rows rows: translations routed by pair or by name, and generations (some of
    them on the bare backbone), greedy or with 2 beams; a few rows carry `marker` or (beam rows only) a lone
    surrogate."""

    def __init__(self, adapters: Sequence[AdapterSpec], texts: Sequence[str], *, max_new: Sequence[int] = (6,),
                 max_rows: int = 3, beam_share: float = 0.25, bare_share: float = 0.15, marker: str | None = None,
                 marker_share: float = 0.0, surrogate_share: float = 0.0, tasks: Sequence[str] = ("style", "dialogue")):
        self.adapters, self.texts, self.max_new, self.max_rows = list(adapters), list(texts), list(max_new), max_rows
        self.beam_share, self.bare_share, self.tasks = beam_share, bare_share, list(tasks)
        self.marker, self.marker_share, self.surrogate_share = marker, marker_share, surrogate_share

    def __call__(self, rng: random.Random, id: int, client: int) -> RequestSpec:
        how = rng.choices(["pair", "name", "generate"], weights=[35, 35, 30])[0]
        beams = 2 if rng.random() < self.beam_share else 1
        max_new = rng.choice(self.max_new)
        task = rng.choice(self.tasks)
        rows = []
        for _ in range(rng.randint(1, self.max_rows)):
            adapter = rng.choice(self.adapters)
            text = rng.choice(self.texts)
            marker = self.marker is not None and rng.random() < self.marker_share
            surrogate = beams > 1 and rng.random() < self.surrogate_share
            if marker:
                text = f"{text} {self.marker}"
            if surrogate:
                cut = len(text) // 2
                text = f"{text[:cut]}{SURROGATE}{text[cut:]}"
            common = dict(src=adapter.src, tgt=adapter.tgt, beams=beams, max_new=max_new, marker=marker,
                          surrogate=surrogate)
            if how == "generate":
                name = None if rng.random() < self.bare_share else adapter.name
                rows.append(RowSpec("generate", text, name, task=task, **common))
            else:
                rows.append(RowSpec("translate", text, adapter.name, by_pair=how == "pair",
                                    domain=adapter.domain if how == "pair" else None, **common))
        return RequestSpec(id, client, rows)


@dataclass
class Result:
    spec: RequestSpec
    t0: float
    t1: float
    status: int | None  # None: no answer
    payload: Any = None  # the JSON answer, else its text
    problem: str | None = None  # why there is no answer

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0


async def send(client: httpx.AsyncClient, spec: RequestSpec, timeout: float) -> Result:
    body = json.dumps(spec.body()).encode()  # ASCII JSON: a lone surrogate travels as its escape
    t0 = time.monotonic()
    try:
        response = await client.post(spec.route, content=body, headers={"content-type": "application/json"},
                                     timeout=timeout)
    except httpx.TimeoutException:
        return Result(spec, t0, time.monotonic(), None, problem=f"no answer within {timeout:g} s")
    except httpx.TransportError as error:
        return Result(spec, t0, time.monotonic(), None, problem=f"{type(error).__name__}: {error}"[:200])
    try:
        payload = response.json()
    except ValueError:
        payload = response.text
    return Result(spec, t0, time.monotonic(), response.status_code, payload)


# -- what the store held, and when ---------------------------------------------------------------------------
@dataclass
class Segment:
    state: str  # "ok" | "absent" | "corrupt" (the header cannot be read) | "faulty" (readable, its loads fail)
    sha: str | None
    start: float  # from the start of the change that wrote it
    end: float = INF  # to the end of the change that replaced it (what the store file says)
    bank_end: float = INF  # "ok": to the end of the next change made through the API; a file changed behind the
    #                        service's back may go on being served from memory until then


def observe(path: Path, faulty: set[str]) -> tuple[str, str | None]:
    """What the store file at `path` is now."""
    if not path.exists():
        return "absent", None
    try:
        sha = read_adapter_info(path)["sha256"]
    except AdapterError:
        return "corrupt", None
    return ("faulty" if sha in faulty else "ok"), sha


class Timeline:
    def __init__(self) -> None:
        self.segments: dict[str, list[Segment]] = {}

    def record(self, name: str, state: tuple[str, str | None], began: float, ended: float, api: bool) -> None:
        segments = self.segments.setdefault(name, [])
        if segments and (segments[-1].state, segments[-1].sha) == state:
            return  # no change (a refused or failed change)
        if api:
            for segment in segments:
                if segment.state == "ok" and segment.bank_end == INF:
                    segment.bank_end = ended
        if segments:
            segments[-1].end = ended
        segments.append(Segment(state[0], state[1], began))

    def current(self, name: str) -> Segment | None:
        segments = self.segments.get(name)
        return segments[-1] if segments else None

    def during(self, name: str, t0: float, t1: float) -> list[Segment]:
        return [s for s in self.segments.get(name, ()) if s.start <= t1 and s.end >= t0]

    def served(self, name: str, t0: float, t1: float) -> list[str]:
        """Versions a row of `name` in flight over [t0, t1] may have run under."""
        return [s.sha for s in self.segments.get(name, ()) if s.state == "ok" and s.start <= t1 and s.bank_end >= t0]


# -- the store churn -----------------------------------------------------------------------------------------
class Churn:
    """A seeded script of store changes: through the API (replace with other weights, delete, upload) and behind
    its back (a corrupt file, or a readable file whose loads fail, written straight into the store)."""

    def __init__(self, seed: int, store: Path, path_for: Callable[[str], Path], good: dict[str, list[Path]],
                 faulty: dict[str, list[Path]], faulty_shas: set[str], timeline: Timeline, scratch: Path,
                 timeout: float = 60.0):
        self.rng = random.Random(seed)
        self.store, self.path_for, self.good, self.faulty = store, path_for, good, faulty
        self.faulty_shas, self.timeline, self.scratch, self.timeout = faulty_shas, timeline, scratch, timeout
        self.done: Counter[str] = Counter()
        self.failures: list[str] = []
        self.log: list[str] = []
        scratch.mkdir(parents=True, exist_ok=True)

    def start(self) -> None:
        for name in self.good:
            self.timeline.record(name, observe(self.path_for(name), self.faulty_shas), -INF, -INF, api=False)

    async def step(self, client: httpx.AsyncClient) -> None:
        rng = self.rng
        names = sorted(self.good)
        away = [n for n in names if (self.timeline.current(n) or Segment("absent", None, 0)).state != "ok"]
        name = rng.choice(away if away and rng.random() < 0.5 else names)  # what is away comes back soon
        now = self.timeline.current(name)
        state = now.state if now else "absent"
        others = [p for p in self.good[name] if read_adapter_info(p)["sha256"] != (now.sha if now else None)]
        if state == "absent":
            await self._api(client, "upload", name, rng.choice(others))
        elif state in ("corrupt", "faulty"):
            if rng.random() < 0.7:
                await self._api(client, "replace", name, rng.choice(others))
            else:
                await self._api(client, "delete", name)
        else:
            op = rng.choices(["replace", "delete", "corrupt", "faulty"], weights=[45, 20, 15, 20])[0]
            if op in ("replace", "delete"):
                await self._api(client, op, name, rng.choice(others) if op == "replace" else None)
            elif op == "faulty" and self.faulty.get(name):
                self._plant("faulty", name, rng.choice(self.faulty[name]).read_bytes())
            else:
                data = bytearray(rng.choice(self.good[name]).read_bytes())
                if rng.random() < 0.5:
                    data[len(data) - 1 - rng.randrange(len(data) // 3)] ^= 0x55  # a flipped bit: checksum mismatch
                else:
                    del data[len(data) // 2:]  # truncated
                self._plant("corrupt", name, bytes(data))

    async def _api(self, client: httpx.AsyncClient, op: str, name: str, source: Path | None = None) -> None:
        began = time.monotonic()
        try:
            if op == "delete":
                response = await client.delete(f"/v1/adapters/{name}", timeout=self.timeout)
                expected = 200
            else:
                response = await client.post("/v1/adapters", params={"name": name, "replace": str(op == "replace")
                                                                     .lower()},
                                             content=source.read_bytes() if source else b"", timeout=self.timeout,
                                             headers={"content-type": "application/octet-stream"})
                expected = 201
            problem = None if response.status_code == expected else f"{response.status_code} {response.text[:120]}"
        except httpx.HTTPError as error:
            problem = f"{type(error).__name__}: {error}"[:160]
        ended = time.monotonic()
        state = observe(self.path_for(name), self.faulty_shas)
        self.timeline.record(name, state, began, ended, api=True)
        what = f"{op} {name}" + (f" <- {source.name}" if source else "")
        self.log.append(f"{what}: {problem or 'ok'}")
        if problem:
            self.failures.append(f"{what}: {problem}")
        else:
            self.done[op] += 1

    def _plant(self, kind: str, name: str, data: bytes) -> None:
        target = self.path_for(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.scratch / f"plant-{os.getpid()}-{len(self.log)}"
        tmp.write_bytes(data)
        began = time.monotonic()
        os.replace(tmp, target)  # the whole file at once, as an operator's `mv` would
        self.timeline.record(name, observe(target, self.faulty_shas), began, time.monotonic(), api=False)
        self.log.append(f"plant {kind} {name}")
        self.done[f"plant_{kind}"] += 1


# -- references and the oracle -------------------------------------------------------------------------------
class References:
    """Each row alone through the path the service runs it on (`Translator` / `Generator`, static, a batch of
    one) on a model of its own, every adapter version loaded under a name of its own; cached per
    (kind, version, text, settings). `allow()` (optional) says whether one more may be computed (a budget)."""

    def __init__(self, model: Any, files: dict[str, tuple[str, Path]], allow: Callable[[], bool] | None = None):
        from adaptkit.tasks.generate import Generator
        from adaptkit.tasks.translate import Translator

        self.model, self.files, self.allow = model, files, allow
        self.translator = Translator(model, batch_size=1, continuous=False)
        self.generator = Generator(model, batch_size=1, continuous=False)
        self.cache: dict[tuple, str] = {}
        self._loaded: dict[str, str] = {}
        self.computed = 0

    def name_of(self, sha: str) -> str | None:
        return self.files[sha][0] if sha in self.files else None

    def answer(self, row: RowSpec, sha: str | None) -> str | None:
        key = (row.kind, sha, row.text, row.beams, row.max_new, row.src, row.tgt, row.task)
        if key in self.cache:
            return self.cache[key]
        if self.allow is not None and not self.allow():
            return None
        route = None
        if sha is not None:
            route = self._loaded.get(sha)
            if route is None:
                route = self._loaded[sha] = self.model.load_adapter(self.files[sha][1], f"ref-{sha[:16]}")
        if row.kind == "translate":
            out = self.translator.translate([row.text], row.src, row.tgt, adapter=[route], num_beams=row.beams,
                                            max_new_tokens=row.max_new)[0]
        else:
            out = self.generator.generate([row.text], adapter=[route], task=[row.task], src_lang=[row.src],
                                          tgt_lang=[row.tgt], num_beams=row.beams, max_new_tokens=row.max_new)[0]
        self.computed += 1
        self.cache[key] = out
        return out


@dataclass
class Verdict:
    outcome: str  # "ok" | "error" (documented, with a cause) | one of FAILURES
    detail: str = ""
    checked: bool = True  # a 200 whose every row was compared with its reference


class Oracle:
    """Judges each result against the timeline and the references. `poison`: a word whose generated token the
    served tokenizer raises on when decoding one row's ids (greedy rows of the continuous batch)."""

    def __init__(self, timeline: Timeline, refs: References, poison: str | None = None):
        self.timeline, self.refs, self.poison = timeline, refs, poison

    def judge(self, result: Result) -> Verdict:
        if result.status is None:
            kind = "not_sent" if result.problem == "not sent" else (
                "hang" if (result.problem or "").startswith("no answer") else "transport")
            return Verdict(kind, result.problem or "")
        if result.status == 200:
            return self._answer(result)
        payload = result.payload
        error = payload.get("error") if isinstance(payload, dict) else None
        code = error.get("code") if isinstance(error, dict) else None
        message = (error.get("message") or "") if isinstance(error, dict) else str(payload)
        if code not in DOCUMENTED or DOCUMENTED[code] != result.status:
            return Verdict("undocumented", f"{result.status} {code or ''}: {message}"[:240])
        if code in LOAD_CODES:
            return Verdict("error", code)
        causes = self.causes(result, code)
        if code in causes:
            return Verdict("error", code)
        return Verdict("wrong_cause", f"{result.status} {code} (causes then: {sorted(causes) or 'none'}): "
                                      f"{message}"[:240])

    def causes(self, result: Result, code: str) -> set[str]:
        """The error codes some row of the request had a cause for while it was in flight."""
        out: set[str] = set()
        t0, t1 = result.t0, result.t1
        for row in result.spec.rows:
            if row.marker:
                out.add("generation_failed")
            if row.surrogate:
                out |= {"invalid_text", "invalid_request", "generation_failed"}
            if row.adapter is not None:
                states = {s.state for s in self.timeline.during(row.adapter, t0, t1)}
                if "absent" in states:
                    out |= {"unknown_adapter", "no_adapter_for_pair"} if row.by_pair else {"unknown_adapter"}
                if states & {"corrupt", "faulty"}:
                    out.add("adapter_broken")
                if row.by_pair and states & {"corrupt", "faulty"}:
                    out.add("no_adapter_for_pair")  # a file that fails its checks may route nothing
            if code == "generation_failed" and code not in out and self._poisoned(row, t0, t1):
                out.add("generation_failed")
        return out

    def _poisoned(self, row: RowSpec, t0: float, t1: float) -> bool:
        if self.poison is None or row.beams != 1 or row.marker or row.surrogate:
            return False
        versions = [None] if row.adapter is None else self.timeline.served(row.adapter, t0, t1)
        return any(self.poison in (self.refs.answer(row, v) or "").split() for v in versions)

    def _answer(self, result: Result) -> Verdict:
        rows, payload = result.spec.rows, result.payload
        bad = [i for i, r in enumerate(rows) if r.marker or r.surrogate]
        if bad:
            return Verdict("answered_bad_row", f"row {bad[0]} ({'marker' if rows[bad[0]].marker else 'surrogate'}) "
                                               "was answered 200")
        field_name = "translations" if rows[0].kind == "translate" else "outputs"
        outputs = payload.get(field_name) if isinstance(payload, dict) else None
        names = payload.get("adapters") if isinstance(payload, dict) else None
        if not isinstance(outputs, list) or len(outputs) != len(rows) or not isinstance(names, list):
            return Verdict("undocumented", f"200 without {len(rows)} {field_name} and adapters: {str(payload)[:160]}")
        for i, row in enumerate(rows):
            if names[i] != row.adapter:
                return Verdict("wrong_route", f"row {i} ran with {names[i]!r}, not {row.adapter!r}")
        versions = payload.get("adapter_versions")
        t0, t1 = result.t0, result.t1
        if not isinstance(versions, list) or len(versions) != len(rows):
            # Without the field nothing can be verified; say whether each row matches some version it could
            # have run under (else it is mixed for sure).
            for i, row in enumerate(rows):
                candidates = [None] if row.adapter is None else self.timeline.served(row.adapter, t0, t1)
                answers = [self.refs.answer(row, v) for v in candidates]
                if None not in answers and outputs[i] not in answers:
                    return Verdict("mixed", f"row {i}: {outputs[i]!r} is the answer of none of "
                                            f"{len(candidates)} version(s) of {row.adapter} (no adapter_versions)")
            return Verdict("unverified", "no adapter_versions in the answer")
        checked = True
        for i, row in enumerate(rows):
            version = versions[i]
            if row.adapter is None:
                if version is not None:
                    return Verdict("mixed", f"row {i} is bare but names version {str(version)[:12]}")
            elif self.refs.name_of(version) != row.adapter:
                return Verdict("mixed", f"row {i} names {str(version)[:12]}, no version of {row.adapter}")
            elif version not in self.timeline.served(row.adapter, t0, t1):
                return Verdict("stale", f"row {i}: {row.adapter}@{version[:12]} was not in the bank while the "
                                        "request was in flight")
            reference = self.refs.answer(row, version)
            if reference is None:
                checked = False
            elif outputs[i] != reference:
                return Verdict("mixed", f"row {i} {row.adapter or 'bare'}@{str(version)[:12]}: {outputs[i]!r}, "
                                        f"alone: {reference!r}")
        return Verdict("ok", checked=checked)


def summarize(results: Sequence[Result], verdicts: Sequence[Verdict], first: int = 6) -> tuple[Counter, str]:
    """(counts per outcome, a short report: the counts, documented error codes, the first failures)."""
    counts = Counter(v.outcome for v in verdicts)
    codes = Counter(v.detail for v in verdicts if v.outcome == "error")
    failed = [(r, v) for r, v in zip(results, verdicts) if v.outcome in FAILURES]
    # the first failure of each kind, then the next ones in order
    shown = [next(f for f in failed if f[1].outcome == kind) for kind in FAILURES if counts[kind]]
    shown += [f for f in failed if f not in shown][:max(0, first - len(shown))]
    head = (f"{len(results)} requests: ok {counts['ok']}, documented errors {counts['error']} "
            f"{dict(sorted(codes.items()))}; failures: "
            + (", ".join(f"{k} {counts[k]}" for k in FAILURES if counts[k]) or "none"))
    lines = [head] + [f"  {r.spec.describe()}: {v.outcome}: {v.detail}"[:300] for r, v in shown]
    return counts, "\n".join(lines)


# -- faults inside the process (the test's service runs in-process) ------------------------------------------
@dataclass
class Faults:
    fired: Counter = field(default_factory=Counter)


def inject_tokenizer_faults(tokenizer: Any, marker: str, poison_id: int, faults: Faults) -> None:
    """The served tokenizer raises while encoding a text that contains `marker`, and while decoding one row's
    written ids (a list: the continuous batch's stop rule and answer) that contain `poison_id`."""
    encode, decode = tokenizer._encode_plus, tokenizer.decode

    def faulty_encode(*args: Any, **kwargs: Any) -> Any:
        text = kwargs.get("text", args[0] if args else None)
        texts = [text] if isinstance(text, str) else list(text or ())
        if any(isinstance(t, str) and marker in t for t in texts):
            faults.fired["encode"] += 1
            raise RuntimeError(f"injected fault: the tokenizer refuses {marker!r}")
        return encode(*args, **kwargs)

    def faulty_decode(token_ids: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(token_ids, list) and poison_id in token_ids and all(isinstance(t, int) for t in token_ids):
            faults.fired["decode"] += 1
            raise RuntimeError(f"injected fault: the tokenizer cannot decode token {poison_id}")
        return decode(token_ids, *args, **kwargs)

    tokenizer._encode_plus = faulty_encode  # instance attributes shadow the methods
    tokenizer.decode = faulty_decode


def inject_load_faults(model: Any, shas: set[str], faults: Faults) -> None:
    """`model.load_adapter` raises for files whose checksum is in `shas` (readable files, refused at load)."""
    load = model.load_adapter

    def faulty_load(path: Any, name: str | None = None, **kwargs: Any) -> Any:
        try:
            sha = read_adapter_info(path, verify=False)["sha256"]
        except AdapterError:
            sha = None
        if sha in shas:
            faults.fired["load"] += 1
            raise AdapterError(f"injected fault: the load of {name!r} fails")
        return load(path, name, **kwargs)

    model.load_adapter = faulty_load


# -- driving ---------------------------------------------------------------------------------------------------
class Progress:
    """Completed requests; the churn waits on it, so its changes land between requests, not on a clock."""

    def __init__(self) -> None:
        self.done = 0
        self.stopped = False
        self._cond = asyncio.Condition()

    async def tick(self) -> None:
        async with self._cond:
            self.done += 1
            self._cond.notify_all()

    async def stop(self) -> None:
        async with self._cond:
            self.stopped = True
            self._cond.notify_all()

    async def wait_for(self, n: int) -> bool:
        async with self._cond:
            await self._cond.wait_for(lambda: self.done >= n or self.stopped)
            return not self.stopped


async def drive(url: str, plans: Sequence[Sequence[RequestSpec]], churn: Churn | None, churn_steps: int,
                timeout: float, headers: dict[str, str] | None = None) -> list[Result]:
    """One closed-loop client per plan; `churn_steps` churn steps spread evenly over the completed requests.
    After the first request without an answer no new request is sent (the rest are `not_sent`): bounded."""
    results: list[Result] = []
    progress = Progress()
    total = sum(len(plan) for plan in plans)
    limits = httpx.Limits(max_connections=len(plans) + 4, max_keepalive_connections=len(plans) + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits, headers=headers or {}) as client:
        async def run_client(plan: Sequence[RequestSpec]) -> None:
            for spec in plan:
                if progress.stopped:
                    now = time.monotonic()
                    results.append(Result(spec, now, now, None, problem="not sent"))
                    continue
                result = await send(client, spec, timeout)
                results.append(result)
                if result.status is None and (result.problem or "").startswith("no answer"):
                    await progress.stop()  # a hang: stop sending, so the run stays bounded
                await progress.tick()

        async def run_churn() -> None:
            every = max(1, total // (churn_steps + 1))
            for k in range(churn_steps):
                if not await progress.wait_for((k + 1) * every):
                    return
                await churn.step(client)

        churning = asyncio.ensure_future(run_churn()) if churn is not None and churn_steps else None
        await asyncio.gather(*(run_client(plan) for plan in plans))
        await progress.stop()
        if churning is not None:
            await churning
    return sorted(results, key=lambda r: r.spec.id)


def scratch_files(store: Path, expected: set[Path]) -> list[str]:
    """Files in the store that are no adapter of the script's names (temp copies, partial uploads)."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p not in expected)

"""The inference routes, once, for every way of running them: /v1/translate, /v1/generate, GET /v1/adapters.

Checking a request (limits, per-row fields, generation settings) and choosing each row's adapter
(named, or routed by the store's src_lang / tgt_lang / domain) happen here; running the rows is the
`submit` a service passes in. The single-process app (`app.py`) submits them to its scheduler; the
Ray Serve ingress (`serving/ray/ingress.py`) sends each adapter's rows to a replica that holds it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import FastAPI, Request

from adaptkit.core import routing
from adaptkit.core.errors import AdapterError
from adaptkit.serving.catalog import AdapterCatalog, BadAdapterName, Entry, store_path
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.schemas import (
    AdapterInfo,
    AdapterList,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Timings,
    TranslateRequest,
    TranslateResponse,
)
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import BatchKey, Job
from adaptkit.tasks.generate import TASKS

if TYPE_CHECKING:
    from adaptkit.serving.scheduler import Scheduler

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": what} for status, what in {
        400: "Bad JSON or an adapter name that cannot be stored",
        401: "Missing or wrong API key",
        404: "Unknown adapter, or no adapter for the language pair",
        413: "Body over the size limit",
        422: "Invalid request: a field, a limit (number of texts, text length, beams, new tokens), an adapter file",
        500: "An adapter in the store cannot be loaded, or generation failed",
        503: "Queue full (with Retry-After) or not ready",
    }.items()
}


class Submit(Protocol):
    """Run one request's rows (row i: texts[i] with adapters[i]); call `accepted()` once they are queued (so
    refused requests are not counted); return the outputs in row order, the version (file checksum) of the
    adapter that produced each, and the request's timings."""

    def __call__(self, request: Request, key: BatchKey, texts: list[str], adapters: list[str | None],
                 srcs: list[str] | None, tgts: list[str] | None, tasks: list[str] | None,
                 accepted: Callable[[], None]) -> Awaitable[tuple[list[str], list[str | None], dict[str, Any]]]: ...


def add_inference_routes(app: FastAPI, catalog: AdapterCatalog, settings: ServeSettings, metrics: ServeMetrics,
                         submit: Submit, stream: Callable[..., Awaitable[Any]] | None = None) -> None:
    """/v1/translate and /v1/generate on `app`, rows run by `submit`; `"stream": true` requests by `stream`
    (`serving/streaming.py`), where the service has one."""

    async def known_adapter(name: str) -> str:
        try:
            store_path(catalog.store, name)
        except BadAdapterName as error:
            raise ApiError(400, "bad_adapter_name", str(error)) from None
        entry = catalog.get(name) or await asyncio.to_thread(catalog.refresh_one, name)
        if entry is None:
            raise ApiError(404, "unknown_adapter", f"no adapter named {name!r} in the store; GET /v1/adapters "
                                                   "lists them")
        if entry.error is not None:
            raise ApiError(500, "adapter_broken", f"adapter {name!r} in the store cannot be loaded: {entry.error}")
        return name

    def check_texts(texts: Sequence[str], field: str) -> None:
        if not texts:
            raise ApiError(422, "no_texts", f"'{field}' is empty; send at least one")
        if len(texts) > settings.max_texts:
            raise ApiError(422, "too_many_texts", f"{len(texts)} {field} in one request; the limit is "
                           f"{settings.max_texts} (--max-texts): split the request",
                           limit=("max_texts", settings.max_texts))
        for i, text in enumerate(texts):
            if len(text) > settings.max_text_chars:
                raise ApiError(422, "text_too_long", f"{field}[{i}] has {len(text)} characters; the limit is "
                               f"{settings.max_text_chars} (--max-text-chars)",
                               limit=("max_text_chars", settings.max_text_chars))

    def generation(num_beams: int | None, max_new_tokens: int | None, kind: str) -> BatchKey:
        beams = num_beams or settings.default_num_beams
        new = max_new_tokens or settings.default_max_new_tokens
        if beams > settings.max_beams:
            raise ApiError(422, "num_beams_too_large", f"num_beams={beams}; the limit is {settings.max_beams}",
                           limit=("max_beams", settings.max_beams))
        if new > settings.max_new_tokens_limit:
            raise ApiError(422, "max_new_tokens_too_large", f"max_new_tokens={new}; the limit is "
                           f"{settings.max_new_tokens_limit} (--max-new-tokens-limit)",
                           limit=("max_new_tokens_limit", settings.max_new_tokens_limit))
        return BatchKey(kind, beams, new)  # type: ignore[arg-type]

    async def serve(request: Request, route: str, key: BatchKey, texts: list[str], adapters: list[str | None],
                    srcs: list[str] | None = None, tgts: list[str] | None = None,
                    tasks: list[str] | None = None) -> tuple[list[str], list[str | None], Timings]:
        request.state.adapters = sorted({a for a in adapters if a is not None}) or [""]

        def accepted() -> None:
            for adapter in request.state.adapters:
                metrics.requests.labels(route, adapter).inc()

        outputs, versions, timings = await submit(request, key, texts, adapters, srcs, tgts, tasks, accepted)
        return outputs, versions, Timings(**timings)

    @app.post("/v1/translate", response_model=TranslateResponse, responses=ERRORS)
    async def translate(body: TranslateRequest, request: Request) -> TranslateResponse:
        """Translate texts; each row goes to the adapter whose file header has its src_lang / tgt_lang /
        domain (or to the adapter named). Rows of many requests share one generate call."""
        n = len(body.texts)
        check_texts(body.texts, "texts")
        srcs = per_row(body.src_lang, n, "src_lang")
        tgts = per_row(body.tgt_lang, n, "tgt_lang")
        domains = per_row(body.domain, n, "domain")
        key = generation(body.num_beams, body.max_new_tokens, "translate")
        if body.adapter is not None:
            adapters = [await known_adapter(a) for a in per_row(body.adapter, n, "adapter")]
        else:
            adapters = [catalog.route(s, t, d) for s, t, d in zip(srcs, tgts, domains)]
            if None in adapters:  # a file may have been copied into the store since the last scan
                await asyncio.to_thread(catalog.refresh)
                adapters = [catalog.route(s, t, d) for s, t, d in zip(srcs, tgts, domains)]
            missing = [i for i, a in enumerate(adapters) if a is None]
            if missing:
                i = missing[0]
                raise ApiError(404, "no_adapter_for_pair",
                               f"no adapter in the store translates {srcs[i]}→{tgts[i]}"
                               + (f" (domain {domains[i]!r})" if domains[i] else "")
                               + f" (texts[{i}]); pairs served: {_pairs(catalog)}")
        outputs, versions, timings = await serve(request, "/v1/translate", key, body.texts, adapters, srcs, tgts)
        return TranslateResponse(translations=outputs, adapters=adapters, adapter_versions=versions, timings=timings)

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={**ERRORS, 200: {"description": "JSON, or server-sent events with stream: true",
                                         "content": {"text/event-stream": {}}}})
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        """Generate with style, dialogue (or translation) adapters; each row is prompted for its task, by
        default the task in its adapter's file. `adapter: null` is the bare backbone (then give `task`)."""
        n = len(body.prompts)
        check_texts(body.prompts, "prompts")
        key = generation(body.num_beams, body.max_new_tokens, "generate")
        adapters = [None if a is None else await known_adapter(a) for a in per_row(body.adapter, n, "adapter")]
        tasks = per_row(body.task, n, "task")
        srcs, tgts = per_row(body.src_lang, n, "src_lang"), per_row(body.tgt_lang, n, "tgt_lang")
        for i, adapter in enumerate(adapters):
            info = (catalog.get(adapter).info or {}) if adapter is not None else {}
            tasks[i] = tasks[i] or info.get("task")
            if tasks[i] not in TASKS:
                raise ApiError(422, "no_task" if tasks[i] is None else "unknown_task",
                               f"prompts[{i}] has task {tasks[i]!r}"
                               + (f" (adapter {adapter!r} names none)" if adapter else "")
                               + f"; give task = one of {list(TASKS)}")
            srcs[i] = srcs[i] or info.get("src_lang") or "en"
            tgts[i] = tgts[i] or info.get("tgt_lang") or srcs[i]
        if body.stream:
            if stream is None:
                raise ApiError(422, "stream_unsupported", "this deployment does not stream (Ray Serve); drop stream")
            if n != 1 or key.num_beams != 1:
                raise ApiError(422, "stream_one_greedy_prompt", f"stream takes one prompt with num_beams 1 (got {n} "
                               f"prompts, num_beams {key.num_beams}): beam search knows its output only at the end")
            request.state.adapters = [adapters[0] or ""]
            return await stream(request, key, body.prompts[0], adapters[0], srcs[0], tgts[0], tasks[0])
        outputs, versions, timings = await serve(request, "/v1/generate", key, body.prompts, adapters, srcs, tgts,
                                                 tasks)
        return GenerateResponse(outputs=outputs, adapters=adapters, adapter_versions=versions, timings=timings)


def add_listing_route(app: FastAPI, catalog: AdapterCatalog, resident: Callable[[], set[str]],
                      max_resident: int | None) -> None:
    """GET /v1/adapters: the store's adapters and which of them `resident()` says are in memory."""

    @app.get("/v1/adapters", response_model=AdapterList, responses=ERRORS)
    async def list_adapters() -> AdapterList:
        """Every adapter in the store (method, languages, domain, size, metrics), and which are resident."""
        await asyncio.to_thread(catalog.refresh)
        now = resident()
        entries = catalog.entries()
        return AdapterList(adapters=[adapter_info(e, e.name in now) for e in entries],
                           resident=[e.name for e in entries if e.name in now], max_resident=max_resident)


def per_row(value: Any, n: int, field: str) -> list:
    """`core.routing.per_row` (the rule of Translator and Generator too), its length error a 422."""
    try:
        return routing.per_row(value, n, field)
    except AdapterError as error:
        raise ApiError(422, "per_row_length", str(error)) from None


def _pairs(catalog: AdapterCatalog) -> str:
    pairs = sorted({f"{e.info.get('src_lang')}→{e.info.get('tgt_lang')}"
                    + (f" ({e.info['domain']})" if e.info.get("domain") else "")
                    for e in catalog.entries() if e.info and e.info.get("src_lang") and e.info.get("tgt_lang")})
    return ", ".join(pairs) or "none"


def adapter_info(entry: Entry, resident: bool) -> AdapterInfo:
    info = entry.info or {}
    return AdapterInfo(name=entry.name, method=info.get("method"), task=info.get("task"),
                       src_lang=info.get("src_lang"), tgt_lang=info.get("tgt_lang"), domain=info.get("domain"),
                       num_parameters=info.get("num_parameters"), file_bytes=info.get("file_bytes"),
                       metrics=info.get("metrics"), resident=resident, error=entry.error)


async def await_answer(request: Request, job: Job, scheduler: Scheduler, timeout_s: float) -> list[str]:
    """A submitted request's answers; past `timeout_s` (504 request_timeout) or once its client is gone (499),
    its rows are dropped: waiting ones leave the queue, running ones the continuous batch at its next step."""
    watcher = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({job.future, watcher}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        client_left = watcher.done()
    except asyncio.CancelledError:
        scheduler.cancel(job)
        raise
    finally:
        watcher.cancel()
    if not job.future.done():
        scheduler.cancel(job)
        job.future.cancel()
        if not client_left:
            raise ApiError(504, "request_timeout", f"no answer within {timeout_s:g} s (--request-timeout-s); its "
                           "rows were dropped. Retry, or ask for fewer or shorter texts")
        raise ApiError(499, "client_closed_request", "the client disconnected; its waiting rows were dropped")
    return job.future.result()


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

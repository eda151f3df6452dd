"""The HTTP face: `create_app(model, store, settings)` → a FastAPI app; `adaptkit serve` runs it in uvicorn.

    POST   /v1/translate        texts + language pair (+ domain, or an adapter) → translations
    POST   /v1/generate         prompts + adapter → outputs (style, dialogue adapters)
    GET    /v1/adapters         what the store holds, and what is resident
    POST   /v1/adapters?name=   upload one .safetensors adapter (raw body); checked, then written atomically
    DELETE /v1/adapters/{name}
    GET    /healthz (open) · /readyz · /metrics (Prometheus)

Every error is JSON: {"error": {"code", "message", "limit"?}} — see docs/serving.md for the codes.
With API keys, every route but /healthz needs `Authorization: Bearer <key>`. Request limits (body,
number of texts, text length, generation settings) are checked before anything is tokenised.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from adaptkit.core.adapterfile import AdapterStore
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.serving.catalog import AdapterCatalog, BadAdapterName, Entry, store_path
from adaptkit.serving.guard import Guard, add_error_handlers
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.schemas import (
    AdapterInfo,
    AdapterList,
    Deleted,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Health,
    Ready,
    Timings,
    TranslateRequest,
    TranslateResponse,
)
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import BatchKey, Job, Row
from adaptkit.tasks.generate import TASKS

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


def create_app(model: AdaptedModel, store: str | Path | AdapterStore | None = None,
               settings: ServeSettings | None = None, *, api_keys: Sequence[str] = ()) -> FastAPI:
    """A service over `model` and the adapter store (`store`, else `model.store`). With `api_keys`
    (see `load_api_keys`), every route but /healthz needs `Authorization: Bearer <one of them>`."""
    settings = settings or ServeSettings()
    if store is not None:
        model.store = store if isinstance(store, AdapterStore) else AdapterStore(store)
    if model.store is None:
        raise AdapterError("the service needs an adapter store: create_app(model, store='adapters/') "
                           "or ak.load(..., store='adapters/')")
    catalog = AdapterCatalog(model.store)
    metrics = ServeMetrics()
    scheduler = Scheduler(model, catalog, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(catalog.refresh)
        scheduler.start()
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="adaptkit", summary="Translations and generations from many adapters over one backbone",
                  version=_version(), lifespan=lifespan)
    app.state.model, app.state.catalog, app.state.scheduler = model, catalog, scheduler
    app.state.metrics, app.state.settings = metrics, settings
    app.add_middleware(Guard, settings=settings, metrics=metrics, api_keys=tuple(api_keys))
    add_error_handlers(app, metrics)

    # -- helpers bound to this app -------------------------------------------------------------
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
                    tasks: list[str] | None = None) -> tuple[list[str], Job]:
        request.state.adapters = sorted({a for a in adapters if a is not None}) or [""]
        job = Job(asyncio.get_running_loop(), len(texts))
        rows = [Row(job, i, key, adapters[i], texts[i], srcs[i] if srcs else None, tgts[i] if tgts else None,
                    tasks[i] if tasks else None) for i in range(len(texts))]
        scheduler.submit(job, rows)
        for adapter in request.state.adapters:
            metrics.requests.labels(route, adapter).inc()
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            scheduler.cancel(job)
            raise
        finally:
            watcher.cancel()
        if not job.future.done():
            scheduler.cancel(job)
            job.future.cancel()
            raise ApiError(499, "client_closed_request", "the client disconnected; its waiting rows were dropped")
        return job.future.result(), job

    # -- routes ----------------------------------------------------------------------------------
    @app.post("/v1/translate", response_model=TranslateResponse, responses=ERRORS)
    async def translate(body: TranslateRequest, request: Request) -> TranslateResponse:
        """Translate texts; each row goes to the adapter whose file header has its src_lang / tgt_lang /
        domain (or to the adapter named). Rows of many requests share one generate call."""
        n = len(body.texts)
        check_texts(body.texts, "texts")
        srcs = _per_row(body.src_lang, n, "src_lang")
        tgts = _per_row(body.tgt_lang, n, "tgt_lang")
        domains = _per_row(body.domain, n, "domain")
        key = generation(body.num_beams, body.max_new_tokens, "translate")
        if body.adapter is not None:
            adapters = [await known_adapter(a) for a in _per_row(body.adapter, n, "adapter")]
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
        outputs, job = await serve(request, "/v1/translate", key, body.texts, adapters, srcs, tgts)
        return TranslateResponse(translations=outputs, adapters=adapters, timings=Timings(**job.timings()))

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(body: GenerateRequest, request: Request) -> GenerateResponse:
        """Generate with style, dialogue (or translation) adapters; each row is prompted for its task, by
        default the task in its adapter's file. `adapter: null` is the bare backbone (then give `task`)."""
        n = len(body.prompts)
        check_texts(body.prompts, "prompts")
        key = generation(body.num_beams, body.max_new_tokens, "generate")
        adapters = [None if a is None else await known_adapter(a) for a in _per_row(body.adapter, n, "adapter")]
        tasks = _per_row(body.task, n, "task")
        srcs, tgts = _per_row(body.src_lang, n, "src_lang"), _per_row(body.tgt_lang, n, "tgt_lang")
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
        outputs, job = await serve(request, "/v1/generate", key, body.prompts, adapters, srcs, tgts, tasks)
        return GenerateResponse(outputs=outputs, adapters=adapters, timings=Timings(**job.timings()))

    @app.get("/v1/adapters", response_model=AdapterList, responses=ERRORS)
    async def list_adapters() -> AdapterList:
        """Every adapter in the store (method, languages, domain, size, metrics), and which are resident."""
        await asyncio.to_thread(catalog.refresh)
        resident = set(model.adapters)
        entries = catalog.entries()
        return AdapterList(adapters=[_info(e, e.name in resident) for e in entries],
                           resident=[e.name for e in entries if e.name in resident], max_resident=model.max_resident)

    @app.post("/v1/adapters", status_code=201, response_model=AdapterInfo, responses={**ERRORS, 409: {
        "model": ErrorBody, "description": "An adapter of that name exists (pass replace=true)"}},
        openapi_extra={"requestBody": {"required": True, "description": "The adapter file, as is",
                                       "content": {"application/octet-stream": {
                                           "schema": {"type": "string", "format": "binary"}}}}})
    async def upload_adapter(request: Request,
                             name: str | None = Query(None, description="Store name, e.g. en-de/software; "
                                                      "default: the name in the file's header"),
                             replace: bool = Query(False, description="Replace an adapter of the same name")
                             ) -> AdapterInfo:
        """Upload one adapter file. It is checked like `load_adapter` (format, checksum, backbone
        fingerprint, tensor shapes) before anything is written; then written into the store atomically."""
        if name is not None:
            try:
                store_path(catalog.store, name)
            except BadAdapterName as error:
                raise ApiError(400, "bad_adapter_name", str(error)) from None
        data = await request.body()
        if not data:
            raise ApiError(422, "empty_upload", "the body is empty; send the .safetensors file as the raw body")
        try:
            entry = await scheduler.call_exclusive(lambda: catalog.install(model, data, name, replace))
        except BadAdapterName as error:
            raise ApiError(400, "bad_adapter_name", str(error)) from None
        except FileExistsError:
            raise ApiError(409, "adapter_exists", f"an adapter named {name!r} is in the store; pass replace=true "
                                                  "to replace it") from None
        except AdapterError as error:
            raise ApiError(422, "invalid_adapter_file", f"the file was refused, nothing was written: {error}") from None
        return _info(entry, entry.name in model.adapters)

    @app.delete("/v1/adapters/{name:path}", response_model=Deleted, responses=ERRORS)
    async def delete_adapter(name: str) -> Deleted:
        """Remove an adapter from the bank (after the calls using it) and its file from the store."""
        try:
            await scheduler.call_exclusive(lambda: catalog.delete(model, name))
        except BadAdapterName as error:
            raise ApiError(400, "bad_adapter_name", str(error)) from None
        except FileNotFoundError:
            raise ApiError(404, "unknown_adapter", f"no adapter named {name!r} in the store") from None
        return Deleted(deleted=name)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The process answers (no key needed)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, responses=ERRORS)
    async def readyz() -> Ready:
        """The backbone is loaded and the worker runs."""
        if not scheduler.alive:
            raise ApiError(503, "not_ready", "the scheduler is not running (starting or stopping)")
        return Ready(status="ready", backbone=model.backbone_id, family=model.family,
                     adapters_in_store=len(catalog.entries()), resident=len(model.adapters))

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    return app


# -- pieces --------------------------------------------------------------------------------------

def _per_row(value: Any, n: int, field: str) -> list:
    if isinstance(value, list):
        if len(value) != n:
            raise ApiError(422, "per_row_length", f"'{field}' has {len(value)} entries for {n} texts; give one per "
                                                  "text or a single value")
        return value
    return [value] * n


def _pairs(catalog: AdapterCatalog) -> str:
    pairs = sorted({f"{e.info.get('src_lang')}→{e.info.get('tgt_lang')}"
                    + (f" ({e.info['domain']})" if e.info.get("domain") else "")
                    for e in catalog.entries() if e.info and e.info.get("src_lang") and e.info.get("tgt_lang")})
    return ", ".join(pairs) or "none"


def _info(entry: Entry, resident: bool) -> AdapterInfo:
    info = entry.info or {}
    return AdapterInfo(name=entry.name, method=info.get("method"), task=info.get("task"),
                       src_lang=info.get("src_lang"), tgt_lang=info.get("tgt_lang"), domain=info.get("domain"),
                       num_parameters=info.get("num_parameters"), file_bytes=info.get("file_bytes"),
                       metrics=info.get("metrics"), resident=resident, error=entry.error)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body was read already, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _version() -> str:
    try:
        return importlib.metadata.version("adaptkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0+unknown"

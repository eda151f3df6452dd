"""The HTTP face: `create_app(model, store, settings)` → a FastAPI app; `adaptkit serve` runs it in uvicorn.

    POST   /v1/translate        texts + language pair (+ domain, or an adapter) → translations
    POST   /v1/generate         prompts + adapter → outputs (style, dialogue adapters)
    GET    /v1/adapters         what the store holds, and what is resident
    POST   /v1/adapters?name=   upload one .safetensors adapter (raw body), or a tar of a peft adapter directory;
                                checked, then written atomically
    DELETE /v1/adapters/{name}
    GET    /healthz (open) · /readyz · /metrics (Prometheus)
    the OpenAI API: /v1/models, /v1/completions, /v1/chat/completions, /v1/(un)load_lora_adapter (openai_routes.py)
    GET    /  the playground page (its static files are open; every call it makes sends the user's key)

Every error is JSON: {"error": {"code", "message", "limit"?}} — see docs/serving.md for the codes.
With API keys, every route but /healthz and the playground's static files needs `Authorization: Bearer <key>`.
Request limits (body, number of texts, text length, generation settings) are checked before anything is tokenised.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response

from adaptkit.core.adapterfile import AdapterStore
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.serving.catalog import AdapterCatalog, AdapterExists, BadAdapterName
from adaptkit.serving.guard import Guard, add_error_handlers
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.openai_routes import add_openai_routes
from adaptkit.serving.pefttar import PeftTarError, TarLimits, UnpackedTooLarge, looks_like_tar
from adaptkit.serving.playground import add_playground
from adaptkit.serving.routes import ERRORS, adapter_info, add_inference_routes, add_listing_route, await_answer
from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.schemas import AdapterInfo, Deleted, ErrorBody, Health, Ready
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.streaming import Streams
from adaptkit.serving.uploads import Uploads, clean_scratch
from adaptkit.serving.work import BatchKey, Job, RequestRow
from adaptkit.tasks.generate import Generator


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
    limits = TarLimits(settings.max_unpacked_bytes, settings.max_tar_members)
    metrics = ServeMetrics()
    scheduler = Scheduler(model, catalog, settings, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # uploads stream into the store; what a killed one left there goes before anything reads the store
        app.state.uploads = Uploads(catalog.store.root, settings)
        await asyncio.to_thread(clean_scratch, catalog.store.root)
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

    async def submit(request: Request, key: BatchKey, texts: list[str], adapters: list[str | None],
                     srcs: list[str] | None, tgts: list[str] | None, tasks: list[str] | None,
                     accepted: Callable[[], None]) -> tuple[list[str], list[str | None], dict[str, Any]]:
        job = Job(asyncio.get_running_loop(), len(texts))
        rows = [RequestRow(job, i, key, adapters[i], texts[i], srcs[i] if srcs else None,
                           tgts[i] if tgts else None, tasks[i] if tasks else None) for i in range(len(texts))]
        scheduler.submit(job, rows)
        accepted()
        outputs = await await_answer(request, job, scheduler, settings.request_timeout_s)
        return outputs, list(job.versions), job.timings()

    add_inference_routes(app, catalog, settings, metrics, submit,
                         Streams(Generator(model), settings, metrics, scheduler))
    add_listing_route(app, catalog, lambda: set(model.adapters), model.max_resident)
    add_openai_routes(app, model, catalog, scheduler, settings, metrics)  # /v1/models, /v1/completions, ...
    add_playground(app)

    # -- changing the store ----------------------------------------------------------------------
    @app.post("/v1/adapters", status_code=201, response_model=AdapterInfo, responses={**ERRORS, 409: {
        "model": ErrorBody, "description": "An adapter of that name exists (pass replace=true)"}},
        openapi_extra={"requestBody": {"required": True, "description": "The adapter file, as is; or a peft "
                                       "adapter directory as a tar (plain or gzip), told by its content",
                                       "content": {kind: {"schema": {"type": "string", "format": "binary"}}
                                                   for kind in ("application/octet-stream", "application/x-tar")}}})
    async def upload_adapter(request: Request,
                             name: str | None = Query(None, description="Store name, e.g. en-de/software; "
                                                      "default: the name in the file's header"),
                             replace: bool = Query(False, description="Replace an adapter of the same name")
                             ) -> AdapterInfo:
        """Upload one adapter file, streamed into the store (never held in memory). It is checked like
        `load_adapter` (format, checksum, backbone fingerprint, tensor shapes and dtypes, finite values)
        before it takes the name; then moved into place atomically. A tar (plain or gzip) is a peft adapter
        directory (LoRA, AdaLoRA, prefix tuning): unpacked within limits, converted to an adaptkit file,
        then checked and installed the same way; its name defaults to the tar's top folder."""
        try:
            if name is not None:
                catalog.installable(name)
        except BadAdapterName as error:
            raise ApiError(400, "bad_adapter_name", str(error)) from None
        # `converted`: a tar's converted scratch file, removed when the upload ends (AsyncExitStack: sync ones too)
        async with request.app.state.uploads.receive(request) as path, contextlib.AsyncExitStack() as converted:
            try:
                if await asyncio.to_thread(looks_like_tar, path, request.headers.get("content-type")):
                    # unpacked and converted off the event loop, into a scratch file that `converted` removes
                    stack, path, name = await asyncio.to_thread(_converted_tar, catalog, model, path, name, limits)
                    converted.enter_context(stack)
                # the name is settled before the scheduler is asked: it drains and unloads that adapter
                name = name if name is not None else await asyncio.to_thread(catalog.name_in_file, path)
                entry = await scheduler.call_exclusive(lambda: catalog.install(model, path, name, replace),
                                                       changes=name)
            except BadAdapterName as error:
                raise ApiError(400, "bad_adapter_name", str(error)) from None
            except AdapterExists:
                raise ApiError(409, "adapter_exists", f"an adapter named {name!r} is in the store; pass "
                                                      "replace=true to replace it") from None
            except UnpackedTooLarge as error:
                raise ApiError(413, "unpacked_too_large", f"the tar was refused, nothing was written: {error}",
                               limit=("max_unpacked_bytes", settings.max_unpacked_bytes)) from None
            except PeftTarError as error:
                raise ApiError(422, "invalid_peft_tar", f"the tar was refused, nothing was written: {error}"
                               ) from None
            except AdapterError as error:
                raise ApiError(422, "invalid_adapter_file", f"the file was refused, nothing was written: "
                                                            f"{error}") from None
        return adapter_info(entry, entry.name in model.adapters)

    @app.delete("/v1/adapters/{name:path}", response_model=Deleted, responses=ERRORS)
    async def delete_adapter(name: str) -> Deleted:
        """Remove an adapter from the bank (after the calls using it) and its file from the store."""
        try:
            await scheduler.call_exclusive(lambda: catalog.delete(name), changes=name)
        except BadAdapterName as error:
            raise ApiError(400, "bad_adapter_name", str(error)) from None
        except FileNotFoundError:
            raise ApiError(404, "unknown_adapter", f"no adapter named {name!r} in the store") from None
        metrics.forget_adapter(name)  # its per-adapter series would otherwise stay in /metrics for ever
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
                     adapters_in_store=len(catalog.entries()), resident=len(model.adapters),
                     quantization=(model.quantization or {}).get("scheme"))

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    return app


def _converted_tar(catalog: AdapterCatalog, model: AdaptedModel, tar: Path, name: str | None, limits: TarLimits
                   ) -> tuple[contextlib.ExitStack, Path, str]:
    """`catalog.converted_peft_tar` entered in a worker thread, handed back open with the stack that closes it. A
    request cancelled meanwhile drops the stack, and the generator's clean-up removes the scratch file."""
    with contextlib.ExitStack() as stack:
        path, name = stack.enter_context(catalog.converted_peft_tar(model, tar, name, limits))
        return stack.pop_all(), path, name


def _version() -> str:
    try:
        return importlib.metadata.version("adaptkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0+unknown"

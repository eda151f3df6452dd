"""The Ray Serve ingress: the single-process service's HTTP API, with rows sent to replicas by adapter.

Requests are checked and routed exactly as in `adaptkit serve` (the same `routes.py`): a row gets
the adapter it names, or the one the store's headers give its language pair and domain. The rows of
each adapter then go to the replica deployment as one call with `multiplexed_model_id=<adapter>`, so
Ray sends them to a replica that holds that adapter; the replica batches them with other adapters'
rows. The ingress holds no model, only the store's headers (a copy of the files when the store is a
URL). Each replica answer carries that replica's own counts; GET /v1/replicas shows the latest.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from adaptkit.serving.catalog import AdapterCatalog, Entry
from adaptkit.serving.guard import Guard, add_error_handlers
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.routes import ERRORS, add_inference_routes, add_listing_route, client_gone
from adaptkit.serving.schemas import Health, Ready
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.sharedstore import SharedStore
from adaptkit.serving.work import BatchKey


class SharedCatalog(AdapterCatalog):
    """The catalog of a shared store: a remote store is copied before its headers are read."""

    def __init__(self, shared: SharedStore):
        super().__init__(shared.local)
        self.shared = shared

    def refresh(self) -> None:
        self.shared.sync()
        super().refresh()

    def refresh_one(self, name: str) -> Entry | None:
        with contextlib.suppress(FileNotFoundError):
            self.shared.fetch(name)
        return super().refresh_one(name)


class ReplicaLedger:
    """The newest snapshot of each replica's counts, from the answers that came through this ingress."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[str, Any]] = {}

    def record(self, snapshot: dict[str, Any]) -> None:
        known = self.snapshots.get(snapshot["replica"])
        if known is None or snapshot["seq"] > known["seq"]:
            self.snapshots[snapshot["replica"]] = snapshot

    def resident(self) -> set[str]:
        return {name for snapshot in self.snapshots.values() for name in snapshot["resident"]}


def create_ingress_app(store: str, settings: ServeSettings, replicas: Callable[[], Any], *,
                       adapters_per_replica: int, api_keys: Sequence[str] = (),
                       route_by_adapter: bool = True) -> FastAPI:
    """The ingress app; `replicas()` gives the replica deployment's handle (looked up once, at first use).
    `route_by_adapter=False` sends rows to any replica, with the adapter's name in the call instead."""
    shared = SharedStore(store)
    catalog = SharedCatalog(shared)
    metrics = ServeMetrics()
    ledger = ReplicaLedger()
    handle: list[Any] = []

    def replica_handle() -> Any:
        if not handle:
            handle.append(replicas())
        return handle[0]

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(catalog.refresh)
        yield

    app = FastAPI(title="adaptkit (Ray Serve)", summary="Translations and generations from many adapters, "
                  "multiplexed over replicas of one backbone", lifespan=lifespan)
    app.state.catalog, app.state.ledger, app.state.metrics = catalog, ledger, metrics
    app.add_middleware(Guard, settings=settings, metrics=metrics, api_keys=tuple(api_keys))
    add_error_handlers(app, metrics)

    async def submit(request: Request, key: BatchKey, texts: list[str], adapters: list[str | None],
                     srcs: list[str] | None, tgts: list[str] | None, tasks: list[str] | None,
                     accepted: Callable[[], None]) -> tuple[list[str], list[str | None], dict[str, Any]]:
        started = time.perf_counter()
        groups: dict[str, list[int]] = {}
        for i, adapter in enumerate(adapters):
            groups.setdefault(adapter or "", []).append(i)
        runner = replica_handle()
        calls = {}
        for name, indices in groups.items():
            rows = [{"text": texts[i], "src_lang": srcs[i] if srcs else None, "tgt_lang": tgts[i] if tgts else None,
                     "task": tasks[i] if tasks else None} for i in indices]
            if route_by_adapter:
                calls[name] = runner.options(multiplexed_model_id=name).run.remote(asdict(key), rows)
            else:
                calls[name] = runner.run.remote(asdict(key), rows, name)
        accepted()
        answers = await _gather(request, calls)
        outputs: list[str] = [""] * len(texts)
        versions: list[str | None] = [None] * len(texts)
        timings = {"queue_ms": 0.0, "compute_ms": 0.0, "batches": 0}
        for name, answer in answers.items():
            ledger.record(answer["replica"])
            if "error" in answer:
                raise _api_error(answer["error"])
            for i, text, version in zip(groups[name], answer["outputs"], answer["versions"]):
                outputs[i], versions[i] = text, version
            timings["queue_ms"] = max(timings["queue_ms"], answer["timings"]["queue_ms"])
            timings["compute_ms"] += answer["timings"]["compute_ms"]
            timings["batches"] += answer["timings"]["batches"]
        timings["total_ms"] = round(1000 * (time.perf_counter() - started), 2)
        timings["compute_ms"] = round(timings["compute_ms"], 2)
        return outputs, versions, timings

    add_inference_routes(app, catalog, settings, metrics, submit)
    add_listing_route(app, catalog, ledger.resident, adapters_per_replica)

    @app.get("/v1/replicas")
    async def replica_counts() -> dict[str, Any]:
        """Each replica's own counts as of its latest answer: requests, hits (served without waiting for a
        load), loads, unloads, resident adapters, peak resident, batches (and those mixing adapters)."""
        return {"adapters_per_replica": adapters_per_replica,
                "replicas": [ledger.snapshots[r] for r in sorted(ledger.snapshots)]}

    @app.api_route("/v1/adapters", methods=["POST"], responses=ERRORS, include_in_schema=False)
    @app.api_route("/v1/adapters/{name:path}", methods=["DELETE"], responses=ERRORS, include_in_schema=False)
    async def change_store() -> None:
        raise ApiError(405, "store_is_shared", f"on Ray the adapter store ({store}) is shared by every replica and "
                       "changed there, not through the service: copy .safetensors files into it (or delete them); "
                       "replicas load an adapter when it is first asked for")

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """The ingress answers (no key needed)."""
        return Health(status="ok")

    @app.get("/readyz", response_model=Ready, responses=ERRORS)
    async def readyz() -> Ready:
        """A replica answers."""
        try:
            info = await replica_handle().ready.remote()
        except Exception as error:  # noqa: BLE001 — any failure to reach a replica means not ready
            raise ApiError(503, "not_ready", f"no replica answers: {type(error).__name__}: {error}") from None
        return Ready(status="ready", adapters_in_store=len(catalog.entries()), **info)

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    async def prometheus_metrics() -> Response:
        """Prometheus text format: the ingress's requests, errors and latencies (batches are counted per replica)."""
        payload, content_type = metrics.render()
        return Response(payload, media_type=content_type)

    return app


async def _gather(request: Request, calls: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every replica answer, or: the client went away (the calls are cancelled), or a replica failed."""
    answers = asyncio.gather(*(_answer(call) for call in calls.values()))
    watcher = asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({watcher, answers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not answers.done():
        for call in calls.values():
            call.cancel()
        answers.cancel()
        raise ApiError(499, "client_closed_request", "the client disconnected; its rows were cancelled")
    return dict(zip(calls, answers.result()))


async def _answer(call: Any) -> dict[str, Any]:
    try:
        return await call
    except Exception as error:  # noqa: BLE001 — a replica that died or refused: the client gets 503
        raise ApiError(503, "replica_unavailable", f"a replica failed to answer ({type(error).__name__}: {error}); "
                       "retry", headers={"Retry-After": "1"}) from None


def _api_error(error: dict[str, Any]) -> ApiError:
    limit = error.get("limit")
    return ApiError(error["status"], error["code"], error["message"],
                    limit=(limit["name"], limit["value"]) if limit else None, headers=error.get("headers") or {})

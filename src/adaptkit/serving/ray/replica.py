"""What one Ray Serve replica does, without Ray: a backbone, a bank fed from the shared store, the scheduler.

    ingress ──rows of adapter X, multiplexed_model_id=X──▶ replica (Ray routes X to a replica that holds X)
                                                            │ adapter(X): Ray's LRU of K names ─▶ load X into the bank
                                                            │   (evicting its least recently used name first)
                                                            └▶ Scheduler: rows of every resident adapter, one generate

Ray's multiplexing decides which K adapters a replica holds: the `@serve.multiplexed` method (in
`deployment.py`) calls `load`, which returns a `Resident`; when Ray's LRU drops a name it awaits that
object's `__del__`, which waits until no request in this replica still uses the adapter and then
removes it from the bank. Ray runs loads and unloads one at a time and unloads before it loads, so
the bank never holds more than K. A request holds its adapter (`Resident.enter`) from the moment Ray
hands it over until its rows are answered, so the scheduler never sees a row whose adapter is gone and
never loads one itself: every load is Ray's, and counted here.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import torch

from adaptkit.core.bank import load
from adaptkit.core.errors import AdapterError
from adaptkit.serving.catalog import AdapterCatalog
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.sharedstore import SharedStore
from adaptkit.serving.work import BatchKey, Job, RequestRow


class Resident:
    """An adapter Ray's multiplexing keeps in this replica; counts the requests using it."""

    def __init__(self, core: ReplicaCore, name: str):
        self.core, self.name = core, name
        self.users = 0
        self.evicting = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Ray's LRU awaits `model.__del__()` on eviction. An instance attribute, not a method: the garbage
        # collector looks `__del__` up on the class and so never calls this coroutine function un-awaited.
        self.__del__ = self._unload

    def enter(self) -> None:
        self.users += 1
        self._idle.clear()

    def leave(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._idle.set()

    async def _unload(self) -> None:
        self.evicting = True  # before the first await: a request that gets this object now asks Ray again
        if self.core.residents.get(self.name) is self:
            del self.core.residents[self.name]
        await self._idle.wait()
        await self.core.unload(self.name)


class ReplicaCore:
    """One replica's state. `load` is the body of the multiplexed loader, `run` the request handler."""

    def __init__(self, backbone: str, store: str, settings: ServeSettings, max_adapters: int, *,
                 replica_id: str = "local", dtype: str | None = None, device: str | None = None,
                 quantize: str | None = None, torch_threads: int | None = None, cache: str | Path | None = None):
        if torch_threads:  # several replicas on one node: one BLAS pool each would oversubscribe the cores
            torch.set_num_threads(torch_threads)
        self.replica_id = replica_id
        self.store = SharedStore(store, cache)
        self.model = load(backbone, store=self.store.local.root, max_resident=max_adapters, dtype=dtype,
                          device=device, quantize=quantize)
        self.max_adapters = max_adapters
        self.metrics = ServeMetrics()
        self.scheduler = Scheduler(self.model, AdapterCatalog(self.model.store), settings, self.metrics)
        self.scheduler.start()
        self.residents: dict[str, Resident] = {}
        self._loading: dict[str, asyncio.Future[Resident]] = {}
        self.loads = self.unloads = self.requests = self.hits = 0
        self.peak_resident = 0
        self._seq = itertools.count(1)

    # -- the multiplexed loader's side --------------------------------------------------------------
    async def load(self, name: str) -> Resident:
        """Bring `name` from the shared store into the bank (Ray has made room already)."""
        try:
            path = await asyncio.to_thread(self.store.fetch, name)
        except FileNotFoundError:
            raise ApiError(404, "unknown_adapter", f"no adapter named {name!r} in the store") from None
        except AdapterError as error:
            raise ApiError(400, "bad_adapter_name", str(error)) from None

        def into_bank() -> None:  # on the scheduler's loader thread, between its batches' bookkeeping
            self.model.load_adapter(path, name)
            self.peak_resident = max(self.peak_resident, len(self.model.adapters))

        try:
            await self.scheduler.call_exclusive(into_bank)
        except AdapterError as error:
            raise ApiError(500, "adapter_broken", f"adapter {name!r} in the store cannot be loaded: {error}") from None
        self.loads += 1
        resident = self.residents[name] = Resident(self, name)
        return resident

    async def unload(self, name: str) -> None:
        # Through the scheduler, the one owner of the bank: it stops admitting the adapter's rows, waits for its
        # running rows, then takes it out (the store's file stays: `fn` does nothing).
        await self.scheduler.call_exclusive(lambda: None, changes=name)
        self.unloads += 1

    # -- requests ------------------------------------------------------------------------------
    async def run(self, name: str, adapter: Callable[[str], Awaitable[Resident]], key: dict[str, Any],
                  rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Rows of one request that share adapter `name` ('' = the bare backbone), as plain data; the
        answer is plain data too ({"outputs", "timings", "replica"} or {"error"}), so no exception type
        has to cross process boundaries."""
        self.requests += 1
        try:
            resident = None
            if name:
                self.hits += name in self.residents  # served without waiting for a load
                resident = await self._hold(name, adapter)
            try:
                outputs, versions, timings = await self._generate(name or None, BatchKey(**key), rows)
            finally:
                if resident is not None:
                    resident.leave()
        except ApiError as error:
            return {"error": {"status": error.status, **error.body()["error"], "headers": error.headers},
                    "replica": self.stats()}
        return {"outputs": outputs, "versions": versions, "timings": timings, "replica": self.stats()}

    async def _hold(self, name: str, adapter: Callable[[str], Awaitable[Resident]]) -> Resident:
        """The adapter resident and held by this request (rows of a held adapter are never evicted under them).

        Requests that find `name` missing share one call into Ray's loader: Ray queues loads one at a
        time, and a request queued behind loads of other adapters would otherwise find `name` evicted
        again by then and load it once more — one load per request instead of one per adapter."""
        while True:
            if name in self.residents:
                resident = await adapter(name)  # Ray's LRU hit: marks it most recently used
            else:
                loading = self._loading.get(name)
                if loading is None:
                    loading = self._loading[name] = asyncio.ensure_future(adapter(name))
                    loading.add_done_callback(lambda _: self._loading.pop(name, None))
                resident = await asyncio.shield(loading)
            if not resident.evicting:  # no await between this check and enter(): eviction cannot slip in
                resident.enter()
                return resident

    async def _generate(self, adapter: str | None, key: BatchKey,
                        rows: list[dict[str, Any]]) -> tuple[list[str], list[str | None], dict[str, Any]]:
        job = Job(asyncio.get_running_loop(), len(rows))
        self.scheduler.submit(job, [RequestRow(job, i, key, adapter, r["text"], r.get("src_lang"), r.get("tgt_lang"),
                                               r.get("task")) for i, r in enumerate(rows)])
        try:
            outputs = await job.future
        except asyncio.CancelledError:  # the ingress gave up on it (its client went away)
            self.scheduler.cancel(job)
            raise
        return outputs, list(job.versions), job.timings()

    def stats(self) -> dict[str, Any]:
        """This replica's own counts; `seq` orders snapshots of one replica."""
        sample = self.metrics.registry.get_sample_value
        batches = sample("adaptkit_batch_adapters_count") or 0
        single = sample("adaptkit_batch_adapters_bucket", {"le": "1.0"}) or 0
        return {"replica": self.replica_id, "seq": next(self._seq), "requests": self.requests, "hits": self.hits,
                "loads": self.loads, "unloads": self.unloads, "resident": self.model.adapters,
                "peak_resident": max(self.peak_resident, self.scheduler.peak_resident),
                "scheduler_loads": int(sample("adaptkit_adapter_loads_total", {"outcome": "ok"}) or 0),
                "batches": int(batches), "mixed_batches": int(batches - single)}

    def stop(self) -> None:
        self.scheduler.stop()

"""Batching across adapters: a bounded queue of rows, one worker thread that owns `generate`, one loader.

    event loop ──submit(rows)──▶ pending rows (bounded: full → 503) ──▶ worker thread
         ▲                           │  not resident? ──▶ loader thread: store → bank (LRU, max_resident)
         └──── future per request ◀──┘  every max_wait_ms or max_batch rows: one generate, per-row adapters

The worker takes the oldest row whose adapter is resident, and with it every waiting row of the same
`BatchKey` (task, num_beams, max_new_tokens) whose adapter is resident, whatever the adapter or its
family, up to `max_batch` rows — so a load never holds up requests for resident adapters, and rows of
one request may be spread over several batches. Rows of a cancelled request are dropped before they
are scheduled.

Residency (`max_resident` = K): the loader is the only place that makes room, by evicting the least
recently used adapter that no running batch uses and no older waiting row needs. While it loads, a
batch may use at most K-1 adapters, so the bank never holds more than K even mid-load. The bank pins
a running batch's adapters (`model.using`), so even a race ends in a correct, if slower, batch.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.serving.catalog import AdapterCatalog, store_path
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import BatchRunner, Job, Row

if TYPE_CHECKING:
    from adaptkit.serving.metrics import ServeMetrics
    from adaptkit.tasks.continuous import ContinuousBatch, DecodingRow

T = TypeVar("T")
_WAIT = object()


class Scheduler:
    def __init__(self, model: AdaptedModel, catalog: AdapterCatalog, settings: ServeSettings,
                 metrics: ServeMetrics | None = None):
        self.model = model
        self.catalog = catalog
        self.settings = settings
        self.metrics = metrics
        self.runner = BatchRunner(model, settings.max_batch, settings.continuous)
        self._cond = threading.Condition()
        self._pending: list[Row] = []
        self._in_batch: frozenset[str] = frozenset()  # adapters of the batch now running
        self._reserved = 0  # 1 while the loader holds or waits for a slot: batches then use at most K-1 adapters
        self._evicting: set[str] = set()
        self._loading: str | None = None
        self._load_wanted: dict[str, None] = {}  # names to load, in the order rows asked (an ordered set)
        self._calls: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self._stopping = False
        self._known_resident = set(model.adapters)
        self._removed_by_us: set[str] = set()
        self.peak_resident = len(self._known_resident)
        self.batches_run = 0
        self._threads = [threading.Thread(target=self._work, name="adaptkit-worker", daemon=True),
                         threading.Thread(target=self._load_loop, name="adaptkit-loader", daemon=True)]
        if metrics is not None:
            metrics.track(queue_depth=lambda: len(self._pending), resident=lambda: len(self.model.adapters))
            metrics.resident_peak.set(self.peak_resident)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stopping = True
            for row in self._pending:
                if not row.job.done:
                    row.job.fail(ApiError(503, "shutting_down", "the service is shutting down; retry elsewhere"))
            self._pending.clear()
            for _, future in self._calls:
                future.cancel()
            self._calls.clear()
            self._cond.notify_all()
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    @property
    def alive(self) -> bool:
        return not self._stopping and all(t.is_alive() for t in self._threads)

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    # -- the event loop's side -------------------------------------------------------------------
    def submit(self, job: Job, rows: Sequence[Row]) -> None:
        """Queue a request's rows, or refuse the whole request when the queue cannot take them all."""
        for row in rows:  # tokenized here, on the event loop, not in the worker between decoding steps
            if row.decoding is None and self.runner.continuous(row.key):
                try:
                    row.decoding = self.runner.decoding_row(row)
                except AdapterError:
                    row.decoding = None  # a generate call reports the problem, as for any static batch
        with self._cond:
            if self._stopping:
                raise ApiError(503, "shutting_down", "the service is shutting down; retry elsewhere")
            if len(self._pending) + len(rows) > self.settings.max_queue:
                raise ApiError(503, "queue_full",
                               f"{len(self._pending)} rows are waiting and this request adds {len(rows)}; the queue "
                               f"holds {self.settings.max_queue} (--max-queue). Retry after "
                               f"{self.settings.retry_after_s} s", limit=("max_queue", self.settings.max_queue),
                               headers={"Retry-After": str(self.settings.retry_after_s)})
            self._pending.extend(rows)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: its rows that are not yet in a batch are dropped."""
        with self._cond:
            job.cancelled = True
            self._pending = [row for row in self._pending if row.job is not job]
            self._cond.notify_all()

    async def call_exclusive(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the loader thread, with a free slot in the bank: uploads and deletes change the bank
        and the store only there, one at a time, between loads."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._stopping:
                raise ApiError(503, "shutting_down", "the service is shutting down; retry elsewhere")
            self._calls.append((fn, future))
            self._cond.notify_all()
        return await asyncio.wrap_future(future)

    # -- the worker thread -----------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                batch = self._next_batch()
            if batch is None:
                return
            if batch[0].decoding is not None:
                self._decode_continuously(batch)
            else:
                self._run(batch)

    def _next_batch(self) -> list[Row] | None:
        """Block until a batch is due; called with the lock held."""
        settings = self.settings
        while not self._stopping:
            ready = self._ready()
            if not self._pending:
                self._cond.wait()
                continue
            if not ready:
                self._cond.wait(0.1)  # the loader notifies when a load ends
                continue
            head = ready[0]
            same = [row for row in ready if _batchable(row, head)]
            if len(same) < settings.max_batch:
                left = head.arrived + settings.max_wait_ms / 1000 - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
            batch, names = self._take(same)
            if not batch:  # every ready adapter is over the limit while a load holds a slot
                self._cond.wait(0.1)
                continue
            self._dequeue(batch)
            self._in_batch = frozenset(names)
            return batch
        return None

    def _ready(self) -> list[Row]:
        """With the lock held: drop rows of finished or cancelled requests, ask for the loads waiting rows need,
        and return the rows whose adapters are resident, oldest first."""
        self._pending = [row for row in self._pending if not (row.job.done or row.job.cancelled)]
        resident = set(self.model.adapters) - self._evicting
        self._want_loads(resident)
        return [row for row in self._pending if row.adapter is None or row.adapter in resident]

    def _dequeue(self, rows: list[Row]) -> None:
        taken = set(map(id, rows))
        self._pending = [row for row in self._pending if id(row) not in taken]

    def _take(self, same: list[Row], running: frozenset[str] = frozenset(), room: int | None = None
              ) -> tuple[list[Row], list[str]]:
        """Rows in arrival order, up to `room`, without passing the adapter limit; `running`: adapters of rows
        already decoding, which count towards it."""
        limit = self.settings.max_adapters_per_batch or self.settings.max_batch
        if self.model.max_resident is not None:
            limit = min(limit, self.model.max_resident - self._reserved)
        room = self.settings.max_batch if room is None else room
        names: list[str] = list(running)
        batch: list[Row] = []
        for row in same:
            if len(batch) >= room:
                break
            if row.adapter is not None and row.adapter not in names:
                if len(names) >= limit:
                    continue
                names.append(row.adapter)
            batch.append(row)
        return batch, names

    def _want_loads(self, resident: set[str]) -> None:
        for row in self._pending:
            name = row.adapter
            if name is not None and name not in resident and name != self._loading and name not in self._load_wanted:
                self._load_wanted[name] = None
                self._cond.notify_all()

    def _run(self, batch: list[Row]) -> None:
        key = batch[0].key
        routes = [row.adapter for row in batch]
        started = time.perf_counter()
        with self._cond:
            for job in {id(row.job): row.job for row in batch}.values():
                job.started_batch(started)
        error: ApiError | None = None
        texts: list[str] = []
        try:
            with self.model.using(routes):  # pins the batch's adapters until generate returns
                self._observe_residency()
                texts = self.runner.run(key, batch)
        except Exception as exc:  # noqa: BLE001 — one bad batch must not kill the worker
            error = _batch_error(exc)
        seconds = time.perf_counter() - started
        if self.metrics is not None:  # before the answers go out: a client that reads /metrics next sees this batch
            self.metrics.batch_rows.observe(len(batch))
            self.metrics.batch_adapters.observe(len({name for name in routes if name is not None}))
            self.metrics.batch_seconds.observe(seconds)
        with self._cond:
            self.batches_run += 1
            by_job: dict[int, tuple[Job, list[int], list[str]]] = {}
            for i, row in enumerate(batch):
                entry = by_job.setdefault(id(row.job), (row.job, [], []))
                entry[1].append(row.index)
                entry[2].append(texts[i] if error is None else "")
            for job, indices, outputs in by_job.values():
                if job.done:
                    continue
                if error is not None:
                    job.fail(error)
                else:
                    job.set_rows(indices, outputs, seconds)
            self._in_batch = frozenset()
            self._cond.notify_all()

    # -- continuous batching (tasks/continuous.py) -----------------------------------------------
    def _decode_continuously(self, first: list[Row]) -> None:
        """Run the engine until it is empty: waiting rows join between its steps, finished rows answer at once.

        Rows stop joining while the oldest waiting row cannot join (a beam search, say): the engine then
        drains within max_new_tokens steps and that row runs next."""
        engine = self.runner.engine
        assert engine is not None
        joining = first
        try:
            while True:
                if joining:
                    self._join(engine, joining)
                gone = [d for d in engine.rows if d.tag.job.done or d.tag.job.cancelled]
                engine.remove(gone)  # their clients went away, or another of their rows failed
                if not len(engine):
                    return
                if self._stopping:
                    self._fail_running(engine, ApiError(503, "shutting_down", "the service is shutting down; "
                                                        "retry elsewhere"))
                    return
                rows, adapters, started = len(engine), len(engine.adapters), time.perf_counter()
                try:
                    finished = engine.step()
                except Exception as exc:  # noqa: BLE001 — one bad step must not kill the worker
                    self._fail_running(engine, _batch_error(exc))
                    return
                if self.metrics is not None:
                    self.metrics.batch_rows.observe(rows)
                    self.metrics.batch_adapters.observe(adapters)
                    self.metrics.batch_seconds.observe(time.perf_counter() - started)
                self._deliver(finished)
                with self._cond:
                    joining = self._joiners(engine)
        finally:
            engine.close()
            with self._cond:
                self._in_batch = frozenset()
                self._cond.notify_all()

    def _joiners(self, engine: ContinuousBatch) -> list[Row]:
        """With the lock held: the waiting rows that join the engine at its next step, off the queue."""
        ready = self._ready()
        batch: list[Row] = []
        names = list(engine.adapters)
        if not self._stopping and ready and ready[0].decoding is not None:
            candidates = [row for row in ready if row.decoding is not None]
            batch, names = self._take(candidates, engine.adapters, self.settings.max_batch - len(engine))
            self._dequeue(batch)
        self._in_batch = frozenset(names)
        return batch

    def _join(self, engine: ContinuousBatch, rows: list[Row]) -> None:
        started = time.perf_counter()
        with self._cond:
            self.batches_run += 1  # a join counts as a batch: its rows are prefilled together
            for job in {id(row.job): row.job for row in rows}.values():
                job.started_batch(started)
        try:
            finished = engine.add([row.decoding for row in rows if row.decoding is not None])
        except Exception as exc:  # noqa: BLE001 — the newcomers fail; the running rows go on
            with self._cond:
                for row in rows:
                    if not row.job.done:
                        row.job.fail(_batch_error(exc))
            return
        self._deliver(finished)

    def _deliver(self, finished: list[DecodingRow]) -> None:
        """Answer the finished rows; a request's compute time is from its first row's join to now."""
        if not finished:
            return
        texts = [self.runner.text_of(row) for row in finished]
        now = time.perf_counter()
        with self._cond:
            by_job: dict[int, tuple[Job, list[int], list[str]]] = {}
            for decoding, text in zip(finished, texts):
                row = decoding.tag
                entry = by_job.setdefault(id(row.job), (row.job, [], []))
                entry[1].append(row.index)
                entry[2].append(text)
            for job, indices, outputs in by_job.values():
                if not job.done:
                    job.set_rows(indices, outputs, now - (job.first_batch or now) - job.compute_seconds)
            self._cond.notify_all()

    def _fail_running(self, engine: ContinuousBatch, error: ApiError) -> None:
        with self._cond:
            for decoding in engine.rows:
                if not decoding.tag.job.done:
                    decoding.tag.job.fail(error)
        engine.remove(list(engine.rows))

    # -- the loader thread -----------------------------------------------------------------------
    def _load_loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._calls and not self._load_wanted:
                    self._cond.wait()
                if self._stopping:
                    return
                if self._calls:
                    name, call = None, self._calls.popleft()
                else:
                    name, call = next(iter(self._load_wanted)), None
                    del self._load_wanted[name]
                    self._loading = name
                victim = self._make_room(name)
            try:
                if victim is not _WAIT:
                    if victim is not None:
                        self._evict(victim)
                    if call is not None:
                        self._call(*call)
                    elif name is not None:
                        self._load(name)
            finally:
                with self._cond:
                    self._reserved = 0
                    self._loading = None
                    self._evicting.clear()
                    self._cond.notify_all()
                self._observe_residency()

    def _make_room(self, name: str | None) -> Any:
        """With the lock held: reserve a slot, wait until one is free, pick what to evict (None: nothing).
        Returns _WAIT when the load is no longer needed or the service stops."""
        capacity = self.model.max_resident
        if capacity is None:
            return None if name is None or self._still_wanted(name) else _WAIT
        while not self._stopping:
            if name is not None and not self._still_wanted(name):
                return _WAIT
            self._reserved = 1
            if len(self._in_batch) + 1 <= capacity:
                resident = self.model.adapters  # least recently used first
                if len(resident) < capacity:
                    return None
                needed = self._needed_before(name) if name is not None else set()
                evictable = [n for n in resident if n not in self._in_batch and n in self.catalog.store]
                preferred = [n for n in evictable if n not in needed]
                if preferred:
                    self._evicting.add(preferred[0])
                    return preferred[0]
                if not evictable and not self._in_batch:
                    return None  # nothing the store can bring back: the bank goes over its target
                # Older rows need every resident adapter: let batches use all K slots until they are served
                # (holding the slot here would deadlock at K=1).
                self._reserved = 0
            self._cond.notify_all()
            self._cond.wait(0.1)
        return _WAIT

    def _still_wanted(self, name: str) -> bool:
        return name not in self.model.adapters and any(row.adapter == name for row in self._pending)

    def _needed_before(self, name: str) -> set[str]:
        """Adapters of rows that came before the first row needing `name`: they are served first, so keep them."""
        needed = set()
        for row in self._pending:
            if row.adapter == name:
                break
            if row.adapter is not None:
                needed.add(row.adapter)
        return needed

    def _evict(self, name: str) -> None:
        with self._cond:
            self._removed_by_us.add(name)
        try:
            self.model.remove_adapter(name)
        except AdapterError:
            return  # already gone
        if self.metrics is not None:
            self.metrics.evictions.inc()

    def _load(self, name: str) -> None:
        entry = self.catalog.refresh_one(name)
        started = time.perf_counter()
        error: ApiError | None = None
        if entry is None:
            error = ApiError(404, "unknown_adapter", f"no adapter named {name!r} in the store")
        elif entry.error is not None:
            error = ApiError(500, "adapter_broken", f"adapter {name!r} in the store cannot be loaded: {entry.error}")
        else:
            try:
                self.model.load_adapter(store_path(self.catalog.store, name), name)
            except AdapterError as exc:
                if name not in self.model.adapters:  # (else: a racing batch loaded it first)
                    error = ApiError(500, "adapter_broken", f"adapter {name!r} in the store cannot be loaded: {exc}")
        if self.metrics is not None:
            self.metrics.loads.labels("error" if error else "ok").inc()
            if error is None:
                self.metrics.load_seconds.observe(time.perf_counter() - started)
        if error is not None:
            with self._cond:
                for row in self._pending:
                    if row.adapter == name and not row.job.done:
                        row.job.fail(error)
                self._pending = [row for row in self._pending if row.adapter != name]

    def _call(self, fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            before = set(self.model.adapters)
            result = fn()
            with self._cond:  # what the call removed was not evicted
                self._removed_by_us |= before - set(self.model.adapters)
            future.set_result(result)
        except BaseException as exc:  # noqa: BLE001 — handed to the awaiting request
            future.set_exception(exc)

    def _observe_residency(self) -> None:
        """Count the bank's own evictions (what disappeared that we did not remove) and the peak resident."""
        now = set(self.model.adapters)
        with self._cond:
            gone = self._known_resident - now
            by_bank = gone - self._removed_by_us
            self._removed_by_us -= gone
            self._known_resident = now
            self.peak_resident = max(self.peak_resident, len(now))
            peak = self.peak_resident
        if self.metrics is not None:
            if by_bank:
                self.metrics.evictions.inc(len(by_bank))
            self.metrics.resident_peak.set(peak)


def _batchable(row: Row, head: Row) -> bool:
    """Rows that may share a batch with `head`: any two rows of the continuous engine, else equal keys."""
    if (row.decoding is None) != (head.decoding is None):
        return False
    return row.decoding is not None or row.key == head.key


def _batch_error(exc: Exception) -> ApiError:
    if isinstance(exc, AdapterError):
        return ApiError(500, "adapter_failed", f"the batch could not run its adapters: {exc}")
    return ApiError(500, "internal_error", f"generation failed: {type(exc).__name__}: {exc}")

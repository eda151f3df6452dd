"""Batching across adapters: a bounded queue of rows, one worker thread that decodes, one loader that owns the bank.

    event loop ──submit(rows)──▶ queue (admission.py; full → 503) ──▶ worker (driver.py): static batches
         ▲                          │  adapter not resident?                and the continuous engine
         │                          └──▶ loader (loader.py): make room, load; uploads, replaces, deletes
         └──── future per request ◀──── answers (each with the adapter file version that produced it)

One lock (a condition) covers the queue, the running rows and the bank's membership (`residency.py`);
the work itself — decoding, reading files — runs outside it. Both threads catch what their work
raises and fail only the requests it concerns; if a thread dies anyway, the scheduler is no longer
alive: /readyz answers 503, every waiting request fails with 503 `not_ready`, and `submit` refuses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError, SourceTooLong
from adaptkit.serving.admission import Admission
from adaptkit.serving.catalog import AdapterCatalog
from adaptkit.serving.driver import Driver, row_error
from adaptkit.serving.loader import SHUTTING_DOWN, Change, Loader
from adaptkit.serving.residency import Residency
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import BatchRunner, Job, RequestRow

if TYPE_CHECKING:
    from adaptkit.serving.metrics import ServeMetrics

T = TypeVar("T")
log = logging.getLogger("adaptkit.serving")


class Scheduler:
    def __init__(self, model: AdaptedModel, catalog: AdapterCatalog, settings: ServeSettings,
                 metrics: ServeMetrics | None = None):
        self.model = model
        self.catalog = catalog
        self.settings = settings
        self.metrics = metrics
        self.runner = BatchRunner(model, settings.max_batch, settings.continuous)
        self._lock = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._failure: str | None = None  # why a thread died, once one has
        self.residency = Residency(model, catalog.store, self._lock)
        self.admission = Admission(settings, self.residency)
        self.driver = Driver(self.runner, self.admission, self.residency, settings, self._lock, self._is_stopping,
                             metrics)
        self.loader = Loader(model, catalog, self.residency, self.admission, self._lock, self._is_stopping, metrics)
        self.peak_resident = len(model.adapters)
        self._threads = [threading.Thread(target=self._thread, args=(self.driver.run_once,), name="adaptkit-worker",
                                          daemon=True),
                         threading.Thread(target=self._thread, args=(self._load_once,), name="adaptkit-loader",
                                          daemon=True)]
        if metrics is not None:
            metrics.track(queue_depth=lambda: len(self.admission.pending), resident=lambda: len(self.model.adapters),
                          rows=self.rows_by_adapter)
            metrics.resident_peak.set(self.peak_resident)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        self.model.load_on_use = False  # from now on the loader alone decides what is resident
        for thread in self._threads:
            thread.start()

    def stop_accepting(self) -> None:
        """Refuse new work with 503 shutting_down; what is queued or running goes on (a graceful shutdown)."""
        with self._lock:
            self._accepting = False

    def stop(self, timeout: float = 30.0) -> None:
        """Fail what is waiting or running with 503 shutting_down and stop both threads."""
        with self._lock:
            self._accepting, self._stopping = False, True
            self.admission.fail_all(ApiError(503, *SHUTTING_DOWN))
            self.loader.cancel_all()
            self._lock.notify_all()
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout)

    @property
    def alive(self) -> bool:
        return not self._stopping and self._failure is None and all(t.is_alive() for t in self._threads)

    @property
    def in_flight(self) -> int:
        """Rows waiting or running."""
        with self._lock:
            return len(self.admission.pending) + self.driver.running_rows

    def rows_by_adapter(self) -> tuple[dict[str, int], dict[str, int]]:
        """Running and waiting rows per adapter ('' for the bare backbone), with 0 for each resident adapter."""
        with self._lock:
            running = self.driver.running_by_adapter()
            waiting = self.admission.waiting_by_adapter()
            resident = list(self.model.adapters)
        for name in resident:
            running.setdefault(name, 0)
            waiting.setdefault(name, 0)
        return dict(running), dict(waiting)

    @property
    def queue_depth(self) -> int:
        return len(self.admission.pending)

    @property
    def batches_run(self) -> int:
        return self.driver.batches_run

    def _is_stopping(self) -> bool:
        return self._stopping

    def _thread(self, run_once: Callable[[], bool]) -> None:
        """A worker or loader loop; a failure inside one item is that item's (caught below it). Anything that
        escapes is a bug: the scheduler then stops being alive and fails every waiting request, never leaving
        one to wait for ever."""
        try:
            while run_once():
                pass
        except BaseException as error:  # noqa: BLE001
            log.exception("adaptkit scheduler thread %s died", threading.current_thread().name)
            with self._lock:
                self._failure = f"{threading.current_thread().name} failed: {type(error).__name__}: {error}"
                self.admission.fail_all(ApiError(503, "not_ready", f"the service failed ({self._failure}); "
                                                 "restart it"))
                self.loader.cancel_all()
                self._lock.notify_all()

    def _load_once(self) -> bool:
        running = self.loader.run_once()
        self.peak_resident = max(self.peak_resident, len(self.model.adapters))
        if self.metrics is not None:
            self.metrics.resident_peak.set(self.peak_resident)
        return running

    def _check_open(self) -> None:
        """With the lock held."""
        if self._failure is not None:
            raise ApiError(503, "not_ready", f"the service failed ({self._failure}); restart it")
        if self._stopping or not self._accepting:
            raise ApiError(503, *SHUTTING_DOWN)

    # -- the event loop's side -------------------------------------------------------------------
    def submit(self, job: Job, rows: Sequence[RequestRow]) -> None:
        """Queue a request's rows, or refuse the whole request (503 when the queue is full or the service is not
        running; the row's own error when it cannot be prepared)."""
        for row in rows:  # tokenized here, on the event loop, not in the worker between decoding steps
            if row.decoding is None and self.runner.continuous(row.key):
                row.decoding = self.prepare(row)
        with self._lock:
            self._check_open()
            self.admission.add(rows)
            self._lock.notify_all()

    def prepare(self, row: RequestRow) -> Any:
        """The row in the engine's form, or None for a generate call (a text to split, or too long for a sliding
        window); a row that cannot be prepared at all fails its request alone."""
        try:
            return self.runner.decoding_row(row)
        except SourceTooLong:
            return None  # a generate call translates it whole, in segments
        except AdapterError:
            return None  # a generate call reports the problem, as for any static batch
        except Exception as error:  # noqa: BLE001 — the request's own text cannot be prompted
            raise row_error(error) from None

    def cancel(self, job: Job) -> None:
        """The client went away or its deadline passed: its waiting rows are dropped, its running rows leave the
        continuous batch at its next step."""
        with self._lock:
            job.cancelled = True
            self.admission.drop(job)
            self._lock.notify_all()

    async def call_exclusive(self, fn: Callable[[], T], changes: str | None = None) -> T:
        """Run `fn` on the loader thread, between loads: store changes happen there, one at a time. With
        `changes=name`, rows of `name` stop being admitted, its running rows finish under the version they
        started with, it leaves the bank, and then `fn` runs (it writes or deletes the store's file)."""
        change = Change(fn, changes)
        with self._lock:
            self._check_open()
            self.loader.changes.append(change)
            self._lock.notify_all()
        return await asyncio.wrap_future(change.future)

    @contextlib.contextmanager
    def hold(self, name: str | None, timeout: float) -> Iterator[str | None]:
        """Block until `name` is resident (asking the loader for it), keep it there while the block runs, and
        give its file version. For work outside batches (a stream in its own thread)."""
        if name is None:
            yield None
            return
        with self._lock:
            self._check_open()
            self.admission.holds_waiting[name] += 1
            seen = self.admission.failures.get(name, (0, None))[0]
            self._lock.notify_all()
            try:
                ready = self._lock.wait_for(lambda: not self.alive or self.residency.admissible(name)
                                            or self.admission.failures.get(name, (0, None))[0] > seen, timeout)
            finally:
                self.admission.holds_waiting[name] -= 1
                if not self.admission.holds_waiting[name]:
                    del self.admission.holds_waiting[name]
                    failure = self.admission.failures.pop(name, None)
                else:
                    failure = self.admission.failures.get(name)
            if failure is not None and failure[0] > seen:
                raise failure[1]
            self._check_open()
            if not ready or not self.residency.admissible(name):
                raise ApiError(504, "request_timeout", f"adapter {name!r} was not loaded within {timeout} s "
                               "(--request-timeout-s)")
            version = self.residency.acquire([name])[0]
        try:
            yield version
        finally:
            with self._lock:
                self.residency.release([name])

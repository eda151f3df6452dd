"""The loader thread: every change of the bank — loads, evictions, uploads, replaces, deletes — one at a time.

    loads    an adapter waiting rows need: make room (evict an idle adapter, or drain the running one
             least recently admitted, then evict it), then load the store's file
    changes  `call_exclusive(fn, changes=name)`: block `name`, wait until its running rows have left,
             take it out of the bank, run `fn` (which writes or deletes the store's file), unblock

A load whose file is gone fails its waiting rows with 404 `unknown_adapter`; one whose file cannot be
loaded with 500 `adapter_broken`; the bank is then as it was.
"""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from adaptkit.core.bank import AdaptedModel
from adaptkit.serving.admission import Admission
from adaptkit.serving.catalog import AdapterCatalog, store_path
from adaptkit.serving.residency import CHANGING, DRAINING, EVICTING, Residency
from adaptkit.serving.settings import ApiError

if TYPE_CHECKING:
    import threading

    from adaptkit.serving.metrics import ServeMetrics

_GIVE_UP = object()
SHUTTING_DOWN = ("shutting_down", "the service is shutting down; retry elsewhere")


class Change:
    """A store change queued for the loader thread."""

    def __init__(self, fn: Callable[[], Any], changes: str | None):
        self.fn, self.changes = fn, changes
        self.future: concurrent.futures.Future = concurrent.futures.Future()


class Loader:
    def __init__(self, model: AdaptedModel, catalog: AdapterCatalog, residency: Residency, admission: Admission,
                 lock: threading.Condition, stopping: Callable[[], bool], metrics: ServeMetrics | None = None):
        self.model, self.catalog, self.residency, self.admission = model, catalog, residency, admission
        self.lock, self.stopping, self.metrics = lock, stopping, metrics
        self.changes: collections.deque[Change] = collections.deque()

    def run_once(self) -> bool:
        """Wait for one change or load and make it; False once the service stops."""
        with self.lock:
            while not self.stopping() and not self.changes and not self.admission.wanted():
                self.lock.wait()
            if self.stopping():
                return False
            change = self.changes.popleft() if self.changes else None
            name = None if change is not None else next(iter(self.admission.wanted()))
        if change is not None:
            self._change(change)
        elif name is not None:
            self._load(name)
        return True

    def cancel_all(self) -> None:
        """With the lock held: queued changes end with 503 shutting_down."""
        while self.changes:
            change = self.changes.popleft()
            if change.future.set_running_or_notify_cancel():
                change.future.set_exception(ApiError(503, *SHUTTING_DOWN))

    # -- store changes ---------------------------------------------------------------------------
    def _change(self, change: Change) -> None:
        if not change.future.set_running_or_notify_cancel():
            return
        name = change.changes
        try:
            if name is not None:
                with self.lock:
                    self.residency.block(name, CHANGING)
                    self.lock.wait_for(lambda: self.stopping() or self.residency.idle(name))
                    if self.stopping():
                        raise ApiError(503, *SHUTTING_DOWN)
                if name in self.model.adapters:  # no running row uses it: removal does not wait
                    self.model.remove_adapter(name)
            result = change.fn()
        except BaseException as error:  # noqa: BLE001 — handed to the request that asked for the change
            change.future.set_exception(error)
        else:
            change.future.set_result(result)
        finally:
            if name is not None:
                with self.lock:
                    self.residency.unblock(name, CHANGING)
                    self.residency.forget(name)

    # -- loads -------------------------------------------------------------------------------------
    def _load(self, name: str) -> None:
        """Load `name` for the rows waiting for it; whatever goes wrong fails those rows, not the loader."""
        try:
            self._try_load(name)
        except Exception as error:  # noqa: BLE001 — e.g. an eviction the bank refused
            with self.lock:
                self.residency.end_drains()
                self.admission.fail_adapter(name, ApiError(500, "internal_error", f"loading adapter {name!r} "
                                                           f"failed: {type(error).__name__}: {error}"))
                self.lock.notify_all()

    def _try_load(self, name: str) -> None:
        entry = self.catalog.refresh_one(name)
        error: ApiError | None = None
        try:
            store_path(self.catalog.store, name)
        except Exception as bad:  # noqa: BLE001 — a name that cannot be stored cannot be loaded either
            error = ApiError(400, "bad_adapter_name", str(bad))
        if error is None and entry is None:
            error = ApiError(404, "unknown_adapter", f"no adapter named {name!r} in the store (deleted?); "
                                                     "GET /v1/adapters lists them")
        elif error is None and entry.error is not None:
            error = ApiError(500, "adapter_broken", f"adapter {name!r} in the store cannot be loaded: {entry.error}")
        if error is None:
            outcome = self._make_room_and_load(name)
            if outcome is _GIVE_UP:
                return
            error = outcome
        if error is not None:
            with self.lock:
                self.admission.fail_adapter(name, error)
                self.lock.notify_all()
        if self.metrics is not None:
            self.metrics.loads.labels("error" if error else "ok").inc()

    def _make_room_and_load(self, name: str) -> Any:
        """None when loaded, an ApiError when the file failed, _GIVE_UP when nobody needs it any more."""
        victim = self._make_room(name)
        if victim is _GIVE_UP:
            return _GIVE_UP
        try:
            if victim is not None:
                self.model.remove_adapter(victim)  # idle and blocked: nothing waits, nothing is admitted
                if self.metrics is not None:
                    self.metrics.evictions.inc()
        finally:
            with self.lock:
                if victim is not None:
                    self.residency.unblock(victim)
                    self.residency.forget(victim)
                self.residency.end_drains()
        started = time.perf_counter()
        try:
            self.model.load_from_store(name)
        except Exception as failure:  # noqa: BLE001 — the rows that asked for it fail; the loader goes on
            if name not in self.model.adapters:
                return ApiError(500, "adapter_broken", f"adapter {name!r} in the store cannot be loaded: {failure}")
        finally:
            with self.lock:
                self.lock.notify_all()
        if self.metrics is not None:
            self.metrics.load_seconds.observe(time.perf_counter() - started)
        return None

    def _make_room(self, name: str) -> Any:
        """With a free slot or an adapter to evict (blocked, idle), return it (None: a slot is free); _GIVE_UP
        when no row needs `name` any more or the service stops. Drains a running adapter when none is idle."""
        with self.lock:
            while self.residency.full():
                if self.stopping() or not self.admission.needs(name):
                    self.residency.end_drains()
                    return _GIVE_UP
                wanted = {row.adapter for row in self.admission.pending if row.adapter is not None}
                victim = self.residency.victim(wanted)
                if victim is not None:
                    self.residency.block(victim, EVICTING)
                    return victim
                if self.residency.start_drain() is None and DRAINING not in self.residency.blocked.values():
                    return None  # every resident adapter is one the store cannot bring back: go over the target
                self.lock.wait(0.5)  # woken when a running adapter's last row leaves
            return None

"""The queue and who gets in: which waiting rows join the next batch.

Rows wait in arrival order. A row may be admitted when its adapter is resident and not blocked
(`residency.py`); the oldest admissible row leads, and with it every admissible row it can share a
batch with — whatever their adapters or families — up to `max_batch` rows and at most
`max_adapters_per_batch` distinct adapters. Rows of a cancelled, failed or timed-out request leave the
queue before they are scheduled. Every method runs with the scheduler's lock held.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

from adaptkit.serving.residency import Residency
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import Job, RequestRow


class Admission:
    def __init__(self, settings: ServeSettings, residency: Residency):
        self.settings = settings
        self.residency = residency
        self.pending: list[RequestRow] = []
        self.holds_waiting: collections.Counter[str] = collections.Counter()  # `Scheduler.hold` callers per adapter
        self.failures: dict[str, tuple[int, ApiError]] = {}  # adapter → (sequence number, why its load failed)
        self._failure_seq = 0

    def add(self, rows: Sequence[RequestRow]) -> None:
        """Queue a request's rows, or refuse them all when the queue cannot take them all."""
        if len(self.pending) + len(rows) > self.settings.max_queue:
            raise ApiError(503, "queue_full",
                           f"{len(self.pending)} rows are waiting and this request adds {len(rows)}; the queue "
                           f"holds {self.settings.max_queue} (--max-queue). Retry after "
                           f"{self.settings.retry_after_s} s", limit=("max_queue", self.settings.max_queue),
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        self.pending.extend(rows)

    def waiting_by_adapter(self) -> collections.Counter[str]:
        """Rows waiting, per adapter ('' for the bare backbone); rows of ended requests are not counted."""
        return collections.Counter(row.adapter or "" for row in self.pending if not row.job.ended)

    def drop(self, job: Job) -> None:
        self.pending = [row for row in self.pending if row.job is not job]

    def ready(self) -> list[RequestRow]:
        """Rows that may be admitted now, oldest first (rows of ended requests leave the queue here)."""
        self.pending = [row for row in self.pending if not row.job.ended]
        resident = self.residency.resident()
        return [row for row in self.pending if self.residency.admissible(row.adapter, resident)]

    def take(self, candidates: Sequence[RequestRow], running: frozenset[str] = frozenset(),
             room: int | None = None) -> list[RequestRow]:
        """Rows in arrival order, up to `room`, without passing the distinct-adapter limit (`running`: adapters
        of rows already decoding, which count towards it); taken off the queue."""
        limit = self.settings.max_adapters_per_batch or self.settings.max_batch
        room = self.settings.max_batch if room is None else room
        names = set(running)
        batch: list[RequestRow] = []
        for row in candidates:
            if len(batch) >= room:
                break
            if row.adapter is not None and row.adapter not in names:
                if len(names) >= limit:
                    continue
                names.add(row.adapter)
            batch.append(row)
        taken = set(map(id, batch))
        self.pending = [row for row in self.pending if id(row) not in taken]
        return batch

    def wanted(self) -> dict[str, None]:
        """Adapters that waiting rows (or holds) need and the bank lacks, in the order they were first asked for."""
        resident = set(self.residency.model.adapters)
        names: dict[str, None] = {}
        for row in self.pending:
            if row.adapter is not None and row.adapter not in resident and not row.job.ended:
                names[row.adapter] = None
        for name, count in self.holds_waiting.items():
            if count and name not in resident:
                names[name] = None
        return names

    def needs(self, name: str) -> bool:
        return self.holds_waiting[name] > 0 or any(row.adapter == name and not row.job.ended for row in self.pending)

    def fail_adapter(self, name: str, error: ApiError) -> None:
        """Every waiting row of `name` fails with `error` (its file cannot be loaded, or it is gone); holds
        waiting for it see the failure through `failures`."""
        if self.holds_waiting[name]:  # (kept only while someone waits: churned names must not pile up)
            self._failure_seq += 1
            self.failures[name] = (self._failure_seq, error)
        for row in self.pending:
            if row.adapter == name:
                row.job.fail(error)
        self.pending = [row for row in self.pending if row.adapter != name]

    def fail_all(self, error: ApiError) -> None:
        for row in self.pending:
            row.job.fail(error)
        self.pending.clear()

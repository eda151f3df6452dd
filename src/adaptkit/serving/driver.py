"""The worker thread: runs admitted rows, as one generate call (a static batch) or in the continuous engine.

Every row admitted is counted as running under its adapter (`residency.py`) until it leaves — answered,
failed, or dropped because its client went away — so its adapter stays in the bank, at the version it
was admitted under, for as long as it decodes. A failing row fails only its own request:

    a row's stop rule or streamer raises     that row ends with its error (the engine keeps it apart)
    a static batch raises                    each of its rows is run alone; only those that raise fail
    joining rows' prefill raises             each joins alone; only those that raise fail
    a decoding step raises                   every row of that step fails (their caches are unusable)
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from adaptkit.serving.admission import Admission
from adaptkit.serving.residency import Residency
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import BatchRunner, Job, RequestRow

if TYPE_CHECKING:
    import threading

    from adaptkit.generation.continuous import ContinuousBatch, DecodingRow
    from adaptkit.serving.metrics import ServeMetrics


class Driver:
    def __init__(self, runner: BatchRunner, admission: Admission, residency: Residency, settings: ServeSettings,
                 lock: threading.Condition, stopping: Callable[[], bool], metrics: ServeMetrics | None = None):
        self.runner, self.admission, self.residency, self.settings = runner, admission, residency, settings
        self.lock, self.stopping, self.metrics = lock, stopping, metrics
        self.batches_run = 0
        self._admitted: dict[int, RequestRow] = {}  # id(row) → row, from admission until it is settled
        self._in_engine: dict[int, RequestRow] = {}  # id(DecodingRow) → its request row, while it decodes
        if metrics is not None:
            runner.tokens_written = self._tokens_written  # static batches of "complete" rows report their steps

    @property
    def running_rows(self) -> int:
        """Rows admitted and not yet settled (read with the lock held)."""
        return len(self._admitted)

    def running_by_adapter(self) -> collections.Counter[str]:
        """Rows admitted and not yet settled, per adapter ('' for the bare backbone); with the lock held."""
        return collections.Counter(row.adapter or "" for row in self._admitted.values())

    def run_once(self) -> bool:
        """Wait for a batch and run it; False once the service stops."""
        with self.lock:
            batch = self._next_batch()
        if batch is None:
            return False
        try:
            if batch[0].decoding is not None:
                self._decode_continuously(batch)
            else:
                self._run_static(batch)
        finally:
            with self.lock:  # whatever happened, nothing admitted stays counted or unanswered
                self._settle(list(self._admitted.values()),
                             ApiError(500, "internal_error", "the batch ended without answering this row"))
                self._in_engine.clear()
        return True

    # -- admission ---------------------------------------------------------------------------------
    def _next_batch(self) -> list[RequestRow] | None:
        """Block until a batch is due and admit it; called with the lock held."""
        while not self.stopping():
            ready = self.admission.ready()
            if not ready:
                self.lock.wait(None if not self.admission.pending else 0.1)
                continue
            head = ready[0]
            same = [row for row in ready if _batchable(row, head)]
            if len(same) < self.settings.max_batch:
                left = head.arrived + self.settings.max_wait_ms / 1000 - time.monotonic()
                if left > 0:
                    self.lock.wait(left)
                    continue
            batch = self.admission.take(same)
            self._admit(batch)
            return batch
        return None

    def _admit(self, rows: Sequence[RequestRow]) -> None:
        self.residency.admit(rows)
        self._admitted.update((id(row), row) for row in rows)
        started = time.perf_counter()
        for job in _jobs(rows):
            job.started_batch(started)

    def _settle(self, rows: Sequence[RequestRow], error: ApiError | None = None) -> None:
        """With the lock held: rows that left their batch stop counting as running; those not answered get `error`."""
        rows = [row for row in rows if self._admitted.pop(id(row), None) is not None]  # each row once
        self.residency.release(row.adapter for row in rows)
        if error is not None:
            for row in rows:
                if not row.job.ended and row.job.results[row.index] is None:
                    row.job.fail(error)
        self.lock.notify_all()

    # -- static batches (beam search, or no continuous engine) ------------------------------------
    def _run_static(self, batch: list[RequestRow]) -> None:
        started = time.perf_counter()
        try:
            answers = self._generate(batch)
        finally:
            seconds = time.perf_counter() - started
            if self.metrics is not None:
                self.metrics.batch_rows.observe(len(batch))
                self.metrics.batch_adapters.observe(len({row.adapter for row in batch} - {None}))
                self.metrics.batch_seconds.observe(seconds)
        with self.lock:
            self.batches_run += 1
            self._answer([(row, text) for row, text in zip(batch, answers) if text is not None], seconds)
            self._settle(batch)  # (rows that raised were failed by _generate)

    def _generate(self, batch: list[RequestRow]) -> list[str | None]:
        """The batch's answers; when the batch raises, each row alone (None where that row raises)."""
        try:
            with self.runner.model.using([row.adapter for row in batch]):
                return self.runner.run(batch[0].key, batch)
        except Exception as error:  # noqa: BLE001 — find the rows that fail, answer the others
            if len(batch) == 1:
                with self.lock:
                    batch[0].job.fail(row_error(error))
                return [None]
        answers: list[str | None] = []
        for row in batch:
            answers += self._generate([row]) if not row.job.ended else [None]
        return answers

    def _answer(self, answered: list[tuple[RequestRow, str]], seconds: float) -> None:
        by_job: dict[int, tuple[Job, list[int], list[str], list[str | None]]] = {}
        for row, text in answered:
            entry = by_job.setdefault(id(row.job), (row.job, [], [], []))
            entry[1].append(row.index)
            entry[2].append(text)
            entry[3].append(row.version)
        for job, indices, texts, versions in by_job.values():
            if not job.ended:
                job.set_rows(indices, texts, versions, seconds)

    # -- continuous batching (generation/continuous.py) -------------------------------------------------
    def _decode_continuously(self, first: list[RequestRow]) -> None:
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
                engine.remove([d for d in engine.rows if d.tag.job.ended])  # client gone, deadline, a failed row
                with self.lock:
                    self._left_engine(engine)
                if not len(engine):
                    return
                if self.stopping():
                    with self.lock:
                        self._fail_engine(engine, ApiError(503, "shutting_down", "the service is shutting down; "
                                                           "retry elsewhere"))
                    return
                stepping = list(engine.rows)
                rows, adapters, started = len(engine), len(engine.adapters), time.perf_counter()
                try:
                    finished = engine.step()
                except Exception as error:  # noqa: BLE001 — the step's rows fail; the worker goes on
                    with self.lock:
                        self._fail_engine(engine, row_error(error))
                    return
                if self.metrics is not None:
                    self.metrics.batch_rows.observe(rows)
                    self.metrics.batch_adapters.observe(adapters)
                    self.metrics.batch_seconds.observe(time.perf_counter() - started)
                    self._tokens_written([decoding.tag for decoding in stepping])  # one token each
                self._deliver(finished)
                with self.lock:
                    self._left_engine(engine)
                    joining = self._joiners(engine)
        finally:
            engine.remove(list(engine.rows))
            engine.close()
            with self.lock:
                self._left_engine(engine)

    def _joiners(self, engine: ContinuousBatch) -> list[RequestRow]:
        """With the lock held: the waiting rows that join the engine at its next step, admitted, off the queue."""
        ready = self.admission.ready()
        if self.stopping() or not ready or ready[0].decoding is None:
            return []
        candidates = [row for row in ready if row.decoding is not None]
        batch = self.admission.take(candidates, engine.adapters, self.settings.max_batch - len(engine))
        self._admit(batch)
        return batch

    def _join(self, engine: ContinuousBatch, rows: list[RequestRow]) -> None:
        """Prefill `rows` into the engine (admitted already); when that fails, each row joins alone."""
        with self.lock:
            self.batches_run += 1  # a join counts as a batch: its rows are prefilled together
            for row in rows:
                assert row.decoding is not None
                self._in_engine[id(row.decoding)] = row
        try:
            finished = engine.add([row.decoding for row in rows if row.decoding is not None])
        except Exception as error:  # noqa: BLE001 — the newcomers alone; the running rows go on
            if len(rows) > 1:
                for row in rows:
                    self._join(engine, [row])
                return
            with self.lock:
                rows[0].job.fail(row_error(error))
                self._in_engine.pop(id(rows[0].decoding), None)
                self._settle(rows)
            return
        if self.metrics is not None:
            self._tokens_written(rows)  # the prefill wrote each newcomer's first token
        self._deliver(finished)

    def _tokens_written(self, rows: Sequence[RequestRow]) -> None:
        """Each of `rows` wrote one token now: time to first token (from the request's arrival, so queueing and
        loading count, as the client sees it), inter-token latency, and tokens per adapter. Worker thread only."""
        assert self.metrics is not None
        now = time.monotonic()
        per_adapter: collections.Counter[str] = collections.Counter()
        for row in rows:
            if row.first_token is None:
                row.first_token = now
                self.metrics.first_token_seconds.observe(now - row.arrived)
            else:
                self.metrics.inter_token_seconds.observe(now - (row.last_token or now))
            row.last_token = now
            per_adapter[row.adapter or ""] += 1
        for adapter, count in per_adapter.items():
            self.metrics.tokens.labels(adapter).inc(count)

    def _deliver(self, finished: Sequence[DecodingRow]) -> None:
        """Answer the finished rows (a row whose own callbacks raised fails alone); a request's compute time is
        from its first row's join to now."""
        answered: list[tuple[RequestRow, str]] = []
        failed: list[tuple[RequestRow, Exception]] = []
        for decoding in finished:
            row = decoding.tag
            if decoding.error is not None:
                failed.append((row, decoding.error))
                continue
            try:
                answered.append((row, self.runner.text_of(decoding)))
            except Exception as error:  # noqa: BLE001 — this row's answer cannot be read; the others can
                failed.append((row, error))
        now = time.perf_counter()
        with self.lock:
            for row, error in failed:
                row.job.fail(row_error(error))
            for job, rows in _group(answered):
                if not job.ended:
                    job.set_rows([r.index for r, _ in rows], [t for _, t in rows], [r.version for r, _ in rows],
                                 now - (job.first_batch or now) - job.compute_seconds)
            self.lock.notify_all()

    def _left_engine(self, engine: ContinuousBatch) -> None:
        """With the lock held: rows that are no longer in the engine are settled (released, failed if unanswered)."""
        live = {id(decoding) for decoding in engine.rows}
        gone = [key for key in self._in_engine if key not in live]
        if gone:
            self._settle([self._in_engine.pop(key) for key in gone],
                         ApiError(500, "internal_error", "the row left the continuous batch without an answer"))

    def _fail_engine(self, engine: ContinuousBatch, error: ApiError) -> None:
        """With the lock held."""
        for decoding in engine.rows:
            decoding.tag.job.fail(error)
        engine.remove(list(engine.rows))
        self._left_engine(engine)


def _batchable(row: RequestRow, head: RequestRow) -> bool:
    """Rows that may share a batch with `head`: any two rows of the continuous engine, else equal keys."""
    if (row.decoding is None) != (head.decoding is None):
        return False
    return row.decoding is not None or row.key == head.key


def _jobs(rows: Sequence[RequestRow]) -> list[Job]:
    return list({id(row.job): row.job for row in rows}.values())


def _group(answered: list[tuple[RequestRow, str]]) -> list[tuple[Job, list[tuple[RequestRow, str]]]]:
    groups: dict[int, tuple[Job, list[tuple[RequestRow, str]]]] = {}
    for row, text in answered:
        groups.setdefault(id(row.job), (row.job, []))[1].append((row, text))
    return list(groups.values())


def row_error(error: BaseException) -> ApiError:
    """The answer of a request whose own row raised."""
    if isinstance(error, ApiError):
        return error
    return ApiError(500, "generation_failed", f"generating this request's text failed: {type(error).__name__}: "
                                              f"{error}")

"""The units of work: a request (`Job`) is rows; compatible rows of many jobs run as one generate call.

Rows are compatible when they share a `BatchKey` (task kind and generation settings); their adapters
may all differ — per-row routing is what lets requests for different adapters share a forward. A
job's result goes back to the event loop it came from through an asyncio future, set thread-safely.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from adaptkit.core.bank import AdaptedModel
from adaptkit.generation.continuous import ContinuousBatch, DecodingRow, first_line_rule, unsupported
from adaptkit.serving.settings import ApiError
from adaptkit.tasks.generate import Generator, tidy
from adaptkit.tasks.translate import Translator

Kind = Literal["translate", "generate"]


@dataclass(frozen=True)
class BatchKey:
    """Rows with equal keys may share one generate call."""

    kind: Kind
    num_beams: int
    max_new_tokens: int


@dataclass(eq=False)
class RequestRow:
    """One text of one request, queued for the scheduler (not `tasks.generate`'s prompt row)."""

    job: Job
    index: int
    key: BatchKey
    adapter: str | None
    text: str
    src_lang: str | None = None
    tgt_lang: str | None = None
    task: str | None = None  # generate rows: translate | style | dialogue (the prompt the adapter was trained with)
    arrived: float = field(default_factory=time.monotonic)
    decoding: DecodingRow | None = None  # set when the row runs in the continuous batch
    version: str | None = None  # checksum of its adapter's file, set when the row is admitted to a batch


class Job:
    """One request's rows. Worker threads fill it; the event loop awaits `future`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, size: int):
        self.loop = loop
        self.future: asyncio.Future[list[str]] = loop.create_future()
        self.results: list[str | None] = [None] * size
        self.versions: list[str | None] = [None] * size  # the adapter file version that produced each row
        self.remaining = size
        self.cancelled = False  # the client went away: rows not yet scheduled are dropped
        self.submitted = time.perf_counter()
        self.first_batch: float | None = None
        self.compute_seconds = 0.0
        self.batches = 0

    @property
    def ended(self) -> bool:
        """Answered, failed or given up: nothing more to compute for it."""
        return self.future.done() or self.remaining <= 0 or self.cancelled

    def started_batch(self, at: float) -> None:
        if self.first_batch is None:
            self.first_batch = at
        self.batches += 1

    def set_rows(self, indices: Sequence[int], texts: Sequence[str], versions: Sequence[str | None],
                 seconds: float) -> None:
        """Called on the worker thread (under the scheduler's lock) for this job's rows of one batch."""
        self.compute_seconds += seconds
        for index, text, version in zip(indices, texts, versions):
            self.results[index] = text
            self.versions[index] = version
        self.remaining -= len(indices)
        if self.remaining <= 0:
            self._call(lambda: self.future.done() or self.future.set_result(list(self.results)))

    def fail(self, error: BaseException) -> None:
        self.remaining = 0
        self._call(lambda: self.future.done() or self.future.set_exception(error))

    def _call(self, fn: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn)
        except RuntimeError:  # the event loop is closed: the server is shutting down, nobody waits
            pass

    def timings(self) -> dict[str, float]:
        now = time.perf_counter()
        queued = (self.first_batch if self.first_batch is not None else now) - self.submitted
        return {"queue_ms": round(1000 * queued, 2), "compute_ms": round(1000 * self.compute_seconds, 2),
                "total_ms": round(1000 * (now - self.submitted), 2), "batches": self.batches}


class BatchRunner:
    """Rows of one key → one generate call with one adapter entry per row: `Translator` for translations
    (prompt by language pair), `Generator` for the rest (prompt by each row's task).

    Greedy rows on a decoder backbone instead join `engine`, a continuous batch (when `continuous`):
    `decoding_row` makes a row the engine can run and `text_of` reads its answer."""

    def __init__(self, model: AdaptedModel, max_batch: int, continuous: bool = True):
        if model.tokenizer is None:
            raise ApiError(500, "no_tokenizer", "the backbone was loaded without a tokenizer; the service needs one")
        self.model = model
        # `run` is the static path (one generate call per batch): the continuous batch is `engine`, driven by the
        # scheduler, so the translator and generator here never decode continuously themselves.
        self.translator = Translator(model, batch_size=max_batch, continuous=False)
        self.generator = Generator(model, batch_size=max_batch, continuous=False)
        self.engine = ContinuousBatch(model) if continuous and unsupported(model) is None else None

    def continuous(self, key: BatchKey) -> bool:
        """Whether rows of this key run in the continuous batch (whatever their max_new_tokens)."""
        return self.engine is not None and key.num_beams == 1

    def decoding_row(self, row: RequestRow) -> DecodingRow | None:
        """The engine's form of a row, prompted as `run` would prompt it; None when it would outgrow a sliding
        window (then it runs in a generate call, as a static batch)."""
        assert self.engine is not None
        if row.key.kind == "translate":
            prompt, one_line = self.translator.decoding_parts(row.text, row.src_lang or "", row.tgt_lang or "")
        else:
            prompt, one_line = self.generator.decoding_parts(row.text, row.adapter, row.task, row.src_lang,
                                                             row.tgt_lang)
        stop = first_line_rule(self.model.tokenizer) if one_line else None
        decoding = DecodingRow(prompt, row.adapter, row.key.max_new_tokens, stop, tag=row)
        return decoding if self.engine.fits(decoding) else None

    def text_of(self, row: DecodingRow) -> str:
        """A finished row's answer, tidied as `run` tidies it (one-line answers are the rows with a stop rule)."""
        return tidy(self.model.tokenizer.decode(row.tokens, skip_special_tokens=True), row.stop is not None)

    def run(self, key: BatchKey, rows: Sequence[RequestRow]) -> list[str]:
        adapters = [row.adapter for row in rows]
        if key.kind == "translate":
            return self.translator.translate([r.text for r in rows], [r.src_lang for r in rows],
                                             [r.tgt_lang for r in rows], adapter=adapters, num_beams=key.num_beams,
                                             max_new_tokens=key.max_new_tokens)
        return self.generator.generate([r.text for r in rows], adapter=adapters, task=[r.task for r in rows],
                                       src_lang=[r.src_lang for r in rows], tgt_lang=[r.tgt_lang for r in rows],
                                       num_beams=key.num_beams, max_new_tokens=key.max_new_tokens)

"""The units of work: a request (`Job`) is rows; compatible rows of many jobs run as one generate call.

Rows are compatible when they share a `BatchKey` (task kind and generation settings); their adapters
may all differ — per-row routing is what lets requests for different adapters share a forward. A
job's result goes back to the event loop it came from through an asyncio future, set thread-safely.

Three kinds of rows: "translate" and "generate" are prompted here, by language pair or task (the native
routes); "complete" rows (the OpenAI routes, `openai_routes.py`) bring their prompt ids and how their
answer is read (`Completion`): greedy ones join the continuous batch like the others, sampled ones run
in static batches of equal sampling settings (`BatchKey.temperature`, `top_p`, `seed`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from adaptkit.core.bank import AdaptedModel
from adaptkit.data import pad_id, pad_sequences
from adaptkit.generation.continuous import ContinuousBatch, DecodingRow, first_line_rule, line_written, unsupported
from adaptkit.serving.settings import ApiError
from adaptkit.tasks.generate import Generator, Settings, tidy
from adaptkit.tasks.translate import Translator

Kind = Literal["translate", "generate", "complete"]
CONTEXT_TOKENS = 8  # prompt tokens decoded in front of a raw completion, so its first word keeps its space


@dataclass(frozen=True)
class BatchKey:
    """Rows with equal keys may share one generate call (sampled rows: only with equal sampling settings, so one
    call's `do_sample`, temperature, top_p and seed hold for every row in it)."""

    kind: Kind
    num_beams: int
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy ("complete" rows only; the native routes are greedy or beam search)
    top_p: float = 1.0
    seed: int | None = None


@dataclass(eq=False)
class Completion:
    """A "complete" row: its prompt ids as they are decoded (no task template is added), how its answer is read,
    and, once answered, its token count and why it ended.

    answer: "raw"   the continuation as written (`completion_text`): a prompt used as given
            "line"  an adapter's task prompt with a one-line answer: stripped and cut at its first line, exactly
                    as /v1/translate and /v1/generate answer ("tidy": stripped only)
    """

    prompt: list[int]
    answer: Literal["raw", "line", "tidy"] = "raw"
    stop: tuple[str, ...] = ()  # the answer ends before the first of these (OpenAI's `stop`)
    on_token: Callable[[int], None] | None = None  # each token as it is written (streaming), on the worker thread
    completion_tokens: int = 0  # set when answered
    finish_reason: Literal["stop", "length"] | None = None


def completion_text(tokenizer: Any, completion: Completion, tokens: Sequence[int]) -> tuple[str, bool]:
    """The answer of `tokens` so far, cut before the first stop string; and whether it has ended there (a stop
    string, or a one-line answer's line written).

    A raw continuation is decoded behind the last prompt tokens and the prompt's text taken off: decoded alone,
    many tokenizers (SentencePiece) would drop the space its first word starts with."""
    if completion.answer == "raw":
        context = list(completion.prompt[-CONTEXT_TOKENS:])
        head = _decode(tokenizer, context)
        full = _decode(tokenizer, context + list(tokens))
        text = full[len(head):] if full.startswith(head) else _decode(tokenizer, tokens)
        ended = False
    else:
        raw = _decode(tokenizer, tokens)
        one_line = completion.answer == "line"
        text, ended = tidy(raw, one_line), one_line and line_written(raw)
    cuts = [text.find(stop) for stop in completion.stop if stop in text]
    if cuts:
        return text[:min(cuts)], True
    return text, ended


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    # No clean-up of spaces before punctuation: it would rewrite text already streamed as more tokens come.
    return tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)


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
    completion: Completion | None = None  # "complete" rows: the prompt as given, how the answer is read
    first_token: float | None = None  # time.monotonic() of its first and latest token (latency metrics)
    last_token: float | None = None


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

    Greedy rows instead join `engine`, a continuous batch (when `continuous`, on a decoder-only or encoder-decoder
    backbone the engine runs; `unsupported` says why not otherwise): `decoding_row` makes a row the engine can
    run and `text_of` reads its answer."""

    def __init__(self, model: AdaptedModel, max_batch: int, continuous: bool = True):
        if model.tokenizer is None:
            raise ApiError(500, "no_tokenizer", "the backbone was loaded without a tokenizer; the service needs one")
        self.model = model
        # `run` is the static path (one generate call per batch): the continuous batch is `engine`, driven by the
        # scheduler, so the translator and generator here never decode continuously themselves.
        self.translator = Translator(model, batch_size=max_batch, continuous=False)
        self.generator = Generator(model, batch_size=max_batch, continuous=False)
        self.engine = (ContinuousBatch(model, max_rows=max_batch) if continuous and unsupported(model) is None
                       else None)
        config = model.model.generation_config
        eos = config.eos_token_id  # the engine's end-of-sequence rule, for "complete" rows in static batches
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        # Set by the driver when the service keeps metrics: called on the worker thread with the rows of a static
        # "complete" batch that wrote a token at one step (the continuous batch's steps the driver sees itself).
        self.tokens_written: Callable[[Sequence[RequestRow]], None] | None = None

    def continuous(self, key: BatchKey) -> bool:
        """Whether rows of this key run in the continuous batch (whatever their max_new_tokens): greedy ones."""
        return self.engine is not None and key.num_beams == 1 and key.temperature == 0

    def decoding_row(self, row: RequestRow) -> DecodingRow | None:
        """The engine's form of a row, prompted as `run` would prompt it; None when it would outgrow a sliding
        window (then it runs in a generate call, as a static batch)."""
        assert self.engine is not None
        if row.completion is not None:
            decoding = self._completion_row(row)
            return decoding if self.engine.fits(decoding) else None
        if row.key.kind == "translate":
            prompt, one_line = self.translator.decoding_parts(row.text, row.src_lang or "", row.tgt_lang or "")
        else:
            prompt, one_line = self.generator.decoding_parts(row.text, row.adapter, row.task, row.src_lang,
                                                             row.tgt_lang)
        stop = first_line_rule(self.model.tokenizer) if one_line else None
        decoding = DecodingRow(prompt, row.adapter, row.key.max_new_tokens, stop, tag=row)
        return decoding if self.engine.fits(decoding) else None

    def _completion_row(self, row: RequestRow) -> DecodingRow:
        """A "complete" row as the engine (or a static batch's watcher) decodes it: it ends at eos, at its budget, or
        where `completion_text` says its answer ended (a stop string, a one-line answer's line)."""
        completion = row.completion
        assert completion is not None
        tokenizer = self.model.tokenizer
        ends = completion.stop or completion.answer == "line"
        stop = (lambda ids: completion_text(tokenizer, completion, ids)[1]) if ends else None
        return DecodingRow(list(completion.prompt), row.adapter, row.key.max_new_tokens, stop, tag=row,
                           on_token=completion.on_token)

    def text_of(self, row: DecodingRow) -> str:
        """A finished row's answer, tidied as `run` tidies it (one-line answers are the rows with a stop rule);
        a "complete" row's read by `completion_text`, with its token count and finish reason set."""
        request = row.tag
        if isinstance(request, RequestRow) and request.completion is not None:
            completion = request.completion
            text, ended = completion_text(self.model.tokenizer, completion, row.tokens)
            completion.completion_tokens = len(row.tokens)
            stopped = ended or (bool(row.tokens) and row.tokens[-1] in self.eos)
            completion.finish_reason = "stop" if stopped or len(row.tokens) < row.max_new_tokens else "length"
            return text
        return tidy(self.model.tokenizer.decode(row.tokens, skip_special_tokens=True), row.stop is not None)

    def run(self, key: BatchKey, rows: Sequence[RequestRow]) -> list[str]:
        if key.kind == "complete":
            return self._complete(key, rows)
        adapters = [row.adapter for row in rows]
        if key.kind == "translate":
            return self.translator.translate([r.text for r in rows], [r.src_lang for r in rows],
                                             [r.tgt_lang for r in rows], adapter=adapters, num_beams=key.num_beams,
                                             max_new_tokens=key.max_new_tokens)
        return self.generator.generate([r.text for r in rows], adapter=adapters, task=[r.task for r in rows],
                                       src_lang=[r.src_lang for r in rows], tgt_lang=[r.tgt_lang for r in rows],
                                       num_beams=key.num_beams, max_new_tokens=key.max_new_tokens)

    def _complete(self, key: BatchKey, rows: Sequence[RequestRow]) -> list[str]:
        """Rows of kind "complete" in one `generate` call: sampled (temperature > 0, top_p, seeded per call), or greedy
        where the continuous batch does not run them. A watcher ends each row by the engine's rule and streams its
        tokens, so a greedy row's answer here is the one the continuous batch gives."""
        tokenizer = self.model.tokenizer
        decoding = [self._completion_row(row) for row in rows]
        device = next(self.model.model.parameters()).device
        ids = pad_sequences([d.prompt for d in decoding], pad_id(tokenizer), left=True).to(device)
        mask = pad_sequences([[1] * len(d.prompt) for d in decoding], 0, left=True).to(device)
        settings = Settings(max_new_tokens=key.max_new_tokens, temperature=key.temperature, top_p=key.top_p,
                            seed=key.seed)
        kwargs = settings.generate_kwargs()
        if tokenizer.pad_token_id is None:
            kwargs["pad_token_id"] = tokenizer.eos_token_id
        watch = _Watch(decoding, self.eos, self.tokens_written)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=key.seed is not None):  # the caller's state kept
            if key.seed is not None:
                torch.manual_seed(key.seed)
            self.model.generate(input_ids=ids, attention_mask=mask, adapter=[row.adapter for row in rows],
                                stopping_criteria=StoppingCriteriaList([watch]), **kwargs)
        for row in decoding:
            if row.error is not None:  # its streamer raised: this row fails (the driver runs each row alone)
                raise row.error
        return [self.text_of(row) for row in decoding]


class _Watch(StoppingCriteria):
    """Ends each row of a static batch by the continuous engine's rule (eos, budget, its stop rule), and hands each
    token to the row's `on_token` as it is written."""

    def __init__(self, rows: list[DecodingRow], eos: set[int],
                 written: Callable[[Sequence[RequestRow]], None] | None):
        self.rows, self.eos, self.written = rows, eos, written
        self.done = [False] * len(rows)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        newest = input_ids[:, -1].tolist()
        wrote = []
        for i, row in enumerate(self.rows):
            if self.done[i]:
                continue
            wrote.append(row.tag)
            row.tokens.append(newest[i])
            try:
                if row.on_token is not None:
                    row.on_token(newest[i])
                self.done[i] = (newest[i] in self.eos or len(row.tokens) >= row.max_new_tokens
                                or (row.stop is not None and row.stop(row.tokens)))
            except Exception as error:  # noqa: BLE001 — this row's own callback: it ends, the others go on
                row.error, self.done[i] = error, True
        if self.written is not None and wrote:
            self.written(wrote)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

"""`POST /v1/generate` with `"stream": true`: one prompt's output as server-sent events, token by token.

Where the service batches continuously (greedy rows on a decoder backbone), a stream is one more row of
the continuous batch: each token the engine writes for it goes through transformers' `TextStreamer` logic
(whole words, no half characters) to the client, and the row leaves the batch when it is done or the
client is gone. Otherwise a stream runs `Generator.stream` (`TextIteratorStreamer`) in its own worker
thread, beside the scheduler's static batches (which answer only when their longest row ends); the bank
keeps the two apart (routing per context, adapters pinned while a call uses them), and `max_streams`
bounds how many such threads run at once. Either way the pieces join to the `outputs[0]` the same request
gets without `stream`.

Events: `data: {"text": piece}` per piece, then `event: done` with `{"adapter", "output", "timings"}`, or
`event: error` with the JSON error body if generation fails midway. A client that disconnects stops the
worker at its next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import torch
from fastapi import Request
from fastapi.responses import StreamingResponse
from transformers import TextStreamer

from adaptkit.core.errors import AdapterError
from adaptkit.serving.driver import row_error
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import BatchKey, Job, RequestRow
from adaptkit.tasks.generate import Generator, Tidier

_END = object()


def event(data: dict[str, Any], name: str | None = None) -> str:
    return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Streams:
    """Streaming generations of one service: rows of the continuous batch where there is one, else threads
    beside the batches, at most `settings.max_streams` of those at once (503 beyond)."""

    def __init__(self, generator: Generator, settings: ServeSettings, metrics: ServeMetrics,
                 scheduler: Scheduler | None = None):
        self.generator, self.settings, self.metrics, self.scheduler = generator, settings, metrics, scheduler
        self.running = 0  # threads running; changed on the event loop only

    async def __call__(self, request: Request, key: BatchKey, text: str, adapter: str | None, src: str | None,
                       tgt: str | None, task: str | None) -> StreamingResponse:
        if self.scheduler is not None and self.scheduler.runner.continuous(key):
            row = RequestRow(Job(asyncio.get_running_loop(), 1), 0, key, adapter, text, src, tgt, task)
            try:  # a bad row (unknown task, no prompt) is refused before any event is sent
                row.decoding = self.scheduler.runner.decoding_row(row)
            except AdapterError as error:
                raise ApiError(422, "bad_stream_request", str(error)) from None
            except Exception as error:  # noqa: BLE001 — this request's own text cannot be prompted
                raise row_error(error) from None
            if row.decoding is not None:  # (None: too long for the backbone's sliding window)
                return self._in_the_batch(request, row)
        if self.running >= self.settings.max_streams:
            raise ApiError(503, "streams_busy", f"{self.running} streams are running, the limit (--max-streams); "
                           "retry shortly, or ask without stream",
                           headers={"Retry-After": str(self.settings.retry_after_s)})
        started = time.perf_counter()
        try:  # a bad row (unknown task, no prompt) is refused before any event is sent
            pieces = self.generator.stream(text, adapter=adapter, task=task, src_lang=src, tgt_lang=tgt,
                                           max_new_tokens=key.max_new_tokens)
        except AdapterError as error:
            raise ApiError(422, "bad_stream_request", str(error)) from None
        self.running += 1
        self.metrics.requests.labels("/v1/generate", adapter or "").inc()
        # Started here, not when the body is first iterated: the slot is given back when generation ends even
        # if the client is gone before the response starts (the body is then never iterated).
        queue, stop = self._start(pieces, adapter)
        return _response(self._events(request, queue, stop.set, adapter, started))

    def _in_the_batch(self, request: Request, row: RequestRow) -> StreamingResponse:
        """Submit the row to the scheduler; its tokens come back as pieces while it decodes with the others."""
        started, loop, queue = time.perf_counter(), asyncio.get_running_loop(), asyncio.Queue()
        job, decoding = row.job, row.decoding
        assert decoding is not None

        def push(item: Any) -> None:  # from the worker thread while the row decodes, in order
            loop.call_soon_threadsafe(queue.put_nowait, item)

        tidier = Tidier(decoding.stop is not None)  # a one-line reply is cut at its first line, as without stream
        streamer = _PieceStreamer(self.generator.model.tokenizer, lambda piece: push(tidier.feed(piece) or None))
        decoding.on_token = lambda token: streamer.put(torch.tensor([token]))

        def finished(future: asyncio.Future) -> None:  # on the event loop, after every piece pushed so far
            if future.cancelled():
                push(_END)
                return
            if future.exception() is not None:
                push(future.exception())
                return
            streamer.end()
            push(tidier.finish() or None)
            push(_END)

        self.scheduler.submit(job, [row])
        job.future.add_done_callback(finished)
        self.metrics.requests.labels("/v1/generate", row.adapter or "").inc()
        return _response(self._events(request, queue, lambda: self.scheduler.cancel(job), row.adapter, started))

    def _start(self, pieces: Iterator[str], adapter: str | None) -> tuple[asyncio.Queue, threading.Event]:
        loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        hold = self.scheduler.hold if self.scheduler is not None else _no_hold

        def pump() -> None:
            """Iterates the pieces in one thread (a generator cannot be closed from another while it runs), with
            the adapter held resident by the scheduler, which owns the bank."""
            try:
                with hold(adapter, self.settings.request_timeout_s):
                    for piece in pieces:
                        loop.call_soon_threadsafe(queue.put_nowait, piece)
                        if stop.is_set():
                            break
            except Exception as error:  # noqa: BLE001 - handed to the event loop, sent as an error event
                loop.call_soon_threadsafe(queue.put_nowait, error)
            finally:
                pieces.close()  # stops generation at its next token and joins its worker
                loop.call_soon_threadsafe(self._ended, queue)

        threading.Thread(target=pump, name="adaptkit-sse", daemon=True).start()
        return queue, stop

    async def _events(self, request: Request, queue: asyncio.Queue, stop: Callable[[], Any], adapter: str | None,
                      started: float) -> AsyncIterator[str]:
        output, first = [], None
        deadline = started + self.settings.request_timeout_s
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.perf_counter()))
                except asyncio.TimeoutError:
                    item = ApiError(504, "request_timeout", f"the stream did not end within "
                                    f"{self.settings.request_timeout_s:g} s (--request-timeout-s)")
                if item is _END:
                    break
                if item is None:  # nothing new to send yet (held back by the streamer or the tidier)
                    continue
                if isinstance(item, Exception):
                    error = item if isinstance(item, ApiError) else row_error(item)
                    self.metrics.errors.labels("/v1/generate", adapter or "", error.code).inc()
                    yield event(error.body(), "error")
                    return
                if first is None:
                    first = time.perf_counter() - started
                output.append(item)
                yield event({"text": item})
                if await request.is_disconnected():
                    return
            yield event({"adapter": adapter, "output": "".join(output),
                         "timings": {"first_piece_ms": round(1000 * (first or 0.0), 1),
                                     "total_ms": round(1000 * (time.perf_counter() - started), 1)}}, "done")
        finally:
            stop()  # a client gone: generation stops at its next token

    def _ended(self, queue: asyncio.Queue) -> None:
        self.running -= 1  # counted until the generation thread is really done, not when the client left
        queue.put_nowait(_END)


class _PieceStreamer(TextStreamer):
    """transformers' streamer logic (text released word by word, never half a character), pieces to `emit`."""

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]):
        super().__init__(tokenizer, skip_prompt=False, skip_special_tokens=True)
        self.emit = emit

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if text:
            self.emit(text)


@contextlib.contextmanager
def _no_hold(adapter: str | None, timeout: float) -> Iterator[None]:
    yield None


def _response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

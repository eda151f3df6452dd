"""`POST /v1/generate` with `"stream": true`: one prompt's output as server-sent events, token by token.

A stream runs `Generator.stream` (transformers' `TextIteratorStreamer`) in its own worker thread, beside
the scheduler's batches rather than inside them: a batch only answers when its longest row ends, and a
stream is there to show the first words at once. The bank keeps the two apart (routing per context,
adapters pinned while a call uses them), and `max_streams` bounds how many run at once. The pieces join to
the `outputs[0]` the same request gets without `stream` (the scheduler's batch output equals each row
served alone, and `Generator.stream` equals `generate` for one row).

Events: `data: {"text": piece}` per piece, then `event: done` with `{"adapter", "output", "timings"}`, or
`event: error` with the JSON error body if generation fails midway. A client that disconnects stops the
worker at its next token.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from adaptkit.core.errors import AdapterError
from adaptkit.serving.metrics import ServeMetrics
from adaptkit.serving.settings import ApiError, ServeSettings
from adaptkit.serving.work import BatchKey
from adaptkit.tasks.generate import Generator

_END = object()


def event(data: dict[str, Any], name: str | None = None) -> str:
    return (f"event: {name}\n" if name else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Streams:
    """Streaming generations of one service: at most `settings.max_streams` at once (503 beyond)."""

    def __init__(self, generator: Generator, settings: ServeSettings, metrics: ServeMetrics):
        self.generator, self.settings, self.metrics = generator, settings, metrics
        self.running = 0  # changed on the event loop only

    async def __call__(self, request: Request, key: BatchKey, text: str, adapter: str | None, src: str | None,
                       tgt: str | None, task: str | None) -> StreamingResponse:
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
        queue, stop = self._start(pieces)
        return StreamingResponse(self._events(request, queue, stop, adapter, started), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _start(self, pieces: Iterator[str]) -> tuple[asyncio.Queue, threading.Event]:
        loop, queue, stop = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def pump() -> None:
            """Iterates the pieces in one thread (a generator cannot be closed from another while it runs)."""
            try:
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

    async def _events(self, request: Request, queue: asyncio.Queue, stop: threading.Event, adapter: str | None,
                      started: float) -> AsyncIterator[str]:
        output, first = [], None
        try:
            while (item := await queue.get()) is not _END:
                if isinstance(item, Exception):
                    self.metrics.errors.labels("/v1/generate", adapter or "", "generation_failed").inc()
                    yield event({"error": {"code": "generation_failed",
                                           "message": f"{type(item).__name__}: {item}"}}, "error")
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
            stop.set()  # a client gone: the pump stops at the next piece

    def _ended(self, queue: asyncio.Queue) -> None:
        self.running -= 1  # counted until the generation thread is really done, not when the client left
        queue.put_nowait(_END)

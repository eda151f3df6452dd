"""OpenAI-style streaming for `openai_routes.py`: an answer's rows as `text_completion` / `chat.completion.chunk`
server-sent events, token by token as the scheduler writes them, ending in `data: [DONE]`."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from adaptkit.serving.scheduler import Scheduler
from adaptkit.serving.settings import ApiError
from adaptkit.serving.work import Completion, Job, RequestRow, completion_text

_END = object()
log = logging.getLogger("adaptkit.serving")


class Answer:
    """One request's rows, and which row answers each choice (n greedy choices share one row)."""

    def __init__(self, job: Job, rows: list[RequestRow], choices: list[int], prompt_tokens: list[int]):
        self.job, self.rows, self.choices, self.prompt_tokens = job, rows, choices, prompt_tokens
        self.completions = [row.completion for row in rows if row.completion is not None]


def _releasable(text: str, completion: Completion, ended: bool) -> str:
    """What of the answer so far may be streamed: not a character whose bytes are still coming, and not an ending
    that may be the start of a stop string (the answer would end before it)."""
    if ended:
        return text
    text = text.rstrip("\ufffd")
    held = 0
    for stop in completion.stop:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return text[:len(text) - held]


def _event(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def stream_answer(request: Request, answer: Answer, head: dict[str, Any], chat: bool, include_usage: bool,
            submit: Callable[[], None], usage: Callable[[Answer], dict[str, int]],
            fingerprint: Callable[[Answer], str | None], tokenizer: Any, timeout_s: float,
            scheduler: Scheduler) -> StreamingResponse:
    """OpenAI's server-sent events: a chunk per piece of each choice, a last chunk per choice with its
    finish_reason, the usage chunk if asked for, then `data: [DONE]`. The pieces join to the answer the same
    request gets without stream: both are `completion_text` of the same tokens."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    job = answer.job
    for number, completion in enumerate(answer.completions):
        completion.on_token = lambda token, number=number: _push(loop, queue, (number, token))
    submit()  # refused here (queue full, not ready) → an error answer, before any event

    def ended(future: asyncio.Future) -> None:  # on the loop, after every token pushed before the answer
        if not future.cancelled():
            future.exception()  # read here: a client gone before the end never reads it, and asyncio would log it
        queue.put_nowait(_END)

    job.future.add_done_callback(ended)
    chunk_object = "chat.completion.chunk" if chat else "text_completion"
    by_row: dict[int, list[int]] = {}
    for index, row in enumerate(answer.choices):
        by_row.setdefault(row, []).append(index)

    def chunk(indices: Sequence[int], text: str | None, finish: str | None, role: bool = False) -> str:
        choices = []
        for index in indices:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else (
                    {} if text is None else {"content": text})
                choices.append({"index": index, "delta": delta, "logprobs": None, "finish_reason": finish})
            else:
                choices.append({"index": index, "text": text or "", "logprobs": None, "finish_reason": finish})
        data = {**head, "object": chunk_object, "system_fingerprint": fingerprint(answer), "choices": choices}
        if include_usage:
            data["usage"] = None
        return _event(data)

    async def events() -> AsyncIterator[str]:
        tokens: list[list[int]] = [[] for _ in answer.rows]
        sent = [""] * len(answer.rows)
        deadline = time.monotonic() + timeout_s
        try:
            if chat:  # OpenAI's first chunk: the role, no content yet
                yield chunk(range(len(answer.choices)), None, None, role=True)
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    error = ApiError(504, "request_timeout", f"the stream did not end within {timeout_s:g} s "
                                     "(--request-timeout-s)")
                    yield _event(error.openai_body())
                    yield _event("[DONE]")
                    return
                if item is _END:
                    break
                number, token = item
                completion = answer.completions[number]
                tokens[number].append(token)
                text, ended = completion_text(tokenizer, completion, tokens[number])
                ready = _releasable(text, completion, ended)
                if ready.startswith(sent[number]) and len(ready) > len(sent[number]):
                    piece, sent[number] = ready[len(sent[number]):], ready
                    yield chunk(by_row[number], piece, None)
                    if await request.is_disconnected():
                        return
            if job.future.cancelled() or job.future.exception() is not None:
                failure = None if job.future.cancelled() else job.future.exception()
                error = failure if isinstance(failure, ApiError) else ApiError(
                    500, "generation_failed", f"generating this request's text failed: {failure!r}")
                yield _event(error.openai_body())
                yield _event("[DONE]")
                return
            texts = job.future.result()
            for number, completion in enumerate(answer.completions):
                rest = texts[number][len(sent[number]):] if texts[number].startswith(sent[number]) else ""
                if not texts[number].startswith(sent[number]):  # a tokenizer whose text changes behind what was sent
                    log.warning("a streamed answer's pieces do not join to its answer: %r is not a prefix of %r",
                                sent[number], texts[number])
                if rest:
                    yield chunk(by_row[number], rest, None)
                yield chunk(by_row[number], None, completion.finish_reason)
            if include_usage:
                yield _event({**head, "object": chunk_object, "system_fingerprint": fingerprint(answer),
                              "choices": [], "usage": usage(answer)})
            yield _event("[DONE]")
        finally:
            if not job.ended:  # a client gone: its rows leave the batch at the next step
                scheduler.cancel(job)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _push(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: Any) -> None:
    """From the worker thread, in order; a closed loop (the server stopping) drops it."""
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:
        pass

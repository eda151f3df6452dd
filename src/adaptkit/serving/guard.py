"""The edge of the service, in front of every route: API keys, the body-size limit, the body timeout,
per-route latency and status metrics (an ASGI middleware), and the handlers that turn every error into
the same JSON shape: {"error": {"code", "message", "limit"?}} — on the OpenAI-compatible paths OpenAI's
{"error": {"message", "type", "code", "param"}}, so OpenAI SDKs read every error there, a missing key's too.

No route answers plain text: a catch-all handler answers any unexpected exception with a JSON 500, and
the JSON itself is rendered so that it cannot fail (text that UTF-8 cannot encode, such as a lone
surrogate echoed from a request, is escaped).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptkit.serving.metrics import ServeMetrics, route_label
from adaptkit.serving.settings import ApiError, ServeSettings, openai_path

logger = logging.getLogger("adaptkit.serving")

# Answers sent before the body was read to its end: the connection cannot carry another request, and
# without this header a client would go on sending a body nobody reads.
CLOSE = {"Connection": "close"}


class BodyTooLarge(HTTPException):
    """Raised from the guarded `receive` once the body passes its limit; FastAPI re-raises HTTPExceptions."""

    def __init__(self, limit_name: str, limit: int):
        super().__init__(413)
        self.error = ApiError(413, "body_too_large", f"the request body is over {limit} bytes "
                              f"(--{limit_name.replace('_', '-')})", limit=(limit_name, limit), headers=dict(CLOSE))


class BodyTimeout(HTTPException):
    """Raised from the guarded `receive` when the body stalls or falls behind --min-body-rate."""

    def __init__(self, message: str, limit: tuple[str, Any]):
        super().__init__(408)
        self.error = ApiError(408, "body_timeout", message, limit=limit, headers=dict(CLOSE))


# Served without a key: liveness, and the playground's static files (serving/playground.py): they hold no data,
# a browser cannot send a Bearer header when it navigates, and every call the page makes sends the user's key.
OPEN_PATHS = frozenset({"/healthz", "/", "/playground.js", "/playground.css"})

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def printable(value: Any) -> Any:
    """`value` with every string UTF-8 can encode: a lone surrogate becomes its escape, as text (`\\ud800`)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode("utf-8")
        return value
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [printable(v) for v in value]
    return value


_UNRENDERABLE = b'{"error":{"code":"internal_error","message":"the error could not be rendered; see the server log"}}'


def render_error(error: ApiError, openai: bool = False) -> bytes:
    """The JSON body of `error` (in OpenAI's shape with `openai`), always: the answer to a bad request must not
    become a crash of its own."""
    try:
        return json.dumps(printable(error.openai_body() if openai else error.body()), ensure_ascii=False,
                          allow_nan=False,
                          separators=(",", ":")).encode("utf-8")
    except Exception:  # noqa: BLE001 - e.g. a limit value that JSON cannot hold
        logger.exception("could not render the error %r", error.code)
        return _UNRENDERABLE


class ErrorResponse(JSONResponse):
    """A JSONResponse of an ApiError, rendered by `render_error` (OpenAI's shape with `openai`)."""

    def __init__(self, error: ApiError, openai: bool = False):
        self.openai = openai  # (read by render, which the constructor calls)
        super().__init__(error, status_code=error.status, headers=error.headers)

    def render(self, content: Any) -> bytes:
        return render_error(content, self.openai) if isinstance(content, ApiError) else super().render(content)


def add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    def answer(request: Request, error: ApiError) -> JSONResponse:
        adapters = getattr(request.state, "adapters", None) or [""]
        for adapter in adapters:
            metrics.errors.labels(route_label(request.url.path), printable(adapter), error.code).inc()
        return ErrorResponse(error, openai_path(request.url.path))

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            detail = next(e for e in errors if e.get("type") == "json_invalid")
            return answer(request, ApiError(400, "bad_json", "the body is not valid JSON: "
                                            f"{(detail.get('ctx') or {}).get('error', 'decode error')} at position "
                                            f"{detail.get('loc', ('', '?'))[-1]}"))
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                 for e in errors[:5]]
        # text UTF-8 cannot encode has a code of its own: the fix is in the client's text, not its fields
        code = "invalid_text" if errors and all(e.get("type") == "invalid_text" for e in errors) else "invalid_request"
        field = ".".join(str(p) for p in errors[0].get("loc", ()) if p != "body") if errors else ""
        return answer(request, ApiError(422, code, "; ".join(parts), param=field or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, (BodyTooLarge, BodyTimeout)):
            return answer(request, exc.error)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return answer(request, ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette answers with this, then re-raises: the traceback still reaches the server log.
        return answer(request, ApiError(500, "internal_error", f"the service failed ({type(exc).__name__}); "
                                        "the server log has the details. Retry, or report it if it persists"))


class Guard:
    """Outermost ASGI layer: latency and status metrics, API keys, the body-size limit and the body timeout."""

    def __init__(self, app: Any, settings: ServeSettings, metrics: ServeMetrics, api_keys: tuple[str, ...]):
        self.app = app
        self.settings = settings
        self.metrics = metrics
        self.keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, route = scope["path"], route_label(scope["path"])
        started = time.perf_counter()
        state = {"status": 500, "started": False}

        async def send_tracked(message: dict) -> None:
            if message["type"] == "http.response.start":
                state["status"], state["started"] = message["status"], True
            await send(message)

        try:
            if self.keys and path not in OPEN_PATHS and not self._authorized(scope):
                await self._reject(scope, send_tracked, route, ApiError(
                    401, "unauthorized", "this service needs an API key: send 'Authorization: Bearer <key>'",
                    headers={"WWW-Authenticate": "Bearer"}))
                return
            uploading = path == "/v1/adapters" and scope["method"] == "POST"
            limit_name = "max_upload_bytes" if uploading else "max_body_bytes"
            limit = getattr(self.settings, limit_name)
            declared = _header(scope, b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > limit):
                await self._reject(scope, send_tracked, route, BodyTooLarge(limit_name, limit).error)
                return
            receive_limited = self._bounded_receive(receive, limit_name, limit)
            try:
                await self.app(scope, receive_limited, send_tracked)
            except (BodyTooLarge, BodyTimeout) as exc:  # read outside FastAPI's body parsing (e.g. by a middleware)
                if state["started"]:
                    raise
                await self._reject(scope, send_tracked, route, exc.error)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.responses.labels(route, str(state["status"])).inc()

    def _bounded_receive(self, receive: Any, limit_name: str, limit: int) -> Any:
        """`receive` with the size limit and, until the body's last piece, the body timeout.

        A client that stops sending, or trickles a byte at a time, would otherwise hold its connection
        and the request's task forever. Each piece must come within --body-timeout-s, and the whole body
        within --body-timeout-s plus 1 s per --min-body-rate bytes (Apache's mod_reqtimeout rule): a body
        that keeps up any sensible rate is never cut, one byte a second is. After the last piece, receive
        is left alone: it then waits for the client's disconnect, as long as the request runs.
        """
        settings = self.settings
        stall, rate = settings.body_timeout_s, settings.min_body_rate
        began = time.monotonic()
        seen = 0
        done = False

        async def receive_limited() -> dict:
            nonlocal seen, done
            if done:
                return await receive()
            wait = stall
            if rate > 0:
                wait = min(wait, began + stall + seen / rate - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), timeout=max(wait, 0.0))
            except asyncio.TimeoutError:  # TimeoutError from 3.11 on; its own class before
                if rate > 0 and wait < stall:
                    raise BodyTimeout(f"the request body came slower than {rate} bytes/s ({seen} bytes in "
                                      f"{time.monotonic() - began:.1f} s); send it faster, or raise "
                                      "--min-body-rate", ("min_body_rate", rate)) from None
                raise BodyTimeout(f"the request body stalled: nothing came for {stall:g} s after {seen} bytes; "
                                  "send the whole body, or raise --body-timeout-s", ("body_timeout_s", stall)) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit_name, limit)
                done = not message.get("more_body", False)
            else:  # http.disconnect: nothing more will come
                done = True
            return message

        return receive_limited

    def _authorized(self, scope: dict) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        given = token.strip().encode()
        matched = False
        for key in self.keys:  # every key compared, in constant time: no early exit to time
            matched |= hmac.compare_digest(given, key)
        return matched

    async def _reject(self, scope: dict, send: Any, route: str, error: ApiError) -> None:
        self.metrics.errors.labels(route, "", error.code).inc()
        await ErrorResponse(error, openai_path(scope["path"]))(scope, _no_receive, send)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}

"""The edge of the service, in front of every route: API keys, the body-size limit, per-route latency and
status metrics (an ASGI middleware), and the handlers that turn every error into the same JSON shape:
{"error": {"code", "message", "limit"?}}.
"""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adaptkit.serving.metrics import ServeMetrics, route_label
from adaptkit.serving.settings import ApiError, ServeSettings


class BodyTooLarge(HTTPException):
    """Raised from the guarded `receive` once the body passes its limit; FastAPI re-raises HTTPExceptions."""

    def __init__(self, limit_name: str, limit: int):
        super().__init__(413)
        self.error = ApiError(413, "body_too_large", f"the request body is over {limit} bytes "
                              f"(--{limit_name.replace('_', '-')})", limit=(limit_name, limit))


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


def add_error_handlers(app: FastAPI, metrics: ServeMetrics) -> None:
    def answer(request: Request, error: ApiError) -> JSONResponse:
        adapters = getattr(request.state, "adapters", None) or [""]
        for adapter in adapters:
            metrics.errors.labels(route_label(request.url.path), adapter, error.code).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

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
        return answer(request, ApiError(422, "invalid_request", "; ".join(parts)))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc, BodyTooLarge):
            return answer(request, exc.error)
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return answer(request, ApiError(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {})))


class Guard:
    """Outermost ASGI layer: latency and status metrics, API keys, and the body-size limit."""

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
            if self.keys and path != "/healthz" and not self._authorized(scope):
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
            seen = 0

            async def receive_limited() -> dict:
                nonlocal seen
                message = await receive()
                if message["type"] == "http.request":
                    seen += len(message.get("body", b""))
                    if seen > limit:
                        raise BodyTooLarge(limit_name, limit)
                return message

            try:
                await self.app(scope, receive_limited, send_tracked)
            except BodyTooLarge as exc:  # read outside FastAPI's body parsing (e.g. by a middleware)
                if state["started"]:
                    raise
                await self._reject(scope, send_tracked, route, exc.error)
        finally:
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
            self.metrics.responses.labels(route, str(state["status"])).inc()

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
        response = JSONResponse(error.body(), status_code=error.status, headers=error.headers)
        await response(scope, _no_receive, send)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


async def _no_receive() -> dict:
    return {"type": "http.disconnect"}

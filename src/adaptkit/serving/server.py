"""The service in uvicorn, with limits on what one client can hold: `run_server(app, settings)`.

Plain `uvicorn.run` let any client take the service down without a key: it never closes a connection
that has not sent a whole request (uvicorn's keep-alive timer starts only after a first response), it
accepts connections until the process runs out of file descriptors (then every request fails), and
it waits for a body for ever. Here:

- uvicorn's own settings where they exist: `timeout_keep_alive` (--keep-alive-s) closes idle
  keep-alive connections; `h11_max_incomplete_event_size` (--max-header-bytes) bounds a request head,
  so the h11 protocol is used (httptools has no such bound).
- a header timeout (--header-timeout-s): a connection has that long, from its first byte or its
  connect, to send a complete request line and headers; then `408 header_timeout` (or, if it sent
  nothing, a silent close).
- a connection cap (--max-connections): past it, the connection that has waited longest without
  sending a request (a half-sent head, an idle keep-alive) is closed to make room, at once; when every
  connection is busy with a request, the newcomer gets `503 too_many_connections` and is closed. So a
  flood of half-open connections cannot keep a real client out, and descriptors never run out: the
  soft RLIMIT_NOFILE is raised (up to the hard limit) to hold the cap plus FD_RESERVE, and the cap is
  lowered, with a warning, when the hard limit is too small.
- the body timeout (--body-timeout-s, --min-body-rate) is the Guard's (guard.py): a stalled or
  trickling body gets `408 body_timeout`.

uvicorn's `limit_concurrency` is left off: it answers plain-text 503s to requests once there are N
connections, but neither closes a connection nor refuses one, so it would refuse real clients while
half-open connections sit. Every error written here is the service's JSON error.
"""

from __future__ import annotations

import asyncio
import http
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, ClassVar

try:
    import resource  # POSIX only
except ImportError:  # Windows: no open-file limit to raise
    resource = None  # type: ignore[assignment]

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from adaptkit.core.errors import AdapterError
from adaptkit.serving.guard import render_error
from adaptkit.serving.settings import ApiError, ServeSettings

logger = logging.getLogger("adaptkit.serving")

FD_RESERVE = 128  # descriptors beside the connections: the store's files, uploads, logs, libraries, pipes
ANSWER_MARGIN_S = 5.0  # after the shutdown grace, time for the 503s to be written before uvicorn cancels


class ConnectionLimits:
    """What the connections of one server share: the cap, the header timeout, which are open and which idle."""

    def __init__(self, cap: int, header_timeout_s: float):
        self.cap = cap
        self.header_timeout_s = header_timeout_s
        self.open: set[LimitedH11Protocol] = set()
        # connections waiting for a request head, longest waiting first (a dict is an ordered set)
        self.idle: dict[LimitedH11Protocol, None] = {}


class LimitedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the header timeout and the connection cap; `limits` is set per server."""

    limits: ClassVar[ConnectionLimits]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = False  # this request's head has begun
        self._seen: object = None  # the request cycle whose head came last
        limits = self.limits
        limits.open.add(self)
        self._wait_for_head(arm=True)
        if len(limits.open) > limits.cap:
            victim = next((c for c in limits.idle if c is not self), None)
            busy = ApiError(503, "too_many_connections", f"the service holds {limits.cap} connections at most "
                            "(--max-connections) and all are busy; retry shortly",
                            limit=("max_connections", limits.cap), headers={"Retry-After": "1"})
            if victim is not None:  # room for the newcomer: a client that sends its request at once gets served
                victim._close(busy if victim._head_bytes else None)
            else:
                self._close(busy)

    def data_received(self, data: bytes) -> None:
        if self in self.limits.idle:
            self._head_bytes = True
            if self._head_timer is None:  # a kept-alive connection begins its next request
                self._arm()
        super().data_received(data)
        self._notice_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self.cycle is not self._seen:  # a pipelined request began meanwhile
            self._notice_head()
        else:  # idle: uvicorn's keep-alive timer runs; the header timer starts with the next byte
            self._wait_for_head(arm=False)

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """h11 refused the request (malformed, or a head over --max-header-bytes): a JSON error, then close."""
        limit = self.config.h11_max_incomplete_event_size
        if limit is not None and len(self.conn.trailing_data[0]) > limit:
            error = ApiError(431, "header_too_large", f"the request line and headers are over {limit} bytes "
                             "(--max-header-bytes)", limit=("max_header_bytes", limit))
        else:
            error = ApiError(400, "bad_http_request", f"the request is not valid HTTP/1.1 ({msg.rstrip('.')})")
        self._close(error)

    # -- the header timer and the idle set ----------------------------------------------------------
    def _wait_for_head(self, *, arm: bool) -> None:
        self.limits.idle.pop(self, None)
        self.limits.idle[self] = None  # to the end: the longest waiting are first
        self._head_bytes = False
        self._cancel_timer()
        if arm:
            self._arm()

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.limits.header_timeout_s, self._head_timeout)

    def _cancel_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _notice_head(self) -> None:
        if self.cycle is not None and self.cycle is not self._seen:
            self._seen = self.cycle
            self.limits.idle.pop(self, None)
            self._cancel_timer()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self in self.limits.idle and not self.transport.is_closing():
            timeout = self.limits.header_timeout_s
            self._close(ApiError(408, "header_timeout", f"the request line and headers did not arrive within "
                                 f"{timeout:g} s (--header-timeout-s); send them at once",
                                 limit=("header_timeout_s", timeout)) if self._head_bytes else None)

    def _forget(self) -> None:
        self.limits.open.discard(self)
        self.limits.idle.pop(self, None)
        self._cancel_timer()

    def _close(self, error: ApiError | None) -> None:
        """Close now (counted at once, though the socket goes at the loop's next turn), after `error` if given."""
        self._forget()
        if self.transport.is_closing():
            return
        if error is not None:
            self.transport.write(_raw_answer(error))
        self.transport.close()


def _raw_answer(error: ApiError) -> bytes:
    """A whole HTTP/1.1 response for `error`, written past h11: the connection closes right after."""
    body = render_error(error)
    headers = {"content-type": "application/json", "content-length": str(len(body)), "connection": "close",
               **{k.lower(): v for k, v in error.headers.items()}}
    head = f"HTTP/1.1 {error.status} {http.HTTPStatus(error.status).phrase}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + body


class LimitedServer(uvicorn.Server):
    """A `uvicorn.Server` whose `limits` say how many connections are open (`len(server.limits.open)`), and
    which shuts down gracefully on SIGTERM / SIGINT (`on_exit`, see `graceful_shutdown`)."""

    limits: ConnectionLimits
    on_exit: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # uvicorn's own handler also records the signal to raise it again once shut down, which ends the
        # process by that signal (exit -15); a service that shut down gracefully exits 0 instead.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
            return
        first = not self.should_exit
        self.should_exit = True
        if first and self.on_exit is not None:
            self.on_exit()


def graceful_shutdown(app: Any, grace_s: float) -> Callable[[], None]:
    """What a signal starts: the scheduler refuses new work (503 shutting_down) at once; requests in flight
    may finish for `grace_s` seconds; then those still waiting or decoding get 503 shutting_down. uvicorn
    meanwhile stops listening and waits for the answers (its timeout_graceful_shutdown is a little longer),
    then the lifespan stops the scheduler and the process exits 0."""
    scheduler = getattr(getattr(app, "state", None), "scheduler", None)

    def begin() -> None:
        if scheduler is None:
            return
        scheduler.stop_accepting()
        timer = threading.Timer(grace_s, scheduler.stop)
        timer.daemon = True
        timer.start()

    return begin


def check_limits(settings: ServeSettings) -> None:
    """The connection and timeout knobs make sense, or an AdapterError naming the flag."""
    for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
        if not getattr(settings, name) > 0:
            raise AdapterError(f"ServeSettings.{name} must be > 0 seconds; got {getattr(settings, name)}")
    for name in ("max_connections", "max_uploads"):
        if getattr(settings, name) < 1:
            raise AdapterError(f"ServeSettings.{name} must be at least 1; got {getattr(settings, name)}")
    if settings.max_header_bytes < 1024:
        raise AdapterError(f"ServeSettings.max_header_bytes must be at least 1024; got {settings.max_header_bytes}")
    if settings.min_body_rate < 0:
        raise AdapterError(f"ServeSettings.min_body_rate must be >= 0 (0: no rate); got {settings.min_body_rate}")


def raise_fd_limit(wanted: int) -> int | None:
    """Raise the soft limit on open files towards `wanted` (never past the hard limit); returns the soft limit,
    or None where there is no such limit (Windows)."""
    if resource is None:
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:  # e.g. macOS caps it below an unlimited hard limit
            logger.warning("could not raise the open-file limit from %d to %d: %s", soft, target, error)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(settings: ServeSettings) -> int:
    """--max-connections, lowered to what the open-file limit holds beside FD_RESERVE other descriptors."""
    soft = raise_fd_limit(settings.max_connections + FD_RESERVE)
    if soft is None or soft - FD_RESERVE >= settings.max_connections:
        return settings.max_connections
    cap = max(1, soft - FD_RESERVE)
    logger.warning("--max-connections %d lowered to %d: the open-file limit is %d (ulimit -n) and %d descriptors "
                   "are kept for the rest", settings.max_connections, cap, soft, FD_RESERVE)
    return cap


def configure_server(app: Any, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
                     log_level: str = "info", **uvicorn_options: Any) -> LimitedServer:
    """A uvicorn server for `app` with the limits of `settings`; start it with `.run()` (or `await .serve()`
    in a running loop; set `.should_exit` to stop it). `uvicorn_options` go to `uvicorn.Config` as they are."""
    check_limits(settings)
    limits = ConnectionLimits(connection_cap(settings), settings.header_timeout_s)
    protocol = type("LimitedH11Protocol", (LimitedH11Protocol,), {"limits": limits})
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=protocol,
        ws="none",  # no route speaks WebSocket; an upgraded connection would leave the limits above
        timeout_keep_alive=settings.keep_alive_s,  # type: ignore[arg-type]  # typed int; call_later takes a float
        h11_max_incomplete_event_size=settings.max_header_bytes,
        limit_concurrency=None,  # see the module docstring
        **{"timeout_graceful_shutdown": settings.shutdown_grace_s + ANSWER_MARGIN_S, **uvicorn_options})
    server = LimitedServer(config)
    server.limits = limits
    server.on_exit = graceful_shutdown(app, settings.shutdown_grace_s)
    return server


def run_server(app: Any, settings: ServeSettings, *, host: str = "127.0.0.1", port: int = 8000,
               log_level: str = "info", **uvicorn_options: Any) -> None:
    """Serve `app` until SIGINT / SIGTERM: `adaptkit serve` in place of `uvicorn.run`."""
    configure_server(app, settings, host=host, port=port, log_level=log_level, **uvicorn_options).run()

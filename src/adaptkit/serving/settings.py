"""The service's knobs and limits, and the errors it answers with (status, code, message, limit)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptkit.core.errors import AdapterError


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeSettings:
    """Batching, queueing and request limits; each is an `adaptkit serve` flag. API keys are not here (they
    come from a file, never from the command line); `max_resident` lives on the model."""

    max_batch: int = _knob(16, "rows in one generate call")
    max_wait_ms: float = _knob(10.0, "how long the oldest waiting row waits for others to batch with")
    max_queue: int = _knob(512, "rows waiting at most; beyond, requests get 503 with Retry-After")
    max_adapters_per_batch: int | None = _knob(None, "distinct adapters in one generate call (1: no "
                                                     "cross-adapter batching; none: no limit)")
    continuous: bool = _knob(True, "greedy rows on a decoder backbone join and leave a running batch between "
                                   "decoding steps (--no-continuous: each batch runs until its longest row is done)")
    max_body_bytes: int = _knob(1 << 20, "largest JSON request body (413 beyond)")
    max_upload_bytes: int = _knob(256 << 20, "largest adapter upload (413 beyond)")
    max_texts: int = _knob(64, "texts or prompts in one request (422 beyond)")
    max_text_chars: int = _knob(4000, "characters in one text (422 beyond)")
    max_new_tokens_limit: int = _knob(512, "largest max_new_tokens a request may ask for")
    max_beams: int = _knob(8, "largest num_beams a request may ask for")
    default_max_new_tokens: int = _knob(128, "max_new_tokens when a request gives none")
    default_num_beams: int = _knob(1, "num_beams when a request gives none (1: greedy)")
    retry_after_s: int = _knob(1, "the Retry-After of a 503 when the queue is full")
    request_timeout_s: float = _knob(120.0, "a request not answered within this many seconds gets 504 "
                                            "request_timeout and its rows are dropped (streams: an error event)")
    shutdown_grace_s: float = _knob(30.0, "on SIGTERM, how long requests in flight may take to finish; new ones get "
                                          "503 shutting_down, and those still running after it too")
    max_streams: int = _knob(2, "streams running in threads of their own at once, beside the batches (503 beyond; "
                                "streams that are rows of the continuous batch do not count)")
    # Connections and bodies (serving/server.py, serving/guard.py): what a client that never finishes gets.
    max_connections: int = _knob(1024, "open connections at most; beyond, the oldest connection that has not sent a "
                                       "request is closed, or, when every one is busy, the new one gets 503 "
                                       "too_many_connections and is closed (lowered to fit the file-descriptor limit)")
    header_timeout_s: float = _knob(10.0, "seconds a connection has to send a whole request line and headers; then "
                                          "408 header_timeout and the connection is closed")
    max_header_bytes: int = _knob(16384, "request line and headers, in bytes (431 header_too_large beyond)")
    body_timeout_s: float = _knob(30.0, "longest wait for the next piece of a request body (408 body_timeout); a "
                                        "body gets this long plus 1 s per --min-body-rate bytes it sent in all")
    min_body_rate: int = _knob(1024, "bytes/s a request body must keep up on average, after its first "
                                     "--body-timeout-s (0: no rate, only the wait for each piece)")
    keep_alive_s: float = _knob(5.0, "an idle keep-alive connection is closed after this many seconds")
    max_uploads: int = _knob(2, "adapter uploads streaming into the store at once (503 uploads_busy beyond)")
    adapter_dir: tuple[str, ...] = _knob((), "directories POST /v1/load_lora_adapter may install adapter files and "
                                             "peft directories from, besides the store (symlinks are resolved "
                                             "before the check; none: the store only)")
    # A peft directory uploaded as a tar (serving/pefttar.py): gzip can make it far larger than its upload.
    max_unpacked_bytes: int = _knob(256 << 20, "largest total size of the files in an uploaded tar of a peft "
                                               "directory, after gzip (413 unpacked_too_large beyond)")
    max_tar_members: int = _knob(16, "members (files, folders) in an uploaded tar of a peft directory "
                                     "(422 invalid_peft_tar beyond)")

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_texts", "max_text_chars", "max_new_tokens_limit", "max_beams",
                     "max_body_bytes", "max_upload_bytes", "max_streams", "max_unpacked_bytes", "max_tar_members"):
            if getattr(self, name) < 1:
                raise AdapterError(f"ServeSettings.{name} must be at least 1; got {getattr(self, name)}")
        for name in ("request_timeout_s", "shutdown_grace_s"):
            if getattr(self, name) <= 0:
                raise AdapterError(f"ServeSettings.{name} must be > 0 seconds; got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise AdapterError(f"ServeSettings.max_wait_ms must be >= 0; got {self.max_wait_ms}")
        if self.max_adapters_per_batch is not None and self.max_adapters_per_batch < 1:
            raise AdapterError("ServeSettings.max_adapters_per_batch must be >= 1 or None (no limit)")


def load_api_keys(path: str | Path) -> tuple[str, ...]:
    """One key per line; blank lines and `#` comments ignored. An empty file is refused: it would lock
    everyone out while looking configured."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise AdapterError(f"cannot read the API key file {str(path)!r}: {error}") from None
    keys = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
    if not keys:
        raise AdapterError(f"the API key file {str(path)!r} holds no keys; put one key per line")
    short = [i for i, key in enumerate(keys) if len(key) < 16]
    if short:
        raise AdapterError(f"API keys must be at least 16 characters (key #{short[0] + 1} in {path.name} is "
                           "shorter); generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return keys


# The OpenAI-compatible routes (openai_routes.py): their errors take OpenAI's shape, which OpenAI SDKs read.
OPENAI_PATHS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                          "/v1/unload_lora_adapter"})


def openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


class ApiError(Exception):
    """An answer the client gets as JSON: {"error": {"code", "message", "limit"?}} with an HTTP status; on the
    OpenAI routes {"error": {"message", "type", "code", "param"}} (`openai_body`)."""

    def __init__(self, status: int, code: str, message: str, *, limit: tuple[str, int] | None = None,
                 headers: dict[str, str] | None = None, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.limit = limit
        self.headers = headers or {}
        self.param = param  # the request field at fault, where there is one (OpenAI's `param`)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.limit is not None:
            error["limit"] = {"name": self.limit[0], "value": self.limit[1]}
        return {"error": error}

    def openai_body(self) -> dict[str, Any]:
        """OpenAI's error shape: `type` by status as OpenAI's API gives it, `code` adaptkit's (documented) code."""
        kind = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}.get(
            self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        error: dict[str, Any] = {"message": self.message, "type": kind, "code": self.code, "param": self.param}
        if self.limit is not None:
            error["limit"] = {"name": self.limit[0], "value": self.limit[1]}
        return {"error": error}

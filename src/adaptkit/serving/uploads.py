"""Uploads streamed to a scratch file inside the adapter store, at most a few at once.

`POST /v1/adapters` never holds a file in memory: its body goes, piece by piece, to a scratch file
`.upload-XXXXXXXX.tmp` in the store's root directory — the same file system as the adapter files,
so installing it is one atomic `os.replace`. The name is short and fixed in form, never derived from
the adapter's name (which may be as long as the file system allows), and `AdapterStore.names()` does
not list it (it does not end in `.safetensors`). The file is created as `open()` would create it (0666
less the umask) and locked with `flock` while its writer lives.

Nothing runs after SIGKILL, so a killed upload leaves its scratch file behind; the service removes
such leftovers when it starts (`clean_scratch`, from the app's lifespan), and only those no live
process holds: two services may share one store. Leftovers of atomic writes (`core/atomicfile.py`)
anywhere in the store go the same way.

At most `--max-uploads` bodies stream at once; beyond, `503 uploads_busy` with Retry-After, before
a byte of the body is read. Size (`--max-upload-bytes`) and time (`--body-timeout-s`,
`--min-body-rate`) are the Guard's limits on `receive` (guard.py), which this stream reads through.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from starlette.requests import ClientDisconnect, Request

from adaptkit.core.atomicfile import remove_stale_temps, same_file
from adaptkit.core.errors import AdapterError
from adaptkit.serving.settings import ApiError, ServeSettings

try:
    import fcntl
except ImportError:  # Windows: no locks, so no way to tell a leftover from a live upload
    fcntl = None  # type: ignore[assignment]

SCRATCH = re.compile(r"\.upload-[0-9a-f]{8}\.tmp")
ATOMIC_TEMP = re.compile(r"\.(?P<target>.+\.safetensors)\.[a-z0-9_]{8}\.tmp")  # atomicfile's temp names
WRITE_CHUNK = 1 << 20  # pieces of a body are gathered to this size before a write (one thread hop each)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def scratch_file(root: Path) -> Iterator[tuple[int, Path]]:
    """A new, locked scratch file in `root` (created if need be): (fd to write, its path). On exit the fd is
    closed and the file removed, unless it was moved away (installed) meanwhile."""
    root.mkdir(parents=True, exist_ok=True)
    while True:
        path = root / f".upload-{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:
            continue
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # A start-up clean of another service on this store may have taken the lock and removed the
            # file in the instant between creating and locking it: then start over under another name.
            if not same_file(fd, path):
                os.close(fd)
                continue
        break
    try:
        yield fd, path
    finally:
        try:
            if same_file(fd, path):  # still ours: not installed (a new upload may reuse a freed name)
                path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def clean_scratch(root: Path) -> list[Path]:
    """Remove what killed uploads and atomic writes left in the store `root` and that no live process holds;
    returns what was removed. Called once as the service starts."""
    removed: list[Path] = []
    if fcntl is None or not root.is_dir():
        return removed
    for entry in os.scandir(root):
        path = Path(entry.path)
        if SCRATCH.fullmatch(entry.name) and entry.is_file(follow_symlinks=False) and _remove_if_unheld(path):
            removed.append(path)
    for temp in root.rglob(".*.tmp"):
        match = ATOMIC_TEMP.fullmatch(temp.name)
        if match:
            removed.extend(remove_stale_temps(temp.with_name(match["target"])))
    return removed


def _remove_if_unheld(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # an upload is streaming into it now
        if not same_file(fd, path):
            return False
        path.unlink()
        return True
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Uploads:
    """The uploads streaming into one store: at most `settings.max_uploads` at once. Used on the event loop only."""

    def __init__(self, root: Path, settings: ServeSettings):
        if settings.max_uploads < 1:
            raise AdapterError(f"ServeSettings.max_uploads must be at least 1; got {settings.max_uploads}")
        self.root = Path(root)
        self.settings = settings
        self.active = 0

    @contextlib.asynccontextmanager
    async def receive(self, request: Request) -> AsyncIterator[Path]:
        """The request's body in a scratch file of the store, whole and fsynced; removed on exit unless it was
        moved into place meanwhile. 503 uploads_busy beyond --max-uploads, 422 empty_upload for no body."""
        if self.active >= self.settings.max_uploads:
            retry = self.settings.retry_after_s
            raise ApiError(503, "uploads_busy", f"{self.active} uploads are streaming in already; the service takes "
                           f"{self.settings.max_uploads} at once (--max-uploads). Retry after {retry} s",
                           limit=("max_uploads", self.settings.max_uploads),
                           headers={"Retry-After": str(retry), "Connection": "close"})
        self.active += 1
        try:
            with scratch_file(self.root) as (fd, path):
                size = await self._stream(request, fd)
                if size == 0:
                    raise ApiError(422, "empty_upload", "the body is empty; send the .safetensors file as the "
                                   "raw body")
                yield path
        finally:
            self.active -= 1

    async def _stream(self, request: Request, fd: int) -> int:
        size = 0
        pending = bytearray()
        try:
            async for piece in request.stream():  # through the Guard: size limit and body timeout
                size += len(piece)
                pending += piece
                if len(pending) >= WRITE_CHUNK:
                    await asyncio.to_thread(_write_all, fd, pending)
                    pending = bytearray()
        except ClientDisconnect:
            raise ApiError(499, "client_closed_request", "the client disconnected during the upload; nothing "
                           "was written") from None
        await asyncio.to_thread(_write_all, fd, pending)
        await asyncio.to_thread(os.fsync, fd)  # the rename that installs it must not outlive its bytes
        return size

"""Replace a file atomically, keep its permissions, and clean up after a writer that was killed.

A write goes to a temp file beside the target (`.NAME.XXXXXXXX.tmp`, locked with `flock` while
it is written), is fsynced, renamed over the target, and the directory is fsynced: a reader sees
the old file or the new one, never a mix. The rename replaces the target's directory entry, so
when the target is a symbolic link the link itself is replaced and the file it pointed to is
left untouched.

Nothing runs after SIGKILL, so a killed writer leaves its temp file behind. The next write to the
same target removes those leftovers: a temp file whose lock can be taken has no live writer (the
kernel drops a dead process's locks). Without `fcntl` (Windows) leftovers are left alone.

An overwritten file keeps its mode; a new file gets what `open()` would create (0666 less the
umask), not `mkstemp`'s 0600.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from adaptkit.core.errors import AdapterError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

TEMP_OVERHEAD = len(".") + len(".0123abcd.tmp")  # what a temp file's name adds to the target's
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def write_atomic(target: Path, payload: bytes | memoryview) -> None:
    """Write `payload` to `target` atomically (see the module docstring)."""
    write_atomic_chunks(target, (payload,))


def write_atomic_chunks(target: Path, chunks: Iterable[bytes | memoryview]) -> None:
    """`write_atomic` for a payload too large to hold at once: the chunks are written in order."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        mode = _existing_mode(target)
        remove_stale_temps(target)
        fd, tmp = _locked_temp(target)
        try:
            if mode is not None and hasattr(os, "fchmod"):
                os.fchmod(fd, mode)
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            os.fsync(fd)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)  # releases the lock
        fsync_directory(target.parent)
    except OSError as error:
        if error.errno == errno.ENAMETOOLONG:
            raise AdapterError(f"cannot write {str(target)[:80]!r}…: a name in that path is too long for the file "
                               f"system (its temp file adds {TEMP_OVERHEAD} bytes to the file name); "
                               "choose a shorter name") from None
        raise


def temp_files(target: Path) -> list[Path]:
    """Temp files of writes to `target`, finished or not: `.NAME.` + 8 characters + `.tmp`."""
    pattern = re.compile(re.escape(f".{target.name}.") + r"[a-z0-9_]{8}\.tmp")  # mkstemp's names too
    try:
        return sorted(Path(entry.path) for entry in os.scandir(target.parent) if pattern.fullmatch(entry.name))
    except (FileNotFoundError, NotADirectoryError):
        return []


def remove_stale_temps(target: Path) -> list[Path]:
    """Remove the temp files of `target` that no live writer holds; returns what was removed."""
    removed = []
    if fcntl is None:
        return removed
    for tmp in temp_files(target):
        try:
            fd = os.open(tmp, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)  # a symlink is not ours: ELOOP
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a writer is alive and writing it
            if same_file(fd, tmp):
                tmp.unlink()
                removed.append(tmp)
        finally:
            os.close(fd)
    return removed


def _locked_temp(target: Path) -> tuple[int, Path]:
    while True:
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | _CLOEXEC, 0o666)
        except FileExistsError:
            continue
        if fcntl is None:
            return fd, tmp
        fcntl.flock(fd, fcntl.LOCK_EX)
        # Another writer's cleanup may have taken the lock and removed the file in the instant between
        # creating and locking it; then start over under a new name.
        if same_file(fd, tmp):
            return fd, tmp
        os.close(fd)


def same_file(fd: int, path: Path) -> bool:
    """Whether `path` (not followed if a link) names the file open as `fd`: it was not replaced or removed."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _existing_mode(target: Path) -> int | None:
    try:
        return stat.S_IMODE(os.stat(target).st_mode)  # through a link: the mode the name showed
    except FileNotFoundError:
        return None


def fsync_directory(directory: Path) -> None:
    """Make a rename or unlink in `directory` durable; not every platform or file system can open a directory."""
    try:
        fd = os.open(directory, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

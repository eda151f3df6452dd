"""What the adapter store holds: name → file header, re-read only when a file changes.

Routing by language pair must see every adapter in the store, not only the resident ones (the bank
holds at most `max_resident`), so the service keeps this catalog of headers beside the bank. A file
whose header fails its checks stays listed with the reason, and requests that name it get that reason.
Adding and removing files also lives here: checked like `load_adapter`, written atomically, and
never to a path outside the store.
"""

from __future__ import annotations

import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptkit.core.adapterfile import AdapterStore, read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.tasks.translate import match_adapter


class BadAdapterName(AdapterError):
    """A name that cannot address a file in the store (`..`, absolute, control characters)."""


def store_path(store: AdapterStore, name: str) -> Path:
    """The store file for `name`, or BadAdapterName: names from requests never reach a path outside the store."""
    if not isinstance(name, str) or any(ord(c) < 32 or c == "~" for c in name):
        raise BadAdapterName(f"adapter name {name!r} has characters a stored name cannot have "
                             "(control characters, '~')")
    try:
        return store.path_for(name)
    except AdapterError as error:
        raise BadAdapterName(str(error)) from None


@dataclass(frozen=True)
class Entry:
    name: str
    info: dict[str, Any] | None  # read_adapter_info of the file; None when its header is unreadable
    error: str | None
    stamp: tuple[int, int]  # (mtime_ns, size): re-read the header when it changes


class AdapterCatalog:
    """Thread-safe view of a store's headers; `route` applies `Translator`'s routing-key rule to it."""

    def __init__(self, store: AdapterStore):
        self.store = store
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Re-scan the store; only files whose (mtime, size) changed are read again."""
        names = self.store.names()
        fresh: dict[str, Entry] = {}
        for name in names:
            entry = self._read(name, self._entries.get(name))
            if entry is not None:
                fresh[name] = entry
        with self._lock:
            self._entries = fresh

    def refresh_one(self, name: str) -> Entry | None:
        entry = self._read(name, None)
        with self._lock:
            if entry is None:
                self._entries.pop(name, None)
            else:
                self._entries[name] = entry
        return entry

    def _read(self, name: str, known: Entry | None) -> Entry | None:
        try:
            path = self.store.path_for(name)
            stat = path.stat()
        except (AdapterError, OSError):
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if known is not None and known.stamp == stamp:
            return known
        try:
            return Entry(name, read_adapter_info(path), None, stamp)
        except AdapterError as error:
            return Entry(name, None, str(error), stamp)

    def get(self, name: str) -> Entry | None:
        with self._lock:
            return self._entries.get(name)

    def entries(self) -> list[Entry]:
        with self._lock:
            return [self._entries[name] for name in sorted(self._entries)]

    def route(self, src_lang: str, tgt_lang: str, domain: str | None) -> str | None:
        """The adapter for (src, tgt, domain): same pair and domain, else a pair-only adapter; names in order."""
        return match_adapter(((e.name, e.info) for e in self.entries() if e.info is not None),
                             src_lang, tgt_lang, domain)

    # -- changing the store ----------------------------------------------------------------------
    def install(self, model: AdaptedModel, data: bytes, name: str | None, replace: bool) -> Entry:
        """Check an uploaded adapter file fully, then write it into the store atomically under `name`.

        The check is `model.load_adapter` itself (checksum, backbone fingerprint, every tensor's
        shape) on a private copy, under a throw-away name: nothing reaches the store or replaces a
        resident adapter unless the file would load. Runs on the service's loader thread.
        """
        with tempfile.TemporaryDirectory(prefix="adaptkit-upload-") as scratch:
            candidate = Path(scratch) / "upload.safetensors"
            candidate.write_bytes(data)
            info = read_adapter_info(candidate)
            name = name or info.get("name")
            if not name:
                raise AdapterError("the file names no adapter (no adaptkit.name in its header); pass ?name=...")
            target = store_path(self.store, name)
            if target.exists() and not replace:
                raise FileExistsError(name)
            probe = model.load_adapter(candidate, name=f"{name}~upload-{os.urandom(4).hex()}")
            model.remove_adapter(probe)
        _write_atomically(target, data)
        if name in model.adapters:  # the old version: the next request loads the new file
            model.remove_adapter(name)
        entry = self.refresh_one(name)
        if entry is None:
            raise AdapterError(f"adapter {name!r} was written but cannot be read back from {target}")
        return entry

    def delete(self, model: AdaptedModel, name: str) -> None:
        path = store_path(self.store, name)
        if not path.is_file():
            raise FileNotFoundError(name)
        if name in model.adapters:
            model.remove_adapter(name)
        path.unlink()
        self.refresh_one(name)


def _write_atomically(path: Path, data: bytes) -> None:
    """Temp file in the target's directory (same filesystem), fsync, rename: readers see old or new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

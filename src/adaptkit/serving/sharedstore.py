"""The adapter store several processes share: a directory, or any fsspec URL (s3://, gs://, https://, ...).

A directory (or file:// URL) is used in place: every process reads the same files. A remote URL is
mirrored into a local cache directory, one file at a time and only when asked for, so each process
loads from a plain `AdapterStore` and every check of `load_adapter` runs on the local copy. A copy is
fetched again when the remote file's size or modification stamp changes. Names are checked by the
local store before any remote path is built, so a name from a request cannot reach outside the store.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import fsspec

from adaptkit.core.adapterfile import SUFFIX, AdapterStore
from adaptkit.core.errors import AdapterError


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


class SharedStore:
    def __init__(self, location: str | Path, cache: str | Path | None = None):
        self.location = str(location)
        if not is_remote(self.location):
            self.local = AdapterStore(self.location.removeprefix("file://"))
            self._fs = None
            return
        try:  # a URL scheme whose package is missing (s3fs, gcsfs, ...) fails here, saying which to install
            self._fs, self._root = fsspec.core.url_to_fs(self.location)
        except (ImportError, ValueError) as error:
            raise AdapterError(f"cannot open the adapter store {self.location!r}: {error}") from None
        self._root = self._root.rstrip("/")
        self.local = AdapterStore(cache or tempfile.mkdtemp(prefix="adaptkit-store-"))
        self._stamps: dict[str, Any] = {}

    @property
    def remote(self) -> bool:
        return self._fs is not None

    def fetch(self, name: str) -> Path:
        """The local file for `name`, copied from the remote store first when it is new or changed there."""
        path = self.local.path_for(name)  # refuses names that would leave the store
        if self._fs is None:
            if not path.is_file():
                raise FileNotFoundError(name)
            return path
        remote = f"{self._root}/{name}{SUFFIX}"
        try:
            info = self._fs.info(remote)
        except FileNotFoundError:
            raise FileNotFoundError(name) from None
        stamp = (info.get("size"), info.get("mtime") or info.get("LastModified") or info.get("ETag")
                 or info.get("created"))
        if self._stamps.get(name) != stamp or not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
            os.close(fd)
            try:
                self._fs.get_file(remote, tmp)
                os.replace(tmp, path)
            finally:
                Path(tmp).unlink(missing_ok=True)
            self._stamps[name] = stamp
        return path

    def names(self) -> list[str]:
        if self._fs is None:
            return self.local.names()
        found = self._fs.glob(f"{self._root}/**/*{SUFFIX}")
        names = (str(p)[len(self._root) + 1: -len(SUFFIX)] for p in found)
        return sorted(n for n in names if _storable(self.local, n))

    def sync(self) -> AdapterStore:
        """Every adapter of the store present locally and current (the ingress routes by their headers); files
        gone from the remote store are removed from the copy. Returns the local store."""
        if self._fs is not None:
            names = self.names()
            for name in names:
                self.fetch(name)
            for name in set(self.local.names()) - set(names):
                self.local.path_for(name).unlink(missing_ok=True)
                self._stamps.pop(name, None)
        return self.local


def _storable(store: AdapterStore, name: str) -> bool:
    try:
        store.path_for(name)
    except AdapterError:
        return False
    return True

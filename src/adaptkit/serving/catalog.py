"""What the adapter store holds: name → file header, re-read only when a file changes.

Routing by language pair must see every adapter in the store, not only the resident ones (the bank
holds at most `max_resident`), so the service keeps this catalog of headers beside the bank. A file
whose header fails its checks stays listed with the reason, and requests that name it get that reason.
Adding and removing files also lives here: checked like `load_adapter` (without touching the bank,
which is the scheduler's), moved into place atomically, and never to a path outside the store.

A peft adapter (a directory, or a tar of one: `pefttar.py`) enters the same way: `interop` converts it into
an adaptkit file in a scratch file of the store, and that file goes through `install` like an upload —
the same checks, the same atomic move, its checksum written by the conversion. There is no separate
peft path into the store to keep in step with the native one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adaptkit.core.adapterfile import AdapterStore, encode_adapter_file, read_adapter_info
from adaptkit.core.atomicfile import fsync_directory, write_atomic_chunks
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.interop.peft import PeftAdapter, adapter_file_from_peft, read_peft_dir
from adaptkit.serving.pefttar import TarLimits, read_peft_tar
from adaptkit.serving.uploads import scratch_file
from adaptkit.tasks.translate import match_adapter


class BadAdapterName(AdapterError):
    """A name that cannot address a file in the store (`..`, absolute, control characters, a file as a folder)."""


class AdapterExists(AdapterError):
    """An upload under a name the store holds, without replace=True."""


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
        """The adapter for (src, tgt, domain) by the one routing-key rule (`core.routing.match_adapter`, also
        Translator's and the file rows'): same pair and domain, else a pair-only adapter; ties by name."""
        return match_adapter(((e.name, e.info) for e in self.entries() if e.info is not None),
                             src_lang, tgt_lang, domain)

    # -- changing the store ----------------------------------------------------------------------
    def installable(self, name: str) -> Path:
        """The store file for `name`, or BadAdapterName when no file can be put there: a folder on its path is a
        file (`en-de/lora.safetensors/x` where the adapter `en-de/lora` is), or its place is a folder."""
        target = store_path(self.store, name)
        for parent in reversed(target.relative_to(self.store.root).parents[:-1]):
            folder = self.store.root / parent
            if os.path.lexists(folder) and not folder.is_dir():
                raise BadAdapterName(f"adapter name {name!r} puts its file inside {parent.as_posix()!r}, which is a "
                                     "file in the store, not a folder; choose another name")
        if target.is_dir():
            raise BadAdapterName(f"adapter name {name!r} is a folder in the store ({target.name}); choose another "
                                 "name")
        return target

    def name_in_file(self, path: Path) -> str:
        """The adapter name in an uploaded file's header (the structure is checked, not yet the checksum)."""
        name = read_adapter_info(path, verify=False).get("name")
        if not isinstance(name, str) or not name:
            raise AdapterError("the file names no adapter (no adaptkit.name in its header); pass ?name=...")
        self.installable(name)
        return name

    def install(self, model: AdaptedModel, upload: Path, name: str, replace: bool) -> Entry:
        """Check the file at `upload` (a scratch file in the store: `uploads.py`) fully, then move it into place as
        adapter `name`, atomically: readers see the old file or the new one, whole.

        The check is every check `load_adapter` makes (format, checksum, backbone fingerprint, each tensor built,
        dtypes, finite values), without the bank: nothing is loaded and nothing resident is removed. The service's
        scheduler, which calls this through `call_exclusive(..., changes=name)`, takes an old version of `name`
        out of the bank itself. A new file gets the umask's mode, a replaced one keeps its file's mode.
        """
        target = self.installable(name)
        if target.exists() and not replace:
            raise AdapterExists(name)
        model.check_adapter_file(upload, name)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):  # a file appeared where a folder of the name goes
            self.installable(name)
            raise
        with contextlib.suppress(FileNotFoundError):
            os.chmod(upload, stat.S_IMODE(os.stat(target).st_mode))
        try:
            os.replace(upload, target)
        except OSError as error:
            if error.errno != errno.EXDEV:  # a folder of the store on another file system: copy instead
                raise
            with open(upload, "rb") as source:
                write_atomic_chunks(target, iter(lambda: source.read(1 << 20), b""))
        fsync_directory(target.parent)
        entry = self.refresh_one(name)
        if entry is None:
            raise AdapterError(f"adapter {name!r} was written but cannot be read back from {target}")
        return entry

    def add_file(self, model: AdaptedModel, source: Path, *, replace: bool = True) -> Entry:
        """Copy an adapter file into the store under the name in its header, checked like an upload (for
        `adaptkit serve --adapter FILE`): the checked copy is the one installed."""
        with scratch_file(self.store.root) as (fd, scratch):
            with open(source, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view):]
            os.fsync(fd)
            return self.install(model, scratch, self.name_in_file(scratch), replace)

    # -- peft adapters: converted into a scratch file, then `install` ----------------------------------
    @contextlib.contextmanager
    def converted_peft(self, model: AdaptedModel, peft: PeftAdapter, name: str) -> Iterator[Path]:
        """`peft` as an adaptkit adapter file named `name`, in a scratch file of the store for `install`
        (which checks it as it checks an upload); removed on exit unless installed meanwhile. Converting
        reads only the backbone's layout, not the bank: no need to run on the scheduler."""
        self.installable(name)
        with self._scratch_holding(encode_adapter_file(*adapter_file_from_peft(model, peft, name))) as path:
            yield path

    def install_peft_dir(self, model: AdaptedModel, peft_dir: str | Path, name: str | None = None, *,
                         replace: bool = False) -> Entry:
        """Install a peft adapter directory (LoRA, AdaLoRA, prefix tuning; adapter_config.json +
        adapter_model.safetensors, never a pickle) as adapter `name` (default: the directory's name). For
        callers that own the bank's changes (start-up); the service goes through its scheduler instead."""
        name = name or Path(peft_dir).resolve().name
        with self.converted_peft(model, read_peft_dir(peft_dir), name) as path:
            return self.install(model, path, name, replace)

    @contextlib.contextmanager
    def converted_peft_tar(self, model: AdaptedModel, tar: Path, name: str | None, limits: TarLimits
                           ) -> Iterator[tuple[Path, str]]:
        """The peft directory packed in the tar at `tar` (an upload's scratch file) as a scratch adaptkit file for
        `install`, and its name (`name`, else the tar's top folder). Unpacking is bounded by `limits` and
        never writes a path from the tar (pefttar.py)."""
        with read_peft_tar(tar, self.store.root, limits) as (peft, folder):
            name = name or folder
            if not name:
                raise AdapterError("the tar has its files at the top, so it names no adapter; pass ?name=... "
                                   "(or pack the peft directory itself: tar cf adapter.tar -C PARENT DIR)")
            self.installable(name)
            tensors, metadata = adapter_file_from_peft(model, peft, name)
        # the unpacked weights' scratch file is gone before the converted one is written: one copy at a time
        with self._scratch_holding(encode_adapter_file(tensors, metadata)) as path:
            yield path, name

    @contextlib.contextmanager
    def _scratch_holding(self, data: bytes) -> Iterator[Path]:
        with scratch_file(self.store.root) as (fd, path):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)  # the rename that installs it must not outlive its bytes
            yield path

    def delete(self, name: str) -> None:
        """Remove adapter `name`'s file from the store (the bank is the scheduler's: it removes the adapter there)."""
        path = store_path(self.store, name)
        if not path.is_file():
            raise FileNotFoundError(name)
        path.unlink()
        fsync_directory(path.parent)
        self.refresh_one(name)

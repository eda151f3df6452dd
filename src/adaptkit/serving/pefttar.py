"""A peft adapter directory uploaded as a tar: read member by member, never extracted by tarfile.

`POST /v1/adapters` takes the body as an adaptkit `.safetensors` file, or — when the body is a tar
(plain or gzip; told by its first bytes, or by a tar Content-Type) — as a peft adapter directory
packed with `tar cf lora.tar -C out lora` (files at the top of the tar, or in one top folder). The
tar is read sequentially through a byte cap; nothing in it ever picks a path on this machine:

- every member must be a regular file or a folder: links, devices, FIFOs and sparse files are refused;
- no name may be absolute or hold `..` (or a backslash), and files sit at most one folder deep, in one
  top folder;
- at most `max_tar_members` members, their contents at most `max_unpacked_bytes` in all (and the tar
  stream after gzip at most that plus `HEADER_ALLOWANCE`: a gzip bomb stops at the cap, and so does a
  member header that claims a huge PAX record, which tarfile would otherwise read into memory whole);
- only `adapter_config.json` (at most `MAX_CONFIG_BYTES`, read into memory) and
  `adapter_model.safetensors` (streamed to a scratch file of the store: `uploads.scratch_file`) are
  read; other regular files (peft's README.md) are skipped unread; each of the two at most once;
- `adapter_model.bin` without safetensors is refused with the way to re-save it.

The scratch file is the one kind of leftover the service already cleans after a kill (`clean_scratch`),
and `AdapterStore.names()` never lists it; an unpacked *folder* in the store would be listed by its
`adapter_model.safetensors` (the store is every `*.safetensors` under its root) and never cleaned, so
none is made. Refusals raise `PeftTarError` (422 `invalid_peft_tar`) or `UnpackedTooLarge` (413
`unpacked_too_large`), with nothing left in the store.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from adaptkit.core.errors import AdapterError
from adaptkit.interop.peft import CONFIG_NAME, PICKLE_NAMES, WEIGHTS_NAME, PeftAdapter, pickle_refusal, read_peft_files
from adaptkit.serving.uploads import scratch_file

TAR_CONTENT_TYPES = frozenset({"application/x-tar", "application/tar", "application/x-gtar", "application/gzip",
                               "application/x-gzip", "application/tar+gzip"})
MAX_CONFIG_BYTES = 1 << 20  # a peft adapter_config.json is ~1 KB; it is parsed in memory
HEADER_ALLOWANCE = 1 << 20  # tar headers and padding beyond the members' contents, counted by the stream cap
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


class PeftTarError(AdapterError):
    """A tar that is not a peft adapter directory this service unpacks (the message says what and how to fix)."""


class UnpackedTooLarge(PeftTarError):
    """The tar's contents exceed `max_unpacked_bytes`."""


@dataclass(frozen=True)
class TarLimits:
    max_unpacked_bytes: int
    max_members: int


def looks_like_tar(path: Path, content_type: str | None = None) -> bool:
    """True for a gzip stream, a first block that is a valid tar header, or a tar Content-Type. An adaptkit
    file starts with its header's length, then `{`: never a gzip magic, and a tar header's checksum never
    holds by chance."""
    if content_type and content_type.split(";")[0].strip().lower() in TAR_CONTENT_TYPES:
        return True
    with open(path, "rb") as handle:
        block = handle.read(tarfile.BLOCKSIZE)
    if block.startswith(_GZIP_MAGIC):
        return True
    try:
        tarfile.TarInfo.frombuf(block, tarfile.ENCODING, "surrogateescape")
    except (tarfile.HeaderError, ValueError):
        return False
    return True


class _Capped(io.RawIOBase):
    """Reads from `source`, raising UnpackedTooLarge once more than `limit` bytes came out."""

    def __init__(self, source: IO[bytes], limit: int):
        self.source, self.limit, self.count = source, limit, 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(self.limit + 1 - self.count if size is None or size < 0 else
                                min(size, self.limit + 1 - self.count))
        self.count += len(data)
        if self.count > self.limit:
            raise UnpackedTooLarge(f"the tar unpacks to more than {self.limit:,} bytes with its headers; the limit "
                                   "is --max-unpacked-bytes. Upload the adapter_model.safetensors file of a smaller "
                                   "adapter, or raise the limit")
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


@contextlib.contextmanager
def read_peft_tar(path: Path, store_root: Path, limits: TarLimits, source: str = "the uploaded tar"
                  ) -> Iterator[tuple[PeftAdapter, str | None]]:
    """The peft adapter packed in the tar at `path`, and its top folder's name (None: files at the top).
    Its weights go to a scratch file in `store_root`, removed when the block ends."""
    with contextlib.ExitStack() as stack:
        raw = stack.enter_context(open(path, "rb"))
        compressed = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        stream: IO[bytes] = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb")) if compressed else raw
        capped = _Capped(stream, limits.max_unpacked_bytes + HEADER_ALLOWANCE)
        fd, weights = stack.enter_context(scratch_file(store_root))
        try:
            config, has_weights, folder, skipped = _unpack(capped, fd, limits)
        except (tarfile.TarError, EOFError, OSError, zlib.error, UnicodeError) as error:
            raise PeftTarError(f"{source} cannot be read as a tar ({type(error).__name__}: {error}); pack the peft "
                               f"directory with: tar cf adapter.tar -C PARENT DIR") from None
        if not has_weights:
            pickled = sorted(set(skipped) & set(PICKLE_NAMES))
            if pickled:
                raise PeftTarError(pickle_refusal(source, pickled[0]))
            raise PeftTarError(f"{source} holds no {WEIGHTS_NAME} (at its top or in one top folder); it holds "
                               f"{sorted(skipped) or 'no other files'}")
        if config is None:
            raise PeftTarError(f"{source} holds no {CONFIG_NAME} (at its top or in one top folder): not a peft "
                               "adapter directory")
        yield read_peft_files(config, weights, source), folder  # read back here, never installed: no fsync


def _unpack(stream: IO[bytes], fd: int, limits: TarLimits) -> tuple[bytes | None, bool, str | None, list[str]]:
    """(adapter_config.json's bytes, whether the weights were written to `fd`, top folder, skipped file names)."""
    config: bytes | None = None
    has_weights = False
    folders: set[str] = set()
    top_files: list[str] = []
    skipped: list[str] = []
    members = total = 0
    # "r|": one pass, no seeking, members read in order as they come; tarfile never writes anything here
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            members += 1
            if members > limits.max_members:
                raise PeftTarError(f"the tar has more than {limits.max_members} members; a peft directory needs 2 "
                                   f"({CONFIG_NAME}, {WEIGHTS_NAME}). Pack only those (limit: --max-tar-members)")
            parts = _member_parts(member)
            if member.isdir():
                folders.update(parts)
            elif len(parts) == 2:
                folders.add(parts[0])
            else:
                top_files.append(parts[0])
            if len(folders) > 1 or (folders and top_files):
                where = sorted(folders) + (["the top of the tar"] if top_files else [])
                raise PeftTarError(f"the tar holds files in several places ({', '.join(where)}); pack one peft "
                                   "directory: tar cf adapter.tar -C PARENT DIR")
            if member.isdir():
                continue
            total += member.size
            if total > limits.max_unpacked_bytes:
                raise UnpackedTooLarge(f"the tar's files hold more than {limits.max_unpacked_bytes:,} bytes "
                                       f"(at {member.name!r}); the limit is --max-unpacked-bytes")
            name = parts[-1]
            if name not in (CONFIG_NAME, WEIGHTS_NAME):
                skipped.append(name)  # peft's README.md and the like: never read, never written
                continue
            if (name == CONFIG_NAME and config is not None) or (name == WEIGHTS_NAME and has_weights):
                raise PeftTarError(f"the tar holds {name} twice; pack one peft directory")
            if name == CONFIG_NAME and member.size > MAX_CONFIG_BYTES:
                raise PeftTarError(f"{CONFIG_NAME} in the tar has {member.size:,} bytes; a peft config has a few "
                                   f"thousand (at most {MAX_CONFIG_BYTES:,} are read)")
            contents = tar.extractfile(member)
            if contents is None:  # a regular file always has contents; every other type was refused above
                raise PeftTarError(f"the tar member {member.name!r} cannot be read")
            if name == CONFIG_NAME:
                config = contents.read(member.size)
                continue
            _copy(contents, fd)
            has_weights = True
    return config, has_weights, next(iter(folders)) if folders else None, skipped


def _copy(source: IO[bytes], fd: int) -> None:
    while chunk := source.read(_CHUNK):
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view):]


def _member_parts(member: tarfile.TarInfo) -> tuple[str, ...]:
    """The member's path parts (`.` dropped), or PeftTarError for a name or type that could reach outside."""
    name = member.name
    kind = ("a symbolic link" if member.issym() else "a hard link" if member.islnk() else
            "a device or FIFO" if member.isdev() else "a sparse file" if member.issparse() else
            None if member.isfile() or member.isdir() else f"a member of type {member.type!r}")
    if kind is not None:
        raise PeftTarError(f"the tar member {name!r} is {kind}; only regular files ({CONFIG_NAME}, {WEIGHTS_NAME}) "
                           "and one folder holding them are accepted. Pack the files themselves (tar -h stores what a "
                           "link points to)")
    if name.startswith("/") or "\\" in name or PurePosixPath(name).is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise PeftTarError(f"the tar member {name!r} has an absolute name (or a backslash); pack with relative names: "
                           "tar cf adapter.tar -C PARENT DIR")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise PeftTarError(f"the tar member {name!r} climbs out of the tar with '..'; pack with relative names: "
                           "tar cf adapter.tar -C PARENT DIR")
    if len(parts) > (1 if member.isdir() else 2) or (not parts and not member.isdir()):
        raise PeftTarError(f"the tar member {name!r} is nested too deep: a peft directory's files sit at the top of "
                           "the tar or in one top folder")
    return parts

"""The adapter file: one `.safetensors`, tensors plus metadata in the header, never pickle.

Header `__metadata__` (string → string):

    adaptkit.format    "2"
    adaptkit.method    lora | adalora | prefix | bottleneck
    adaptkit.config    the family's config, JSON
    adaptkit.backbone  backbone id and fingerprint, JSON
    adaptkit.sha256    checksum over the whole header and every tensor (fileheader.py); required
    adaptkit.name, .task, .src_lang, .tgt_lang, .domain   optional strings (routing keys)
    adaptkit.metrics, .training                           optional, JSON
    adaptkit.merge     a merged adapter's provenance (methods/merging.py), JSON: method, density,
                       majority_sign, seed, rank, stored_rank, relative_truncation_error, and inputs:
                       [{name, weight, method, config, sha256 of its file or null}]
    adaptkit.head      a task head's description (kind, labels, sizes), JSON; its tensors are head.*

A file is untrusted input. Reads check, before a tensor reaches the model: the safetensors
structure (fileheader.py), the format version, the checksum, every metadata value's type, the
method and the config's field types. A bad file raises AdapterError and returns nothing.

`verify=False` (read_adapter_file, read_adapter_info, AdaptedModel.load_adapter) skips only the
checksum: for a file you trust that has none, or a wrong one (edited by hand). Format 1 files
(adaptkit 0.1) carry a checksum of the tensor bytes only, which does not cover the config, so they
are unverified: they load only with verify=False; saving them again writes format 2.

Writes are atomic (atomicfile.py): a killed save leaves the old file intact, and the next save
to that path removes the temp file it left.

The store (`AdapterStore`) is a directory of adapter files addressed by name: `en-de/it` is
`ROOT/en-de/it.safetensors`. No name can point outside it: `..`, `.`, empty parts, absolute names
and backslashes are refused, and so is a name whose path resolves outside the root through a
symbolic link (to a file elsewhere, or a linked directory). A link that stays inside is followed
when reading; a save replaces the link itself, never the file it points to. Names too long for
the file system (counting the suffix and the temp name of a save) are an AdapterError, not errno 36.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import save as save_tensors

from adaptkit.core.atomicfile import TEMP_OVERHEAD, write_atomic
from adaptkit.core.errors import AdapterError
from adaptkit.core.fileheader import (
    CHECKSUM_KEY,
    DTYPES,
    Header,
    buffer_sha256,
    file_sha256,
    loads_json,
    read_header,
    tensors_sha256,
)
from adaptkit.core.registry import adapter_class_for

FORMAT_VERSION = "2"
UNVERIFIABLE_FORMATS = ("1",)  # their checksum covers the tensor bytes only
PREFIX = "adaptkit."
ROUTING_KEYS = ("task", "src_lang", "tgt_lang", "domain")
SUFFIX = ".safetensors"
BEHAVIOUR_JSON_KEYS = ("config", "backbone", "head")  # JSON that changes what the adapter does: finite numbers
RECORD_JSON_KEYS = ("metrics", "training", "merge")  # a record of how it was made: a NaN loss is allowed
_DEFAULT_NAME_MAX = 255
_DEFAULT_PATH_MAX = 4096
# Checksums of files being loaded, beside their builds; a few at once when several threads load.
_CHECKSUMS = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="adaptkit-checksum")
T = TypeVar("T")


def write_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write atomically, checksummed. `metadata` keys are given without the `adaptkit.` prefix."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise AdapterError(f"adapter files end in {SUFFIX}; got {path.name!r}")
    write_atomic(path, encode_adapter_file(tensors, metadata))
    return path


def encode_adapter_file(tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> bytes:
    """The bytes of the adapter file `write_adapter_file` writes, checksum included: for a writer that puts
    them somewhere of its own (the service's scratch files, which are not named `*.safetensors`)."""
    reserved = sorted({"format", "sha256", "verified"} & set(metadata))
    if reserved:
        raise AdapterError(f"metadata {reserved} is written by adaptkit itself; leave it out")
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {f"{PREFIX}format": FORMAT_VERSION}
    for key, value in metadata.items():
        if value is None:
            continue
        header[PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    header[CHECKSUM_KEY] = tensors_sha256(header, tensors)
    return save_tensors(tensors, metadata=header)


def read_adapter_file(path: str | Path, *, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata, after every check; raises AdapterError and returns nothing on a bad file.

    verify=False skips the checksum (only for a file you trust; see the module docstring).
    The file is read once: the header is validated before the tensor bytes are read (junk is refused
    unread), the checksum is taken over those bytes in memory, and the tensors are views into them
    laid out by that same validated header — what was checked is exactly what is loaded.
    """
    return build_from_adapter_file(path, lambda tensors, info: (tensors, info), verify=verify)


def build_from_adapter_file(path: str | Path, build: Callable[[dict[str, torch.Tensor], dict[str, Any]], T], *,
                            verify: bool = True) -> T:
    """`build(tensors, info)` of a read file, returned only once its checksum matched.

    The checksum runs on another thread while `build` runs (hashlib lets go of the GIL): a hot-load
    pays for the larger of the two, not their sum. Nothing `build` made leaves this function unless the
    checksum matched, and a mismatch is the error raised even when `build` failed too (a damaged file
    makes the build fail; the checksum names the cause). `build` must change nothing outside what it
    returns. The checks before the checksum (structure, format, a checksum present) come first, as in
    `read_adapter_file`.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = read_header(handle, size, path.name)
            data = bytearray(size - header.data_start)
            handle.seek(header.data_start)
            if handle.readinto(data) != len(data) or handle.read(1):
                raise AdapterError(f"{path.name} changed size while it was read; read it again once it is written")
    except OSError as error:
        raise _unreadable(path, error) from None
    version = _format_version(header, path.name)
    checksum = None
    if verify:
        _check_verifiable(header, version, path.name)
        checksum = _CHECKSUMS.submit(buffer_sha256, header, data)
    try:
        info = _decode(header.metadata, path.name)
        info["verified"] = verify
        built = build(_tensors(header, data, path.name), info)
    except AdapterError:
        if checksum is not None:
            _check_digest(checksum.result(), header, path.name)
        raise
    if checksum is not None:
        _check_digest(checksum.result(), header, path.name)
    return built


def _tensors(header: Header, data: bytearray, source: str) -> dict[str, torch.Tensor]:
    """The header's tensors as views into `data` (no copy; loading into an adapter copies them once)."""
    if sys.byteorder != "little":
        raise AdapterError(f"{source}: adapter files store little-endian tensors; this machine is big-endian")
    tensors = {}
    for name, entry in header.tensors.items():
        dtype = DTYPES[entry.dtype]
        stored = torch.uint8 if dtype == torch.bool else dtype  # bytes first: a bool must be 0 or 1
        if entry.begin == entry.end:
            tensor = torch.empty(entry.shape, dtype=stored)
        else:
            # a view needs its offset aligned to the element size; otherwise copy the bytes to a fresh buffer
            aligned = entry.begin % stored.itemsize == 0
            buffer, offset = (data, entry.begin) if aligned else (bytearray(data[entry.begin:entry.end]), 0)
            tensor = torch.frombuffer(buffer, dtype=stored, count=entry.numel, offset=offset).view(entry.shape)
        if dtype == torch.bool:
            if tensor.numel() and int(tensor.max()) > 1:
                raise AdapterError(f"{source} is corrupt: boolean tensor {name!r} holds bytes other than 0 and 1")
            tensor = tensor.view(torch.bool)
        tensors[name] = tensor
    return tensors


def read_adapter_info(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Metadata of an adapter file, for humans and routers: method, config, backbone, routing keys,
    `num_parameters`, `file_bytes`, and `verified` (the checksum was checked and matched)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = read_header(handle, size, path.name)
            info = _checked(header, path.name, verify, lambda: file_sha256(handle, header))
    except OSError as error:
        raise _unreadable(path, error) from None
    info["num_parameters"] = header.num_elements
    info["file_bytes"] = size
    return info


def _unreadable(path: Path, error: OSError) -> AdapterError:
    if isinstance(error, FileNotFoundError):
        return AdapterError(f"no adapter file at {str(path)!r}")
    return AdapterError(f"cannot read the adapter file {str(path)!r}: {error.strerror or error}")


def _checked(header: Header, source: str, verify: bool, checksum: Callable[[], str]) -> dict[str, Any]:
    """Format, checksum (`checksum()` computes it over the file's bytes), then metadata and config:
    the order that gives the clearest error. The structure was checked by `read_header`."""
    version = _format_version(header, source)
    if verify:
        _check_verifiable(header, version, source)
        _check_digest(checksum(), header, source)
    info = _decode(header.metadata, source)
    info["verified"] = verify
    return info


def _format_version(header: Header, source: str) -> str:
    version = header.metadata.get(f"{PREFIX}format")
    if version is None:
        raise AdapterError(f"{source} is a safetensors file but not an adaptkit adapter (no adaptkit.format); "
                           "for PEFT adapters use import_peft")
    if version != FORMAT_VERSION and version not in UNVERIFIABLE_FORMATS:
        raise AdapterError(f"{source} has adapter format version {version!r}; this adaptkit reads versions "
                           f"{[*UNVERIFIABLE_FORMATS, FORMAT_VERSION]}. Upgrade adaptkit to read it")
    return version


def _check_verifiable(header: Header, version: str, source: str) -> None:
    if version in UNVERIFIABLE_FORMATS:
        raise AdapterError(f"{source} is an adapter file of format {version}, whose checksum does not cover its "
                           "config: it cannot be verified. If you trust it, load it with verify=False and save it "
                           "again (that writes a verifiable format-2 file)")
    if header.metadata.get(CHECKSUM_KEY) is None:
        raise AdapterError(f"{source} has no checksum ({CHECKSUM_KEY}), so nothing shows it is intact; "
                           "load it with verify=False only if you trust where it came from")


def _check_digest(digest: str, header: Header, source: str) -> None:
    if digest != header.metadata.get(CHECKSUM_KEY):
        raise AdapterError(f"{source} is corrupt or was edited: its content does not match the checksum in its "
                           "header. Re-export it from the original, or pass verify=False if you trust the edit")


def _decode(metadata: dict[str, str], source: str) -> dict[str, Any]:
    """The `adaptkit.*` entries without the prefix, JSON values decoded and type-checked."""
    info: dict[str, Any] = {}
    for key, value in metadata.items():
        if not key.startswith(PREFIX):
            continue
        short = key[len(PREFIX):]
        if short in BEHAVIOUR_JSON_KEYS or short in RECORD_JSON_KEYS:
            value = loads_json(value, key, source, finite=short in BEHAVIOUR_JSON_KEYS)
            if not isinstance(value, dict):
                raise AdapterError(f"{source}: {key} must be a JSON object, not {type(value).__name__}")
        info[short] = value
    for required in ("method", "config"):
        if required not in info:
            raise AdapterError(f"{source} has no {PREFIX}{required}: it is damaged or not an adaptkit adapter")
    try:
        config_class = adapter_class_for(info["method"]).config_class
        config_class.from_dict(info["config"])  # field types and bounds, before anyone builds from it
    except AdapterError as error:
        raise AdapterError(f"{source}: {error}") from None
    return info


# -- the store -------------------------------------------------------------------------------------
class AdapterStore:
    """A directory of adapter files addressed by adapter name; no name can point outside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path_for(self, name: str) -> Path:
        """The file for `name`: inside the store, as the name spells it (a link there is not resolved)."""
        if not isinstance(name, str) or not name or "\x00" in name or "\\" in name or name.startswith("/"):
            raise AdapterError(f"adapter name {name!r} cannot be stored: use letters, digits, '-', '_', '.' and '/'")
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise AdapterError(f"adapter name {name!r} would leave the adapter store {self.root}; "
                               "'..', '.' and empty path parts are not allowed")
        self._check_length(name, parts)
        path = self.root.joinpath(*parts[:-1], parts[-1] + SUFFIX)
        try:
            resolved = path.resolve()
        except RuntimeError:  # Python < 3.13 raises on a loop
            raise AdapterError(f"adapter name {name!r} is a symbolic link loop in the adapter store "
                               f"{self.root}") from None
        except OSError as error:
            raise AdapterError(f"adapter name {name!r} cannot be resolved in the adapter store {self.root}: "
                               f"{error.strerror}") from None
        if not resolved.is_relative_to(self.root):
            raise AdapterError(f"adapter name {name!r} leads outside the adapter store {self.root} "
                               f"(a symbolic link to {str(resolved)!r}); the store never follows links out of it")
        return path

    def _check_length(self, name: str, parts: list[str]) -> None:
        name_max, path_max = _limits(self.root)
        try:
            sizes = [len(os.fsencode(part)) for part in parts]
            root_size = len(os.fsencode(str(self.root)))
        except UnicodeError:
            raise AdapterError(f"adapter name {name!r} cannot be a file name on this system") from None
        sizes[-1] += len(SUFFIX) + TEMP_OVERHEAD
        longest = max(range(len(parts)), key=sizes.__getitem__)
        if sizes[longest] > name_max:
            raise AdapterError(
                f"adapter name {name[:40]!r}… is too long for the file system: its part {parts[longest][:20]!r}… "
                f"needs {sizes[longest]} bytes as a file name (suffix and temp name included), the limit is "
                f"{name_max}. Use a shorter name")
        total = root_size + sum(sizes) + len(parts)
        if total >= path_max:
            raise AdapterError(f"adapter name {name[:40]!r}… is too long for the file system: its path in "
                               f"{self.root} needs {total} bytes, the limit is {path_max}. Use a shorter name")

    def names(self) -> list[str]:
        """Names of the adapters in the store (files that a link would take outside it are left out)."""
        if not self.root.is_dir():
            return []
        found = (p.relative_to(self.root).as_posix()[: -len(SUFFIX)] for p in self.root.rglob("*" + SUFFIX))
        return sorted(name for name in found if name in self)

    def __contains__(self, name: str) -> bool:
        try:
            return self.path_for(name).is_file()
        except (AdapterError, OSError):
            return False


def _limits(root: Path) -> tuple[int, int]:
    """NAME_MAX and PATH_MAX of the file system the store is on (or will be, once created)."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        return os.pathconf(existing, "PC_NAME_MAX"), os.pathconf(existing, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no such limit
        return _DEFAULT_NAME_MAX, _DEFAULT_PATH_MAX

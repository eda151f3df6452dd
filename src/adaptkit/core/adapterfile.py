"""The adapter file: one `.safetensors`, tensors plus metadata in the header, never pickle.

Header `__metadata__` (string → string):

    adaptkit.format    "1"
    adaptkit.method    lora | adalora | prefix | bottleneck
    adaptkit.config    the family's config, JSON
    adaptkit.backbone  backbone id and fingerprint, JSON
    adaptkit.sha256    hash of every tensor's bytes, checked on load
    adaptkit.name, .task, .src_lang, .tgt_lang, .domain, .metrics   optional

Writes are atomic (temp file, fsync, rename): a killed save leaves the old file intact. Reads
check everything before a tensor reaches the model: a bad file is refused whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import adapter_class_for

FORMAT_VERSION = "1"
PREFIX = "adaptkit."
ROUTING_KEYS = ("task", "src_lang", "tgt_lang", "domain")
SUFFIX = ".safetensors"
_MAX_HEADER = 100 * 1024 * 1024


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def write_adapter_file(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write atomically. `metadata` keys are given without the `adaptkit.` prefix."""
    path = Path(path)
    if path.suffix != SUFFIX:
        raise AdapterError(f"adapter files end in {SUFFIX}; got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    header = {f"{PREFIX}format": FORMAT_VERSION, f"{PREFIX}sha256": tensors_sha256(tensors)}
    for key, value in metadata.items():
        if value is None:
            continue
        header[PREFIX + key] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_header(path: Path) -> dict[str, Any]:
    """Parse the safetensors header by hand: cheap, and it tells a pickle from a truncated file."""
    if not path.is_file():
        raise AdapterError(f"no adapter file at {str(path)!r}")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        # a header length whose low byte is 0x80 (or 0x50 0x4B) looks like a pickle (or zip) start;
        # a safetensors header always opens with "{" at byte 8, which neither of those has there
        opens_json = handle.read(1) == b"{"
        handle.seek(8)
        if not opens_json and (head[:1] == b"\x80" or head[:2] == b"PK"):
            raise AdapterError(
                f"{path.name} is a pickle / torch.save file; adaptkit never unpickles (it can run code). "
                "Convert it to .safetensors in a trusted environment, or use import_peft for a PEFT directory"
            )
        if len(head) < 8:
            raise AdapterError(f"{path.name} is truncated ({size} bytes): not a complete safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            raise AdapterError(f"{path.name} is truncated or not safetensors: header length {length} exceeds the file")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise AdapterError(f"{path.name} is not a safetensors file (unreadable header)") from None
    ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    if 8 + length + max(ends, default=0) > size:
        raise AdapterError(f"{path.name} is truncated: the header promises {max(ends)} bytes of tensors, "
                           f"the file holds {size - 8 - length}")
    return header


def read_adapter_metadata(path: str | Path) -> dict[str, Any]:
    """The validated `adaptkit.*` metadata, JSON values decoded, keys without the prefix."""
    path = Path(path)
    raw = _read_header(path).get("__metadata__") or {}
    if f"{PREFIX}format" not in raw:
        raise AdapterError(f"{path.name} is a safetensors file but not an adaptkit adapter (no adaptkit.format); "
                           "for PEFT adapters use import_peft")
    if raw[f"{PREFIX}format"] != FORMAT_VERSION:
        raise AdapterError(f"{path.name} has adapter format version {raw[f'{PREFIX}format']!r}; "
                           f"this adaptkit reads version {FORMAT_VERSION}. Upgrade adaptkit to read it")
    info: dict[str, Any] = {}
    for key, value in raw.items():
        if not key.startswith(PREFIX):
            continue
        short = key[len(PREFIX):]
        if short in ("config", "backbone", "metrics", "training"):
            value = json.loads(value)
        info[short] = value
    adapter_class_for(info.get("method", "<missing>"))  # unknown method → clear error
    return info


def read_adapter_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata, after every check; raises AdapterError and returns nothing on a bad file."""
    path = Path(path)
    info = read_adapter_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise AdapterError(f"{path.name} is corrupt: {error}") from None
    if info.get("sha256") and tensors_sha256(tensors) != info["sha256"]:
        raise AdapterError(f"{path.name} is corrupt: its tensors do not match the checksum in its header")
    return tensors, info


def read_adapter_info(path: str | Path) -> dict[str, Any]:
    """Metadata of an adapter file, for humans and routers: method, config, backbone, routing keys."""
    info = read_adapter_metadata(path)
    header = _read_header(Path(path))
    info["num_parameters"] = sum(
        int(torch.Size(entry["shape"]).numel()) for key, entry in header.items() if key != "__metadata__"
    )
    info["file_bytes"] = Path(path).stat().st_size
    return info


class AdapterStore:
    """A directory of adapter files addressed by adapter name; no name can point outside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def path_for(self, name: str) -> Path:
        if not name or "\x00" in name or "\\" in name or name.startswith("/"):
            raise AdapterError(f"adapter name {name!r} cannot be stored: use letters, digits, '-', '_', '.' and '/'")
        parts = name.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise AdapterError(f"adapter name {name!r} would leave the adapter store {self.root}; "
                               "'..', '.' and empty path parts are not allowed")
        path = (self.root / (name + SUFFIX)).resolve()
        if not path.is_relative_to(self.root):
            raise AdapterError(f"adapter name {name!r} would leave the adapter store {self.root}")
        return path

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(str(p.relative_to(self.root))[: -len(SUFFIX)] for p in self.root.rglob("*" + SUFFIX))

    def __contains__(self, name: str) -> bool:
        try:
            return self.path_for(name).is_file()
        except AdapterError:
            return False

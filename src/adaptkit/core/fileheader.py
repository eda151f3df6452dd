"""The safetensors header of an adapter file, read as hostile input, and the checksum over the file.

Layout: 8 bytes (little-endian u64) header length N, N bytes of JSON, then the tensor bytes. The
JSON maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets into the
bytes after the header) and may hold "__metadata__", a string → string map.

`read_header` checks all of it before anything is allocated from it: strict JSON (no duplicate
keys, no NaN, bounded nesting), every entry's types, byte counts that agree with dtype × shape,
tensors that tile the data exactly (no overlap, no hole, nothing after the last) and a file that
holds them all. Whatever is wrong raises AdapterError naming the file and the problem.

The checksum (format 2) covers everything that can change what a loaded adapter does:

    sha256( b"adaptkit.sha256/2\\n"
            + canonical JSON of {"metadata": __metadata__ without adaptkit.sha256,
                                 "tensors": {name: {"dtype": dtype, "shape": shape}, ...}}
            + b"\\n"
            + the bytes of every tensor, in sorted name order (Unicode code points) )

canonical JSON = json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True). It
holds no raw newline, so the "\\n" after it is unambiguous, and dtypes and shapes fix how many
bytes each tensor contributes. Config, routing keys, backbone, names, dtypes, shapes, bytes: one
changed digit anywhere changes the checksum.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch

from adaptkit.core.errors import AdapterError

CHECKSUM_KEY = "adaptkit.sha256"
CHECKSUM_DOMAIN = b"adaptkit.sha256/2\n"
MAX_HEADER = 100 * 1024 * 1024
MAX_DIMS = 64
ENTRY_KEYS = frozenset({"dtype", "shape", "data_offsets"})
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_CHUNK = 1 << 20


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header: metadata strings, tensor entries, and where the tensor bytes start."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    data_start: int

    @property
    def num_elements(self) -> int:
        return sum(entry.numel for entry in self.tensors.values())


class _NotStrictJSON(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # Python keeps the last of two equal keys, other readers may keep the first: refuse both
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _NotStrictJSON(f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _NotStrictJSON(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotStrictJSON(f"{text} does not fit a finite float")
    return value


def loads_json(text: str | bytes, what: str, source: str, *, finite: bool = True) -> Any:
    """Strict JSON or an AdapterError: no duplicate keys, no NaN / Infinity (unless `finite` is False),
    and nesting too deep for the parser is refused rather than raising RecursionError."""
    try:
        if finite:
            return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant,
                              parse_float=_finite_float)
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except RecursionError:
        raise AdapterError(f"{source}: {what} is nested too deeply to be an adapter's") from None
    except (UnicodeDecodeError, ValueError) as error:  # JSONDecodeError, _NotStrictJSON, int digit limits
        raise AdapterError(f"{source}: {what} is not valid JSON ({error})") from None


def read_header(handle: BinaryIO, size: int, source: str) -> Header:
    """Read and validate the header at the start of `handle` (a file of `size` bytes)."""
    head = handle.read(8)
    # a header length whose low byte is 0x80 (or 0x50 0x4B) looks like a pickle (or zip) start;
    # a safetensors header always opens with "{" at byte 8, which neither of those has there
    opens_json = handle.read(1) == b"{"
    if not opens_json and (head[:1] == b"\x80" or head[:2] == b"PK"):
        raise AdapterError(
            f"{source} is a pickle / torch.save file; adaptkit never unpickles (it can run code). "
            "Convert it to .safetensors in a trusted environment, or use import_peft for a PEFT directory"
        )
    if len(head) < 8:
        raise AdapterError(f"{source} is truncated ({size} bytes): not a complete safetensors file")
    (length,) = struct.unpack("<Q", head)
    if length > min(size - 8, MAX_HEADER):
        raise AdapterError(f"{source} is truncated or not safetensors: header length {length} exceeds the file "
                           f"({size} bytes) or the {MAX_HEADER}-byte limit")
    handle.seek(8)
    raw = loads_json(handle.read(length), "its header", source)
    if not isinstance(raw, dict):
        raise AdapterError(f"{source}: its header is {type(raw).__name__}, not a JSON object; not a safetensors file")
    metadata = _metadata(raw.pop("__metadata__", {}), source)
    tensors = {name: _entry(name, entry, source) for name, entry in raw.items()}
    _check_layout(tensors, size - 8 - length, source)
    return Header(metadata, tensors, 8 + length)


def _metadata(value: Any, source: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise AdapterError(f"{source}: its __metadata__ is {type(value).__name__}, not a JSON object of strings")
    for key, item in value.items():
        if not isinstance(item, str):
            raise AdapterError(f"{source}: __metadata__ value of {key!r} is {type(item).__name__}, not a string")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(name: str, entry: Any, source: str) -> TensorEntry:
    where = f"{source}: tensor {name!r}"
    if not name:
        raise AdapterError(f"{source}: a tensor has an empty name")
    if not isinstance(entry, dict):
        raise AdapterError(f"{where} is described by {type(entry).__name__}, not a JSON object")
    missing, extra = ENTRY_KEYS - set(entry), set(entry) - ENTRY_KEYS
    if missing or extra:
        raise AdapterError(f"{where} has no {sorted(missing)}" if missing
                           else f"{where} has unknown keys {sorted(extra)}")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise AdapterError(f"{where} has dtype {dtype!r}; known dtypes: {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_int(d) and d >= 0 for d in shape):
        raise AdapterError(f"{where} has shape {shape!r}: not a list of at most {MAX_DIMS} non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise AdapterError(f"{where} has data_offsets {offsets!r}: not [begin, end] with 0 <= begin <= end")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise AdapterError(f"{where} spans {offsets[1] - offsets[0]} bytes, but {dtype} of shape {shape} "
                           f"needs {nbytes} bytes")
    return TensorEntry(dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(tensors: dict[str, TensorEntry], data_size: int, source: str) -> None:
    """Tensors must tile the data exactly, as the safetensors format requires: no overlap, no hole."""
    expected = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin != expected:
            kind = "overlaps another tensor" if entry.begin < expected else "leaves a hole before it"
            raise AdapterError(f"{source}: tensor {name!r} {kind} (starts at byte {entry.begin}, expected {expected})")
        expected = entry.end
    if expected > data_size:
        raise AdapterError(f"{source} is truncated: the header promises {expected} bytes of tensors, "
                           f"the file holds {data_size}")
    if expected < data_size:
        raise AdapterError(f"{source} has {data_size - expected} bytes after the last tensor: not a valid "
                           "safetensors file")


# -- the checksum ---------------------------------------------------------------------------------

def _canonical(metadata: dict[str, Any], specs: dict[str, tuple[str, list[int]]]) -> bytes:
    body = {"metadata": {k: v for k, v in metadata.items() if k != CHECKSUM_KEY},
            "tensors": {name: {"dtype": dtype, "shape": list(shape)} for name, (dtype, shape) in specs.items()}}
    return CHECKSUM_DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def _digest(metadata: dict[str, Any], specs: dict[str, tuple[str, list[int]]],
            payloads: Iterable[bytes | memoryview]) -> str:
    digest = hashlib.sha256(_canonical(metadata, specs))
    for chunk in payloads:
        digest.update(chunk)
    return digest.hexdigest()


def file_sha256(handle: BinaryIO, header: Header) -> str:
    """The checksum of a file whose header was validated, reading its tensor bytes in name order."""
    names = sorted(header.tensors)

    def payloads() -> Iterable[bytes]:
        for name in names:
            entry = header.tensors[name]
            handle.seek(header.data_start + entry.begin)
            left = entry.end - entry.begin
            while left:
                chunk = handle.read(min(left, _CHUNK))
                if not chunk:
                    raise AdapterError(f"the file ended inside tensor {name!r}: it is truncated")
                left -= len(chunk)
                yield chunk

    specs = {name: (header.tensors[name].dtype, list(header.tensors[name].shape)) for name in names}
    return _digest(header.metadata, specs, payloads())


def buffer_sha256(header: Header, data: bytes | bytearray | memoryview) -> str:
    """The checksum of a validated file whose tensor bytes (everything after the header) are `data`, in memory."""
    names = sorted(header.tensors)
    view = memoryview(data)
    specs = {name: (header.tensors[name].dtype, list(header.tensors[name].shape)) for name in names}
    # Tensors stored back to back in name order (safetensors' layout when they share a dtype) are hashed in one
    # call: the digest is the same, and a single long update lets go of the GIL for all of it, so a load can
    # build its adapter meanwhile (adapterfile.build_from_adapter_file).
    spans: list[list[int]] = []
    for name in names:
        entry = header.tensors[name]
        if spans and spans[-1][1] == entry.begin:
            spans[-1][1] = entry.end
        else:
            spans.append([entry.begin, entry.end])
    return _digest(header.metadata, specs, (view[begin:end] for begin, end in spans))


def tensors_sha256(metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> str:
    """The checksum of the file that `metadata` and these (contiguous, CPU) tensors will make."""
    names = sorted(tensors)
    specs = {}
    for name in names:
        dtype = DTYPE_NAMES.get(tensors[name].dtype)
        if dtype is None:
            raise AdapterError(f"tensor {name!r} has dtype {tensors[name].dtype}, which adapter files cannot hold")
        specs[name] = (dtype, list(tensors[name].shape))
    payloads = (memoryview(tensors[n].reshape(-1).view(torch.uint8).numpy()) for n in names)
    return _digest(metadata, specs, payloads)

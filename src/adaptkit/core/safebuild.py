"""Build an adapter from an untrusted file's config without trusting the config.

A header can claim any config: `r=1000000` in a 44 KB file once grew the process by 8.7 GB for
26 s before a shape error, and `r=10**9` raised a raw allocator error. So the load runs twice:

1. a dry run on the meta device (shapes, no memory): the family builds itself from the config and
   `load_file`s stand-ins with the file's names, dtypes and shapes — every check the real load
   makes (missing, extra or misshapen tensors; a task head's description), with nothing allocated.
   Meanwhile every tensor the dry run creates is counted; past ALLOCATION_FACTOR × the elements
   the file holds, plus a quarter of the backbone (at least ALLOCATION_FLOOR), it stops: a real
   adapter is never much larger than its file, nor than a fraction of its backbone.
2. only then the real build and load.

Values are checked too, since a checksum only proves that a file is the one its writer meant: every
tensor must have the kind of dtype (floating point, integer, boolean) of the adapter tensor it fills
(an I32 tensor for float weights would otherwise be cast and load), and every floating-point tensor
must be finite (an adapter with a NaN weight loads, then answers garbage or "" for every request).

A dry run reads only the family, its config, the backbone's layout, the file's tensor names,
dtypes and shapes, the task head's description and the bound, and meta tensors hold no values: the
same inputs give the same verdict. So a verdict that passed is remembered (per backbone, the last
PASSED_KEPT of them) and a file with the same inputs skips straight to the real build: a store of
adapters sharing one config pays for one dry run, which was two thirds of a hot-load (~50 of 75 ms
for a 7.6 MB LoRA on gemma3-270m's shapes). A refused config is never remembered.

Nothing here knows a family: it needs only that a family's constructor and `load_file` run on
the meta device (under `torch.device("meta")`), as plain module code does. Tensors that a fresh
adapter holds as all-true masks (AdaLoRA's kept triplets) are assumed all-true on meta as well.
Anything else a family raises while building from a file becomes an AdapterError naming the file.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.overrides import TorchFunctionMode

try:
    from torch.fx.experimental import _config as fx_config
except ImportError:  # torch without the meta-nonzero switch
    fx_config = None

from adaptkit.core.arch import Arch
from adaptkit.core.errors import AdapterError

if TYPE_CHECKING:
    from adaptkit.methods.base import Adapter

PASSED_KEPT = 256
_PASSED: weakref.WeakKeyDictionary[Arch, OrderedDict[tuple, None]] = weakref.WeakKeyDictionary()
_PASSED_LOCK = threading.Lock()  # loads may run on several threads (a server's loader, a user's)
_LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("adaptkit_loading_from_file", default=False)

ALLOCATION_FACTOR = 16  # fresh tensors, temporaries and wrappers a constructor creates per saved element
ALLOCATION_FLOOR = 1 << 24  # elements (64 MB of float32): room for a small adapter's construction


class _TooLarge(Exception):
    pass


class _CountAllocations(TorchFunctionMode):
    """Counts the elements of every new tensor created under it; raises _TooLarge past `limit`."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit = limit
        self.elements = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            # in-place ops return their input, views share its memory: neither allocates
            if isinstance(tensor, torch.Tensor) and tensor._base is None and not any(tensor is a for a in args):
                self.elements += tensor.numel()
        if self.elements > self.limit:
            raise _TooLarge
        return out


@contextlib.contextmanager
def _fresh_masks_all_true() -> Iterator[None]:
    """On meta, `nonzero` (boolean indexing) needs an assumption about values: a fresh mask is all true."""
    if fx_config is None:  # an older torch: data-dependent ops then fail the dry run with a clear error
        yield
        return
    with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
        yield


def loading_from_file() -> bool:
    """True while a family's constructor builds an adapter that `load_file` fills next (or that is dropped if
    that fails): random initial values the strict load overwrites need not be drawn (a LoRA's A: ~10 ms of
    a 7.6 MB hot-load on gemma3's shapes, 5M uniform draws)."""
    return _LOADING.get()


def build_from_file(adapter_class: type[Adapter], name: str, tensors: dict[str, torch.Tensor],
                    info: dict[str, Any], arch: Arch, *, backbone_elements: int, source: str) -> Adapter:
    """The adapter that `info` (a read file's metadata) and `tensors` describe, built and loaded."""
    method = adapter_class.method
    config = _guarded(source, f"reading its {method} config",
                      lambda: adapter_class.config_class.from_dict(info["config"]))
    file_elements = sum(t.numel() for t in tensors.values())
    limit = ALLOCATION_FACTOR * file_elements + max(ALLOCATION_FLOOR, backbone_elements // 4)
    stand_ins = {k: torch.empty(t.shape, dtype=t.dtype, device="meta") for k, t in tensors.items()}

    def dry_run() -> None:
        counter = _CountAllocations(limit)
        try:
            with torch.device("meta"), _fresh_masks_all_true(), counter:
                built = adapter_class(name, config, arch)
                built.load_file(stand_ins, info)
                _check_dtype_kinds(stand_ins, built.file_tensors())  # in the context: AdaLoRA's masks index
        except _TooLarge:
            raise AdapterError(
                f"its config would allocate more than {limit:,} elements to build a {method} adapter whose file "
                f"holds {file_elements:,}: the config does not belong to these tensors, or is absurdly large"
            ) from None

    specs = tuple(sorted((k, str(t.dtype), tuple(t.shape)) for k, t in tensors.items()))
    verdict = (adapter_class, config.to_json(), specs, json.dumps(info.get("head"), sort_keys=True), limit)
    with _PASSED_LOCK:
        known = verdict in _PASSED.setdefault(arch, OrderedDict())
    if not known:
        _guarded(source, f"building the {method} adapter on the meta device", dry_run)
        with _PASSED_LOCK:
            passed = _PASSED.setdefault(arch, OrderedDict())
            passed[verdict] = None
            if len(passed) > PASSED_KEPT:
                passed.popitem(last=False)

    _check_finite(tensors, source)

    def real() -> Adapter:
        token = _LOADING.set(True)
        try:
            adapter = adapter_class(name, config, arch)
        finally:
            _LOADING.reset(token)
        adapter.load_file(tensors, info)
        return adapter

    return _guarded(source, f"building the {method} adapter", real)


def _kind(dtype: torch.dtype) -> str:
    return "boolean" if dtype == torch.bool else "floating-point" if dtype.is_floating_point else "integer"


def _check_dtype_kinds(stored: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Each stored tensor has the kind of dtype of the adapter tensor it fills: loading copies with a cast, so an
    integer tensor would silently become float weights (or a float one a boolean mask). Part of the dry run, whose
    remembered verdicts key on the stored dtypes."""
    for key in sorted(stored):
        want = expected.get(key)
        if want is not None and _kind(stored[key].dtype) != _kind(want.dtype):
            raise AdapterError(f"tensor {key!r} is stored as {stored[key].dtype} ({_kind(stored[key].dtype)}) but "
                               f"fills the adapter's {want.dtype} ({_kind(want.dtype)}) tensor: the file is damaged "
                               "or was not written by adaptkit; re-export it")


def _check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Every floating-point value is finite: a NaN or an infinity in one weight spreads to every output."""
    for key in sorted(tensors):
        tensor = tensors[key]
        if not tensor.dtype.is_floating_point or tensor.numel() == 0:
            continue
        if tensor.dtype == torch.float8_e4m3fn:  # no isfinite kernel for it; the cast keeps NaN a NaN
            tensor = tensor.to(torch.float16)
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int(tensor.numel() - finite.sum())
            raise AdapterError(f"{source}: tensor {key!r} holds {bad:,} non-finite value{'s' if bad != 1 else ''} "
                               f"(NaN or infinity) of its {tensor.numel():,}: an adapter with them answers garbage. "
                               "Training diverged or the file was damaged; re-train or re-export it")


def _guarded(source: str, doing: str, step: Any) -> Any:
    try:
        return step()
    except AdapterError as error:
        raise AdapterError(f"{source}: {error}") from None
    except Exception as error:  # noqa: BLE001 - a family's own error on untrusted input is the file's fault
        raise AdapterError(f"{source}: {doing} failed ({type(error).__name__}: {error}); "
                           "its config is damaged or too large for this backbone") from None

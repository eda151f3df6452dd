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

Nothing here knows a family: it needs only that a family's constructor and `load_file` run on
the meta device (under `torch.device("meta")`), as plain module code does. Tensors that a fresh
adapter holds as all-true masks (AdaLoRA's kept triplets) are assumed all-true on meta as well.
Anything else a family raises while building from a file becomes an AdapterError naming the file.
"""

from __future__ import annotations

import contextlib
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
                adapter_class(name, config, arch).load_file(stand_ins, info)
        except _TooLarge:
            raise AdapterError(
                f"its config would allocate more than {limit:,} elements to build a {method} adapter whose file "
                f"holds {file_elements:,}: the config does not belong to these tensors, or is absurdly large"
            ) from None

    _guarded(source, f"building the {method} adapter on the meta device", dry_run)

    def real() -> Adapter:
        adapter = adapter_class(name, config, arch)
        adapter.load_file(tensors, info)
        return adapter

    return _guarded(source, f"building the {method} adapter", real)


def _guarded(source: str, doing: str, step: Any) -> Any:
    try:
        return step()
    except AdapterError as error:
        raise AdapterError(f"{source}: {error}") from None
    except Exception as error:  # noqa: BLE001 - a family's own error on untrusted input is the file's fault
        raise AdapterError(f"{source}: {doing} failed ({type(error).__name__}: {error}); "
                           "its config is damaged or too large for this backbone") from None

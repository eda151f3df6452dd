"""Many named adapters of any family over one frozen backbone.

`AdaptedModel` owns the backbone and a dict of adapters. It adds, loads, saves and removes
them, and runs the backbone with a per-call routing (see routing.py): which adapter applies to
which row. It never asks which family an adapter is — that is the `Adapter` protocol's job.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from adaptkit.core.adapterfile import ROUTING_KEYS, AdapterStore, build_from_adapter_file, write_adapter_file
from adaptkit.core.arch import Arch
from adaptkit.core.backbone import check_backbone as check_backbone_fn
from adaptkit.core.backbone import contiguous_head_input, fingerprint, freeze, load_pretrained
from adaptkit.core.errors import AdapterError
from adaptkit.core.quantize import quantize_backbone
from adaptkit.core.registry import adapter_class_for
from adaptkit.core.regularizer import add_regularizers
from adaptkit.core.routing import AdapterSpec, Routing, current_routing, recompute_under_this_routing, routing_scope
from adaptkit.core.safebuild import build_from_file

if TYPE_CHECKING:
    from adaptkit.methods.base import Adapter, AdapterConfig

_UNSET: Any = object()


class _Call(NamedTuple):
    """A call (or a load) in flight that pins adapters: named in errors, and never waited on by itself.
    A tuple, not a frozen dataclass: one is built per call, and its __init__ cost ~2 µs of a ~10 µs switch."""

    names: frozenset[str]
    thread_id: int
    thread_name: str
    started: float


class AdaptedModel(nn.Module):
    """A frozen backbone plus a bank of named adapters, routed per call or per row.

    Starts in eval mode, as transformers' `from_pretrained` does (adapter dropout off); a new adapter
    takes the model's current mode; `train()` / `eval()` switch the backbone and every adapter.

    >>> model = AdaptedModel.from_pretrained("gemma3-270m")
    >>> model.add_adapter("en-de", LoRA(r=8))
    >>> model.generate(**batch, adapter=["en-de", None])   # row 0 adapted, row 1 bare
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, backbone_id: str | None = None,
                 store: str | Path | None = None, max_resident: int | None = None, quantize: str | None = None):
        super().__init__()
        freeze(model)
        # The fingerprint is taken from the weights as loaded, before quantising: a file trained on the
        # float backbone loads on the quantised one and back; the quantisation is recorded beside it.
        backbone_fingerprint = fingerprint(model)
        self.quantization = quantize_backbone(model, quantize) if quantize is not None else None
        contiguous_head_input(model)
        self.model = model
        self.tokenizer = tokenizer
        self.backbone_id = backbone_id or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.arch = Arch(model)
        self.family = self.arch.family
        self.store = AdapterStore(store) if store is not None else None
        self.max_resident = max_resident
        self._adapters = nn.ModuleDict()  # slot key → Adapter (registered, so .to() moves adapters too)
        self._slots: OrderedDict[str, str] = OrderedDict()  # adapter name → slot key, LRU order
        self._metadata: dict[str, dict[str, Any]] = {}
        self._versions: dict[str, str | None] = {}  # adapter name → checksum of the file it came from
        self._next_slot = 0
        self._merged: str | None = None
        self._pins: Counter[str] = Counter()  # adapter name → calls in flight (and loads) that need it
        self._calls: dict[int, _Call] = {}  # what holds the pins, by a per-call id
        self._call_ids = itertools.count()
        self._removing: set[str] = set()  # names whose removal waits for their calls; new calls wait for it
        self._lock = threading.RLock()
        self._released = threading.Condition(self._lock)  # notified when pins drop or a removal ends
        # False when an owner (the service's scheduler) decides what is resident: a call for an adapter that
        # is not loaded then fails instead of loading it from the store behind the owner's back.
        self.load_on_use = True
        self._backbone_fingerprint = backbone_fingerprint
        self.eval()

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, dtype: torch.dtype | str | None = None,
                        device: str | torch.device | None = None, quantize: str | None = None,
                        **kwargs: Any) -> AdaptedModel:
        """`quantize`: "int8" (CPU: torchao weight-only; CUDA: bitsandbytes) or "nf4" (bitsandbytes, CPU or
        CUDA) for the frozen Linear layers (core/quantize.py); adapters stay in full precision. "int8-dynamic"
        (CPU, inference only): int8 weights, the output head included, times int8 activations, faster than
        float32; adapters trained over "int8" or float load on it, training over it is refused."""
        model, tokenizer, backbone_id = load_pretrained(name_or_path, dtype=dtype, device=device)
        return cls(model, tokenizer, backbone_id, quantize=quantize, **kwargs)

    def require_tokenizer(self, purpose: str) -> Any:
        """The tokenizer, or an AdapterError saying that `purpose` needs one and how to give it."""
        if self.tokenizer is None:
            raise AdapterError(f"{purpose} needs a tokenizer, and this model has no tokenizer (none was passed, or "
                               "its directory has no tokenizer files): set model.tokenizer = "
                               "AutoTokenizer.from_pretrained(...) first")
        return self.tokenizer

    # -- the bank ------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self._slots)

    def get_adapter(self, name: str) -> Adapter:
        try:
            return self._adapters[self._slots[name]]
        except KeyError:
            raise AdapterError(f"no adapter named {name!r}; loaded: {self.adapters}") from None

    def add_adapter(self, name: str, config: AdapterConfig, **metadata: Any) -> Adapter:
        """A new adapter of the config's family; new LoRA and bottleneck adapters are the identity."""
        adapter = adapter_class_for(config.method)(name, config, self.arch)
        return self._insert(name, adapter, metadata)

    def _insert(self, name: str, adapter: Adapter, metadata: dict[str, Any], version: str | None = None) -> Adapter:
        _check_name(name)
        with self._lock:
            if name in self._slots:
                raise AdapterError(f"an adapter named {name!r} is already loaded; "
                                   "remove_adapter it first or choose another name")
            required = frozenset(adapter.requires())
            missing = sorted(required - set(self._slots))
            if missing:
                raise AdapterError(f"adapter {name!r} ({adapter.method}) runs over {sorted(required)}, and "
                                   f"{missing} {'is' if len(missing) == 1 else 'are'} not loaded; loaded: "
                                   f"{self.adapters}. Load them first")
            adapter.bind({n: self.get_adapter(n) for n in adapter.requires()},
                         {n: self._versions.get(n) for n in adapter.requires()})
            self._check_adapts_something(name, adapter)
            adapter.train(self.training)  # dropout follows the model: off after eval(), as a loaded model is
            self._make_room(keep=required)
            # An adapter is built on one (the default) device: one tensor tells. `.to()` walks every
            # submodule even when nothing moves: ~5 ms of a 7.6 MB hot-load.
            device = next(self.model.parameters()).device
            first = next(itertools.chain(adapter.parameters(), adapter.buffers()), None)
            if first is not None and first.device != device:
                adapter.to(device=device)
            adapter.attach()
            key = f"a{self._next_slot}"
            self._next_slot += 1
            self._adapters[key] = adapter
            self._slots[name] = key
            self._metadata[name] = {k: v for k, v in metadata.items() if v is not None}
            self._versions[name] = version
        return adapter

    def _check_adapts_something(self, name: str, adapter: Adapter) -> None:
        """Every family adds one site per backbone module it adapts: none means a config that selects nothing."""
        if len(adapter.sites) == 0:
            roles = sorted({site.role for site in self.arch.linears})
            raise AdapterError(
                f"adapter {name!r} ({adapter.method}) adapts no module of this {self.arch.model_type} backbone: "
                f"its config {adapter.config.to_dict()} selects nothing (check its targets). "
                f"The backbone's projection roles: {roles}; target groups 'attention', 'qv', 'ffn', 'all-linear'"
            )

    def remove_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """Take an adapter out of the bank once no call in flight uses it.

        Calls already routed to it finish with it — never half adapted; new calls for it wait for the
        removal, then find it gone. With `timeout` (seconds), give up after that long with an
        AdapterError naming the calls in flight, and leave the adapter in place.
        """
        with self._released:
            if not self._released.wait_for(lambda: name not in self._removing, timeout):
                raise AdapterError(f"adapter {name!r} is being removed by another thread, which waits for "
                                   f"{self._in_flight(name)}; timed out after {timeout} s")
            self.get_adapter(name)
            users = [n for n in self._slots if name in self.get_adapter(n).requires()]
            if users:
                raise AdapterError(f"cannot remove adapter {name!r}: {users} run{'s' if len(users) == 1 else ''} "
                                   f"over it (a fusion's member); remove {users} first")
            own = [c for c in self._calls.values() if name in c.names and c.thread_id == threading.get_ident()]
            if own:
                raise AdapterError(f"cannot remove adapter {name!r} from inside a call that uses it (this thread "
                                   f"holds it): it would wait for itself. Remove it after the call or from "
                                   "another thread")
            self._removing.add(name)
            try:
                if not self._released.wait_for(lambda: not self._pins[name], timeout):
                    raise AdapterError(f"adapter {name!r} is in use by {self._in_flight(name)}; not removed after "
                                       f"waiting {timeout} s. Retry later, or remove_adapter without a timeout to "
                                       "wait until they finish")
                if self._merged == name:
                    self.unmerge_adapter()
                self.get_adapter(name).detach()
                del self._adapters[self._slots.pop(name)]
                self._metadata.pop(name, None)
                self._versions.pop(name, None)
            finally:
                self._removing.discard(name)
                self._released.notify_all()

    def _in_flight(self, name: str) -> str:
        calls = [c for c in self._calls.values() if name in c.names]
        now = time.monotonic()
        described = ", ".join(f"thread {c.thread_name!r} for {now - c.started:.1f} s" for c in calls)
        return f"{len(calls)} call{'s' if len(calls) != 1 else ''} in flight ({described})"

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """The trainable parameters of one adapter: what an optimizer should get."""
        return [p for p in self.get_adapter(name).parameters() if p.requires_grad]

    def adapter_metadata(self, name: str) -> dict[str, Any]:
        self.get_adapter(name)
        return dict(self._metadata.get(name, {}))

    def num_parameters(self, name: str | None = None) -> dict[str, Any]:
        """Trainable / saved parameter counts and their share of the backbone, and bytes on disk."""
        backbone = sum(p.numel() for p in self.model.parameters())
        if name is None:
            return {"backbone": backbone}
        adapter = self.get_adapter(name)
        saved = adapter.file_tensors()
        return {
            "trainable": adapter.num_trainable(),
            "saved": sum(t.numel() for t in saved.values()),
            "backbone": backbone,
            "percent_of_backbone": 100.0 * adapter.num_trainable() / backbone,
            "tensor_bytes": sum(t.numel() * t.element_size() for t in saved.values()),
        }

    # -- files ---------------------------------------------------------------------------------
    def save_adapter(self, name: str, path: str | Path | None = None, *, metrics: dict | None = None,
                     training: dict | None = None, **routing_keys: str) -> Path:
        """Write one adapter to one `.safetensors` file (atomically); returns the path."""
        unknown = set(routing_keys) - set(ROUTING_KEYS)
        if unknown:
            raise AdapterError(f"unknown metadata {sorted(unknown)}; routing keys are {list(ROUTING_KEYS)}")
        adapter = self.get_adapter(name)
        adapter.check_trained()
        path = Path(path) if path is not None else self._store().path_for(name)
        config = adapter.config_for_file()
        metadata = {**self._metadata.get(name, {}), **routing_keys}
        write_adapter_file(path, adapter.file_tensors(), {
            "method": adapter.method,
            "config": config.to_json(),
            "backbone": self.backbone_record(),
            "name": name,
            "metrics": metrics,
            "training": training,
            **adapter.file_metadata(),
            **metadata,
        })
        return path

    def backbone_record(self) -> dict[str, Any]:
        """What an adapter file says of its backbone: id, fingerprint (of the weights as loaded) and, on a
        quantised backbone, the quantisation. Loading compares the fingerprint only, so files move freely
        between the float and the quantised backbone; the record says which one trained them."""
        record = {"id": self.backbone_id, **self._backbone_fingerprint}
        if self.quantization is not None:
            record["quantization"] = dict(self.quantization)
        return record

    def load_adapter(self, path: str | Path, name: str | None = None, *, check_backbone: bool = True,
                     verify: bool = True) -> str:
        """Hot-load the adapter file at `path` onto this backbone; returns its name.

        `path` is a file path chosen by the caller, read wherever it points, store or not: never pass
        a name that came from outside (a request, an upload) here. Names go through `load_from_store`,
        which the routing uses and which can never leave the store.
        Everything is checked and built before the bank changes: a failed load leaves it as it was.
        The file is untrusted: its checksum must match (verify=False skips only that, for a file you
        trust that has none or a wrong one), and its config is tried on the meta device before any
        memory is allocated from it (safebuild.py).
        """
        name, adapter, info = self._build_from_file(path, name, check_backbone=check_backbone, verify=verify)
        # a merged adapter's provenance rides along, so saving it again keeps it
        self._insert(name, adapter, {k: info.get(k) for k in ROUTING_KEYS}
                     | {"metrics": info.get("metrics"), "merge": info.get("merge")}, version=info.get("sha256"))
        return name

    def check_adapter_file(self, path: str | Path, name: str | None = None, *, check_backbone: bool = True
                           ) -> dict[str, Any]:
        """Every check `load_adapter` makes (checksum, backbone fingerprint, each tensor built), without
        touching the bank; returns the file's header info. For uploads: refused files never reach a store."""
        adapter_name, _, info = self._build_from_file(path, name, check_backbone=check_backbone, verify=True,
                                                      allow_loaded_name=True)
        return {**info, "name": adapter_name}

    def adapter_version(self, name: str) -> str | None:
        """The checksum (`adaptkit.sha256`) of the file the adapter was loaded from; None when it was built here."""
        self.get_adapter(name)
        return self._versions.get(name)

    def _build_from_file(self, path: str | Path, name: str | None, *, check_backbone: bool, verify: bool,
                         allow_loaded_name: bool = False) -> tuple[str, Adapter, dict[str, Any]]:
        path = self._explicit_path(path)

        def build(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> tuple[str, Adapter, dict[str, Any]]:
            if check_backbone:
                try:
                    check_backbone_fn(info.get("backbone", {}), self._backbone_fingerprint, path.name)
                except AdapterError:
                    raise
                except (TypeError, ValueError, RuntimeError) as error:  # a damaged fingerprint in a verified file
                    raise AdapterError(f"{path.name}: its backbone fingerprint cannot be read ({error})") from None
            adapter_name = name or info.get("name") or path.stem
            if adapter_name in self._slots and not allow_loaded_name:
                raise AdapterError(f"an adapter named {adapter_name!r} is already loaded; pass name=... to load it "
                                   "under another")
            adapter = build_from_file(adapter_class_for(info["method"]), adapter_name, tensors, info, self.arch,
                                      backbone_elements=self._backbone_fingerprint["num_parameters"],
                                      source=path.name)
            return adapter_name, adapter, info

        # built while the file's checksum is computed beside it; returned only once it matched
        return build_from_adapter_file(path, build, verify=verify)

    def load_from_store(self, name: str, *, check_backbone: bool = True) -> str:
        """Load the store's adapter `name` under that name. The name is resolved by the store, which
        refuses anything that would leave it (`..`, absolute paths); it is never read as a file path."""
        _check_name(name)
        return self.load_adapter(self._store().path_for(name), name, check_backbone=check_backbone)

    def _explicit_path(self, path: str | Path) -> Path:
        """Always a file path; a store name given by mistake gets a pointer to `load_from_store`."""
        if not Path(path).is_file() and self.store is not None and str(path) in self.store:
            raise AdapterError(f"load_adapter takes a file path, and there is no file at {str(path)!r}; to load the "
                               f"store's adapter of that name use load_from_store({str(path)!r}), or just route to it")
        return Path(path)

    def _store(self) -> AdapterStore:
        if self.store is None:
            raise AdapterError("this model has no adapter store: pass a file path, or load the model with store=DIR")
        return self.store

    def _make_room(self, keep: frozenset[str] = frozenset()) -> None:
        """Evict the least recently used adapters that the store can bring back, beyond max_resident; never
        one that `keep` names or a loaded adapter requires (a fusion's members)."""
        if self.max_resident is None:
            return
        keep = keep.union(*(self.get_adapter(n).requires() for n in self._slots))
        evictable = [n for n in self._slots if self.store is not None and n in self.store and n not in keep
                     and n != self._merged and not self._pins[n] and n not in self._removing]
        while len(self._slots) >= self.max_resident and evictable:
            self.remove_adapter(evictable.pop(0))

    def _ensure_resident(self, names: frozenset[str]) -> None:
        """Every name loaded (from the store, by name only) and most recently used, or an AdapterError."""
        with self._released:
            if not self._removing and all(name in self._slots for name in names):
                for name in names:  # the common case, on every call: resident, nothing being removed
                    self._slots.move_to_end(name)
                return
            # A name being removed: a new call waits for the removal and then finds it gone. A call of
            # this thread already holding the name (a nested call) goes on: the removal waits for it.
            held = self._held_by_this_thread()
            self._released.wait_for(lambda: not ((names & self._removing) - held))
            with self._pinned(names):  # loading one of a call's adapters must not evict another
                for name in names:
                    if name in self._slots:
                        self._slots.move_to_end(name)
                    elif self.load_on_use and self.store is not None and name in self.store:
                        self.load_from_store(name)
                    else:
                        raise AdapterError(f"no adapter named {name!r}; loaded: {self.adapters}"
                                           + (f"; in the store: {self.store.names()}" if self.store else ""))

    def pin(self, names: Iterable[str]) -> int:
        """Keep resident adapters in the bank until `unpin(token)`: out of LRU eviction, and `remove_adapter`
        waits for them. For an owner whose rows use adapters across many calls (a continuous batch)."""
        names = frozenset(names)
        with self._lock:
            missing = sorted(names - set(self._slots))
            if missing:
                raise AdapterError(f"cannot pin {missing}: not loaded; loaded: {self.adapters}")
            return self._pin(self._with_required(names))

    def _with_required(self, names: frozenset[str]) -> frozenset[str]:
        """`names` and the adapters they run over (a fusion's members), pinned together."""
        required = [self.get_adapter(n).requires() for n in names if n in self._slots]
        return names.union(*required) if any(required) else names

    def unpin(self, token: int) -> None:
        with self._lock:
            call = self._calls.get(token)
            if call is None:
                raise AdapterError(f"no pin {token} is held")
            self._unpin(token, call.names)

    def _held_by_this_thread(self) -> frozenset[str]:
        me = threading.get_ident()
        return frozenset().union(*(c.names for c in self._calls.values() if c.thread_id == me))

    @contextlib.contextmanager
    def _pinned(self, names: frozenset[str]) -> Iterator[None]:
        """Keep `names` resident while the block runs: out of LRU eviction, and removal waits for it."""
        call = self._pin(names)
        try:
            yield
        finally:
            self._unpin(call, names)

    def _pin(self, names: frozenset[str]) -> int:
        thread = threading.current_thread()
        with self._lock:
            call = next(self._call_ids)
            self._calls[call] = _Call(names, thread.ident, thread.name, time.monotonic())
            pins = self._pins
            for name in names:
                pins[name] += 1
        return call

    def _unpin(self, call: int, names: frozenset[str]) -> None:
        with self._released:
            del self._calls[call]
            pins = self._pins
            for name in names:
                pins[name] -= 1
                if pins[name] <= 0:
                    del pins[name]
            if self._removing:  # only a removal waits for pins to drop; the common call wakes no one
                self._released.notify_all()

    # -- running -------------------------------------------------------------------------------
    def routing_for(self, adapter: AdapterSpec | list[AdapterSpec]) -> Routing:
        """Validate an adapter spec against the bank and turn it into a routing."""
        routing = Routing.from_spec(adapter)
        self._ensure_resident(routing.names)
        if self._merged is not None:
            if routing.is_bare:
                routing = Routing.from_spec(self._merged)
            elif routing.uniform != (self._merged,):
                raise AdapterError(f"adapter {self._merged!r} is merged into the backbone, so every call uses it; "
                                   "call unmerge_adapter() before routing to other adapters")
        return routing

    @contextlib.contextmanager
    def using(self, adapter: AdapterSpec | list[AdapterSpec]) -> Iterator[Routing]:
        """Every call inside the block uses `adapter`; safe across threads and asyncio tasks.

        The block's adapters stay resident until it ends, even when other threads load past `max_resident`.
        """
        with self._lock:  # resident and pinned in one step: no eviction can slip in between
            routing = self.routing_for(adapter)
            pinned = self._with_required(routing.names)
            call = self._pin(pinned)
        try:
            with routing_scope(routing):
                yield routing
        finally:
            self._unpin(call, pinned)

    def _scope(self, adapter: Any) -> contextlib.AbstractContextManager:
        if adapter is _UNSET:
            if current_routing() is not None:
                return contextlib.nullcontext()
            adapter = None
        return self.using(adapter)

    def forward(self, *args: Any, adapter: Any = _UNSET, **kwargs: Any) -> Any:
        """The backbone's forward with `adapter`: a name, a stack tuple, None, or one entry per row."""
        with self._scope(adapter):
            _check_rows(args, kwargs)
            output = self.model(*args, **kwargs)
            if self.model.training and getattr(output, "loss", None) is not None:
                output.loss = self._add_regularization(output.loss)
            return output

    def _add_regularization(self, loss: torch.Tensor) -> torch.Tensor:
        """Add each routed adapter's training regularizer (AdaLoRA's orthogonality) to the loss."""
        routing = current_routing()
        names = sorted(routing.names) if routing is not None else []
        return add_regularizers(loss, (self.get_adapter(name) for name in names))

    def enable_activation_checkpointing(self) -> None:
        """Keep only each transformer layer's input for the backward pass and recompute the rest there:
        training memory for activations drops to about one layer's, for about one more forward of compute.
        The recomputation runs under the routing of the call it repeats (`recompute_under_this_routing`),
        so adapters train exactly as without it, also where the backward runs in another thread."""
        self.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": recompute_under_this_routing})

    def disable_activation_checkpointing(self) -> None:
        self.model.activation_checkpointing_disable()

    @torch.no_grad()
    def generate(self, *args: Any, adapter: Any = _UNSET, **kwargs: Any) -> torch.Tensor:
        """`model.generate` with per-call or per-row adapters; greedy, beam search and sampling."""
        with self._scope(adapter):
            _check_rows(args, kwargs)
            return self.model.generate(*args, **kwargs)

    # -- merging (LoRA family) -------------------------------------------------------------------
    def merge_adapter(self, name: str, *, timeout: float | None = None) -> None:
        """Fold an adapter into the backbone weights: no per-call overhead until unmerged.

        Merging rewrites weights that every call reads, so it waits until no call is in flight (any
        call: bare ones read the same weights); calls that start after it see the merged backbone.
        With `timeout` (seconds), give up after that long with an AdapterError naming the calls in
        flight and leave the backbone as it was, as `remove_adapter` does.
        """
        with self._lock:
            self._check_mergeable(name)
            self._wait_for_no_calls(f"merge {name!r}", timeout)
            self._check_mergeable(name)  # the lock was let go while waiting: another thread may have merged
            self.get_adapter(name).merge()
            self._merged = name

    def _check_mergeable(self, name: str) -> None:
        if self._merged is not None:
            raise AdapterError(f"{self._merged!r} is already merged; unmerge_adapter() first")
        if self.quantization is not None:
            raise AdapterError(
                f"cannot merge {name!r}: this backbone's Linear weights are quantised "
                f"({self.quantization['scheme']}, {self.quantization['library']}), and adding the update would "
                "mean dequantise, add, requantise, moving every weight by up to a rounding step, so unmerge "
                "could not restore them. Keep the adapter unmerged (it runs in full precision beside the "
                "quantised weights), or load the backbone without quantize= to merge")
        self.get_adapter(name)

    def unmerge_adapter(self, *, timeout: float | None = None) -> None:
        """Restore the backbone weights exactly as loaded, once no call is in flight (`timeout` as in
        `merge_adapter`)."""
        with self._lock:
            if self._merged is not None:
                self._wait_for_no_calls(f"unmerge {self._merged!r}", timeout)
            if self._merged is not None:
                self.get_adapter(self._merged).unmerge()
                self._merged = None

    def _wait_for_no_calls(self, what: str, timeout: float | None) -> None:
        """Return, holding the lock, once no call is in flight; AdapterError after `timeout` seconds."""
        me = threading.get_ident()
        if any(c.thread_id == me for c in self._calls.values()):
            raise AdapterError(f"cannot {what} from inside a call (this thread is in one): it would wait for "
                               "itself. Do it after the call, or from another thread")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._calls:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                now = time.monotonic()
                calls = ", ".join(f"thread {c.thread_name!r} for {now - c.started:.1f} s" for c in self._calls.values())
                raise AdapterError(f"cannot {what}: the backbone is in use by {len(self._calls)} call"
                                   f"{'s' if len(self._calls) != 1 else ''} in flight ({calls}); nothing changed "
                                   f"after waiting {timeout} s. Retry later, or call without a timeout to wait "
                                   "until they finish")
            # `_unpin` wakes waiters only while a removal is pending: poll as well as wait.
            self._released.wait(0.01 if left is None else min(0.01, left))

    @property
    def merged_adapter(self) -> str | None:
        return self._merged


def _check_rows(args: tuple, kwargs: dict[str, Any]) -> None:
    """A per-row adapter list has one entry per input row: checked here, before `generate` expands rows."""
    routing = current_routing()
    if routing is None or routing.rows is None:
        return
    batch = _input_batch_size(args, kwargs)
    if batch is not None:
        routing.check_input_batch(batch)


def _input_batch_size(args: tuple, kwargs: dict[str, Any]) -> int | None:
    """Rows of the call's input: ids, embeddings or precomputed encoder outputs, whichever is given."""
    for value in (args[0] if args else None, kwargs.get("input_ids"), kwargs.get("inputs_embeds"),
                  kwargs.get("encoder_outputs"), kwargs.get("decoder_input_ids")):
        if value is not None and not isinstance(value, torch.Tensor):
            value = value[0] if isinstance(value, (tuple, list)) or hasattr(value, "last_hidden_state") else None
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return value.shape[0]
    return None


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or any(ord(c) < 32 for c in name):
        raise AdapterError(f"adapter names are non-empty printable strings; got {name!r}")


def load(name_or_path: str | Path, **kwargs: Any) -> AdaptedModel:
    """Load a backbone (zoo name, local directory or Hub id), frozen, ready for adapters.

    >>> ak.load("gemma3-270m", quantize="int8")   # Linear weights in int8 (torchao), adapters float32
    >>> ak.load("gemma3-270m", quantize="int8-dynamic")   # int8 weights and activations: serving on CPU
    """
    return AdaptedModel.from_pretrained(name_or_path, **kwargs)

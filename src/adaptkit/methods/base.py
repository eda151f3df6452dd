"""The one protocol every adapter family implements, and the registry that maps names to families.

The bank only ever calls what `Adapter` declares; it never asks which family it holds. A new
family is one new file: a config dataclass and an `Adapter` subclass, joined by `@register_method`.

Adapters reach into the backbone through forward hooks (or the attention interface), never by
replacing its modules: the backbone's own `state_dict()` stays exactly what was loaded.
"""

from __future__ import annotations

import dataclasses
import json
import typing
import weakref
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn

from adaptkit.core.arch import Arch
from adaptkit.core.errors import AdapterError
from adaptkit.core.jsontypes import Mismatch, conform, describe
from adaptkit.core.routing import Routing, current_routing
from adaptkit.methods.heads import head_from_spec

HEAD_PREFIX = "head."  # file (and state_dict) names of an adapter's task head, whatever the family


@dataclasses.dataclass
class AdapterConfig:
    """Base of every family's config. Fields are plain JSON types so they travel in the file header."""

    method: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdapterConfig:
        """The config that `data` (decoded JSON, e.g. a file header's) describes; AdapterError if it cannot be.

        Every value must have its field's annotated type (bool, int, float, str, None, tuples, dicts):
        a list becomes a tuple and an int a float where the field says so, nothing else is converted.
        The data may come from an untrusted file: a string `scaling` once loaded and failed every forward.
        """
        if not isinstance(data, dict):
            raise AdapterError(f"a {cls.__name__} config must be a JSON object, not {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise AdapterError(
                f"{cls.__name__} has no field(s) {sorted(unknown)}; the file may come from a newer adaptkit — upgrade"
            )
        hints = typing.get_type_hints(cls)
        values = {}
        for key, value in data.items():
            try:
                values[key] = conform(value, hints[key])
            except Mismatch:
                raise AdapterError(f"{cls.__name__}.{key} must be {describe(hints[key])}, "
                                   f"got {type(value).__name__} {value!r:.80}") from None
        try:
            return cls(**values)
        except AdapterError:
            raise
        except (TypeError, ValueError, ArithmeticError) as error:  # a family's own check, in its own words
            raise AdapterError(f"{cls.__name__} config {values!r:.200} is invalid: {error}") from None


class Adapter(nn.Module):
    """One named adapter over one backbone.

    Lifecycle: `__init__` builds the parameters (nothing touches the backbone yet), `attach()`
    hooks them in, `detach()` takes them out. Tensors go to and from the adapter file through
    `adapter_state_dict()` / `load_adapter_state_dict()` under stable, method-relative names.
    """

    method: ClassVar[str] = ""
    config_class: ClassVar[type[AdapterConfig]] = AdapterConfig
    # What the family can do, read from the class by whoever needs to know (bank, benchmark, peft interop):
    mergeable: ClassVar[bool] = False  # merge() / unmerge() fold the adapter into the backbone's weights
    peft_types: ClassVar[tuple[str, ...]] = ()  # peft's `peft_type`s that from_peft() reads
    # LoRA+ (trainer's loraplus_lr_ratio): leaf names of the parameters peft's create_loraplus_optimizer puts
    # at lr × ratio (its "B" group); empty: the family has no B factor and LoRA+ is refused
    loraplus_b: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, name: str, config: AdapterConfig, arch: Arch):
        super().__init__()
        self.name = name
        self.config = config
        self.arch = arch
        # Per-site parameter holders keyed by the backbone module path ("." spelled ":" because
        # ModuleDict keys cannot hold dots); file names spell it with dots again.
        self.sites = nn.ModuleDict()
        self.head: nn.Module | None = None  # an optional task head (methods/heads.py); see set_head

    def add_site(self, module_path: str, holder: nn.Module) -> nn.Module:
        self.sites[module_path.replace(".", ":")] = holder
        return holder

    def site_items(self) -> Iterator[tuple[str, nn.Module]]:
        for key, holder in self.sites.items():
            yield key.replace(":", "."), holder

    # -- required ------------------------------------------------------------------------------
    def attach(self) -> None:
        raise NotImplementedError

    def detach(self) -> None:
        raise NotImplementedError

    # -- file I/O: defaults cover families whose parameters are exactly what is saved -----------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {_file_key(k): v.detach().contiguous() for k, v in self._family_state().items()}

    def _family_state(self) -> dict[str, torch.Tensor]:
        """`state_dict()` without the task head, which `file_tensors()` adds for every family alike."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(HEAD_PREFIX)}

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Strict: every tensor present, none extra, shapes equal — or nothing is changed."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(tensors))
        extra = sorted(set(tensors) - set(own))
        wrong = sorted(k for k in set(own) & set(tensors) if own[k].shape != tensors[k].shape)
        if missing or extra or wrong:
            details = []
            if missing:
                details.append(f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}")
            if extra:
                details.append(f"unexpected {extra[:3]}{'…' if len(extra) > 3 else ''}")
            if wrong:
                k = wrong[0]
                details.append(f"shape of {k}: file {tuple(tensors[k].shape)} vs adapter {tuple(own[k].shape)}")
            raise AdapterError(
                f"adapter {self.name!r} ({self.method}) does not fit its tensors: {'; '.join(details)}. "
                "Was it saved with another config or for another backbone?"
            )
        self._load_checked(tensors)

    def _load_checked(self, tensors: dict[str, torch.Tensor]) -> None:
        # Copied directly: nn.Module.load_state_dict filters the whole dict once per submodule, quadratic
        # in the tensors (~10 ms of an all-linear LoRA's hot-load on gemma3, 1,260 tensors); no family
        # registers load hooks. The head loads apart (load_file).
        targets = {_file_key(k): v for k, v in self.state_dict(keep_vars=True).items() if not k.startswith(HEAD_PREFIX)}
        missing, unexpected = sorted(set(targets) - set(tensors)), sorted(set(tensors) - set(targets))
        wrong = [k for k in set(tensors) & set(targets) if tensors[k].shape != targets[k].shape]
        if missing or unexpected or wrong:
            raise AdapterError(f"adapter {self.name!r} ({self.method}) could not load {missing or unexpected or wrong}")
        with torch.no_grad():
            for key, tensor in tensors.items():
                targets[key].copy_(tensor)

    def config_for_file(self) -> AdapterConfig:
        """The config written next to the tensors (AdaLoRA, prefix MLP may change it on save)."""
        return self.config

    # -- the whole file: the family's tensors plus an optional task head --------------------------
    def set_head(self, head: nn.Module | None) -> None:
        """Carry a task head (e.g. `ClassificationHead`): it trains, saves and loads with this adapter."""
        if head is not None:
            reference = next(self.sites.parameters(), None)
            if reference is not None:
                head.to(reference.device)
        self.head = head

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter file: the family's, then the head's under `head.*`."""
        tensors = self.adapter_state_dict()
        if self.head is not None:
            tensors.update({HEAD_PREFIX + k: v.detach().contiguous() for k, v in self.head.state_dict().items()})
        return tensors

    def file_metadata(self) -> dict[str, Any]:
        """Header entries beyond the family config: the head's description (`adaptkit.head`)."""
        return {"head": self.head.spec()} if self.head is not None else {}

    def load_file(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        """Load what `file_tensors()` / `file_metadata()` wrote, head rebuilt from its description; all or nothing."""
        spec = metadata.get("head")
        spec = json.loads(spec) if isinstance(spec, str) else spec
        head_tensors = {k[len(HEAD_PREFIX):]: v for k, v in tensors.items() if k.startswith(HEAD_PREFIX)}
        if spec is None and head_tensors:
            raise AdapterError(f"adapter {self.name!r}: the file holds head tensors but no adaptkit.head "
                               "description to rebuild the head from; it is damaged")
        head = None
        if spec is not None:
            same = self.head is not None and getattr(self.head, "spec", lambda: None)() == spec
            head = self.head if same else head_from_spec(spec)
            own = head.state_dict()
            if set(own) != set(head_tensors) or any(own[k].shape != head_tensors[k].shape for k in own):
                raise AdapterError(f"adapter {self.name!r}: the head tensors in the file "
                                   f"({sorted(head_tensors)}) do not fit its described head ({sorted(own)})")
        self.load_adapter_state_dict({k: v for k, v in tensors.items() if not k.startswith(HEAD_PREFIX)})
        if head is not None:
            with torch.no_grad():
                head.load_state_dict(head_tensors)
            self.set_head(head)

    # -- optional capabilities ------------------------------------------------------------------
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def num_saved(self) -> int:
        return sum(t.numel() for t in self.file_tensors().values())

    def merge(self) -> None:
        raise AdapterError(f"{self.method} adapters cannot be merged into the backbone; only the LoRA family can")

    def unmerge(self) -> None:
        raise AdapterError(f"{self.method} adapters cannot be merged into the backbone; only the LoRA family can")

    def on_train_begin(self, total_steps: int) -> None:
        """Called by training loops once, before the first step, with the number of optimizer steps the
        run will take; `on_step_end` then gets steps 0 … total_steps − 1 (AdaLoRA fits its schedule to it)."""

    def on_step_end(self, step: int) -> None:
        """Called by training loops after each optimizer step (AdaLoRA's budget schedule)."""

    # -- peft directories (interop/peft.py does the directory I/O and finds the family by peft_type) --
    def to_peft(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """This adapter as peft saves it: (adapter_config fields, `peft_type` included; tensors named
        `<module path>.<peft's tensor name>`)."""
        raise AdapterError(f"{self.method} adapters have no peft form to export to")

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], tensors: dict[str, torch.Tensor], arch: Arch
                  ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
        """A peft adapter of one of `peft_types` (its adapter_config.json; tensors named as in its file,
        less peft's `base_model.model.`) → (this family's config, its tensors under `adapter_state_dict()` names)."""
        raise AdapterError(f"{cls.method} adapters cannot be imported from peft")

    def check_trained(self) -> None:
        """Raise if training left the adapter in a state it must not be saved in."""

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """State beyond the parameters that a resumed run needs (tensors, JSON); checkpoints save it."""
        return {}, {}

    def load_training_state(self, tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        """Restore what `training_state()` returned."""

    def requires(self) -> tuple[str, ...]:
        """Other adapters of the bank this one runs over (a fusion's members): the bank binds them before
        `attach()`, keeps them resident and pinned with it, and refuses to remove them while it is loaded."""
        return ()

    def bind(self, members: dict[str, Adapter], versions: dict[str, str | None]) -> None:
        """Receive the adapters `requires()` names (and their files' checksums, None when built in the bank);
        called by the bank before `attach()`. Raise AdapterError if they do not fit."""

    def regularization_loss(self) -> torch.Tensor | None:
        """A term the bank adds to the training loss when this adapter is routed (AdaLoRA's orthogonality)."""
        return None


def _file_key(state_key: str) -> str:
    return state_key.removeprefix("sites.").replace(":", ".")


# -- one forward hook per (module, family), shared by that family's adapters on the module ------

HookFn = Callable[["HookSite", nn.Module, tuple, Any, Routing], Any]
# Module → its sites. A value must never hold its key strongly (a site keeps only a weak reference to its
# module), or the entry keeps the module, and through its parents the whole backbone, alive for ever.
_SITES: weakref.WeakKeyDictionary[nn.Module, dict[str, HookSite]] = weakref.WeakKeyDictionary()


class HookSite:
    """A forward hook on one backbone module that runs the adapters routed to the current call.

    Several adapters of a family may sit on the same module; one hook serves them all, so the
    cost of a call with no adapter is one context-variable read per hooked module.
    """

    def __init__(self, module: nn.Module, apply: HookFn, pre: bool = False):
        self._module = weakref.ref(module)
        self.apply = apply
        self.members: dict[str, nn.Module] = {}
        if pre:
            self.handle = module.register_forward_pre_hook(self._pre_hook)
        else:
            self.handle = module.register_forward_hook(self._hook)

    @classmethod
    def join(cls, module: nn.Module, key: str, apply: HookFn, adapter_name: str, member: nn.Module,
             pre: bool = False) -> HookSite:
        sites = _SITES.setdefault(module, {})
        site = sites.get(key)
        if site is None:
            site = sites[key] = cls(module, apply, pre)
        site.members[adapter_name] = member
        return site

    @property
    def module(self) -> nn.Module | None:
        """The hooked module; None once it was freed (the model was dropped with its adapters attached)."""
        return self._module()

    def leave(self, adapter_name: str) -> None:
        self.members.pop(adapter_name, None)
        if not self.members:
            self.handle.remove()
            sites = _SITES.get(self.module, {}) if self.module is not None else {}
            for key, site in list(sites.items()):
                if site is self:
                    del sites[key]

    def _active(self) -> Routing | None:
        routing = current_routing()
        if routing is None or not self.members:
            return None
        names = routing.names
        if not names or names.isdisjoint(self.members):
            return None
        return routing

    def _hook(self, module: nn.Module, args: tuple, output: Any) -> Any:
        routing = self._active()
        if routing is None:
            return None
        return self.apply(self, module, args, output, routing)

    def _pre_hook(self, module: nn.Module, args: tuple) -> Any:
        routing = self._active()
        if routing is None:
            return None
        return self.apply(self, module, args, None, routing)

    def routed(self, routing: Routing, batch_size: int,
               device: torch.device) -> Iterator[tuple[nn.Module, torch.Tensor | None]]:
        """(member, rows) for each adapter of this site that the call routes, in stack order."""
        for group in routing.groups(batch_size, device):
            member = self.members.get(group.name)
            if member is not None:
                yield member, group.rows


def add_rows(base: torch.Tensor, delta_fn: Callable[[torch.Tensor | None], torch.Tensor],
             rows: torch.Tensor | None) -> torch.Tensor:
    """base + delta on the given rows only (all rows when None), without touching other rows."""
    if rows is None:
        return base + delta_fn(None)
    return base.index_add(0, rows, delta_fn(rows).to(base.dtype))


MODULE_INPUT = "<module input>"  # a block that reads the hooked module's own input


def block_input(input_key: str | None, output: torch.Tensor, args: tuple, routing: Routing, used: set[str]
                ) -> torch.Tensor:
    """What a block at an output hook reads: the running output (None), the hooked module's input (MODULE_INPUT),
    or an input a pre-hook kept in the call's scratch (its key, noted in `used` so `release_inputs` frees it)."""
    if input_key is None:
        return output
    if input_key == MODULE_INPUT:
        return args[0]
    used.add(input_key)
    return routing.scratch[input_key]


def release_inputs(routing: Routing, used: set[str]) -> None:
    """Free the kept inputs now rather than at the end of a long generate."""
    for key in used:
        routing.scratch.pop(key, None)


def select_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)

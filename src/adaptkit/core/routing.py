"""Which adapter applies to which row of the batch, for the call now running.

The routing of a call lives in a `contextvars.ContextVar`, never on the model: two threads or
two asyncio tasks calling the same model with different adapters each see their own routing.
Injected modules read it with `current_routing()`; the bank sets it with `routing_scope()`.

A routing is one stack of adapter names per input row: `()` is the bare backbone, `("lora",)`
one adapter, `("en-de", "it")` two stacked adapters applied in that order.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from adaptkit.core.errors import AdapterError

AdapterSpec = str | tuple[str, ...] | None
"""One row's adapters: a name, a stack of names, or None for the bare backbone."""

_CURRENT: contextvars.ContextVar[Routing | None] = contextvars.ContextVar("adaptkit_routing", default=None)


def _as_stack(spec: AdapterSpec) -> tuple[str, ...]:
    if spec is None:
        return ()
    if isinstance(spec, str):
        return (spec,)
    if isinstance(spec, tuple) and all(isinstance(s, str) for s in spec):
        return tuple(spec)
    raise TypeError(f"an adapter spec is a name, a tuple of names or None; got {spec!r}")


@dataclass(frozen=True)
class RowGroup:
    """The rows of the runtime batch that one adapter applies to, at one depth of the stack."""

    name: str
    rows: torch.Tensor | None  # None: every row of the batch
    depth: int


@dataclass
class Routing:
    """Per-row adapter stacks for one call. `uniform` is set when every row has the same stack."""

    rows: tuple[tuple[str, ...], ...] | None
    uniform: tuple[str, ...] | None
    _groups_cache: dict = field(default_factory=dict, repr=False)
    scratch: dict = field(default_factory=dict, repr=False)  # per-call state shared by hooks of one forward

    @classmethod
    def from_spec(cls, spec: AdapterSpec | list[AdapterSpec]) -> Routing:
        """`"a"`, a stack `("a", "b")` or None route every row alike; a list routes row by row."""
        if not isinstance(spec, list):
            return cls(rows=None, uniform=_as_stack(spec))
        if not spec:
            raise AdapterError("the per-row adapter list is empty; give one entry per input row")
        stacks = tuple(_as_stack(s) for s in spec)
        if len(set(stacks)) == 1:
            return cls(rows=stacks, uniform=stacks[0])
        return cls(rows=stacks, uniform=None)

    def __post_init__(self) -> None:
        # Read by every hooked module on every forward: computed once per call, not per hook.
        stacks = [self.uniform] if self.uniform is not None else self.rows or ()
        self.names: frozenset[str] = frozenset(name for stack in stacks for name in stack)

    @property
    def is_bare(self) -> bool:
        return not self.names

    def check_input_batch(self, batch_size: int) -> None:
        """A per-row list names one stack per *input* row. Only `generate` repeats rows (beams,
        `num_return_sequences`), after this check: a caller's shorter list is never stretched to fit."""
        if self.rows is not None and len(self.rows) != batch_size:
            raise AdapterError(
                f"the adapter list has {len(self.rows)} entries but the input batch has {batch_size} rows; "
                "give one adapter entry per input row"
            )

    def row_stacks(self, batch_size: int) -> list[tuple[str, ...]]:
        """The stack of every runtime row (rows expanded for beams / num_return_sequences)."""
        if self.uniform is not None:
            return [self.uniform] * batch_size
        factor = self._factor(batch_size)
        return [self.rows[i // factor] for i in range(batch_size)]

    def groups(self, batch_size: int, device: torch.device) -> list[RowGroup]:
        """Adapter → rows, ordered by stack depth so stacked adapters apply in the order given.

        `generate` repeats each input row `factor` times in a block (beams, num_return_sequences),
        and beam reordering stays inside each block, so runtime row i belongs to input row i // factor.
        """
        key = (batch_size, device)
        cached = self._groups_cache.get(key)
        if cached is not None:
            return cached
        if self.uniform is not None:
            groups = [RowGroup(name, None, depth) for depth, name in enumerate(self.uniform)]
        else:
            per_name: dict[tuple[int, str], list[int]] = {}
            for row, stack in enumerate(self.row_stacks(batch_size)):
                for depth, name in enumerate(stack):
                    per_name.setdefault((depth, name), []).append(row)
            groups = [
                RowGroup(name, None if len(rows) == batch_size else torch.tensor(rows, device=device), depth)
                for (depth, name), rows in sorted(per_name.items(), key=lambda item: item[0][0])
            ]
        self._groups_cache[key] = groups
        return groups

    def _factor(self, batch_size: int) -> int:
        assert self.rows is not None
        n = len(self.rows)
        if batch_size % n:
            raise AdapterError(
                f"the adapter list has {n} entries but the batch has {batch_size} rows; "
                "give one adapter entry per input row"
            )
        return batch_size // n


def current_routing() -> Routing | None:
    """The routing of the call running in this thread / task, or None outside any call."""
    return _CURRENT.get()


@contextlib.contextmanager
def routing_scope(routing: Routing | None) -> Iterator[Routing | None]:
    token = _CURRENT.set(routing)
    try:
        yield routing
    finally:
        _CURRENT.reset(token)


def recompute_under_this_routing() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    """`context_fn` for torch.utils.checkpoint: called as a checkpointed layer runs forward, it returns the
    contexts of that forward (nothing to add) and of its recomputation in the backward pass (the routing
    of this call). The backward may run the recomputation outside the call's scope or in another thread
    (autograd's device threads on GPU), where the context variable would say "no adapter"."""
    return contextlib.nullcontext(), routing_scope(current_routing())

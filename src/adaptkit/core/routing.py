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
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

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


# -- per-row values and routing keys: the rules every task and the service share ----------------------

def per_row(value: Any, n: int, what: str, *, stacks: bool = False) -> list:
    """One value per row: a list (or tuple) gives them row by row, anything else applies to every row.

    With `stacks` (an adapter field) a tuple is one adapter stack, applied to every row: only a list
    is per row there. A per-row list of the wrong length is an AdapterError naming the field.
    """
    if isinstance(value, list) or (isinstance(value, tuple) and not stacks):
        if len(value) != n:
            raise AdapterError(f"'{what}' has {len(value)} entries for {n} texts; give one per text or a single value")
        return list(value)
    return [value] * n


def match_adapter(candidates: Iterable[tuple[str, Mapping[str, Any]]], src_lang: str, tgt_lang: str,
                  domain: str | None = None) -> str | None:
    """The adapter whose routing keys fit (src, tgt, domain), or None: same pair and same domain, else a
    pair-only adapter (no domain), which serves any domain. Among equals the first name in sorted order, so
    the answer never depends on the order the candidates come in (load order, LRU order, a directory's)."""
    best: tuple[int, str] | None = None
    for name, meta in candidates:
        if meta.get("src_lang") != src_lang or meta.get("tgt_lang") != tgt_lang:
            continue
        if meta.get("domain") not in (None, domain):
            continue
        rank = (0 if domain is not None and meta.get("domain") == domain else 1, name)
        if best is None or rank < best:
            best = rank
    return None if best is None else best[1]


def route_by_keys(candidates: Iterable[tuple[str, Mapping[str, Any]]], src_lang: str, tgt_lang: str,
                  domain: str | None, *, fix: str, where: str = "") -> str:
    """`match_adapter`, or an AdapterError naming the pair, what the candidates serve and `fix`. A row is
    never sent to the bare backbone for want of an adapter: that is asked for by name (adapter=None)."""
    candidates = list(candidates)
    name = match_adapter(candidates, src_lang, tgt_lang, domain)
    if name is not None:
        return name
    unkeyed = sorted(n for n, meta in candidates if not (meta.get("src_lang") and meta.get("tgt_lang")))
    raise AdapterError(f"{where}no adapter translates {src_lang}→{tgt_lang}"
                       + (f" (domain {domain!r})" if domain is not None else "")
                       + f"; adapters serve: {served_pairs(candidates)}"
                       + (f"; without routing keys (src_lang / tgt_lang in the file): {unkeyed}" if unkeyed else "")
                       + f". {fix}")


def served_pairs(candidates: Iterable[tuple[str, Mapping[str, Any]]]) -> str:
    """`en→de, en→de (legal)`: what the candidates with routing keys translate, or `nothing`."""
    pairs = sorted({f"{meta['src_lang']}→{meta['tgt_lang']}" + (f" ({meta['domain']})" if meta.get("domain") else "")
                    for _, meta in candidates if meta.get("src_lang") and meta.get("tgt_lang")})
    return ", ".join(pairs) or "nothing"

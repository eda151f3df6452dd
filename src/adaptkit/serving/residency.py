"""Who is in the bank: the one owner of the service's bank membership.

A row uses its adapter from admission (it joins a batch) to its last token. While an adapter has
running rows it is pinned in the bank and nothing removes it, so a row admitted under one version of
an adapter's file finishes under that version. Every change of the bank — a load, an eviction, a
replace or a delete — is made by the loader thread (`loader.py`) through the same three steps:

    block(name, why)   rows of `name` stop being admitted (they wait in the queue)
    wait until idle    its running rows leave (each within max_new_tokens steps)
    change the bank    then unblock(name): waiting rows are admitted under what is there now

Only the loader inserts, and it makes room first, so the bank never holds more than `max_resident`
adapters. When every slot is held by running adapters, the least recently admitted one is drained
(blocked until its rows finish, then evicted): no load waits for ever under steady traffic.

Every method runs with the scheduler's lock held; none of them waits for the bank (removal waits for
pins, and pins are released under that lock).
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable

from adaptkit.core.adapterfile import AdapterStore
from adaptkit.core.bank import AdaptedModel
from adaptkit.serving.work import RequestRow

CHANGING, EVICTING, DRAINING = "changing", "evicting", "draining"


class Residency:
    def __init__(self, model: AdaptedModel, store: AdapterStore, lock: threading.Condition):
        self.model = model
        self.store = store
        self.lock = lock
        self.running: collections.Counter[str] = collections.Counter()  # admitted rows (and holds) per adapter
        self.blocked: dict[str, str] = {}  # adapter → why its rows are not admitted now
        self._pins: dict[str, int] = {}  # adapter → the bank pin held while it has running rows
        self._last_admitted: dict[str, float] = {}

    def resident(self) -> set[str]:
        """Adapters whose rows may be admitted now."""
        return {name for name in self.model.adapters if name not in self.blocked}

    def admissible(self, name: str | None, resident: set[str] | None = None) -> bool:
        return name is None or name in (self.resident() if resident is None else resident)

    # -- rows in and out -------------------------------------------------------------------------
    def acquire(self, names: Iterable[str | None]) -> list[str | None]:
        """Count rows (or holds) of these adapters as running; returns each one's file version."""
        versions: list[str | None] = []
        now = time.monotonic()
        for name in names:
            if name is None:
                versions.append(None)
                continue
            if not self.running[name]:
                self._pins[name] = self.model.pin([name])
            self.running[name] += 1
            self._last_admitted[name] = now
            versions.append(self.model.adapter_version(name))
        return versions

    def admit(self, rows: Iterable[RequestRow]) -> None:
        rows = list(rows)
        for row, version in zip(rows, self.acquire(row.adapter for row in rows)):
            row.version = version

    def release(self, names: Iterable[str | None]) -> None:
        for name in names:
            if name is None:
                continue
            self.running[name] -= 1
            if self.running[name] <= 0:
                del self.running[name]
                self.model.unpin(self._pins.pop(name))
                self.lock.notify_all()  # a change or a drain may be waiting for it

    # -- blocking --------------------------------------------------------------------------------
    def block(self, name: str, why: str) -> None:
        self.blocked[name] = why

    def unblock(self, name: str, why: str | None = None) -> None:
        if why is None or self.blocked.get(name) == why:
            self.blocked.pop(name, None)
            self.lock.notify_all()

    def idle(self, name: str) -> bool:
        return not self.running[name]

    # -- making room -------------------------------------------------------------------------------
    def full(self) -> bool:
        capacity = self.model.max_resident
        return capacity is not None and len(self.model.adapters) >= capacity

    def victim(self, wanted: set[str]) -> str | None:
        """An adapter to evict now: idle, from the store (so it can come back), not being changed, not a member
        a loaded fusion runs over; first those no waiting row wants, each group least recently used first."""
        members = set().union(*(self.model.get_adapter(n).requires() for n in self.model.adapters))  # of fusions
        idle = [name for name in self.model.adapters  # least recently used first
                if not self.running[name] and self.blocked.get(name) in (None, DRAINING) and name in self.store
                and name not in members]
        unwanted = [name for name in idle if name not in wanted]
        return (unwanted or idle or [None])[0]

    def start_drain(self) -> str | None:
        """Stop admitting rows of the running adapter least recently admitted, so it frees its slot; None
        when a drain is under way already or nothing can be drained."""
        for name in [n for n, why in self.blocked.items() if why == DRAINING]:
            if self.idle(name) and name not in self.store:  # its file went away meanwhile: it cannot be evicted
                self.unblock(name, DRAINING)
        if DRAINING in self.blocked.values():
            return None
        candidates = [name for name in self.running if name not in self.blocked and name in self.store]
        if not candidates:
            return None
        name = min(candidates, key=lambda n: self._last_admitted.get(n, 0.0))
        self.block(name, DRAINING)
        return name

    def end_drains(self) -> None:
        for name in [n for n, why in self.blocked.items() if why == DRAINING]:
            self.unblock(name, DRAINING)

    def forget(self, name: str) -> None:
        self._last_admitted.pop(name, None)

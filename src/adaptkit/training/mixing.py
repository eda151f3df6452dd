"""Training data a translation run can be given besides its pairs: the pairs reversed, and synthetic pairs
mixed in at an exact ratio (back-translation, `tasks/backtranslate.py`).

    reverse=True             src ↔ tgt and src_lang ↔ tgt_lang: a de→en adapter from an en→de corpus
    synthetic=DATA           extra (synthetic) pairs, drawn beside the real ones ...
    synthetic_ratio=0.5      ... as this share of every batch:
                             batch g holds ⌊(g+1)·r·B⌋ − ⌊g·r·B⌋ synthetic rows, so any n batches hold
                             ⌊n·r·B⌋ (exact for r·B whole, off by under one row overall otherwise)
    synthetic_tag="<BT> "    prefixed to synthetic sources only (tagged back-translation, Caswell et al.
                             2019): the model can tell noisy synthetic sources from real ones

Real and synthetic rows are two streams, each a chain of seeded permutations, consumed in order, so a
batch's rows are a function of (seed, batch number) alone: a resumed run sees the batches an
uninterrupted one would. An epoch is one pass over the real rows; the synthetic stream wraps around
as often as it must (a smaller synthetic set is repeated, a bigger one is only partly seen).
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import torch

SIDES = (("src", "tgt"), ("src_lang", "tgt_lang"))


def swap_sides(rows: Any) -> Any:
    """A pairs `Dataset` with its sides swapped: `src` ↔ `tgt`, `src_lang` ↔ `tgt_lang` where present."""
    renames = {}
    for a, b in SIDES:
        if a in rows.column_names and b in rows.column_names:
            renames.update({a: b, b: a})
        elif a in rows.column_names or b in rows.column_names:
            raise ValueError(f"cannot reverse rows that have only one of {a!r} and {b!r} "
                             f"(columns: {rows.column_names})")
    # Through temporary names: rename_columns refuses a mapping onto a column that still exists.
    temporary = {a: f"__swap_{a}" for a in renames}
    return rows.rename_columns(temporary).rename_columns({f"__swap_{a}": b for a, b in renames.items()})


def tag_sources(rows: Any, tag: str) -> Any:
    """Every row's source with `tag` in front (tagged back-translation)."""
    return rows.map(lambda row: {"src": tag + row["src"]})


def check_direction(rows: Any, src_lang: str | None, tgt_lang: str | None, what: str = "synthetic") -> None:
    """Refuse rows of another language pair than the adapter's: a de→en corpus fed to an en→de run is the
    usual slip with back-translation (the reverse adapter's own data instead of its output)."""
    for column, expected in (("src_lang", src_lang), ("tgt_lang", tgt_lang)):
        if expected is None or column not in rows.column_names:
            continue
        found = sorted({str(v) for v in rows[column] if v} - {expected})
        if found:
            raise ValueError(f"the {what} rows have {column} {found[0]!r} but this run trains "
                             f"{src_lang}→{tgt_lang}: give pairs in the adapter's direction (back-translated "
                             f"output, whose tgt is the monolingual text), or set src_lang / tgt_lang")


class MixedSampler(torch.utils.data.Sampler):
    """Indices into `real + synthetic` (synthetic rows numbered after the real ones), `ratio` of each batch
    synthetic (the module docstring gives the rule). `epoch` is set by the trainer, as on `EpochSampler`."""

    def __init__(self, real: int, synthetic: int, batch_size: int, ratio: float, seed: int):
        if real < 1 or synthetic < 1:
            raise ValueError(f"mixing needs real and synthetic rows; got {real} real, {synthetic} synthetic")
        self.ratio = Fraction(ratio).limit_denominator(10_000)
        if not 0 < self.ratio < 1:
            raise ValueError(f"synthetic_ratio is the synthetic share of a batch, between 0 and 1; got {ratio}")
        self.real, self.synthetic, self.batch_size, self.seed, self.epoch = real, synthetic, batch_size, seed, 0
        self.batches_per_epoch = 1
        while self._offsets(self.batches_per_epoch)[0] < real:  # batches until every real row came once
            self.batches_per_epoch += 1
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def synthetic_before(self, batch: int) -> int:
        """Synthetic rows in batches 0 … batch − 1."""
        return int(batch * self.batch_size * self.ratio)  # int() of a non-negative Fraction is its floor

    def _offsets(self, batch: int) -> tuple[int, int]:
        """(real, synthetic) rows drawn before batch number `batch`."""
        synthetic = self.synthetic_before(batch)
        return batch * self.batch_size - synthetic, synthetic

    def _stream(self, which: int, size: int, start: int, count: int) -> list[int]:
        out = []
        for position in range(start, start + count):
            lap, at = divmod(position, size)
            key = (which, lap)
            if key not in self._permutations:
                if len(self._permutations) > 8:  # laps are read in order: old ones are done with
                    self._permutations.clear()
                rng = np.random.default_rng([self.seed, which, lap])
                self._permutations[key] = rng.permutation(size)
            out.append(int(self._permutations[key][at]))
        return out

    def batch(self, number: int) -> list[int]:
        """The indices of batch `number` (counted from the start of the run): real rows, then synthetic."""
        real_at, synthetic_at = self._offsets(number)
        real_next, synthetic_next = self._offsets(number + 1)
        real = self._stream(0, self.real, real_at, real_next - real_at)
        synthetic = self._stream(1, self.synthetic, synthetic_at, synthetic_next - synthetic_at)
        return real + [self.real + i for i in synthetic]

    def __iter__(self) -> Iterator[int]:
        first = self.epoch * self.batches_per_epoch
        for number in range(first, first + self.batches_per_epoch):
            yield from self.batch(number)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

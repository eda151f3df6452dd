"""Scoring with sacrebleu: corpus BLEU / chrF / TER, and which way each metric is better.

sacrebleu is called directly: `evaluate.load("sacrebleu")` fetches its script from the Hub and
fails offline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

# Which way is better for each metric the trainer can early-stop on.
MODES = {"loss": "min", "bleu": "max", "chrf": "max", "ter": "min"}


def translation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU, chrF and TER (sacrebleu defaults: 13a tokenisation, chrF char order 6)."""
    from sacrebleu.metrics import BLEU, CHRF, TER

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    refs = [list(references)]
    return {
        "bleu": BLEU().corpus_score(list(hypotheses), refs).score,
        "chrf": CHRF().corpus_score(list(hypotheses), refs).score,
        "ter": TER().corpus_score(list(hypotheses), refs).score,
    }


def is_better(value: float, best: float | None, metric: str, min_delta: float = 0.0) -> bool:
    """Strictly better than `best` by more than `min_delta` in the metric's direction."""
    if best is None:
        return not math.isnan(value)
    if MODES[metric] == "max":
        return value > best + min_delta
    return value < best - min_delta

"""Scoring with sacrebleu: corpus BLEU / chrF / TER, and which way each metric is better.

sacrebleu is called directly: `evaluate.load("sacrebleu")` fetches its script from the Hub and
fails offline.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

# Which way is better for each metric the trainer can early-stop on.
MODES = {"loss": "min", "bleu": "max", "chrf": "max", "ter": "min", "accuracy": "max", "macro_f1": "max"}


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


@dataclass(frozen=True)
class PairedGain:
    """How much system B beats system A on one test set, with a bootstrap interval over sentences."""

    metric: str
    a: float
    b: float
    low: float  # 2.5th percentile of (b - a) over resampled test sets
    high: float  # 97.5th percentile
    sentences: int
    resamples: int

    @property
    def gain(self) -> float:
        return self.b - self.a

    def __str__(self) -> str:
        return f"{self.a:.1f} → {self.b:.1f} ({self.gain:+.1f}, 95% CI {self.low:+.1f}…{self.high:+.1f})"


def paired_bootstrap(hypotheses_a: Sequence[str], hypotheses_b: Sequence[str], references: Sequence[str],
                     metric: str = "chrf", resamples: int = 1000, seed: int = 0) -> PairedGain:
    """Corpus-level `metric` of A and B, and a 95% interval of B − A from paired bootstrap resampling.

    Each resample draws the same sentence indices for both systems (Koehn 2004), so the interval is
    about the difference, not about each score's own noise.
    """
    if not len(hypotheses_a) == len(hypotheses_b) == len(references) or not references:
        raise ValueError(f"need equally many hypotheses and references, at least one; got "
                         f"{len(hypotheses_a)}, {len(hypotheses_b)}, {len(references)}")
    score_a, score_b = _resampler(hypotheses_a, references, metric), _resampler(hypotheses_b, references, metric)
    everything = range(len(references))
    gains = sorted(score_b(indices) - score_a(indices) for indices in _resamples(len(references), resamples, seed))
    return PairedGain(metric, score_a(everything), score_b(everything), gains[int(0.025 * (resamples - 1))],
                      gains[int(0.975 * (resamples - 1))], len(references), resamples)


def bootstrap_interval(hypotheses: Sequence[str], references: Sequence[str], metric: str = "chrf",
                       resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of one system's corpus `metric`, resampling sentences (Koehn 2004)."""
    if len(hypotheses) != len(references) or not references:
        raise ValueError(f"need equally many hypotheses and references, at least one; got {len(hypotheses)} "
                         f"and {len(references)}")
    score = _resampler(hypotheses, references, metric)
    values = sorted(score(indices) for indices in _resamples(len(references), resamples, seed))
    return values[int(0.025 * (resamples - 1))], values[int(0.975 * (resamples - 1))]


def _resampler(hypotheses: Sequence[str], references: Sequence[str], metric: str) -> Callable[[Sequence[int]], float]:
    """Corpus score of any multiset of sentence indices. Sentence statistics are extracted once and summed per
    resample, which is exactly what sacrebleu's corpus score does for the whole set."""
    from sacrebleu.metrics import BLEU, CHRF

    scorer = {"chrf": CHRF, "bleu": BLEU}[metric]()
    stats = scorer._extract_corpus_statistics(list(hypotheses), [list(references)])

    def score(indices: Sequence[int]) -> float:
        totals = [sum(column) for column in zip(*(stats[i] for i in indices))]
        return scorer._compute_score_from_stats(totals).score

    return score


def _resamples(size: int, resamples: int, seed: int) -> Iterator[list[int]]:
    rng = random.Random(seed)
    for _ in range(resamples):
        yield [rng.randrange(size) for _ in range(size)]

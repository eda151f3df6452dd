"""Scores agree with sacrebleu's own corpus scores; the paired bootstrap interval behaves."""

from __future__ import annotations

import pytest
from sacrebleu.metrics import BLEU, CHRF

from adaptkit.evaluation.scoring import paired_bootstrap, translation_metrics

REFS = ["the cat sat on the mat", "a dog barked at night", "open the file menu", "click OK to save",
        "the window closes", "select a printer"] * 5
GOOD = ["the cat sat on a mat", "a dog barked at night", "open the file menu", "click OK to save it",
        "the window closes now", "select the printer"] * 5
COPY = ["die Katze", "ein Hund bellte", "Datei öffnen", "OK klicken", "das Fenster", "Drucker wählen"] * 5


def test_paired_bootstrap_scores_equal_sacrebleu_corpus_scores():
    gain = paired_bootstrap(COPY, GOOD, REFS, "chrf", resamples=200)
    assert gain.a == pytest.approx(CHRF().corpus_score(COPY, [REFS]).score, abs=1e-9)
    assert gain.b == pytest.approx(CHRF().corpus_score(GOOD, [REFS]).score, abs=1e-9)
    assert gain.b == pytest.approx(translation_metrics(GOOD, REFS)["chrf"], abs=1e-9)
    bleu = paired_bootstrap(COPY, GOOD, REFS, "bleu", resamples=50)
    assert bleu.b == pytest.approx(BLEU().corpus_score(GOOD, [REFS]).score, abs=1e-9)


def test_paired_bootstrap_interval_contains_the_gain_and_excludes_zero_for_a_clear_win():
    gain = paired_bootstrap(COPY, GOOD, REFS, "chrf", resamples=300, seed=1)
    assert gain.low <= gain.gain <= gain.high
    assert gain.low > 0  # every resample prefers the good system
    same = paired_bootstrap(GOOD, GOOD, REFS, "chrf", resamples=100)
    assert same.gain == same.low == same.high == 0.0
    assert paired_bootstrap(COPY, GOOD, REFS, resamples=100, seed=3) == paired_bootstrap(
        COPY, GOOD, REFS, resamples=100, seed=3)  # seeded: the same interval every run


def test_paired_bootstrap_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="equally many"):
        paired_bootstrap(GOOD[:3], GOOD, REFS)

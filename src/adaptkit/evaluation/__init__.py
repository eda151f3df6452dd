"""Scores, the target-token loss, and evaluation of a model with an adapter on parallel text."""

from adaptkit.evaluation.loss import dev_loss
from adaptkit.evaluation.scoring import MODES, is_better, translation_metrics
from adaptkit.evaluation.translation import evaluate, generate_translations

__all__ = ["MODES", "dev_loss", "evaluate", "generate_translations", "is_better", "translation_metrics"]

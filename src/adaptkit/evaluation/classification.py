"""Classification scores: accuracy, macro-F1 and per-class precision / recall / F1, and the dev evaluation.

Macro-F1 is the unweighted mean of the per-class F1 over every label of the head, so a small
class counts as much as a large one (a classifier that ignores a rare domain is punished for it).
A class with no gold and no predicted rows has no defined F1 and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adaptkit.tasks.classify import ClassificationCollator, classification_logits, classification_loss


def classification_metrics(predicted: Sequence[int], gold: Sequence[int], labels: Sequence[str]
                           ) -> dict[str, Any]:
    """Accuracy, macro-F1 and, per label, precision / recall / F1 / support. Ids index `labels`."""
    if len(predicted) != len(gold):
        raise ValueError(f"{len(predicted)} predictions but {len(gold)} gold labels")
    if not gold:
        raise ValueError("no rows to score")
    per_class: dict[str, dict[str, float]] = {}
    f1s = []
    for c, label in enumerate(labels):
        tp = sum(1 for p, g in zip(predicted, gold) if p == c and g == c)
        n_pred = sum(1 for p in predicted if p == c)
        n_gold = sum(1 for g in gold if g == c)
        precision = tp / n_pred if n_pred else 0.0
        recall = tp / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[str(label)] = {"precision": precision, "recall": recall, "f1": f1, "support": n_gold}
        if n_pred or n_gold:
            f1s.append(f1)
    accuracy = sum(1 for p, g in zip(predicted, gold) if p == g) / len(gold)
    return {"accuracy": accuracy, "macro_f1": sum(f1s) / len(f1s), "per_class": per_class}


@torch.no_grad()
def evaluate_classifier(model: Any, encoded: Any, adapter: str, labels: Sequence[str], *, batch_size: int = 32,
                        weights: torch.Tensor | None = None, per_class: bool = False) -> dict[str, Any]:
    """Loss (weighted like the training loss), accuracy and macro-F1 of `adapter` on encoded rows
    (`tasks.classify.encode_examples`); with `per_class`, also the per-label scores."""
    collate = ClassificationCollator(model.tokenizer)
    device = next(model.model.parameters()).device
    predicted: list[int] = []
    gold: list[int] = []
    loss_sum = 0.0
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(encoded), batch_size):
            batch = collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = classification_logits(model, batch, adapter)
            loss_sum += float(classification_loss(logits, batch["labels"], weights)) * len(logits)
            predicted.extend(int(row.argmax()) for row in logits)
            gold.extend(int(g) for g in batch["labels"])
    finally:
        model.train(was_training)
    scores = classification_metrics(predicted, gold, labels)
    results: dict[str, Any] = {"loss": loss_sum / max(len(gold), 1), "accuracy": scores["accuracy"],
                               "macro_f1": scores["macro_f1"]}
    if per_class:
        results["per_class"] = scores["per_class"]
    return results

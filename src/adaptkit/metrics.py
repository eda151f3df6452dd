"""Scoring: corpus BLEU / chrF / TER with sacrebleu, and the dev-set evaluation the trainer runs.

sacrebleu is called directly: `evaluate.load("sacrebleu")` fetches its script from the Hub and
fails offline. `evaluate_model` gives the token-weighted loss on a tokenized split and, for
translation, the metrics of generated output (batched, beam size configurable), per language
pair prompts built by data.py.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

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


def label_tokens(labels: torch.Tensor, family: str) -> int:
    """Tokens that carry a loss: decoder LMs predict position t+1 from t, so the first never counts."""
    if family == "decoder":
        labels = labels[:, 1:]
    return int((labels != -100).sum())


def loss_inputs(batch: dict[str, torch.Tensor], slice_head: bool) -> dict[str, Any]:
    """Model inputs with labels. With `slice_head` (decoder LMs) the LM head runs only at positions
    that predict a target token: exact, and with a 262k vocabulary it is most of the step saved."""
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    labels = batch["labels"]
    if not slice_head:
        inputs["labels"] = labels
        return inputs
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    # hidden[keep] → head → (N, vocab); `shift_labels` tells the model's loss these are the targets.
    inputs.update(logits_to_keep=keep, labels=targets, shift_labels=targets)
    return inputs


def can_slice_head(model: Any) -> bool:
    """Decoder LMs whose forward takes `logits_to_keep` (transformers 5 causal LMs do)."""
    import inspect

    return model.family == "decoder" and "logits_to_keep" in inspect.signature(model.model.forward).parameters


@torch.no_grad()
def dev_loss(model: Any, encoded: Any, collate: Any, adapter: Any, batch_size: int = 16,
             slice_head: bool = True) -> float:
    """Token-weighted mean loss of `model` with `adapter` over a tokenized split."""
    device = next(model.model.parameters()).device
    slice_head = slice_head and can_slice_head(model)
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        batch = collate([encoded[i] for i in range(start, min(start + batch_size, len(encoded)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        n = label_tokens(batch["labels"], model.family)
        if n:
            total += float(model(**loss_inputs(batch, slice_head), adapter=adapter).loss) * n
            tokens += n
    return total / max(tokens, 1)


@torch.no_grad()
def generate_translations(model: Any, rows: Sequence[dict], adapter: Any, *, prompt: Any = None,
                          batch_size: int = 16, num_beams: int = 1, max_new_tokens: int = 128,
                          max_source_len: int | None = None, src_lang: str | None = None,
                          tgt_lang: str | None = None) -> list[str]:
    """Translate `rows` (dicts with `src`, optionally `src_lang`/`tgt_lang`) with `model.generate`.

    Each row's prompt names its own pair; rows of several pairs share a batch.
    """
    from .translate import Translator

    translator = Translator(model, prompt=prompt, batch_size=batch_size, max_source_len=max_source_len)
    return translator.translate([row["src"] for row in rows],
                                [row.get("src_lang") or src_lang or "en" for row in rows],
                                [row.get("tgt_lang") or tgt_lang or "en" for row in rows],
                                adapter=adapter, num_beams=num_beams, max_new_tokens=max_new_tokens)


def evaluate(model: Any, rows: Any, adapter: Any = None, *, prompt: Any = None, encoded: Any = None,
             generate: bool = True, batch_size: int = 16, num_beams: int = 1, max_new_tokens: int = 128,
             max_source_len: int | None = 256, max_target_len: int | None = 256, src_lang: str | None = None,
             tgt_lang: str | None = None, slice_head: bool = True) -> dict[str, float]:
    """Score `model` with `adapter` (None: the bare backbone) on pairs `rows`: loss, and with
    `generate` BLEU / chrF / TER of its translations. `encoded` reuses a tokenized copy of `rows`."""
    from .data import Collator, PromptFormat, encode_pairs

    if model.family == "decoder" and prompt is None:
        prompt = PromptFormat()
    if encoded is None:
        encoded, _ = encode_pairs(rows, model.tokenizer, model.family, prompt=prompt, max_source_len=max_source_len,
                                  max_target_len=max_target_len, src_lang=src_lang, tgt_lang=tgt_lang)
    was_training = model.training
    model.eval()
    try:
        results = {"loss": dev_loss(model, encoded, Collator(model.tokenizer, model.family), adapter, batch_size,
                                    slice_head)}
        if generate:
            rows = list(rows)
            hypotheses = generate_translations(
                model, rows, adapter, prompt=prompt, batch_size=batch_size, num_beams=num_beams,
                max_new_tokens=max_new_tokens, max_source_len=max_source_len, src_lang=src_lang, tgt_lang=tgt_lang)
            results.update(translation_metrics(hypotheses, [r["tgt"] for r in rows]))
    finally:
        model.train(was_training)
    return results

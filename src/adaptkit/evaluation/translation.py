"""Evaluate a model with an adapter on parallel text: dev loss and the scores of its translations.

Prompts per language pair come from data.py; rows of several pairs share a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from adaptkit.data import Collator, PromptFormat, encode_pairs
from adaptkit.evaluation.loss import dev_loss
from adaptkit.evaluation.scoring import translation_metrics
from adaptkit.tasks.translate import Translator


@torch.no_grad()
def generate_translations(model: Any, rows: Sequence[dict], adapter: Any, *, prompt: Any = None,
                          batch_size: int = 16, num_beams: int = 1, max_new_tokens: int = 128,
                          max_source_len: int | None = None, src_lang: str | None = None,
                          tgt_lang: str | None = None) -> list[str]:
    """Translate `rows` (dicts with `src`, optionally `src_lang`/`tgt_lang`) with `model.generate`.

    Each row's prompt names its own pair; rows of several pairs share a batch.
    """
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
    model.require_tokenizer("evaluate")
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

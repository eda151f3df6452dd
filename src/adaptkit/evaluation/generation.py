"""Evaluation that fits content tasks: style transfer against copying the input, dialogue against the bare backbone.

- Style: a modern rewrite shares most words with its archaic source, so copying the input already
  scores well. The adapter's chrF / BLEU against the modern reference are reported beside the
  copy-the-input baseline's, with a paired bootstrap interval of the gain over that baseline.
- Dialogue: replies have no single right answer, so the figure of merit is the dev perplexity
  of the reference replies (adapter vs bare backbone, same prompts), with distinct-1/2 and the
  average reply length so that a degenerate adapter (one stock reply, or silence) shows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from adaptkit.data import Collator, PromptFormat, encode_pairs
from adaptkit.evaluation.loss import dev_loss
from adaptkit.evaluation.scoring import PairedGain, paired_bootstrap, translation_metrics
from adaptkit.tasks.generate import Generator


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all texts (Li et al. 2016), on lowercased whitespace words; 0 if none."""
    grams = [tuple(words[i:i + n]) for words in (t.lower().split() for t in texts) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def reply_stats(replies: Sequence[str]) -> dict[str, float]:
    """distinct-1, distinct-2 and the mean length in words."""
    return {"distinct_1": distinct_n(replies, 1), "distinct_2": distinct_n(replies, 2),
            "avg_words": sum(len(r.split()) for r in replies) / max(len(replies), 1)}


def _task_prompt(model: Any, task: str, prompt: PromptFormat | None) -> PromptFormat | None:
    if prompt is not None or model.family != "decoder":
        return prompt
    return PromptFormat.for_task(task)


@dataclass
class StyleEvaluation:
    """The adapter's rewrites and the unchanged inputs, each scored against the modern references."""

    sentences: int
    adapted: dict[str, float]  # bleu, chrf, ter of the adapter's output
    copy: dict[str, float]  # the same for the input copied unchanged
    chrf_gain: PairedGain  # adapter over copy, with its 95% bootstrap interval
    bleu_gain: PairedGain
    hypotheses: list[str] = field(repr=False)

    @property
    def beats_copy(self) -> bool:
        """chrF above the copy baseline by more than the test set's noise: the interval excludes zero."""
        return self.chrf_gain.low > 0

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"sentences": self.sentences, **self.adapted,
                               **{f"copy_{k}": v for k, v in self.copy.items()}}
        for gain in (self.chrf_gain, self.bleu_gain):
            out.update({f"{gain.metric}_gain": gain.gain, f"{gain.metric}_gain_low": gain.low,
                        f"{gain.metric}_gain_high": gain.high})
        return out


@torch.no_grad()
def evaluate_style(model: Any, rows: Any, adapter: Any, *, prompt: PromptFormat | None = None,
                   batch_size: int = 16, num_beams: int = 1, max_new_tokens: int = 128,
                   max_source_len: int | None = 256, resamples: int = 1000, seed: int = 0,
                   progress: bool = False) -> StyleEvaluation:
    """Rewrite each row's `src` with `adapter` (None: the bare backbone) and score it, and the `src` itself,
    against `tgt`."""
    rows = list(rows)
    prompt = _task_prompt(model, "style", prompt)
    generator = Generator(model, prompts={"style": prompt} if prompt else None, batch_size=batch_size,
                          max_source_len=max_source_len)
    hypotheses = generator.generate([r["src"] for r in rows], adapter=[adapter] * len(rows), task="style",
                                    src_lang=[r.get("src_lang") or "en" for r in rows],
                                    tgt_lang=[r.get("tgt_lang") or r.get("src_lang") or "en" for r in rows],
                                    num_beams=num_beams, max_new_tokens=max_new_tokens, progress=progress)
    sources, references = [r["src"] for r in rows], [r["tgt"] for r in rows]
    return StyleEvaluation(
        sentences=len(rows), adapted=translation_metrics(hypotheses, references),
        copy=translation_metrics(sources, references),
        chrf_gain=paired_bootstrap(sources, hypotheses, references, "chrf", resamples, seed),
        bleu_gain=paired_bootstrap(sources, hypotheses, references, "bleu", resamples, seed),
        hypotheses=hypotheses)


@torch.no_grad()
def dialogue_metrics(model: Any, rows: Any, adapter: Any, *, prompt: PromptFormat | None = None,
                     encoded: Any = None, generate: bool = True, batch_size: int = 16, max_new_tokens: int = 64,
                     max_source_len: int | None = 256, max_target_len: int | None = 256,
                     slice_head: bool = True, progress: bool = False) -> dict[str, float]:
    """Loss and perplexity of the reference replies; with `generate`, distinct-1/2 and mean length of
    greedy replies. `encoded` reuses a tokenized copy of `rows` (the trainer passes its own)."""
    rows = list(rows)
    prompt = _task_prompt(model, "dialogue", prompt)
    if encoded is None:
        encoded, _ = encode_pairs(rows, model.tokenizer, model.family, prompt=prompt, max_source_len=max_source_len,
                                  max_target_len=max_target_len)
    was_training = model.training
    model.eval()
    try:
        loss = dev_loss(model, encoded, Collator(model.tokenizer, model.family), adapter, batch_size, slice_head)
        results = {"loss": loss, "perplexity": math.exp(loss)}
        if generate:
            generator = Generator(model, prompts={"dialogue": prompt} if prompt else None, batch_size=batch_size,
                                  max_source_len=max_source_len)
            replies = generator.generate([r["src"] for r in rows], adapter=[adapter] * len(rows), task="dialogue",
                                         max_new_tokens=max_new_tokens, progress=progress)
            results.update(reply_stats(replies))
    finally:
        model.train(was_training)
    return results


@dataclass
class DialogueEvaluation:
    """The adapter against the bare backbone on the same dev prompts, and the reference replies' own statistics."""

    sentences: int
    adapted: dict[str, float]
    bare: dict[str, float]
    references: dict[str, float]

    @property
    def perplexity_ratio(self) -> float:
        return self.adapted["perplexity"] / self.bare["perplexity"]

    def as_dict(self) -> dict[str, Any]:
        return {"sentences": self.sentences, **self.adapted, **{f"bare_{k}": v for k, v in self.bare.items()},
                **{f"reference_{k}": v for k, v in self.references.items()}, "perplexity_ratio": self.perplexity_ratio}


def evaluate_dialogue(model: Any, rows: Any, adapter: Any, *, prompt: PromptFormat | None = None,
                      generate: bool = True, batch_size: int = 16, max_new_tokens: int = 64,
                      max_source_len: int | None = 256, max_target_len: int | None = 256,
                      progress: bool = False) -> DialogueEvaluation:
    """`dialogue_metrics` of `adapter` and of the bare backbone on `rows` (`src`: the turn(s), `tgt`: the reply)."""
    rows = list(rows)
    prompt = _task_prompt(model, "dialogue", prompt)
    encoded, _ = encode_pairs(rows, model.tokenizer, model.family, prompt=prompt, max_source_len=max_source_len,
                              max_target_len=max_target_len)
    common = dict(prompt=prompt, encoded=encoded, generate=generate, batch_size=batch_size,
                  max_new_tokens=max_new_tokens, max_source_len=max_source_len, progress=progress)
    return DialogueEvaluation(len(rows), dialogue_metrics(model, rows, adapter, **common),
                              dialogue_metrics(model, rows, None, **common), reply_stats([r["tgt"] for r in rows]))

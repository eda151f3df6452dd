"""Translator: (source language, target language, domain) → the right adapter, per row.

One batch may mix language pairs and domains: each row's prompt is built for its own pair and
the row is routed to its own adapter, all in one `generate` call over the shared backbone.

`domain="auto"` (for all rows, or per row) asks a domain classifier — an encoder adapter with a
classification head on its own small backbone (tasks/classify.py) — for each row's domain, then
routes by (src, tgt, predicted domain). Below `domain_threshold` the prediction is not trusted
and the row goes to the pair's general adapter (the one with no domain), as a row with no
domain would. `translate_detailed` says per row what was predicted, how sure, and where it went.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.data import PromptFormat, decode_generated, encode_decoder_example, prompt_inputs
from adaptkit.tasks.classify import Classifier
from adaptkit.tasks.continuous import DecodingRow, decode_continuously, first_line_rule, line_written, unsupported

AUTO = "auto"  # domain="auto": predicted per row by the domain classifier


@dataclass(frozen=True)
class Translation:
    """One row of `translate_detailed`: the text, where the row was routed, and why."""

    text: str
    adapter: Any  # the adapter spec the row ran with (None: the bare backbone)
    domain: str | None  # the domain it was routed by: given, predicted, or None (below the threshold)
    predicted_domain: str | None = None  # domain="auto" rows: the classifier's label
    domain_probability: float | None = None  # ... and its probability


class Translator:
    """Pick adapters by the routing keys saved in their files (`src_lang`, `tgt_lang`, `domain`).

    `domain_classifier` (a `Classifier`, or the path of a classification adapter file, loaded on
    the backbone it names) predicts the domain of `domain="auto"` rows; `domain_labels` renames
    its labels to the translation adapters' domain keys where they differ.
    """

    def __init__(self, model: AdaptedModel, prompt: PromptFormat | None = None, batch_size: int = 16,
                 max_source_len: int | None = 256, domain_classifier: Classifier | str | Path | None = None,
                 domain_threshold: float = 0.5, domain_labels: Mapping[str, str] | None = None,
                 continuous: bool = True):
        model.require_tokenizer("Translator")
        self.model = model
        self.continuous = continuous  # greedy decoder rows: a continuous batch of batch_size rows (tasks/continuous.py)
        self.prompt = prompt  # None: data.PromptFormat() for decoders, bare sources for seq2seq
        self.batch_size = batch_size
        self.max_source_len = max_source_len
        if isinstance(domain_classifier, (str, Path)):
            domain_classifier = Classifier.from_file(domain_classifier)
        if domain_classifier is not None and domain_classifier.model is model:
            raise AdapterError("the domain classifier must run on its own (encoder) backbone, not the translation "
                               "backbone; load it with Classifier.from_file(path)")
        if not 0.0 <= domain_threshold <= 1.0:
            raise AdapterError(f"domain_threshold is a probability in [0, 1]; got {domain_threshold}")
        self.domain_classifier = domain_classifier
        self.domain_threshold = domain_threshold
        self.domain_labels = dict(domain_labels or {})

    def adapter_for(self, src_lang: str, tgt_lang: str, domain: str | None = None) -> str | None:
        """The loaded adapter whose metadata matches; a pair-only adapter serves any domain."""
        return match_adapter(((n, self.model.adapter_metadata(n)) for n in self.model.adapters),
                             src_lang, tgt_lang, domain)

    def translate(self, texts: Sequence[str], src_lang: str | Sequence[str], tgt_lang: str | Sequence[str],
                  domain: str | None | Sequence[str | None] = None, adapter: Any = "auto",
                  num_beams: int = 4, max_new_tokens: int = 128, progress: bool = False, **generate_kwargs: Any
                  ) -> list[str]:
        """Translate `texts`; languages and domain may be given per row. `adapter="auto"` routes
        each row by its (src, tgt, domain); otherwise it is passed to the bank as is. A domain of
        "auto" is predicted by the domain classifier (see `translate_detailed` for what it said)."""
        return [row.text for row in self.translate_detailed(
            texts, src_lang, tgt_lang, domain, adapter, num_beams=num_beams, max_new_tokens=max_new_tokens,
            progress=progress, **generate_kwargs)]

    def predict_domains(self, texts: Sequence[str]) -> list[tuple[str | None, str, float]]:
        """(routing domain, predicted label, probability) per text; the routing domain is None below
        `domain_threshold`, so the row falls back to the pair's general adapter."""
        if self.domain_classifier is None:
            raise AdapterError('domain="auto" needs a domain classifier: Translator(model, domain_classifier='
                               'Classifier.from_file("domain.safetensors"))')
        out = []
        for prediction in self.domain_classifier.predict(list(texts)):
            domain = self.domain_labels.get(prediction.label, prediction.label)
            trusted = prediction.probability >= self.domain_threshold
            out.append((domain if trusted else None, prediction.label, prediction.probability))
        return out

    def translate_detailed(self, texts: Sequence[str], src_lang: str | Sequence[str],
                           tgt_lang: str | Sequence[str], domain: str | None | Sequence[str | None] = None,
                           adapter: Any = "auto", num_beams: int = 4, max_new_tokens: int = 128,
                           progress: bool = False, **generate_kwargs: Any) -> list[Translation]:
        """`translate`, with each row's adapter, routing domain and (for "auto" rows) the predicted
        domain and its probability."""
        n = len(texts)
        srcs = _per_row(src_lang, n)
        tgts = _per_row(tgt_lang, n)
        domains = _per_row(domain, n)
        predicted: dict[int, tuple[str, float]] = {}
        auto_rows = [i for i, d in enumerate(domains) if d == AUTO]
        if auto_rows:
            for i, (routed, label, probability) in zip(auto_rows, self.predict_domains([texts[i] for i in auto_rows])):
                domains[i] = routed
                predicted[i] = (label, probability)
        if adapter == "auto":
            routes: list[Any] = [self.adapter_for(s, t, d) for s, t, d in zip(srcs, tgts, domains)]
        else:
            routes = _per_row(adapter, n) if isinstance(adapter, list) else [adapter] * n
        out = [""] * n
        with tqdm(total=n, desc="translating", unit="row", disable=not progress) as bar:
            static = list(range(n))
            if self._continuous_for(num_beams, generate_kwargs):
                static = self._translate_continuously(texts, srcs, tgts, routes, max_new_tokens, out, bar.update)
            static.sort(key=lambda i: len(texts[i]))  # similar lengths batch together: less padding, rows end closer
            for start in range(0, len(static), self.batch_size):
                rows = static[start:start + self.batch_size]
                inputs = self._inputs([texts[i] for i in rows], [srcs[i] for i in rows], [tgts[i] for i in rows])
                generated = self.model.generate(**inputs, adapter=[routes[i] for i in rows], num_beams=num_beams,
                                                max_new_tokens=max_new_tokens, do_sample=False,
                                                **self._stop_kwargs(inputs["input_ids"].shape[1]), **generate_kwargs)
                decoded = decode_generated(self.model.tokenizer, generated, inputs, self.model.family)
                for i, text in zip(rows, decoded):
                    out[i] = self._first_line(text)
                bar.update(len(rows))
        return [Translation(text, routes[i], domains[i], *predicted.get(i, (None, None))) for i, text in enumerate(out)]

    def _continuous_for(self, num_beams: int, generate_kwargs: dict[str, Any]) -> bool:
        """Greedy search with no extra generate options, on a backbone whose greedy search the engine copies."""
        return self.continuous and num_beams == 1 and not generate_kwargs and unsupported(self.model) is None

    def _translate_continuously(self, texts: Sequence[str], srcs: list[str], tgts: list[str], routes: list[Any],
                                max_new_tokens: int, out: list[str], progress: Callable[[int], Any]) -> list[int]:
        """Decode the rows in a continuous batch (rows leave as they finish, others join); returns the indices
        of rows too long for the backbone's sliding window, left for generate."""
        stop = first_line_rule(self.model.tokenizer) if self._one_line() else None
        rows = [DecodingRow(self.decoding_parts(texts[i], srcs[i], tgts[i])[0], routes[i], max_new_tokens, stop,
                            tag=i) for i in range(len(texts))]

        def done(row: DecodingRow) -> None:
            out[row.tag] = self._first_line(self.model.tokenizer.decode(row.tokens, skip_special_tokens=True).strip())
            progress(1)

        return [row.tag for row in decode_continuously(self.model, rows, self.batch_size, done)]

    def decoding_parts(self, text: str, src_lang: str, tgt_lang: str) -> tuple[list[int], bool]:
        """One row as `translate` prompts a decoder backbone, for continuous batching: its unpadded prompt ids,
        and whether its answer ends at the first line (`line_written`; the text is then `tidy`'s first line)."""
        ids = encode_decoder_example(self.model.tokenizer, text, None, src_lang, tgt_lang,
                                     self.prompt or PromptFormat(), self.max_source_len)[0]["input_ids"]
        return ids, self._one_line()

    def _one_line(self) -> bool:
        """A decoder prompted for a one-line target is done at the first newline (a bare base model
        otherwise keeps writing until max_new_tokens: slow, and unfair to its score)."""
        return self.model.family == "decoder" and "\n" not in (self.prompt or PromptFormat()).target

    def _stop_kwargs(self, prompt_length: int) -> dict[str, Any]:
        tokenizer = self.model.tokenizer
        kwargs: dict[str, Any] = {}
        if tokenizer.pad_token_id is None:
            kwargs["pad_token_id"] = tokenizer.eos_token_id
        if self._one_line():
            kwargs["stopping_criteria"] = StoppingCriteriaList([LineDone(tokenizer, prompt_length)])
        return kwargs

    def _first_line(self, text: str) -> str:
        return text.strip().split("\n", 1)[0].strip() if self._one_line() else text

    def _inputs(self, texts: list[str], srcs: list[str], tgts: list[str]) -> dict[str, torch.Tensor]:
        inputs = prompt_inputs(self.model.tokenizer, texts, srcs, tgts, self.model.family, self.prompt,
                               self.max_source_len)
        device = next(self.model.model.parameters()).device
        return {k: v.to(device) for k, v in inputs.items()}


def match_adapter(candidates: Iterable[tuple[str, Mapping[str, Any]]], src_lang: str, tgt_lang: str,
                  domain: str | None = None) -> str | None:
    """The first (name, metadata) whose routing keys fit: same pair and same domain, else a pair-only
    adapter (no domain), which serves any domain. Shared by Translator and the HTTP service."""
    best, best_score = None, 0
    for name, meta in candidates:
        if meta.get("src_lang") != src_lang or meta.get("tgt_lang") != tgt_lang:
            continue
        if meta.get("domain") not in (None, domain):
            continue
        score = 2 if domain is not None and meta.get("domain") == domain else 1
        if score > best_score:
            best, best_score = name, score
    return best


class LineDone(StoppingCriteria):
    """A row is done once it has written a non-empty line and then a newline.

    (`stop_strings=["\n"]` would stop a model that starts its answer on a new line before it said anything.)
    """

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([line_written(text) for text in texts], device=input_ids.device)


def _per_row(value: Any, n: int) -> list:
    if isinstance(value, (list, tuple)) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"got {len(value)} per-row values for {n} texts")
        return list(value)
    return [value] * n

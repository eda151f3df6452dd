"""Translator: (source language, target language, domain) → the right adapter, per row.

One batch may mix language pairs and domains: each row's prompt is built for its own pair and
the row is routed to its own adapter, all in one `generate` call over the shared backbone.

`domain="auto"` (for all rows, or per row) asks a domain classifier — an encoder adapter with a
classification head on its own small backbone (tasks/classify.py) — for each row's domain, then
routes by (src, tgt, predicted domain). Below `domain_threshold` the prediction is not trusted
and the row goes to the pair's general adapter (the one with no domain), as a row with no
domain would. `translate_detailed` says per row what was predicted, how sure, and where it went.

A row whose routing keys fit no adapter is an AdapterError, as in the service (404) and the CLI:
the bare backbone is only ever asked for by name (`adapter=None`).

A source over `max_source_len` tokens is translated whole: split at sentence ends (then between
words, then tokens) into pieces within the limit, which decode as rows of their own beside the
others, and their answers joined. `decoding_parts`, which builds one prompt per row for a caller
that cannot split, raises `SourceTooLong` instead. Nothing is ever cut.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteriaList

from adaptkit.core.adapterfile import AdapterStore, read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError, SourceTooLong
from adaptkit.core.routing import match_adapter, per_row, route_by_keys
from adaptkit.data import PromptFormat, decode_generated, prompt_inputs
from adaptkit.generation.continuous import DecodingRow, decode_continuously, first_line_rule, unsupported
from adaptkit.segments import Segments, split_source
from adaptkit.tasks.classify import Classifier
from adaptkit.tasks.oneline import LineDone, tidy

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
    its labels to the translation adapters' domain keys where they differ. `max_source_len` is the
    source tokens one prompt takes (`source_tokens`); a longer text is split to fit, never cut.
    """

    def __init__(self, model: AdaptedModel, prompt: PromptFormat | None = None, batch_size: int = 16,
                 max_source_len: int | None = 256, domain_classifier: Classifier | str | Path | None = None,
                 domain_threshold: float = 0.5, domain_labels: Mapping[str, str] | None = None,
                 continuous: bool = True):
        model.require_tokenizer("Translator")
        self.model = model
        self.continuous = continuous  # greedy rows: a continuous batch (generation/continuous.py)
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
        self._headers: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}  # store_candidates' cache

    def adapter_for(self, src_lang: str, tgt_lang: str, domain: str | None = None) -> str | None:
        """The adapter whose routing keys match, loaded or in the model's store (`core.routing.match_adapter`:
        a pair-only adapter serves any domain); None when none does."""
        return match_adapter(self.candidates(), src_lang, tgt_lang, domain)

    def candidates(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, routing keys) of every adapter a row may be routed to: the loaded ones, then the store's."""
        loaded = [(name, self.model.adapter_metadata(name)) for name in self.model.adapters]
        if self.model.store is None:
            return loaded
        names = {name for name, _ in loaded}
        return loaded + [(n, info) for n, info in store_candidates(self.model.store, self._headers) if n not in names]

    def translate(self, texts: Sequence[str], src_lang: str | Sequence[str], tgt_lang: str | Sequence[str],
                  domain: str | None | Sequence[str | None] = None, adapter: Any = "auto",
                  num_beams: int = 4, max_new_tokens: int = 128, progress: bool = False, **generate_kwargs: Any
                  ) -> list[str]:
        """Translate `texts`; languages and domain may be given per row. `adapter="auto"` (for all rows, or
        per row in a list) routes each row by its (src, tgt, domain), and a row no adapter fits is an
        AdapterError; otherwise it is passed to the bank as is (None: the bare backbone). A domain of
        "auto" is predicted by the domain classifier (see `translate_detailed` for what it said). A text
        over `max_source_len` tokens is split at sentence ends, translated piece by piece and rejoined."""
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
        srcs = per_row(src_lang, n, "src_lang")
        tgts = per_row(tgt_lang, n, "tgt_lang")
        domains = per_row(domain, n, "domain")
        predicted: dict[int, tuple[str, float]] = {}
        auto_rows = [i for i, d in enumerate(domains) if d == AUTO]
        if auto_rows:
            for i, (routed, label, probability) in zip(auto_rows, self.predict_domains([texts[i] for i in auto_rows])):
                domains[i] = routed
                predicted[i] = (label, probability)
        routes = self._routes(per_row(adapter, n, "adapter", stacks=True), srcs, tgts, domains)
        # Every row in pieces within the source limit (most in one): the pieces decode as rows of their own.
        pieces = [self._segments(text, s, t) for text, s, t in zip(texts, srcs, tgts)]
        owner = [i for i, segments in enumerate(pieces) for _ in segments.texts]
        answers = iter(self._decode([text for segments in pieces for text in segments.texts],
                                    [srcs[i] for i in owner], [tgts[i] for i in owner], [routes[i] for i in owner],
                                    num_beams, max_new_tokens, progress, generate_kwargs))
        out = [segments.join([next(answers) for _ in segments.texts]) for segments in pieces]
        return [Translation(text, routes[i], domains[i], *predicted.get(i, (None, None))) for i, text in enumerate(out)]

    def _routes(self, adapters: list[Any], srcs: list[str], tgts: list[str], domains: list[str | None]) -> list[Any]:
        """Each row's adapter: as given, or for "auto" the one its routing keys fit (an AdapterError if none)."""
        if "auto" not in adapters:
            return adapters
        candidates = self.candidates()
        fix = ("Load or store an adapter with those routing keys, name one with adapter='NAME', or pass "
               "adapter=None to translate with the bare backbone on purpose")
        return [route_by_keys(candidates, s, t, d, fix=fix, where=f"texts[{i}]: ") if a == "auto" else a
                for i, (a, s, t, d) in enumerate(zip(adapters, srcs, tgts, domains))]

    def _decode(self, texts: list[str], srcs: list[str], tgts: list[str], routes: list[Any], num_beams: int,
                max_new_tokens: int, progress: bool, generate_kwargs: dict[str, Any]) -> list[str]:
        """One answer per row, each row's source within the limit."""
        n = len(texts)
        out = [""] * n
        with tqdm(total=n, desc="translating", unit="row", disable=not progress) as bar:
            static = list(range(n))
            if self._continuous_for(num_beams, generate_kwargs):
                static = self._translate_continuously(texts, srcs, tgts, routes, max_new_tokens, out, bar.update,
                                                      **generate_kwargs)
            static.sort(key=lambda i: len(texts[i]))  # similar lengths batch together: less padding, rows end closer
            for start in range(0, len(static), self.batch_size):
                rows = static[start:start + self.batch_size]
                inputs = self._inputs([texts[i] for i in rows], [srcs[i] for i in rows], [tgts[i] for i in rows])
                generated = self.model.generate(**inputs, adapter=[routes[i] for i in rows], num_beams=num_beams,
                                                max_new_tokens=max_new_tokens, do_sample=False,
                                                **self._stop_kwargs(inputs["input_ids"].shape[1]), **generate_kwargs)
                decoded = decode_generated(self.model.tokenizer, generated, inputs, self.model.family)
                for i, text in zip(rows, decoded):
                    out[i] = tidy(text, self._one_line())
                bar.update(len(rows))
        return out

    def _segments(self, text: str, src_lang: str, tgt_lang: str) -> Segments:
        if self.max_source_len is None:
            return Segments([text], [])
        return split_source(text, lambda piece: self.source_tokens(piece, src_lang, tgt_lang), self.max_source_len,
                            self.model.tokenizer)

    def source_tokens(self, text: str, src_lang: str, tgt_lang: str) -> int:
        """What `max_source_len` limits, as the prompt is built: a decoder's source tokens (the prompt around
        them is not counted), a seq2seq model's whole input (prompted, if it has a prompt) with its special
        tokens."""
        tokenizer = self.model.tokenizer
        if self.model.family == "decoder":
            return len(tokenizer(text, add_special_tokens=False)["input_ids"])
        prompted = self.prompt.prompt_text(text, src_lang, tgt_lang) if self.prompt else text
        return len(tokenizer(prompted)["input_ids"])

    def _continuous_for(self, num_beams: int, generate_kwargs: dict[str, Any]) -> bool:
        """Greedy search with no extra generate options but a forced first token (a target language's), on a
        backbone whose greedy search the engine copies (decoder-only, or Marian, M2M100, (m)BART, T5)."""
        forced_only = all(key == "forced_bos_token_id" and isinstance(value, int)
                          for key, value in generate_kwargs.items())
        return self.continuous and num_beams == 1 and forced_only and unsupported(self.model) is None

    def _translate_continuously(self, texts: Sequence[str], srcs: list[str], tgts: list[str], routes: list[Any],
                                max_new_tokens: int, out: list[str], progress: Callable[[int], Any],
                                forced_bos_token_id: int | None = None) -> list[int]:
        """Decode the rows in a continuous batch (rows leave as they finish, others join); returns the indices
        of rows too long for the backbone's sliding window, left for generate."""
        stop = first_line_rule(self.model.tokenizer) if self._one_line() else None
        rows = [DecodingRow(self._prompt_ids(texts[i], srcs[i], tgts[i]), routes[i], max_new_tokens, stop, tag=i,
                            first_token=forced_bos_token_id) for i in range(len(texts))]

        def done(row: DecodingRow) -> None:
            out[row.tag] = tidy(self.model.tokenizer.decode(row.tokens, skip_special_tokens=True), self._one_line())
            progress(1)

        return [row.tag for row in decode_continuously(self.model, rows, self.batch_size, done)]

    def decoding_parts(self, text: str, src_lang: str, tgt_lang: str) -> tuple[list[int], bool]:
        """One row as `translate` prompts it, for continuous batching: its unpadded prompt ids (a seq2seq
        backbone's encoder input), and whether its answer ends at the first line (the text is then `tidy`'s
        first line).

        One row is one prompt, so a source over `max_source_len` tokens is refused with `SourceTooLong`
        (`.tokens`, `.limit`), never cut: `translate` splits such a text, a caller of this cannot."""
        if self.max_source_len is not None:
            tokens = self.source_tokens(text, src_lang, tgt_lang)
            if tokens > self.max_source_len:
                raise SourceTooLong(tokens, self.max_source_len,
                                    "one row is one prompt here: Translator.translate splits a long text at "
                                    "sentence ends and translates it whole; or send shorter texts")
        return self._prompt_ids(text, src_lang, tgt_lang), self._one_line()

    def _prompt_ids(self, text: str, src_lang: str, tgt_lang: str) -> list[int]:
        """A row's unpadded prompt (a seq2seq model's encoder input), as `_inputs` builds it, its source within
        the limit already (split or checked)."""
        inputs = prompt_inputs(self.model.tokenizer, [text], src_lang, tgt_lang, self.model.family, self.prompt)
        return inputs["input_ids"][0].tolist()

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

    def _inputs(self, texts: list[str], srcs: list[str], tgts: list[str]) -> dict[str, torch.Tensor]:
        # No max_source_len: every source was split to fit it already, and a limit here would cut silently.
        inputs = prompt_inputs(self.model.tokenizer, texts, srcs, tgts, self.model.family, self.prompt)
        device = next(self.model.model.parameters()).device
        return {k: v.to(device) for k, v in inputs.items()}


def store_candidates(store: AdapterStore, cache: dict[str, tuple[tuple[int, int], dict[str, Any]]] | None = None
                     ) -> list[tuple[str, dict[str, Any]]]:
    """(name, header info) of each adapter file in `store`, for routing by its keys. `cache` (name →
    ((mtime_ns, size), info)) spares reading a file again until it changes. A file whose header cannot be
    read is no route: a row that names it fails when it is loaded, with the reason."""
    cache = {} if cache is None else cache
    found = []
    for name in store.names():
        try:
            path = store.path_for(name)
            stat = path.stat()
            stamp = (stat.st_mtime_ns, stat.st_size)
            if name not in cache or cache[name][0] != stamp:
                cache[name] = (stamp, read_adapter_info(path))
        except (AdapterError, OSError):
            cache.pop(name, None)
            continue
        found.append((name, cache[name][1]))
    return found

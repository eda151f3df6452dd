"""Generator: content from adapters — style transfer, dialogue and translation rows in one batch.

Each row has a task (its prompt: `data.TASK_TEMPLATES`) and an adapter; rows of different tasks
and adapters share one `generate` call over the backbone, routed per row by the bank.

    gen = Generator(model)
    gen.generate(["Thou shalt not kill."], adapter="style", task="style")       # ["You shall not murder."]
    gen.generate([["Hi!", "Hello.", "How are you?"]], task="dialogue")          # turns so far → the reply
    for piece in gen.stream("Hello, who are you?", adapter="chat"):             # pieces as tokens arrive
        print(piece, end="", flush=True)

Streaming runs `generate` in a worker thread feeding transformers' `TextIteratorStreamer`. The
worker runs in a copy of the caller's context, so routing set by an enclosing `model.using(...)`
reaches it. Pieces are tidied like `generate()`'s output (stripped, cut at the end of a one-line
reply), so the streamed pieces join to exactly the text `generate()` returns for that row.

Sources are never cut: in `generate`, a translate or style source over `max_source_len` tokens is
split at sentence ends (as `Translator` does), its pieces generated as rows of their own and their
outputs joined; a dialogue cannot be split, so a turn over the limit is refused (`SourceTooLong`),
as is any source over it in `stream` and `decoding_parts`, which take one prompt per row.
"""

from __future__ import annotations

import contextvars
import dataclasses
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError, SourceTooLong
from adaptkit.core.routing import match_adapter, per_row, route_by_keys
from adaptkit.data import (
    TASK_TEMPLATES,
    PromptFormat,
    Source,
    encode_decoder_example,
    pad_id,
    pad_sequences,
)
from adaptkit.generation.continuous import DecodingRow, decode_continuously, first_line_rule, unsupported
from adaptkit.segments import Segments, split_source
from adaptkit.tasks.oneline import LineDone, LineDoneWhere, Tidier, tidy

TASKS = tuple(TASK_TEMPLATES)  # translate, style, dialogue


@dataclass(frozen=True)
class Settings:
    """How to decode: greedy when `temperature` is 0, else sampling (with `top_p` / `top_k`, seeded by `seed`)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.num_beams < 1:
            raise ValueError("max_new_tokens and num_beams must be at least 1")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0, repetition_penalty > 0; got {self}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                      repetition_penalty=self.repetition_penalty, do_sample=self.sampling)
        if self.sampling:
            kwargs.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return kwargs


@dataclass(frozen=True)
class Row:
    """One input row, resolved: its source, task, adapter route and languages."""

    source: Source
    task: str
    route: Any
    src_lang: str
    tgt_lang: str


class Generator:
    """Style transfer, dialogue and translation with per-row adapters over one backbone.

    `prompts` maps a task to the `PromptFormat` its adapters were trained with (default:
    `PromptFormat.for_task(task, chat_template)`, what `ak.train(task=...)` uses). Seq2seq
    backbones get the bare source unless a prompt is given for the task.
    """

    def __init__(self, model: AdaptedModel, prompts: dict[str, PromptFormat] | None = None,
                 chat_template: bool = False, batch_size: int = 16, max_source_len: int | None = 256,
                 continuous: bool = True):
        if model.tokenizer is None:
            raise AdapterError("Generator needs the backbone's tokenizer: load it with ak.load(...), or set "
                               "model.tokenizer = AutoTokenizer.from_pretrained(...)")
        if model.family not in ("decoder", "seq2seq"):
            raise AdapterError(f"Generator writes text with decoder or seq2seq LMs; this backbone is {model.family}")
        unknown = sorted(set(prompts or {}) - set(TASKS))
        if unknown:
            raise AdapterError(f"prompts for unknown task(s) {unknown}; tasks are {list(TASKS)}")
        self.model = model
        self.prompts = dict(prompts or {})
        self.chat_template = chat_template
        self.batch_size = batch_size
        self.max_source_len = max_source_len
        self.continuous = continuous  # greedy rows: a continuous batch (generation/continuous.py)

    # -- routing --------------------------------------------------------------------------------
    def prompt_for(self, task: str) -> PromptFormat | None:
        if task in self.prompts:
            return self.prompts[task]
        return PromptFormat.for_task(task, self.chat_template) if self.model.family == "decoder" else None

    def adapter_for(self, task: str, src_lang: str | None = None, tgt_lang: str | None = None,
                    domain: str | None = None) -> str | None:
        """The loaded adapter whose file says it is for `task` (translation: also for the pair and domain)."""
        candidates = self._candidates()
        if task == "translate":
            return match_adapter([(n, m) for n, m in candidates if m.get("task") in (None, "translate")],
                                 src_lang or "", tgt_lang or "", domain)
        return next((n for n, m in candidates if m.get("task") == task), None)

    def _rows(self, texts: Sequence[Source], adapter: Any, task: Any, src_lang: Any, tgt_lang: Any) -> list[Row]:
        n = len(texts)
        routes = per_row(adapter, n, "adapter", stacks=True)
        tasks = per_row(task, n, "task")
        srcs, tgts = per_row(src_lang, n, "src_lang"), per_row(tgt_lang, n, "tgt_lang")
        rows = []
        for text, route, row_task, src, tgt in zip(texts, routes, tasks, srcs, tgts):
            meta = self._metadata(route)
            row_task = row_task or meta.get("task") or (self._only_task() if route == "auto" else None)
            if row_task is None:
                raise AdapterError(f"no task for the row routed to {route!r}: pass task=... ({', '.join(TASKS)}); "
                                   "adapters trained with ak.train(task=...) carry it in their file")
            if row_task not in TASKS:
                raise AdapterError(f"unknown task {row_task!r}; tasks are {list(TASKS)}")
            src = src or meta.get("src_lang") or "en"
            tgt = tgt or meta.get("tgt_lang") or src
            fix = "name one with adapter=..., or pass adapter=None for the bare backbone"
            if route == "auto" and row_task == "translate":  # the routing-key rule of Translator and the service
                route = route_by_keys([(n, m) for n, m in self._candidates() if m.get("task") in (None, "translate")],
                                      src, tgt, None, fix=f"Load an adapter with those routing keys, {fix}",
                                      where=f"adapter='auto', texts[{len(rows)}]: ")
            elif route == "auto":
                route = self.adapter_for(row_task, src, tgt)
                if route is None:
                    raise AdapterError(f"adapter='auto' found no loaded adapter for task {row_task!r}: load one "
                                       f"whose file has that task key, {fix}")
            rows.append(Row(text, row_task, route, src, tgt))
        return rows

    def _candidates(self) -> list[tuple[str, dict[str, Any]]]:
        return [(n, self.model.adapter_metadata(n)) for n in self.model.adapters]

    def _only_task(self) -> str | None:
        """The task of the loaded adapters when they all have the same one: then 'auto' needs no task."""
        tasks = {self.model.adapter_metadata(n).get("task") for n in self.model.adapters}
        return tasks.pop() if len(tasks) == 1 else None

    def _metadata(self, route: Any) -> dict[str, Any]:
        """Routing keys of a row's adapter (the top of a stack); none for 'auto', bare rows and store names."""
        name = route[-1] if isinstance(route, tuple) and route else route
        if isinstance(name, str) and name in self.model.adapters:
            return self.model.adapter_metadata(name)
        return {}

    # -- inputs and outputs ---------------------------------------------------------------------
    def _inputs(self, rows: Sequence[Row]) -> dict[str, torch.Tensor]:
        tokenizer = self.model.tokenizer
        ids = [self._prompt_ids(r) for r in rows]
        left = self.model.family == "decoder"  # decoder prompts end where generation starts
        device = next(self.model.model.parameters()).device
        return {"input_ids": pad_sequences(ids, pad_id(tokenizer), left).to(device),
                "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, left).to(device)}

    def _prompt_ids(self, row: Row) -> list[int]:
        """A row's unpadded prompt (a seq2seq model's encoder input). No truncation: every source was split or
        checked against max_source_len already; cutting here was silent."""
        if self.model.family == "decoder":
            return encode_decoder_example(self.model.tokenizer, row.source, None, row.src_lang, row.tgt_lang,
                                          self.prompt_for(row.task))[0]["input_ids"]
        return self.model.tokenizer(self._seq2seq_text(row))["input_ids"]

    # -- the source limit: split where the task allows, else refuse; never cut ------------------------
    def source_tokens(self, row: Row) -> int:
        """What `max_source_len` limits: a decoder's source tokens (of a dialogue, its longest turn; the prompt
        around them is not counted), a seq2seq model's whole input with its special tokens."""
        tokenizer = self.model.tokenizer
        if self.model.family == "decoder":
            turns = [row.source] if isinstance(row.source, str) else list(row.source)
            return max((len(tokenizer(turn, add_special_tokens=False)["input_ids"]) for turn in turns), default=0)
        return len(tokenizer(self._seq2seq_text(row))["input_ids"])

    def _segments(self, row: Row) -> Segments:
        """A translate or style row in pieces within the limit (most in one); a dialogue is checked whole."""
        if self.max_source_len is None:
            return Segments([row.source], [])
        if row.task == "dialogue" or not isinstance(row.source, str):
            self._check_length(row, "a dialogue cannot be split: shorten its longest turn")
            return Segments([row.source], [])
        return split_source(row.source, lambda piece: self.source_tokens(dataclasses.replace(row, source=piece)),
                            self.max_source_len, self.model.tokenizer)

    def _check_length(self, row: Row, fix: str) -> None:
        if self.max_source_len is not None:
            tokens = self.source_tokens(row)
            if tokens > self.max_source_len:
                raise SourceTooLong(tokens, self.max_source_len, f"{fix}, or raise max_source_len")

    def _seq2seq_text(self, row: Row) -> str:
        prompt = self.prompt_for(row.task)
        if prompt is not None:
            return prompt.prompt_text(row.source, row.src_lang, row.tgt_lang)
        return row.source if isinstance(row.source, str) else "\n".join(row.source)

    def _one_line(self, task: str) -> bool:
        """A decoder prompted for a one-line reply is done at its first newline (else a base model rambles on)."""
        prompt = self.prompt_for(task)
        return self.model.family == "decoder" and prompt is not None and "\n" not in prompt.target

    def _generate_kwargs(self, rows: Sequence[Row], inputs: dict[str, torch.Tensor], settings: Settings,
                         *extra_stops: StoppingCriteria) -> dict[str, Any]:
        tokenizer = self.model.tokenizer
        kwargs = settings.generate_kwargs()
        if tokenizer.pad_token_id is None:
            kwargs["pad_token_id"] = tokenizer.eos_token_id
        stops = list(extra_stops)
        one_line = [self._one_line(r.task) for r in rows]
        if any(one_line):
            stops.append(LineDoneWhere(LineDone(tokenizer, inputs["input_ids"].shape[1]), one_line))
        if stops:
            kwargs["stopping_criteria"] = StoppingCriteriaList(stops)
        return kwargs

    def _run(self, inputs: dict[str, torch.Tensor], routes: list[Any], seed: int | None,
             **kwargs: Any) -> torch.Tensor:
        """`generate` under a seed of its own: the caller's random state is given back afterwards."""
        device = inputs["input_ids"].device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            return self.model.generate(**inputs, adapter=routes, **kwargs)

    # -- the API --------------------------------------------------------------------------------
    def generate(self, texts: Sequence[Source], adapter: Any = "auto", task: Any = None, *,
                 src_lang: Any = None, tgt_lang: Any = None, max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, num_beams: int = 1, repetition_penalty: float = 1.0,
                 seed: int | None = None, progress: bool = False) -> list[str]:
        """One output per text. A dialogue text may be a list of turns (oldest first, the user's last).

        `adapter` and `task` may be given per row (a list). `adapter="auto"` takes, per row, the
        loaded adapter whose file names the row's task; `None` is the bare backbone. A row without a
        task takes its adapter's (with 'auto': the loaded adapters', when they all have the same task).
        Languages default to the adapter's routing keys, then English. Greedy when `temperature` is 0;
        sampling is seeded per call by `seed`.
        """
        settings = Settings(max_new_tokens, temperature, top_p, top_k, num_beams, repetition_penalty, seed)
        rows = self._rows(texts, adapter, task, src_lang, tgt_lang)
        pieces = [self._segments(row) for row in rows]  # long sources split: each piece is a row of its own
        answers = iter(self._decode([dataclasses.replace(row, source=text) for row, segments in zip(rows, pieces)
                                     for text in segments.texts], settings, progress))
        return [segments.join([next(answers) for _ in segments.texts]) for segments in pieces]

    def _decode(self, rows: list[Row], settings: Settings, progress: bool) -> list[str]:
        """One output per row, each row's source within the limit."""
        out = [""] * len(rows)
        with tqdm(total=len(rows), desc="generating", unit="row", disable=not progress) as bar:
            static = list(range(len(rows)))
            if self._continuous_for(settings):
                static = self._generate_continuously(rows, settings.max_new_tokens, out, bar.update)
            static.sort(key=lambda i: len(str(rows[i].source)))  # similar lengths batch together: less padding
            for start in range(0, len(static), self.batch_size):
                indices = static[start:start + self.batch_size]
                chunk = [rows[i] for i in indices]
                inputs = self._inputs(chunk)
                generated = self._run(inputs, [r.route for r in chunk], settings.seed,
                                      **self._generate_kwargs(chunk, inputs, settings))
                if self.model.family == "decoder":
                    generated = generated[:, inputs["input_ids"].shape[1]:]
                decoded = self.model.tokenizer.batch_decode(generated, skip_special_tokens=True)
                for i, text, r in zip(indices, decoded, chunk):
                    out[i] = tidy(text, self._one_line(r.task))
                bar.update(len(indices))
        return out

    def _continuous_for(self, settings: Settings) -> bool:
        """Plain greedy search, on a backbone whose greedy search the engine copies."""
        return (self.continuous and not settings.sampling and settings.num_beams == 1
                and settings.repetition_penalty == 1.0 and unsupported(self.model) is None)

    def _generate_continuously(self, rows: Sequence[Row], max_new_tokens: int, out: list[str],
                               progress: Callable[[int], Any]) -> list[int]:
        """Decode the rows in a continuous batch; returns the indices of rows too long for the backbone's
        sliding window, left for generate."""
        stop = first_line_rule(self.model.tokenizer)
        decoding = [DecodingRow(self._prompt_ids(row), row.route, max_new_tokens,
                                stop if self._one_line(row.task) else None, tag=i) for i, row in enumerate(rows)]

        def done(row: DecodingRow) -> None:
            out[row.tag] = tidy(self.model.tokenizer.decode(row.tokens, skip_special_tokens=True), row.stop is not None)
            progress(1)

        return [row.tag for row in decode_continuously(self.model, decoding, self.batch_size, done)]

    def decoding_parts(self, text: Source, adapter: Any, task: Any, src_lang: Any, tgt_lang: Any
                       ) -> tuple[list[int], bool]:
        """One row as `generate` prompts it, for continuous batching: its unpadded prompt ids (a seq2seq
        backbone's encoder input), and whether its reply ends at the first line (the text is then `tidy`'s
        first line). One row is one prompt, so a source over `max_source_len` tokens is refused with
        `SourceTooLong`, never cut."""
        row = self._rows([text], adapter, task, src_lang, tgt_lang)[0]
        self._check_length(row, "one row is one prompt here: Generator.generate splits a long translate or style "
                                "source at sentence ends; or send shorter texts")
        return self._prompt_ids(row), self._one_line(row.task)

    def stream(self, text: Source, adapter: Any = "auto", task: str | None = None, *, src_lang: str | None = None,
               tgt_lang: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
               top_k: int = 0, num_beams: int = 1, repetition_penalty: float = 1.0,
               seed: int | None = None) -> Iterator[str]:
        """Pieces of one row's output as its tokens are generated; they join to `generate([text], ...)[0]`.

        Generation runs in a worker thread. Stop iterating early and the worker stops at its next token.
        """
        settings = Settings(max_new_tokens, temperature, top_p, top_k, num_beams, repetition_penalty, seed)
        if settings.num_beams > 1:
            raise AdapterError("streaming writes one continuation as it goes, and beam search only knows its best "
                               "one at the end: use num_beams=1, or generate()")
        rows = self._rows([text], adapter, task, src_lang, tgt_lang)  # errors here, in the caller's thread
        self._check_length(rows[0], "a stream is one prompt: generate() splits a long translate or style source "
                                    "at sentence ends; or send a shorter text")
        return self._stream(rows, settings)

    def _stream(self, rows: list[Row], settings: Settings) -> Iterator[str]:
        inputs = self._inputs(rows)
        # skip_prompt: generate first hands the streamer the prompt (decoder) or the decoder start (seq2seq)
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancelled = threading.Event()
        kwargs = self._generate_kwargs(rows, inputs, settings, Cancelled(cancelled))
        failure: list[BaseException] = []

        def work() -> None:
            try:
                self._run(inputs, [rows[0].route], settings.seed, streamer=streamer, **kwargs)
            except BaseException as error:  # noqa: BLE001 - handed to the consumer's thread below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="adaptkit-stream",
                                  daemon=True)
        worker.start()
        tidier = Tidier(self._one_line(rows[0].task))
        try:
            for piece in streamer:
                new = tidier.feed(piece)
                if new:
                    yield new
            if failure:
                raise failure[0]
            new = tidier.finish()
            if new:
                yield new
        finally:
            cancelled.set()
            worker.join()


class Cancelled(StoppingCriteria):
    """Stops every row once the consumer of a stream has gone."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)

"""Continuous batching: greedy decoding in which rows join and leave the running batch between steps.

A static batch runs until its longest row is done: finished rows keep computing, requests that
arrive meanwhile wait for the whole batch, and every prompt is padded to the longest one. Here,
as in Orca's iteration-level scheduling (what vLLM and TGI do), a row leaves at the step it
finishes and waiting rows join at the next step:

    join:  prefill the newcomers, in length-sorted chunks (little padding) ──┐
                                                                              ├─► one KV cache, left-padded
           the running rows' cache ───────────────────────────────────────────┘
    step:  one token for every row, each under its own adapter; finished rows leave the cache

Every row's tokens get the positions and the attention they would get alone (padding is masked,
positions count a row's own tokens), so each row's output is the one `generate` gives that row
alone; the tests check it. Only greedy search on decoder-only backbones runs here (`unsupported`
says why not otherwise): beams, sampling, logits processors and encoder-decoders stay with
`generate`.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache

from adaptkit.core.bank import AdaptedModel
from adaptkit.core.routing import AdapterSpec

# GenerationConfig fields that make `generate`'s greedy search more than an argmax of the logits.
_PROCESSING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
               "min_new_tokens": 0, "forced_bos_token_id": None, "forced_eos_token_id": None,
               "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
               "exponential_decay_length_penalty": None, "guidance_scale": None, "watermarking_config": None}


@dataclass(eq=False)
class DecodingRow:
    """One row to decode: its prompt ids, adapter and budget; `tokens` fills as it runs."""

    prompt: Sequence[int]
    adapter: AdapterSpec
    max_new_tokens: int
    stop: Callable[[list[int]], bool] | None = None  # a stop rule on the written ids, besides eos and the budget
    tag: Any = None  # the caller's handle for the row
    on_token: Callable[[int], None] | None = None  # called with each token as it is written (streaming)
    tokens: list[int] = field(default_factory=list)
    error: Exception | None = None  # what its stop rule or on_token raised: the row ended there, alone


def line_written(text: str) -> bool:
    """A one-line answer is complete: a newline after something other than leading whitespace."""
    return "\n" in text.lstrip()


def first_line_rule(tokenizer: Any) -> Callable[[list[int]], bool]:
    """The stop rule of a one-line answer, on the ids written so far."""
    return lambda ids: line_written(tokenizer.decode(ids, skip_special_tokens=True))


def unsupported(model: AdaptedModel) -> str | None:
    """Why this backbone cannot decode continuously (None: it can)."""
    if not isinstance(model, AdaptedModel):  # e.g. a peft model wrapped for the benchmark's comparisons
        return f"continuous batching routes rows through an AdaptedModel; got {type(model).__name__}"
    if model.family != "decoder":
        return f"continuous batching runs decoder-only backbones; this one is {model.family}"
    config = model.model.generation_config
    for name, neutral in _PROCESSING.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return f"the backbone's generation config sets {name}={value!r}, which greedy search applies"
    return None


class ContinuousBatch:
    """Rows decoding together over one model; `add` lets rows join, `step` writes one token per row.

    Both return the rows that finished. Not thread-safe: one worker thread owns it.
    """

    def __init__(self, model: AdaptedModel, max_padding: float = 0.25):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        self.max_padding = max_padding  # a prefill chunk pads at most this share of its tokens
        config = model.model.generation_config
        eos = config.eos_token_id
        self.eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        pad = config.pad_token_id if config.pad_token_id is not None else (min(self.eos) if self.eos else 0)
        self.pad_id = pad[0] if isinstance(pad, (list, tuple)) else pad
        probe = DynamicCache(config=model.model.config)
        windows = [layer.sliding_window for layer in probe.layers if getattr(layer, "is_sliding", False)]
        # A row's cache must stay inside every sliding window: past it the cache drops columns, which
        # the left-padded layout cannot follow. Rows that would not fit go to `generate` instead.
        self.max_row_tokens = min(windows) - 1 if windows else None
        parameters = inspect.signature(model.model.forward).parameters
        self._keep_one_logit = "logits_to_keep" in parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.x
        self.rows: list[DecodingRow] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # (rows, cache columns): 1 where a row has a token
        self.lengths = torch.zeros(0, dtype=torch.long)  # each row's own tokens in the cache
        self.next_ids = torch.zeros(0, dtype=torch.long)  # each row's token to feed at the next step
        self._routing = contextlib.ExitStack()  # the running rows' adapters, held while the rows stay the same
        self._routed_rows: list[DecodingRow] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def adapters(self) -> frozenset[str]:
        names: set[str] = set()
        for row in self.rows:
            spec = row.adapter
            names.update((spec,) if isinstance(spec, str) else spec or ())
        return frozenset(names)

    def fits(self, row: DecodingRow) -> bool:
        """Whether the row's prompt and budget stay within the backbone's sliding windows."""
        return self.max_row_tokens is None or len(row.prompt) + row.max_new_tokens <= self.max_row_tokens

    # -- joining -----------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, rows: Sequence[DecodingRow]) -> list[DecodingRow]:
        """Prefill `rows` and make them part of the batch; returns those done after their first token."""
        for row in rows:
            if not self.fits(row):
                raise ValueError(f"a row of {len(row.prompt)} prompt tokens and max_new_tokens={row.max_new_tokens}"
                                 f" passes the backbone's sliding window ({self.max_row_tokens + 1} tokens)")
            if not row.prompt or row.max_new_tokens < 1:
                raise ValueError("a row needs a non-empty prompt and max_new_tokens >= 1")
        parts = [self._prefill(chunk) for chunk in self._chunks(rows)]
        finished = []
        joining: list[tuple[list[DecodingRow], DynamicCache, torch.Tensor]] = []
        for chunk, cache, mask, first in parts:
            keep = [i for i, row in enumerate(chunk) if not self._append(row, int(first[i]))]
            finished += [row for i, row in enumerate(chunk) if i not in keep]
            if keep:
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                joining.append(([chunk[i] for i in keep], cache, mask[index]))
        if joining:
            self._merge(joining)
        return finished

    def _chunks(self, rows: Sequence[DecodingRow]) -> list[list[DecodingRow]]:
        """Rows sorted by prompt length, cut where padding to the chunk's longest would pass max_padding."""
        chunks: list[list[DecodingRow]] = []
        for row in sorted(rows, key=lambda r: len(r.prompt)):
            chunk = chunks[-1] if chunks else None
            if chunk is not None:
                tokens = sum(len(r.prompt) for r in chunk) + len(row.prompt)
                if len(row.prompt) * (len(chunk) + 1) <= tokens * (1 + self.max_padding):
                    chunk.append(row)
                    continue
            chunks.append([row])
        return chunks

    def _prefill(self, chunk: list[DecodingRow]) -> tuple[list[DecodingRow], DynamicCache, torch.Tensor, torch.Tensor]:
        width = max(len(row.prompt) for row in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, width - len(row.prompt):] = torch.tensor(list(row.prompt))
            mask[i, width - len(row.prompt):] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate counts them: own tokens only
        cache = DynamicCache(config=self.model.model.config)
        with self.model.using([row.adapter for row in chunk]):
            first = self._greedy(ids, mask, positions, cache)
        return chunk, cache, mask, first

    def _merge(self, joining: list[tuple[list[DecodingRow], DynamicCache, torch.Tensor]]) -> None:
        """One cache for the running rows and the newcomers: left-pad every part to the longest, stack the rows,
        and drop the leading columns that are padding in every row."""
        parts = ([(self.rows, self.cache, self.mask)] if self.rows else []) + joining
        width = max(mask.shape[1] for _, _, mask in parts)
        mask = torch.cat([_pad_left(m, width) for _, _, m in parts])
        start = int((mask.cumsum(-1) == 0).sum(-1).min())  # columns that are padding in every row
        merged = DynamicCache(config=self.model.model.config)
        for index, layer in enumerate(merged.layers):
            sources = [cache.layers[index] for _, cache, _ in parts]
            if not all(source.is_initialized for source in sources):
                continue  # a layer that shares another's cache holds none of its own
            keys = torch.cat([_pad_left(source.keys, width, dim=2) for source in sources])[:, :, start:]
            values = torch.cat([_pad_left(source.values, width, dim=2) for source in sources])[:, :, start:]
            layer.update(keys, values)
        self.cache = merged
        self.mask = mask[:, start:]
        self.rows = [row for rows, _, _ in parts for row in rows]
        self.lengths = torch.tensor([len(row.prompt) + len(row.tokens) - 1 for row in self.rows])
        self.next_ids = torch.tensor([row.tokens[-1] for row in self.rows])

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[DecodingRow]:
        """One token for every running row; returns the rows that finished (they leave the batch)."""
        if not self.rows:
            return []
        if self.max_row_tokens is not None and self.mask.shape[1] + 1 > self.max_row_tokens:
            self._merge([])  # rows have left since the last join: drop the columns no row uses any more
        mask = torch.cat([self.mask, torch.ones(len(self.rows), 1, dtype=torch.long)], dim=1)
        self._route()
        next_ids = self._greedy(self.next_ids[:, None], mask, self.lengths[:, None], self.cache)
        self.mask, self.lengths, self.next_ids = mask, self.lengths + 1, next_ids
        done = [i for i, row in enumerate(self.rows) if self._append(row, int(next_ids[i]))]
        finished = [self.rows[i] for i in done]
        self.remove(finished)
        return finished

    def remove(self, rows: Sequence[DecodingRow]) -> None:
        """Drop rows from the batch (finished, or their client went away)."""
        gone = {id(row) for row in rows}
        keep = [i for i, row in enumerate(self.rows) if id(row) not in gone]
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, dtype=torch.long)
        if keep and self.cache is not None:
            self.cache.batch_select_indices(index)
        else:
            self.cache = None
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.lengths, self.next_ids = self.mask[index], self.lengths[index], self.next_ids[index]
        if not self.rows:
            self.close()

    def close(self) -> None:
        """Release the held routing (and with it the adapters' pins)."""
        self._routing.close()
        self._routed_rows = None

    def _route(self) -> None:
        """Hold one routing while the row set stays the same: per-call caches (LoRA's gathered stacks) are
        then built once per row set, not once per token."""
        if self._routed_rows is not None and self._routed_rows == self.rows:
            return
        self.close()
        self._routing.enter_context(self.model.using([row.adapter for row in self.rows]))
        self._routed_rows = list(self.rows)

    def _greedy(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                cache: DynamicCache) -> torch.Tensor:
        """Each row's next token: the argmax of its last position's logits, in float32 as generate takes them."""
        kwargs: dict[str, Any] = {self._cache_argument: cache, "use_cache": True}
        if self._keep_one_logit:
            kwargs["logits_to_keep"] = 1
        device = next(self.model.model.parameters()).device
        output = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), **kwargs)
        return output.logits[:, -1, :].float().argmax(-1).cpu()

    def _append(self, row: DecodingRow, token: int) -> bool:
        """Add the token; True when the row is done. A row whose own callbacks raise ends with `error` set:
        one bad row must not fail the others that share its step."""
        row.tokens.append(token)
        try:
            if row.on_token is not None:
                row.on_token(token)
            return (token in self.eos or len(row.tokens) >= row.max_new_tokens
                    or (row.stop is not None and row.stop(row.tokens)))
        except Exception as error:  # noqa: BLE001 — kept on the row, reported to its caller alone
            row.error = error
            return True


def decode_continuously(model: AdaptedModel, rows: Sequence[DecodingRow], max_rows: int,
                        on_done: Callable[[DecodingRow], None]) -> list[DecodingRow]:
    """Decode the rows in a continuous batch of at most `max_rows`, calling `on_done` as each finishes; returns
    the rows too long for the backbone's sliding window, untouched (for `generate`).

    Waiting rows join once a quarter of the places are free (or nothing runs): each join then prefills
    several rows, and the cache is merged less often."""
    engine = ContinuousBatch(model)
    waiting: collections.deque[DecodingRow] = collections.deque()
    too_long: list[DecodingRow] = []
    for row in rows:
        (waiting if engine.fits(row) else too_long).append(row)
    enough = max(1, max_rows // 4)
    try:
        while waiting or len(engine):
            finished = []
            free = max_rows - len(engine)
            if waiting and (not len(engine) or free >= enough):
                finished += engine.add([waiting.popleft() for _ in range(min(free, len(waiting)))])
            finished += engine.step()
            for row in finished:
                if row.error is not None:  # its stop rule raised: the library caller sees why
                    raise row.error
                on_done(row)
    finally:
        engine.remove(list(engine.rows))
        engine.close()
    return too_long


def _pad_left(tensor: torch.Tensor, width: int, dim: int = 1) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

"""Continuous batching: greedy decoding in which rows join and leave the running batch between steps.

A static batch runs until its longest row is done: finished rows keep computing, requests that
arrive meanwhile wait for the whole batch, and every prompt is padded to the longest one. Here,
as in Orca's iteration-level scheduling (what vLLM and TGI do), a row leaves at the step it
finishes and waiting rows join at the next step:

    join:  prefill the newcomers, in length-sorted chunks (little padding), into free slots of the cache
    step:  one token for every row, each under its own adapter; finished rows free their slots

Each row owns a slot of a preallocated key/value cache (`slots.py`) in which its tokens sit at their own
positions: a join writes only the newcomers' slots, never copies a running row's keys and values.
Encoder–decoders (Marian, M2M100, (m)BART, T5) run too: a join encodes the newcomers and runs their
first decoder step, keeping each row's cross-attention keys in its slot of a second cache (its encoder
mask beside it); steps give each row its own decoder positions (`seq2seq.py`).

Every row's tokens get the positions and the attention they would get alone (padding is masked,
positions count a row's own tokens), so each row's output is the one `generate` gives that row
alone; the tests check it. Only greedy search runs here, with the generation config's forced and
banned tokens copied (`rules.py`); `unsupported` says why not otherwise: beams, sampling, other
logits processors and other architectures stay with `generate`.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import DynamicCache, EncoderDecoderCache

from adaptkit.core.bank import AdaptedModel
from adaptkit.core.routing import AdapterSpec
from adaptkit.generation.rules import TokenRules, config_unsupported
from adaptkit.generation.seq2seq import own_positions, positions_unsupported
from adaptkit.generation.slots import SLOT_LAYERS, SlotCache


@dataclass(eq=False)
class DecodingRow:
    """One row to decode: its prompt ids (a seq2seq row's: the encoder's), adapter and budget; `tokens` fills
    as it runs."""

    prompt: Sequence[int]
    adapter: AdapterSpec
    max_new_tokens: int
    stop: Callable[[list[int]], bool] | None = None  # a stop rule on the written ids, besides eos and the budget
    tag: Any = None  # the caller's handle for the row
    on_token: Callable[[int], None] | None = None  # called with each token as it is written (streaming)
    first_token: int | None = None  # forced first token, as generate's forced_bos_token_id (a target language)
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
    if model.family not in ("decoder", "seq2seq"):
        return f"continuous batching runs decoder-only and encoder-decoder backbones; this one is {model.family}"
    config = model.model.generation_config
    if model.family == "decoder":
        layers = {type(layer).__name__ for layer in DynamicCache(config=model.model.config).layers
                  if not isinstance(layer, SLOT_LAYERS)}
        if layers:
            return f"continuous batching holds full and sliding-window attention caches; this backbone has {layers}"
    else:
        reason = positions_unsupported(model.model)
        if reason is not None:
            return reason
        if not isinstance(_decoder_start(config), int):
            return f"the backbone's decoder start token is {_decoder_start(config)!r}, not one id"
    return config_unsupported(config)


def _decoder_start(config: Any) -> Any:
    """The id every seq2seq row's decoder starts from, as generate takes it (its bos when unset)."""
    start = config.decoder_start_token_id
    return start if start is not None else config.bos_token_id


class ContinuousBatch:
    """Rows decoding together over one model; `add` lets rows join, `step` writes one token per row.

    Both return the rows that finished. `max_rows` and `max_tokens` size the cache (a row holds its prompt
    and budget; a seq2seq row its source, and its budget beside it): a batch that outgrows them grows it,
    which copies the running rows' keys once (`copies`). Not thread-safe: one worker thread owns it.
    """

    def __init__(self, model: AdaptedModel, max_padding: float = 0.25, max_rows: int = 8, max_tokens: int = 256):
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        self.max_padding = max_padding  # a prefill chunk pads at most this share of its tokens
        config = model.model.generation_config
        self.rules = TokenRules.of(config)
        self.eos = set(self.rules.eos)
        pad = config.pad_token_id if config.pad_token_id is not None else (min(self.eos) if self.eos else 0)
        self.pad_id = pad[0] if isinstance(pad, (list, tuple)) else pad
        self.seq2seq = model.family == "seq2seq"
        self.start_id = _decoder_start(config) if self.seq2seq else None
        probe = DynamicCache(config=model.model.config)
        windows = [layer.sliding_window for layer in probe.layers if getattr(layer, "is_sliding", False)]
        # A row's cache must stay inside every sliding window: past it generate's cache drops columns (and
        # the mask, computed for the batch's newest column, would hide a shorter row's own keys). Rows that
        # would not fit go to `generate` instead.
        self.max_row_tokens = min(windows) - 1 if windows else None
        if self.seq2seq:
            layers = sum(1 for site in model.arch.attentions if site.stack == "decoder" and site.kind == "self")
            self.cache = SlotCache(max_rows, max_tokens, layers=layers)
            self.cross: SlotCache | None = SlotCache(max_rows, max_tokens, layers=layers)
        else:
            self.cache = SlotCache(max_rows, max_tokens, like=probe)
            self.cross = None
        parameters = inspect.signature(model.model.forward).parameters
        self._keep_logits = "logits_to_keep" in parameters
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.x
        self.slots: list[DecodingRow | None] = []  # slot i's row (None: free); no free slot at the end
        self._slot: dict[int, int] = {}  # id(row) → its slot
        self._length: list[int] = []  # per slot: the row's tokens in the (decoder self-attention) cache
        self._source: list[int] = []  # per slot: a seq2seq row's encoder tokens
        self.steps = 0  # decoding steps run
        self._routing = contextlib.ExitStack()  # the slots' adapters, held while the slots stay the same
        self._routed: list[DecodingRow | None] | None = None

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def rows(self) -> list[DecodingRow]:
        return [row for row in self.slots if row is not None]

    @property
    def adapters(self) -> frozenset[str]:
        names: set[str] = set()
        for row in self.rows:
            spec = row.adapter
            names.update((spec,) if isinstance(spec, str) else spec or ())
        return frozenset(names)

    @property
    def width(self) -> int:
        """Cache columns the running rows use (the longest row's tokens)."""
        return max((self._length[i] for i, row in enumerate(self.slots) if row is not None), default=0)

    def fits(self, row: DecodingRow) -> bool:
        """Whether the row's prompt and budget stay within the backbone's sliding windows."""
        return self.max_row_tokens is None or len(row.prompt) + row.max_new_tokens <= self.max_row_tokens

    # -- joining -----------------------------------------------------------------------------------
    @torch.no_grad()
    def add(self, rows: Sequence[DecodingRow]) -> list[DecodingRow]:
        """Prefill `rows` into free slots; returns those done after their first token."""
        for row in rows:
            if not self.fits(row):
                raise ValueError(f"a row of {len(row.prompt)} prompt tokens and max_new_tokens={row.max_new_tokens}"
                                 f" passes the backbone's sliding window ({self.max_row_tokens + 1} tokens)")
            if not row.prompt or row.max_new_tokens < 1:
                raise ValueError("a row needs a non-empty prompt and max_new_tokens >= 1")
        if not rows:
            return []
        free = [i for i, row in enumerate(self.slots) if row is None]
        free += range(len(self.slots), len(self.slots) + len(rows) - len(free))
        taken = free[:len(rows)]
        running, top = len(self) > 0, max(taken) + 1
        if self.cross is not None:  # the decoder holds its start and all written tokens but the last
            self.cache.reserve(top, max(row.max_new_tokens for row in rows), running)
            self.cross.reserve(top, max(len(row.prompt) for row in rows), running)
        else:
            self.cache.reserve(top, max(len(row.prompt) + row.max_new_tokens - 1 for row in rows), running)
        grow = top - len(self.slots)
        self.slots += [None] * grow
        self._length += [0] * grow
        self._source += [0] * grow
        for slot, row in zip(taken, rows):
            self.slots[slot], self._slot[id(row)] = row, slot
            self._length[slot] = 1 if self.seq2seq else len(row.prompt)
            self._source[slot] = len(row.prompt) if self.seq2seq else 0
        try:
            firsts = [(chunk, self._prefill(chunk)) for chunk in self._chunks(rows)]
        except BaseException:
            self._free(rows)  # none of them joined (and none wrote a token): each may be tried again
            raise
        finished = [row for chunk, first in firsts for row, token in zip(chunk, first) if self._append(row, token)]
        self._free(finished)
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

    def _prefill(self, chunk: list[DecodingRow]) -> list[int]:
        """The chunk's prompts, right-padded (a row's tokens at its own positions, as in its slot) → first tokens."""
        width = max(len(row.prompt) for row in chunk)
        ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, :len(row.prompt)] = torch.tensor(list(row.prompt))
            mask[i, :len(row.prompt)] = 1
        device = self._device()
        slots = torch.tensor([self._slot[id(row)] for row in chunk], device=device)
        self.cache.prefill(slots)
        if self.cross is not None:
            self.cross.prefill(slots)
            kwargs: dict[str, Any] = {
                "input_ids": ids.to(device), "attention_mask": mask.to(device),
                "decoder_input_ids": torch.full((len(chunk), 1), self.start_id, dtype=torch.long, device=device),
                self._cache_argument: EncoderDecoderCache(self.cache, self.cross)}
        else:
            last = mask.sum(-1) - 1
            kwargs = {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                      "position_ids": torch.arange(width).expand(len(chunk), -1).to(device),
                      self._cache_argument: self.cache}
            if self._keep_logits:
                kwargs["logits_to_keep"] = last[:, None].to(device)  # each row's own last position
        with self.model.using([row.adapter for row in chunk]):
            logits = self.model(use_cache=True, **kwargs).logits
        if self.cross is None and not self._keep_logits:
            logits = logits[torch.arange(len(chunk)), last.to(logits.device)][:, None]
        return self.rules.pick(logits[:, -1, :].float(), chunk, [self._prefix(row) for row in chunk])

    # -- decoding ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[DecodingRow]:
        """One token for every running row; returns the rows that finished (they leave the batch)."""
        if not len(self):
            return []
        # Every slot below the last taken one computes: a free one (a row left) as a one-token dummy row.
        slots = self.slots
        lengths = torch.tensor([self._length[i] if row is not None else 0 for i, row in enumerate(slots)])
        ids = torch.tensor([[row.tokens[-1] if row is not None else self.pad_id] for row in slots])
        width = int(lengths.max()) + 1
        mask = (torch.arange(width)[None, :] <= lengths[:, None]).long()  # its own tokens and the new one
        device = self._device()
        self.cache.decode(lengths.to(device), width)
        self._route()
        if self.cross is not None:
            sources = torch.tensor([max(n, 1) if row is not None else 1 for n, row in zip(self._source, slots)])
            self.cross.show(len(slots), int(sources.max()))
            source_mask = (torch.arange(int(sources.max()))[None, :] < sources[:, None]).long()
            # The cross-attention keys are in the cache: the encoder output is only read for its shape.
            stand_in = torch.zeros((), dtype=self.model.model.dtype, device=device).expand(
                len(slots), source_mask.shape[1], self.model.model.config.hidden_size)
            cache = EncoderDecoderCache(self.cache, self.cross)
            with own_positions(self.model.model, lengths, ids, width):
                logits = self.model(decoder_input_ids=ids.to(device), decoder_attention_mask=mask.to(device),
                                    attention_mask=source_mask.to(device), encoder_outputs=(stand_in,),
                                    use_cache=True, **{self._cache_argument: cache}).logits
        else:
            kwargs: dict[str, Any] = {self._cache_argument: self.cache, "use_cache": True}
            if self._keep_logits:
                kwargs["logits_to_keep"] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=lengths[:, None].to(device), **kwargs).logits
        tokens = self.rules.pick(logits[:, -1, :].float(), slots,
                                 [self._prefix(row) if row is not None else 0 for row in slots])
        self.steps += 1
        finished = []
        for i, row in enumerate(slots):
            if row is not None:
                self._length[i] += 1
                if self._append(row, tokens[i]):
                    finished.append(row)
        self._free(finished)
        return finished

    def remove(self, rows: Sequence[DecodingRow]) -> None:
        """Drop rows from the batch (finished, or their client went away)."""
        self._free(rows)

    def _free(self, rows: Sequence[DecodingRow]) -> None:
        for row in rows:
            slot = self._slot.pop(id(row), None)
            if slot is not None:
                self.slots[slot] = None
        while self.slots and self.slots[-1] is None:
            self.slots.pop()
            self._length.pop()
            self._source.pop()
        if not self.slots:
            self.close()

    def close(self) -> None:
        """Release the held routing (and with it the adapters' pins)."""
        self._routing.close()
        self._routed = None

    def _route(self) -> None:
        """Hold one routing while the slots stay the same: per-call caches (LoRA's gathered stacks) are then
        built once per row set, not once per token."""
        if self._routed is not None and self._routed == self.slots:
            return
        self.close()
        self._routing.enter_context(self.model.using([row.adapter if row is not None else None
                                                      for row in self.slots]))
        self._routed = list(self.slots)

    def _device(self) -> torch.device:
        return next(self.model.model.parameters()).device

    def _prefix(self, row: DecodingRow) -> int:
        """The row's decoder input before its first written token: the prompt, or a seq2seq decoder's start."""
        return 1 if self.seq2seq else len(row.prompt)

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
    several rows, and a step computes few free slots. The cache is sized for the longest row up front."""
    tokens = max((len(row.prompt) + row.max_new_tokens for row in rows), default=1)
    engine = ContinuousBatch(model, max_rows=max_rows, max_tokens=tokens)
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

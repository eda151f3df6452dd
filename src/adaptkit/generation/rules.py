"""What `generate`'s greedy search does besides an argmax of the logits, for the generation configs the
continuous batch copies; `config_unsupported` names the settings it does not copy.

generate builds logits processors from the backbone's generation config; three are common in translation
checkpoints (Marian's opus-mt sets `bad_words_ids=[[pad]]` and `forced_eos_token_id`, mBART-50 and BART
`forced_eos_token_id`, M2M100 and mBART-50 users `forced_bos_token_id`), and are copied here:

    bad_words_ids (one-token words)  those tokens never win, as NoBadWordsLogitsProcessor (eos exempt)
    forced_bos_token_id              the first token, when the decoder input so far is one token long
    forced_eos_token_id              the last token the budget allows (the smallest id, if several)

In generate's order: the forced ones overwrite every score, and eos is applied after bos.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch


class RowState(Protocol):
    """What the rules read of a row (the engine's `DecodingRow`): declared here so this module needs no import
    of the engine that imports it."""

    first_token: int | None
    tokens: list[int]
    max_new_tokens: int

# GenerationConfig fields (and their neutral values) that make greedy search more than the rules below.
_PROCESSING = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
               "suppress_tokens": None, "begin_suppress_tokens": None, "sequence_bias": None,
               "exponential_decay_length_penalty": None, "guidance_scale": None, "watermarking_config": None}


def _ids(value: Any) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]


def config_unsupported(config: Any) -> str | None:
    """Why greedy search under this generation config is not `TokenRules` and an argmax (None: it is)."""
    for name, neutral in _PROCESSING.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            return f"the backbone's generation config sets {name}={value!r}, which greedy search applies"
    longer = [word for word in getattr(config, "bad_words_ids", None) or [] if len(word) != 1]
    if longer:
        return (f"the backbone's generation config bans token sequences {longer} (bad_words_ids), which greedy "
                "search applies as they are written")
    return None


@dataclass(frozen=True)
class TokenRules:
    eos: frozenset[int]
    banned: tuple[int, ...] = ()
    forced_bos: int | None = None
    forced_eos: int | None = None

    @classmethod
    def of(cls, config: Any) -> TokenRules:
        eos = frozenset(_ids(config.eos_token_id))
        banned = sorted({word[0] for word in getattr(config, "bad_words_ids", None) or []} - eos)
        forced_eos = _ids(getattr(config, "forced_eos_token_id", None))
        return cls(eos, tuple(banned), getattr(config, "forced_bos_token_id", None),
                   min(forced_eos) if forced_eos else None)

    def pick(self, logits: torch.Tensor, rows: Sequence[RowState | None], prefixes: Sequence[int]) -> list[int]:
        """Each row's next token from its float32 logits [rows, vocab]; `prefixes`: each row's decoder input
        before its first written token (the prompt; a seq2seq row's decoder start)."""
        if self.banned:
            logits[:, list(self.banned)] = float("-inf")
        tokens = logits.argmax(-1).tolist()
        for i, row in enumerate(rows):
            if row is None:
                continue
            bos = row.first_token if row.first_token is not None else self.forced_bos
            if bos is not None and not row.tokens and prefixes[i] == 1:
                tokens[i] = bos
            if self.forced_eos is not None and len(row.tokens) == row.max_new_tokens - 1:
                tokens[i] = self.forced_eos
        return tokens

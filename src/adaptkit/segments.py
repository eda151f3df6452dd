"""Long sources, split, never cut: a text over a prompt's token limit becomes consecutive pieces that each fit
(sentence ends first, then words, then tokens), translated as rows of their own and joined back."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from adaptkit.core.errors import SourceTooLong
from adaptkit.data import Source

# Where a sentence ends: white space after . ! ? … (or after one closing quote or bracket behind them),
# after a CJK full stop, and every line break.
_SENTENCE_GAP = re.compile(r"(?:(?<=[.!?…])|(?<=[.!?…][\"'”’»)\]]))\s+|(?<=[。！？])\s*|\s*\n\s*")
_WORD_GAP = re.compile(r"\s+")


@dataclass(frozen=True)
class Segments:
    """A text in pieces that each fit a token limit; `join` puts their answers back together."""

    texts: list[Source]  # a dialogue (a list of turns) is never split: one piece
    joiners: list[str]  # joiners[i] goes between the answers of texts[i] and texts[i + 1]

    def join(self, answers: Sequence[str]) -> str:
        out = answers[0]
        for joiner, answer in zip(self.joiners, answers[1:]):
            out = joiner.join(part for part in (out, answer) if part)  # an empty answer adds no joiner
        return out


def split_source(text: str, length: Callable[[str], int], limit: int, tokenizer: Any = None) -> Segments:
    """`text` whole when `length(text) <= limit`; else in consecutive pieces that each fit, as long as fit.

    Pieces end at sentence ends and line breaks; a sentence too long alone is cut between words, a word
    too long alone between tokens (`tokenizer`'s offsets; characters without a fast tokenizer). Answers
    are joined by a line break where the source had one between the pieces, else by a space (nothing
    inside a word). Raises SourceTooLong if not even one token fits (a prompt's fixed part over the limit).
    """
    if length(text) <= limit:
        return Segments([text], [])

    def fits(start: int, end: int) -> bool:
        return length(text[start:end]) <= limit

    def too_long(span: tuple[int, int]) -> list[tuple[int, int]]:
        raise SourceTooLong(length(text), limit, "not even one token of it fits beside the prompt: raise "
                                                 "max_source_len")

    def tokens(span: tuple[int, int]) -> list[tuple[int, int]]:
        return _pack(_token_spans(text, span, tokenizer), fits, too_long)

    def words(span: tuple[int, int]) -> list[tuple[int, int]]:
        return _pack(_spans_between(text, span, _WORD_GAP), fits, tokens)

    spans = _pack(_spans_between(text, (0, len(text)), _SENTENCE_GAP), fits, words)
    gaps = [text[end:start] for (_, end), (start, _) in zip(spans, spans[1:])]
    return Segments([text[a:b] for a, b in spans],
                    ["\n" if "\n" in gap else " " if gap else "" for gap in gaps])


def _spans_between(text: str, span: tuple[int, int], gaps: re.Pattern) -> list[tuple[int, int]]:
    """The non-empty stretches of `text[span]` between matches of `gaps`, as (start, end) offsets."""
    spans, at = [], span[0]
    for gap in gaps.finditer(text, span[0], span[1]):
        if gap.start() > at:
            spans.append((at, gap.start()))
        at = max(at, gap.end())
    if at < span[1]:
        spans.append((at, span[1]))
    return spans


def _token_spans(text: str, span: tuple[int, int], tokenizer: Any) -> list[tuple[int, int]]:
    start, piece = span[0], text[span[0]:span[1]]
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        cuts = sorted({begin for begin, _ in offsets if 0 < begin < len(piece)})
    else:
        cuts = list(range(1, len(piece)))
    bounds = [0, *cuts, len(piece)]
    return [(start + a, start + b) for a, b in zip(bounds, bounds[1:])]


def _pack(spans: list[tuple[int, int]], fits: Callable[[int, int], bool],
          finer: Callable[[tuple[int, int]], list[tuple[int, int]]]) -> list[tuple[int, int]]:
    """Consecutive spans merged greedily into pieces that fit (the longest run found by bisection: a few
    tokenizer calls per piece, not one per span); a span that does not fit alone goes to `finer`."""
    out, i = [], 0
    while i < len(spans):
        if not fits(*spans[i]):
            out.extend(finer(spans[i]))
            i += 1
            continue
        low, high = i, len(spans) - 1
        while low < high:
            middle = (low + high + 1) // 2
            if fits(spans[i][0], spans[middle][1]):
                low = middle
            else:
                high = middle - 1
        out.append((spans[i][0], spans[low][1]))
        i = low + 1
    return out

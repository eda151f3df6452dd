"""One-line answers: when a decoder's reply is done, and what text it returns.

A decoder prompted for a one-line target (`Translate … :\\n{src}\\nGerman:` + ` {tgt}`) would
otherwise write on until `max_new_tokens`. `LineDone` stops a row at the first line end after
something was written (`continuous.line_written`, the engine's rule); `tidy` returns the text the
way every path does (`generate`, the continuous batch, the service, a stream through `Tidier`).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import StoppingCriteria

from adaptkit.generation.continuous import line_written


def tidy(text: str, one_line: bool) -> str:
    """Generated text as returned: stripped, and cut at the first line end when the reply is one line."""
    text = text.strip()
    return text.split("\n", 1)[0].rstrip() if one_line else text


class Tidier:
    """Raw streamed text in, the new part of `tidy(everything so far)` out.

    Trailing whitespace is held back until text follows it (it may end the reply), so each piece
    extends what was sent: the pieces join to `tidy(raw)`, exactly `generate()`'s output.
    """

    def __init__(self, one_line: bool):
        self.one_line = one_line
        self.raw = ""
        self.sent = ""

    def feed(self, piece: str) -> str:
        self.raw += piece
        return self._advance(tidy(self.raw, self.one_line))

    def finish(self) -> str:
        return self._advance(tidy(self.raw, self.one_line))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent):  # cannot happen (see the class doc); fail loudly if it ever does
            raise RuntimeError(f"streamed text diverged: sent {self.sent!r}, now {text!r}")
        new, self.sent = text[len(self.sent):], text
        return new


class LineDone(StoppingCriteria):
    """A row is done once it has written a non-empty line and then a newline.

    (`stop_strings=["\\n"]` would stop a model that starts its answer on a new line before it said anything.)
    """

    def __init__(self, tokenizer: Any, prompt_length: int):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length:], skip_special_tokens=True)
        return torch.tensor([line_written(text) for text in texts], device=input_ids.device)


class LineDoneWhere(StoppingCriteria):
    """`LineDone` for the rows whose reply is one line; the others run to EOS or max_new_tokens."""

    def __init__(self, line_done: LineDone, rows: list[bool]):
        self.line_done = line_done
        self.rows = torch.tensor(rows, dtype=torch.bool)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        # generate repeats each row for its beams, consecutively
        rows = self.rows.repeat_interleave(input_ids.shape[0] // len(self.rows)).to(input_ids.device)
        return self.line_done(input_ids, scores, **kwargs) & rows

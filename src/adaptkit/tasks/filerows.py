"""Lines of a text or JSONL file → routed rows → translated lines, one line out per line in.

A text line is one source; a JSONL line is an object with `text` (or `src`) and, optionally,
`src_lang`, `tgt_lang`, `domain`, `adapter`. Blank lines stay blank in the output, so line N of
the output is the translation of line N of the input. Each row goes to the adapter named for
it (`use`, or the JSONL row's `adapter`), else to the one whose routing keys fit its language
pair and domain: the rule of `Translator` and of the HTTP service (`core.routing.route_by_keys`). A
line over the source limit is translated whole, in pieces (`Translator`), never cut.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from adaptkit.core.adapterfile import AdapterStore, read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.core.routing import route_by_keys
from adaptkit.tasks.translate import Translator, store_candidates

Candidates = list[tuple[str, dict[str, Any]]]  # (adapter name, its file's metadata)


@dataclass(frozen=True)
class ModelSpec:
    """Where a worker gets its backbone and adapters: picklable, so every process builds its own."""

    backbone: str
    store: str | None = None  # adapter store: rows routed over every adapter in it
    adapter_files: tuple[str, ...] = ()  # or these files
    dtype: str | None = None
    device: str | None = None
    quantize: str | None = None  # "int8" / "nf4" / "int8-dynamic": the backbone's Linear weights (core/quantize.py)
    max_resident: int | None = None

    def __post_init__(self) -> None:
        if bool(self.store) == bool(self.adapter_files):
            raise AdapterError("give an adapter store or adapter files (one of them)")

    def candidates(self) -> Candidates:
        """(name, metadata) of every adapter rows may be routed to, read from the file headers."""
        if self.adapter_files:
            found = []
            for path in self.adapter_files:
                info = read_adapter_info(path)
                found.append((info.get("name") or Path(path).stem, info))  # the name load_adapter gives it
            return found
        return store_candidates(AdapterStore(self.store))

    def load(self, candidates: Candidates, device: str | None = None) -> AdaptedModel:
        """The backbone, with the adapter files loaded under the names `candidates` gives them."""
        model = AdaptedModel.from_pretrained(self.backbone, store=self.store, max_resident=self.max_resident,
                                             dtype=self.dtype, device=device or self.device, quantize=self.quantize)
        for path, (name, _) in zip(self.adapter_files, candidates):
            model.load_adapter(path, name)
        return model


@dataclass(frozen=True)
class RowSettings:
    """How lines are read and translated; everything here changes the output (a resumed run checks it)."""

    format: Literal["text", "jsonl"] = "text"
    src_lang: str | None = None
    tgt_lang: str | None = None
    domain: str | None = None
    use: str | None = None  # every row to this adapter (with one adapter file: that one)
    num_beams: int = 1
    max_new_tokens: int = 128
    batch_size: int = 16


def parse_line(line: str, number: int, settings: RowSettings) -> dict[str, Any] | None:
    """A row with `text`, `src_lang`, `tgt_lang`, `domain` (and what else a JSONL row holds); None for blank."""
    line = line.rstrip("\r\n")
    if not line.strip():
        return None
    defaults = {"src_lang": settings.src_lang, "tgt_lang": settings.tgt_lang, "domain": settings.domain}
    if settings.format == "text":
        row = {"text": line, **defaults}
    else:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise AdapterError(f"line {number} is not JSON: {error}") from None
        if not isinstance(record, dict):
            raise AdapterError(f"line {number} is not a JSON object")
        text = record.get("text", record.get("src"))
        if not isinstance(text, str):
            raise AdapterError(f"line {number} has no 'text' (or 'src') string")
        row = {**record, "text": text, **{k: record.get(k) or v for k, v in defaults.items()}}
    if not (row["src_lang"] and row["tgt_lang"]):
        raise AdapterError(f"line {number} has no language pair: give --src and --tgt, or src_lang / tgt_lang in "
                           "each JSONL row")
    return row


def route_row(row: dict[str, Any], number: int, candidates: Candidates, forced: str | None) -> str:
    """The adapter of one row: forced, named by the row, or matched by routing keys (as the service does)."""
    name = forced or row.get("adapter") or route_by_keys(
        candidates, row["src_lang"], row["tgt_lang"], row.get("domain"), where=f"line {number}: ",
        fix="Add an adapter with those routing keys, give --use NAME, or name one in the row ('adapter' in JSONL)")
    if name not in {known for known, _ in candidates}:
        raise AdapterError(f"line {number}: no adapter named {name!r}; known: {sorted(n for n, _ in candidates)}")
    return name


def format_row(row: dict[str, Any] | None, route: str | None, translation: str, settings: RowSettings) -> str:
    """The output line (without its newline): blank for a blank input line."""
    if row is None:
        return ""
    if settings.format == "text":
        return translation.replace("\r", " ").replace("\n", " ")
    return json.dumps({**row, "translation": translation, "adapter": route}, ensure_ascii=False)


class LineTranslator:
    """One backbone and its adapters, translating lists of lines; what each worker process holds."""

    def __init__(self, spec: ModelSpec, settings: RowSettings, candidates: Candidates | None = None,
                 device: str | None = None, threads: int | None = None):
        if threads is not None:
            torch.set_num_threads(threads)
        self.settings = settings
        self.candidates = spec.candidates() if candidates is None else candidates
        model = spec.load(self.candidates, device)
        single = len(spec.adapter_files) == 1  # one adapter file: every row uses it, whatever its routing keys
        self.forced = settings.use or (self.candidates[0][0] if single else None)
        self.translator = Translator(model, batch_size=settings.batch_size)

    def translate_lines(self, lines: Sequence[str], first_number: int = 1, progress: bool = False) -> list[str]:
        """One output line per input line; `first_number` is the line number of `lines[0]` (for errors)."""
        rows = [parse_line(line, first_number + i, self.settings) for i, line in enumerate(lines)]
        routes: list[str | None] = [None if row is None else route_row(row, first_number + i, self.candidates,
                                                                       self.forced)
                                    for i, row in enumerate(rows)]
        todo = [i for i, row in enumerate(rows) if row is not None]
        todo.sort(key=lambda i: routes[i] or "")  # one adapter's rows together: fewer loads when few are resident
        outputs = self.translator.translate([rows[i]["text"] for i in todo], [rows[i]["src_lang"] for i in todo],
                                            [rows[i]["tgt_lang"] for i in todo], adapter=[routes[i] for i in todo],
                                            num_beams=self.settings.num_beams,
                                            max_new_tokens=self.settings.max_new_tokens, progress=progress)
        translations = [""] * len(rows)
        for i, text in zip(todo, outputs):
            translations[i] = text
        return [format_row(row, route, text, self.settings) for row, route, text in zip(rows, routes, translations)]

"""Back-translation: a reverse adapter (de→en) turns monolingual target-language text into synthetic
sources, giving (synthetic en, real de) pairs to train the forward adapter (en→de) on.

    mono.txt (de) ──Translator(reverse adapter)──▶ out/chunks/00000.jsonl, 00001.jsonl, …
                                                    └─▶ out/train.jsonl   (when every chunk is done)

Rows: `src` (generated), `tgt` (the monolingual line), `src_lang` / `tgt_lang` (the reverse adapter's
pair swapped), `domain`, `ref` (line number in the input), `synthetic: true` — the columns of the
corpora `adaptkit corpus build` writes, so `load_pairs(out)` / `datasets.load_dataset("json", ...)` read it.

With `drop_degenerate`, sources that are no translation of their line — empty, far longer than it, or
a loop of repeated words, the ways a briefly trained reverse adapter fails — stay in the chunks but
go to `out/dropped.jsonl` (with the reason) instead of `train.jsonl`.

Resumable: each chunk of `chunk_size` lines is translated and then written atomically; a run that was
killed starts again after its last whole chunk, and (greedy decoding, the same batches) writes what an
uninterrupted run would have. `out/manifest.json` records what the output is made from — the input
lines' hash, the adapter file's hash, the backbone, the settings — and a run over a directory made
from anything else is refused rather than mixing two corpora.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.atomicfile import write_atomic
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.data import PromptFormat
from adaptkit.tasks.translate import Translator

MANIFEST = "manifest.json"
CORPUS = "train.jsonl"
FORMAT = 1


class BacktranslationError(AdapterError):
    """The output directory belongs to another run, or the input cannot be back-translated; says the fix."""


@dataclass(frozen=True)
class BacktranslationResult:
    corpus: Path  # out/train.jsonl
    rows: int
    chunks: int
    reused_chunks: int  # chunks a previous (killed) run had finished
    translated_rows: int  # rows this run generated
    dropped_rows: int = 0  # degenerate sources left out of the corpus (drop_degenerate)


def degenerate(source: str, target: str, max_length_ratio: float = 2.5) -> str | None:
    """Why a synthetic `source` cannot be a translation of `target`, or None: empty; a loop — fewer than
    half of its word trigrams distinct, over 8 or more; or over `max_length_ratio` times the line's words
    (and at least 6 more: short lines vary a lot)."""
    words, target_words = source.split(), target.split()
    if not words:
        return "empty"
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(trigrams) >= 8 and len(set(trigrams)) < len(trigrams) / 2:
        return "repeats itself"
    if len(words) > max_length_ratio * len(target_words) and len(words) - len(target_words) >= 6:
        return f"{len(words)} words for a {len(target_words)}-word line"
    return None


def read_monolingual(path: str | Path, limit: int | None = None) -> list[str]:
    """Lines of a text file (blank ones skipped), or the `text` (else `tgt`) of each JSONL row."""
    path = Path(path)
    lines: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if limit is not None and len(lines) >= limit:
                break
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                row = json.loads(line)
                text = row.get("text", row.get("tgt"))
                if not isinstance(text, str):
                    raise BacktranslationError(f"{path.name} line {number} has no 'text' (or 'tgt') string")
                lines.append(text.strip())
            else:
                lines.append(line.strip())
    if not lines:
        raise BacktranslationError(f"{path} holds no text to back-translate")
    return lines


def backtranslate(model: AdaptedModel, adapter: str | Path, texts: Sequence[str], out: str | Path, *,
                  batch_size: int = 16, chunk_size: int | None = None, max_new_tokens: int = 128,
                  num_beams: int = 1, progress: bool = True, drop_degenerate: bool = False,
                  max_length_ratio: float = 2.5,
                  on_chunk: Callable[[int], None] | None = None) -> BacktranslationResult:
    """Translate `texts` (target-language monolingual text) with the reverse adapter file `adapter`
    into the synthetic corpus `out/train.jsonl`, a chunk at a time, continuing a killed run.
    `drop_degenerate`: rows whose source `degenerate()` rejects go to `out/dropped.jsonl` instead (the
    filter applies when the corpus is assembled, so it may change between reruns of one directory).
    `on_chunk(number)` is called after each chunk is on disk."""
    if not texts:
        raise BacktranslationError("no monolingual text to back-translate")
    chunk_size = chunk_size or 4 * batch_size
    if chunk_size % batch_size:
        # a chunk of whole batches: a resumed run then batches every row as an uninterrupted one did
        raise BacktranslationError(f"chunk_size ({chunk_size}) must be a multiple of batch_size ({batch_size})")
    out = Path(out)
    adapter = Path(adapter)
    info = read_adapter_info(adapter)
    reverse_src, reverse_tgt = info.get("src_lang"), info.get("tgt_lang")
    if not (reverse_src and reverse_tgt):
        raise BacktranslationError(f"{adapter.name} names no language pair (src_lang / tgt_lang): train the reverse "
                                   "adapter on pairs with language columns, or with --src-lang / --tgt-lang")
    manifest = {
        "format": FORMAT, "rows": len(texts), "input_sha256": _hash_lines(texts),
        "adapter_sha256": hashlib.sha256(adapter.read_bytes()).hexdigest(), "backbone": model.backbone_id,
        "reverse_pair": f"{reverse_src}-{reverse_tgt}",
        "settings": {"batch_size": batch_size, "chunk_size": chunk_size, "max_new_tokens": max_new_tokens,
                     "num_beams": num_beams},
    }
    name = _free_name(model, f"backtranslate/{adapter.stem}")
    model.load_adapter(adapter, name=name)  # first: a file that does not fit the backbone claims no directory
    try:
        _claim(out, manifest)
        result = _run(model, name, info, texts, out, manifest, batch_size=batch_size, num_beams=num_beams,
                      max_new_tokens=max_new_tokens, progress=progress, on_chunk=on_chunk)
    finally:
        model.remove_adapter(name)  # the bank as it was found
    return _assemble(out, manifest, result, max_length_ratio if drop_degenerate else None)


def _run(model: AdaptedModel, name: str, info: dict[str, Any], texts: Sequence[str], out: Path,
         manifest: dict[str, Any], *, batch_size: int, num_beams: int, max_new_tokens: int, progress: bool,
         on_chunk: Callable[[int], None] | None) -> BacktranslationResult:
    chunk_size = manifest["settings"]["chunk_size"]
    reverse_src, reverse_tgt = info["src_lang"], info["tgt_lang"]
    training = info.get("training") or {}
    prompt = PromptFormat.from_training(training) if model.family == "decoder" else None
    translator = Translator(model, prompt=prompt, batch_size=batch_size,
                            max_source_len=training.get("max_source_len", 256))
    row_base = {"src_lang": reverse_tgt, "tgt_lang": reverse_src, "domain": info.get("domain")}
    chunks = out / "chunks"
    starts = range(0, len(texts), chunk_size)
    reused = translated = 0
    bar = tqdm(total=len(texts), desc="back-translating", unit="row", disable=not progress)
    for number, start in enumerate(starts):
        lines = texts[start:start + chunk_size]
        path = chunks / f"{number:05d}.jsonl"
        if _finished(path, lines):
            reused += 1
        else:
            # Batches of similar length: less padding, and a batch is not held up by one long line.
            order = sorted(range(len(lines)), key=lambda i: (len(lines[i]), i))
            ordered = translator.translate([lines[i] for i in order], reverse_src, reverse_tgt, adapter=name,
                                           num_beams=num_beams, max_new_tokens=max_new_tokens)
            sources = [""] * len(lines)
            for i, text in zip(order, ordered):
                sources[i] = text
            rows = [{"src": src, "tgt": tgt, **row_base, "ref": str(start + i), "synthetic": True}
                    for i, (src, tgt) in enumerate(zip(sources, lines))]
            write_atomic(path, _jsonl(rows))
            translated += len(lines)
            if on_chunk is not None:
                on_chunk(number)
        bar.update(len(lines))
    bar.close()
    return BacktranslationResult(out / CORPUS, len(texts), len(starts), reused, translated)


def _assemble(out: Path, manifest: dict[str, Any], result: BacktranslationResult,
              max_length_ratio: float | None) -> BacktranslationResult:
    """train.jsonl from every chunk, in input order; with a ratio, degenerate rows go to dropped.jsonl."""
    rows = [json.loads(line) for n in range(result.chunks)
            for line in (out / "chunks" / f"{n:05d}.jsonl").read_text(encoding="utf-8").splitlines()]
    kept, dropped = [], []
    for row in rows:
        reason = degenerate(row["src"], row["tgt"], max_length_ratio) if max_length_ratio is not None else None
        if reason is None:
            kept.append(row)
        else:
            dropped.append({**row, "dropped": reason})
    write_atomic(out / CORPUS, _jsonl(kept))
    if max_length_ratio is not None:
        write_atomic(out / "dropped.jsonl", _jsonl(dropped))
    record = {**manifest, "complete": True, "corpus_rows": len(kept),
              "filter": {"drop_degenerate": max_length_ratio is not None, "max_length_ratio": max_length_ratio,
                         "dropped_rows": len(dropped)}}
    write_atomic(out / MANIFEST, json.dumps(record, indent=2).encode() + b"\n")
    return dataclasses.replace(result, dropped_rows=len(dropped))


def _hash_lines(texts: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\n")
    return digest.hexdigest()


def _claim(out: Path, manifest: dict[str, Any]) -> None:
    """Start `out`, or continue it if it was started from the same input, adapter, backbone and settings."""
    path = out / MANIFEST
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = [key for key in manifest if before.get(key) != manifest[key]]
        if changed:
            what = {"input_sha256": "the monolingual input", "rows": "the monolingual input (its line count)",
                    "adapter_sha256": "the adapter file", "backbone": "the backbone",
                    "settings": "the generation settings", "reverse_pair": "the adapter's language pair",
                    "format": "the output format"}
            names = ", ".join(dict.fromkeys(what.get(key, key) for key in changed))
            raise BacktranslationError(f"{out} holds a back-translation of other data: {names} changed since it "
                                       "was started. Write to a new --out directory, or delete this one to start "
                                       "over")
        return
    if out.exists() and any(out.iterdir()):
        raise BacktranslationError(f"{out} is not empty and is no back-translation output (no {MANIFEST}); "
                                   "give an empty or new --out directory")
    write_atomic(path, json.dumps({**manifest, "complete": False}, indent=2).encode() + b"\n")


def _finished(path: Path, lines: Sequence[str]) -> bool:
    """A chunk on disk holds one row per line of its slice of the input, in order (writes are atomic, so a
    chunk is whole or absent; this also catches one edited by hand)."""
    if not path.is_file():
        return False
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except json.JSONDecodeError:
        return False
    return [row.get("tgt") for row in rows] == list(lines)


def _free_name(model: AdaptedModel, name: str) -> str:
    """`name`, or `name#2`, `name#3`, … : the file is loaded beside whatever the bank holds."""
    taken, number, candidate = set(model.adapters), 1, name
    while candidate in taken:
        number += 1
        candidate = f"{name}#{number}"
    return candidate


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")

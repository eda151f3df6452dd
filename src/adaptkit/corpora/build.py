"""The registry of corpora and `build_corpus`: builder → clean, dedupe, split → jsonl + card."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from adaptkit.corpora.bible import build_bible, build_bible_style
from adaptkit.corpora.chatterbot import build_chatterbot
from adaptkit.corpora.common import SPLITS, CorpusError, Subset, dedupe, split_of
from adaptkit.corpora.libreoffice import build_libreoffice_help, build_libreoffice_ui

# --- the registry of corpora ------------------------------------------------------------


@dataclass(frozen=True)
class CorpusSpec:
    name: str
    what: str
    source: str
    licence: str
    licence_text: str
    eval_fraction: float  # per split; sized so dev and test get >= 500 where possible
    has_langs: bool = False


MPL = ("Mozilla Public License 2.0 (MPL-2.0), https://mozilla.org/MPL/2.0/ — "
       "LibreOffice, © The Document Foundation and contributors. Source form of this data: "
       "https://git.libreoffice.org/")
PD = ("Public domain. King James Version (1769), Reina-Valera 1909 and the World English "
      "Bible are not under copyright; SWORD modules by CrossWire (crosswire.org).")
BSD = ("BSD 3-Clause licence, Copyright (c) 2016 Gunther Cox — chatterbot-corpus, "
       "https://github.com/gunthercox/chatterbot-corpus")

CORPORA: dict[str, CorpusSpec] = {
    s.name: s
    for s in [
        CorpusSpec("libreoffice-help", "LibreOffice help paragraphs (software documentation)",
                   "Debian libreoffice-help-en-us + libreoffice-help-<lang>", "MPL-2.0", MPL,
                   0.025, has_langs=True),
        CorpusSpec("libreoffice-ui", "LibreOffice UI strings (software interface)",
                   "Debian libreoffice-l10n-<lang> (.mo)", "MPL-2.0", MPL, 0.035,
                   has_langs=True),
        CorpusSpec("bible", "Bible verses, KJV ↔ Reina-Valera 1909",
                   "Debian sword-text-kjv + sword-text-sparv (SWORD zText)",
                   "public domain", PD, 0.025),
        CorpusSpec("bible-style", "Bible verses, KJV (archaic) → WEB (modern English)",
                   "Debian sword-text-kjv + sword-text-web (SWORD zText)",
                   "public domain", PD, 0.025),
        CorpusSpec("chatterbot", "chatterbot dialogue pairs, previous turn → reply",
                   "PyPI chatterbot-corpus (YAML)", "BSD-3-Clause", BSD, 0.1,
                   has_langs=True),
    ]
}

_BUILDERS = {
    "libreoffice-help": build_libreoffice_help,
    "libreoffice-ui": build_libreoffice_ui,
    "bible": build_bible,
    "bible-style": build_bible_style,
    "chatterbot": build_chatterbot,
}


def write_subset(subset: Subset, out: Path, spec: CorpusSpec) -> dict[str, int]:
    """Clean-dedupe-split one subset into `out/<key>/{split}.jsonl`; returns counts."""
    pairs = dedupe(subset.pairs)
    target = out / subset.key
    target.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(SPLITS, 0)
    files = {s: (target / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    try:
        for src, tgt, ref in pairs:
            split = split_of(src, spec.eval_fraction)
            row = {"src": src, "tgt": tgt, "src_lang": subset.src_lang,
                   "tgt_lang": subset.tgt_lang, "domain": subset.domain, "ref": ref}
            files[split].write(json.dumps(row, ensure_ascii=False) + "\n")
            counts[split] += 1
    finally:
        for f in files.values():
            f.close()
    counts["raw"] = len(subset.pairs)
    return counts


def _card(spec: CorpusSpec, counts: dict[str, dict[str, int]]) -> str:
    lines = [f"# {spec.name}", "", spec.what, "", f"Source: {spec.source}.", "",
             f"Licence: {spec.licence_text}", "",
             "Built by `adaptkit corpus build`. Cleaning: markup, `<note>`/`<title>`, `¶`, "
             "accelerators and printf codes stripped; empty, untranslated (source == target) "
             "and duplicate pairs dropped. Split by a hash of the source "
             f"(dev and test {spec.eval_fraction:.1%} of hash space each).", "",
             "| subset | raw pairs | train | dev | test |", "|---|---:|---:|---:|---:|"]
    for key, c in counts.items():
        lines.append(f"| {key} | {c['raw']:,} | {c['train']:,} | {c['dev']:,} | {c['test']:,} |")
    return "\n".join(lines) + "\n"


def build_corpus(name: str, out: str | Path, langs: Iterable[str] | None = None,
                 work_dir: str | Path | None = None) -> dict[str, dict[str, int]]:
    """Build corpus `name` into `out`; returns subset → split → count."""
    if name not in CORPORA:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    spec, builder = CORPORA[name], _BUILDERS[name]
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=f"adaptkit-{name}-", dir=work_dir) as tmp:
        subsets = builder(Path(tmp), langs) if (spec.has_langs and langs) else builder(Path(tmp))
    counts = {s.key: write_subset(s, out, spec) for s in subsets}
    (out / "README.md").write_text(_card(spec, counts), encoding="utf-8")
    return counts

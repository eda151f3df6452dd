"""Bible verses from SWORD zText modules (Debian sword-text-*), aligned by verse id."""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

from adaptkit.corpora.common import CorpusError, Subset, clean_markup, fetch_debs

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

"""LibreOffice help (HTML paragraphs by id) and UI strings (gettext .mo), English ↔ <lang>."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from html.parser import HTMLParser
from pathlib import Path

from tqdm.auto import tqdm

from adaptkit.corpora.common import CorpusError, Subset, clean_markup, clean_ui, fetch_debs

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

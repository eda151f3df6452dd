"""The `adaptkit` command: one subcommand per job, each defined beside the code it drives."""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.errors import AdapterError

# (module, function that adds its subcommands); modules are imported when the command runs,
# so `adaptkit --help` stays fast and nothing loads torch models at import time.
SUBCOMMANDS = [
    ("adaptkit.cli.zoo", "add_zoo_commands"),
    ("adaptkit.cli.corpus", "add_corpus_commands"),
    ("adaptkit.cli.train", "add_train_commands"),
    ("adaptkit.cli.demo", "add_demo_command"),
    ("adaptkit.cli.bench", "add_bench_commands"),
    ("adaptkit.cli.generate", "add_generate_command"),
    ("adaptkit.cli.serve", "add_serve_command"),
    ("adaptkit.cli.translate", "add_translate_command"),
    ("adaptkit.cli.augment", "add_augment_commands"),
]


def _info(args: argparse.Namespace) -> int:
    """The file's metadata as JSON, `"verified": true` once its checksum matched; a bad file is one line."""
    try:
        info = read_adapter_info(args.path)
    except AdapterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaptkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="verify an adapter file's checksum and show its metadata")
    info.add_argument("path")
    info.set_defaults(func=_info)
    for module_name, function in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        getattr(module, function)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

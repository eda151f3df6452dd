"""`adaptkit zoo list|fetch NAME` — mounted by cli/__init__.py, or run as `python -m adaptkit.cli.zoo`."""

from __future__ import annotations

import argparse
import sys
import time

from adaptkit.cli import main as adaptkit_main
from adaptkit.zoo import ZOO, ZooError, fetch, list_zoo, model_dir


def zoo_cli_list(args: argparse.Namespace | None = None) -> int:
    rows = list_zoo()
    print(f"{'name':<14} {'params':>7}  {'licence':<20} {'cached':<6} what")
    for r in rows:
        print(f"{r['name']:<14} {r['params']:>7}  {r['licence']:<20} "
              f"{'yes' if r['cached'] else 'no':<6} {r['what']}")
    return 0


def zoo_cli_fetch(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        path = fetch(args.name, force=args.force, use_hub=not args.no_hub)
    except ZooError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name}: {path} ({time.perf_counter() - start:.1f} s)")
    return 0


def add_zoo_commands(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `zoo list` and `zoo fetch NAME` under an existing subparsers object."""
    zoo = subparsers.add_parser("zoo", help="named backbones obtainable offline")
    _add_actions(zoo)
    return zoo


def _add_actions(zoo: argparse.ArgumentParser) -> None:
    sub = zoo.add_subparsers(dest="zoo_command", required=True)
    sub.add_parser("list", help="list zoo models").set_defaults(func=zoo_cli_list)
    f = sub.add_parser("fetch", help="download/build a zoo model into the cache")
    f.add_argument("name", choices=sorted(ZOO))
    f.add_argument("--force", action="store_true", help="rebuild even if cached")
    f.add_argument("--no-hub", action="store_true", help="skip the Hugging Face Hub")
    f.set_defaults(func=zoo_cli_fetch)
    p = sub.add_parser("path", help="print the cache directory of a zoo model")
    p.add_argument("name", choices=sorted(ZOO))
    p.set_defaults(func=lambda a: print(model_dir(a.name)) or 0)


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.zoo list` = `adaptkit zoo list`."""
    return adaptkit_main(["zoo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

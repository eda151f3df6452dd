"""`adaptkit bench efficiency` — mounted by cli/__init__.py, or run as `python -m adaptkit.cli.bench bench efficiency`.

Every `BenchConfig` field is a flag (`budget_steps` → `--budget-steps`; lists are comma-separated,
`--lrs` is `family=lr,...`); a `--config` TOML/YAML file (optionally under `[bench]`) gives the base
values and flags override it. `--corpus libreoffice-help --pair en-de` names the first domain (the
shipped sample `libreoffice-help-en-de`), `--second bible-en-es` the second (`none`: one domain).

    adaptkit bench efficiency --backbone gemma3-270m --corpus libreoffice-help --pair en-de --budget-steps 30
    adaptkit bench efficiency --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any

from adaptkit.bench.runner import BenchConfig, quick_config


def _list(text: str) -> list[str]:
    return [] if text.strip().lower() in ("", "none") else [t.strip() for t in text.split(",") if t.strip()]


def _lrs(text: str) -> dict[str, float]:
    pairs = [item.split("=", 1) for item in _list(text)]
    if any(len(p) != 2 for p in pairs):
        raise argparse.ArgumentTypeError(f"--lrs takes family=lr pairs, e.g. lora=5e-4,full=5e-5; got {text!r}")
    return {k: float(v) for k, v in pairs}


def _optional(text: str) -> str | None:
    return None if text.strip().lower() in ("", "none") else text


def _flag_type(name: str, annotation: Any) -> Any:
    if name == "lrs":
        return _lrs
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = type(None) in typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        annotation = args[0]
    if typing.get_origin(annotation) is list:
        return _list
    if annotation is str and optional:
        return _optional
    return annotation


def add_bench_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per BenchConfig field, defaults SUPPRESSed so only given flags override the config file."""
    hints = typing.get_type_hints(BenchConfig)
    for field in dataclasses.fields(BenchConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = _flag_type(field.name, hints[field.name])
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if kind is bool:
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"(default: {default})")
        else:
            parser.add_argument(flag, dest=field.name, type=kind, default=argparse.SUPPRESS,
                                help=f"(default: {default})")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    from adaptkit.training.trainer import read_config_file

    values: dict[str, Any] = {}
    if args.config:
        data = read_config_file(args.config)
        values.update(data.get("bench", data))
    names = {f.name for f in dataclasses.fields(BenchConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    if "domains" not in values and (args.corpus or args.pair or args.second is not None):
        corpus = args.corpus or "libreoffice-help"
        first = f"{corpus}-{args.pair or 'en-de'}"
        second = args.second if args.second is not None else "bible-en-es"
        values["domains"] = [first] + ([second] if second.lower() != "none" else [])
    return quick_config(**values) if args.quick else BenchConfig.from_dict(values)


def efficiency_command(args: argparse.Namespace) -> int:
    from adaptkit.bench.runner import run_benchmark

    cfg = config_from_args(args)
    report = run_benchmark(cfg)
    for kind, path in report["outputs"].items():
        print(f"{kind}: {path}")
    failed = [f"{r['domain']}/{r['method']}@{r['library']}" for r in report["runs"] if r.get("error")]
    if failed:
        print(f"failed jobs (recorded in the JSON): {', '.join(failed)}", file=sys.stderr)
    print(f"wall time {report['wall_seconds'] / 60:.1f} min")
    return 0


def add_bench_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench efficiency` under an existing subparsers object (cli.py mounts it)."""
    bench = subparsers.add_parser("bench", help="benchmarks: parameter efficiency vs full fine-tuning and peft")
    jobs = bench.add_subparsers(dest="bench_command", required=True)
    parser = jobs.add_parser("efficiency", help="train every family and full fine-tuning on one budget; compare",
                             description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML or YAML file of bench options (flags override it)")
    parser.add_argument("--quick", action="store_true",
                        help="SmolLM2-135M, 3 steps, 6 sentences: every path in a few minutes on 2 cores")
    parser.add_argument("--corpus", help="shipped corpus of the first domain, e.g. libreoffice-help")
    parser.add_argument("--pair", help="its language pair, e.g. en-de")
    parser.add_argument("--second", help="second domain's sample (default bible-en-es; none: one domain)")
    add_bench_flags(parser)
    parser.set_defaults(func=efficiency_command)
    report = jobs.add_parser("report", help="re-render a saved report's markdown and plots from its JSON")
    report.add_argument("json", help="benchmarks/results/<name>.json")
    report.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from adaptkit.bench.report import rerender

    for kind, path in rerender(args.json).items():
        print(f"{kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.bench bench efficiency ...` = `adaptkit bench efficiency ...`."""
    from adaptkit.cli import main as adaptkit_main

    return adaptkit_main(argv)


if __name__ == "__main__":
    sys.exit(main())

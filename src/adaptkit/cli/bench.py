"""`adaptkit bench efficiency` — mounted by cli/__init__.py, or run as `python -m adaptkit.cli.bench bench efficiency`.

Every `BenchConfig` field is a flag (`budget_steps` → `--budget-steps`; lists are space- or
comma-separated, `--lrs` is `family=lr,...`); a `--config` TOML/YAML file (optionally under `[bench]`) gives the base
values and flags override it. `--corpus libreoffice-help --pair en-de` names the first domain (the
shipped sample `libreoffice-help-en-de`), `--second bible-en-es` the second (`none`: one domain).

    adaptkit bench efficiency --backbone gemma3-270m --corpus libreoffice-help --pair en-de --budget-steps 30
    adaptkit bench efficiency --quick
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from adaptkit.bench.jobs import BenchConfig, quick_config
from adaptkit.bench.report import rerender
from adaptkit.bench.runner import run_benchmark
from adaptkit.cli import main as adaptkit_main
from adaptkit.cli.flags import add_dataclass_flags, given
from adaptkit.training.config import read_config_file


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values: dict[str, Any] = {}
    if args.config:
        data = read_config_file(args.config)
        values.update(data.get("bench", data))
    values.update(given(args, BenchConfig))
    if "domains" not in values and (args.corpus or args.pair or args.second is not None):
        corpus = args.corpus or "libreoffice-help"
        first = f"{corpus}-{args.pair or 'en-de'}"
        second = args.second if args.second is not None else "bible-en-es"
        values["domains"] = [first] + ([second] if second.lower() != "none" else [])
    return quick_config(**values) if args.quick else BenchConfig.from_dict(values)


def efficiency_command(args: argparse.Namespace) -> int:
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
    add_dataclass_flags(parser, BenchConfig)
    parser.set_defaults(func=efficiency_command)
    report = jobs.add_parser("report", help="re-render a saved report's markdown and plots from its JSON")
    report.add_argument("json", help="benchmarks/results/<name>.json")
    report.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    for kind, path in rerender(args.json).items():
        print(f"{kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.bench bench efficiency ...` = `adaptkit bench efficiency ...`."""
    return adaptkit_main(argv)


if __name__ == "__main__":
    sys.exit(main())

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
from adaptkit.bench.sweep import SweepConfig, print_plan, run_sweep
from adaptkit.bench.sweep_report import write_sweep_report
from adaptkit.cli import main as adaptkit_main
from adaptkit.cli.flags import add_dataclass_flags, given
from adaptkit.training.config import read_config_file


def file_and_flags(args: argparse.Namespace, cls: type, table: str) -> dict[str, Any]:
    """The `[table]` of the `--config` file (or the whole file), overridden by the flags given."""
    values: dict[str, Any] = {}
    if args.config:
        data = read_config_file(args.config)
        values.update(data.get(table, data))
    values.update(given(args, cls))
    return values


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    values = file_and_flags(args, BenchConfig, "bench")
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
    """Add `bench efficiency`, `bench sweep` and `bench report` (cli.py mounts them)."""
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
    sweep = jobs.add_parser("sweep", help="each method trained once, scored at log-spaced checkpoints until its "
                                          "dev curve flattens; resumable across sittings",
                            description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("--config", help="TOML or YAML file of sweep options (flags override it)")
    sweep.add_argument("--plan", action="store_true", help="print what is left and its CPU time, run nothing")
    sweep.add_argument("--report-only", action="store_true", help="re-render the report from the runs' JSON")
    add_dataclass_flags(sweep, SweepConfig)
    sweep.set_defaults(func=sweep_command)
    report = jobs.add_parser("report", help="re-render a saved report's markdown and plots from its JSON")
    report.add_argument("json", help="benchmarks/results/<name>.json")
    report.set_defaults(func=report_command)


SWEEP_HELP = """Train each method once to its last checkpoint, scoring dev, test and out-of-domain sets at each.

    adaptkit corpus build libreoffice-help --langs de --out runs/corpora/libreoffice-help
    adaptkit bench sweep --config benchmarks/configs/sweep-help-en-de.toml --plan
    adaptkit bench sweep --config benchmarks/configs/sweep-help-en-de.toml --methods lora-r16-all

Each run's JSON (results/<name>/<method>.json) is its state: a killed or stopped sweep continues
without scoring a finished checkpoint again; commit those files to carry a sweep across machines.
"""


def sweep_config_from_args(args: argparse.Namespace) -> SweepConfig:
    return SweepConfig.from_dict(file_and_flags(args, SweepConfig, "sweep"))


def sweep_command(args: argparse.Namespace) -> int:
    cfg = sweep_config_from_args(args)
    if args.plan:
        print_plan(cfg, sys.stdout)
        return 0
    if not args.report_only:
        run_sweep(cfg)
    for kind, path in write_sweep_report(cfg).items():
        print(f"{kind}: {path}")
    return 0


def report_command(args: argparse.Namespace) -> int:
    for kind, path in rerender(args.json).items():
        print(f"{kind}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.bench bench efficiency ...` = `adaptkit bench efficiency ...`."""
    return adaptkit_main(argv)


if __name__ == "__main__":
    sys.exit(main())

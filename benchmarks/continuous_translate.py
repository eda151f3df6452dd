"""Offline translation, continuous batch vs static generate batches: `Translator` over 4 adapters of 4 families.

    python benchmarks/continuous_translate.py                 # 200 sentences, batch 16, up to 64 new tokens
    python benchmarks/continuous_translate.py --sentences 48  # a quicker look

The same sentences (test splits of the 4 adapters' samples, round-robin over the adapters, one call with
per-row routing) are translated twice by `Translator.translate(num_beams=1)`: with `continuous=True`
(rows join and leave a running batch of `--batch-size` rows between decoding steps) and with
`continuous=False` (one `generate` call per `--batch-size` rows, each running to its longest row, prompts
padded to the longest). The two runs alternate `--repeats` times; the ratio is of their median wall
times. Answers are compared row by row. The adapters are serve_load.py's (trained there, or here on first
use with the same recipe). Writes benchmarks/results/continuous_translate.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import ADAPTERS, WORK, sentences, train_adapters  # noqa: E402

import adaptkit as ak  # noqa: E402
from adaptkit.tasks.translate import Translator  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="gemma3-270m")
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    work = WORK / "".join(c if c.isalnum() or c in "-_." else "_" for c in args.backbone)
    model = ak.load(args.backbone, store=work / "store")
    train_adapters(model, work, 12)
    per_adapter = sentences(-(-args.sentences // len(ADAPTERS)))
    texts, srcs, tgts, routes = [], [], [], []
    for k in range(args.sentences):
        name, _, src, tgt, *_ = ADAPTERS[k % len(ADAPTERS)]
        texts.append(per_adapter[name][k // len(ADAPTERS)])
        srcs.append(src)
        tgts.append(tgt)
        routes.append(name)
    gen = dict(adapter=routes, num_beams=1, max_new_tokens=args.max_new_tokens)
    translators = {"continuous": Translator(model, batch_size=args.batch_size),
                   "static": Translator(model, batch_size=args.batch_size, continuous=False)}
    translators["static"].translate(texts[:2], srcs[:2], tgts[:2], adapter=routes[:2], num_beams=1, max_new_tokens=2)
    seconds: dict[str, list[float]] = {name: [] for name in translators}
    outputs: dict[str, list[str]] = {}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for name in (list(translators) if repeat % 2 == 0 else list(reversed(translators))):
            t0 = time.perf_counter()
            outputs[name] = translators[name].translate(texts, srcs, tgts, progress=True, **gen)
            seconds[name].append(time.perf_counter() - t0)
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    same = sum(a == b for a, b in zip(outputs["continuous"], outputs["static"]))
    results = {
        "backbone": args.backbone, "sentences": args.sentences, "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens, "adapters": [a[0] for a in ADAPTERS], "seconds": seconds,
        "median_seconds": median, "sentences_per_s": {k: args.sentences / v for k, v in median.items()},
        "static_over_continuous": median["static"] / median["continuous"], "identical_rows": same,
        "differing_examples": [{"src": t, "continuous": a, "static": b} for t, a, b in
                               zip(texts, outputs["continuous"], outputs["static"]) if a != b][:5],
        "wall_minutes": (time.perf_counter() - started) / 60,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_average_at_end": os.getloadavg()},
        "commit": subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                 text=True).stdout.strip(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continuous_translate.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (args.out / "continuous_translate.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def markdown(r: dict) -> str:
    lines = [f"# Offline translation on {r['backbone']}: continuous batch vs static generate batches", "",
             f"{r['sentences']} sentences round-robin over 4 adapters of 4 families ({', '.join(r['adapters'])}), "
             f"one `Translator.translate` call with per-row routing, greedy, up to {r['max_new_tokens']} new tokens, "
             f"{r['batch_size']} rows at a time; {r['machine']['cpus']} CPU cores, torch threads "
             f"{r['machine']['torch_threads']}; median of {len(r['seconds']['static'])} alternating runs; commit "
             f"{r['commit']}.", "",
             "| decoding | seconds | sentences/s |", "|---|---:|---:|"]
    for name in ("continuous", "static"):
        lines.append(f"| {name} | {r['median_seconds'][name]:.1f} | {r['sentences_per_s'][name]:.2f} |")
    lines += ["", f"Static / continuous time: **{r['static_over_continuous']:.2f}×**. Identical answers: "
              f"{r['identical_rows']} of {r['sentences']}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

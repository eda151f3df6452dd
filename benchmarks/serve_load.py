"""Load on the HTTP service: batching across adapters vs. one adapter per batch vs. one request at a time.

    python benchmarks/serve_load.py            # full: 12 steps per adapter, 16/32/64 requests, 48 new tokens
    python benchmarks/serve_load.py --quick    # 4 steps per adapter, 8/16/32 requests, 24 new tokens
    python benchmarks/serve_load.py --render benchmarks/results/serve_load.json   # redraw the .md / .png

Run time on 2 CPU cores with no other jobs: the full run's serving 13.4 min once its adapters exist
(training them is several times that on a loaded box: AdaLoRA is the slow one). Adapters are kept in
runs/serve_load/<backbone>/store and reused by later runs.

On gemma3-270m with 4 real adapters of four families, each trained briefly with `ak.train` on a shipped
sample (12 steps of batch 4 in the full run: they translate poorly, but they are real adapters of real
size; the benchmark measures serving, not quality):

    en-de/software  LoRA r8 (all linear)        libreoffice-help-en-de
    en-es/software  AdaLoRA r8 -> 4             libreoffice-help-en-es
    en-de/ui        prefix, 16 virtual tokens   libreoffice-ui-en-de
    en-es/bible     bottleneck (Pfeiffer, /8)   bible-en-es

Closed-loop clients (each sends one-sentence requests back to back) at 1, 8 and 32 concurrent
clients, against an in-process uvicorn server over one model:

    (a) mixed              requests round-robin over the 4 adapters, cross-adapter continuous batching
                           (rows join and leave between decoding steps; at most 32 rows)
        mixed-static       the same, with static batches: each generate call runs to its longest row
    (b) per-adapter        the same requests, at most one adapter in the batch at a time
    (c) one-by-one         the same requests, max_batch 1: one request at a time (the service's decoding loop)
        one-by-one-static  one request at a time through `generate`
    (s) single             the same sentences, all sent to one adapter (en-de/software), batching as (a)

Throughput is sentences per second over the run, and per CPU-second of the process (steadier when
other jobs share the CPU); latency is per request (send to answer). A first table measures one generate
call of 1, 8 and 32 rows with every row writing the same number of tokens: what static batching can
save on this hardware, for one adapter and for 4 adapters in one batch. Outputs of every mode are
compared with one-by-one-static — each request alone through `generate` — and the share that is
identical is reported (float32: a batch's padding can move a near-tie). The goal's ratio is given
against both one-at-a-time modes. Client and server share one process and its CPU. Writes
benchmarks/results/serve_load[-quick].{json,md,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
import uvicorn

import adaptkit as ak
from adaptkit.corpora import load_sample
from adaptkit.serving.app import create_app
from adaptkit.serving.settings import ServeSettings
from adaptkit.tasks.translate import Translator

RESULTS = Path(__file__).parent / "results"
WORK = Path("runs/serve_load")
ADAPTERS = [  # name, sample, src, tgt, domain, config, lr
    ("en-de/software", "libreoffice-help-en-de", "en", "de", "software",
     lambda s: ak.LoRA(r=8, alpha=16, targets="all-linear"), 1e-3),
    ("en-es/software", "libreoffice-help-en-es", "en", "es", "software",
     lambda s: ak.AdaLoRA(init_r=8, target_r=4, total_steps=max(2, s)), 2e-3),
    ("en-de/ui", "libreoffice-ui-en-de", "en", "de", "ui", lambda s: ak.Prefix(length=16), 1e-2),
    ("en-es/bible", "bible-en-es", "en", "es", "bible", lambda s: ak.Bottleneck(reduction=8, placement="pfeiffer"),
     2e-3),
]
SINGLE = "en-de/software"
MODES = {  # continuous batching unless "-static": every batch then runs to its longest row
    "mixed": dict(max_batch=32),
    "mixed-static": dict(max_batch=32, continuous=False),
    "per-adapter": dict(max_batch=32, max_adapters_per_batch=1),
    "one-by-one": dict(max_batch=1),
    "one-by-one-static": dict(max_batch=1, continuous=False),
    "single": dict(max_batch=32),
}


def train_adapters(model: ak.AdaptedModel, work: Path, steps: int) -> dict[str, Any]:
    """Train the 4 adapters (or reuse the ones a previous run with as many steps left in the store)."""
    done: dict[str, Any] = {}
    for name, sample, src, tgt, domain, config, lr in ADAPTERS:
        path = model.store.path_for(name)
        if path.is_file() and (ak.read_adapter_info(path).get("training") or {}).get("serve_load_steps") == steps:
            done[name] = {"reused": True}
            continue
        started = time.perf_counter()
        ak.train(model, adapter=name, train=sample, dev=None, adapter_config=config(steps), max_steps=steps,
                 batch_size=4, lr=lr, warmup_steps=1, eval_every=None, eval_samples=8, generate=False,
                 max_source_len=64, max_target_len=64, src_lang=src, tgt_lang=tgt, domain=domain, progress=False,
                 resume=False,
                 output_dir=str(work / "train" / name.replace("/", "_")))
        model.save_adapter(name, path, training={"serve_load_steps": steps, "sample": sample},
                           src_lang=src, tgt_lang=tgt, domain=domain)
        model.remove_adapter(name)
        done[name] = {"train_seconds": round(time.perf_counter() - started, 1), "file_bytes": path.stat().st_size}
        print(f"trained {name} ({steps} steps) in {done[name]['train_seconds']} s", flush=True)
    return done


def sentences(count: int) -> dict[str, list[str]]:
    """Test-split sources of each adapter's sample, short enough that prefill does not dominate."""
    out = {}
    for name, sample, *_ in ADAPTERS:
        rows = [r["src"] for r in load_sample(sample, "test") if 20 <= len(r["src"]) <= 160]
        out[name] = rows[:count]
    return out


@contextlib.contextmanager
def serving(model: ak.AdaptedModel, settings: ServeSettings) -> Iterator[tuple[str, Any]]:
    """A uvicorn server on a free port, in a thread of this process, for one mode."""
    app = create_app(model, settings=settings)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(120)


def requests_for(mode: str, n: int, texts: dict[str, list[str]]) -> list[dict[str, Any]]:
    """Request k: adapter k mod 4, the k-th sentence of that adapter; `single` sends the same texts to one."""
    out = []
    for k in range(n):
        name, _, src, tgt, *_ = ADAPTERS[k % len(ADAPTERS)]
        text = texts[name][(k // len(ADAPTERS)) % len(texts[name])]
        if mode == "single":
            name, src, tgt = SINGLE, "en", "de"
        out.append({"texts": [text], "adapter": name, "src_lang": src, "tgt_lang": tgt})
    return out


async def closed_loop(url: str, bodies: list[dict[str, Any]], clients: int, max_new_tokens: int
                      ) -> tuple[float, list[float], list[str]]:
    """`clients` workers send the requests back to back; returns wall seconds, latencies, outputs in order."""
    queue = list(enumerate(bodies))
    latencies: list[float] = [0.0] * len(bodies)
    outputs: list[str] = [""] * len(bodies)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as client:
        async def worker() -> None:
            while queue:
                k, body = queue.pop(0)
                started = time.perf_counter()
                response = await client.post("/v1/translate", json={**body, "num_beams": 1,
                                                                    "max_new_tokens": max_new_tokens})
                response.raise_for_status()
                latencies[k] = time.perf_counter() - started
                outputs[k] = response.json()["translations"][0]

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, latencies, outputs


def batch_cost(model: ak.AdaptedModel, texts: dict[str, list[str]], sizes: list[int], max_new_tokens: int
               ) -> list[dict[str, Any]]:
    """The ceiling batching can reach: seconds per row of one generate call (every row writes exactly
    max_new_tokens, so no row stops early), one adapter for all rows vs. the 4 adapters round-robin."""
    translator = Translator(model, batch_size=max(sizes))
    names = [a[0] for a in ADAPTERS]
    langs = {a[0]: (a[2], a[3]) for a in ADAPTERS}
    translator.translate(texts[names[0]][:1], "en", "de", adapter=names[0], num_beams=1, max_new_tokens=2)
    out = []
    for size in sizes:
        for label, routes in (("one adapter", [SINGLE] * size), ("4 adapters", [names[i % 4] for i in range(size)])):
            sources = [texts[names[i % 4]][i // 4 % len(texts[names[i % 4]])] for i in range(size)]
            started, cpu = time.perf_counter(), time.process_time()
            translator.translate(sources, [langs[r][0] for r in routes], [langs[r][1] for r in routes],
                                 adapter=routes, num_beams=1, max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens)
            wall = time.perf_counter() - started
            out.append({"rows": size, "adapters": label, "seconds": round(wall, 2),
                        "seconds_per_row": round(wall / size, 3),
                        "cpu_seconds_per_row": round((time.process_time() - cpu) / size, 3)})
            print(json.dumps(out[-1]), flush=True)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def histogram_totals(app: Any, metric: str) -> tuple[float, float]:
    registry = app.state.metrics.registry
    return registry.get_sample_value(f"{metric}_sum") or 0.0, registry.get_sample_value(f"{metric}_count") or 0.0


def mean_since(app: Any, metric: str, before: tuple[float, float]) -> float | None:
    total, count = histogram_totals(app, metric)
    return round((total - before[0]) / (count - before[1]), 2) if count > before[1] else None


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = WORK / "".join(c if c.isalnum() or c in "-_." else "_" for c in args.backbone)
    model = ak.load(args.backbone, store=work / "store")
    trained = train_adapters(model, work, args.steps)
    per_level = {c: max(8, min(2 * c, 32)) if args.quick else max(16, 2 * c) for c in args.clients}
    texts = sentences(max(per_level.values()))
    results: dict[str, Any] = {
        "backbone": args.backbone, "quick": args.quick, "steps_per_adapter": args.steps,
        "max_new_tokens": args.max_new_tokens, "max_wait_ms": args.max_wait_ms, "adapters": trained,
        "clients": args.clients, "requests": {str(c): per_level[c] for c in args.clients}, "modes": MODES,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "runs": [],
    }
    results["batch_cost"] = batch_cost(model, texts, [1, 8, max(args.clients)], args.max_new_tokens)
    outputs: dict[tuple[str, int], list[str]] = {}
    for clients in args.clients:  # modes interleaved per level: slow drift of a shared machine hits all alike
        for mode, knobs in MODES.items():
            bodies = requests_for(mode, per_level[clients], texts)
            settings = ServeSettings(max_wait_ms=args.max_wait_ms, max_queue=4096, **knobs)
            with serving(model, settings) as (url, app):
                warm = [requests_for(mode, len(ADAPTERS), texts)[i] for i in range(len(ADAPTERS))]
                asyncio.run(closed_loop(url, warm, 1, 4))  # every adapter resident, first-call costs paid
                rows_before = histogram_totals(app, "adaptkit_batch_rows")
                cpu = time.process_time()
                adapters_before = histogram_totals(app, "adaptkit_batch_adapters")
                wall, latencies, outs = asyncio.run(closed_loop(url, bodies, clients, args.max_new_tokens))
                cpu = time.process_time() - cpu
                batches = int(histogram_totals(app, "adaptkit_batch_rows")[1] - rows_before[1])
                rows = mean_since(app, "adaptkit_batch_rows", rows_before)
                adapters = mean_since(app, "adaptkit_batch_adapters", adapters_before)
            outputs[(mode, clients)] = outs
            record = {"mode": mode, "clients": clients, "requests": len(bodies), "seconds": round(wall, 2),
                      "sentences_per_s": round(len(bodies) / wall, 3), "cpu_seconds": round(cpu, 1),
                      "sentences_per_cpu_s": round(len(bodies) / cpu, 3),
                      "p50_s": round(percentile(latencies, 0.5), 3), "p95_s": round(percentile(latencies, 0.95), 3),
                      "mean_s": round(statistics.fmean(latencies), 3), "batches": batches,
                      "mean_rows_per_batch": rows, "mean_adapters_per_batch": adapters}
            results["runs"].append(record)
            print(json.dumps(record), flush=True)
    agreement = {}
    for clients in args.clients:
        alone = outputs[("one-by-one-static", clients)]  # each request alone through generate
        for mode in ("mixed", "mixed-static", "per-adapter", "one-by-one"):
            same = sum(a == b for a, b in zip(outputs[(mode, clients)], alone))
            agreement[f"{mode}@{clients}"] = round(same / len(alone), 3)
    results["identical_to_one_by_one"] = agreement
    results["examples"] = [{"adapter": b["adapter"], "src": b["texts"][0], "translation": o}
                           for b, o in zip(requests_for("mixed", 8, texts)[:4],
                                           outputs[("mixed", args.clients[-1])][:4])]
    results["ratios"] = ratios(results["runs"])
    results["ratios_per_cpu_second"] = ratios(results["runs"], "sentences_per_cpu_s")
    results["wall_minutes"] = round((time.perf_counter() - started) / 60, 1)
    return results


def ratios(runs: list[dict[str, Any]], field: str = "sentences_per_s") -> dict[str, float]:
    by = {(r["mode"], r["clients"]): r[field] for r in runs}
    out = {}
    for clients in sorted({r["clients"] for r in runs}):
        for other in ("one-by-one", "one-by-one-static", "mixed-static", "per-adapter", "single"):
            out[f"mixed/{other}@{clients}"] = round(by[("mixed", clients)] / by[(other, clients)], 2)
    return out


def markdown(results: dict[str, Any]) -> str:
    runs = results["runs"]
    lines = [f"# Serving load: {results['backbone']}, 4 adapters of 4 families"
             + (" (quick)" if results["quick"] else ""), "",
             f"{results['steps_per_adapter']} training steps per adapter; greedy, max_new_tokens "
             f"{results['max_new_tokens']}; one sentence per request; closed-loop clients; server and clients in "
             f"one process on {results['machine']['cpus']} CPU cores (torch threads: "
             f"{results['machine']['torch_threads']}); {results['wall_minutes']} min in all. In continuous modes a "
             "batch is one decoding step (rows/batch: rows decoding together).", "",
             "| clients | mode | requests | sentences/s | sentences per CPU-s | p50 s | p95 s | batches | rows/batch "
             "| adapters/batch |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        lines.append(f"| {r['clients']} | {r['mode']} | {r['requests']} | {r['sentences_per_s']:.2f} | "
                     f"{r['sentences_per_cpu_s']:.2f} | {r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['batches']} | "
                     f"{r['mean_rows_per_batch']} | {r['mean_adapters_per_batch']} |")
    single_row = next(c["seconds_per_row"] for c in results["batch_cost"] if c["rows"] == 1
                      and c["adapters"] == "one adapter")
    lines += ["", f"One static generate call, every row writing {results['max_new_tokens']} tokens (no early stop, "
              "prompts padded to the longest): what static batching can save here.", "",
              "| rows | adapters | seconds | s per row | CPU-s per row | speed-up per row vs 1 row (wall, CPU) |",
             "|---:|---|---:|---:|---:|---:|"]
    single_cpu = next(c["cpu_seconds_per_row"] for c in results["batch_cost"] if c["rows"] == 1
                      and c["adapters"] == "one adapter")
    lines += [f"| {c['rows']} | {c['adapters']} | {c['seconds']:.1f} | {c['seconds_per_row']:.2f} | "
              f"{c['cpu_seconds_per_row']:.2f} | {single_row / c['seconds_per_row']:.2f}×, "
              f"{single_cpu / c['cpu_seconds_per_row']:.2f}× |" for c in results["batch_cost"]]
    lines += ["", "| ratio | sentences/s | sentences per CPU-s |", "|---|---:|---:|"]
    lines += [f"| {k} | {v:.2f}× | {results['ratios_per_cpu_second'][k]:.2f}× |" for k, v in results["ratios"].items()]
    top = max(results["clients"])
    wall, cpu = results["ratios"], results["ratios_per_cpu_second"]
    lines += ["", f"Goals at {top} clients (wall-clock; per CPU-second in brackets, the steadier measure on a "
              f"shared machine): mixed ≥ 3× one-by-one — {wall[f'mixed/one-by-one@{top}']:.2f}× "
              f"({cpu[f'mixed/one-by-one@{top}']:.2f}×), against one-by-one through `generate` "
              f"{wall[f'mixed/one-by-one-static@{top}']:.2f}× ({cpu[f'mixed/one-by-one-static@{top}']:.2f}×); "
              "mixed ≥ 0.8× single adapter — "
              f"{wall[f'mixed/single@{top}']:.2f}× ({cpu[f'mixed/single@{top}']:.2f}×).", "",
              "Outputs identical to the same request served alone by `generate` (one-by-one-static): "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in results["identical_to_one_by_one"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = (("sentences_per_s", "sentences / s"), ("sentences_per_cpu_s", "sentences per CPU-second"),
              ("p95_s", "p95 latency (s)"))
    for mode in MODES:
        runs = [r for r in results["runs"] if r["mode"] == mode]
        for axis, (field, _) in zip(axes, panels):
            axis.plot([r["clients"] for r in runs], [r[field] for r in runs], marker="o", label=mode)
    for axis, (_, label) in zip(axes, panels):
        axis.set_xscale("log", base=2)
        axis.set_xticks(results["clients"], [str(c) for c in results["clients"]])
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{results['backbone']}: 4 adapters over one backbone, served over HTTP")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, shorter outputs, 4 training steps")
    parser.add_argument("--backbone", default="gemma3-270m")
    parser.add_argument("--steps", type=int, default=None, help="training steps per adapter (default 12; quick 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default 48; quick 24")
    parser.add_argument("--max-wait-ms", type=float, default=50.0,
                        help="the service default is 10; 50 lets a burst of 32 requests sent by one client process "
                             "arrive before the first batch closes")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a CPU shared with other jobs, OpenMP's spinning threads "
                             "made 2 threads ~8x slower than 1 in our runs; on a machine of your own, try all cores)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--render", type=Path, help="only re-render the markdown and plot of a saved JSON")
    args = parser.parse_args(argv)
    if args.render:
        results = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(markdown(results))
        plot(results, args.render.with_suffix(".png"))
        return 0
    args.steps = args.steps or (4 if args.quick else 12)
    args.max_new_tokens = args.max_new_tokens or (24 if args.quick else 48)
    results = run(args)
    stem = "serve_load-quick" if args.quick else "serve_load"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    (args.out / f"{stem}.md").write_text(markdown(results))
    plot(results, args.out / f"{stem}.png")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

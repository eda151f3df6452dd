"""Soak (issue 21, "What it must show" 2): the service under mixed traffic and store churn for a long time.

    python benchmarks/serve_soak.py              # 30 minutes on smollm2-135m -> benchmarks/results/serve_soak.*
    python benchmarks/serve_soak.py --quick      # a 2-minute smoke run -> runs/serve_soak/quick/serve_soak.*
    python benchmarks/serve_soak.py --render benchmarks/results/serve_soak.json   # redraw the .md / .png

`adaptkit serve` runs as a subprocess, so RSS and open file descriptors are the server's own (VmRSS in
/proc/PID/status, entries of /proc/PID/fd, sampled every --sample-every s). Backbone: a zoo name (default
smollm2-135m; `ak.load` fetches it on first use, ~1-2 min). 8 adapters of the four families (two of each),
at most 3 resident. Nothing is trained: every version of an adapter is a random init with its own seed (each
adapter parameter drawn from N(0, sigma^2)), which is enough to make versions answer differently — what the
check needs. Traffic: --clients closed-loop clients (tests/chaos.py's RequestMaker: translations routed by
pair and by name, generations, some on the bare backbone, greedy or 2 beams, a lone surrogate in some beam
rows). Churn, one step every --churn-every s: replace with other weights, delete, re-upload through the
API, and corrupt files and files made for another backbone (a tiny llama) written straight into the store.

Every answer is judged afterwards as tests/test_serving_chaos.py judges it (tests/chaos.py's Oracle): an
error against the store's recorded history (its code must have had a cause while the request was in
flight); a 200 row against the same row served alone, in this process on a model of its own, under the
version `adapter_versions` names. References are computed after the run, most frequent first, for at most
--check-minutes: on a slow CPU that is a sample, and the report gives the fraction of answers compared.
A line per minute shows progress. Writes <out>.json (every request's outcome, every sample), <out>.md (the
tables, the RSS and fd slopes per hour from a least-squares fit) and <out>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the chaos harness and its oracle, shared with the CI test

import adaptkit as ak  # noqa: E402
from adaptkit.core.adapterfile import AdapterStore, read_adapter_info  # noqa: E402
from chaos import (  # noqa: E402
    FAILURES,
    AdapterSpec,
    Churn,
    Oracle,
    References,
    RequestMaker,
    Result,
    Timeline,
    observe,
    scratch_files,
    send,
    summarize,
)

CONFIGS = [  # (target language, config, sigma of the random init)
    ("de", ak.LoRA(r=8, targets="all-linear"), 0.05), ("de", ak.AdaLoRA(init_r=8, target_r=4, total_steps=10), 0.1),
    ("de", ak.Prefix(length=8), 0.05), ("de", ak.Bottleneck(reduction=16, placement="houlsby"), 0.03),
    ("es", ak.LoRA(r=4, targets="attention"), 0.05), ("es", ak.AdaLoRA(init_r=4, target_r=2, total_steps=10), 0.1),
    ("es", ak.Prefix(length=4), 0.05), ("es", ak.Bottleneck(reduction=16, placement="pfeiffer"), 0.03)]
ADAPTERS = [AdapterSpec(f"en-{tgt}/d{i}-{config.method}", "en", tgt, f"d{i}")
            for i, (tgt, config, _) in enumerate(CONFIGS)]
VERSIONS = 3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="a 2-minute smoke run (results under runs/)")
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-resident", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--churn-every", type=float, default=20.0, help="seconds between churn steps")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS / fd samples")
    parser.add_argument("--request-timeout", type=float, default=120.0, help="the server's deadline, where it has one")
    parser.add_argument("--check-minutes", type=float, default=None, help="time for references (default 15; quick 2)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--out", default=None, help="output path without suffix")
    parser.add_argument("--render", metavar="JSON", help="only redraw the .md and .png from a results file")
    args = parser.parse_args()
    if args.quick:
        args.minutes = 2.0
        args.churn_every = min(args.churn_every, 8.0)
    if args.check_minutes is None:
        args.check_minutes = 2.0 if args.quick else 15.0
    if args.out is None:
        args.out = str(ROOT / ("runs/serve_soak/quick/serve_soak" if args.quick else "benchmarks/results/serve_soak"))
    return args


# -- setup ------------------------------------------------------------------------------------------------------
def randomize(model: ak.AdaptedModel, name: str, seed: int, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def build_versions(model: ak.AdaptedModel, root: Path) -> tuple[dict, dict, dict, set[str]]:
    """Good versions (random inits, one seed each) and, for some adapters, a file made for another backbone."""
    from tiny import tiny_model

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    foreign = ak.AdaptedModel(tiny_model("llama", seed=1))
    good: dict[str, list[Path]] = {}
    faulty: dict[str, list[Path]] = {}
    files: dict[str, tuple[str, Path]] = {}
    foreign_shas: set[str] = set()
    for i, (spec, (_, config, scale)) in enumerate(zip(ADAPTERS, CONFIGS)):
        keys = dict(src_lang=spec.src, tgt_lang=spec.tgt, domain=spec.domain)
        model.add_adapter(spec.name, config)
        good[spec.name], faulty[spec.name] = [], []
        for v in range(VERSIONS):
            randomize(model, spec.name, 1000 * i + v, scale)
            path = model.save_adapter(spec.name, root / f"a{i}-v{v}.safetensors", **keys)
            good[spec.name].append(path)
            files[read_adapter_info(path)["sha256"]] = (spec.name, path)
        model.remove_adapter(spec.name)
        if i % 3 == 0:
            foreign.add_adapter(spec.name, config)
            randomize(foreign, spec.name, 1000 * i + 99, 0.5)
            path = foreign.save_adapter(spec.name, root / f"a{i}-foreign.safetensors", **keys)
            faulty[spec.name].append(path)
            foreign_shas.add(read_adapter_info(path)["sha256"])
    return good, faulty, files, foreign_shas


def sample_texts(n: int = 16) -> list[str]:
    from adaptkit.corpora import load_sample

    rows = load_sample("libreoffice-help-en-de", "test")
    return [r["src"] for r in rows if 20 <= len(r["src"]) <= 100][:n]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, store: Path, port: int, log: Path) -> tuple[subprocess.Popen, list[str]]:
    command = [sys.executable, "-m", "adaptkit.cli.serve", "--backbone", args.backbone, "--store", str(store),
               "--port", str(port), "--max-resident", str(args.max_resident), "--max-batch", "16",
               "--max-wait-ms", "10", "--log-level", "warning"]
    help_text = subprocess.run([sys.executable, "-m", "adaptkit.cli.serve", "--help"], capture_output=True,
                               text=True).stdout
    for flag in ("--request-timeout-s", "--request-timeout"):
        if flag + " " in help_text or flag + "\n" in help_text:
            command += [flag, str(args.request_timeout)]
            break
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 600
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return process, command
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            raise SystemExit(f"the server was not ready in 600 s:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def proc_sample(pid: int) -> tuple[float, int] | None:
    """(RSS in MiB, open fds) of a process, None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return kib / 1024, fds


# -- the run ----------------------------------------------------------------------------------------------------
async def soak(args: argparse.Namespace, url: str, pid: int, maker: RequestMaker, churn: Churn,
               client_timeout: float) -> tuple[list[Result], list[dict], float]:
    results: list[Result] = []
    samples: list[dict] = []
    start = time.monotonic()
    end = start + 60 * args.minutes
    next_id = 0
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, limits=limits) as client:
        async def run_client(c: int) -> None:
            nonlocal next_id
            rng = random.Random(args.seed * 1000 + c)
            while time.monotonic() < end:
                spec = maker(rng, next_id, c)
                next_id += 1
                results.append(await send(client, spec, client_timeout))

        async def run_churn() -> None:
            while time.monotonic() + args.churn_every < end:
                await asyncio.sleep(args.churn_every)
                await churn.step(client)

        async def run_sampler() -> None:
            minute = 0
            while True:
                now = time.monotonic()
                sample = proc_sample(pid)
                if sample is not None:
                    samples.append({"t_s": round(now - start, 2), "rss_mib": round(sample[0], 2), "fds": sample[1]})
                if now - start >= 60 * (minute + 1):
                    minute += 1
                    print(progress_line(minute, results, samples, churn, start), flush=True)
                if now >= end and minute >= args.minutes:
                    return
                await asyncio.sleep(args.sample_every)

        sampler = asyncio.ensure_future(run_sampler())
        await asyncio.gather(*(run_client(c) for c in range(args.clients)), run_churn())
        sampler.cancel()
        sample = proc_sample(pid)
        if sample is not None:
            samples.append({"t_s": round(time.monotonic() - start, 2), "rss_mib": round(sample[0], 2),
                            "fds": sample[1]})
    return results, samples, start


def progress_line(minute: int, results: list[Result], samples: list[dict], churn: Churn, start: float) -> str:
    recent = [r for r in results if 60 * (minute - 1) <= r.t1 - start < 60 * minute]
    statuses = Counter("none" if r.status is None else f"{r.status // 100}xx" for r in recent)
    latencies = sorted(r.seconds for r in recent if r.status is not None)
    last = samples[-1] if samples else {"rss_mib": float("nan"), "fds": -1}
    return (f"minute {minute}: {len(recent)} requests {dict(sorted(statuses.items()))}, "
            f"p50 {pct(latencies, 50):.2f} s, p99 {pct(latencies, 99):.2f} s, RSS {last['rss_mib']:.0f} MiB, "
            f"fds {last['fds']}, churn so far {sum(churn.done.values())}")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def after_checks(url: str, store: Path, paths: dict[str, Path], timeline: Timeline, faulty: set[str]) -> dict:
    out: dict[str, Any] = {}
    try:
        out["readyz"] = httpx.get(url + "/readyz", timeout=30).status_code
        metrics = httpx.get(url + "/metrics", timeout=30).text
        for line in metrics.splitlines():
            for name in ("adaptkit_queue_depth", "adaptkit_resident_adapters", "adaptkit_resident_adapters_peak"):
                if line.startswith(name + " "):
                    out[name] = float(line.split()[1])
    except httpx.HTTPError as error:
        out["error"] = f"{type(error).__name__}: {error}"
    out["scratch_files"] = scratch_files(store, set(paths.values()))
    out["store_mismatches"] = [name for name, path in paths.items()
                               if observe(path, faulty) != (timeline.current(name).state, timeline.current(name).sha)]
    return out


def stop_server(process: subprocess.Popen) -> int | None:
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        return None


# -- judging ----------------------------------------------------------------------------------------------------
def judge_all(results: list[Result], oracle: Oracle, refs: References, budget_s: float, seed: int) -> list:
    """Errors at once; 200 answers against references computed most frequent first within `budget_s`."""
    wanted: Counter = Counter()
    first_row: dict[tuple, tuple] = {}
    for result in results:
        versions = result.payload.get("adapter_versions") if result.status == 200 and isinstance(
            result.payload, dict) else None
        if not isinstance(versions, list) or len(versions) != len(result.spec.rows):
            continue
        for row, version in zip(result.spec.rows, versions):
            if row.adapter is None or refs.name_of(version) == row.adapter:
                key = (row.kind, version, row.text, row.beams, row.max_new, row.src, row.tgt, row.task)
                wanted[key] += 1
                first_row.setdefault(key, (row, version))
    order = sorted(wanted, key=lambda k: (-wanted[k], random.Random(f"{seed}{k}").random()))
    deadline = time.monotonic() + budget_s
    for i, key in enumerate(order):
        if time.monotonic() > deadline:
            print(f"references: budget spent after {i} of {len(order)}", flush=True)
            break
        refs.answer(*first_row[key])
        if i % 50 == 49:
            print(f"references: {i + 1} of {len(order)}", flush=True)
    refs.allow = lambda: False  # judge with what was computed; the rest is unchecked
    return [oracle.judge(result) for result in results]


def least_squares_slope(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3 or max(xs) == min(xs):
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def summarize_run(results: list[Result], verdicts: list, samples: list[dict], start: float, minutes: float) -> dict:
    per_minute = []
    last = max((r.t1 - start for r in results), default=0.0)
    for m in range(max(1, math.ceil(max(last, 60 * minutes) / 60))):
        rows = [(r, v) for r, v in zip(results, verdicts) if m * 60 <= r.t1 - start < (m + 1) * 60]
        latencies = [r.seconds for r, _ in rows if r.status is not None]
        in_minute = [s for s in samples if m * 60 <= s["t_s"] < (m + 1) * 60]
        per_minute.append({
            "minute": m + 1, "requests": len(rows), "ok": sum(v.outcome == "ok" for _, v in rows),
            "errors": sum(v.outcome == "error" for _, v in rows),
            "failures": sum(v.outcome in FAILURES for _, v in rows),
            "p50_s": round(pct(latencies, 50), 3), "p99_s": round(pct(latencies, 99), 3),
            "rss_mib": in_minute[-1]["rss_mib"] if in_minute else None,
            "fds": in_minute[-1]["fds"] if in_minute else None})
    warm = max(60.0, 0.1 * 60 * minutes) if minutes >= 5 else 0.1 * 60 * minutes
    slopes = {}
    for label, chosen in (("all", samples), ("after_warmup", [s for s in samples if s["t_s"] >= warm])):
        hours = [s["t_s"] / 3600 for s in chosen]
        slopes[label] = {"rss_mib_per_h": least_squares_slope(hours, [s["rss_mib"] for s in chosen]),
                         "fds_per_h": least_squares_slope(hours, [float(s["fds"]) for s in chosen]),
                         "samples": len(chosen), "from_s": round(chosen[0]["t_s"], 1) if chosen else None}
    answered = [v for v in verdicts if v.outcome == "ok"]
    return {"per_minute": per_minute, "slopes": slopes, "warmup_s": warm,
            "checked": {"ok_answers": len(answered), "compared": sum(v.checked for v in answered)}}


# -- output -----------------------------------------------------------------------------------------------------
def write_outputs(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    render(report, out)


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def render(report: dict, out: Path) -> None:
    cfg, counts = report["config"], report["outcomes"]
    slopes, checked = report["summary"]["slopes"], report["summary"]["checked"]
    lines = [f"# Soak: {cfg['minutes']:g} minutes of mixed traffic with store churn ({cfg['backbone']})", "",
             f"`python benchmarks/serve_soak.py{' --quick' if cfg['quick'] else ''}` on {report['machine']}, "
             f"commit {report['commit']}. `adaptkit serve` in a subprocess, {len(ADAPTERS)} random-init adapters "
             f"(two of each family, {VERSIONS} versions each, different seeds; nothing trained), at most "
             f"{cfg['max_resident']} resident, {cfg['clients']} closed-loop clients, a churn step every "
             f"{cfg['churn_every']:g} s, up to {cfg['max_new_tokens']} new tokens, server deadline "
             f"{cfg['server_deadline'] or 'none'}.", "",
             "## Outcomes", "", "| outcome | requests |", "|---|---:|"]
    lines += [f"| {k} | {n} |" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    lines += ["", f"Error codes (documented, with a cause): {report['error_codes'] or 'none'}.",
              f"Answers compared with their reference: {checked['compared']} of {checked['ok_answers']} "
              f"({100 * checked['compared'] / max(1, checked['ok_answers']):.0f} %; references computed: "
              f"{report['references_computed']}, within {cfg['check_minutes']:g} min).",
              f"Churn: {report['churn']['done']}; churn failures: {len(report['churn']['failures'])}.",
              f"After the run: {report['after']}; exit code on SIGTERM: {report['exit_code']}.", "",
              "## Memory and file descriptors", "", "| fit | samples | RSS MiB/hour | fds/hour |",
              "|---|---:|---:|---:|"]
    for label, fit in slopes.items():
        lines.append(f"| {label.replace('_', ' ')} (from {fmt(fit['from_s'], 0)} s) | {fit['samples']} | "
                     f"{fmt(fit['rss_mib_per_h'])} | {fmt(fit['fds_per_h'])} |")
    lines += ["", "## Per minute", "", "| minute | requests | ok | errors | failures | p50 s | p99 s | RSS MiB | fds |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for m in report["summary"]["per_minute"]:
        lines.append(f"| {m['minute']} | {m['requests']} | {m['ok']} | {m['errors']} | {m['failures']} | "
                     f"{fmt(m['p50_s'])} | {fmt(m['p99_s'])} | {fmt(m['rss_mib'], 0)} | {fmt(m['fds'])} |")
    if report["failures"]:
        lines += ["", "## First failures", "", "```", *report["failures"], "```"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(report, out.with_suffix(".png"))


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples, per_minute = report["samples"], report["summary"]["per_minute"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    minutes = [s["t_s"] / 60 for s in samples]
    top.plot(minutes, [s["rss_mib"] for s in samples], color="tab:blue", label="RSS")
    top.set_ylabel("server RSS (MiB)", color="tab:blue")
    fds = top.twinx()
    fds.plot(minutes, [s["fds"] for s in samples], color="tab:orange", label="open fds")
    fds.set_ylabel("open fds", color="tab:orange")
    top.set_title(f"serve soak: {report['config']['backbone']}, {report['config']['minutes']:g} min")
    centers = [m["minute"] - 0.5 for m in per_minute]
    bottom.plot(centers, [m["p50_s"] for m in per_minute], marker="o", label="p50")
    bottom.plot(centers, [m["p99_s"] for m in per_minute], marker="o", label="p99")
    bottom.set_ylabel("latency per minute (s)")
    bottom.set_xlabel("minutes")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def git_commit() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except OSError:
        return "unknown"


def main() -> None:
    args = parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        render(report, Path(args.render).with_suffix(""))
        return
    torch.set_num_threads(1)  # the server has the other core; on a shared CPU one thread is also the faster
    work = ROOT / "runs" / "serve_soak" / args.backbone
    store, scratch = work / "store", work / "scratch"
    print(f"loading {args.backbone} and writing adapter versions ...", flush=True)
    model = ak.load(args.backbone)
    good, faulty, files, foreign = build_versions(model, work / "versions")
    shutil.rmtree(store, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    adapter_store = AdapterStore(store)
    paths = {spec.name: adapter_store.path_for(spec.name) for spec in ADAPTERS}
    for spec in ADAPTERS[:-1]:  # the last one is uploaded by the churn
        paths[spec.name].parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(good[spec.name][0], paths[spec.name])
    timeline = Timeline()
    churn = Churn(args.seed, store, adapter_store.path_for, good, faulty, foreign, timeline, scratch,
                  timeout=args.request_timeout + 60)
    churn.start()
    maker = RequestMaker(ADAPTERS, sample_texts(12), max_new=(args.max_new_tokens,), max_rows=2, beam_share=0.2,
                         surrogate_share=0.1)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process, command = start_server(args, store, port, work / "server.log")
    deadline_flag = next((command[i + 1] for i, a in enumerate(command) if a.startswith("--request-timeout")), None)
    client_timeout = (args.request_timeout + 60) if deadline_flag else 600.0
    print(f"server pid {process.pid} on {url}; {args.minutes:g} min of traffic from {args.clients} clients",
          flush=True)
    try:
        results, samples, start = asyncio.run(soak(args, url, process.pid, maker, churn, client_timeout))
        after = after_checks(url, store, paths, timeline, foreign)
    finally:
        exit_code = stop_server(process)
    print(f"{len(results)} requests; judging (references for up to {args.check_minutes:g} min) ...", flush=True)
    refs = References(model, files)
    oracle = Oracle(timeline, refs)
    verdicts = judge_all(results, oracle, refs, 60 * args.check_minutes, args.seed)
    counts, text = summarize(results, verdicts, first=10)
    print(text, flush=True)
    shown = text.splitlines()[1:]
    report = {
        "config": {**{k: v for k, v in vars(args).items() if k != "render"}, "server_deadline": deadline_flag,
                   "command": command[1:]},
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "commit": git_commit(),
        "outcomes": dict(counts),
        "error_codes": dict(Counter(v.detail for v in verdicts if v.outcome == "error")),
        "failures": shown,
        "references_computed": refs.computed,
        "churn": {"done": dict(churn.done), "failures": churn.failures, "log": churn.log},
        "after": after, "exit_code": exit_code,
        "summary": summarize_run(results, verdicts, samples, start, args.minutes),
        "samples": samples,
        "requests": [{"id": r.spec.id, "what": r.spec.describe(), "t0_s": round(r.t0 - start, 3),
                      "seconds": round(r.seconds, 3), "status": r.status, "outcome": v.outcome,
                      "detail": v.detail[:200], "checked": v.checked} for r, v in zip(results, verdicts)],
    }
    write_outputs(report, Path(args.out))
    print(f"wrote {args.out}.json / .md / .png", flush=True)


if __name__ == "__main__":
    main()

"""The efficiency benchmark's outputs: one JSON of every figure, a markdown table, two PNG plots,
and the provenance (machine, versions, commit) that a reader needs to trust or redo them.

Ratios are taken against jobs of the same run: quality against the bare backbone on the same test
set, file size against the full fine-tuned checkpoint, step time and memory against full fine-tuning.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

GIB = 2**30


def assemble(cfg: Any, records: list[dict[str, Any]], wall_seconds: float,
             provenance: dict[str, Any] | None = None) -> dict[str, Any]:
    """Records of every job + provenance (taken when the run started: the code that ran) + derived ratios."""
    ok = [r for r in records if not r.get("error")]
    backbone = next(({"parameters": r["backbone_parameters"], "bytes": r["backbone_bytes"]} for r in ok), {})
    for r in ok:
        _derive(r, records)
    return {
        "name": cfg.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **(provenance if provenance is not None else environment()),
        "backbone": {"name": cfg.backbone, **backbone},
        "config": dataclasses.asdict(cfg),
        "seeds": {"seed": cfg.seed, "data_order": f"EpochSampler(seed={cfg.seed}) for every method",
                  "adapter_init": f"accelerate.set_seed({cfg.seed}) before each adapter is built"},
        "wall_seconds": round(wall_seconds, 1),
        "runs": records,
    }


def _find(records: list[dict], domain: str, method: str, library: str = "adaptkit") -> dict | None:
    for r in records:
        if r["domain"] == domain and r["method"] == method and r["library"] == library and not r.get("error"):
            return r
    return None


def paired_step_ratio(steps: list[float], reference: list[float]) -> float:
    """Median over steps of step_i / reference_i.

    Every job sees the same batches in the same order, so step i of two jobs did the same tokens:
    the per-step ratio cancels the batch-to-batch spread that a ratio of two medians keeps. Runs
    of different lengths fall back to the ratio of medians.
    """
    if len(steps) != len(reference) or not steps:
        return statistics.median(steps) / statistics.median(reference)
    return statistics.median(s / max(ref, 1e-12) for s, ref in zip(steps, reference))


def rerender(json_path: str | Path) -> dict[str, Path]:
    """Re-derive the ratios of a saved report and rewrite its JSON, markdown and plots beside it."""
    path = Path(json_path)
    report = json.loads(path.read_text(encoding="utf-8"))
    if not {"name", "runs", "config"} <= set(report):
        raise ValueError(f"{path} is not an `adaptkit bench efficiency` report (no name / runs / config)")
    report.pop("outputs", None)
    for r in report["runs"]:
        if not r.get("error"):
            _derive(r, report["runs"])
    return write_outputs(report, path.parent)


def _derive(r: dict, records: list[dict]) -> None:
    r["percent_of_backbone"] = 100.0 * r.get("trainable_parameters", 0) / r["backbone_parameters"]
    full = _find(records, r["domain"], "full")
    home = r["train_domains"][0] if r["train_domains"] else r["domain"]
    full = full or _find(records, home, "full")
    r["full_checkpoint_bytes"] = full["file_bytes"] if full else r["backbone_bytes"]
    r["full_checkpoint_measured"] = full is not None
    r["file_vs_full"] = r["file_bytes"] / r["full_checkpoint_bytes"] if r.get("file_bytes") else None
    if full and r.get("step_seconds_median"):
        if r["train_domains"] == full["train_domains"]:  # the same batches, step by step
            r["step_time_vs_full"] = paired_step_ratio(r["step_seconds"], full["step_seconds"])
        else:  # the mixed adapter saw other batches
            r["step_time_vs_full"] = r["step_seconds_median"] / full["step_seconds_median"]
        r["train_rss_delta_vs_full"] = r["train_rss_delta_bytes"] / max(full["train_rss_delta_bytes"], 1)
    r["vs_bare"] = {}
    for domain, scores in r.get("test", {}).items():
        bare = _find(records, domain, "bare", "bare")
        if bare and domain in bare.get("test", {}):
            r["vs_bare"][domain] = {k: scores[k] - bare["test"][domain][k] for k in ("bleu", "chrf") if k in scores}


# -- markdown -----------------------------------------------------------------------------------

def _fmt(value: Any, spec: str = ".1f", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value / scale, spec)


def _size(n: int | None) -> str:
    if n is None:
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def _params(n: int | None) -> str:
    if not n:
        return "0"
    return f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def _label(r: dict) -> str:
    return r["method"] + (" (peft)" if r["library"] == "peft" else "")


def markdown(report: dict[str, Any]) -> str:
    cfg, runs = report["config"], report["runs"]
    m, v = report["machine"], report["versions"]
    lines = [
        f"# Efficiency benchmark `{report['name']}` — {report['backbone']['name']}",
        "",
        f"`{report['command']}` · {report['created']} · wall time {report['wall_seconds'] / 60:.1f} min · "
        f"git {str(report['git']['commit'])[:10]}{' (dirty)' if report['git']['dirty'] else ''}",
        "",
        f"Machine: {m['processor']}, {m['cpu_count']} cores, "
        f"{m['memory_bytes'] / GIB:.0f} GiB; {runs[0].get('torch_threads', '?') if runs else '?'} threads per job; "
        f"{runs[0].get('device', '?') if runs else '?'}"
        f"{' ' + runs[0]['gpu'] if runs and runs[0].get('gpu') else ''}. "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val),
        "",
        f"Budget: {cfg['budget_steps']} optimizer steps × batch {cfg['batch_size']}, linear schedule, "
        f"warmup {cfg['warmup_steps'] if cfg['warmup_steps'] is not None else cfg['budget_steps'] // 10}, "
        f"peak lr per family {cfg['lrs']}, seed {cfg['seed']}, same data order for all"
        f"{', activation checkpointing in every job' if cfg.get('activation_checkpointing') else ''}. Evaluation: "
        f"{cfg['eval_samples']} dev / {cfg['test_samples']} test sentences, greedy, ≤{cfg['max_new_tokens']} "
        f"new tokens. Latency: {cfg['latency_sentences']} sentences × {cfg['latency_tokens']} new tokens, batch 1, "
        "interleaved with the bare backbone in the same process. × full step: the median over steps of this "
        "job's step time over full fine-tuning's on the same batch (the mixed adapter: ratio of medians).",
        "",
    ]
    header = ("| method | trainable | % of backbone | file | × full ckpt | peak RSS | Δ RSS (train) | CUDA max | "
              "step s (median) | × full step | tokens/s | dev BLEU / chrF | test BLEU / chrF | Δ chrF vs bare | "
              "latency ms: bare / unmerged (×) / merged (×) |")
    rule = "|" + "---|" * (header.count("|") - 1)
    for domain in dict.fromkeys(r["domain"] for r in runs):
        lines += [f"## {domain}", "", header, rule]
        for r in (r for r in runs if r["domain"] == domain):
            lines.append(_row(r, domain if domain != "mixed" else None))
        lines.append("")
    lines += _cross_table(runs)
    errors = [r for r in runs if r.get("error")]
    if errors:
        lines += ["## Failed jobs", ""]
        lines += [f"- `{r['domain']}/{_label(r)}`: {r['error'].strip().splitlines()[-1]}" for r in errors]
        lines.append("")
    return "\n".join(lines)


def _row(r: dict, own: str | None) -> str:
    if r.get("error"):
        return f"| {_label(r)} | failed: {r['error'].strip().splitlines()[-1][:120]} |" + " |" * 13
    test = r["test"].get(own) if own else None
    if test is None:  # the mixed adapter: the average over the domains it was trained on
        tests = list(r["test"].values())
        test = {k: sum(t[k] for t in tests) / len(tests) for k in ("bleu", "chrf")}
        gain = {"chrf": sum(g["chrf"] for g in r["vs_bare"].values()) / max(len(r["vs_bare"]), 1)}
    else:
        gain = r["vs_bare"].get(own, {})
    dev = r.get("dev") or {}
    lat = r.get("latency") or {}
    return "| " + " | ".join([
        _label(r), _params(r.get("trainable_parameters")), _fmt(r.get("percent_of_backbone"), ".3g"),
        _size(r.get("file_bytes")), _fmt(r.get("file_vs_full"), ".2g"),
        _fmt(r.get("peak_rss_bytes"), ".2f", GIB) + " GiB", _fmt(r.get("train_rss_delta_bytes"), ".2f", GIB) + " GiB",
        _fmt(r.get("cuda_max_allocated_bytes"), ".2f", GIB),
        _fmt(r.get("step_seconds_median"), ".2f"), _fmt(r.get("step_time_vs_full"), ".2f"),
        _fmt(r.get("tokens_per_second"), ".0f"),
        f"{_fmt(dev.get('bleu'))} / {_fmt(dev.get('chrf'))}", f"{_fmt(test.get('bleu'))} / {_fmt(test.get('chrf'))}",
        _fmt(gain.get("chrf"), "+.1f"),
        f"{_fmt(lat.get('bare_ms'), '.0f')} / {_fmt(lat.get('unmerged_ms'), '.0f')} "
        f"({_fmt(lat.get('unmerged_ratio'), '.2f')}) / {_fmt(lat.get('merged_ms'), '.0f')} "
        f"({_fmt(lat.get('merged_ratio'), '.2f')})",
    ]) + " |"


def _cross_table(runs: list[dict]) -> list[str]:
    """Test chrF / BLEU of every adapter scored on more than one domain: the case for per-domain adapters."""
    multi = [r for r in runs if not r.get("error") and len(r.get("test", {})) > 1]
    if not multi:
        return []
    domains = list(dict.fromkeys(d for r in multi for d in r["test"]))
    lines = ["## Cross-domain: test chrF / BLEU of each adapter on each domain", "",
             "| adapter (trained on) | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for r in multi:
        who = "bare backbone" if r["method"] == "bare" else f"{_label(r)} ({'+'.join(r['train_domains'])})"
        if r["method"] == "bare" and r["domain"] != multi[0]["domain"]:
            continue
        cells = [f"{_fmt(r['test'][d]['chrf'])} / {_fmt(r['test'][d]['bleu'])}" if d in r["test"] else "–"
                 for d in domains]
        lines.append(f"| {who} | " + " | ".join(cells) + " |")
    return [*lines, ""]


# -- plots --------------------------------------------------------------------------------------

def plot(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """quality vs trainable parameters (log x) per domain; step time and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if not r.get("error")]
    domains = [d for d in dict.fromkeys(r["domain"] for r in runs) if d != "mixed"]
    name = report["name"]
    paths = []

    fig, axes = plt.subplots(1, len(domains), figsize=(6 * len(domains), 4.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        bare = next((r for r in runs if r["domain"] == domain and r["method"] == "bare"), None)
        if bare:
            ax.axhline(bare["test"][domain]["chrf"], ls="--", c="grey", label="bare backbone")
        for r in runs:
            if r["domain"] != domain or r["method"] == "bare" or domain not in r.get("test", {}):
                continue
            x = max(r["trainable_parameters"], 1)
            marker = "s" if r["library"] == "peft" else ("*" if r["method"] == "full" else "o")
            ax.scatter(x, r["test"][domain]["chrf"], marker=marker, s=60)
            ax.annotate(_label(r), (x, r["test"][domain]["chrf"]), fontsize=7, xytext=(4, 3),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log)")
        ax.set_ylabel("test chrF")
        ax.set_title(f"{domain} — {report['backbone']['name']}")
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    paths.append(out_dir / f"{name}-quality.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    # Grouped bars, one per domain: step time as the paired ratio to full fine-tuning (seconds drift
    # between jobs on a busy machine; the ratio is what compares), memory as peak RSS.
    labels = list(dict.fromkeys(_label(r) for r in runs if r["domain"] in domains))
    width = 0.8 / max(len(domains), 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for i, domain in enumerate(domains):
        by_label = {_label(r): r for r in runs if r["domain"] == domain}
        xs = [j + (i - (len(domains) - 1) / 2) * width for j in range(len(labels))]
        ax1.bar(xs, [by_label.get(label, {}).get("step_time_vs_full") or 0 for label in labels], width,
                label=domain)
        ax2.bar(xs, [by_label[label]["peak_rss_bytes"] / GIB if label in by_label else 0 for label in labels],
                width, label=domain)
    ax1.set_ylabel("train step time × full fine-tuning (paired by step)")
    ax1.axhline(1.0, ls="--", c="grey")
    ax2.set_ylabel("peak RSS (GiB)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(labels)), labels, rotation=60, fontsize=8, ha="right")
        ax.legend(fontsize=8)
        ax.set_title(report["backbone"]["name"])
    fig.tight_layout()
    paths.append(out_dir / f"{name}-cost.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def write_outputs(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{report['name']}.json", "markdown": out_dir / f"{report['name']}.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(report) + "\n", encoding="utf-8")
    for path in plot(report, out_dir):
        paths[path.stem.rsplit("-", 1)[-1]] = path
    report["outputs"] = {k: str(p) for k, p in paths.items()}
    return paths


# -- provenance ---------------------------------------------------------------------------------

def environment() -> dict[str, Any]:
    """Machine, library versions and git commit: what a reader needs to trust or redo the figures."""
    versions = {}
    for package in ("adaptkit", "torch", "transformers", "peft", "accelerate", "datasets", "sacrebleu", "tokenizers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    root = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    status = git("status", "--porcelain")
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "memory_bytes": psutil.virtual_memory().total, "python": platform.python_version()},
        "versions": versions,
        "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None},
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }

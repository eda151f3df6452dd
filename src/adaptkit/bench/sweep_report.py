"""The sweep's report: every run's curve in one JSON, tables at matched budgets and at each run's best
checkpoint with paired intervals against full fine-tuning, and the learning curves as a plot.

Read from the per-run JSON files alone (results/<name>/<method>.json), so it can be redrawn on any
machine, and a partial sweep gives a partial report.
"""

from __future__ import annotations

import datetime
import json
import statistics
from pathlib import Path
from typing import Any

from adaptkit.bench.sweep import BARE, SweepConfig, read_run, scored_sets
from adaptkit.evaluation.scoring import paired_bootstrap

GIB = 2**30
FULL = "full"
# Method pairs compared checkpoint by checkpoint (paired bootstrap on the test set), besides each against full FT.
PAIRS = [("lora-r16-all", "dora-r16-all"), ("lora-r16-all", "lora-r16-attn"), ("lora-r16-all", "lora-r8-all")]


def assemble_sweep(cfg: SweepConfig) -> dict[str, Any]:
    runs = [read_run(cfg, m) for m in [BARE, *cfg.methods]]
    runs = [r for r in runs if r["checkpoints"]]
    by_method = {r["method"]: r for r in runs}
    references = _references(cfg)
    full = by_method.get(FULL)
    bare = by_method.get(BARE)
    out_runs = []
    for run in runs:
        checkpoints = [_checkpoint(c, full, references, cfg, bare) for c in run["checkpoints"]]
        step_seconds = [s for seg in run.get("segments", []) for s in seg["step_seconds"]]
        entry = {"method": run["method"], "family": run["family"], "options": run["options"], "lr": run["lr"],
                 "trainable_parameters": run.get("trainable_parameters", 0), "file_bytes": run.get("file_bytes"),
                 "step_seconds_median": statistics.median(step_seconds) if step_seconds else None,
                 "peak_rss_bytes": max((seg["peak_rss_bytes"] for seg in run.get("segments", [])), default=None),
                 "converged_at": run.get("converged_at"), "checkpoints": checkpoints,
                 "backbone_untouched": next((c["backbone_untouched"] for c in checkpoints
                                             if "backbone_untouched" in c), None)}
        if run["method"] != BARE:
            best = max(run["checkpoints"], key=lambda c: c["dev"]["chrf"])
            entry["best"] = {"step": best["step"], "dev_chrf": best["dev"]["chrf"],
                             "test_chrf": best["test"]["chrf"]}
            if full and run["method"] != FULL:
                full_best = max(full["checkpoints"], key=lambda c: c["dev"]["chrf"])
                entry["best"]["vs_full_best"] = _paired(full_best["test"], best["test"], references["test"], cfg)
        out_runs.append(entry)
    trained = [r for r in out_runs if r["method"] != BARE]
    pairs = []
    for a, b in PAIRS:
        if a in by_method and b in by_method:
            steps_b = {c["step"]: c for c in by_method[b]["checkpoints"]}
            pairs.append({"a": a, "b": b, "by_step": [
                {"step": c["step"], **_paired(c["test"], steps_b[c["step"]]["test"], references["test"], cfg)}
                for c in by_method[a]["checkpoints"] if c["step"] in steps_b]})
    best_run = max(trained, key=lambda r: r["best"]["dev_chrf"], default=None)
    return {"name": cfg.name, "kind": "sweep", "backbone": cfg.backbone,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "config": {k: v for k, v in vars(cfg).items()},
            "best_method": best_run["method"] if best_run else None,
            "best_method_flat": bool(best_run and best_run["converged_at"] is not None),
            "runs": out_runs, "pairs": pairs}


def _references(cfg: SweepConfig) -> dict[str, list[str]]:
    """The reference translations of each scored set (the training corpus is not needed to redraw a report)."""
    data = scored_sets(cfg)
    return {key: [r["tgt"] for r in data[key]] for key in ["dev", *data["names"]]}


def _paired(a: dict, b: dict, refs: list[str], cfg: SweepConfig) -> dict[str, float]:
    gain = paired_bootstrap(a["hypotheses"], b["hypotheses"], refs, "chrf", cfg.resamples, cfg.seed)
    return {"chrf_diff": gain.gain, "low": gain.low, "high": gain.high, "sentences": gain.sentences}


def _checkpoint(c: dict, full: dict | None, references: dict, cfg: SweepConfig, bare: dict | None) -> dict:
    test = c["test"]
    out = {"step": c["step"], "train_seconds": c["train_seconds"], "test_sentences": test["sentences"],
           "chrf": test["chrf"], "chrf_low": test["chrf_low"], "chrf_high": test["chrf_high"],
           "bleu": test["bleu"], "bleu_low": test["bleu_low"], "bleu_high": test["bleu_high"],
           "dev_chrf": c["dev"]["chrf"], "dev_loss": c.get("dev_loss"),
           "ood": {k.split(":", 1)[1]: _brief(v) for k, v in c.items() if k.startswith("ood:")}}
    if "forgetting" in c:
        out["forgetting"] = _brief(c["forgetting"])
    if "forgetting_adapter_off" in c and bare:
        off = c["forgetting_adapter_off"]["hypotheses"]
        out["backbone_untouched"] = off == bare["checkpoints"][0]["forgetting"]["hypotheses"]
    if full and c["step"]:
        same = next((f for f in full["checkpoints"] if f["step"] == c["step"]), None)
        if same is not None and same is not c:
            out["vs_full"] = _paired(same["test"], test, references["test"], cfg)
    return out


def _brief(scores: dict) -> dict[str, float]:
    return {k: scores[k] for k in ("sentences", "chrf", "chrf_low", "chrf_high", "bleu", "bleu_low", "bleu_high")}


# -- markdown -----------------------------------------------------------------------------------

def sweep_markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    trained = [r for r in runs if r["method"] != BARE]
    steps = sorted({c["step"] for r in trained for c in r["checkpoints"]})
    bare = next((r for r in runs if r["method"] == BARE), None)
    lines = [f"# Training-budget sweep: {report['name']} ({report['backbone']})", "",
             f"Test chrF on {_test_size(runs)} sentences (greedy) with its 95 % bootstrap interval, by optimizer "
             f"steps of batch {report['config']['batch_size']}; constant rate after "
             f"{report['config']['warmup_steps']} warm-up steps.",
             ""]
    if bare:
        b = bare["checkpoints"][0]
        lines.append(f"Bare backbone: test chrF {b['chrf']:.1f} [{b['chrf_low']:.1f}, {b['chrf_high']:.1f}].")
        lines.append("")
    lines += ["| method | " + " | ".join(str(s) for s in steps) + " |", "|---|" + "---:|" * len(steps)]
    for r in trained:
        by_step = {c["step"]: c for c in r["checkpoints"]}
        cells = [f"{by_step[s]['chrf']:.1f} [{by_step[s]['chrf_low']:.1f}, {by_step[s]['chrf_high']:.1f}]"
                 if s in by_step else "" for s in steps]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "## At each method's best checkpoint (by dev chrF)", "",
              "| method | step | test chrF | BLEU | Δ chrF vs full FT (95 % CI, paired) | out-of-domain chrF | "
              "forgetting set chrF | trainable | file | step s | peak RSS | flat at |",
              "|---|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|"]
    for r in trained:
        best = next(c for c in r["checkpoints"] if c["step"] == r["best"]["step"])
        vs = r["best"].get("vs_full_best")
        ood = ", ".join(f"{k} {v['chrf']:.1f}" for k, v in best["ood"].items())
        forgetting = (f"{best['forgetting']['chrf']:.1f}" if "forgetting" in best else
                      "= bare (checked)" if r.get("backbone_untouched") else "")
        lines.append(
            f"| {r['method']} | {best['step']} | {best['chrf']:.1f} | {best['bleu']:.1f} | "
            + (f"{vs['chrf_diff']:+.1f} [{vs['low']:+.1f}, {vs['high']:+.1f}]" if vs else "") + f" | {ood} | "
            f"{forgetting} | {r['trainable_parameters']:,} | {_size(r['file_bytes'])} | "
            f"{_num(r['step_seconds_median'], '.2f')} | {_size(r['peak_rss_bytes'])} | {r['converged_at'] or '–'} |")
    for pair in report.get("pairs", []):
        if pair["by_step"]:
            lines += ["", f"{pair['b']} − {pair['a']}, test chrF (95 % paired interval) by step: " + "; ".join(
                f"{x['step']}: {x['chrf_diff']:+.1f} [{x['low']:+.1f}, {x['high']:+.1f}]" for x in pair["by_step"])]
    lines += ["", f"Best method by dev chrF: {report['best_method']}; its curve "
              + ("has flattened." if report["best_method_flat"] else "has not flattened yet.")]
    return "\n".join(lines)


def _test_size(runs: list[dict]) -> int:
    return next((c["test_sentences"] for r in runs for c in r["checkpoints"]), 0)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


# -- plot ---------------------------------------------------------------------------------------

def sweep_plot(report: dict[str, Any], path: Path) -> Path:
    """chrF against steps (log) and against training seconds, one line per method, shaded 95 % intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    bare = next((r for r in report["runs"] if r["method"] == BARE), None)
    for r in report["runs"]:
        if r["method"] == BARE:
            continue
        cs = r["checkpoints"]
        for ax, xs in zip(axes, ([c["step"] for c in cs], [c["train_seconds"] / 60 for c in cs])):
            line, = ax.plot(xs, [c["chrf"] for c in cs], marker="o", label=r["method"])
            ax.fill_between(xs, [c["chrf_low"] for c in cs], [c["chrf_high"] for c in cs], alpha=0.15,
                            color=line.get_color())
    for ax, label in zip(axes, ("optimizer steps (log)", "training minutes (log)")):
        if bare:
            ax.axhline(bare["checkpoints"][0]["chrf"], ls="--", c="grey", label="bare backbone")
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(f"test chrF ({_test_size(report['runs'])} sentences)")
        ax.set_title(f"{report['name']} — {report['backbone']}")
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_sweep_report(cfg: SweepConfig) -> dict[str, Path]:
    report = assemble_sweep(cfg)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{cfg.name}.json", "markdown": out / f"{cfg.name}.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(sweep_markdown(report) + "\n", encoding="utf-8")
    if any(r["method"] != BARE for r in report["runs"]):
        paths["plot"] = sweep_plot(report, out / f"{cfg.name}.png")
    return paths

"""The training-budget sweep: each method trained once, scored at log-spaced checkpoints, resumable.

    plan (print the CPU time left) → for each method, a forked worker:
        train to the next checkpoint (the trainer's own checkpoints, resume=True)
        → score dev, test, out-of-domain (and, for full fine-tuning, the forgetting set) → append to the run's JSON
    → report (sweep_report.py): curves, tables at matched budgets, paired intervals against full fine-tuning

One run per method yields its whole curve because the schedule after warm-up does not depend on
the final budget (constant rate by default): the model at step 400 of a 1,600-step run is the
model a 400-step run would give. A run stops early once its dev chrF gains less than `flat_delta`
over its last doubling of steps.

Resuming is two-layered. The run's JSON (committed under benchmarks/results/<name>/) lists the
checkpoints already scored: those are never scored again. The trainer's checkpoints (under
work_dir, never committed) hold the weights and optimizer: a killed run continues from the last
one (at most `checkpoint_every` steps lost). On a machine without them (a later sitting) the run
trains again from step 0 to its next unscored checkpoint; data order and initialisation come from
the seed, so it retraces the same path.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaptkit.bench.jobs import DEFAULT_LRS
from adaptkit.bench.report import environment
from adaptkit.core.atomicfile import write_atomic
from adaptkit.core.bank import load
from adaptkit.data import PromptFormat, load_pairs
from adaptkit.evaluation.scoring import bootstrap_interval, translation_metrics
from adaptkit.evaluation.translation import generate_translations
from adaptkit.training.config import known_options, option, slug
from adaptkit.training.trainer import train

# name → (family, family options). AdaLoRA is left out: its rank budget is scheduled over the
# final step count, so one run cannot stand for every budget on the curve.
SWEEP_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "full": ("full", {}),
    "lora-r16-all": ("lora", {"r": 16, "alpha": 32.0, "targets": "all-linear"}),
    "lora-r16-attn": ("lora", {"r": 16, "alpha": 32.0, "targets": "attention"}),
    "lora-r8-all": ("lora", {"r": 8, "alpha": 16.0, "targets": "all-linear"}),
    "dora-r16-all": ("lora", {"r": 16, "alpha": 32.0, "targets": "all-linear", "use_dora": True}),
    "prefix": ("prefix", {"length": 16}),
    "bottleneck": ("bottleneck", {"placement": "pfeiffer", "reduction": 16}),
}
BARE = "bare"  # the untouched backbone, scored once: the floor, and what adapters keep on other tasks


@dataclasses.dataclass
class SweepConfig:
    """Every option of `adaptkit bench sweep` (flags, or the `[sweep]` table of a config file)."""

    name: str = option("sweep-help-en-de", help="results/<name>.json/.md/.png, per-run JSON in results/<name>/")
    backbone: str = option("gemma3-270m", help="zoo name, local dir or Hub id")
    methods: list[str] = option(factory=lambda: ["full", "lora-r16-all", "lora-r16-attn", "lora-r8-all",
                                                 "dora-r16-all", "prefix", "bottleneck"],
                                help=f"methods to run, in order (of {', '.join(SWEEP_METHODS)}; the bare "
                                     "backbone is always scored first)")
    train_data: str = option("libreoffice-help-en-de", help="training pairs: a shipped sample or a directory "
                                                            "from `adaptkit corpus build` (the full corpus)")
    train_rows: int | None = option(None, help="keep only the first N training pairs (capped-data runs)")
    train_max_words: int | None = option(60, help="drop training pairs with more words than this on a side")
    synthetic: str | None = option(None, help="synthetic pairs mixed into every batch (back-translation)")
    synthetic_ratio: float = option(0.5, help="with synthetic: its share of every batch")
    synthetic_tag: str | None = option(None, help='with synthetic: prefix of synthetic sources, e.g. "<BT> "')
    dev: str = option("libreoffice-help-en-de", help="dev set (its dev split): the convergence rule reads it")
    test: str = option("libreoffice-help-en-de", help="the in-domain test set (its test split)")
    ood_tests: list[str] = option(factory=lambda: ["libreoffice-ui-en-de"],
                                  help="out-of-domain test sets scored at every checkpoint (their test splits)")
    forgetting_test: str | None = option("bible-en-es", help="another task of the backbone, scored for full "
                                                             "fine-tuning at every checkpoint (adapters leave "
                                                             "the backbone untouched; checked at their end)")
    dev_sentences: int = option(100, help="dev sentences per checkpoint")
    test_sentences: int = option(200, help="sentences per test set")
    checkpoints: list[int] = option(factory=lambda: [50, 100, 200, 400, 800, 1600],
                                    help="optimizer steps at which every run is scored")
    flat_delta: float | None = option(0.5, help="stop a run once its dev chrF gains less than this over its last "
                                                "doubling of steps (none: run every checkpoint)")
    batch_size: int = option(8, help="rows per step")
    warmup_steps: int = option(30, help="warm-up steps; the rate is constant after them")
    lrs: dict[str, float] = option(factory=lambda: dict(DEFAULT_LRS), help="peak learning rate per family")
    max_source_len: int = option(128, help="source tokens kept per training row")
    max_target_len: int = option(128, help="target tokens kept per training row")
    max_new_tokens: int = option(128, help="new tokens at most per translation")
    eval_batch_size: int = option(16, help="rows decoding together (continuous batching)")
    checkpoint_every: int = option(50, help="trainer checkpoints between sweep checkpoints (lost work on a kill)")
    resamples: int = option(1000, help="bootstrap resamples of each interval")
    seed: int = option(0, help="data order and initialisation")
    threads: int | None = option(None, help="torch CPU threads (default: torch's)")
    results_dir: str = option("benchmarks/results", help="the report goes here; each run's JSON in <dir>/<name>/")
    work_dir: str = option("runs/sweep", help="trainer checkpoints and weights (<dir>/<name>/<method>/)")
    progress: bool = option(True, help="progress bars on stderr")

    def __post_init__(self) -> None:
        if unknown := sorted(set(self.methods) - set(SWEEP_METHODS)):
            raise ValueError(f"unknown sweep method(s) {unknown}; known: {sorted(SWEEP_METHODS)}")
        if not self.checkpoints or sorted(set(self.checkpoints)) != list(self.checkpoints) or self.checkpoints[0] < 1:
            raise ValueError(f"checkpoints must be increasing positive step counts; got {self.checkpoints}")
        if self.warmup_steps >= self.checkpoints[0]:
            raise ValueError(f"warm-up ({self.warmup_steps} steps) must end before the first checkpoint "
                             f"({self.checkpoints[0]}): the curve is read at a constant rate")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        return cls(**known_options(cls, data, "sweep"))

    def run_path(self, method: str) -> Path:
        return Path(self.results_dir) / self.name / f"{method}.json"

    def lr(self, family: str) -> float:
        return {**DEFAULT_LRS, **self.lrs}[family]


# -- the run's JSON is its state ---------------------------------------------------------------

def read_run(cfg: SweepConfig, method: str) -> dict[str, Any]:
    path = cfg.run_path(method)
    if path.is_file():
        return json.loads(path.read_text())
    family, options = SWEEP_METHODS.get(method, ("bare", {}))
    return {"method": method, "family": family, "options": options,
            "lr": None if method == BARE else cfg.lr(family), "checkpoints": [], "segments": [],
            "converged_at": None}


def next_steps(cfg: SweepConfig, run: dict[str, Any]) -> list[int]:
    """The checkpoints still to score, or none once the run has flattened."""
    if run["method"] == BARE:
        return [] if run["checkpoints"] else [0]
    if run.get("converged_at") is not None:
        return []
    done = {c["step"] for c in run["checkpoints"]}
    return [s for s in cfg.checkpoints if s not in done]


def flattened(cfg: SweepConfig, run: dict[str, Any]) -> bool:
    """Dev chrF gained less than flat_delta from the checkpoint at half the steps to the last one."""
    if cfg.flat_delta is None or len(run["checkpoints"]) < 2:
        return False
    by_step = {c["step"]: c["dev"]["chrf"] for c in run["checkpoints"]}
    last = run["checkpoints"][-1]["step"]
    half = max((s for s in by_step if s <= last // 2), default=None)
    return half is not None and by_step[last] - by_step[half] < cfg.flat_delta


# -- data ---------------------------------------------------------------------------------------

def sweep_data(cfg: SweepConfig) -> dict[str, Any]:
    """Training pairs (filtered, capped), the dev rows and every test set, loaded once for all runs."""
    if "/" in cfg.train_data and not Path(cfg.train_data).exists():
        raise FileNotFoundError(f"training data {cfg.train_data} does not exist; build the full corpus first, e.g. "
                                "`adaptkit corpus build libreoffice-help --langs de --out "
                                "runs/corpora/libreoffice-help`, or name a shipped sample (`adaptkit corpus samples`)")
    rows = load_pairs(cfg.train_data, "train")
    if cfg.train_max_words:
        limit = cfg.train_max_words
        rows = rows.filter(lambda r: len(r["src"].split()) <= limit and len(r["tgt"].split()) <= limit)
    if cfg.train_rows:
        rows = rows.select(range(min(cfg.train_rows, len(rows))))
    return {"train": rows, **scored_sets(cfg)}


def scored_sets(cfg: SweepConfig) -> dict[str, Any]:
    """The dev rows and every test set (`names`: key → set), without the training corpus: what a report needs."""
    tests = {"test": cfg.test, **{f"ood:{name}": name for name in cfg.ood_tests}}
    if cfg.forgetting_test:
        tests["forgetting"] = cfg.forgetting_test
    sets = {"dev": _first(load_pairs(cfg.dev, "dev"), cfg.dev_sentences)}
    sets.update({key: _first(load_pairs(name, "test"), cfg.test_sentences) for key, name in tests.items()})
    return {**sets, "names": tests}


def _first(rows: Any, n: int) -> Any:
    return rows.select(range(min(n, len(rows))))


# -- one checkpoint -----------------------------------------------------------------------------

def score_set(model: Any, route: Any, rows: Any, cfg: SweepConfig, prompt: Any) -> dict[str, Any]:
    """Greedy translations of `rows` and their corpus chrF / BLEU with 95 % bootstrap intervals."""
    hypotheses = generate_translations(model, rows, route, prompt=prompt, batch_size=cfg.eval_batch_size,
                                       max_new_tokens=cfg.max_new_tokens)
    references = [r["tgt"] for r in rows]
    scores = translation_metrics(hypotheses, references)
    out: dict[str, Any] = {"sentences": len(rows), "chrf": scores["chrf"], "bleu": scores["bleu"]}
    for metric in ("chrf", "bleu"):
        out[f"{metric}_low"], out[f"{metric}_high"] = bootstrap_interval(hypotheses, references, metric,
                                                                         cfg.resamples, cfg.seed)
    out["hypotheses"] = hypotheses
    return out


def score_checkpoint(model: Any, route: Any, data: dict, cfg: SweepConfig, *, forgetting: bool,
                     bar: Any = None) -> dict[str, Any]:
    prompt = PromptFormat() if model.family == "decoder" else None
    model.eval()
    keys = ["dev", "test", *[k for k in data["names"] if k.startswith("ood:")]]
    if forgetting and "forgetting" in data["names"]:
        keys.append("forgetting")
    scores = {}
    for key in keys:
        if bar is not None:
            bar(f"scoring {key}")
        scores[key] = score_set(model, route, data[key], cfg, prompt)
    return scores


# -- one run ------------------------------------------------------------------------------------

def run_method(method: str, cfg: SweepConfig, load_model: Callable[[], Any], data: dict) -> dict[str, Any]:
    """Train and score `method` up to its last unscored checkpoint (or until it flattens)."""
    run = read_run(cfg, method)
    todo = next_steps(cfg, run)
    if not todo:
        return run
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run.setdefault("environment", environment())
    model = load_model()
    run["backbone_parameters"] = sum(p.numel() for p in model.model.parameters())

    def say(text: str) -> None:
        if cfg.progress:
            print(f"[{method}] {text}", file=sys.stderr, flush=True)

    if method == BARE:
        began = time.perf_counter()
        scores = score_checkpoint(model, None, data, cfg, forgetting=True, bar=say)
        run["checkpoints"].append({"step": 0, "train_seconds": 0.0, "eval_seconds": time.perf_counter() - began,
                                   **scores})
        _save(cfg, run)
        return run

    family, options = SWEEP_METHODS[method]
    full = family == "full"
    work = Path(cfg.work_dir) / cfg.name / slug(method)
    for step in todo:
        say(f"training to step {step}")
        summary = train(model, None if full else method, data["train"], data["dev"], full=full,
                        method="lora" if full else family, adapter_options=dict(options), max_steps=step,
                        batch_size=cfg.batch_size, lr=cfg.lr(family), warmup_steps=cfg.warmup_steps,
                        schedule="constant", seed=cfg.seed, eval_every=None, generate=False,
                        checkpoint_every=cfg.checkpoint_every, max_source_len=cfg.max_source_len,
                        max_target_len=cfg.max_target_len, output_dir=str(work), resume=True,
                        synthetic=cfg.synthetic, synthetic_ratio=cfg.synthetic_ratio,
                        synthetic_tag=cfg.synthetic_tag, progress=cfg.progress)
        run["trainable_parameters"] = summary["trainable_parameters"]
        run["file_bytes"] = _bytes(Path(summary["output"]))
        run["segments"].append({"to_step": step, "steps_run": len(summary["step_seconds"]),
                                "step_seconds": summary["step_seconds"], "peak_rss_bytes": _peak_rss()})
        began = time.perf_counter()
        last = step == cfg.checkpoints[-1]
        scores = score_checkpoint(model, None if full else method, data, cfg, forgetting=full, bar=say)
        checkpoint = {"step": step, "train_seconds": _train_seconds(run, step), "dev_loss": summary["last_metrics"]
                      .get("loss"), **scores}
        run["checkpoints"].append(checkpoint)
        flat = flattened(cfg, run)
        if flat or last:
            run["converged_at"] = step if flat else None
            if not full and cfg.forgetting_test:  # the backbone answers as before with the adapter off
                checkpoint["forgetting_adapter_off"] = score_set(model, None, data["forgetting"], cfg,
                                                                 PromptFormat() if model.family == "decoder" else None)
        checkpoint["eval_seconds"] = time.perf_counter() - began
        _save(cfg, run)
        say(f"step {step}: dev chrF {scores['dev']['chrf']:.1f}, test chrF {scores['test']['chrf']:.1f} "
            f"[{scores['test']['chrf_low']:.1f}, {scores['test']['chrf_high']:.1f}]")
        if run["converged_at"] is not None:
            say(f"flat: dev chrF gained < {cfg.flat_delta} over the last doubling; stopping at step {step}")
            break
    return run


def _train_seconds(run: dict[str, Any], step: int) -> float:
    """Training seconds to reach `step`: each step counted once, from the segments that ran it."""
    by_step: dict[int, float] = {}
    for segment in run["segments"]:
        first = segment["to_step"] - segment["steps_run"] + 1
        for i, seconds in enumerate(segment["step_seconds"]):
            by_step[first + i] = seconds
    return sum(v for k, v in by_step.items() if k <= step)


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors")) if path.is_dir() else path.stat().st_size


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _save(cfg: SweepConfig, run: dict[str, Any]) -> None:
    path = cfg.run_path(run["method"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(run, indent=1) + "\n").encode())  # a kill mid-write keeps the old one


# -- the plan and its cost ----------------------------------------------------------------------

def estimate(cfg: SweepConfig) -> list[dict[str, Any]]:
    """Per method: checkpoints left, steps left, and the seconds they will take where a run has measured its
    own step and scoring time (None before its first checkpoint)."""
    rows = []
    for method in [BARE, *cfg.methods]:
        run = read_run(cfg, method)
        todo = next_steps(cfg, run)
        done = max((c["step"] for c in run["checkpoints"]), default=0)
        steps = (todo[-1] if todo else 0) if method != BARE else 0
        # a later sitting has no trainer checkpoint: training restarts from 0 up to the next checkpoint
        start = done if (Path(cfg.work_dir) / cfg.name / slug(method) / "checkpoints").is_dir() else 0
        step_s = [s for seg in run["segments"] for s in seg["step_seconds"]]
        evals = [c["eval_seconds"] for c in run["checkpoints"] if "eval_seconds" in c]
        seconds = None
        if (step_s or method == BARE) and evals:
            seconds = max(0, steps - start) * (statistics.median(step_s) if step_s else 0) + len(todo) * max(evals)
        rows.append({"method": method, "done": done, "left": todo, "steps_to_train": max(0, steps - start),
                     "seconds": seconds})
    return rows


def print_plan(cfg: SweepConfig, file: Any = sys.stderr) -> None:
    rows = estimate(cfg)
    print(f"sweep {cfg.name}: {cfg.backbone}, checkpoints {cfg.checkpoints}, batch {cfg.batch_size}", file=file)
    for r in rows:
        cost = "unknown until its first checkpoint" if r["seconds"] is None else f"~{r['seconds'] / 3600:.1f} h"
        state = "done" if not r["left"] else f"to score {r['left']}, {r['steps_to_train']} steps to train, {cost}"
        print(f"  {r['method']:<14} scored up to {r['done']:>5}: {state}", file=file)
    known = [r["seconds"] for r in rows if r["seconds"] is not None and r["left"]]
    if known:
        print(f"  CPU time left for the runs that have measured theirs: ~{sum(known) / 3600:.1f} h", file=file)


def run_sweep(cfg: SweepConfig, load_model: Callable[[], Any] | None = None, data: dict | None = None,
              fork: bool = True) -> list[dict[str, Any]]:
    """Run every method's remaining checkpoints, each method in a forked worker (honest peak RSS)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if load_model is None:
        def load_model() -> Any:
            return load(cfg.backbone)
    data = data if data is not None else sweep_data(cfg)
    print_plan(cfg)
    fork = fork and "fork" in multiprocessing.get_all_start_methods() and not torch.cuda.is_initialized()
    for method in [BARE, *cfg.methods]:
        if not next_steps(cfg, read_run(cfg, method)):
            continue
        if fork:
            worker = multiprocessing.get_context("fork").Process(target=run_method,
                                                                 args=(method, cfg, load_model, data))
            worker.start()
            worker.join()
            if worker.exitcode:
                raise RuntimeError(f"the {method} run exited with code {worker.exitcode}; what it scored is "
                                   f"kept in {cfg.run_path(method)} and the sweep resumes from it")
        else:
            run_method(method, cfg, load_model, data)
    return [read_run(cfg, m) for m in [BARE, *cfg.methods]]

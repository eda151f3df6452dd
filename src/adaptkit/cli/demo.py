"""`adaptkit demo`: the main job end to end, on a fresh machine, with no options.

1. fetch the default backbone (gemma3-270m) through the zoo, show its licence, print the plan and an
   ETA (calibrated on this machine by one timed forward pass);
2. score the bare backbone on held-out sentences of two domains (chrF / BLEU);
3. train a LoRA adapter for English→German software documentation and a bottleneck adapter for
   English→Spanish Bible text on the shipped samples, each saved as one .safetensors file;
4. drop both, hot-load them from their files onto the same backbone, and translate one batch
   that mixes both domains — each row routed to its own adapter by the file's metadata;
5. print a table of what was measured in this run (gain with a paired-bootstrap interval), and
   write it as JSON.

The default is sized to finish in a few minutes on 2 CPU cores; `--full` trains and scores more.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from adaptkit import zoo
from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.corpora import load_sample
from adaptkit.evaluation.scoring import paired_bootstrap
from adaptkit.methods import AdapterConfig, Bottleneck, LoRA
from adaptkit.tasks.translate import Translator
from adaptkit.training.trainer import train


@dataclass
class DemoDomain:
    adapter: str
    sample: str
    src_lang: str
    tgt_lang: str
    domain: str
    config: AdapterConfig
    lr: float


DOMAINS = [
    DemoDomain("en-de/software", "libreoffice-help-en-de", "en", "de", "software",
               LoRA(r=16, alpha=32, targets="all-linear"), lr=1e-3),
    DemoDomain("en-es/bible", "bible-en-es", "en", "es", "bible",
               Bottleneck(reduction=8, placement="pfeiffer"), lr=2e-3),
]


@dataclass(frozen=True)
class DemoBudget:
    """How much the demo trains and scores. Lengths are capped so that every step costs about the same."""

    steps: int = 24  # optimizer steps per adapter, batch `batch_size`
    eval_sentences: int = 32  # held-out test sentences per domain, scored bare and adapted
    batch_size: int = 8
    max_len: int = 96  # tokens of source and of target in training
    max_new_tokens: int = 96


QUICK = DemoBudget()
FULL = DemoBudget(steps=120, eval_sentences=200, max_len=256, max_new_tokens=128)

# Seconds on the reference machine (2 CPU cores, gemma3-270m, the default budget), from one run's
# `phase_seconds` (runs/demo/demo_results.json) divided by its steps and sentences: one no-grad forward of
# the calibration batch, one training step per family (dev loss and save included), one translated sentence
# bare and adapted (adapted outputs are longer; the hot-load is included). The ETA scales them by this
# machine's own calibration forward.
REFERENCE = {"forward": 1.79, "lora": 5.07, "bottleneck": 4.67, "bare_sentence": 0.59, "adapted_sentence": 1.08}


def _calibrate(model: AdaptedModel) -> float:
    """Seconds of one timed no-grad forward of a fixed 8 x 64-token batch (the reference machine: REFERENCE)."""
    ids = torch.full((8, 64), model.tokenizer.eos_token_id or 1, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=ids[:1, :8], adapter=None)  # first call pays one-off set-up costs
        start = time.perf_counter()
        model(input_ids=ids, adapter=None)
    return time.perf_counter() - start


def plan_seconds(budget: DemoBudget, slowdown: float = 1.0) -> dict[str, float]:
    """Estimated seconds per phase: bare scoring, training each domain, the mixed adapted batch.

    Length caps are left out: at the default caps only 10 of 2,000 sources are truncated and outputs
    stop at the end of their first line, so raising the caps barely changes what a step or a sentence costs.
    """
    sentences = budget.eval_sentences * len(DOMAINS)
    phases = {"score bare backbone": sentences * REFERENCE["bare_sentence"]}
    for d in DOMAINS:
        phases[f"train {d.adapter}"] = budget.steps * REFERENCE[d.config.method]
    phases["hot-swap + mixed batch"] = sentences * REFERENCE["adapted_sentence"]
    return {k: v * slowdown for k, v in phases.items()}


def run_demo(backbone: str = "gemma3-270m", budget: DemoBudget = QUICK, out: str | Path = "runs/demo",
             console: Console | None = None) -> dict[str, Any]:
    # Not a terminal (a log file, CI): rich would wrap the table at 80 columns.
    console = console or (Console() if sys.stdout.isatty() else Console(width=150))
    out = Path(out)
    started = time.perf_counter()
    if backbone in zoo.ZOO:
        entry = zoo.ZOO[backbone]
        console.rule(f"[bold]{backbone}[/bold]: {entry.what}")
        console.print(f"Licence: [bold]{entry.licence}[/bold] — {entry.licence_note}")
        if entry.note:
            console.print(f"[dim]{entry.note}[/dim]")
    model = AdaptedModel.from_pretrained(backbone)
    console.print(f"Loaded {backbone}: {model.num_parameters()['backbone'] / 1e6:.1f}M parameters, frozen, "
                  f"family {model.family} ({time.perf_counter() - started:.0f} s)")

    calibration = _calibrate(model)
    slowdown = calibration / REFERENCE["forward"]
    estimate = plan_seconds(budget, slowdown)
    console.rule("Plan")
    for phase, seconds in estimate.items():
        console.print(f"  {phase:<32} ~{seconds / 60:4.1f} min")
    console.print(f"  [bold]ETA ~{sum(estimate.values()) / 60:.0f} min[/bold] ({budget.steps} steps × batch "
                  f"{budget.batch_size} per adapter, {budget.eval_sentences} test sentences per domain; this "
                  f"machine runs at {1 / slowdown:.2f}× the reference 2-core CPU)"
                  + ("" if budget == FULL else "; `adaptkit demo --full` trains and scores more"))

    tests = {d.adapter: list(load_sample(d.sample, "test"))[: budget.eval_sentences] for d in DOMAINS}
    translator = Translator(model, batch_size=16)
    generation = {"num_beams": 1, "max_new_tokens": budget.max_new_tokens, "progress": True}
    results: dict[str, Any] = {"backbone": backbone, "budget": asdict(budget), "domains": {}, "phase_seconds": {},
                               "estimated_seconds": estimate, "calibration_forward_seconds": calibration}

    def phase_done(name: str, since: float) -> float:
        results["phase_seconds"][name] = round(time.perf_counter() - since, 1)
        return time.perf_counter()

    console.rule("Bare backbone on held-out sentences")
    since = time.perf_counter()
    bare = {d.adapter: translator.translate([r["src"] for r in tests[d.adapter]], d.src_lang, d.tgt_lang,
                                            adapter=None, **generation) for d in DOMAINS}
    since = phase_done("score bare backbone", since)

    files = {}
    for d in DOMAINS:
        console.rule(f"Training {d.config.method} adapter {d.adapter!r} on {d.sample}")
        # Dev loss only during training: the adapted translations are scored once, after the hot-swap.
        summary = train(model, adapter=d.adapter, train=d.sample, dev=d.sample, adapter_config=d.config,
                        max_steps=budget.steps, batch_size=budget.batch_size, lr=d.lr,
                        warmup_steps=max(1, budget.steps // 10), eval_every=budget.steps, eval_samples=32,
                        generate=False, max_source_len=budget.max_len, max_target_len=budget.max_len,
                        src_lang=d.src_lang, tgt_lang=d.tgt_lang, domain=d.domain,
                        output_dir=str(out / d.adapter.replace("/", "_")), resume=False)
        files[d.adapter] = Path(summary["output"])
        results["domains"][d.adapter] = {"train_seconds": summary.get("seconds"),
                                         "tokens_per_second": summary.get("tokens_per_second")}
        since = phase_done(f"train {d.adapter}", since)

    console.rule("Hot-swap: drop both adapters, load them back from their files, one mixed batch")
    for name in list(model.adapters):
        model.remove_adapter(name)
    for d in DOMAINS:
        name = model.load_adapter(files[d.adapter])
        info = read_adapter_info(files[d.adapter])
        console.print(f"loaded {name!r} ({info['method']}, {info['num_parameters']:,} parameters, "
                      f"{info['file_bytes'] / 1024:.0f} KiB) from {files[d.adapter]}")
    # Interleave both domains in one list: the translator routes each row by (src, tgt, domain).
    mixed = [(d, row) for pair in zip(*(tests[d.adapter] for d in DOMAINS)) for d, row in zip(DOMAINS, pair)]
    outputs = translator.translate([row["src"] for _, row in mixed], [d.src_lang for d, _ in mixed],
                                   [d.tgt_lang for d, _ in mixed], domain=[d.domain for d, _ in mixed],
                                   **generation)
    phase_done("hot-swap + mixed batch", since)

    table = Table(title=f"{backbone}: bare backbone vs. adapter, {len(mixed) // len(DOMAINS)} held-out sentences "
                        "per domain (95% CI of the gain: paired bootstrap)")
    for column in ("domain", "adapter", "trainable params", "% of backbone", "file", "chrF bare → adapted",
                   "BLEU bare → adapted"):
        table.add_column(column, justify="right" if column not in ("domain", "adapter") else "left")
    for d in DOMAINS:
        hyps = [o for (dd, _), o in zip(mixed, outputs) if dd is d]
        refs = [row["tgt"] for dd, row in mixed if dd is d]
        chrf = paired_bootstrap(bare[d.adapter][: len(refs)], hyps, refs, "chrf")
        bleu = paired_bootstrap(bare[d.adapter][: len(refs)], hyps, refs, "bleu")
        params = model.num_parameters(d.adapter)
        size = files[d.adapter].stat().st_size
        results["domains"][d.adapter].update({
            "method": d.config.method, "sample": d.sample, "file": str(files[d.adapter]), "file_bytes": size,
            "trainable": params["trainable"], "percent_of_backbone": params["percent_of_backbone"],
            "chrf": asdict(chrf), "bleu": asdict(bleu),
            "examples": [{"src": row["src"], "ref": row["tgt"], "bare": b, "adapted": h}
                         for (_, row), b, h in zip([m for m in mixed if m[0] is d], bare[d.adapter], hyps)][:3],
        })
        table.add_row(d.domain, f"{d.adapter} ({d.config.method})", f"{params['trainable']:,}",
                      f"{params['percent_of_backbone']:.2f}%", f"{size / 1024:.0f} KiB", f"[bold]{chrf}[/bold]",
                      str(bleu))
    console.print(table)
    for d in DOMAINS:
        console.rule(f"Examples: {d.adapter}")
        for example in results["domains"][d.adapter]["examples"]:
            console.print(f"[dim]source   [/dim] {example['src']}\n[dim]bare     [/dim] {example['bare']}")
            console.print(f"[dim]adapted  [/dim] [bold]{example['adapted']}[/bold]")
            console.print(f"[dim]reference[/dim] {example['ref']}\n")
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    console.print(f"Done in {results['wall_seconds'] / 60:.1f} min (estimated {sum(estimate.values()) / 60:.1f}); "
                  f"results in {out / 'demo_results.json'}")
    return results


def _demo(args: argparse.Namespace) -> int:
    budget = FULL if args.full else QUICK
    overrides = {k: v for k, v in (("steps", args.steps), ("eval_sentences", args.eval_sentences)) if v is not None}
    run_demo(args.backbone, DemoBudget(**{**asdict(budget), **overrides}), args.out)
    return 0


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train two adapters of two families on gemma3-270m and hot-swap them")
    parser.add_argument("--backbone", default="gemma3-270m", help="zoo name, local dir or Hub id")
    parser.add_argument("--full", action="store_true",
                        help=f"the longer version: {FULL.steps} steps per adapter, {FULL.eval_sentences} test "
                             f"sentences per domain (default: {QUICK.steps} and {QUICK.eval_sentences})")
    parser.add_argument("--steps", type=int, help="optimizer steps per adapter (overrides the budget)")
    parser.add_argument("--eval-sentences", type=int, help="held-out sentences per domain (overrides the budget)")
    parser.add_argument("--out", default="runs/demo")
    parser.set_defaults(func=_demo)

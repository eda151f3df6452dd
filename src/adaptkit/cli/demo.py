"""`adaptkit demo`: the main job end to end, on a fresh machine, with no options.

1. fetch the default backbone (gemma3-270m) through the zoo and show its licence;
2. score the bare backbone on held-out sentences of two domains (chrF / BLEU);
3. train a LoRA adapter for English→German software documentation and a bottleneck adapter for
   English→Spanish Bible text on the shipped samples, each saved as one .safetensors file;
4. drop both, hot-load them from their files onto the same backbone, and translate one batch
   that mixes both domains — each row routed to its own adapter by the file's metadata;
5. print a table of what was measured in this run, and write it as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from adaptkit import zoo
from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.corpora import load_sample
from adaptkit.evaluation import translation_metrics
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


def run_demo(backbone: str = "gemma3-270m", steps: int = 40, eval_sentences: int = 40, batch_size: int = 8,
             out: str | Path = "runs/demo", console: Console | None = None) -> dict[str, Any]:
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
                  f"family {model.family}")

    tests = {d.adapter: list(load_sample(d.sample, "test"))[:eval_sentences] for d in DOMAINS}
    translator = Translator(model, batch_size=16)
    results: dict[str, Any] = {"backbone": backbone, "steps": steps, "batch_size": batch_size, "domains": {}}

    console.rule("Bare backbone on held-out sentences")
    bare = {}
    for d in DOMAINS:
        rows = tests[d.adapter]
        bare[d.adapter] = translator.translate([r["src"] for r in rows], d.src_lang, d.tgt_lang, adapter=None,
                                               num_beams=1, max_new_tokens=96, progress=True)
        console.print(f"{d.adapter}: {translation_metrics(bare[d.adapter], [r['tgt'] for r in rows])}")

    files = {}
    for d in DOMAINS:
        console.rule(f"Training {d.config.method} adapter {d.adapter!r} on {d.sample}")
        summary = train(model, adapter=d.adapter, train=d.sample, dev=d.sample, adapter_config=d.config,
                        max_steps=steps, batch_size=batch_size, lr=d.lr, warmup_steps=max(1, steps // 10),
                        eval_every=steps, eval_samples=eval_sentences // 2, max_new_tokens=96,
                        src_lang=d.src_lang, tgt_lang=d.tgt_lang, domain=d.domain,
                        output_dir=str(out / d.adapter.replace("/", "_")), resume=False)
        files[d.adapter] = Path(summary["output"])
        results["domains"][d.adapter] = {"train_seconds": summary.get("seconds"),
                                         "tokens_per_second": summary.get("tokens_per_second")}

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
                                   num_beams=1, max_new_tokens=96, progress=True)

    table = Table(title=f"{backbone}: bare backbone vs. adapter, {eval_sentences} held-out sentences per domain")
    for column in ("domain", "adapter", "trainable params", "% of backbone", "file", "chrF bare", "chrF adapted",
                   "BLEU bare", "BLEU adapted"):
        table.add_column(column, justify="right" if column not in ("domain", "adapter") else "left")
    for d in DOMAINS:
        hyps = [o for (dd, _), o in zip(mixed, outputs) if dd is d]
        refs = [row["tgt"] for dd, row in mixed if dd is d]
        before = translation_metrics(bare[d.adapter][: len(refs)], refs)
        after = translation_metrics(hyps, refs)
        params = model.num_parameters(d.adapter)
        size = files[d.adapter].stat().st_size
        results["domains"][d.adapter].update({
            "method": d.config.method, "sample": d.sample, "file": str(files[d.adapter]), "file_bytes": size,
            "trainable": params["trainable"], "percent_of_backbone": params["percent_of_backbone"],
            "bare": before, "adapted": after,
            "examples": [{"src": row["src"], "ref": row["tgt"], "bare": b, "adapted": h}
                         for (_, row), b, h in zip([m for m in mixed if m[0] is d], bare[d.adapter], hyps)][:3],
        })
        table.add_row(d.domain, f"{d.adapter} ({d.config.method})", f"{params['trainable']:,}",
                      f"{params['percent_of_backbone']:.2f}%", f"{size / 1024:.0f} KiB",
                      f"{before['chrf']:.1f}", f"[bold]{after['chrf']:.1f}[/bold]",
                      f"{before['bleu']:.1f}", f"[bold]{after['bleu']:.1f}[/bold]")
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
    console.print(f"Done in {results['wall_seconds'] / 60:.1f} min; results in {out / 'demo_results.json'}")
    return results


def _demo(args: argparse.Namespace) -> int:
    run_demo(args.backbone, args.steps, args.eval_sentences, args.batch_size, args.out)
    return 0


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train two adapters of two families on gemma3-270m and hot-swap them")
    parser.add_argument("--backbone", default="gemma3-270m", help="zoo name, local dir or Hub id")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per adapter")
    parser.add_argument("--eval-sentences", type=int, default=40, help="held-out sentences per domain")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/demo")
    parser.set_defaults(func=_demo)

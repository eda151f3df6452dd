"""Merging and AdapterFusion on real data (issue 24): do they keep what each domain adapter learned?

    python benchmarks/methods_real.py                      # gemma3-270m, shipped samples, ~2.5 h on 2 cores
    python benchmarks/methods_real.py --steps 20 --test-sentences 16 --name methods_real-quick   # minutes

1. three LoRA adapters (r16, all linear projections, the same recipe), one per domain: LibreOffice help
   en→de, LibreOffice UI strings en→de, Bible en→es;
2. merges of help + UI (weights ½ ½) with `ak.merge_adapters`: linear (exact, rank 32), ties and dare_ties
   (density 0.5, stored at rank 32), svd (rank 16);
3. an `ak.Fusion` over the three adapters, trained on an even mix of the three training sets;
4. every system scored (greedy) on the three test sets, 200 sentences each, with paired bootstrap intervals:
   each merge against each input adapter on both software test sets, and the fusion against the best single
   adapter on the mixed test set (the three sets together) and on each.

Resumable: the adapters train with the trainer's checkpoints under --work (resume=True), and every system's
translations are kept in results/<name>/scores.json as soon as they exist; a rerun scores only what is missing.
Writes benchmarks/results/<name>.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from datasets import concatenate_datasets

import adaptkit as ak
from adaptkit.bench.report import environment
from adaptkit.core.atomicfile import write_atomic
from adaptkit.data import PromptFormat, load_pairs
from adaptkit.evaluation.scoring import bootstrap_interval, paired_bootstrap, translation_metrics
from adaptkit.evaluation.translation import generate_translations

RESULTS = Path(__file__).parent / "results"
DOMAINS = {"help": "libreoffice-help-en-de", "ui": "libreoffice-ui-en-de", "bible": "bible-en-es"}
LORA = {"r": 16, "alpha": 32.0, "targets": "all-linear"}
# ties / dare trim the dense ΔW, which is then full rank: stored at rank 32 (the inputs' sum), as peft's
# *_svd variants do; linear is exact at rank 32 without any cut.
MERGES = {"merge-linear": ("linear", {}), "merge-ties": ("ties", {"density": 0.5, "rank": 32}),
          "merge-dare-ties": ("dare_ties", {"density": 0.5, "rank": 32}), "merge-svd": ("svd", {"rank": 16})}


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="gemma3-270m")
    p.add_argument("--name", default="methods_real")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of each domain adapter (batch 8)")
    p.add_argument("--fusion-steps", type=int, default=200, help="optimizer steps of the fusion layer")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--fusion-lr", type=float, default=5e-4)
    p.add_argument("--test-sentences", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--work", default="runs/methods_real")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def train_domain(model: Any, name: str, args: argparse.Namespace) -> Path:
    ak.train(model, name, DOMAINS[name], None, max_steps=args.steps, lr=args.lr, warmup_steps=args.steps // 10,
             schedule="linear", eval_every=None, generate=False, eval_samples=50, seed=args.seed,
             checkpoint_every=50, output_dir=str(Path(args.work) / name), adapter_options=dict(LORA),
             max_source_len=128, max_target_len=128)
    return Path(args.work) / name / f"{name}.safetensors"


def mixed_train(seed: int) -> Any:
    """An even mix of the three training sets, shuffled once (the trainer reshuffles per epoch)."""
    sets = [load_pairs(d, "train") for d in DOMAINS.values()]
    size = min(len(s) for s in sets)
    return concatenate_datasets([s.select(range(size)) for s in sets]).shuffle(seed=seed)


class Scores:
    """Each (system, test set)'s translations, kept on disk as soon as they exist."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, model: Any, system: str, domain: str, rows: Any, args: argparse.Namespace) -> list[str]:
        key = f"{system}@{domain}"
        if key not in self.data:
            began = time.perf_counter()
            self.data[key] = generate_translations(model, rows, system, prompt=PromptFormat(), batch_size=16,
                                                   max_new_tokens=args.max_new_tokens)
            print(f"  {key}: {time.perf_counter() - began:.0f}s", flush=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, (json.dumps(self.data, indent=1) + "\n").encode())
        return self.data[key]


def score(hyps: list[str], refs: list[str], resamples: int = 1000) -> dict[str, float]:
    m = translation_metrics(hyps, refs)
    low, high = bootstrap_interval(hyps, refs, "chrf", resamples)
    return {"chrf": m["chrf"], "chrf_low": low, "chrf_high": high, "bleu": m["bleu"], "sentences": len(refs)}


def compare(a: list[str], b: list[str], refs: list[str]) -> dict[str, float]:
    g = paired_bootstrap(a, b, refs, "chrf")
    return {"a": g.a, "b": g.b, "diff": g.gain, "low": g.low, "high": g.high}


def main() -> None:
    args = parse()
    began = time.perf_counter()
    provenance = environment()
    model = ak.load(args.backbone)
    for name in DOMAINS:
        print(f"training {name} …", flush=True)
        path = train_domain(model, name, args)
        if name not in model.adapters:
            model.load_adapter(path, name)
    for out, (method, options) in MERGES.items():
        ak.merge_adapters(model, {"help": 0.5, "ui": 0.5}, method, out=out, **options)
    fusion_dir = Path(args.work) / "fusion"
    if "fusion" not in model.adapters:
        model.add_adapter("fusion", ak.Fusion(adapters=list(DOMAINS)))
    print("training the fusion …", flush=True)
    ak.train(model, "fusion", mixed_train(args.seed), None, max_steps=args.fusion_steps, lr=args.fusion_lr,
             warmup_steps=args.fusion_steps // 10, eval_every=None, generate=False, seed=args.seed,
             checkpoint_every=50, output_dir=str(fusion_dir), max_source_len=128, max_target_len=128)

    tests = {d: load_pairs(sample, "test") for d, sample in DOMAINS.items()}
    tests = {d: rows.select(range(min(args.test_sentences, len(rows)))) for d, rows in tests.items()}
    refs = {d: [r["tgt"] for r in rows] for d, rows in tests.items()}
    scores = Scores(RESULTS / args.name / "scores.json")
    systems = [*DOMAINS, *MERGES, "fusion"]
    hyps = {}
    for system in systems:
        for domain in tests:
            if system in MERGES and domain == "bible":
                continue  # the merges are of the two software adapters
            hyps[(system, domain)] = scores.get(model, system, domain, tests[domain], args)

    table = {f"{s}@{d}": score(h, refs[d]) for (s, d), h in hyps.items()}
    merges = {out: {d: {"vs_" + single: compare(hyps[(single, d)], hyps[(out, d)], refs[d])
                        for single in ("help", "ui")} for d in ("help", "ui")} for out in MERGES}
    mixed_refs = [r for d in DOMAINS for r in refs[d]]

    def mixed(system: str) -> list[str]:
        return [h for d in DOMAINS for h in hyps[(system, d)]]

    singles = {d: score(mixed(d), mixed_refs)["chrf"] for d in DOMAINS}
    best_single = max(singles, key=singles.get)
    fusion = {"best_single": best_single, "mixed": compare(mixed(best_single), mixed("fusion"), mixed_refs),
              **{d: compare(hyps[(d, d)], hyps[("fusion", d)], refs[d]) for d in DOMAINS}}
    report = {"name": args.name, "backbone": args.backbone, "args": vars(args), "environment": provenance,
              "wall_seconds": time.perf_counter() - began, "scores": table, "merges": merges, "fusion": fusion,
              "mixed_chrf": {**singles, "fusion": score(mixed("fusion"), mixed_refs)["chrf"]}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report) + "\n")
    print(markdown(report))


def markdown(r: dict) -> str:
    a = r["args"]
    lines = [f"# Merging and AdapterFusion on real data ({r['backbone']})", "",
             f"Three LoRA r16 all-linear adapters, {a['steps']} steps of batch 8 each; the fusion {a['fusion_steps']} "
             f"steps on an even mix. Greedy, test chrF on {a['test_sentences']} sentences per set with 95 % bootstrap "
             "intervals; differences are paired bootstrap intervals.", "",
             "| system | help en→de | UI en→de | Bible en→es |", "|---|---:|---:|---:|"]
    for system in [*DOMAINS, *MERGES, "fusion"]:
        cells = []
        for d in DOMAINS:
            s = r["scores"].get(f"{system}@{d}")
            cells.append(f"{s['chrf']:.1f} [{s['chrf_low']:.1f}, {s['chrf_high']:.1f}]" if s else "–")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    lines += ["", "## Each merge against each input (Δ chrF, 95 % paired interval)", "",
              "| merge | help: vs help | help: vs UI | UI: vs help | UI: vs UI |", "|---|---|---|---|---|"]
    for out, by_domain in r["merges"].items():
        cells = [by_domain[d][f"vs_{s}"] for d in ("help", "ui") for s in ("help", "ui")]
        lines.append(f"| {out} | " + " | ".join(f"{c['diff']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]"
                                                for c in cells) + " |")
    f = r["fusion"]
    lines += ["", f"## Fusion against the best single adapter on the mixed set ({f['best_single']})", "",
              f"Mixed test set ({3 * a['test_sentences']} sentences): fusion {f['mixed']['b']:.1f} vs "
              f"{f['best_single']} {f['mixed']['a']:.1f}, Δ {f['mixed']['diff']:+.1f} "
              f"[{f['mixed']['low']:+.1f}, {f['mixed']['high']:+.1f}].", "",
              "| test set | fusion − that domain's own adapter |", "|---|---|"]
    for d in DOMAINS:
        lines.append(f"| {d} | {f[d]['diff']:+.1f} [{f[d]['low']:+.1f}, {f[d]['high']:+.1f}] |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

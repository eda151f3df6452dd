"""en→de with and without back-translated data, at equal optimizer steps, on gemma3-270m.

    adaptkit corpus build libreoffice-help --langs de --out corpora/libreoffice-help   # 2 Debian .debs, ~1 min
    flock /tmp/realrun.lock python benchmarks/backtranslation.py --corpus corpora/libreoffice-help/en-de

1. a reverse adapter (de→en) on the shipped en–de sample with the sides swapped (`reverse=True`);
2. monolingual German: the target side of full-corpus *train-split* rows that are not in the shipped
   sample's training rows (nor, asserted, any test-set target), 3–40 words as the shipped test rows;
   the reverse adapter back-translates them (`adaptkit.tasks.backtranslate`, the `augment` command's code);
3. two forward adapters (en→de) from the same seed and the same number of optimizer steps: real pairs
   only, and real + tagged synthetic pairs (half of every batch synthetic, sources prefixed "<BT> ");
4. both scored (greedy chrF / BLEU) on the shipped test set (200) and on 200 more test-split rows of the
   full corpus, with paired bootstrap intervals (the same sentences resampled for both systems).

The mono rows' real English sources are known (they come from a parallel corpus), so the synthetic
sources are scored against them too: the reverse adapter's quality on the data it made.
Without --corpus, the mono text is the shipped dev split's German side and only the shipped test set is
scored (stated in the results). Writes benchmarks/results/backtranslation.{json,md}.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import time
from pathlib import Path
from typing import Any

import adaptkit as ak
from adaptkit.bench.report import environment
from adaptkit.corpora import load_sample
from adaptkit.evaluation.scoring import paired_bootstrap, translation_metrics
from adaptkit.evaluation.translation import generate_translations
from adaptkit.tasks.backtranslate import backtranslate

RESULTS = Path(__file__).parent / "results"
SAMPLE = "libreoffice-help-en-de"
TAG = "<BT> "


def moderate(row: dict, lo: int = 3, hi: int = 40) -> bool:
    """The shipped test rows' length rule (corpora/samples.py), so the extra test set is alike."""
    return all(lo <= len(row[k].split()) <= hi for k in ("src", "tgt"))


def by_hash(rows: list[dict], key: str) -> list[dict]:
    return sorted(rows, key=lambda r: hashlib.sha256(r[key].encode()).digest())


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open(encoding="utf-8")]


def select_data(corpus: Path | None, mono_rows: int, extra_test: int) -> dict[str, Any]:
    train, dev, test = (list(load_sample(SAMPLE, split)) for split in ("train", "dev", "test"))
    train_src, train_tgt = {r["src"] for r in train}, {r["tgt"] for r in train}
    if corpus is None:
        mono = [r for r in dev if r["tgt"] not in train_tgt][:mono_rows]
        extra, source = [], f"shipped {SAMPLE} dev split (no --corpus given)"
        all_test = list(test)
    else:
        full_train, full_test = read_jsonl(corpus / "train.jsonl"), read_jsonl(corpus / "test.jsonl")
        all_test = full_test + test
        test_tgt = {r["tgt"] for r in all_test}
        unseen = [r for r in full_train if r["src"] not in train_src and r["tgt"] not in train_tgt
                  and r["tgt"] not in test_tgt and moderate(r)]
        mono = by_hash(list({r["tgt"]: r for r in unseen}.values()), "tgt")[:mono_rows]
        shipped_src = {r["src"] for r in test}
        extra = by_hash([r for r in full_test if r["src"] not in shipped_src and moderate(r)], "src")[:extra_test]
        source = f"{corpus} train split, rows not in the shipped sample's train split"
    # The guarantee the comparison rests on: no test target (shipped or extra) and no training target is
    # in the monolingual text, so back-translation cannot leak references into training.
    test_targets = {r["tgt"] for r in all_test} | {r["tgt"] for r in extra}
    leaked = [r["tgt"] for r in mono if r["tgt"] in test_targets or r["tgt"] in train_tgt]
    assert not leaked, f"{len(leaked)} monolingual lines are test or training targets, e.g. {leaked[0]!r}"
    assert not {r["src"] for r in extra} & (train_src | {r["src"] for r in test})
    return {"mono": mono, "test": test, "extra": extra, "mono_source": source}


def translate_by_length(model: Any, rows: list[dict], adapter: str, max_new_tokens: int) -> list[str]:
    """Greedy translations in the rows' order, batched by source length (less padding; the same outputs
    up to float noise of padding)."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["src"]), i))
    ordered = generate_translations(model, [rows[i] for i in order], adapter, batch_size=16,
                                    max_new_tokens=max_new_tokens)
    out = [""] * len(rows)
    for i, text in zip(order, ordered):
        out[i] = text
    return out


class Clock:
    """Wall and this process's CPU seconds per stage (the box is shared: wall time includes waiting)."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, float]] = {}

    def __call__(self, name: str):
        clock = self

        class Stage:
            def __enter__(self):
                self.wall, self.cpu = time.perf_counter(), _cpu()
                print(f"== {name}", flush=True)

            def __exit__(self, *exc):
                clock.stages[name] = {"wall_s": round(time.perf_counter() - self.wall, 1),
                                      "cpu_s": round(_cpu() - self.cpu, 1)}
                print(f"== {name}: {clock.stages[name]}", flush=True)

        return Stage()


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="gemma3-270m")
    parser.add_argument("--corpus", type=Path, help="`corpus build` output for en-de (a dir with train/test.jsonl)")
    parser.add_argument("--work", type=Path, default=Path("runs/backtranslation"))
    parser.add_argument("--reverse-steps", type=int, default=40)
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps of each forward adapter")
    parser.add_argument("--mono", type=int, default=320, help="monolingual lines to back-translate")
    parser.add_argument("--extra-test", type=int, default=200)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--name", default="backtranslation")
    args = parser.parse_args()

    run_environment = environment()  # the code and tree the run starts from, not the HEAD at its end
    clock = Clock()
    data = select_data(args.corpus, args.mono, args.extra_test)
    mono_file = args.work / "mono.de.txt"
    mono_file.parent.mkdir(parents=True, exist_ok=True)
    mono_file.write_text("".join(r["tgt"] + "\n" for r in data["mono"]), encoding="utf-8")
    recipe = dict(adapter_config=ak.LoRA(r=16, alpha=32, targets="all-linear"), batch_size=8, lr=1e-3,
                  schedule="linear", seed=0, generate=False, eval_every=None, eval_samples=8, checkpoint_every=0,
                  resume=False, progress=False, domain="software")

    with clock("load"):
        model = ak.load(args.backbone)
    with clock("reverse adapter"):
        reverse = ak.train(model, "de-en/software", SAMPLE, max_steps=args.reverse_steps, reverse=True,
                           warmup_steps=args.reverse_steps // 10, output_dir=str(args.work / "de-en"), **recipe)
    with clock("back-translate"):
        bt = backtranslate(model, reverse["output"], [r["tgt"] for r in data["mono"]], args.work / "bt",
                           batch_size=16, max_new_tokens=args.max_new_tokens, progress=True)
    synthetic = read_jsonl(bt.corpus)
    reverse_quality = translation_metrics([r["src"] for r in synthetic], [r["src"] for r in data["mono"]])

    runs = {}
    forward = dict(max_steps=args.steps, warmup_steps=args.steps // 10, **recipe)
    with clock("forward: real only"):
        runs["real"] = ak.train(model, "en-de/real", SAMPLE, output_dir=str(args.work / "real"), **forward)
    with clock("forward: real + back-translated"):
        runs["bt"] = ak.train(model, "en-de/bt", SAMPLE, synthetic=str(args.work / "bt"),
                              synthetic_ratio=args.ratio, synthetic_tag=TAG, output_dir=str(args.work / "bt-run"),
                              **forward)

    sets = {"shipped test": data["test"]}
    if data["extra"]:
        sets["extra test (full corpus)"] = data["extra"]
    hypotheses: dict[str, dict[str, list[str]]] = {}
    for key, adapter in (("real", "en-de/real"), ("bt", "en-de/bt")):
        hypotheses[key] = {}
        for set_name, rows in sets.items():
            with clock(f"translate {set_name} with {adapter}"):
                hypotheses[key][set_name] = translate_by_length(model, rows, adapter, args.max_new_tokens)
    scored = {name: (rows, hypotheses["real"][name], hypotheses["bt"][name]) for name, rows in sets.items()}
    if len(sets) > 1:
        scored["both (pooled)"] = tuple(sum((list(part) for part in parts), []) for parts in zip(*scored.values()))
    comparisons = {name: {metric: vars(paired_bootstrap(real, bt_hyps, [r["tgt"] for r in rows], metric))
                          for metric in ("chrf", "bleu")}
                   for name, (rows, real, bt_hyps) in scored.items()}

    report = {
        "what": f"en→de LoRA r16 on {args.backbone}: real pairs only vs real + tagged back-translated pairs, "
                "same steps",
        "settings": {**vars(args), "corpus": str(args.corpus), "work": str(args.work), "tag": TAG,
                     "lora": "r16 alpha32 all-linear", "batch_size": 8, "lr": 1e-3, "seed": 0},
        "data": {"mono_source": data["mono_source"], "mono_rows": len(data["mono"]),
                 "shipped_test_rows": len(data["test"]), "extra_test_rows": len(data["extra"]),
                 "leak_check": "asserted: no monolingual line is a test or training target"},
        "reverse_adapter": {"steps": reverse["steps"], "train_loss": reverse["train_loss"],
                            "synthetic_vs_real_english": reverse_quality},
        "backtranslation": {"rows": bt.rows, "chunks": bt.chunks,
                            "examples": [{"synthetic_src": s["src"], "real_src": m["src"], "tgt": m["tgt"]}
                                         for s, m in list(zip(synthetic, data["mono"]))[:5]]},
        "forward": {k: {"steps": r["steps"], "train_loss": r["train_loss"], "seconds": r["seconds"]}
                    for k, r in runs.items()},
        "comparisons": comparisons,
        "time": clock.stages,
        "total_wall_s": round(sum(s["wall_s"] for s in clock.stages.values()), 1),
        **run_environment,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    (RESULTS / f"{args.name}.md").write_text(render(report), encoding="utf-8")
    print(render(report))


def render(report: dict[str, Any]) -> str:
    s, d = report["settings"], report["data"]
    lines = [f"# Back-translation: {report['what']}", "",
             f"Command: `{report['command']}` (git {report['git']['commit'][:10]}"
             f"{', dirty tree' if report['git']['dirty'] else ''}), {report['machine']['cpu_count']} CPU cores, "
             f"torch {report['versions']['torch']}; total {report['total_wall_s'] / 60:.1f} min wall.", "",
             f"- reverse adapter (de→en, `reverse=True` on the shipped sample): {s['reverse_steps']} steps",
             f"- monolingual German: {d['mono_rows']} lines from {d['mono_source']}; {d['leak_check']}",
             f"- forward adapters (en→de): {s['steps']} steps each, batch {s['batch_size']}, lr {s['lr']}, "
             f"seed {s['seed']}, LoRA {s['lora']}; `bt` = half of every batch synthetic "
             f"(ratio {s['ratio']}), sources tagged `{s['tag'].strip()}`",
             "- greedy decoding, up to "
             f"{s['max_new_tokens']} new tokens; 95% paired bootstrap interval of bt − real, 1000 resamples", "",
             "| test set | sentences | chrF real | chrF real+BT | Δ chrF (95% CI) | BLEU real | BLEU real+BT | "
             "Δ BLEU (95% CI) |", "|---|---:|---:|---:|---|---:|---:|---|"]
    for name, c in report["comparisons"].items():
        ch, bl = c["chrf"], c["bleu"]
        lines.append(f"| {name} | {ch['sentences']} | {ch['a']:.1f} | {ch['b']:.1f} | "
                     f"{ch['b'] - ch['a']:+.1f} ({ch['low']:+.1f} … {ch['high']:+.1f}) | {bl['a']:.1f} | "
                     f"{bl['b']:.1f} | {bl['b'] - bl['a']:+.1f} ({bl['low']:+.1f} … {bl['high']:+.1f}) |")
    q = report["reverse_adapter"]["synthetic_vs_real_english"]
    lines += ["", f"Synthetic English sources against the real English of the same rows: chrF {q['chrf']:.1f}, "
                  f"BLEU {q['bleu']:.1f} (the reverse adapter after {s['reverse_steps']} steps).", "",
              "| stage | wall s | CPU s |", "|---|---:|---:|"]
    lines += [f"| {name} | {t['wall_s']} | {t['cpu_s']} |" for name, t in report["time"].items()]
    lines += ["", "Back-translated examples (synthetic source / real source / German target):", ""]
    for e in report["backtranslation"]["examples"]:
        lines.append(f"- `{e['synthetic_src']}` / `{e['real_src']}` / `{e['tgt']}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

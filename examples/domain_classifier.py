"""A domain classifier on minilm-l6, and `domain="auto"` translation routed by it.

    python examples/domain_classifier.py                   # the classifier: 35 min on 2 loaded CPU cores
    python examples/domain_classifier.py --end-to-end      # + gemma3-270m en→es routing by predicted domain
    python examples/domain_classifier.py --classifier runs/domain-classifier/classifier/domain.safetensors \
        --skip-classifier-test --end-to-end --test-sentences 100   # end to end only, on the trained classifier

Part 1 — which domain is this English sentence from? Labels are the shipped samples' own `domain`
keys, from their source side only: `software-documentation` (LibreOffice help, en-de and en-es
samples, deduplicated), `software-ui` (LibreOffice UI strings), `religious` (KJV Bible verses) and
`dialogue` (chatterbot). Train is balanced by taking the same number of rows per class (the
smallest class, dialogue, has 827 distinct texts), and the loss is class-weighted as well; a text in two splits is
kept only in the later one. The adapter is LoRA r8 on minilm-l6's attention with a mean-pooling
classification head; head and label set are in the one adapter file. Test: every shipped test row.

Part 2 (`--end-to-end`) — gemma3-270m with three en→es LoRA adapters: one for software docs
(domain key `software-documentation`), one for the Bible (`religious`), and one trained on both
mixed (no domain key: the pair's general adapter). A mixed test set of both domains is translated
three ways: routed by the classifier (`domain="auto"`, threshold 0.5: below it, and for domains
with no adapter, rows go to the general adapter), routed by the true domain, and all rows by the
mixed adapter. chrF with a paired-bootstrap interval against the true-domain routing.

Measured on this machine (2 shared CPU cores, torch CPU; zoo weights dequantised from 4-bit GGUF
for gemma3-270m, minilm-l6 in float32 as shipped):

    classifier (150 steps, batch 32; test = 695 shipped test rows, 2 cores shared with other jobs)
        accuracy 0.806, macro-F1 0.821; F1 per class: dialogue 0.937, religious 0.995,
        software-documentation 0.756, software-ui 0.597 (the errors: UI strings taken for help text)
        148,996 parameters saved (147,456 LoRA + 1,540 head), 604 KB file, 0.66 % of the backbone
        0.12 s a sentence batched (64 a call), 0.46 s one at a time (upper bounds: the machine was loaded)
        35 min of training here (~14 s a step under load)

    end to end (100 test rows per domain, 200 in all; adapters 40 steps of batch 8; 17 min here)
        chrF: domain="auto" 44.3, routed by the true domain 44.4, one mixed adapter 42.8
        auto − true −0.1 (95% CI −0.2…+0.1); auto − mixed +1.5 (−0.2…+3.0), paired bootstrap
        184 of 200 rows routed as their true domain (13 software-help rows taken for UI strings,
        which have no adapter and so go to the mixed one)

More in docs/encoders.md; the end-to-end figures in examples/results/domain_classifier_end_to_end.json.

Each run writes its figures as JSON (`--output`, default runs/domain-classifier/results.json).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

import adaptkit as ak
from adaptkit.corpora import load_sample
from adaptkit.evaluation.classification import classification_metrics
from adaptkit.evaluation.scoring import paired_bootstrap, translation_metrics
from adaptkit.tasks.classify import Classifier
from adaptkit.tasks.translate import Translator

# label → the shipped samples whose source side it is
SOURCES = {
    "software-documentation": ["libreoffice-help-en-de", "libreoffice-help-en-es"],
    "software-ui": ["libreoffice-ui-en-de"],
    "religious": ["bible-en-es"],
    "dialogue": ["chatterbot-en"],
}
SPLITS = ("train", "dev", "test")


def domain_rows(per_class: int | None, dev_per_class: int, seed: int = 0) -> dict[str, Dataset]:
    """{text, label} rows per split: deduplicated, no text in two splits, train balanced by count."""
    texts: dict[str, dict[str, list[str]]] = {split: {} for split in SPLITS}
    for label, samples in SOURCES.items():
        for split in SPLITS:
            seen: dict[str, None] = {}
            for sample in samples:
                seen.update((row["src"].strip(), None) for row in load_sample(sample, split) if row["src"].strip())
            texts[split][label] = list(seen)
    later: set[str] = set()
    for split in reversed(SPLITS):  # test keeps its rows; dev and train lose any text a later split has
        for label in SOURCES:
            texts[split][label] = [t for t in texts[split][label] if t not in later]
        later |= {t for label in SOURCES for t in texts[split][label]}
    rng = random.Random(seed)
    smallest = min(len(texts["train"][label]) for label in SOURCES)
    caps = {"train": min(smallest, per_class or smallest), "dev": dev_per_class, "test": None}
    out = {}
    for split in SPLITS:
        rows = []
        for label in SOURCES:
            chosen = sorted(texts[split][label])
            rng.shuffle(chosen)
            rows += [{"text": t, "label": label} for t in chosen[: caps[split]]]
        rng.shuffle(rows)
        out[split] = Dataset.from_list(rows)
    return out


def train_classifier(args: argparse.Namespace, data: dict[str, Dataset], out_dir: Path) -> tuple[Classifier, dict]:
    model = ak.load("minilm-l6")
    summary = ak.train(model, adapter="domain", train=data["train"], dev=data["dev"], task="classify",
                       adapter_config=ak.LoRA(r=8, alpha=16, targets="attention"), max_steps=args.steps,
                       batch_size=32, lr=args.lr, warmup_steps=10, eval_every=max(args.steps // 3, 1),
                       max_source_len=64, output_dir=str(out_dir / "classifier"), resume=False,
                       progress=args.progress)
    return Classifier(model, "domain", batch_size=64, max_length=64), summary


def measure_classifier(classifier: Classifier, path: str | Path, test: Dataset) -> dict[str, Any]:
    labels = classifier.labels()
    started = time.perf_counter()
    predictions = classifier.predict(list(test["text"]))
    batched = (time.perf_counter() - started) / len(test)
    singles = list(test["text"][:50])
    started = time.perf_counter()
    for text in singles:
        classifier.predict([text])
    alone = (time.perf_counter() - started) / len(singles)
    scores = classification_metrics([labels.index(p.label) for p in predictions],
                                    [labels.index(g) for g in test["label"]], labels)
    info = ak.read_adapter_info(path)
    training = info.get("training") or {}
    counts = classifier.model.num_parameters("domain")
    head = classifier.model.get_adapter("domain").head
    return {
        "labels": labels, "test_rows": len(test), "steps": training.get("step"), "dev": info.get("metrics"),
        "accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"], "per_class": scores["per_class"],
        "file_bytes": info["file_bytes"], "tensor_bytes": counts["tensor_bytes"], "parameters": counts["saved"],
        "head_parameters": sum(p.numel() for p in head.parameters()),
        "percent_of_backbone": counts["percent_of_backbone"],
        "seconds_per_sentence_batched": batched, "seconds_per_sentence_alone": alone,
        "threads": torch.get_num_threads(),
    }


# -- part 2: end to end ------------------------------------------------------------------------------
TRANSLATION = {  # adapter → (samples, domain key)
    "en-es/software": (["libreoffice-help-en-es"], "software-documentation"),
    "en-es/bible": (["bible-en-es"], "religious"),
    "en-es/mixed": (["libreoffice-help-en-es", "bible-en-es"], None),
}


def end_to_end(args: argparse.Namespace, classifier: Classifier, out_dir: Path,
               save: Callable[[dict[str, Any]], None]) -> None:
    """Translate the mixed test set three ways; `save` is called with the figures as each part is done."""
    model = ak.load("gemma3-270m")
    rng = random.Random(0)
    timings = {}
    for name, (samples, domain) in TRANSLATION.items():
        rows = [row for sample in samples for row in load_sample(sample, "train")]
        if domain is None:  # else the trainer takes the first row's domain key, and this is no general adapter
            rows = [{k: v for k, v in row.items() if k != "domain"} for row in rows]
        rng.shuffle(rows)
        run_dir = out_dir / name.replace("/", "-")
        done = run_dir / "summary.json"
        if done.is_file() and json.loads(done.read_text())["steps"] == args.translation_steps:
            model.load_adapter(json.loads(done.read_text())["output"], name)  # trained by an earlier run
            timings[name] = json.loads(done.read_text())["seconds"]
            continue
        started = time.perf_counter()
        ak.train(model, adapter=name, train=Dataset.from_list(rows), dev=None,
                 adapter_config=ak.LoRA(r=16, alpha=32, targets="all-linear"), max_steps=args.translation_steps,
                 batch_size=8, lr=1e-3, warmup_steps=4, eval_every=None, max_source_len=96, max_target_len=96,
                 src_lang="en", tgt_lang="es", domain=domain, output_dir=str(run_dir), resume=False,
                 progress=args.progress)
        timings[name] = time.perf_counter() - started
    for name, (_, domain) in TRANSLATION.items():
        found = model.adapter_metadata(name).get("domain")
        if found != domain:
            raise SystemExit(f"{name} routes by domain {found!r}, not {domain!r}: delete its directory under "
                             f"{out_dir} to train it again")
    test = []
    for name in ("en-es/software", "en-es/bible"):
        samples, domain = TRANSLATION[name]
        test += [dict(row, domain=domain) for row in load_sample(samples[0], "test").select(range(args.test_sentences))]
    rng.shuffle(test)
    sources, references = [r["src"] for r in test], [r["tgt"] for r in test]
    translator = Translator(model, batch_size=16, domain_classifier=classifier, domain_threshold=0.5)
    options = dict(num_beams=1, max_new_tokens=96)
    seconds = {}
    started = time.perf_counter()
    auto = translator.translate_detailed(sources, "en", "es", domain="auto", **options)
    seconds["auto"] = time.perf_counter() - started
    # Routed by the true domain, a row runs with the adapter its domain names. Rows that `auto` already ran
    # with that adapter keep their translation (per-row routing makes a row's output independent of the
    # other rows' adapters: tests/test_classify.py); only the rows it routed elsewhere are translated again.
    by_domain = {domain: name for name, (_, domain) in TRANSLATION.items() if domain}
    rerouted = [i for i, (row, a) in enumerate(zip(test, auto)) if a.adapter != by_domain[row["domain"]]]
    started = time.perf_counter()
    redone = translator.translate_detailed([sources[i] for i in rerouted], "en", "es",
                                           domain=[test[i]["domain"] for i in rerouted], **options)
    seconds["true_domain_rerouted_rows"] = time.perf_counter() - started
    wrong = [(i, r.adapter) for i, r in zip(rerouted, redone) if r.adapter != by_domain[test[i]["domain"]]]
    if wrong:
        raise RuntimeError(f"routed by the true domain, rows went to other adapters: {wrong[:5]}")
    true = [a.text for a in auto]
    for i, r in zip(rerouted, redone):
        true[i] = r.text
    hypotheses = {"auto": [a.text for a in auto], "true_domain": true}

    def scores(rows: list[int]) -> dict[str, dict[str, dict[str, float]]]:
        refs = [references[i] for i in rows]
        return {k: translation_metrics([v[i] for i in rows], refs) for k, v in hypotheses.items()}

    def gain(a: str, b: str) -> dict[str, Any]:  # b − a, paired over the same sentences
        g = paired_bootstrap(hypotheses[a], hypotheses[b], references)
        return {"a": g.a, "b": g.b, "gain": g.gain, "low": g.low, "high": g.high, "text": str(g)}

    domains = sorted({r["domain"] for r in test})
    predicted: dict[str, dict[str, int]] = {d: {} for d in domains}
    for row, result in zip(test, auto):
        label = result.predicted_domain or "none"
        predicted[row["domain"]][label] = predicted[row["domain"]].get(label, 0) + 1

    def results() -> dict[str, Any]:
        out = {
            "test_rows": len(test), "rows_per_domain": args.test_sentences,
            "translation_steps": args.translation_steps, "train_seconds": timings, "translate_seconds": seconds,
            "all": scores(list(range(len(test)))),
            "per_domain": {d: scores([i for i, r in enumerate(test) if r["domain"] == d]) for d in domains},
            "auto_vs_true": gain("true_domain", "auto"),
            "predicted_domain": predicted,
            "rows_routed_as_true": len(test) - len(rerouted),
            "rows_below_threshold": sum(a.domain is None for a in auto),
            "rerouted_rows": [{"domain": test[i]["domain"], "predicted": auto[i].predicted_domain,
                               "probability": auto[i].domain_probability, "src": sources[i]} for i in rerouted],
            "samples": [{"domain": test[i]["domain"], "src": sources[i], "tgt": references[i],
                         **{k: v[i] for k, v in hypotheses.items()}} for i in range(4)],
        }
        if "mixed_adapter" in hypotheses:
            out["mixed_vs_true"] = gain("true_domain", "mixed_adapter")
            out["auto_vs_mixed"] = gain("mixed_adapter", "auto")
        return out

    save(results())  # auto against the true domain first: the mixed adapter's pass is as long again
    started = time.perf_counter()
    hypotheses["mixed_adapter"] = translator.translate(sources, "en", "es", adapter="en-es/mixed", **options)
    seconds["mixed_adapter"] = time.perf_counter() - started
    save(results())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150, help="classifier optimizer steps (batch 32)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--per-class", type=int, default=None, help="train rows per class (default: the smallest)")
    parser.add_argument("--classifier", help="a classifier file trained by an earlier run: skip training it")
    parser.add_argument("--end-to-end", action="store_true", help="also the gemma3-270m domain='auto' run")
    parser.add_argument("--skip-classifier-test", action="store_true",
                        help="with --classifier: do not measure it again (only the end-to-end part)")
    parser.add_argument("--translation-steps", type=int, default=40)
    parser.add_argument("--test-sentences", type=int, default=40, help="per domain, end to end")
    parser.add_argument("--runs-dir", default="runs/domain-classifier", help="where adapters are trained / reused")
    parser.add_argument("--output", default="runs/domain-classifier/results.json")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    out_dir = Path(args.runs_dir)
    data = domain_rows(args.per_class, dev_per_class=50)
    if args.classifier:  # trained before: measure it again, and use it end to end
        path, seconds = args.classifier, None
        classifier = Classifier.from_file(path, batch_size=64, max_length=64)
    else:
        classifier, summary = train_classifier(args, data, out_dir)
        path, seconds = summary["output"], summary["seconds"]
    results: dict[str, Any] = {}
    if not args.skip_classifier_test:
        results["classifier"] = {"train_rows": len(data["train"]), "train_seconds": seconds,
                                 **measure_classifier(classifier, path, data["test"])}
        print(json.dumps(results["classifier"], indent=2))
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)

    def save(end_to_end_results: dict[str, Any] | None = None) -> None:
        if end_to_end_results is not None:
            results["end_to_end"] = end_to_end_results
            print(json.dumps(end_to_end_results, indent=2, ensure_ascii=False), flush=True)
        output.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    if args.end_to_end:
        end_to_end(args, classifier, out_dir, save)
    else:
        save()


if __name__ == "__main__":
    main()

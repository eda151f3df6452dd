"""Fast inference weights: float32 vs quantize="int8-dynamic" (int8 weights × int8 activations, head included).

    python benchmarks/fast_weights.py --kernels-only            # part 1 alone (no real weights, ~3 min)
    flock /tmp/realrun.lock python benchmarks/fast_weights.py   # everything on gemma3-270m (~15 min, 2 cores)
    python benchmarks/fast_weights.py --sentences 40 --note "loaded machine: provisional"
    python benchmarks/fast_weights.py --render benchmarks/results/fast_weights.json   # redraw the .md

Opt-in, not CI. What it measures, in one process (ratios within one run: the box is shared, so every
comparison is a median of per-round ratios from interleaved rounds, never of absolute times):

1. Kernels: decode-shaped matmuls (1, 4, 16, 32 tokens) at gemma3-270m's projection shapes and its
   640 → 262144 output head, against float32 `F.linear`: torchao's weight-only int8 (what quantize="int8"
   uses), torchao's `Int8DynamicActivationInt8WeightConfig`, adaptkit's int8-dynamic (core/int8dynamic.py)
   and torch.ao's deprecated dynamic quantisation (per-channel weights). Relative error against float32
   and how far a row computed alone is from the same row in the batch (per-tensor activation scales
   couple the rows). Plus an estimate of one decode step's matmul time (18 layers + the head).
2. A LoRA (r=16, all-linear, `--steps` steps) trained on the float32 backbone on the LibreOffice-help
   en→de sample, saved (reused from `--work` by later runs), loaded over both backbones.
3. Backbone memory (a quantised weight counted by its int8 data and scales; the tied head's int8 copy
   beside the float embedding counted too).
4. Decode: exactly `--new-tokens` new tokens (greedy, min_new_tokens = max_new_tokens), batch 1 and 16,
   bare and with the LoRA, float32 / int8-dynamic interleaved over `--rounds` rounds; tokens/s counts the
   new tokens of the batch over the whole generate call (prefill included).
5. chrF of the LoRA on the first `--sentences` of the test split (greedy, ≤ `--max-new-tokens`), fast
   against float32, with a paired bootstrap interval of the difference.

Writes benchmarks/results/fast_weights.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchao
import torchao.quantization as tq
from torch import nn

import adaptkit as ak
from adaptkit.core.int8dynamic import Int8DynamicWeight
from adaptkit.core.quantize import storage_bytes
from adaptkit.corpora import load_sample
from adaptkit.data import PromptFormat
from adaptkit.evaluation.scoring import paired_bootstrap
from adaptkit.evaluation.translation import evaluate
from adaptkit.tasks.translate import Translator

SAMPLE = "libreoffice-help-en-de"
FAST = "int8-dynamic"
RESULTS = Path(__file__).parent / "results"
# gemma3-270m: hidden 640, 4 query heads and 1 key/value head of 256, FFN 2048, 18 layers, 262144-token head
SHAPES = {"q 640→1024": (640, 1024), "k, v 640→256": (640, 256), "o 1024→640": (1024, 640),
          "gate, up 640→2048": (640, 2048), "down 2048→640": (2048, 640), "head 640→262144": (640, 262144)}
PER_STEP = {"q 640→1024": 18, "k, v 640→256": 36, "o 1024→640": 18, "gate, up 640→2048": 36, "down 2048→640": 18,
            "head 640→262144": 1}  # calls of each shape in one decode step
TOKENS = (1, 4, 16, 32)


# -- 1. kernels -----------------------------------------------------------------------------------

def _torchao(config: Any) -> Callable[[nn.Linear], Callable]:
    def build(layer: nn.Linear) -> Callable:
        tq.quantize_(layer, config)
        return layer
    return build


def _adaptkit_fast(layer: nn.Linear) -> Callable:
    layer.weight = nn.Parameter(Int8DynamicWeight.from_float(layer.weight), requires_grad=False)
    return layer


def _torch_ao_dynamic(layer: nn.Linear) -> Callable:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of torchao: that is the point of measuring it
        return torch.ao.quantization.quantize_dynamic(
            nn.Sequential(layer), {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, dtype=torch.qint8)


CANDIDATES: dict[str, Callable[[nn.Linear], Callable]] = {
    "torchao Int8WeightOnlyConfig (quantize='int8')": _torchao(tq.Int8WeightOnlyConfig()),
    "torchao Int8DynamicActivationInt8WeightConfig": _torchao(tq.Int8DynamicActivationInt8WeightConfig()),
    "adaptkit int8-dynamic (torch._int_mm)": _adaptkit_fast,
    "torch.ao quantize_dynamic, per-channel (deprecated)": _torch_ao_dynamic,
}


def kernels(rounds: int) -> dict[str, Any]:
    """Per shape and token count: each candidate's time ratio to float32 (median over interleaved rounds),
    relative error, and the largest |row alone − row in the batch| relative to the output."""
    torch.manual_seed(0)
    out: dict[str, Any] = {"rounds": rounds, "tokens": list(TOKENS), "shapes": {}, "candidates": list(CANDIDATES)}
    for label, (fan_in, fan_out) in SHAPES.items():
        base = nn.Linear(fan_in, fan_out, bias=False).eval().requires_grad_(False)
        built = {"float32": base, **{name: build(copy.deepcopy(base)) for name, build in CANDIDATES.items()}}
        reps = max(1, round(8e7 / (fan_in * fan_out)))  # ~10 ms of float32 work per timing on this CPU
        out["shapes"][label] = shape = {"reps": reps}
        for tokens in TOKENS:
            x = torch.randn(tokens, fan_in)
            with torch.no_grad():
                reference = base(x)
                entry = {name: {"relative_error": float((f(x) - reference).norm() / reference.norm()),
                                "alone_vs_batch": _alone_vs_batch(f, x)} for name, f in built.items()}
                times: dict[str, list[float]] = {name: [] for name in built}
                for _ in range(rounds):  # interleaved: a slow spell of the shared box hits every candidate alike
                    for name, f in built.items():
                        start = time.perf_counter()
                        for _ in range(reps):
                            f(x)
                        times[name].append((time.perf_counter() - start) / reps)
            for name in built:
                entry[name]["seconds"] = statistics.median(times[name])
                entry[name]["vs_float32"] = statistics.median(t / f for t, f in zip(times[name], times["float32"]))
            shape[str(tokens)] = entry
            print(f"  {label} × {tokens}: " + ", ".join(f"{n.split(' (')[0]} {e['vs_float32']:.2f}x"
                                                       for n, e in entry.items() if n != "float32"), flush=True)
    out["decode_step"] = {str(tokens): {name: sum(PER_STEP[s] * out["shapes"][s][str(tokens)][name]["seconds"]
                                                  for s in SHAPES) /
                                        sum(PER_STEP[s] * out["shapes"][s][str(tokens)]["float32"]["seconds"]
                                            for s in SHAPES)
                                        for name in CANDIDATES} for tokens in TOKENS}
    return out


def _alone_vs_batch(f: Callable, x: torch.Tensor) -> float:
    batched = f(x)
    alone = torch.cat([f(x[i:i + 1]) for i in range(x.shape[0])])
    return float((alone - batched).abs().max() / batched.abs().max())


# -- 2.-5. gemma3-270m ----------------------------------------------------------------------------

def train_lora(backbone: str, work: Path, steps: int, lr: float | None) -> tuple[Path, dict[str, Any]]:
    path = work / "adapters" / "x.safetensors"
    if path.is_file() and (ak.read_adapter_info(path).get("training") or {}).get("fast_weights_steps") == steps:
        return path, {"reused": str(path)}
    model = ak.load(backbone)
    options = {"lr": lr} if lr is not None else {}
    summary = ak.train(model, adapter="x", train=SAMPLE, dev=None, max_steps=steps, r=16, targets="all-linear",
                       eval_every=None, generate=False, progress=False, resume=False,
                       output_dir=str(work / "train"), **options)
    model.save_adapter("x", path, training={"fast_weights_steps": steps, "sample": SAMPLE},
                       src_lang="en", tgt_lang="de", domain="software")
    return path, {"seconds_per_step": summary["seconds"] / steps, "steps": steps, "lr": lr or "default"}


def memory(model: ak.AdaptedModel) -> dict[str, Any]:
    head = model.model.get_output_embeddings()
    linears = [m for m in model.model.modules() if isinstance(m, nn.Linear) and m is not head]
    return {"backbone_bytes": storage_bytes(model.model), "head_bytes": storage_bytes(head),
            "embedding_bytes": storage_bytes(model.model.get_input_embeddings()),
            "linear_bytes": sum(storage_bytes(m) for m in linears), "quantization": model.quantization}


def prompts(model: ak.AdaptedModel, sources: list[str]) -> dict[str, torch.Tensor]:
    texts = [PromptFormat.for_task("translate").prompt_text(s, "en", "de") for s in sources]
    return dict(model.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left"))


def decode(models: dict[str, ak.AdaptedModel], sources: list[str], new_tokens: int,
           rounds: int) -> dict[str, Any]:
    out: dict[str, Any] = {"new_tokens": new_tokens, "rounds": rounds, "batches": {}}
    runs = {(batch, adapter): prompts(models["float32"], sources[:batch]) for batch in (1, 16) for adapter in
            (None, "x")}
    times: dict[tuple, list[float]] = {}
    tokens: dict[tuple, torch.Tensor] = {}
    for _ in range(rounds):
        for (batch, adapter), inputs in runs.items():
            for name, model in models.items():
                start = time.perf_counter()
                with torch.no_grad():
                    tokens[batch, adapter, name] = model.generate(
                        **inputs, adapter=adapter, do_sample=False, num_beams=1, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens)
                times.setdefault((batch, adapter, name), []).append(time.perf_counter() - start)
    for (batch, adapter), _ in runs.items():
        key = f"batch {batch} {'lora' if adapter else 'bare'}"
        fp, fast = times[batch, adapter, "float32"], times[batch, adapter, FAST]
        same = tokens[batch, adapter, "float32"][:, -new_tokens:] == tokens[batch, adapter, FAST][:, -new_tokens:]
        out["batches"][key] = {
            "batch": batch, "adapter": adapter, "seconds": {"float32": fp, FAST: fast},
            "tokens_per_second": {n: batch * new_tokens / statistics.median(t) for n, t in (("float32", fp),
                                                                                               (FAST, fast))},
            "vs_float32": statistics.median(f / p for f, p in zip(fast, fp)),
            "same_new_tokens": float(same.float().mean())}
        print(f"  {key}: {out['batches'][key]['vs_float32']:.2f}x float32's time", flush=True)
    return out


def translations(model: ak.AdaptedModel, rows: list[dict], max_new_tokens: int) -> dict[str, Any]:
    """The LoRA's greedy translations, and its teacher-forced loss on the references (a quality measure
    with less sampling noise than chrF on few sentences)."""
    loss = evaluate(model, rows, "x", generate=False)["loss"]
    wall, cpu = time.perf_counter(), time.process_time()
    hyps = Translator(model, batch_size=16).translate([r["src"] for r in rows], "en", "de", adapter="x",
                                                      num_beams=1, max_new_tokens=max_new_tokens)
    return {"hypotheses": hyps, "loss": loss, "wall_seconds_per_sentence": (time.perf_counter() - wall) / len(rows),
            "cpu_seconds_per_sentence": (time.process_time() - cpu) / len(rows)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "command": shlex.join(sys.argv), "backbone": args.backbone, "steps": args.steps, "sentences": args.sentences,
        "new_tokens": args.new_tokens, "max_new_tokens": args.max_new_tokens, "torch_threads": args.threads,
        "note": args.note, "provenance": provenance()}
    out = Path(args.out)
    save = lambda: _write(result, out)  # noqa: E731 — partial results survive a kill
    earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    if args.skip_kernels and "kernels" in earlier:
        result["kernels"], result["kernels_provenance"] = earlier["kernels"], earlier.get("kernels_provenance")
    else:
        print("kernels ...", flush=True)
        result["kernels"] = kernels(args.kernel_rounds)
        result["kernels_provenance"] = {**result["provenance"], "command": result["command"]}
    save()
    if args.kernels_only:
        return result
    work = Path(args.work)
    print("training the LoRA on float32 ...", flush=True)
    adapter, result["training"] = train_lora(args.backbone, work, args.steps, args.lr)
    save()
    models = {"float32": ak.load(args.backbone), FAST: ak.load(args.backbone, quantize=FAST)}
    result["memory"] = {}
    for name, model in models.items():
        model.load_adapter(adapter, "x")
        result["memory"][name] = memory(model)
    save()
    test = list(load_sample(SAMPLE, "test"))
    print("decoding ...", flush=True)
    result["decode"] = decode(models, [r["src"] for r in test], args.new_tokens, args.rounds)
    save()
    if args.skip_chrf:
        result["seconds"] = round(time.perf_counter() - started, 1)
        save()
        return result
    rows = test[:args.sentences]
    result["translations"] = {}
    for name, model in models.items():
        print(f"translating {len(rows)} sentences on {name} ...", flush=True)
        result["translations"][name] = translations(model, rows, args.max_new_tokens)
        save()
    fp, fast = (result["translations"][n]["hypotheses"] for n in ("float32", FAST))
    gain = paired_bootstrap(fp, fast, [r["tgt"] for r in rows], "chrf")
    result["chrf"] = {"float32": gain.a, FAST: gain.b, "difference": gain.gain, "low": gain.low, "high": gain.high,
                      "sentences": gain.sentences, "identical_outputs": sum(a == b for a, b in zip(fp, fast)) / len(fp)}
    result["provenance"]["loadavg_end"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    save()
    return result


def provenance() -> dict[str, Any]:
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").is_file() else []
    return {"git": _git_head(), "torch": torch.__version__, "torchao": torchao.__version__, "adaptkit": ak.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "cpu_flags": sorted({f for f in flags if f in ("amx_int8", "amx_bf16", "avx512_vnni", "avx_vnni",
                                                           "avx512_bf16")}),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"), "loadavg_start": os.getloadavg()}


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    out.with_suffix(".md").write_text(render(result))


def render(r: dict[str, Any]) -> str:
    p = r["provenance"]
    lines = [f"# Fast inference weights: float32 vs quantize=\"{FAST}\" on {r['backbone']}", "",
             f"Command: `{r['command']}` — {r.get('seconds', '?')} s on {p['platform']}, torch {p['torch']}, "
             f"torchao {p['torchao']}, {r['torch_threads']} threads, git {p['git']}, CPU flags "
             f"{', '.join(p['cpu_flags']) or 'none of note'}, ONEDNN_MAX_CPU_ISA={p['ONEDNN_MAX_CPU_ISA']}, "
             f"load average {p['loadavg_start'][0]:.1f} at the start"
             + (f", {p['loadavg_end'][0]:.1f} at the end" if "loadavg_end" in p else "") + ".", ""]
    if r.get("note"):
        lines += [f"**{r['note']}**", ""]
    k = r.get("kernels")
    if k:
        where = r.get("kernels_provenance") or p
        lines += [f"## 1. Kernels: time against float32 `F.linear`, median of {k['rounds']} interleaved rounds "
                  f"({r['torch_threads']} threads)", "",
                  f"`{where.get('command', r['command'])}` at git {where['git']}. Lower is faster. Rows: tokens in "
                  "the call (decode: one per sequence of the batch). Each timing repeats one layer, whose weights "
                  "stay in cache, which flatters float32 on the small projections against a whole model streaming "
                  "its weights: part 4 is the measure that counts.", ""]
        names = k["candidates"]
        short = {n: n.split(" (")[0].replace("torchao ", "").replace("ActivationInt8Weight", "…") for n in names}
        lines += ["| shape | tokens | " + " | ".join(short[n] for n in names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for label, shape in k["shapes"].items():
            for tokens in k["tokens"]:
                e = shape[str(tokens)]
                lines.append(f"| {label} | {tokens} | " + " | ".join(f"{e[n]['vs_float32']:.2f}x" for n in names)
                             + " |")
        lines += ["", "One decode step's matmuls (18 layers and the head, per-shape medians summed), against "
                  "float32:", "",
                  "| tokens | " + " | ".join(short[n] for n in names) + " |", "|---|" + "---|" * len(names)]
        for tokens, ratios in k["decode_step"].items():
            lines.append(f"| {tokens} | " + " | ".join(f"{ratios[n]:.2f}x" for n in names) + " |")
        head = k["shapes"]["head 640→262144"]["16"]
        lines += ["", "Error at the head, 16 tokens: relative to float32 / largest |row alone − row in the batch| "
                  "relative to the output:", ""]
        lines += [f"- {n}: {head[n]['relative_error']:.4f} / {head[n]['alone_vs_batch']:.1e}"
                  for n in ["float32", *names]]
        lines.append("")
    t = r.get("training")
    if t:
        lines += ["## 2. The adapter", "",
                  f"LoRA r=16 all-linear, {r['steps']} steps on {SAMPLE} over the float32 backbone "
                  + (f"(reused: {t['reused']})" if "reused" in t else f"({t['seconds_per_step']:.1f} s a step)")
                  + "; loaded from its file over both backbones.", ""]
    mem = r.get("memory")
    if mem:
        lines += ["## 3. Backbone memory", "", "| backbone | all parameters | Linear layers (not the head) | head | "
                  "input embedding |", "|---|---|---|---|---|"]
        for name, m in mem.items():
            lines.append(f"| {name} | {m['backbone_bytes'] / 2**20:.0f} MiB | {m['linear_bytes'] / 2**20:.0f} MiB | "
                         f"{m['head_bytes'] / 2**20:.0f} MiB | {m['embedding_bytes'] / 2**20:.0f} MiB |")
        lines += ["", "(The float32 head is the embedding itself, tied: counted once in the total.)", ""]
    d = r.get("decode")
    if d:
        lines += [f"## 4. Decode: exactly {d['new_tokens']} new tokens, greedy, {d['rounds']} interleaved rounds", "",
                  f"| batch, adapter | tokens/s float32 | tokens/s {FAST} | time vs float32 (median of per-round "
                  "ratios) | same new tokens |", "|---|---|---|---|---|"]
        for key, b in d["batches"].items():
            tps = b["tokens_per_second"]
            lines.append(f"| {key} | {tps['float32']:.1f} | {tps[FAST]:.1f} | {b['vs_float32']:.2f}x | "
                         f"{100 * b['same_new_tokens']:.0f}% |")
        lines.append("")
    c = r.get("chrf")
    if c:
        tr = r["translations"]
        loss = (f"{tr['float32']['loss']:.3f} → {tr[FAST]['loss']:.3f}" if "loss" in tr["float32"] else "—")
        lines += [f"## 5. chrF of the LoRA on the test split ({SAMPLE}, greedy, ≤{r['max_new_tokens']} new tokens)", "",
                  f"| sentences | float32 | {FAST} | {FAST} − float32 (95% paired bootstrap) | identical outputs | "
                  f"teacher-forced loss fp32 → {FAST} | wall s/sentence fp32 → {FAST} |",
                  "|---|---|---|---|---|---|---|",
                  f"| {c['sentences']} | {c['float32']:.1f} | {c[FAST]:.1f} | {c['difference']:+.2f} "
                  f"({c['low']:+.2f} … {c['high']:+.2f}) | {100 * c['identical_outputs']:.0f}% | {loss} | "
                  f"{tr['float32']['wall_seconds_per_sentence']:.2f} → "
                  f"{tr[FAST]['wall_seconds_per_sentence']:.2f} |", "",
                  "The translation times run one backbone after the other, not interleaved: part 4 is the paired "
                  "timing.", ""]
    return "\n".join(lines)


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="gemma3-270m")
    parser.add_argument("--steps", type=int, default=40, help="LoRA training steps on the float32 backbone")
    parser.add_argument("--lr", type=float, default=None, help="LoRA learning rate (default: the trainer's)")
    parser.add_argument("--sentences", type=int, default=200, help="test sentences scored (the split has 200)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for the chrF translations")
    parser.add_argument("--new-tokens", type=int, default=32, help="exactly this many per decode timing")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode timings")
    parser.add_argument("--kernel-rounds", type=int, default=7, help="interleaved rounds of the kernel timings")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--kernels-only", action="store_true", help="part 1 only (no real weights)")
    parser.add_argument("--skip-kernels", action="store_true", help="reuse part 1 from the earlier JSON at --out")
    parser.add_argument("--skip-chrf", action="store_true", help="stop after the decode timings")
    parser.add_argument("--note", default="", help="printed at the top of the report (e.g. a loaded machine)")
    parser.add_argument("--work", default="runs/fast_weights", help="the adapter trained here is reused later")
    parser.add_argument("--out", default=str(RESULTS / "fast_weights"), help="writes OUT.json and OUT.md")
    parser.add_argument("--render", metavar="JSON", help="only redraw the markdown of an earlier run")
    args = parser.parse_args()
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    run(args)


if __name__ == "__main__":
    main()

"""Quantised backbones under adapters: float32 vs int8 and nf4 (vs bfloat16) on gemma3-270m, per adapter family.

    python benchmarks/quantized.py --library-only       # part 1 alone (no real weights: no lock needed)
    flock /tmp/realrun.lock python benchmarks/quantized.py   # gemma3-270m (part 1 reused if already in the JSON)
    python benchmarks/quantized.py --render benchmarks/results/quantized.json   # redraw the .md

What it measures, in one process (ratios within one run: the box is shared):

1. Library choice, on a stack of gemma3-270m-shaped Linear layers (640 → 2048 → 640, 6 blocks,
   256 tokens, one thread, CPU time, interleaved rounds): forward and forward+backward time against
   float32, whether the gradient reaches the input (what adapter training over the frozen weights
   needs), relative output error, bytes of the state dict. torchao weight-only int8, torchao dynamic
   int8 activations + int8 weights, optimum-quanto int8 weights (when installed), torch.ao dynamic.
2. One adapter per family (LoRA, AdaLoRA, prefix, bottleneck), trained `--steps` steps on the float32
   backbone on the shipped LibreOffice-help en→de sample (or reused from runs/quantized/ when a run with
   as many steps left them), then loaded from its file onto the float32 and the int8 backbone.
3. Backbone memory: bytes the parameters hold (a quantised weight counted by its int8 data and scales),
   and the share in the Linear layers that int8 touches (gemma3-270m's 262k-row embedding, ~63% of its
   parameters, stays as it is — and is tied to the output head, which also stays).
4. chrF of each family on the shipped test split (greedy, at most `--max-new-tokens`): LoRA on
   `--sentences` (200, the whole split), the other families on the first `--family-sentences` (64: a
   2-core CPU generates ~1 sentence a second), int8 and nf4 (bitsandbytes, when installed) against
   float32 with a paired bootstrap interval of the difference; the generation's wall and CPU seconds
   per sentence.
5. Decode latency: one batch of 8 prompts, exactly 32 new tokens, bare and with LoRA, float32 / int8 /
   nf4 / bfloat16 interleaved over rounds (bfloat16 only where the CPU has avx512_bf16 or AMX).
6. Adapter training over the int8 backbone (QLoRA-style): a LoRA trained `--steps` steps there, its dev
   loss before and after, and seconds per step against the float32 LoRA's.

Writes benchmarks/results/quantized.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import platform
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

import adaptkit as ak
from adaptkit.core.quantize import storage_bytes
from adaptkit.corpora import load_sample
from adaptkit.data import PromptFormat, prompt_inputs
from adaptkit.evaluation import evaluate
from adaptkit.evaluation.scoring import paired_bootstrap
from adaptkit.tasks.translate import Translator

SAMPLE = "libreoffice-help-en-de"
FAMILIES = {  # the demo's settings for LoRA and bottleneck; AdaLoRA and prefix at their usual sizes
    "lora": (lambda steps: ak.LoRA(r=16, alpha=32, targets="all-linear"), 1e-3),
    "adalora": (lambda steps: ak.AdaLoRA(init_r=12, target_r=8, total_steps=steps, targets="all-linear"), 2e-3),
    "prefix": (lambda steps: ak.Prefix(length=16), 1e-2),
    "bottleneck": (lambda steps: ak.Bottleneck(reduction=8, placement="pfeiffer"), 2e-3),
}
CHRF_KEYS = {"int8": "chrf", "nf4": "chrf_nf4"}  # result key of each quantised backbone's chrF comparison
RESULTS = Path(__file__).parent / "results"


# -- 1. library choice ----------------------------------------------------------------------------

def library_choice(rounds: int = 5) -> dict[str, Any]:
    torch.manual_seed(0)
    d, f, blocks, tokens = 640, 2048, 6, 256
    layers: list[nn.Module] = []
    for _ in range(blocks):
        layers += [nn.Linear(d, f, bias=False), nn.GELU(), nn.Linear(f, d, bias=False)]
    base = nn.Sequential(*layers).eval().requires_grad_(False)
    x = torch.randn(tokens, d)
    reference = base(x)
    grad_reference = _input_grad(base, x)

    def torchao(config_name: str):
        def build(m: nn.Module) -> nn.Module:
            import torchao.quantization as q
            q.quantize_(m, getattr(q, config_name)())
            return m
        return build

    def quanto(m: nn.Module) -> nn.Module:
        from optimum.quanto import freeze, qint8, quantize
        quantize(m, weights=qint8)
        freeze(m)
        return m.requires_grad_(False)

    def torch_dynamic(m: nn.Module) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecated in favour of torchao: that is the point of measuring it
            return torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)

    candidates = {"torchao Int8WeightOnlyConfig": torchao("Int8WeightOnlyConfig"),
                  "torchao Int8DynamicActivationInt8WeightConfig": torchao("Int8DynamicActivationInt8WeightConfig"),
                  "optimum-quanto qint8 weights": quanto, "torch.ao quantize_dynamic (deprecated)": torch_dynamic}
    built: dict[str, nn.Module] = {"float32": base}
    out: dict[str, Any] = {"shape": {"d": d, "ffn": f, "blocks": blocks, "tokens": tokens}, "candidates": {}}
    for name, build in candidates.items():
        try:
            model = build(copy.deepcopy(base))
        except Exception as error:  # noqa: BLE001 — a candidate that does not install or build is a result
            out["candidates"][name] = {"error": f"{type(error).__name__}: {error}"[:200]}
            continue
        built[name] = model
        with torch.no_grad():
            y = model(x)
        entry: dict[str, Any] = {
            "relative_error": float((y - reference).norm() / reference.norm()),
            "state_dict_bytes": _saved_bytes(model),
            "still_nn_linear": isinstance(model[0], nn.Linear),
        }
        try:
            grad = _input_grad(model, x)
            entry["grad_to_input"] = True
            entry["grad_relative_error"] = float((grad - grad_reference).norm() / grad_reference.norm())
        except Exception as error:  # noqa: BLE001
            entry["grad_to_input"] = False
            entry["grad_error"] = f"{type(error).__name__}: {error}"[:160]
        out["candidates"][name] = entry
    out["state_dict_bytes_float32"] = _saved_bytes(base)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    times: dict[str, dict[str, list[float]]] = {n: {"forward": [], "forward_backward": []} for n in built}
    for _ in range(rounds):  # interleaved: a slow spell of the shared box hits every candidate alike
        for name, model in built.items():
            with torch.no_grad():
                times[name]["forward"].append(_cpu_seconds(lambda m=model: m(x)))
            if out["candidates"].get(name, {}).get("grad_to_input", True):
                times[name]["forward_backward"].append(_cpu_seconds(lambda m=model: _input_grad(m, x)))
    torch.set_num_threads(threads)
    fp = {k: statistics.median(v) for k, v in times["float32"].items()}
    out["float32_cpu_seconds"] = fp
    for name in built:
        if name == "float32":
            continue
        for kind, values in times[name].items():
            if values:
                out["candidates"][name][f"{kind}_vs_float32"] = statistics.median(values) / fp[kind]
    return out


def _input_grad(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    model(x).pow(2).mean().backward()
    return x.grad


def _saved_bytes(model: nn.Module) -> int:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()


def _cpu_seconds(fn) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


# -- 2.-6. gemma3-270m ----------------------------------------------------------------------------

def linear_bytes(model: ak.AdaptedModel) -> int:
    """Bytes of the Linear weights quantisation can touch (every nn.Linear but the output head)."""
    head = model.model.get_output_embeddings()
    return sum(storage_bytes(m) for m in model.model.modules() if isinstance(m, nn.Linear) and m is not head)


def train_adapters(backbone: str, work: Path, steps: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = None
    for family, (config, lr) in FAMILIES.items():
        path = work / "adapters" / f"{family}.safetensors"
        if path.is_file() and (ak.read_adapter_info(path).get("training") or {}).get("quantized_bench_steps") == steps:
            out[family] = {"reused": str(path)}
            continue
        model = model or ak.load(backbone)
        summary = ak.train(model, adapter=family, train=SAMPLE, dev=None, adapter_config=config(steps),
                           max_steps=steps, batch_size=8, lr=lr, warmup_steps=max(1, steps // 10), eval_every=None,
                           generate=False, max_source_len=64, max_target_len=64, src_lang="en", tgt_lang="de",
                           domain="software", progress=False, resume=False,
                           output_dir=str(work / "train" / family))
        model.save_adapter(family, path, training={"quantized_bench_steps": steps, "sample": SAMPLE},
                           src_lang="en", tgt_lang="de", domain="software")
        model.remove_adapter(family)
        out[family] = {"seconds_per_step": summary["seconds"] / steps, "file_bytes": path.stat().st_size}
        print(f"trained {family}: {summary['seconds']:.0f} s", flush=True)
    return out


def translate_all(model: ak.AdaptedModel, work: Path, rows: dict[str, list[dict]],
                  max_new_tokens: int) -> dict[str, Any]:
    translator = Translator(model, batch_size=16)
    out = {}
    for family in FAMILIES:
        if family not in model.adapters:
            model.load_adapter(work / "adapters" / f"{family}.safetensors", family)
        wall, cpu = time.perf_counter(), time.process_time()
        hyps = translator.translate([r["src"] for r in rows[family]], "en", "de", adapter=family, num_beams=1,
                                    max_new_tokens=max_new_tokens)
        n = len(rows[family])
        out[family] = {"hypotheses": hyps, "wall_seconds_per_sentence": (time.perf_counter() - wall) / n,
                       "cpu_seconds_per_sentence": (time.process_time() - cpu) / n}
        print(f"  {family}: {out[family]['wall_seconds_per_sentence']:.2f} s/sentence", flush=True)
    return out


def decode_latency(models: dict[str, ak.AdaptedModel], rows: list[dict], rounds: int) -> dict[str, Any]:
    """Seconds for one batch of 8 prompts and exactly 32 new tokens, per backbone, bare and with LoRA."""
    model0 = next(iter(models.values()))
    inputs = prompt_inputs(model0.tokenizer, [r["src"] for r in rows[:8]], ["en"] * 8, ["de"] * 8, model0.family,
                           PromptFormat())
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        for name, model in models.items():
            for adapter in (None, "lora"):
                key = f"{name} {'bare' if adapter is None else 'lora'}"
                wall = time.perf_counter()
                model.generate(**inputs, adapter=adapter, do_sample=False, num_beams=1, max_new_tokens=32,
                               min_new_tokens=32)
                times.setdefault(key, []).append(time.perf_counter() - wall)
    medians = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": medians, "all": times, "batch": 8, "new_tokens": 32, "rounds": rounds,
            "vs_float32": {k: v / medians[k.replace(k.split()[0], "float32", 1)] for k, v in medians.items()}}


def train_on_int8(model: ak.AdaptedModel, work: Path, steps: int) -> dict[str, Any]:
    dev = load_sample(SAMPLE, "dev").select(range(32))
    before = evaluate(model, dev, None, generate=False, max_source_len=64, max_target_len=64)["loss"]
    config, lr = FAMILIES["lora"]
    summary = ak.train(model, adapter="lora-int8", train=SAMPLE, dev=dev, adapter_config=config(steps),
                       max_steps=steps, batch_size=8, lr=lr, warmup_steps=max(1, steps // 10), eval_every=steps,
                       generate=False, max_source_len=64, max_target_len=64, src_lang="en", tgt_lang="de",
                       domain="software", progress=False, resume=False, output_dir=str(work / "train" / "lora-int8"))
    info = ak.read_adapter_info(summary["output"])
    return {"dev_loss_before": before, "dev_loss_after": summary["best_metrics"]["loss"],
            "seconds_per_step": summary["seconds"] / steps, "dev_sentences": len(dev),
            "file_backbone_quantization": info["backbone"].get("quantization")}


def bf16_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    work = Path(args.work)
    result: dict[str, Any] = {
        "command": " ".join(sys.argv), "backbone": args.backbone, "steps": args.steps, "sentences": args.sentences,
        "family_sentences": args.family_sentences,
        "max_new_tokens": args.max_new_tokens, "torch_threads": torch.get_num_threads(),
        "provenance": {"git": _git_head(), "torch": torch.__version__, "torchao": _version("torchao"),
                       "bitsandbytes": _version("bitsandbytes"),
                       "python": platform.python_version(), "platform": platform.platform(),
                       "bf16_cpu": bf16_supported()},
    }
    save = lambda: _write(result, Path(args.out))  # noqa: E731 — partial results survive a kill
    earlier = Path(args.out).with_suffix(".json")
    earlier = json.loads(earlier.read_text()) if earlier.is_file() else {}
    if "library_choice" in earlier and not args.library_only:  # part 1 needs no real weights: run apart
        result["library_choice"] = earlier["library_choice"]
        result["library_choice_provenance"] = earlier.get("library_choice_provenance", earlier.get("provenance"))
    else:
        print("library choice ...", flush=True)
        result["library_choice"] = library_choice()
        result["library_choice_provenance"] = {**result["provenance"], "command": result["command"]}
    if args.library_only:
        save()
        return result
    save()
    result["training"] = train_adapters(args.backbone, work, args.steps)
    save()

    test = list(load_sample(SAMPLE, "test"))
    rows = {f: test[: args.sentences if f == "lora" else args.family_sentences] for f in FAMILIES}
    models: dict[str, ak.AdaptedModel] = {}
    result["memory"], result["translations"] = {}, {}
    variants = {"float32": {}, "int8": {"quantize": "int8"}}
    if _version("bitsandbytes") != "not installed":
        variants["nf4"] = {"quantize": "nf4"}
    if bf16_supported():
        variants["bfloat16"] = {"dtype": torch.bfloat16}
    for name, kwargs in variants.items():
        models[name] = model = ak.load(args.backbone, **kwargs)
        result["memory"][name] = {"backbone_bytes": storage_bytes(model.model), "linear_bytes": linear_bytes(model),
                                  "quantization": model.quantization}
        if name == "bfloat16":
            model.load_adapter(work / "adapters" / "lora.safetensors", "lora")
            continue
        print(f"translating on {name} ...", flush=True)
        result["translations"][name] = translate_all(model, work, rows, args.max_new_tokens)
        save()
    for variant, key in CHRF_KEYS.items():  # each quantised backbone against float32, family by family
        if variant not in result["translations"]:
            continue
        result[key] = {}
        for family in FAMILIES:
            fp, q = (result["translations"][v][family]["hypotheses"] for v in ("float32", variant))
            gain = paired_bootstrap(fp, q, [r["tgt"] for r in rows[family]], "chrf")
            result[key][family] = {"float32": gain.a, variant: gain.b, "difference": gain.gain, "low": gain.low,
                                   "high": gain.high, "sentences": gain.sentences,
                                   "identical_outputs": sum(a == b for a, b in zip(fp, q)) / len(fp)}
    save()
    print("decode latency ...", flush=True)
    result["decode_latency"] = decode_latency(models, test, args.rounds)
    save()
    for name in ("float32", "bfloat16"):
        models.pop(name, None)
    print("training over int8 ...", flush=True)
    result["train_on_int8"] = train_on_int8(models["int8"], work, args.steps)
    result["seconds"] = round(time.perf_counter() - started, 1)
    save()
    return result


def _write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, ensure_ascii=False))
    out.with_suffix(".md").write_text(render(result))


def render(r: dict[str, Any]) -> str:
    lines = [f"# Quantised backbones under adapters: {r['backbone']}", "",
             f"Command: `{r['command']}` — {r.get('seconds', '?')} s on {r['provenance']['platform']}, "
             f"torch {r['provenance']['torch']}, torchao {r['provenance']['torchao']}, "
             f"{r['torch_threads']} threads, git {r['provenance']['git']}.", ""]
    run = r.get("run")
    if run:
        lines += [f"Run: `{run['command']}`: {run['wall_seconds'] / 60:.0f} min wall, "
                  f"{run['user_cpu_seconds'] / 60:.0f} CPU-min, peak RSS {run['peak_rss_kib'] / 2**20:.1f} GiB. "
                  f"{run['note']}.", ""]
    lib = r.get("library_choice")
    if lib:
        s, where = lib["shape"], r.get("library_choice_provenance") or r["provenance"]
        lines += ["## 1. Library choice (CPU time, one thread, median of interleaved rounds)", "",
                  f"`{where.get('command', r['command'])}` at git {where['git']}.", "",
                  f"{s['blocks']} blocks of Linear {s['d']}→{s['ffn']}→{s['d']}, {s['tokens']} tokens. "
                  "Ratios against float32 (lower is faster); gradient to the input is what training adapters "
                  "over the frozen quantised weights needs.", "",
                  "| library / config | forward | forward+backward | grad to input | rel. error | bytes vs fp32 "
                  "| still nn.Linear |", "|---|---|---|---|---|---|---|"]
        for name, c in lib["candidates"].items():
            if "error" in c:
                lines.append(f"| {name} | — | — | — | {c['error']} | — | — |")
                continue
            fb = f"{c['forward_backward_vs_float32']:.2f}x" if "forward_backward_vs_float32" in c else "—"
            grad = "yes" if c["grad_to_input"] else f"no ({c.get('grad_error', '')[:60]})"
            lines.append(f"| {name} | {c['forward_vs_float32']:.2f}x | {fb} | {grad} | {c['relative_error']:.4f} | "
                         f"{c['state_dict_bytes'] / lib['state_dict_bytes_float32']:.2f} | {c['still_nn_linear']} |")
        lines.append("")
    mem = r.get("memory")
    if mem:
        lines += ["## 2. Backbone memory", "", "| backbone | all parameters | Linear layers (not the head) | scheme |",
                  "|---|---|---|---|"]
        for name, m in mem.items():
            q = m["quantization"]
            lines.append(f"| {name} | {m['backbone_bytes'] / 2**20:.0f} MiB | {m['linear_bytes'] / 2**20:.0f} MiB | "
                         f"{q['library'] + ' ' + q['method'] if q else '—'} |")
        lines.append("")
    for variant, key in CHRF_KEYS.items():
        chrf = r.get(key)
        if not chrf:
            continue
        trans, v = r["translations"], variant
        lines += [f"## 3{'' if v == 'int8' else 'b'}. chrF per family on the test split ({SAMPLE}, greedy, "
                  f"≤{r['max_new_tokens']} new tokens), {v} against float32, adapters trained {r['steps']} steps "
                  "(batch 8) on the float32 backbone", "",
                  f"| family | sentences | float32 | {v} | {v} − float32 (95% paired bootstrap) | identical outputs "
                  f"| s/sentence fp32 → {v} (wall) | CPU s/sentence fp32 → {v} |", "|---|---|---|---|---|---|---|---|"]
        for family, c in chrf.items():
            f32, q = trans["float32"][family], trans[v][family]
            lines.append(f"| {family} | {c['sentences']} | {c['float32']:.1f} | {c[v]:.1f} | "
                         f"{c['difference']:+.2f} ({c['low']:+.2f} … {c['high']:+.2f}) | "
                         f"{100 * c['identical_outputs']:.0f}% | "
                         f"{f32['wall_seconds_per_sentence']:.2f} → {q['wall_seconds_per_sentence']:.2f} | "
                         f"{f32['cpu_seconds_per_sentence']:.2f} → {q['cpu_seconds_per_sentence']:.2f} |")
        lines.append("")
    lat = r.get("decode_latency")
    if lat:
        lines += [f"## 4. Decode latency: batch {lat['batch']}, exactly {lat['new_tokens']} new tokens, median of "
                  f"{lat['rounds']} interleaved rounds (wall)", "", "| backbone + adapter | seconds | vs float32 |",
                  "|---|---|---|"]
        for key, seconds in lat["seconds"].items():
            lines.append(f"| {key} | {seconds:.2f} | {lat['vs_float32'][key]:.2f}x |")
        lines.append("")
    t = r.get("train_on_int8")
    if t:
        fp_step = r.get("training", {}).get("lora", {}).get("seconds_per_step")
        lines += ["## 5. Training a LoRA over the int8 backbone", "",
                  f"Dev loss ({t['dev_sentences']} dev sentences) {t['dev_loss_before']:.3f} (bare) → "
                  f"{t['dev_loss_after']:.3f} after {r['steps']} steps; {t['seconds_per_step']:.1f} s a step"
                  + (f" (the float32 LoRA of part 2: {fp_step:.1f} s a step, measured at another time of the run "
                     "on a shared CPU: not a paired comparison)" if fp_step else "") + "; the file records "
                  f"`{json.dumps(t['file_backbone_quantization'])}`.", ""]
    return "\n".join(lines)


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="gemma3-270m")
    parser.add_argument("--steps", type=int, default=12, help="training steps per adapter (batch 8)")
    parser.add_argument("--sentences", type=int, default=200, help="test sentences for LoRA")
    parser.add_argument("--family-sentences", type=int, default=64, help="test sentences for the other families")
    parser.add_argument("--library-only", action="store_true", help="part 1 only (no real weights)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the decode-latency batch")
    parser.add_argument("--work", default="runs/quantized", help="adapters trained here are reused by later runs")
    parser.add_argument("--out", default=str(RESULTS / "quantized"), help="writes OUT.json and OUT.md")
    parser.add_argument("--render", metavar="JSON", help="only redraw the markdown of an earlier run")
    args = parser.parse_args()
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    run(args)


if __name__ == "__main__":
    main()

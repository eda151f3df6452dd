"""Routing, switching and loading speed over one backbone, as ratios measured in one run.

    python benchmarks/routing_speed.py [--quick] [--threads 1]

Random weights (speed only). Every ratio is taken against its baseline in the same run, the two
interleaved call by call (the order rotated each round), and is the median over rounds of the
paired ratio. Times are CPU time of the single-threaded process (reads from disk: wall time): on a
machine whose cores are shared with other jobs, wall time mostly measures the wait for a core.

  1. unmerged forward per family vs the bare backbone (Marian-base encoder–decoder, 8 × 48 / 32 tokens);
  2. one batch of 8 rows routed to 8 adapters vs the same batch on one adapter — LoRA only, and three
     families (LoRA, bottleneck, prefix) — and vs one call per adapter;
  3. gathered per-row LoRA vs peft's `adapter_names` mixed batch, same weights and batch, at 2, 8 and
     32 adapters (Llama-shaped decoder: d 512, 6 layers, r 16 on q/k/v/o; 8 × 64 tokens, 32 × 32 at 32);
  4. switching: `using()` enter + exit, and `model(..., adapter=)` per call against the backbone run
     under a routing already set (tiny Llama: the bank's own cost, not the adapter's);
  5. loading: hot-load of a 7.6 MB adapter file (LoRA r8 on every projection of gemma3-270m; the zoo
     backbone when cached, else its shapes) against reading the file's bytes; the load time of the
     n-th adapter from a store of 1,000 as the bank grows to 1,000 resident; and the adapter against
     reloading a full fine-tuned checkpoint of the same backbone (`from_pretrained`, 1.07 GB), from the
     page cache and from disk;
  6. the chunked target-token loss (evaluation/loss.py) against the plain one: peak memory growth and
     time of one LoRA loss + backward on gemma3's 262k vocabulary, each in a fresh forked process.

Writes benchmarks/results/routing_speed.json (every figure, machine, load, versions, commit),
routing_speed.md and routing_speed.png.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import peft
import torch
import transformers as tf

import adaptkit as ak
from adaptkit import zoo
from adaptkit.core.routing import routing_scope

RESULTS = Path(__file__).parent / "results"


# -- timing ---------------------------------------------------------------------------------------

def interleaved(fns: dict[str, Callable[[], object]], rounds: int,
                clock: Callable[[], float] = time.process_time) -> dict[str, list[float]]:
    """Seconds per call of each function, one call of each per round, the order rotated every round.

    By default CPU seconds of this (single-threaded) process: on a machine whose cores are shared
    with other jobs, wall time mostly measures the wait for a core. (Reading from the page cache is
    CPU work too, counted as system time; only the cold reads from disk are timed by the wall clock.)
    """
    names = list(fns)
    for name in names:
        fns[name]()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start = clock()
            fns[name]()
            times[name].append(clock() - start)
    return times


def paired_ratio(times: dict[str, list[float]], name: str, baseline: str) -> float:
    return statistics.median(a / b for a, b in zip(times[name], times[baseline]))


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


# -- backbones ------------------------------------------------------------------------------------

def marian_base() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.MarianConfig(vocab_size=8000, d_model=512, encoder_layers=6, decoder_layers=6,
                             encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                             decoder_ffn_dim=2048, max_position_embeddings=256, pad_token_id=0,
                             decoder_start_token_id=0, eos_token_id=1)
    return tf.MarianMTModel(config).eval()


def llama_shaped(hidden: int = 512, layers: int = 6) -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                            max_position_embeddings=512)
    return tf.LlamaForCausalLM(config).eval()


def randomize(model: ak.AdaptedModel, name: str) -> None:
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.normal_(0, 0.02)


def ids(rows: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 8000, (rows, tokens), generator=torch.Generator().manual_seed(seed))


# -- 1, 2: families, mixed batches (Marian) --------------------------------------------------------

def families_and_mixed(rounds: int) -> dict:
    model = ak.AdaptedModel(marian_base())
    batch = {"input_ids": ids(8, 48), "attention_mask": torch.ones(8, 48, dtype=torch.long),
             "decoder_input_ids": ids(8, 32, seed=1)}
    families = {"lora": ak.LoRA(r=16, targets="attention"), "bottleneck": ak.Bottleneck(reduction=16),
                "prefix": ak.Prefix(length=16)}
    for family, config in families.items():
        for i in range(8):
            model.add_adapter(f"{family}{i}", config)
            randomize(model, f"{family}{i}")
    lora_only = [f"lora{i}" for i in range(8)]
    mixed = [f"{list(families)[i % 3]}{i}" for i in range(8)]  # 3 LoRA, 3 bottleneck, 2 prefix

    def call(spec):
        return lambda: model(**batch, adapter=spec)

    def one_call_per_adapter():
        for row, name in enumerate(mixed):
            model(**{k: v[row:row + 1] for k, v in batch.items()}, adapter=name)

    fns = {"bare": call(None), **{family: call(f"{family}0") for family in families},
           "mixed_lora": call(lora_only), "mixed_families": call(mixed), "one_call_per_adapter": one_call_per_adapter}
    with torch.no_grad():
        times = interleaved(fns, rounds)
        model.merge_adapter("lora0")
        merged = interleaved({"bare_pre_merge": lambda: model.model(**batch), "lora_merged": call("lora0")}, rounds)
        model.unmerge_adapter()
    unmerged = {family: paired_ratio(times, family, "bare") for family in families}
    uniform_mean = statistics.mean(statistics.median(times[f]) for f in families)
    return {
        "backbone": "Marian-base shape (6+6 layers, d 512), random weights",
        "batch": "8 rows × 48 source / 32 target tokens",
        "adapters": {"lora": "r 16, attention (q/k/v/o, self and cross)", "bottleneck": "Pfeiffer, reduction 16",
                     "prefix": "16 tokens, every attention"},
        "median_ms": {name: median_ms(values) for name, values in times.items()},
        "unmerged_vs_bare": unmerged,
        "lora_merged_vs_bare": paired_ratio(merged, "lora_merged", "bare_pre_merge"),
        "mixed_lora_vs_one_lora": paired_ratio(times, "mixed_lora", "lora"),
        "mixed_families_vs_one_lora": paired_ratio(times, "mixed_families", "lora"),
        "mixed_families_vs_mean_one_adapter": statistics.median(times["mixed_families"]) / uniform_mean,
        "one_call_per_adapter_vs_mixed_call": paired_ratio(times, "one_call_per_adapter", "mixed_families"),
    }


# -- 3: gathered LoRA vs peft adapter_names (Llama-shaped) ----------------------------------------

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def versus_peft(rounds: int, counts: list[int]) -> dict:
    ours = ak.AdaptedModel(llama_shaped())
    theirs = llama_shaped()  # the same weights: built from the same seed
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS)
    names = [f"a{i}" for i in range(max(counts))]
    pm = None
    for name in names:
        ours.add_adapter(name, ak.LoRA(r=16, alpha=32, targets=tuple(TARGETS)))
        randomize(ours, name)
        if pm is None:
            pm = peft.get_peft_model(theirs, config, adapter_name=name)
        else:
            pm.add_adapter(name, config)
        _, tensors = ours.get_adapter(name).to_peft()
        peft.set_peft_model_state_dict(pm, {f"base_model.model.{k}": v for k, v in tensors.items()}, adapter_name=name)
    pm.eval()
    out = {"backbone": "Llama shape (6 layers, d 512, 8 heads), random weights", "lora": "r 16 on q/k/v/o",
           "by_adapters": {}}
    with torch.no_grad():
        for count in counts:
            rows, tokens = (32, 32) if count == 32 else (8, 64)
            batch = ids(rows, tokens)
            spec = [names[row % count] for row in range(rows)]
            a = ours(input_ids=batch, adapter=spec).logits
            b = pm(input_ids=batch, adapter_names=spec).logits
            gap = (a - b).abs().max().item() / b.abs().max().item()
            assert gap < 1e-4, f"adaptkit and peft disagree by {gap:.2g} of the logits' scale"
            times = interleaved({"adaptkit": lambda x=batch, s=spec: ours(input_ids=x, adapter=s),
                                 "peft": lambda x=batch, s=spec: pm(input_ids=x, adapter_names=s),
                                 "adaptkit_one_adapter": lambda x=batch: ours(input_ids=x, adapter=names[0]),
                                 "bare": lambda x=batch: ours(input_ids=x, adapter=None)}, rounds)
            bare = statistics.median(times["bare"])
            out["by_adapters"][str(count)] = {
                "batch": f"{rows} × {tokens}", "median_ms": {k: median_ms(v) for k, v in times.items()},
                "peft_over_adaptkit": paired_ratio(times, "peft", "adaptkit"),
                # the LoRA path alone: what each adds to the bare backbone's forward
                "peft_over_adaptkit_added_time": (statistics.median(times["peft"]) - bare)
                / max(statistics.median(times["adaptkit"]) - bare, 1e-9),
                "mixed_vs_one_adapter": paired_ratio(times, "adaptkit", "adaptkit_one_adapter"),
                "max_relative_logit_gap": gap}
    return out


# -- 4: switching ---------------------------------------------------------------------------------

def switching(rounds: int) -> dict:
    model = ak.AdaptedModel(llama_shaped(hidden=32, layers=1))
    names = [f"s{i}" for i in range(8)]
    for name in names:
        model.add_adapter(name, ak.LoRA(r=4))
    batch = {"input_ids": ids(1, 4), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    preset = model.routing_for(names[0])
    cycle = iter(range(10**9))

    def switch_every_call():
        model(**batch, adapter=names[next(cycle) % len(names)])

    def under_preset_routing():
        with routing_scope(preset):
            model.model(**batch)

    def using_only():
        with model.using(names[next(cycle) % len(names)]):
            pass

    calls = rounds * 200
    with torch.no_grad():
        times = interleaved({"switch_every_call": switch_every_call, "preset_routing": under_preset_routing,
                             "bare_bank": lambda: model(**batch), "bare_backbone": lambda: model.model(**batch)},
                            calls)
        using = interleaved({"using": using_only}, calls)["using"]
    def paired_us(name: str, baseline: str) -> float:
        return 1e6 * statistics.median(a - b for a, b in zip(times[name], times[baseline]))

    return {
        "backbone": "tiny Llama (1 layer, d 32), 8 LoRA r4 adapters resident; 1 row × 4 tokens",
        "median_us": {k: 1e6 * statistics.median(v) for k, v in times.items()},
        "using_enter_exit_us": 1e6 * statistics.median(using),
        "adapter_call_overhead_us": paired_us("switch_every_call", "preset_routing"),
        "bare_call_overhead_us": paired_us("bare_bank", "bare_backbone"),
        # the fastest calls of each: what the code costs when the machine lets it run
        "adapter_call_overhead_us_fastest": 1e6 * (min(times["switch_every_call"]) - min(times["preset_routing"])),
        "bare_call_overhead_us_fastest": 1e6 * (min(times["bare_bank"]) - min(times["bare_backbone"])),
    }


# -- 5: loading -----------------------------------------------------------------------------------

def hot_and_cold_load(rounds: int, cold: bool) -> dict:
    cached = zoo.is_cached("gemma3-270m")
    if cached:
        model = ak.load("gemma3-270m")
        backbone = "gemma3-270m (zoo weights)"
    else:
        config = tf.Gemma3TextConfig(vocab_size=1024, hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                                     num_attention_heads=4, num_key_value_heads=1, head_dim=256)
        model = ak.AdaptedModel(tf.Gemma3ForCausalLM(config).eval())
        backbone = "gemma3-270m's layer shapes, 1k vocabulary (zoo backbone not cached)"
    model.add_adapter("x", ak.LoRA(r=8, targets="all-linear"))
    randomize(model, "x")
    out: dict = {"backbone": backbone, "adapter": "LoRA r8, every linear projection"}
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_adapter("x", Path(tmp) / "x.safetensors")
        out["file_mb"] = path.stat().st_size / 1e6
        count = iter(range(10**9))

        def load(verify: bool = True) -> None:
            name = model.load_adapter(path, name=f"hot{next(count)}", verify=verify)
            model.remove_adapter(name)

        calls = {"read_bytes": path.read_bytes, "load": load, "load_unverified": lambda: load(False)}
        times = interleaved(calls, rounds * 3)
        out["median_ms"] = {k: median_ms(v) for k, v in times.items()}
        out["load_over_read_bytes"] = paired_ratio(times, "load", "read_bytes")
        # Wall clock as well: the checksum runs on a thread of its own beside the build, so a load's latency
        # (what a request waiting for the adapter sees) is less than its CPU time. Meaningful on quiet cores.
        wall = interleaved(calls, rounds * 3, clock=time.perf_counter)
        out["wall_median_ms"] = {k: median_ms(v) for k, v in wall.items()}
        out["wall_load_over_read_bytes"] = paired_ratio(wall, "load", "read_bytes")
        if cold and cached:
            out.update(checkpoint_reload(Path(tmp), path, load))
    return out


def checkpoint_reload(tmp: Path, adapter_file: Path, load: Callable[[], None]) -> dict:
    """Switching task by reloading a full fine-tuned checkpoint of the backbone (a copy of the zoo
    directory: the same size and format) vs loading the adapter, from the page cache and from disk.

    `from_pretrained` may map the file and read it lazily, so a reload counts until every weight's
    pages were read (one element per page touched), as the first forward would. Cold: the page
    cache is told to drop this copy's pages and the adapter file's (posix_fadvise DONTNEED on these
    files only: nothing else on the machine is evicted) before each read.
    """
    checkpoint = tmp / "checkpoint"
    checkpoint.mkdir()
    for item in zoo.model_dir("gemma3-270m").iterdir():
        if item.suffix in (".json", ".safetensors"):
            shutil.copyfile(item, checkpoint / item.name)
    weights = list(checkpoint.glob("*.safetensors"))

    def reload() -> None:
        reloaded = tf.AutoModelForCausalLM.from_pretrained(checkpoint)
        with torch.no_grad():
            for p in reloaded.parameters():
                p.view(-1)[:: max(1, 4096 // p.element_size())].sum()

    def drop_from_page_cache(*files: Path) -> None:
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    warm = interleaved({"reload_checkpoint": reload, "load": load}, 3)  # page cache: CPU work
    cold: dict[str, list[float]] = {"reload_checkpoint": [], "load": []}
    for _ in range(3):
        for name, fn, files in (("reload_checkpoint", reload, weights), ("load", load, [adapter_file])):
            drop_from_page_cache(*files)
            start = time.perf_counter()
            fn()
            cold[name].append(time.perf_counter() - start)
    return {"checkpoint_gb": sum(f.stat().st_size for f in weights) / 1e9,
            "warm_median_ms": {k: median_ms(v) for k, v in warm.items()},
            "warm_checkpoint_reload_over_adapter_load": paired_ratio(warm, "reload_checkpoint", "load"),
            "cold_median_ms": {k: median_ms(v) for k, v in cold.items()},
            "cold_checkpoint_reload_over_adapter_load": paired_ratio(cold, "reload_checkpoint", "load")}


def store_growth(count: int) -> dict:
    """CPU time to load the n-th adapter from a store of `count`, none evicted: resident grows with n.

    CPU time (`process_time`), not wall time: on a shared machine the wall time of a 5 ms load is
    mostly waiting for a core. Medians per tenth; the means include Python's full garbage
    collections, which scan every live object and so grow with the adapters resident.
    """
    with tempfile.TemporaryDirectory() as tmp:
        writer = ak.AdaptedModel(marian_base(), store=tmp)
        writer.add_adapter("w", ak.LoRA(r=2, targets="qv"))
        for i in range(count):
            randomize(writer, "w")
            writer.save_adapter("w", writer.store.path_for(f"store/a{i:04d}"))
        size_kb = writer.store.path_for("store/a0000").stat().st_size / 1e3
        del writer
        model = ak.AdaptedModel(marian_base(), store=tmp)
        load_ms = []
        for i in range(count):
            start = time.process_time()
            model.load_from_store(f"store/a{i:04d}")
            load_ms.append(1000 * (time.process_time() - start))
        alone = ak.AdaptedModel(marian_base(), store=tmp)
        alone.load_from_store("store/a0000")
        batch = {"input_ids": ids(8, 32), "decoder_input_ids": ids(8, 16, seed=1)}
        with torch.no_grad():
            calls = interleaved({"1_resident": lambda: alone(**batch, adapter="store/a0000"),
                                 "all_resident": lambda: model(**batch, adapter="store/a0000")}, 20)
    tenth = max(1, count // 10)
    tenths = [load_ms[i:i + tenth] for i in range(0, count, tenth)]
    return {"adapters": count, "file_kb": size_kb, "adapter": "LoRA r2 on q and v (Marian-base shape)",
            "load_cpu_ms": load_ms, "median_per_tenth_ms": [statistics.median(t) for t in tenths],
            "mean_per_tenth_ms": [statistics.mean(t) for t in tenths],
            "routed_call_median_ms": {k: median_ms(v) for k, v in calls.items()},
            "routed_call_all_over_one_resident": paired_ratio(calls, "all_resident", "1_resident")}


# -- 6: chunked target-token loss (the training step's logits on a 262k vocabulary) --------------------

def chunked_loss(quick: bool) -> dict:
    """Peak RSS growth and time of one LoRA loss + backward, plain vs chunked, each in a fresh forked process."""
    out = {"backbone": "gemma3 layout with its 262,144-token vocabulary, d 64, 2 layers (the logits' size "
                       "depends on the vocabulary and the target count only)",
           "batch": "8 rows × 64 tokens, 40 target tokens per row (320 targets)"}
    if "fork" not in multiprocessing.get_all_start_methods():
        return {**out, "skipped": "needs fork"}
    context = multiprocessing.get_context("fork")
    for chunked in (False, True):
        receive, send = context.Pipe(duplex=False)
        worker = context.Process(target=_loss_step, args=(chunked, send))
        worker.start()
        out["chunked" if chunked else "plain"] = receive.recv()
        worker.join()
    out["peak_growth_chunked_over_plain"] = out["chunked"]["peak_growth_mb"] / out["plain"]["peak_growth_mb"]
    out["step_chunked_over_plain"] = out["chunked"]["seconds"] / out["plain"]["seconds"]
    return out


def _loss_step(chunked: bool, send) -> None:
    from adaptkit.bench.measure import RssSampler, current_rss
    from adaptkit.evaluation.loss import target_loss

    torch.manual_seed(0)
    config = tf.Gemma3TextConfig(vocab_size=262144, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=64,
                                 layer_types=["sliding_attention", "full_attention"], pad_token_id=0)
    model = ak.AdaptedModel(tf.Gemma3ForCausalLM(config))
    model.add_adapter("a", ak.LoRA(r=8))
    model.train()
    batch_ids = torch.randint(3, 262144, (8, 64), generator=torch.Generator().manual_seed(0))
    labels = batch_ids.clone()
    labels[:, :24] = -100
    batch = {"input_ids": batch_ids, "attention_mask": torch.ones_like(batch_ids), "labels": labels}
    target_loss(model, {k: v[:1, 16:32] for k, v in batch.items()}, "a", chunked=chunked).backward()  # warm-up
    before = current_rss()
    with RssSampler(every=0.002) as sampler:
        start = time.process_time()
        loss = target_loss(model, batch, "a", chunked=chunked)
        loss.backward()
        seconds = time.process_time() - start
    send.send({"loss": loss.item(), "seconds": seconds, "peak_growth_mb": (sampler.peak - before) / 2**20})


# -- report ---------------------------------------------------------------------------------------

def provenance(threads: int, quick: bool) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "threads": threads, "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__, "transformers": tf.__version__, "peft": peft.__version__,
            "commit": commit, "quick": quick}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="every path once, few rounds (noisy)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = 3 if args.quick else 20
    results = {"provenance": provenance(args.threads, args.quick)}
    steps = {
        "families": lambda: families_and_mixed(rounds),
        "versus_peft": lambda: versus_peft(rounds, [2, 8] if args.quick else [2, 8, 32]),
        "switching": lambda: switching(rounds),
        "hot_load": lambda: hot_and_cold_load(rounds, cold=not args.quick),
        "store_growth": lambda: store_growth(100 if args.quick else 1000),
        "chunked_loss": lambda: chunked_loss(args.quick),
    }
    for key, step in steps.items():
        started = time.perf_counter()
        results[key] = step()
        results[key]["seconds"] = time.perf_counter() - started
        print(f"{key}: {results[key]['seconds']:.0f} s", flush=True)
    results["provenance"]["load_average_at_end"] = os.getloadavg()
    write(results)


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_speed.json").write_text(json.dumps(results, indent=2))
    markdown = "\n".join(table(results)) + "\n"
    (RESULTS / "routing_speed.md").write_text(markdown)
    print(markdown)
    with contextlib.suppress(ImportError):
        plot(results)


def table(r: dict) -> list[str]:
    f, p, s, h, g = r["families"], r["versus_peft"], r["switching"], r["hot_load"], r["store_growth"]
    u = f["unmerged_vs_bare"]
    lines = ["| figure | measured |", "|---|---|",
             f"| unmerged / bare forward: LoRA, bottleneck, prefix | {u['lora']:.3f}×, {u['bottleneck']:.3f}×, "
             f"{u['prefix']:.3f}× |",
             f"| merged LoRA / bare forward | {f['lora_merged_vs_bare']:.3f}× |",
             f"| 8 rows × 8 LoRA adapters / the batch on one LoRA adapter | {f['mixed_lora_vs_one_lora']:.3f}× |",
             f"| 8 rows × 8 adapters of 3 families / the batch on one LoRA adapter | "
             f"{f['mixed_families_vs_one_lora']:.3f}× (vs the mean of one adapter per family: "
             f"{f['mixed_families_vs_mean_one_adapter']:.3f}×) |",
             f"| 8 calls of one row / one mixed call (3 families) | {f['one_call_per_adapter_vs_mixed_call']:.2f}× |"]
    for count, item in p["by_adapters"].items():
        lines.append(f"| peft `adapter_names` / adaptkit gathered LoRA, {count} adapters ({item['batch']}): whole "
                     f"forward; time each adds to the bare forward | {item['peft_over_adaptkit']:.2f}×; "
                     f"{item['peft_over_adaptkit_added_time']:.1f}× (adaptkit mixed / one adapter: "
                     f"{item['mixed_vs_one_adapter']:.3f}×) |")
    lines += [f"| `using()` enter + exit | {s['using_enter_exit_us']:.1f} µs |",
              f"| `model(..., adapter=)` switching every call, over a routing already set (median / fastest) | "
              f"{s['adapter_call_overhead_us']:.1f} / {s['adapter_call_overhead_us_fastest']:.1f} µs |",
              f"| `model(...)` bare through the bank, over the backbone alone (median / fastest) | "
              f"{s['bare_call_overhead_us']:.1f} / {s['bare_call_overhead_us_fastest']:.1f} µs |",
              f"| hot-load (+ remove) of a {h['file_mb']:.1f} MB adapter, checksum verified / not | "
              f"{h['median_ms']['load']:.1f} / {h['median_ms']['load_unverified']:.1f} ms |",
              f"| reading its bytes (page cache) | {h['median_ms']['read_bytes']:.2f} ms (load / read: "
              f"{h['load_over_read_bytes']:.0f}×) |",
              *([f"| the same, wall clock (the checksum beside the build): verified / not; read | "
                 f"{h['wall_median_ms']['load']:.1f} / {h['wall_median_ms']['load_unverified']:.1f} ms; "
                 f"{h['wall_median_ms']['read_bytes']:.2f} ms (load / read: {h['wall_load_over_read_bytes']:.0f}×) |"]
                if "wall_median_ms" in h else []),
              f"| hot-load from a store of {g['adapters']} ({g['file_kb']:.0f} kB files), CPU time, first / last tenth "
              f"as the bank grows to {g['adapters']} resident: median (mean) | {g['median_per_tenth_ms'][0]:.1f} / "
              f"{g['median_per_tenth_ms'][-1]:.1f} ms ({g['mean_per_tenth_ms'][0]:.1f} / "
              f"{g['mean_per_tenth_ms'][-1]:.1f} ms) |",
              f"| a routed call with {g['adapters']} / 1 adapters resident | "
              f"{g['routed_call_all_over_one_resident']:.3f}× |"]
    c = r["chunked_loss"]
    if "skipped" not in c:
        lines.append(f"| LoRA loss + backward on a 262k vocabulary, chunked / plain: peak memory growth, time | "
                     f"{c['chunked']['peak_growth_mb']:.0f} / {c['plain']['peak_growth_mb']:.0f} MiB "
                     f"({c['peak_growth_chunked_over_plain']:.2f}×), {c['step_chunked_over_plain']:.2f}× |")
    for kind in ("warm", "cold"):
        if f"{kind}_checkpoint_reload_over_adapter_load" in h:
            where = "from the page cache" if kind == "warm" else "from disk"
            ms = h[f"{kind}_median_ms"]
            lines.append(f"| {kind}, {where}: reloading the {h['checkpoint_gb']:.2f} GB checkpoint / loading the "
                         f"adapter | {h[f'{kind}_checkpoint_reload_over_adapter_load']:.0f}× "
                         f"({ms['reload_checkpoint']:.0f} vs {ms['load']:.0f} ms) |")
    return lines


def plot(r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    f = r["families"]
    labels = ["LoRA", "bottleneck", "prefix", "LoRA merged", "8 LoRA\nin a batch", "8 of 3 families\nin a batch"]
    values = [*f["unmerged_vs_bare"].values(), f["lora_merged_vs_bare"], f["mixed_lora_vs_one_lora"],
              f["mixed_families_vs_one_lora"]]
    axes[0].bar(labels, values, color=["C0"] * 4 + ["C1"] * 2)
    axes[0].axhline(1.0, color="k", lw=0.8)
    axes[0].set_ylabel("time ratio")
    axes[0].set_title("vs bare (blue) / vs one LoRA adapter (orange)")
    axes[0].tick_params(axis="x", labelsize=7)
    p = r["versus_peft"]["by_adapters"]
    axes[1].bar([f"{n} adapters" for n in p], [v["peft_over_adaptkit"] for v in p.values()], color="C2")
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_title("mixed batch: peft time / adaptkit time")
    g = r["store_growth"]
    axes[2].plot(range(1, len(g["load_cpu_ms"]) + 1), g["load_cpu_ms"], ".", ms=2)
    axes[2].set_xlabel("n-th adapter loaded from the store (all stay resident)")
    axes[2].set_ylabel("hot-load CPU time (ms)")
    axes[2].set_ylim(0, 4 * max(g["median_per_tenth_ms"]))  # full garbage collections spike above: clipped
    axes[2].set_title(f"hot-load as the bank grows ({g['file_kb']:.0f} kB files)")
    fig.tight_layout()
    fig.savefig(RESULTS / "routing_speed.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

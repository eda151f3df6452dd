"""Swap and routing speed over one backbone, as ratios measured in one run.

    python benchmarks/routing_speed.py [--quick]

What it measures on a Marian-base-sized encoder–decoder (random weights: speed only):
  * unmerged / merged LoRA forward time relative to the bare backbone;
  * one mixed batch routed to 8 adapters of three families vs. 8 separate calls (one per adapter);
  * hot-load time of the n-th adapter as the bank grows (peft's load time grows with n);
Writes benchmarks/results/routing_speed.json and .md (and .png when matplotlib is there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

import adaptkit as ak

RESULTS = Path(__file__).parent / "results"


def marian_base() -> torch.nn.Module:
    torch.manual_seed(0)
    config = tf.MarianConfig(vocab_size=8000, d_model=512, encoder_layers=6, decoder_layers=6,
                             encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
                             decoder_ffn_dim=2048, max_position_embeddings=256, pad_token_id=0,
                             decoder_start_token_id=0, eos_token_id=1)
    return tf.MarianMTModel(config).eval()


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def randomize(model: ak.AdaptedModel, name: str) -> None:
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.normal_(0, 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = ak.AdaptedModel(marian_base())
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(2, 8000, (8, 48), generator=generator),
        "attention_mask": torch.ones(8, 48, dtype=torch.long),
        "decoder_input_ids": torch.randint(2, 8000, (8, 32), generator=generator),
    }
    results: dict = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
                     "transformers": tf.__version__, "threads": torch.get_num_threads(), "batch": [8, 48, 32]}

    with torch.no_grad():
        bare = median_time(lambda: model(**batch), repeats)
        model.add_adapter("lora", ak.LoRA(r=16, targets="attention"))
        randomize(model, "lora")
        unmerged = median_time(lambda: model(**batch, adapter="lora"), repeats)
        model.merge_adapter("lora")
        merged = median_time(lambda: model(**batch), repeats)
        model.unmerge_adapter()
        results["forward_seconds"] = {"bare": bare, "lora_unmerged": unmerged, "lora_merged": merged}
        results["forward_ratio_to_bare"] = {"lora_unmerged": unmerged / bare, "lora_merged": merged / bare}

        families = [ak.LoRA(r=16, targets="attention")]
        if "bottleneck" in ak.METHODS:
            families.append(ak.Bottleneck(reduction=16))
        if "prefix" in ak.METHODS:
            families.append(ak.Prefix(length=16))
        names = []
        for i in range(8):
            name = f"row{i}"
            model.add_adapter(name, families[i % len(families)])
            randomize(model, name)
            names.append(name)
        mixed = median_time(lambda: model(**batch, adapter=names), repeats)

        def one_call_per_adapter():
            for row, name in enumerate(names):
                model(**{k: v[row:row + 1] for k, v in batch.items()}, adapter=name)

        split = median_time(one_call_per_adapter, repeats)
        results["mixed_batch"] = {"families": sorted({f.method for f in families}), "adapters": len(names),
                                  "one_mixed_call_seconds": mixed, "one_call_per_adapter_seconds": split,
                                  "speedup": split / mixed, "mixed_vs_uniform_lora": mixed / unmerged}

    with tempfile.TemporaryDirectory() as tmp:
        path = model.save_adapter("lora", Path(tmp) / "lora.safetensors")
        count = 20 if args.quick else 60
        load_ms = []
        for i in range(count):
            start = time.perf_counter()
            model.load_adapter(path, name=f"hot{i}")
            load_ms.append(1000 * (time.perf_counter() - start))
        results["hot_load_ms"] = {"first_5_median": statistics.median(load_ms[:5]),
                                  "last_5_median": statistics.median(load_ms[-5:]), "all": load_ms,
                                  "adapters_in_bank_at_end": len(model.adapters)}
    write(results)


def write(results: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "routing_speed.json").write_text(json.dumps(results, indent=2))
    f = results["forward_ratio_to_bare"]
    m = results["mixed_batch"]
    h = results["hot_load_ms"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| LoRA r16 unmerged / bare forward | {f['lora_unmerged']:.3f}× |",
        f"| LoRA r16 merged / bare forward | {f['lora_merged']:.3f}× |",
        f"| 8 rows, 8 adapters ({', '.join(m['families'])}): 8 calls / 1 mixed call | {m['speedup']:.2f}× |",
        f"| mixed 8-adapter call / uniform LoRA call | {m['mixed_vs_uniform_lora']:.2f}× |",
        f"| hot-load, first 5 adapters (median) | {h['first_5_median']:.1f} ms |",
        f"| hot-load, last 5 of {len(h['all'])} (median) | {h['last_5_median']:.1f} ms |",
    ]
    (RESULTS / "routing_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(h["all"]) + 1), h["all"], marker=".")
    ax.set_xlabel("n-th adapter loaded into the bank")
    ax.set_ylabel("hot-load time (ms)")
    ax.set_ylim(bottom=0)
    ax.set_title("Adapter hot-load time as the bank grows")
    fig.tight_layout()
    fig.savefig(RESULTS / "routing_speed_hot_load.png", dpi=120)


if __name__ == "__main__":
    main()

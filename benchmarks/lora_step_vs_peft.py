"""Where does a LoRA training step's time go: adaptkit's hooks vs peft's wrapped layers, in isolation.

    python benchmarks/lora_step_vs_peft.py [--backbone smollm2-135m] [--repeats 6]

Same backbone loaded twice, LoRA r8 on the same projections (every linear), one fixed batch; the
forward + backward of each is timed interleaved, so machine drift hits both alike. No optimizer,
no trainer: this isolates the adapter path from the training loop around it.
Writes benchmarks/results/lora_step_vs_peft.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import peft
import torch

import adaptkit as ak
from adaptkit.bench.peft_peer import peft_config

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=96)
    args = parser.parse_args()

    torch.manual_seed(0)
    ours = ak.load(args.backbone)
    ours.add_adapter("lora", ak.LoRA(r=8, alpha=16, targets="all-linear"))
    for p in ours.adapter_parameters("lora"):
        p.requires_grad_(True)
    base = ak.load(args.backbone)
    theirs = peft.get_peft_model(base.model, peft_config("lora-r8", base, 20))
    ids = torch.randint(5, 20000, (args.batch, args.tokens))
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    ours.train()
    theirs.train()
    steps = {"adaptkit": lambda: ours(**batch, adapter="lora").loss.backward(),
             "peft": lambda: theirs(**batch).loss.backward()}
    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.repeats):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    ratio = statistics.median(a / b for a, b in zip(times["adaptkit"], times["peft"]))
    result = {"backbone": args.backbone, "batch": args.batch, "tokens": args.tokens, "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "peft": peft.__version__,
              "trainable": {"adaptkit": sum(p.numel() for p in ours.adapter_parameters("lora")),
                            "peft": sum(p.numel() for p in theirs.parameters() if p.requires_grad)},
              "seconds": times, "median_seconds": {k: statistics.median(v) for k, v in times.items()},
              "adaptkit_over_peft": ratio}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lora_step_vs_peft.json").write_text(json.dumps(result, indent=1) + "\n")
    table = ["| measure | value |", "|---|---|",
             f"| forward + backward, adaptkit (median s) | {result['median_seconds']['adaptkit']:.3f} |",
             f"| forward + backward, peft (median s) | {result['median_seconds']['peft']:.3f} |",
             f"| adaptkit / peft (median of paired repeats) | {ratio:.3f}× |",
             f"| trainable parameters (adaptkit / peft) | {result['trainable']['adaptkit']:,} / "
             f"{result['trainable']['peft']:,} |"]
    header = (f"{args.backbone}, batch {args.batch} × {args.tokens} tokens, LoRA r8 on every linear projection, "
              f"{args.repeats} interleaved repeats, {result['torch_threads']} threads.")
    (RESULTS / "lora_step_vs_peft.md").write_text(header + "\n\n" + "\n".join(table) + "\n")
    print(header)
    print("\n".join(table))


if __name__ == "__main__":
    main()

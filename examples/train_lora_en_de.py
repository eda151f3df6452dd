"""Train a LoRA adapter for English→German software documentation on gemma3-270m.

    python examples/train_lora_en_de.py            # ~12 min on 2 CPU cores; a GPU is used when present

The run of issue 4: the project's trainer, LoRA r16 on every linear projection, 120 steps of
batch 8 on the shipped LibreOffice-help sample, dev chrF before (bare backbone) and after, on the
same 50 held-out sentences. The adapter lands in runs/example-en-de/ with its metrics in its header.
"""

import json

import adaptkit as ak
from adaptkit.corpora import load_sample

DEV_SENTENCES = 50

model = ak.load("gemma3-270m")
dev = load_sample("libreoffice-help-en-de", "dev").select(range(DEV_SENTENCES))

bare = ak.evaluate(model, dev, adapter=None, src_lang="en", tgt_lang="de", max_new_tokens=96)
print("bare backbone:", json.dumps(bare))

summary = ak.train(
    model, adapter="en-de/software", train="libreoffice-help-en-de", dev=dev,
    adapter_config=ak.LoRA(r=16, alpha=32, targets="all-linear"),
    max_steps=120, batch_size=8, lr=1e-3, warmup_steps=10, schedule="linear",
    eval_every=40, max_new_tokens=96, metric="chrf",
    src_lang="en", tgt_lang="de", domain="software", output_dir="runs/example-en-de",
)
info = ak.read_adapter_info(summary["output"])
print("adapter file:", summary["output"], f"{info['file_bytes'] / 1e6:.1f} MB,",
      f"{info['num_parameters']:,} parameters")
print("best dev metrics (recorded in the file):", json.dumps(info["metrics"]))
best = info["metrics"]
print(f"chrF {bare['chrf']:.1f} -> {best['chrf']:.1f}, BLEU {bare['bleu']:.1f} -> {best['bleu']:.1f}")

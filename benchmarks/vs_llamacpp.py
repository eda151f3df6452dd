"""adaptkit against llama.cpp on the same CPU: one request at a time, and mixed traffic over 4 LoRA adapters.

Opt-in (never CI): llama.cpp builds from source in ~15 minutes on 2 cores. Its source comes from the
llama-cpp-python sdist on PyPI (the vendored llama.cpp; the server binary is all this needs):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d runs/llamacpp
    tar xzf runs/llamacpp/llama_cpp_python-0.3.36.tar.gz -C runs/llamacpp
    cd runs/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
        -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
    cmake --build build --target llama-server -j2
    cd - && python benchmarks/vs_llamacpp.py --llama-cpp runs/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp

Not -DGGML_NATIVE=ON on these machines: their CPU lists AMX, but the VM refuses AMX tile instructions
(llama-server dies with SIGILL in ggml's AMX kernel); every AVX-512 extension the CPU has is enabled instead.

Both sides get the same things:
- weights: llama.cpp loads the zoo's Q4_K_M GGUF (`adaptkit.zoo.source_gguf`), adaptkit the float32 weights
  dequantised from it (or `--adaptkit-quantize` of them);
- adapters: 4 LoRA adapters (r16, all linear projections) trained here with `ak.train`, exported with
  `ak.export_peft` and converted with llama.cpp's own `convert_lora_to_gguf.py`;
- prompts: the token ids adaptkit's Translator builds (sent to llama-server as a token list), greedy, at most
  `--max-new-tokens`, ending at the first line;
- threads: `--threads` for both.

Modes: (1) single stream — the en→de adapter, one request after the other, `--sentences` test sentences of
the help sample, chrF of both with a paired bootstrap; (2) mixed — closed-loop clients (1, 8, 32), request k
to adapter k mod 4. llama-server runs with one slot per client and continuous batching; it batches only
requests that ask for the same LoRA (`can_batch_with`), its best schedule here. adaptkit runs its service
(in this process, as benchmarks/serve_load.py) with cross-adapter continuous batching.

Writes benchmarks/results/vs_llamacpp.json and .md, with `single_stream_time_ratio` (adaptkit's seconds per
sentence ÷ llama.cpp's) and `mixed_throughput_ratio` (adaptkit's sentences/s ÷ llama.cpp's at the most clients).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from serve_load import closed_loop, percentile, serving

import adaptkit as ak
from adaptkit import zoo
from adaptkit.bench.report import environment
from adaptkit.data import load_pairs
from adaptkit.evaluation.scoring import bootstrap_interval, paired_bootstrap, translation_metrics
from adaptkit.serving.settings import ServeSettings
from adaptkit.tasks.oneline import tidy
from adaptkit.tasks.translate import Translator

RESULTS = Path(__file__).parent / "results"
WORK = Path("runs/vs_llamacpp")
ADAPTERS = [  # name, shipped sample, src, tgt
    ("en-de/software", "libreoffice-help-en-de", "en", "de"),
    ("en-es/software", "libreoffice-help-en-es", "en", "es"),
    ("en-de/ui", "libreoffice-ui-en-de", "en", "de"),
    ("en-es/bible", "bible-en-es", "en", "es"),
]
SINGLE = "en-de/software"


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--llama-cpp", required=True, help="llama.cpp source dir with build/bin/llama-server")
    p.add_argument("--backbone", default="gemma3-270m")
    p.add_argument("--sentences", type=int, default=200, help="single-stream test sentences (help en→de)")
    p.add_argument("--mixed-requests", type=int, default=128, help="requests per mixed-traffic level")
    p.add_argument("--clients", default="1,8,32")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=60, help="optimizer steps (batch 8) of each adapter")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--adaptkit-quantize", default=None, help="quantize= for adaptkit's backbone (default float32)")
    p.add_argument("--name", default="vs_llamacpp")
    p.add_argument("--prepare-only", action="store_true",
                   help="train, export and convert the adapters, then stop (measure later on a quiet machine)")
    return p.parse_args(argv)


# -- the same adapters on both sides ------------------------------------------------------------

def adapters(model: ak.AdaptedModel, steps: int, llama_cpp: Path, base_dir: Path) -> dict[str, Path]:
    """Train (or reuse) the 4 LoRA adapters in the store; export each to peft and convert it to a GGUF."""
    out = {}
    for name, sample, src, tgt in ADAPTERS:
        path = model.store.path_for(name)
        if not (path.is_file() and (ak.read_adapter_info(path).get("training") or {}).get("vs_steps") == steps):
            ak.train(model, adapter=name, train=sample, dev=None, method="lora", r=16, alpha=32.0,
                     targets="all-linear", max_steps=steps, batch_size=8, lr=1e-3, warmup_steps=steps // 10,
                     eval_every=None, eval_samples=8, generate=False, max_source_len=128, max_target_len=128,
                     src_lang=src, tgt_lang=tgt, resume=False, output_dir=str(WORK / "train" / name.replace("/", "_")))
            model.save_adapter(name, path, training={"vs_steps": steps}, src_lang=src, tgt_lang=tgt)
            model.remove_adapter(name)
        gguf = WORK / "gguf" / (name.replace("/", "_") + ".gguf")
        if not gguf.is_file() or gguf.stat().st_mtime < path.stat().st_mtime:
            peft_dir = WORK / "peft" / name.replace("/", "_")
            if name not in model.adapters:
                model.load_adapter(path, name)
            ak.export_peft(model, name, peft_dir)
            gguf.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), "--base", str(base_dir),
                            "--outfile", str(gguf), "--outtype", "f32", str(peft_dir)], check=True)
        out[name] = gguf
    return out


# -- llama-server -------------------------------------------------------------------------------

class LlamaServer:
    """llama.cpp's server on a free port with every LoRA loaded and none applied by default."""

    def __init__(self, llama_cpp: Path, gguf: Path, loras: list[Path], slots: int, threads: int, ctx_per_slot: int):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        cmd = [str(llama_cpp / "build" / "bin" / "llama-server"), "-m", str(gguf), "--port", str(self.port),
               "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
               "--lora-init-without-apply", "--no-webui"]
        for lora in loras:
            cmd += ["--lora", str(lora)]
        self.log = (WORK / f"llama-server-{slots}.log").open("w")
        self.process = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start; see {self.log.name}")
            time.sleep(0.5)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def llama_body(ids: list[int], lora: int, max_new_tokens: int) -> dict[str, Any]:
    return {"prompt": ids, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1, "stop": ["\n"],
            "lora": [{"id": lora, "scale": 1.0}], "cache_prompt": False, "seed": 0}


async def llama_closed_loop(url: str, bodies: list[dict[str, Any]], clients: int) -> tuple[float, list[float], list]:
    queue = list(enumerate(bodies))
    latencies: list[float] = [0.0] * len(bodies)
    outputs: list[Any] = [None] * len(bodies)
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=clients)) as client:
        async def worker() -> None:
            while queue:
                k, body = queue.pop(0)
                started = time.perf_counter()
                response = await client.post("/completion", json=body)
                response.raise_for_status()
                latencies[k] = time.perf_counter() - started
                outputs[k] = response.json()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        return time.perf_counter() - started, latencies, outputs


# -- the two modes ------------------------------------------------------------------------------

def test_rows(sample: str, n: int) -> list[dict]:
    rows = load_pairs(sample, "test")
    return [rows[i] for i in range(min(n, len(rows)))]


def single_stream(model: ak.AdaptedModel, server: LlamaServer, rows: list[dict], lora_id: int,
                  max_new_tokens: int) -> dict[str, Any]:
    """Sentence by sentence, the two engines alternating, so drift of the machine hits both alike."""
    translator = Translator(model, batch_size=1)
    tokenizer = model.tokenizer
    ours, theirs, our_s, their_s, their_tokens = [], [], [], [], []
    for row in rows:
        ids, _ = translator.decoding_parts(row["src"], "en", "de")
        started = time.perf_counter()
        ours.append(translator.translate([row["src"]], "en", "de", adapter=SINGLE, num_beams=1,
                                         max_new_tokens=max_new_tokens)[0])
        our_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        answer = httpx.post(f"{server.url}/completion", json=llama_body(ids, lora_id, max_new_tokens),
                            timeout=600).json()
        their_s.append(time.perf_counter() - started)
        theirs.append(tidy(answer["content"], True))
        their_tokens.append(answer["tokens_predicted"])
    refs = [r["tgt"] for r in rows]
    our_tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) + 1 for t in ours]  # + the newline
    record: dict[str, Any] = {"sentences": len(rows)}
    for side, hyps, secs, toks in (("adaptkit", ours, our_s, our_tokens), ("llamacpp", theirs, their_s, their_tokens)):
        low, high = bootstrap_interval(hyps, refs, "chrf")
        record[side] = {"s_per_sentence": statistics.fmean(secs), "sentences_per_s": len(secs) / sum(secs),
                        "tokens_per_s": sum(toks) / sum(secs), "p50_s": percentile(secs, 0.5),
                        "p95_s": percentile(secs, 0.95), "chrf": translation_metrics(hyps, refs)["chrf"],
                        "chrf_low": low, "chrf_high": high, "hypotheses": hyps}
    gain = paired_bootstrap(theirs, ours, refs, "chrf")
    record["chrf_diff"] = {"adaptkit_minus_llamacpp": gain.gain, "low": gain.low, "high": gain.high}
    record["identical_outputs"] = sum(a == b for a, b in zip(ours, theirs)) / len(rows)
    record["single_stream_time_ratio"] = record["adaptkit"]["s_per_sentence"] / record["llamacpp"]["s_per_sentence"]
    return record


def mixed(model: ak.AdaptedModel, llama_cpp: Path, gguf: Path, loras: dict[str, Path], args: argparse.Namespace,
          clients: int) -> dict[str, Any]:
    translator = Translator(model, batch_size=1)
    per_adapter = {name: test_rows(sample, args.mixed_requests) for name, sample, *_ in ADAPTERS}
    ours, theirs = [], []
    for k in range(args.mixed_requests):
        name, _, src, tgt = ADAPTERS[k % len(ADAPTERS)]
        row = per_adapter[name][(k // len(ADAPTERS)) % len(per_adapter[name])]
        ours.append({"texts": [row["src"]], "adapter": name, "src_lang": src, "tgt_lang": tgt})
        theirs.append(llama_body(translator.decoding_parts(row["src"], src, tgt)[0], k % len(ADAPTERS),
                                 args.max_new_tokens))
    record: dict[str, Any] = {"clients": clients, "requests": args.mixed_requests}
    with serving(model, ServeSettings(max_batch=32, max_queue=4096, max_wait_ms=5)) as (url, _):
        asyncio.run(closed_loop(url, ours[:len(ADAPTERS)], 1, 4))  # every adapter resident first
        wall, lat, _ = asyncio.run(closed_loop(url, ours, clients, args.max_new_tokens))
    record["adaptkit"] = {"seconds": wall, "sentences_per_s": len(ours) / wall, "p50_s": percentile(lat, 0.5),
                          "p95_s": percentile(lat, 0.95)}
    server = LlamaServer(llama_cpp, gguf, list(loras.values()), clients, args.threads, 512)
    try:
        asyncio.run(llama_closed_loop(server.url, theirs[:len(ADAPTERS)], 1))
        wall, lat, answers = asyncio.run(llama_closed_loop(server.url, theirs, clients))
    finally:
        server.close()
    tokens = sum(a["tokens_predicted"] for a in answers)
    record["llamacpp"] = {"seconds": wall, "sentences_per_s": len(theirs) / wall, "tokens_per_s": tokens / wall,
                          "p50_s": percentile(lat, 0.5), "p95_s": percentile(lat, 0.95)}
    record["throughput_ratio"] = record["adaptkit"]["sentences_per_s"] / record["llamacpp"]["sentences_per_s"]
    return record


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    llama_cpp = Path(args.llama_cpp).resolve()
    began = time.perf_counter()
    provenance = environment()
    gguf = zoo.source_gguf(args.backbone)
    model = ak.load(args.backbone, store=WORK / "store", quantize=args.adaptkit_quantize)
    loras = adapters(model, args.train_steps, llama_cpp, zoo.resolve(args.backbone))
    if args.prepare_only:
        print(f"adapters ready: {', '.join(str(p) for p in loras.values())}")
        return 0
    for name, *_ in ADAPTERS:
        if name not in model.adapters:
            model.load_adapter(model.store.path_for(name), name)
    report: dict[str, Any] = {"name": args.name, "args": vars(args), "environment": provenance,
                              "llamacpp_gguf": gguf.name, "adapters": [a[0] for a in ADAPTERS]}
    server = LlamaServer(llama_cpp, gguf, list(loras.values()), 1, args.threads, 512)
    try:
        report["single"] = single_stream(model, server, test_rows(ADAPTERS[0][1], args.sentences),
                                         [a[0] for a in ADAPTERS].index(SINGLE), args.max_new_tokens)
    finally:
        server.close()
    report["single_stream_time_ratio"] = report["single"]["single_stream_time_ratio"]
    report["mixed"] = [mixed(model, llama_cpp, gguf, loras, args, int(c)) for c in args.clients.split(",")]
    report["mixed_throughput_ratio"] = report["mixed"][-1]["throughput_ratio"]
    report["wall_minutes"] = (time.perf_counter() - began) / 60
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(report) + "\n")
    print(markdown(report))
    return 0


def markdown(r: dict[str, Any]) -> str:
    s, a = r["single"], r["args"]
    lines = [f"# adaptkit vs llama.cpp on {a['backbone']} ({a['threads']} threads)", "",
             f"Adapters: 4 LoRA r16 all-linear, {a['train_steps']} steps each; greedy, ≤ {a['max_new_tokens']} new "
             f"tokens, first line. llama.cpp: {r['llamacpp_gguf']}; adaptkit: "
             f"{a['adaptkit_quantize'] or 'float32'} weights dequantised from it.", "",
             f"## One request at a time ({s['sentences']} help en→de test sentences, alternating engines)", "",
             "| engine | s/sentence | sentences/s | tokens/s | p50 s | p95 s | chrF [95 % CI] |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for side in ("adaptkit", "llamacpp"):
        x = s[side]
        lines.append(f"| {side} | {x['s_per_sentence']:.3f} | {x['sentences_per_s']:.2f} | {x['tokens_per_s']:.1f} | "
                     f"{x['p50_s']:.3f} | {x['p95_s']:.3f} | "
                     f"{x['chrf']:.1f} [{x['chrf_low']:.1f}, {x['chrf_high']:.1f}] |")
    d = s["chrf_diff"]
    lines += ["", f"single_stream_time_ratio (adaptkit ÷ llama.cpp, time per sentence): "
                  f"**{r['single_stream_time_ratio']:.2f}**; chrF adaptkit − llama.cpp "
                  f"{d['adaptkit_minus_llamacpp']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]; identical outputs "
                  f"{s['identical_outputs']:.0%}.", "",
              "## Mixed traffic over 4 LoRA adapters (closed-loop clients, request k → adapter k mod 4)", "",
              "| clients | adaptkit sentences/s | llama.cpp sentences/s | ratio | adaptkit p50/p95 s | "
              "llama.cpp p50/p95 s |", "|---:|---:|---:|---:|---|---|"]
    for m in r["mixed"]:
        o, t = m["adaptkit"], m["llamacpp"]
        lines.append(f"| {m['clients']} | {o['sentences_per_s']:.2f} | {t['sentences_per_s']:.2f} | "
                     f"{m['throughput_ratio']:.2f} | {o['p50_s']:.2f}/{o['p95_s']:.2f} | "
                     f"{t['p50_s']:.2f}/{t['p95_s']:.2f} |")
    lines += ["", f"mixed_throughput_ratio (adaptkit ÷ llama.cpp at {r['mixed'][-1]['clients']} clients): "
                  f"**{r['mixed_throughput_ratio']:.2f}**"]
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

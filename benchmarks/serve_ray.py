"""The service on Ray Serve: 1 vs 2 replicas on this machine, and how often multiplexed routing avoids a load.

    python benchmarks/serve_ray.py                    # a small random llama (27M parameters), ~6 min on 2 cores
    flock /tmp/realrun.lock python benchmarks/serve_ray.py --backbone smollm2-135m     # real weights
    python benchmarks/serve_ray.py --render benchmarks/results/serve_ray.json

A local Ray instance of 2 CPUs (this machine's) serves a backbone through the same `build_app` that
`adaptkit serve --ray` runs. By default a small llama with seeded random weights (hidden 512, 8 layers,
a byte-level BPE of 4,096 tokens trained on the shipped en-de sample): it writes every one of its
new tokens (no early end of sequence), so every request costs the same. The 16 adapters have seeded
random weights too: the benchmark measures serving, not translation. Two experiments, each on a
fresh deployment:

1. Replicas. 1 replica with 1 torch thread, 1 replica with 2, 2 replicas with 1 each (4 adapters of
   four families, at most 4 per replica: no loads once warm). 16 closed-loop clients send 96 one-sentence
   requests round-robin over the 4 adapters, greedy, 16 new tokens. Throughput (sentences/s) and
   latency percentiles (client side, send to answer); the outputs of the two runs are compared.
2. Routing. 2 replicas holding at most 2 adapters each, 16 adapters in the store; 8 clients send 192
   requests whose adapters are drawn (seeded) uniformly, or Zipf-distributed (s=1.1, the most asked
   adapter ~30 % of requests). Hit rate = requests served without waiting for a load, from the
   replicas' own counters (GET /v1/replicas). Each traffic runs twice: with Ray's multiplexed routing
   (requests go to a replica that holds their adapter), and with `route_by_adapter=False` (any
   replica, which loads the adapter if it lacks it): what the routing adds, measured the same way.

Writes benchmarks/results/serve_ray.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import torch

import adaptkit as ak
from adaptkit.corpora import load_sample
from adaptkit.serving.ray import RayOptions, build_app
from adaptkit.serving.settings import ServeSettings

RESULTS = Path(__file__).parent / "results"
FAMILIES = [lambda: ak.LoRA(r=8, alpha=16, targets="all-linear"),
            lambda: ak.AdaLoRA(init_r=8, target_r=4, total_steps=10),
            lambda: ak.Prefix(length=8), lambda: ak.Bottleneck(reduction=8, placement="pfeiffer")]
N_ADAPTERS = 16
SETTINGS = ServeSettings(max_batch=16, max_wait_ms=20, default_num_beams=1)
ZIPF_S = 1.1


def small_backbone(path: Path, seed: int) -> str:
    """A llama of 27M parameters with random weights and a BPE tokenizer trained on the en-de sample."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if (path / "config.json").is_file():
        return str(path)
    texts = [t for r in load_sample("libreoffice-help-en-de", "train") for t in (r["src"], r["tgt"])]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>",
                                                                                         "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                           eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = tf.LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_store(backbone: str, store: Path, seed: int) -> list[str]:
    """16 adapters of four families with seeded random weights (small: outputs stay text-like)."""
    names = [f"en-de/a{i:02d}" for i in range(N_ADAPTERS)]
    if all((store / f"{n}.safetensors").is_file() for n in names):
        return names
    model = ak.load(backbone, store=store)
    generator = torch.Generator().manual_seed(seed)
    for i, name in enumerate(names):
        model.add_adapter(name, FAMILIES[i % 4]())
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        model.save_adapter(name, src_lang="en", tgt_lang="de", domain=f"a{i:02d}")
        model.remove_adapter(name)
    return names


async def closed_loop(url: str, bodies: list[dict[str, Any]], clients: int) -> list[dict[str, Any]]:
    """`clients` workers send the bodies in order, each its next one as soon as its last is answered."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(bodies)):
        queue.put_nowait(i)
    results: list[dict[str, Any]] = [{} for _ in bodies]

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            started = time.perf_counter()
            response = await client.post("/v1/translate", json=bodies[i])
            if response.status_code != 200:
                raise RuntimeError(f"request {i}: {response.status_code} {response.text[:300]}")
            results[i] = {"seconds": time.perf_counter() - started, "text": response.json()["translations"][0]}

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(clients)))
    return results


def replica_totals(url: str) -> dict[str, Any]:
    replicas = httpx.get(url + "/v1/replicas", timeout=60).json()["replicas"]
    keys = ("requests", "hits", "loads", "batches", "mixed_batches")
    totals: dict[str, Any] = {k: sum(r[k] for r in replicas) for k in keys}
    totals["peak_resident"] = max((r["peak_resident"] for r in replicas), default=0)
    totals["per_replica_requests"] = sorted(r["requests"] for r in replicas)
    totals["resident"] = sorted(sorted(r["resident"]) for r in replicas)
    return totals


def deploy(serve: Any, name: str, port: int, backbone: str, store: Path, options: RayOptions) -> str:
    started = time.perf_counter()
    serve.run(build_app(backbone, str(store), options=options, settings=SETTINGS), name=name, route_prefix="/",
              logging_config={"log_level": "WARNING"})
    print(f"{name}: deployed in {time.perf_counter() - started:.1f} s", flush=True)
    return f"http://127.0.0.1:{port}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def replicas_experiment(serve: Any, port: int, backbone: str, store: Path, names: list[str], texts: list[str],
                        args: argparse.Namespace) -> dict[str, Any]:
    adapters = names[:4]
    bodies = [{"texts": [texts[k % len(texts)]], "src_lang": "en", "tgt_lang": "de", "adapter": adapters[k % 4],
               "max_new_tokens": args.new_tokens} for k in range(args.requests)]
    out: dict[str, Any] = {"adapters": adapters, "requests": len(bodies), "clients": args.clients,
                           "new_tokens": args.new_tokens, "rounds": args.rounds}
    configs = [(1, 1), (1, 2), (2, 1)]
    order = [c for r in range(args.rounds) for c in (configs if r % 2 == 0 else configs[::-1])]  # ABC CBA ...
    outputs: dict[str, list[str]] = {}
    runs: list[dict[str, Any]] = []
    latencies: dict[str, list[float]] = {}
    for round_, (replicas, threads) in zip([i // len(configs) for i in range(len(order))], order):
        label = f"{replicas}x{threads}"
        options = RayOptions(replicas=replicas, adapters_per_replica=4, replica_cpus=1.75 / replicas,
                             torch_threads=threads, ingress_cpus=0.25)
        url = deploy(serve, f"replicas-{label}", port, backbone, store, options)
        warm = [{"texts": [texts[0]], "src_lang": "en", "tgt_lang": "de", "adapter": a, "max_new_tokens": 2}
                for a in adapters for _ in range(replicas)]
        asyncio.run(closed_loop(url, warm, 1))  # loads every adapter where routing places it
        time.sleep(1.5)  # Ray's router learns where adapters are from pushes every 0.1 s
        before = replica_totals(url)
        started = time.perf_counter()
        results = asyncio.run(closed_loop(url, bodies, args.clients))
        wall = time.perf_counter() - started
        after = replica_totals(url)
        latencies.setdefault(label, []).extend(r["seconds"] for r in results)
        outputs.setdefault(label, [r["text"] for r in results])
        runs.append({
            "config": label, "round": round_, "replicas": replicas, "torch_threads": threads,
            "wall_s": round(wall, 2), "sentences_per_s": round(len(bodies) / wall, 2),
            "batches": after["batches"] - before["batches"],
            "mixed_batches": after["mixed_batches"] - before["mixed_batches"],
            "loads_during_run": after["loads"] - before["loads"], "adapters_held": after["resident"],
            "requests_per_replica": [a - b for a, b in zip(after["per_replica_requests"],
                                                           before["per_replica_requests"])]})
        print(runs[-1], flush=True)
        serve.delete(f"replicas-{label}")
    out["runs"] = runs
    out["configs"] = {}
    for replicas, threads in configs:
        label = f"{replicas}x{threads}"
        mine = [r for r in runs if r["config"] == label]
        out["configs"][label] = {
            "replicas": replicas, "torch_threads": threads,
            "sentences_per_s": round(statistics.median(r["sentences_per_s"] for r in mine), 2),
            "latency_ms": {f"p{q}": round(1000 * percentile(latencies[label], q), 1) for q in (50, 90, 99)},
            "batches": sum(r["batches"] for r in mine), "mixed_batches": sum(r["mixed_batches"] for r in mine),
            "requests_per_replica": [r["requests_per_replica"] for r in mine]}
    out["identical_outputs"] = round(sum(len(set(t)) == 1 for t in zip(*outputs.values())) / len(bodies), 3)
    for other in ("1x1", "1x2"):  # paired by round: the ratio of runs close in time
        ratios = [next(r for r in runs if r["config"] == "2x1" and r["round"] == k)["sentences_per_s"]
                  / next(r for r in runs if r["config"] == other and r["round"] == k)["sentences_per_s"]
                  for k in range(args.rounds)]
        out[f"speedup_2x1_vs_{other}"] = {"per_round": [round(x, 2) for x in ratios],
                                          "median": round(statistics.median(ratios), 2)}
    return out


def traffic(names: list[str], n: int, kind: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    if kind == "uniform":
        return [rng.choice(names) for _ in range(n)]
    weights = [1 / (rank + 1) ** ZIPF_S for rank in range(len(names))]
    order = names[:]
    rng.shuffle(order)  # which adapter is popular is arbitrary, not tied to its family
    return rng.choices(order, weights=weights, k=n)


def routing_experiment(serve: Any, port: int, backbone: str, store: Path, names: list[str], texts: list[str],
                       args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"adapters": len(names), "replicas": 2, "adapters_per_replica": 2,
                           "requests": args.routing_requests, "clients": args.routing_clients, "zipf_s": ZIPF_S,
                           "runs": {}}
    for kind in ("uniform", "zipf"):
        sequence = traffic(names, args.routing_requests, kind, args.seed)
        bodies = [{"texts": [texts[k % len(texts)]], "src_lang": "en", "tgt_lang": "de", "adapter": name,
                   "max_new_tokens": 8} for k, name in enumerate(sequence)]
        top = max(sequence.count(n) for n in names) / len(sequence)
        out["runs"][kind] = {"most_asked_share": round(top, 3), "distinct_adapters": len(set(sequence))}
        for routed in (True, False):
            label = "multiplexed" if routed else "any_replica"
            options = RayOptions(replicas=2, adapters_per_replica=2, replica_cpus=0.875, torch_threads=1,
                                 ingress_cpus=0.25, route_by_adapter=routed)
            url = deploy(serve, f"routing-{kind}-{label}", port, backbone, store, options)
            started = time.perf_counter()
            results = asyncio.run(closed_loop(url, bodies, args.routing_clients))
            wall = time.perf_counter() - started
            totals = replica_totals(url)
            out["runs"][kind][label] = {
                "hit_rate": round(totals["hits"] / totals["requests"], 3), "loads": totals["loads"],
                "peak_resident": totals["peak_resident"], "wall_s": round(wall, 2),
                "sentences_per_s": round(len(bodies) / wall, 2),
                "latency_ms": {f"p{q}": round(1000 * percentile([r["seconds"] for r in results], q), 1)
                               for q in (50, 90, 99)}}
            print(f"{kind} {label}: {out['runs'][kind][label]}", flush=True)
            serve.delete(f"routing-{kind}-{label}")
    return out


def provenance(args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    import ray

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": "python " + " ".join(sys.argv), "commit": commit, "date": time.strftime("%Y-%m-%d %H:%M UTC",
            time.gmtime()), "seconds": round(seconds), "backbone": args.backbone, "seed": args.seed,
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "cpus": os.cpu_count(), "load_average_at_end": [round(x, 1) for x in os.getloadavg()],
            "machine": platform.processor() or platform.machine()}


def render(data: dict[str, Any]) -> str:
    rep, rt, prov = data["replicas"], data["routing"], data["provenance"]
    lines = ["# Ray Serve: replicas and multiplexed routing", "",
             f"{_described(prov['backbone'])}; 16 adapters with seeded random weights; a local Ray instance "
             f"of {prov['cpus']} CPUs, `build_app` as `adaptkit serve --ray` runs it. {prov['date']}, commit "
             f"{prov['commit']}, ray {prov['ray']}, torch {prov['torch']}; {prov['seconds']} s in all; load "
             f"average at the end {prov['load_average_at_end']} (other jobs share this machine).", "",
             f"## Replicas ({rep['requests']} one-sentence requests, {rep['clients']} closed-loop clients, "
             f"round-robin over 4 adapters of four families, greedy, {rep['new_tokens']} new tokens)", "",
             "| replicas | torch threads each | sentences/s | p50 ms | p90 ms | p99 ms | batches | mixing adapters "
             "| requests per replica, each run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in rep["configs"].values():
        lat = run["latency_ms"]
        lines.append(f"| {run['replicas']} | {run['torch_threads']} | {run['sentences_per_s']} | {lat['p50']} | "
                     f"{lat['p90']} | {lat['p99']} | {run['batches']} | {run['mixed_batches']} | "
                     f"{' · '.join('/'.join(map(str, split)) for split in run['requests_per_replica'])} |")
    one, two = rep["speedup_2x1_vs_1x1"], rep["speedup_2x1_vs_1x2"]
    lines += ["", f"Each setting ran {rep['rounds']} times, interleaved (ABC CBA); sentences/s is the median, "
              "latency percentiles pool the runs, batches add up. 2 replicas x 1 thread vs 1 replica x 1 thread: "
              f"**{one['median']}x** the throughput (per round {one['per_round']}); vs 1 replica x 2 threads: "
              f"**{two['median']}x** ({two['per_round']}). Outputs identical across the three "
              f"settings (first round): {100 * rep['identical_outputs']:.0f} % (other batch mates and padding could "
              "move a float32 near-tie). Ray routes by adapter: a replica serves the requests for the adapters it "
              "holds (requests per replica in the table).",
              "",
              f"## Routing hit rate ({rt['adapters']} adapters, {rt['replicas']} replicas x "
              f"{rt['adapters_per_replica']} adapters, {rt['requests']} requests of 8 new tokens, {rt['clients']} "
              "closed-loop clients)", "",
              "| traffic | most asked adapter | routing | hit rate | loads | sentences/s | p50 ms | p99 ms | "
              "peak resident per replica |",
              "|---|---|---|---|---|---|---|---|---|"]
    for kind, runs in rt["runs"].items():
        name = "uniform" if kind == "uniform" else f"Zipf s={rt['zipf_s']}"
        for label, how in (("multiplexed", "to the replica holding the adapter"), ("any_replica", "any replica")):
            run = runs[label]
            lines.append(f"| {name} | {100 * runs['most_asked_share']:.0f} % | {how} | {100 * run['hit_rate']:.1f} % "
                         f"| {run['loads']} | {run['sentences_per_s']} | {run['latency_ms']['p50']} | "
                         f"{run['latency_ms']['p99']} | {run['peak_resident']} |")
    lines += ["", "A hit is a request its replica served without waiting for a load (the replicas' own counters; a "
              "request that arrives while another loads its adapter counts as a miss). With 16 adapters and 4 "
              "slots (4 adapters held at a time), no routing hits often under uniform traffic; skewed traffic is "
              "where sending requests to the replica that holds their adapter can pay.", "",
              f"Command: `{prov['command']}`", ""]
    return "\n".join(lines)


def _described(backbone: str) -> str:
    if backbone == "small-random":
        return ("a small llama with seeded random weights (27M parameters, 8 layers, hidden 512, 4,096-token BPE: "
                "every request writes all its new tokens)")
    return f"{backbone} (real weights)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="small-random",
                        help="small-random (built here), or a zoo name / directory (real weights: take the lock)")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2, help="each replica setting this many times, interleaved")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--routing-requests", type=int, default=192)
    parser.add_argument("--routing-clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="runs/serve_ray")
    parser.add_argument("--render", metavar="JSON", help="only rewrite the markdown from a results file")
    args = parser.parse_args()
    if args.render:
        data = json.loads(Path(args.render).read_text())
        Path(args.render).with_suffix(".md").write_text(render(data))
        return

    import ray
    from ray import serve

    started = time.perf_counter()
    work = Path(args.work).resolve()
    backbone = (small_backbone(work / "small-random" / "backbone", args.seed) if args.backbone == "small-random"
                else args.backbone)
    store = work / args.backbone / "store"
    names = build_store(backbone, store, args.seed)
    texts = [r["src"] for r in load_sample("libreoffice-help-en-de", "test") if 20 <= len(r["src"]) <= 120][:64]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        data = {"replicas": replicas_experiment(serve, port, backbone, store, names, texts, args),
                "routing": routing_experiment(serve, port, backbone, store, names, texts, args)}
    finally:
        serve.shutdown()
        ray.shutdown()
    data["provenance"] = provenance(args, time.perf_counter() - started)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve_ray.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "serve_ray.md").write_text(render(data))
    print(render(data))


if __name__ == "__main__":
    main()

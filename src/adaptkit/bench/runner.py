"""The efficiency benchmark: every adapter family beside full fine-tuning, in one run, on one budget.

    plan → for each job: a fresh forked worker (load, train, evaluate, time) → report (JSON, markdown, PNG)

Each job trains one method with the project's trainer (`ak.train`) on identical data, data order,
steps, batch and schedule shape, then scores it on the same dev and test rows with the same greedy
decoding. Peers are the same methods trained with peft directly (`get_peft_model` + a plain torch
loop over the project's collation and sampler), so the two libraries are compared in one run.

Why a forked worker per job: peak RSS is only honest per process (ru_maxrss never goes down), and
a fork inherits the imported libraries, so a job starts in a second instead of the ~10 s that a
fresh interpreter spends importing torch and transformers. On a GPU the worker reports CUDA's max
allocated bytes as well. `isolate=False` runs jobs in-process (tests; platforms without fork) and
samples RSS in a thread instead.

Latency is measured inside each worker against the bare backbone in the same process, interleaved
sentence by sentence, so the ratio survives a noisy shared machine; every sentence generates
exactly `latency_tokens` new tokens, so adapters that stop early are not faster by accident.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adaptkit.bench.jobs import METHODS, BenchConfig, Job, plan
from adaptkit.bench.measure import RssSampler, current_rss, latency, peak_rss, step_figures
from adaptkit.bench.peft_peer import train_peft
from adaptkit.bench.report import assemble, environment, write_outputs
from adaptkit.core.bank import load
from adaptkit.core.registry import adapter_class_for
from adaptkit.data import PromptFormat, load_pairs, prompt_inputs
from adaptkit.evaluation import evaluate
from adaptkit.training.config import slug
from adaptkit.training.trainer import train

# -- data ---------------------------------------------------------------------------------------

def load_domain_data(cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """Each domain's train split and the first eval/test sentences of dev and test (shipped samples)."""
    out = {}
    for domain in cfg.domains:
        dev, test = load_pairs(domain, "dev"), load_pairs(domain, "test")
        out[domain] = {"train": load_pairs(domain, "train"),
                       "dev": dev.select(range(min(cfg.eval_samples, len(dev)))),
                       "test": test.select(range(min(cfg.test_samples, len(test))))}
    return out


def _rows_for(job: Job, data: dict[str, dict[str, Any]]) -> tuple[Any, Any]:
    """Train rows and dev rows of a job; the mixed adapter gets every domain's, dev split evenly."""
    from datasets import concatenate_datasets

    if len(job.train_domains) == 1:
        d = data[job.train_domains[0]]
        return d["train"], d["dev"]
    train = concatenate_datasets([data[d]["train"] for d in job.train_domains])
    share = max(1, min(len(data[d]["dev"]) for d in job.train_domains) // len(job.train_domains))
    dev = concatenate_datasets([data[d]["dev"].select(range(share)) for d in job.train_domains])
    return train, dev


# -- measuring ----------------------------------------------------------------------------------

def _dir_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(f"*{suffix}")) if Path(path).is_dir() else \
        Path(path).stat().st_size


def _backbone_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        if tensor.data_ptr() not in seen:  # tied embeddings are stored once
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


# -- one job ------------------------------------------------------------------------------------

def run_job(job: Job, cfg: BenchConfig, load_model: Callable[[], Any], data: dict, work: Path) -> dict[str, Any]:
    """Load the backbone, train (or not), score and time one job; returns its record."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model = load_model().to(device)
    model.eval()
    record: dict[str, Any] = {"domain": job.domain, "method": job.method, "family": job.family,
                              "library": job.library, "train_domains": job.train_domains, "device": str(device),
                              "torch_threads": torch.get_num_threads(),
                              "backbone_parameters": sum(p.numel() for p in model.model.parameters()),
                              "backbone_bytes": _backbone_bytes(model.model), "rss_after_load_bytes": current_rss()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["gpu"] = torch.cuda.get_device_name(device)
    prompt = PromptFormat() if model.family == "decoder" else None
    first = data[job.test_domains[0]]["test"]
    lat_rows = [first[i] for i in range(min(cfg.latency_sentences, len(first)))]
    lat_inputs = [{k: v.to(device) for k, v in prompt_inputs(
        model.tokenizer, [r["src"]], r.get("src_lang") or "en", r.get("tgt_lang") or "en", model.family, prompt,
        cfg.max_source_len).items()} for r in lat_rows]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
    fixed = dict(max_new_tokens=cfg.latency_tokens, min_new_tokens=cfg.latency_tokens, do_sample=False,
                 num_beams=1, pad_token_id=pad)

    if job.library == "bare":
        scorer, route = model, None
        record.update(trainable_parameters=0, steps=0)
        with RssSampler() as sampler:
            record["dev"] = _score(model, None, data[job.domain]["dev"], cfg, prompt)
        record["peak_rss_bytes"] = peak_rss() if cfg.isolate else sampler.peak
        gens = {"bare": _fixed_length(model, None, fixed)}
        record["latency"] = _latency_record(latency(gens, lat_inputs, cfg.latency_repeats, device), None, cfg)
    elif job.library == "adaptkit":
        bare_ms = None
        if job.method == "full":  # the bare model is gone after training: time it first
            bare_ms = latency({"bare": _fixed_length(model, None, fixed)}, lat_inputs,
                              cfg.latency_repeats, device)["bare"]
        train_rows, dev_rows = _rows_for(job, data)
        with RssSampler() as sampler:
            summary = _train_adaptkit(model, job, cfg, train_rows, dev_rows, work)
        record["peak_rss_bytes"] = peak_rss() if cfg.isolate else sampler.peak
        scorer, route = model, (None if job.method == "full" else job.method)
        record.update(_from_summary(summary))
        record["latency"] = _adaptkit_latency(model, job, lat_inputs, fixed, cfg, device, bare_ms)
    else:
        train_rows, dev_rows = _rows_for(job, data)
        with RssSampler() as sampler:
            scorer, peer_record, peer_latency = train_peft(model, job.method, cfg, train_rows, dev_rows,
                                                           work / slug(job.key), device)
        record["peak_rss_bytes"] = peak_rss() if cfg.isolate else sampler.peak
        route = None
        record.update(peer_record)
        ms = peer_latency(lambda gens: latency(gens, lat_inputs, cfg.latency_repeats, device), fixed)
        record["latency"] = _latency_record(ms, ms.get("merged"), cfg)
    record["rss_method"] = "ru_maxrss of a forked worker" if cfg.isolate else "sampled in-process"
    record["train_rss_delta_bytes"] = record["peak_rss_bytes"] - record["rss_after_load_bytes"]
    record["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    record["test"] = {d: _score(scorer, route, data[d]["test"], cfg, prompt) for d in job.test_domains}
    return record


def _score(model: Any, route: Any, rows: Any, cfg: BenchConfig, prompt: Any) -> dict[str, float]:
    return evaluate(model, rows, route, prompt=prompt, batch_size=cfg.eval_batch_size,
                    max_new_tokens=cfg.max_new_tokens, max_source_len=cfg.max_source_len,
                    max_target_len=cfg.max_target_len)


def _train_adaptkit(model: Any, job: Job, cfg: BenchConfig, train_rows: Any, dev_rows: Any, work: Path) -> dict:
    family, options = METHODS[job.method]
    options = dict(options)
    return train(model, None if family == "full" else job.method, train_rows, dev_rows,
                 full=family == "full", method="lora" if family == "full" else family, adapter_options=options,
                 max_steps=cfg.budget_steps, batch_size=cfg.batch_size, lr=cfg.lr(family),
                 warmup_steps=_warmup(cfg), schedule=cfg.schedule, seed=cfg.seed, eval_every=None,
                 checkpoint_every=0, generate=True, eval_batch_size=cfg.eval_batch_size,
                 max_new_tokens=cfg.max_new_tokens, max_source_len=cfg.max_source_len,
                 max_target_len=cfg.max_target_len, output_dir=str(work / slug(job.key)), resume=False,
                 progress=cfg.progress, activation_checkpointing=cfg.activation_checkpointing)


def _warmup(cfg: BenchConfig) -> int:
    return cfg.budget_steps // 10 if cfg.warmup_steps is None else cfg.warmup_steps


def _from_summary(summary: dict) -> dict[str, Any]:
    output = Path(summary["output"])
    return {"trainable_parameters": summary["trainable_parameters"], "train_loss": summary["train_loss"],
            "file_bytes": _dir_bytes(output), "file": output.name, "dev": summary["last_metrics"],
            **step_figures(summary["step_seconds"], summary["step_tokens"])}


def _fixed_length(model: Any, adapter: str | None, fixed: dict) -> Callable[[dict], Any]:
    """Generation of exactly `latency_tokens` new tokens with `adapter` (None: the bare backbone)."""
    return lambda inputs: model.generate(**inputs, adapter=adapter, **fixed)


def _adaptkit_latency(model: Any, job: Job, inputs: list[dict], fixed: dict, cfg: BenchConfig,
                      device: torch.device, bare_ms: float | None) -> dict[str, Any]:
    if job.method == "full":
        ms = latency({"unmerged": _fixed_length(model, None, fixed)}, inputs,
                     cfg.latency_repeats, device)
        return _latency_record({"bare": bare_ms, **ms}, None, cfg)
    name = job.method
    gens = {"bare": _fixed_length(model, None, fixed), "unmerged": _fixed_length(model, name, fixed)}
    ms = latency(gens, inputs, cfg.latency_repeats, device)
    merged = None
    if adapter_class_for(job.family).mergeable:
        model.merge_adapter(name)
        try:  # bare rows cannot run while merged, so the merged window has its own bare-free timing
            merged = latency({"merged": _fixed_length(model, name, fixed)}, inputs,
                             cfg.latency_repeats, device)["merged"]
        finally:
            model.unmerge_adapter()
    return _latency_record(ms, merged, cfg)


def _latency_record(ms: dict[str, float], merged: float | None, cfg: BenchConfig) -> dict[str, Any]:
    bare = ms.get("bare")
    out = {"bare_ms": bare, "unmerged_ms": ms.get("unmerged"), "merged_ms": merged,
           "new_tokens": cfg.latency_tokens, "sentences": cfg.latency_sentences, "repeats": cfg.latency_repeats}
    out["unmerged_ratio"] = out["unmerged_ms"] / bare if bare and out["unmerged_ms"] else None
    out["merged_ratio"] = merged / bare if bare and merged else None
    return out


# -- running the plan ---------------------------------------------------------------------------

def _child(path: str, job: Job, cfg: BenchConfig, load_model: Callable, data: dict, work: Path) -> None:
    log = work / f"{slug(job.key)}.log"
    try:  # the trainer's prints go to the job's log; progress bars (stderr) stay on the console
        with log.open("w") as out, contextlib.redirect_stdout(out):
            result = run_job(job, cfg, load_model, data, work)
    except Exception:  # noqa: BLE001 - a failed method is a finding, recorded beside the others
        result = {"error": traceback.format_exc(limit=6)}
    Path(path).write_text(json.dumps(result, default=str))


def _run_forked(job: Job, cfg: BenchConfig, load_model: Callable, data: dict, work: Path) -> dict[str, Any]:
    fd, path = tempfile.mkstemp(suffix=".json", dir=work)
    os.close(fd)
    worker = multiprocessing.get_context("fork").Process(target=_child, args=(path, job, cfg, load_model, data, work))
    worker.start()
    worker.join()
    text = Path(path).read_text()
    Path(path).unlink()
    if not text:
        return {"error": f"worker exited with code {worker.exitcode} (killed for memory?) and wrote nothing"}
    return json.loads(text)


def run_benchmark(cfg: BenchConfig, load_model: Callable[[], Any] | None = None,
                  data: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Run every job of `cfg`'s plan; write results/<name>.json, .md and the plots; return the report.

    `load_model` builds a fresh `AdaptedModel` per job (default: `ak.load(cfg.backbone)`); `data`
    maps each domain to its train / dev / test rows (default: the shipped samples).
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # forked workers tokenize too
    if load_model is None:
        def load_model() -> Any:
            return load(cfg.backbone)
    if data is None:
        data = load_domain_data(cfg)
    started = time.perf_counter()
    provenance = environment()  # the commit whose code runs, even if the tree changes during a long run
    jobs = plan(cfg)
    temp = None
    if cfg.work_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="adaptkit-bench-")
    work = Path(cfg.work_dir or temp.name)
    work.mkdir(parents=True, exist_ok=True)
    fork = cfg.isolate and "fork" in multiprocessing.get_all_start_methods()
    if fork and torch.cuda.is_initialized():
        # A child forked after its parent initialised CUDA cannot use it; jobs then run in-process.
        print("CUDA is already initialised in this process: running jobs in-process (peak memory is then "
              "sampled, not per-job); call run_benchmark from a fresh process for per-job figures", file=sys.stderr)
        fork = False
    if cfg.isolate and not fork:
        cfg = dataclasses.replace(cfg, isolate=False)
    records = []
    try:
        for index, job in enumerate(jobs, 1):
            if cfg.progress:
                print(f"[{index}/{len(jobs)}] {job.key} ({job.library}) …", file=sys.stderr, flush=True)
            began = time.perf_counter()
            record = (_run_forked if fork else _run_inline)(job, cfg, load_model, data, work)
            record = {"domain": job.domain, "method": job.method, "family": job.family, "library": job.library,
                      "train_domains": job.train_domains, **record,
                      "job_seconds": round(time.perf_counter() - began, 2)}
            records.append(record)
            if cfg.progress:
                print(_one_line(record), file=sys.stderr, flush=True)
    finally:
        if temp is not None:
            temp.cleanup()
    report = assemble(cfg, records, time.perf_counter() - started, provenance)
    write_outputs(report, Path(cfg.output_dir))
    return report


def _run_inline(job: Job, cfg: BenchConfig, load_model: Callable, data: dict, work: Path) -> dict[str, Any]:
    try:
        return run_job(job, cfg, load_model, data, work)
    except Exception:  # noqa: BLE001
        return {"error": traceback.format_exc(limit=6)}


def _one_line(r: dict) -> str:
    if r.get("error"):
        return f"    failed: {r['error'].strip().splitlines()[-1]}"
    tests = r.get("test", {})
    test = tests.get(r["domain"]) or next(iter(tests.values()), {})
    step = f"step {r['step_seconds_median']:.2f}s " if r.get("steps") else ""
    return (f"    {step}test BLEU {test.get('bleu', float('nan')):.1f} chrF {test.get('chrf', float('nan')):.1f} "
            f"peak RSS {r.get('peak_rss_bytes', 0) / 2**30:.2f} GiB ({r['job_seconds']:.0f}s)")

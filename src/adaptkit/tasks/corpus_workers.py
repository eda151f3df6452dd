"""Where the shards of a file translation run: here, in spawned processes, or on Ray actors.

Every worker builds its own backbone and adapters from the job (only files are shared) and each
finished shard is written atomically, so a worker killed at any moment loses only the shard it
was on. `accelerate launch` needs nothing here: each of its processes calls `run_here` on its
own shards (corpus_translate.py).

- processes: `workers` spawned processes take shard numbers from one queue (a slow shard does not
  hold up the others) and write their shards; the parent counts them and notices a dead worker.
- ray: Ray Data `map_batches` over an actor pool, one shard per batch; actors return the lines and
  the driver writes them, so the output needs no shared file system (the input does: actors read
  their shard's bytes from the input path).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import queue
import signal
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from adaptkit.core.errors import AdapterError
from adaptkit.tasks.filerows import LineTranslator, ModelSpec


class FileJob(Protocol):
    """What a worker needs of `corpus_translate.FileJob`: stated here so this module does not import its caller."""

    spec: ModelSpec

    def new_worker(self, device: str | None = None, threads: int | None = None) -> LineTranslator: ...
    def translate_shard(self, worker: LineTranslator, index: int) -> list[str]: ...
    def write_shard(self, index: int, lines: list[str]) -> int: ...


Advance = Callable[[int], None]  # called with each finished shard's number


def run_here(job: FileJob, shards: Sequence[int], advance: Advance, device: str | None = None,
             threads: int | None = None) -> None:
    """Translate `shards` in this process, one after the other."""
    if not shards:
        return
    worker = job.new_worker(device=device, threads=threads)
    for index in shards:
        job.write_shard(index, job.translate_shard(worker, index))
        advance(index)


def run_processes(job: FileJob, shards: Sequence[int], workers: int, advance: Advance,
                  threads: int | None = None) -> None:
    """Translate `shards` in `workers` spawned processes, each with `threads` torch threads (default:
    the CPUs shared out)."""
    if not shards:
        return
    workers = min(workers, len(shards))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    # spawn, not fork: a forked child would inherit the parent's threads (tqdm's monitor, OpenMP's pool) mid-state
    context = multiprocessing.get_context("spawn")
    tasks: Any = context.Queue()
    results: Any = context.Queue()
    for index in shards:
        tasks.put(index)
    for _ in range(workers):
        tasks.put(None)
    processes = [context.Process(target=_process_main, args=(job, rank, tasks, results, os.getpid(), threads),
                                 name=f"adaptkit-translate-{rank}", daemon=True) for rank in range(workers)]
    for process in processes:
        process.start()
    remaining = set(shards)
    try:
        while remaining:
            try:
                kind, rank, value = results.get(timeout=0.5)
            except queue.Empty:
                _check_alive(processes, remaining)
                continue
            if kind == "error":
                raise AdapterError(f"worker {rank}: {value}")
            remaining.discard(value)
            advance(value)
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(timeout=10)


def _check_alive(processes: list[Any], remaining: set[int]) -> None:
    for rank, process in enumerate(processes):
        code = process.exitcode
        if code not in (None, 0):
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            raise AdapterError(f"worker {rank} died ({how}) with {len(remaining)} shards left; the finished "
                               "shards are kept: rerun the same command to translate only the rest")
    if all(process.exitcode == 0 for process in processes):
        raise AdapterError(f"every worker stopped with {len(remaining)} shards left; rerun the same command")


def _process_main(job: FileJob, rank: int, tasks: Any, results: Any, parent: int, threads: int) -> None:
    try:
        worker = job.new_worker(device=_device_for(rank, job.spec.device), threads=threads)
        while True:
            try:
                index = tasks.get(timeout=1.0)
            except queue.Empty:
                index = -1
            if index is None or os.getppid() != parent:  # done, or the parent is gone: nobody to merge
                return
            if index >= 0:
                job.write_shard(index, job.translate_shard(worker, index))
                results.put(("done", rank, index))
    except Exception as error:  # noqa: BLE001 — any failure goes back to the parent, which reports it
        results.put(("error", rank, str(error) if isinstance(error, AdapterError)
                     else f"{type(error).__name__}: {error}"))


def _device_for(rank: int, device: str | None) -> str | None:
    """The device asked for, else one GPU per worker round-robin where there are GPUs."""
    if device is None and torch.cuda.is_available():
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device


def run_ray(job: FileJob, shards: Sequence[int], workers: int, advance: Advance,
            cpus_per_worker: float | None = None, threads: int | None = None) -> None:
    """Translate `shards` on `workers` Ray actors (Ray Data `map_batches`, one shard per batch).

    Joins the cluster at RAY_ADDRESS when it is set (`ray start --head` on the cluster), else starts
    a local Ray instance. Each actor asks for `cpus_per_worker` CPUs (default: the cluster's CPUs
    shared out among the workers) and uses as many torch threads unless `threads` says otherwise.
    """
    import ray

    if not shards:
        return
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    cpus = cpus_per_worker or max(1.0, ray.cluster_resources().get("CPU", 1.0) / workers)
    dataset = ray.data.from_items([{"shard": index} for index in shards], override_num_blocks=len(shards))
    translated = dataset.map_batches(_RayShards, fn_constructor_args=(job, threads or max(1, int(cpus))), batch_size=1,
                                     batch_format="numpy", concurrency=workers, num_cpus=cpus)
    for row in translated.iter_rows():
        index = int(row["shard"])
        job.write_shard(index, json.loads(row["lines"]))
        advance(index)


class _RayShards:
    """A Ray actor: one backbone with its adapters, translating whole shards."""

    def __init__(self, job: FileJob, threads: int):
        self.job = job
        self.worker = job.new_worker(threads=threads)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        lines = [json.dumps(self.job.translate_shard(self.worker, int(index))) for index in batch["shard"]]
        return {"shard": batch["shard"], "lines": np.array(lines, dtype=object)}

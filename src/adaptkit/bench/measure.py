"""How the efficiency benchmark measures: resident memory, interleaved latency, step-time figures.

Used alike for adaptkit's jobs and their peft peers, so both sides are timed the same way.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import torch


def current_rss() -> int:
    """Resident bytes of this process now (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # macOS reports bytes, Linux KiB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class RssSampler:
    """Peak RSS in a window of an in-process run, sampled every few ms (ru_maxrss cannot be reset)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self._stop = every, current_rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(generators: dict[str, Callable[[dict], Any]], inputs: list[dict], repeats: int,
            device: torch.device) -> dict[str, float]:
    """Median ms per sentence of each generator, run interleaved sentence by sentence (after a warm-up)."""
    for generate in generators.values():
        generate(inputs[0])
    times: dict[str, list[float]] = {k: [] for k in generators}
    for _ in range(repeats):
        for one in inputs:
            for key, generate in generators.items():
                sync(device)
                start = time.perf_counter()
                generate(one)
                sync(device)
                times[key].append(1000 * (time.perf_counter() - start))
    return {k: statistics.median(v) for k, v in times.items()}


def step_figures(step_seconds: list[float], step_tokens: list[int]) -> dict[str, Any]:
    """Median step time and tokens/s over the training steps alone (evaluation excluded)."""
    seconds = sum(step_seconds)
    return {"steps": len(step_seconds), "step_seconds_median": statistics.median(step_seconds),
            "step_seconds": [round(s, 4) for s in step_seconds], "train_seconds": round(seconds, 3),
            "tokens_per_second": sum(step_tokens) / max(seconds, 1e-9)}

"""Shared by the examples: reuse the adapter an earlier run of the trainer wrote, or train it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def trained_or_reused(model: Any, adapter: str, output_dir: str | Path, retrain: bool,
                      train: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The trainer's summary of `adapter`: an earlier run's, with its file loaded, when `output_dir` holds one.

    The trainer writes summary.json only after the adapter file, so a summary means a finished run;
    an interrupted one (or `retrain`) trains again with `train()`.
    """
    done = Path(output_dir) / "summary.json"
    if done.is_file() and not retrain:
        summary = json.loads(done.read_text())
        print(f"reusing {summary['output']} ({summary['steps']} steps by an earlier run; --retrain to train again)")
        model.load_adapter(summary["output"], adapter)
        return summary
    return train()

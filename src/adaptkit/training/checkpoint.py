"""Training checkpoints: safetensors for tensors, JSON for everything else, never pickle.

`checkpoints/step-N/` holds `trainable.safetensors` (the adapter's tensors, or the backbone's on
the full path), `optimizer.{safetensors,json}`, `scheduler.json`, `state.json` (the run's
progress), `adapter_state.{safetensors,json}` (a family's own training state, e.g. AdaLoRA's
importance scores) and one `rng-<process>.{safetensors,json}` per process.

A checkpoint is written whole under a temporary name, renamed into place, and only then does
`latest.json` point at it: a run killed in the middle of a save resumes from the previous one.
The caller (`train.Recipe`) decides which process writes what and puts the barriers between.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from adaptkit.core.atomicfile import write_atomic


@dataclasses.dataclass
class Checkpoint:
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    scheduler: dict[str, Any]
    run_state: dict[str, Any]
    adapter_state: tuple[dict[str, torch.Tensor], dict[str, Any]] | None = None


def staging_dir(checkpoints: Path, step: int) -> Path:
    """Where step `step` is written before `commit` renames it (every process writes its RNG there)."""
    return checkpoints / f".step-{step:08d}.tmp"


def prepare(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)


def write(staging: Path, checkpoint: Checkpoint) -> None:
    """Everything but the RNG, written once (by the main process)."""
    save_file(_cpu(checkpoint.trainable), staging / "trainable.safetensors")
    tensors, rest = _optimizer_to_files(checkpoint.optimizer)
    save_file(tensors, staging / "optimizer.safetensors")
    write_json(staging / "optimizer.json", rest)
    write_json(staging / "scheduler.json", checkpoint.scheduler)
    write_json(staging / "state.json", checkpoint.run_state)
    if checkpoint.adapter_state is not None:
        tensors, info = checkpoint.adapter_state
        save_file(_cpu(tensors), staging / "adapter_state.safetensors")
        write_json(staging / "adapter_state.json", info)


def write_rng(staging: Path, process_index: int) -> None:
    tensors, rest = _rng_state()
    save_file(tensors, staging / f"rng-{process_index}.safetensors")
    write_json(staging / f"rng-{process_index}.json", rest)


def commit(checkpoints: Path, staging: Path, step: int) -> Path:
    """Rename the staged checkpoint into place, point `latest.json` at it, drop older ones."""
    final = checkpoints / f"step-{step:08d}"
    shutil.rmtree(final, ignore_errors=True)
    os.replace(staging, final)
    write_json(checkpoints / "latest.json", {"dir": final.name, "step": step}, atomic=True)
    for old in checkpoints.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(checkpoints: Path) -> Path | None:
    pointer = checkpoints / "latest.json"
    return checkpoints / json.loads(pointer.read_text())["dir"] if pointer.is_file() else None


def read(where: Path) -> Checkpoint:
    optimizer = _optimizer_from_files(load_file(where / "optimizer.safetensors"),
                                      json.loads((where / "optimizer.json").read_text()))
    adapter_state = None
    if (where / "adapter_state.json").is_file():
        adapter_state = (load_file(where / "adapter_state.safetensors"),
                         json.loads((where / "adapter_state.json").read_text()))
    return Checkpoint(trainable=load_file(where / "trainable.safetensors"), optimizer=optimizer,
                      scheduler=json.loads((where / "scheduler.json").read_text()),
                      run_state=json.loads((where / "state.json").read_text()), adapter_state=adapter_state)


def restore_rng(where: Path, process_index: int) -> bool:
    """False when this process had no RNG saved (a run resumed on more processes starts it fresh)."""
    rest = where / f"rng-{process_index}.json"
    if not rest.is_file():
        return False
    _set_rng_state(load_file(where / f"rng-{process_index}.safetensors"), json.loads(rest.read_text()))
    return True


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in tensors.items()}


def save_full(model: Any, path: Path, metrics: dict, training: dict) -> None:
    """save_pretrained + tokenizer + the run's metrics, written under a temp name and swapped in."""
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.model.save_pretrained(tmp)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(tmp)
    write_json(tmp / "adaptkit_training.json", {"metrics": metrics, "training": training})
    old = path.with_name(f".{path.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, data: Any, atomic: bool = False) -> None:
    text = json.dumps(data, indent=1, sort_keys=True)
    if not atomic:
        path.write_text(text)
        return
    write_atomic(path, text.encode("utf-8"))  # fsynced, and a killed writer's temp file is cleaned up


def _optimizer_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer state_dict → (tensors for safetensors, JSON for the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}/{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = tensor
    for index, values in rest["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{i}"] = s
    version, values, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(values), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def _set_rng_state(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda/"))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, values, gauss = rest["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = rest["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))

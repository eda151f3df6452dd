"""peft directories in and out: adapters trained here run in peft (and vLLM, LoRAX); peft's run here.

A peft directory is `adapter_config.json` + `adapter_model.safetensors`, tensors named after the
wrapped model (`base_model.model.<module path>.lora_A.weight`). Both sides use the same module
paths — ours come from the backbone's own `named_modules()` — so a family converts by renaming,
in its own `to_peft()` / `from_peft()` (methods/). This module only reads and writes the
directory and finds the family by peft_type through the registry: what exports (LoRA, AdaLoRA)
and imports (LoRA, AdaLoRA, prefix tuning) is whatever the families implement.

`base_model_name_or_path` names the Hub id that peft, vLLM and LoRAX match against: the zoo's Hub id
for a zoo backbone, else what the model was loaded from (a Hub id or a local directory), as peft
writes it. `adapter_model.bin` (a pickle) is refused: loading it could run arbitrary code.

`adapter_file_from_peft` turns a peft adapter into an adaptkit adapter file without touching the bank
(the service's store installs peft directories and tars through it: serving/catalog.py). A peft
directory carries no backbone fingerprint, only `base_model_name_or_path` — a Hub id or some machine's
local path, which names the same weights in many spellings — so that name is recorded, not compared:
what ties the adapter to this backbone is its shapes (module paths, ranks, a prefix's heads), which the
family's `from_peft` and the file's load checks match against this backbone. The file then carries
this backbone's fingerprint, as a file saved here would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from adaptkit import zoo
from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import METHODS
from adaptkit.methods.base import Adapter, AdapterConfig

if TYPE_CHECKING:
    from adaptkit.core.bank import AdaptedModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
KEY_PREFIX = "base_model.model."
TASK_TYPES = {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": None}


# -- export -------------------------------------------------------------------------------------

def export_peft(model: AdaptedModel, name: str, out_dir: str | Path) -> Path:
    """Write adapter `name` as a peft directory; `PeftModel.from_pretrained` loads it."""
    import peft.mapping

    adapter = model.get_adapter(name)
    if type(adapter).to_peft is Adapter.to_peft:
        raise AdapterError(f"peft export covers {_families(lambda c: c.to_peft is not Adapter.to_peft)} adapters; "
                           f"{name!r} is {adapter.method}")
    if getattr(adapter, "head", None) is not None:
        raise AdapterError(f"adapter {name!r} carries a task head, which a peft LoRA directory cannot hold; "
                           "save it with model.save_adapter instead")
    adapter.check_trained()
    peft_config, tensors = adapter.to_peft()
    peft_config.update(base_model_name_or_path=base_model_id(model), task_type=TASK_TYPES[model.family],
                       inference_mode=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_class = peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING[peft_config.pop("peft_type")]
    config_class(**peft_config).save_pretrained(str(out))  # peft fills and validates every other field
    save_file({KEY_PREFIX + k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt"})
    return out


def base_model_id(model: AdaptedModel) -> str | None:
    """The Hub id of the backbone, for `base_model_name_or_path`; a local directory's path; None if unknown.

    A zoo backbone (by name, or its cache directory) gives the zoo entry's Hub id. Otherwise the
    transformers model's `name_or_path` — the Hub id or the directory it was loaded from — as peft
    itself writes it; a model built from a config has none.
    """
    entry = zoo.ZOO.get(model.backbone_id)
    if entry is not None:
        return entry.hub_id
    loaded_from = getattr(model.model, "name_or_path", None) or getattr(model.model.config, "_name_or_path", "")
    for candidate in (model.backbone_id, loaded_from):
        marker = Path(str(candidate)).expanduser() / zoo.COMPLETE_MARKER
        if candidate and marker.is_file():
            try:
                hub_id = json.loads(marker.read_text()).get("hub_id")
            except (OSError, ValueError, AttributeError):
                hub_id = None
            if isinstance(hub_id, str) and hub_id:
                return hub_id
    return str(loaded_from) or None


# -- import -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PeftAdapter:
    """A peft adapter as read: its adapter_config.json, its tensors under peft's names, and where it came
    from (for messages)."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    source: str


def import_peft(model: AdaptedModel, peft_dir: str | Path, name: str | None = None) -> str:
    """Load a peft directory (a type some family reads: LoRA, AdaLoRA, prefix tuning) into the bank;
    returns the adapter's name."""
    peft = read_peft_dir(peft_dir)
    family, our_config, our_tensors = _from_peft(model, peft)
    name = name or Path(peft_dir).resolve().name
    adapter = family(name, our_config, model.arch)
    adapter.load_adapter_state_dict(our_tensors)
    model._insert(name, adapter, {})
    return name


def import_peft_dir(peft_dir: str | Path, model: AdaptedModel, name: str | None = None) -> str:
    """`adaptkit.import_peft(peft_dir, model)`: the same, directory first."""
    return import_peft(model, peft_dir, name)


def adapter_file_from_peft(model: AdaptedModel, peft: PeftAdapter, name: str
                           ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of the adaptkit adapter file that holds `peft` for this backbone, for
    `write_adapter_file` / `encode_adapter_file`. The bank is not touched and nothing is built: the file
    holds the family's config and tensors exactly as `import_peft` would build from them, so loading it
    (or `check_adapter_file`, which the store runs before installing it) makes every check a native file
    gets — shapes against this backbone, dtypes, finite values, the config's size bounded before any
    memory is allocated from it."""
    family, our_config, our_tensors = _from_peft(model, peft)
    record = {"imported_from": {"format": "peft", "peft_type": str(peft.config.get("peft_type")),
                                "base_model_name_or_path": _text_or_none(peft.config.get("base_model_name_or_path"))}}
    return our_tensors, {"method": family.method, "config": our_config.to_json(), "backbone": model.backbone_record(),
                         "name": name, "training": record}


def read_peft_dir(peft_dir: str | Path) -> PeftAdapter:
    """adapter_config.json + adapter_model.safetensors of a peft directory; a pickle (adapter_model.bin) is refused."""
    peft_dir = Path(peft_dir)
    if not peft_dir.is_dir():
        raise AdapterError(f"no peft adapter directory at {str(peft_dir)!r}")
    weights = peft_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [n for n in PICKLE_NAMES if (peft_dir / n).is_file()]
        if pickled:
            raise AdapterError(pickle_refusal(str(peft_dir), pickled[0]))
        raise AdapterError(f"{peft_dir} has no {WEIGHTS_NAME}")
    config_path = peft_dir / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{peft_dir} has no {CONFIG_NAME}: not a peft adapter directory")
    try:
        config_text = config_path.read_bytes()
    except OSError as error:
        raise AdapterError(f"{peft_dir} is not a readable peft directory: {error}") from None
    return read_peft_files(config_text, weights, str(peft_dir))


def read_peft_files(config_text: bytes, weights: Path, source: str) -> PeftAdapter:
    """A peft adapter from its config's bytes and its weights' file (a tar upload's members, which are not
    laid out as a directory); `source` names it in messages."""
    try:
        config = json.loads(config_text)
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as error:
        raise AdapterError(f"{source} is not a readable peft adapter: {error}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{source}: {CONFIG_NAME} is not a JSON object: not a peft adapter config")
    return PeftAdapter(config, tensors, source)


def pickle_refusal(source: str, name: str) -> str:
    """Why a pickled peft adapter is refused, and how to get one that is not."""
    return (f"{source} holds {name}, a pickle file; adaptkit never unpickles (it can run arbitrary code). In a "
            "trusted environment, load it with peft and save_pretrained(..., safe_serialization=True) to get "
            f"{WEIGHTS_NAME}")


def _from_peft(model: AdaptedModel, peft: PeftAdapter) -> tuple[type[Adapter], AdapterConfig, dict[str, torch.Tensor]]:
    """The family reading the adapter's peft_type, and the adapter in its terms (config, tensors)."""
    peft_type = str(peft.config.get("peft_type", "")).upper()
    family = next((c for c in METHODS.values() if peft_type in c.peft_types), None)
    if family is None:
        readable = sorted(t for c in METHODS.values() for t in c.peft_types)
        raise AdapterError(f"{peft.source}: peft type {peft_type or '<missing>'} cannot be imported; "
                           f"adaptkit imports {readable}")
    short = {k.removeprefix(KEY_PREFIX): t for k, t in peft.tensors.items()}
    try:
        return family, *family.from_peft(peft.config, short, model.arch)
    except AdapterError as error:
        raise AdapterError(f"{peft.source}: {error}") from None
    except Exception as error:  # noqa: BLE001 - a config field missing or of the wrong type: the input's fault
        raise AdapterError(f"{peft.source}: its {peft_type} {CONFIG_NAME} or tensors cannot be read "
                           f"({type(error).__name__}: {error})") from None


def _text_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _families(has: Any) -> str:
    return ", ".join(sorted(method for method, cls in METHODS.items() if has(cls)))

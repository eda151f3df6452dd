"""peft directories in and out: adapters trained here run in peft (and vLLM, LoRAX); peft's run here.

A peft directory is `adapter_config.json` + `adapter_model.safetensors`, tensors named after the
wrapped model (`base_model.model.<module path>.lora_A.weight`). Both sides use the same module
paths — ours come from the backbone's own `named_modules()` — so conversion is renaming plus:

    LoRA      lora_A.weight (r × in), lora_B.weight (out × r)        ↔ lora_A, lora_B
    AdaLoRA   lora_A (r × in), lora_E (r × 1), lora_B (out × r)       ↔ Q, Λ, P; kept ranks in rank_pattern
    prefix    prompt_embeddings [T, layers · 2 · kv_heads · head_dim] → <attention>.prefix_key / .prefix_value

`adapter_model.bin` (a pickle) is refused: loading it could run arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers.pytorch_utils import Conv1D

from adaptkit.core.errors import AdapterError
from adaptkit.core.registry import adapter_class_for
from adaptkit.methods import prefix as prefix_method
from adaptkit.methods.adalora import AdaLoRA
from adaptkit.methods.base import Adapter
from adaptkit.methods.lora import LoRA

if TYPE_CHECKING:
    from adaptkit.core.bank import AdaptedModel

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "pytorch_model.bin")
KEY_PREFIX = "base_model.model."
TASK_TYPES = {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM", "encoder": None}


# -- export -------------------------------------------------------------------------------------

def export_peft(model: AdaptedModel, name: str, out_dir: str | Path) -> Path:
    """Write adapter `name` (LoRA or AdaLoRA) as a peft directory; `PeftModel.from_pretrained` loads it."""
    adapter = model.get_adapter(name)
    adapter.check_trained()
    if adapter.method == "lora":
        peft_config, tensors = _lora_to_peft(adapter)
    elif adapter.method == "adalora":
        peft_config, tensors = _adalora_to_peft(adapter)
    else:
        raise AdapterError(f"peft export covers lora and adalora adapters; {name!r} is {adapter.method}")
    peft_config.update(
        base_model_name_or_path=model.backbone_id,
        task_type=TASK_TYPES[model.family],
        target_modules=[target.name for target in adapter.targets],
        fan_in_fan_out=any(isinstance(target.module, Conv1D) for target in adapter.targets),
        inference_mode=True,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_class = _peft_config_class(peft_config.pop("peft_type"))
    config_class(**peft_config).save_pretrained(str(out))  # peft fills and validates every other field
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(out / WEIGHTS_NAME),
              metadata={"format": "pt"})
    return out


def _lora_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c: LoRA = adapter.config
    tensors = {}
    for path, update in adapter.site_items():
        tensors[f"{KEY_PREFIX}{path}.lora_A.weight"] = update.lora_A
        tensors[f"{KEY_PREFIX}{path}.lora_B.weight"] = update.lora_B
    return dict(peft_type="LORA", r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout, use_rslora=c.use_rslora), tensors


def _adalora_to_peft(adapter: Adapter) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    c: AdaLoRA = adapter.config
    tensors, rank_pattern = {}, {}
    for path, update in adapter.site_items():
        kept = update.pruned()
        tensors[f"{KEY_PREFIX}{path}.lora_A"] = kept["Q"]
        tensors[f"{KEY_PREFIX}{path}.lora_E"] = kept["Lambda"][:, None]
        tensors[f"{KEY_PREFIX}{path}.lora_B"] = kept["P"]
        # peft builds every module at init_r, then keeps the rows this mask selects; the tensors
        # above are already pruned, so the kept ones are listed first.
        rank = update.rank
        rank_pattern[f"{path}.lora_E"] = [True] * rank + [False] * (c.init_r - rank)
    config = dict(peft_type="ADALORA", init_r=c.init_r, target_r=c.target_r, total_step=c.total_steps,
                  tinit=c.tinit, tfinal=c.tfinal, deltaT=c.delta_t, beta1=c.beta1, beta2=c.beta2,
                  orth_reg_weight=c.orth_reg_weight, lora_alpha=c.alpha, lora_dropout=c.dropout,
                  rank_pattern=rank_pattern)
    return config, tensors


def _peft_config_class(peft_type: str) -> type:
    import peft

    return {"LORA": peft.LoraConfig, "ADALORA": peft.AdaLoraConfig}[peft_type]


# -- import -------------------------------------------------------------------------------------

def import_peft(model: AdaptedModel, peft_dir: str | Path, name: str | None = None) -> str:
    """Load a peft LoRA / AdaLoRA / prefix-tuning directory into the bank; returns the adapter's name."""
    peft_dir = Path(peft_dir)
    config, tensors = _read_peft_dir(peft_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    builders = {"LORA": _lora_from_peft, "ADALORA": _adalora_from_peft, "PREFIX_TUNING": _prefix_from_peft}
    if peft_type not in builders:
        raise AdapterError(f"{peft_dir}: peft type {peft_type or '<missing>'} cannot be imported; "
                           f"adaptkit imports {sorted(builders)}")
    our_config, our_tensors = builders[peft_type](model, config, tensors)
    name = name or peft_dir.resolve().name
    adapter = adapter_class_for(our_config.method)(name, our_config, model.arch)
    adapter.load_adapter_state_dict(our_tensors)
    model._insert(name, adapter, {})
    return name


def import_peft_dir(peft_dir: str | Path, model: AdaptedModel, name: str | None = None) -> str:
    """`adaptkit.import_peft(peft_dir, model)`: the same, directory first."""
    return import_peft(model, peft_dir, name)


def _read_peft_dir(peft_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not peft_dir.is_dir():
        raise AdapterError(f"no peft adapter directory at {str(peft_dir)!r}")
    weights = peft_dir / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [n for n in PICKLE_NAMES if (peft_dir / n).is_file()]
        if pickled:
            raise AdapterError(
                f"{peft_dir} holds {pickled[0]}, a pickle file; adaptkit never unpickles (it can run arbitrary "
                "code). In a trusted environment, load it with peft and save_pretrained(..., "
                "safe_serialization=True) to get adapter_model.safetensors"
            )
        raise AdapterError(f"{peft_dir} has no {WEIGHTS_NAME}")
    config_path = peft_dir / CONFIG_NAME
    if not config_path.is_file():
        raise AdapterError(f"{peft_dir} has no {CONFIG_NAME}: not a peft adapter directory")
    try:
        config = json.loads(config_path.read_text())
        tensors = load_file(str(weights))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as error:
        raise AdapterError(f"{peft_dir} is not a readable peft directory: {error}") from None
    return config, tensors


def _refuse(config: dict[str, Any], checks: dict[str, bool]) -> None:
    bad = [what for what, failed in checks.items() if failed]
    if bad:
        raise AdapterError(f"this peft {config.get('peft_type')} adapter uses {', '.join(bad)}, "
                           "which adaptkit does not support; it cannot be imported exactly")


def _split_keys(model: AdaptedModel, tensors: dict[str, torch.Tensor], suffixes: dict[str, str]
                ) -> tuple[tuple[str, ...], dict[str, torch.Tensor]]:
    """peft keys → (module paths in backbone order, our method-relative tensors)."""
    ours, paths, unknown = {}, set(), []
    for key, tensor in tensors.items():
        short = key.removeprefix(KEY_PREFIX)
        match = next(((short[: -len(s)], mine) for s, mine in suffixes.items() if short.endswith(s)), None)
        if match is None:
            unknown.append(key)
            continue
        path, mine = match
        paths.add(path)
        ours[f"{path}.{mine}"] = tensor
    if unknown:
        raise AdapterError(f"unsupported tensors in the peft adapter (embeddings, biases, DoRA, modules_to_save?): "
                           f"{sorted(unknown)[:3]}")
    known = [site.name for site in model.arch.linears]
    outside = sorted(paths - set(known))
    if outside:
        raise AdapterError(f"the peft adapter targets modules adaptkit does not adapt on this backbone: {outside[:3]}")
    return tuple(p for p in known if p in paths), ours


def _lora_from_peft(model: AdaptedModel, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                    ) -> tuple[LoRA, dict[str, torch.Tensor]]:
    _refuse(config, {"DoRA": bool(config.get("use_dora")), f"bias={config.get('bias')!r}": config.get(
        "bias", "none") != "none", "modules_to_save": bool(config.get("modules_to_save")),
        "per-module alpha (alpha_pattern)": bool(config.get("alpha_pattern"))})
    targets, ours = _split_keys(model, tensors, {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B"})
    ranks = {t.shape[0] for k, t in ours.items() if k.endswith(".lora_A")}
    if len(ranks) != 1:
        raise AdapterError(f"the peft LoRA adapter has per-module ranks {sorted(ranks)}; adaptkit LoRA has one rank")
    lora = LoRA(r=ranks.pop(), alpha=float(config.get("lora_alpha", 8)), dropout=float(config.get("lora_dropout", 0)),
                targets=targets, use_rslora=bool(config.get("use_rslora", False)))
    return lora, ours


def _adalora_from_peft(model: AdaptedModel, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                       ) -> tuple[AdaLoRA, dict[str, torch.Tensor]]:
    _refuse(config, {"modules_to_save": bool(config.get("modules_to_save")),
                     f"bias={config.get('bias')!r}": config.get("bias", "none") != "none"})
    targets, ours = _split_keys(model, tensors, {".lora_A": "Q", ".lora_E": "Lambda", ".lora_B": "P"})
    ours = {k: t.reshape(-1) if k.endswith(".Lambda") else t for k, t in ours.items()}
    init_r = int(config["init_r"])
    alpha = float(config.get("lora_alpha") or init_r)  # peft: scaling = lora_alpha if > 0 else r
    adalora = AdaLoRA(
        init_r=init_r, target_r=min(int(config.get("target_r", 8)), init_r), total_steps=int(config["total_step"]),
        tinit=int(config.get("tinit", 0)), tfinal=int(config.get("tfinal", 0)), delta_t=int(config.get("deltaT", 1)),
        beta1=float(config.get("beta1", 0.85)), beta2=float(config.get("beta2", 0.85)),
        orth_reg_weight=float(config.get("orth_reg_weight", 0.5)), alpha=alpha,
        dropout=float(config.get("lora_dropout", 0)), targets=targets,
        rank_pattern={p: int(ours[f"{p}.Q"].shape[0]) for p in targets},
    )
    return adalora, ours


def _prefix_from_peft(model: AdaptedModel, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                      ) -> tuple[Any, dict[str, torch.Tensor]]:
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterError(f"a peft prefix-tuning adapter holds one tensor, prompt_embeddings; found {sorted(tensors)}")
    length = int(config["num_virtual_tokens"])
    layers, heads = int(config["num_layers"]), int(config["num_attention_heads"])
    head_dim = int(config["token_dim"]) // heads
    embeddings = tensors["prompt_embeddings"]
    if tuple(embeddings.shape) != (length, layers * 2 * heads * head_dim):
        raise AdapterError(f"prompt_embeddings has shape {tuple(embeddings.shape)}; the config promises "
                           f"({length}, {layers * 2 * heads * head_dim})")
    # peft's past_key_values layout: [T, layers·2, heads, head_dim] → [layers·2, heads, T, head_dim]
    kv = embeddings.view(length, layers * 2, heads, head_dim).permute(1, 2, 0, 3)
    sites = _peft_prefix_sites(model, config, layers)
    ours = {}
    for site, source_layer in sites:
        if (site.num_kv_heads, site.head_dim) != (heads, head_dim):
            raise AdapterError(f"peft prefix has {heads} heads × {head_dim} per layer; {site.name} has "
                               f"{site.num_kv_heads} × {site.head_dim}")
        ours[f"{site.name}.prefix_key"] = kv[2 * source_layer].contiguous()
        ours[f"{site.name}.prefix_value"] = kv[2 * source_layer + 1].contiguous()
    where = ("encoder",) if model.family == "encoder" else ("decoder",)  # decoder self-attention only
    return prefix_method.Prefix(length=length, where=where), ours


def _peft_prefix_sites(model: AdaptedModel, config: dict[str, Any], layers: int) -> list[tuple[Any, int]]:
    """(attention site, peft layer whose prefix it gets), for the attentions peft's prefix reaches.

    Decoders: every self-attention, layer i ← layer i. Seq2seq: peft doubles the layer axis and
    cuts it into groups of four (self k, self v, cross k, cross v) per decoder layer, then drops
    the cross part: decoder self-attention i gets peft layer 2i mod L; the encoder gets nothing.
    """
    if model.family == "seq2seq":
        selfs = [s for s in model.arch.attentions if s.stack == "decoder" and s.kind == "self"]
        return [(site, (2 * i) % layers) for i, site in enumerate(sorted(selfs, key=lambda s: s.layer))]
    selfs = sorted((s for s in model.arch.attentions if s.kind == "self"), key=lambda s: s.layer)
    if len(selfs) != layers:
        raise AdapterError(f"the peft prefix covers {layers} layers; this backbone has {len(selfs)} self-attentions")
    return [(site, i) for i, site in enumerate(selfs)]

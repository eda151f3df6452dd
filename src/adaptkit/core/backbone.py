"""Load a pretrained model and its tokenizer, freeze it, and fingerprint it.

The fingerprint ties an adapter file to the backbone it was trained on: architecture, the
name and shape of every tensor, and a few sampled weight values (compared with a tolerance,
so the same weights loaded in bf16 or fp32 still match).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
import transformers as tf
from torch import nn

from adaptkit import zoo
from adaptkit.core.errors import AdapterError

PROBE_VALUES = 16
# What a saved tokenizer leaves in a model directory (fast, sentencepiece, BPE, WordPiece, tiktoken)
_TOKENIZER_FILES = ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.spm", "spiece*", "sentencepiece*",
                    "special_tokens_map.json", "added_tokens.json", "*.tiktoken")


def _auto_class(config) -> type:
    if getattr(config, "is_encoder_decoder", False):
        return tf.AutoModelForSeq2SeqLM
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return tf.AutoModelForCausalLM
    if any(a.endswith("ForMaskedLM") for a in architectures):
        return tf.AutoModelForMaskedLM
    return tf.AutoModel


def load_pretrained(name_or_path: str | Path, dtype: torch.dtype | str | None = None,
                    device: str | torch.device | None = None) -> tuple[nn.Module, Any, str]:
    """(model, tokenizer or None, backbone id) from a zoo name, a local directory or a Hub id.

    A directory without tokenizer files (a model saved with `save_pretrained` only) gives None:
    what needs a tokenizer says so when it is called.
    """
    backbone_id = str(name_or_path)
    path = zoo.resolve(name_or_path)
    config = tf.AutoConfig.from_pretrained(path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = _auto_class(config).from_pretrained(path, **kwargs)
    tokenizer = _load_tokenizer(path)
    if device is not None:
        model.to(device)
    return model, tokenizer, backbone_id


def _load_tokenizer(path: Path) -> Any:
    if path.is_dir() and not any(any(path.glob(pattern)) for pattern in _TOKENIZER_FILES):
        return None  # the tokenizer loaders fail on this with raw TypeErrors / assertions
    try:
        return tf.AutoTokenizer.from_pretrained(path)
    except Exception as error:  # noqa: BLE001 — third-party tokenizer classes raise anything; the model still loads
        warnings.warn(f"the model in {path} loads without a tokenizer: its tokenizer files could not be read "
                      f"({type(error).__name__}: {error})", stacklevel=3)
        return None


def freeze(model: nn.Module) -> None:
    """No backbone parameter ever receives a gradient."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()


def contiguous_head_input(model: nn.Module) -> None:
    """Give the output layer a contiguous input. `generate` keeps one position per row (`logits_to_keep`), a
    strided slice of the last hidden states, and torch runs a linear layer on such a 3-D input as a batched
    matmul over a broadcast weight: for gemma3's 262k-row output layer on a CPU, 32 rows take 1.35 s
    instead of 0.19 s. The copy is one hidden vector per row."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Module) and contiguous_inputs not in head._forward_pre_hooks.values():
        head.register_forward_pre_hook(contiguous_inputs)


def contiguous_inputs(_module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Architecture, a hash of every tensor's name and shape, and sampled values of a few weights."""
    state = model.state_dict()
    shapes = hashlib.sha256()
    for name in sorted(state):
        shapes.update(f"{name}:{tuple(state[name].shape)};".encode())
    probes = []
    big = [n for n in sorted(state) if state[n].dim() >= 2 and state[n].is_floating_point()]
    for name in big[:: max(1, len(big) // 4)][:4]:
        flat = state[name].detach().reshape(-1)
        count = PROBE_VALUES // 4  # integer spacing: float linspace overshoots on 10^8-element tensors
        idx = torch.arange(count) * (flat.numel() - 1) // (count - 1)
        probes.extend(float(v) for v in flat[idx].float().cpu())
    return {
        "architecture": type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
        "shapes_sha256": shapes.hexdigest()[:32],
        "num_parameters": sum(t.numel() for t in state.values()),
        "probe": probes,
    }


def fingerprint_mismatch(expected: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """Why the two fingerprints differ, or None when they describe the same backbone."""
    for key in ("architecture", "model_type", "shapes_sha256"):
        if expected.get(key) != actual.get(key):
            return f"{key} is {expected.get(key)!r} in the file but {actual.get(key)!r} here"
    a = torch.tensor(expected.get("probe", []))
    b = torch.tensor(actual.get("probe", []))
    if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=1e-3):
        return "the sampled weight values differ (same architecture, other weights)"
    return None


def check_backbone(file_backbone: dict[str, Any], actual: dict[str, Any], source: str) -> None:
    """Raise unless the file's backbone fingerprint matches `actual` (this backbone's fingerprint)."""
    reason = fingerprint_mismatch(file_backbone, actual)
    if reason:
        raise AdapterError(
            f"{source} was trained for another backbone ({file_backbone.get('id')!r}): {reason}. "
            "Load it onto the backbone it was trained on, or pass check_backbone=False if you know they match"
        )

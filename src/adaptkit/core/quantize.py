"""Quantised backbones: the frozen Linear weights stored in 8 (or 4) bits, adapters in full precision.

        x ──► W_q (int8, frozen; dequantised in the matmul) ──┐
        │                                                     + ──► y   (the adapter's hook, unchanged)
        └──► adapter (float32, trainable) ────────────────────┘

`quantize="int8"` on CPU uses torchao's weight-only int8 (`Int8WeightOnlyConfig` through
`quantize_`): one scale per output row, the module stays an `nn.Linear` (only its weight becomes
a tensor subclass), so every forward hook and the role map see the same modules as before, and
gradients reach the input through the frozen weights: adapters below a quantised projection
train (the QLoRA recipe). Chosen by measurement on this CPU (benchmarks/quantized.py, "library
choice"): torchao's dynamic int8 activations and `torch.ao` dynamic quantisation (deprecated) run a
forward 2.6-5.5x faster but pass no gradient to the input; optimum-quanto's int8 weights train at
the same speed as torchao's, but swap every Linear for its own QLinear (a hook set on the old module
would be lost) and leave the quantised weights requiring grad.

`"nf4"` (4-bit NormalFloat, the QLoRA storage format) goes through bitsandbytes on CPU and CUDA, and
on CUDA `"int8"` does too (LLM.int8): bitsandbytes' Linear4bit / Linear8bitLt replace each nn.Linear
before the role map is read. They subclass nn.Linear, so the role map finds them as it found the
originals. On CPU (bitsandbytes 0.50 or later) a 4-bit layer dequantises its weight, then multiplies:
it saves memory and costs time.

For "int8" and "nf4" the output projection (the LM head, often tied to the input embeddings) stays in
full precision, as bitsandbytes' own default does: quantising a tied head would add an int8 copy beside
the embedding it shares, not save memory. Nothing else of the backbone changes.

`"int8-dynamic"` is the inference scheme, CPU only (core/int8dynamic.py): int8 weights per output row
times activations quantised to int8 per token at every call, multiplied by `torch._int_mm`; chosen
because it decodes faster than float32 on CPU, which weight-only int8 does not. It includes the head,
the largest single matmul of a decode step (gemma3-270m's 262k x 640): a tied head gets its own int8
copy and the input embedding stays float for the lookup, so memory falls less than with "int8" but
time falls more. No gradient passes, so training over it is refused: train over "int8" or float,
then serve the same adapter file over "int8-dynamic" (the fingerprint is the float weights').
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

import torch
from torch import nn

from adaptkit.core.errors import AdapterError

SCHEMES = ("int8", "nf4", "int8-dynamic")
# schemes that pass no gradient: serve adapters over them, train elsewhere
INFERENCE_ONLY = frozenset({"int8-dynamic"})
HELP = ("the backbone's frozen Linear weights in int8 (CPU: torchao; CUDA: bitsandbytes) or nf4 (bitsandbytes, "
        "CPU or CUDA; pip install 'adaptkit[quant]'); adapters stay in full precision and train over them (QLoRA). "
        "int8-dynamic (CPU, inference only): int8 weights, the output head included, times int8 activations, "
        "faster than float32; serve adapters trained over int8 or float")
# which library quantises, by (device type, scheme): torchao's int8 was measured the best on CPU
LIBRARY = {("cpu", "int8"): "torchao", ("cpu", "nf4"): "bitsandbytes",
           ("cuda", "int8"): "bitsandbytes", ("cuda", "nf4"): "bitsandbytes",
           ("cpu", "int8-dynamic"): "torch"}


def quantize_backbone(model: nn.Module, scheme: str) -> dict[str, Any]:
    """Quantise `model`'s Linear layers in place on the device it sits on; returns what was done
    (scheme, library and version, modules quantised), the record adapter files carry."""
    device = _device_of(model)
    if scheme not in SCHEMES:
        raise AdapterError(f"quantize={scheme!r} is not a quantisation adaptkit knows; use quantize='int8' "
                           "(CPU: torchao; CUDA: bitsandbytes), quantize='nf4' (bitsandbytes), "
                           "quantize='int8-dynamic' (CPU, inference only), or leave it None "
                           "(and pass dtype=torch.bfloat16 for a half-size float backbone)")
    library = LIBRARY.get((device.type, scheme))
    if library is None and scheme in INFERENCE_ONLY:
        raise AdapterError(f"quantize={scheme!r} runs on the CPU only (torch._int_mm); on {device.type} load the "
                           "backbone with quantize='int8' or 'nf4', or on device='cpu'")
    if library is None:
        raise AdapterError(f"quantize={scheme!r} is not available on a {device.type} device: adaptkit quantises "
                           "on the CPU and on CUDA; load the backbone there (device='cpu' or 'cuda')")
    heads = {id(m) for m in _output_projections(model)}
    # the inference scheme takes the head too (module docstring); the others leave it float
    skip = set() if scheme in INFERENCE_ONLY else heads
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and id(module) not in skip]
    if not targets:
        raise AdapterError(f"this {type(model).__name__} has no nn.Linear layer to quantise besides its output "
                           "projection (GPT-2 style Conv1D projections are not quantised); load it without quantize=")
    if library == "bitsandbytes":
        record = _bitsandbytes(model, targets, scheme, device)
    elif library == "torch":
        record = {**_int8_dynamic([module for _, module in targets]),
                  "head": any(id(module) in heads for _, module in targets)}
    else:
        record = _torchao_int8(model, {id(m) for _, m in targets})
    return {**record, "scheme": scheme, "modules": len(targets)}


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _output_projections(model: nn.Module) -> list[nn.Module]:
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return [head] if isinstance(head, nn.Module) else []


def _library_version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:  # a source checkout without metadata still quantises
        return "unknown"


def _torchao_int8(model: nn.Module, chosen: set[int]) -> dict[str, Any]:
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise AdapterError("quantize='int8' on CPU needs torchao: pip install 'adaptkit[quant]' "
                           "(or pip install torchao)") from None
    # in place: the modules stay the same objects (hooks and the role map keep pointing at them)
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, _name: id(module) in chosen)
    return {"library": "torchao", "version": _library_version("torchao"), "method": "int8 weight-only"}


def _int8_dynamic(modules: list[nn.Module]) -> dict[str, Any]:
    try:  # the weight's tensor plumbing comes from torchao (core/int8dynamic.py)
        from adaptkit.core.int8dynamic import Int8DynamicWeight
    except ImportError:
        raise AdapterError("quantize='int8-dynamic' needs torchao: pip install 'adaptkit[quant]' "
                           "(or pip install torchao)") from None
    for module in modules:
        # a new Parameter on the same module: a head tied to the input embedding is untied here, and the
        # embedding keeps its float weight for the lookup
        module.weight = nn.Parameter(Int8DynamicWeight.from_float(module.weight), requires_grad=False)
    return {"library": "torch", "version": torch.__version__.split("+")[0], "method":
            "int8 weights per output row x int8 activations per token (torch._int_mm), inference only"}


def _bitsandbytes(model: nn.Module, targets: list[tuple[str, nn.Module]], scheme: str,
                  device: torch.device) -> dict[str, Any]:
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise AdapterError(f"quantize={scheme!r} on {device.type} needs bitsandbytes: pip install 'adaptkit[quant]' "
                           "(or pip install bitsandbytes)") from None
    if device.type == "cpu" and _older_than(_library_version("bitsandbytes"), (0, 50)):
        raise AdapterError(f"quantize={scheme!r} on CPU needs bitsandbytes 0.50 or later (found "
                           f"{_library_version('bitsandbytes')}): pip install -U bitsandbytes")
    compute = next(model.parameters()).dtype
    for name, old in targets:
        weight = old.weight.data.cpu()  # bitsandbytes quantises a parameter as it moves from the CPU to the GPU
        if scheme == "nf4":  # the QLoRA recipe: NF4 storage, matmuls in the backbone's float dtype
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=compute, quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            # On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight for a fast kernel at the
            # first inference call, for good: that kernel has no backward, so an adapter trained after any
            # evaluation would silently get no gradient through the layer (and the repacking fails unless
            # in_features is a multiple of 64). Every layer keeps the plain path: dequantise, then matmul.
            new.support_avx512bf16_for_cpu = False
        else:
            new = bnb.nn.Linear8bitLt(old.in_features, old.out_features, bias=old.bias is not None,
                                      has_fp16_weights=False, threshold=6.0, device="meta")
            new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.data, requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new.to(device))
    method = "nf4 (4-bit NormalFloat)" if scheme == "nf4" else "LLM.int8"
    return {"library": "bitsandbytes", "version": _library_version("bitsandbytes"), "method": method}


def _older_than(found: str, wanted: tuple[int, ...]) -> bool:
    try:
        parts = tuple(int(p) for p in found.split(".")[:len(wanted)])
    except ValueError:  # "unknown" or a local build: let bitsandbytes itself decide
        return False
    return parts < wanted


def storage_bytes(model: nn.Module) -> int:
    """Bytes the backbone's parameters and buffers hold, counting a quantised weight's inner tensors
    (int8 data and scales) rather than the float size it reports, and the scales bitsandbytes keeps
    beside its weights (`quant_state`, `SCB`); shared tensors counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def add(tensor: torch.Tensor) -> None:
        nonlocal total
        flatten = getattr(type(tensor), "__tensor_flatten__", None)
        if flatten is not None and type(tensor) not in (torch.Tensor, nn.Parameter):
            names, _ = tensor.__tensor_flatten__()
            for inner in names:
                add(getattr(tensor, inner))
            return
        storage = tensor.untyped_storage()
        key = (storage.data_ptr(), storage.nbytes())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
        for side in _side_tensors(tensor):
            add(side)

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
    return total


def _side_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """What bitsandbytes keeps beside a quantised weight: Params4bit's quant state (block scales, code
    book, nested state) and Int8Params' row scales."""
    found = [t for t in (getattr(tensor, "SCB", None),) if isinstance(t, torch.Tensor)]
    states = [getattr(tensor, "quant_state", None)]
    while states:
        state = states.pop()
        if state is None or isinstance(state, torch.Tensor):
            continue
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif type(value).__name__ == "QuantState":
                states.append(value)
    return found

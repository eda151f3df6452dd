"""`quantize="int8-dynamic"` (core/int8dynamic.py): int8 weights × int8 activations, head included, inference only.

What is checked, on tiny Llama, Gemma3 (tied head) and Marian (encoder-decoder) backbones:
- the kernel is the exact integer product of the per-token and per-row int8 values, rescaled: every
  token's output is independent of the other rows, bit for bit;
- every Linear, the output head included, keeps its module and gets an int8 weight; a tied input embedding
  keeps its float weight;
- adapters stay float over the fast backbone: at every LoRA / AdaLoRA / DoRA site, output − the bare fast
  projection is exactly what the routed adapter adds (s·B A x; DoRA's rescaling), row by row, and a mixed
  batch of every family equals each row alone (float64, numerics.py's rounding bound);
- close to float32 + adapter, within a factor of the bare backbones' own difference (as tests/test_quantized.py),
  and the teacher-forced loss, which reads the head's weight directly, close to float32's;
- training (ak.train, TrainConfig, any forward that needs a gradient) and merging are refused with the fix;
  the command lines accept the scheme.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adaptkit as ak
from adaptkit.cli import build_parser
from adaptkit.core.errors import InferenceOnlyBackbone
from adaptkit.core.quantize import quantize_backbone, storage_bytes
from numerics import assert_close_to_rounding, depth_of, rounding_bound
from test_quantized import CONFIGS, logits, pair
from test_train import FAST, bare_loss, pairs, tiny_tokenizer
from tiny import tiny_batch, tiny_model, with_random_adapters

pytest.importorskip("torchao", reason="quantize='int8-dynamic' builds its weight on torchao's tensor base")
from adaptkit.core.int8dynamic import Int8DynamicWeight  # noqa: E402 — after the skip above

SCHEME = "int8-dynamic"
ARCHS = ["llama", "gemma3", "marian"]
FAMILIES = {**CONFIGS, "dora": lambda: ak.LoRA(r=4, use_dora=True, targets="all-linear")}
# fast + adapter vs float32 + adapter, relative to the logits, may be this many times the bare backbones' own
# relative difference. Over 12 seeds x {llama, gemma3} x 4 families (random adapters of std 0.2) the ratio ranged
# 0.33-4.0, the adapter's effect was >= 39x the bare difference: 10 sits 2.5x above the worst and cannot hide a
# dropped adapter. Not Marian: there a random prefix moves the logits only 2-3x the int8 activations' own error,
# too little to tell apart this way; the exact tests below cover it.
TOLERANCE_FACTOR = 10.0


def fast_bank(arch: str, families: list[str], seed: int = 3) -> ak.AdaptedModel:
    model = ak.AdaptedModel(tiny_model(arch), quantize=SCHEME)
    return with_random_adapters(model, {name: FAMILIES[name]() for name in families}, seed=seed, scale=0.3)


# -- the kernel ----------------------------------------------------------------------------------

def test_the_kernel_is_the_exact_integer_product_row_by_row():
    torch.manual_seed(0)
    layer = nn.Linear(48, 24)
    weight = Int8DynamicWeight.from_float(layer.weight)
    x = torch.randn(5, 3, 48) * torch.logspace(-3, 2, 5)[:, None, None]  # rows of very different sizes
    x[2, 1] = 0  # a padded position: its output is the bias
    out = F.linear(x, weight, layer.bias)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 24)
    # the reference in float64: int8 values of x (per token) and W (per row), their exact product, the scales
    flat = x.reshape(-1, 48).double()
    x_scale = flat.abs().amax(1, keepdim=True).clamp_min(torch.finfo(torch.float32).eps) / 127
    x_int = torch.round(flat / x_scale)
    assert x_int.abs().max() <= 127
    expected = (x_int @ weight.qdata.double().t()) * x_scale * weight.scale.double() + layer.bias.double()
    assert torch.allclose(out.reshape(-1, 24).double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[2, 1], layer.bias.detach())
    # an exact integer product and per-token scales: a row alone computes the same bits as in the batch
    for row in range(5):
        assert torch.equal(F.linear(x[row:row + 1], weight, layer.bias), out[row:row + 1])
    # the weight stands for its dequantised values, within half an int8 step of each row
    step = weight.scale[:, None]
    assert ((weight.dequantize() - layer.weight).abs() <= step / 2 + 1e-7).all()
    # a bfloat16 input gives a bfloat16 output (the scales work in float32)
    half = F.linear(x.to(torch.bfloat16), weight, layer.bias)
    assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()


# -- the backbone --------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_every_linear_and_the_head_become_int8_in_place(arch):
    float_model = tiny_model(arch)
    model = ak.AdaptedModel(tiny_model(arch), quantize=SCHEME)
    head = model.model.get_output_embeddings()
    linears = [m for m in model.model.modules() if type(m) is nn.Linear]
    assert head in linears and model.quantization["modules"] == len(linears)
    assert all(isinstance(m.weight, Int8DynamicWeight) for m in linears)
    assert {k: model.quantization[k] for k in ("scheme", "library", "head")} == {"scheme": SCHEME,
                                                                                 "library": "torch", "head": True}
    # the role map's modules are the model's own: hooks land on them
    assert {id(site.module) for site in model.arch.linears} <= {id(m) for m in linears}
    assert not any(p.requires_grad for p in model.model.parameters())
    embedding = model.model.get_input_embeddings().weight
    assert type(embedding) is nn.Parameter and torch.equal(embedding, float_model.get_input_embeddings().weight)
    if float_model.get_output_embeddings().weight is float_model.get_input_embeddings().weight:  # tied (gemma3, marian)
        # the head got its own int8 copy of the shared matrix; the lookup still reads the float one
        assert torch.allclose(head.weight.dequantize(), embedding, atol=embedding.abs().max().item() / 200)
    assert storage_bytes(model.model) < storage_bytes(float_model)
    assert model.backbone_record()["shapes_sha256"] == ak.AdaptedModel(float_model).backbone_record()["shapes_sha256"]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arch", ARCHS)
def test_each_low_rank_site_adds_exactly_its_adapters_update_row_by_row(arch):
    """At every LoRA / AdaLoRA / DoRA projection of a mixed batch: hooked output − the bare fast projection of
    the same input = what that row's adapter adds, computed here from its weights (float64)."""
    model = fast_bank(arch, ["lora", "adalora", "dora"])
    batch = tiny_batch(arch, batch=4)
    spec = ["lora", None, "adalora", "dora"]
    checked: list[str] = []

    def expected_delta(name: str, site, x: torch.Tensor, bare: torch.Tensor) -> torch.Tensor:
        adapter = model.get_adapter(name)
        update = dict(adapter.site_items()).get(site.name)
        if update is None:
            return torch.zeros_like(bare)
        if name == "lora":
            a, b, scale = update.low_rank_factors()
            return scale * (x @ a.t() @ b.t())
        if name == "adalora":
            return x @ update.delta_weight().t()
        # DoRA: m / ‖W + s·B A‖_c ⊙ (W x + s·B A x), with W the int8 weight's values and W x the fast output
        a, b, scale = update.low_rank_factors()
        weight = site.module.weight.dequantize().double()
        factor = update.lora_magnitude / torch.linalg.norm(weight + scale * (b @ a), dim=1)
        base = bare if site.module.bias is None else bare - site.module.bias
        return (factor - 1) * base + factor * scale * (x @ a.t() @ b.t())

    def check(site):
        def hook(module, args, output):
            x = args[0]
            bare = F.linear(x, module.weight, module.bias)  # no hooks: the fast projection alone
            for row, name in enumerate(spec):
                want = torch.zeros_like(bare[row]) if name is None else \
                    expected_delta(name, site, x[row:row + 1], bare[row:row + 1])[0]
                bound = rounding_bound(output, 1)  # the adapter's sum rounds at the output's scale
                diff = (output[row] - bare[row] - want).abs().max().item()
                assert diff <= bound, f"{arch} {site.name} row {row} ({name}): {diff:.3g} > {bound:.3g}"
            checked.append(site.name)
        return hook

    # registered after the adapters' hooks, so each sees the output they made
    handles = [site.module.register_forward_hook(check(site)) for site in model.arch.linears]
    try:
        with torch.no_grad():
            model(**batch, adapter=spec)
    finally:
        for handle in handles:
            handle.remove()
    assert len(checked) == len(model.arch.linears)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("arch", ARCHS)
def test_a_mixed_batch_of_every_family_equals_each_row_alone(arch):
    families = ["lora", "dora", "adalora", "prefix", "bottleneck"]
    model = fast_bank(arch, families)
    batch = tiny_batch(arch, batch=6)
    spec = [*families, None]
    depth = depth_of(model)
    with torch.no_grad():
        mixed = model(**batch, adapter=spec).logits
        bare = model(**batch).logits
        for row, name in enumerate(spec):
            alone = model(**{k: v[row:row + 1] for k, v in batch.items()}, adapter=name).logits
            assert_close_to_rounding(mixed[row:row + 1], alone, depth, f"{arch} row {row} {name}")
    bound = rounding_bound(bare, depth)
    assert all((mixed[r] - bare[r]).abs().max() > 1e3 * bound for r in range(5)), "each adapter acts"
    assert_close_to_rounding(mixed[5], bare[5], depth, "no adapter")


def test_a_mixed_generate_equals_each_row_generated_alone():
    families = ["lora", "prefix", "bottleneck", "adalora"]
    model = fast_bank("llama", families)
    batch = tiny_batch("llama", batch=5)
    spec = [*families, None]
    options = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, num_beams=1)
    mixed = model.generate(**batch, adapter=spec, **options)
    outputs = set()
    for row, name in enumerate(spec):
        alone = model.generate(**{k: v[row:row + 1] for k, v in batch.items()}, adapter=name, **options)
        assert torch.equal(mixed[row, :alone.shape[1]], alone[0]), (row, name)
        outputs.add(tuple(alone[0, -6:].tolist()))
    assert len(outputs) > 1, "the adapters change what is generated"


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_fast_plus_adapter_is_close_to_float32_plus_adapter(arch, method, tmp_path):
    fp, fast = pair(arch, method, tmp_path, scheme=SCHEME)  # a file written on float32, loaded on the fast backbone
    bare_fp, bare_fast = logits(fp, arch), logits(fast, arch)
    bare_error = ((bare_fast - bare_fp).norm() / bare_fp.norm()).item()
    assert bare_error > 0, "nothing was quantised"
    adapted_fp, adapted_fast = logits(fp, arch, "a"), logits(fast, arch, "a")
    error = ((adapted_fast - adapted_fp).norm() / adapted_fp.norm()).item()
    assert error <= TOLERANCE_FACTOR * bare_error, (error, bare_error)
    effect = ((adapted_fp - bare_fp).norm() / adapted_fp.norm()).item()
    assert effect > TOLERANCE_FACTOR * bare_error, "the tolerance would hide a missing adapter"


def test_composes_with_a_bfloat16_backbone():
    half = ak.AdaptedModel(tiny_model("gemma3").to(torch.bfloat16), quantize=SCHEME)
    with_random_adapters(half, {"lora": FAMILIES["lora"]()}, seed=0, scale=0.3)
    adapted, bare = logits(half, "gemma3", "lora"), logits(half, "gemma3")
    assert adapted.dtype == torch.bfloat16 and torch.isfinite(adapted).all()
    assert (adapted - bare).abs().max() > 1e-2 * bare.abs().max()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_the_teacher_forced_loss_reads_the_int8_head(arch):
    """evaluate() computes a decoder's loss from the head's weight in chunks (evaluation/loss.py): that weight
    is the int8 one here, and the loss stays close to float32's."""
    rows = pairs(8, 1)
    expected = bare_loss(ak.AdaptedModel(tiny_model(arch), tiny_tokenizer("decoder")), rows)
    loss = bare_loss(ak.AdaptedModel(tiny_model(arch), tiny_tokenizer("decoder"), quantize=SCHEME), rows)
    assert loss != expected and abs(loss - expected) < 0.01 * expected, (loss, expected)


# -- what it refuses -----------------------------------------------------------------------------

FIX = r"for inference only.*Train the adapter over quantize='int8' \(QLoRA-style\) or the float backbone"


def test_training_is_refused_naming_the_fix(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"), quantize=SCHEME)
    with pytest.raises(InferenceOnlyBackbone, match=FIX):
        ak.train(model, "toy", pairs(8, 0), None, max_steps=1, output_dir=str(tmp_path), **FAST)
    assert model.adapters == []
    with pytest.raises(InferenceOnlyBackbone, match=FIX):
        ak.TrainConfig(quantize=SCHEME)
    # any forward that would need a gradient through the int8 matmul fails instead of training nothing below it
    with_random_adapters(model, {"a": FAMILIES["lora"]()}, seed=0, scale=0.3)
    with pytest.raises(InferenceOnlyBackbone, match=FIX):
        model(**tiny_batch("llama"), adapter="a").logits.sum().backward()
    with torch.no_grad():
        assert torch.isfinite(model(**tiny_batch("llama"), adapter="a").logits).all()


def test_merging_is_refused_and_leaves_the_model_as_it_was(tmp_path):
    model = fast_bank("llama", ["lora"])
    before = logits(model, "llama", "lora")
    with pytest.raises(ak.AdapterError, match=r"cannot merge 'lora'.*quantised \(int8-dynamic, torch\)"):
        model.merge_adapter("lora")
    assert model.merged_adapter is None and torch.equal(logits(model, "llama", "lora"), before)


def test_unavailable_places_fail_clearly(monkeypatch):
    with pytest.raises(ak.AdapterError, match=r"'int8-dynamic' runs on the CPU only.*quantize='int8' or 'nf4'"):
        quantize_backbone(tiny_model("llama").to("meta"), SCHEME)
    with pytest.raises(ak.AdapterError, match=r"'int8' \(CPU: torchao.*'int8-dynamic' \(CPU, inference only\)"):
        ak.AdaptedModel(tiny_model("llama"), quantize="int4")
    # torchao missing: the module that builds the weight cannot import
    monkeypatch.delitem(sys.modules, "adaptkit.core.int8dynamic")
    monkeypatch.setitem(sys.modules, "torchao.utils", None)
    with pytest.raises(ak.AdapterError, match=r"'int8-dynamic' needs torchao: pip install 'adaptkit\[quant\]'"):
        quantize_backbone(tiny_model("llama"), SCHEME)


def test_gpt2_gets_its_head_quantised_and_keeps_its_conv1d_projections():
    model = ak.AdaptedModel(tiny_model("gpt2"), quantize=SCHEME)
    assert model.quantization["modules"] == 1 and model.quantization["head"]
    assert isinstance(model.model.get_output_embeddings().weight, Int8DynamicWeight)


# -- the command lines ---------------------------------------------------------------------------

def test_the_command_lines_take_the_scheme():
    parser = build_parser()
    for command in (["serve", "--backbone", "b", "--store", "s"], ["translate", "--input", "i", "--output", "o",
                                                                   "--backbone", "b", "--src", "en", "--tgt", "de"]):
        assert parser.parse_args([*command, "--quantize", SCHEME]).quantize == SCHEME

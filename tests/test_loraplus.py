"""LoRA+ (the trainer's loraplus_lr_ratio): peft's create_loraplus_optimizer grouping, B steps ratio× as far,
families without B refused; LoRA's gaussian init: peft's draw exactly, kept through save/load and peft
export/import; PiSSA-style inits refused with the reason."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import adaptkit as ak
from adaptkit.core.errors import AdapterError
from adaptkit.methods.lora import LoRAUpdate
from adaptkit.training.optimizer import param_groups
from adaptkit.training.trainer import TrainConfig, train
from test_train import FAST, pairs, tiny
from tiny import tiny_model

peft = pytest.importorskip("peft")
from peft.optimizers import create_loraplus_optimizer  # noqa: E402


def lr_of(groups: list[dict], adapter) -> dict[str, float]:
    """Our parameter name (module path + leaf) → its group's lr."""
    names = {id(p): n.removeprefix("sites.").replace(":", ".") for n, p in adapter.named_parameters()}
    return {names[id(p)]: g["lr"] for g in groups for p in g["params"]}


@pytest.mark.parametrize("use_dora", [False, True])
def test_groups_match_peft_create_loraplus_optimizer(use_dora):
    model = ak.AdaptedModel(tiny_model("llama"))
    adapter = model.add_adapter("a", ak.LoRA(r=4, targets="all-linear", use_dora=use_dora))
    cfg = TrainConfig(lr=1e-3, loraplus_lr_ratio=16.0, weight_decay=0.1)
    groups = param_groups(list(adapter.named_parameters()), cfg, adapter)
    ours = lr_of(groups, adapter)
    assert groups[0]["lr"] == 1e-3 and set(ours.values()) == {1e-3, 16e-3}
    assert all(g["weight_decay"] == (0.1 if all(p.dim() == 2 for p in g["params"]) else 0.0)
               for g in groups if g["params"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
            r=4, target_modules=[t.name for t in adapter.targets], use_dora=use_dora))
    optimizer = create_loraplus_optimizer(reference, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=16.0)
    names = {id(p): n for n, p in reference.named_parameters()}
    theirs = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)].removeprefix("base_model.model.")
            name = (name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude")
                    .replace(".default.weight", ""))
            theirs[name] = group["lr"]
    assert ours == theirs
    fast = {n for n, lr in ours.items() if lr > 1e-3}
    assert fast == {n for n in ours if n.endswith(".lora_B") or n.endswith(".lora_magnitude")}


def test_adalora_b_is_p_and_families_without_b_are_refused(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"))
    adapter = model.add_adapter("a", ak.AdaLoRA(init_r=4, target_r=2, total_steps=10))
    cfg = TrainConfig(lr=1e-3, loraplus_lr_ratio=4.0)
    lrs = lr_of(param_groups(list(adapter.named_parameters()), cfg, adapter), adapter)
    assert {n for n, lr in lrs.items() if lr == 4e-3} == {n for n in lrs if n.endswith(".P")}
    assert {n.rsplit(".", 1)[1] for n, lr in lrs.items() if lr == 1e-3} == {"Q", "Lambda"}
    for method in ("prefix", "bottleneck"):
        with pytest.raises(ValueError, match=f"the {method} family has none"):
            train(tiny("llama"), "p", pairs(8, 0), None, method=method, max_steps=1, loraplus_lr_ratio=4.0,
                  output_dir=str(tmp_path / method), **FAST)
    with pytest.raises(ValueError, match="full fine-tuning"):
        TrainConfig(full=True, loraplus_lr_ratio=4.0)
    with pytest.raises(ValueError, match="positive"):
        TrainConfig(loraplus_lr_ratio=0.0)


def test_one_step_moves_b_ratio_times_as_far(tmp_path):
    """Same seed, data and gradients: AdamW's first step is lr · m̂ / (√v̂ + ε), so B's step scales with its lr;
    A has no gradient at B = 0 and stays where it started in both runs."""
    data = pairs(16, 0)
    steps = {}
    for ratio in (None, 4.0):
        model = tiny("llama")
        train(model, "a", data, None, max_steps=1, schedule="constant", loraplus_lr_ratio=ratio,
              output_dir=str(tmp_path / str(ratio)), **FAST)
        steps[ratio] = {n: p.detach().clone() for n, p in model.get_adapter("a").named_parameters()}
    b_names = [n for n in steps[None] if n.endswith("lora_B")]
    assert b_names and all(steps[None][n].abs().sum() > 0 for n in b_names)  # B started at zero and moved
    for name, plain in steps[None].items():
        if name.endswith("lora_B"):
            torch.testing.assert_close(steps[4.0][name], 4.0 * plain, rtol=1e-5, atol=1e-9)
        else:
            torch.testing.assert_close(steps[4.0][name], plain, rtol=0, atol=0)


def test_gaussian_init_is_peft_draw_for_draw():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(
            r=4, target_modules=["q_proj"], init_lora_weights="gaussian"))
    layer = next(m for m in reference.modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    in_features, out_features = layer.in_features, layer.out_features
    for seed in (0, 1):
        torch.manual_seed(seed)
        layer.reset_lora_parameters("default", "gaussian")
        torch.manual_seed(seed)
        ours = LoRAUpdate(in_features, out_features, 4, 2.0, 0.0, "gaussian")
        assert torch.equal(ours.lora_A, layer.lora_A["default"].weight)
        assert torch.equal(ours.lora_B, torch.zeros(out_features, 4))
    torch.manual_seed(0)
    default = LoRAUpdate(in_features, out_features, 4, 2.0, 0.0)
    torch.manual_seed(0)
    layer.reset_lora_parameters("default", True)
    assert torch.equal(default.lora_A, layer.lora_A["default"].weight)


def test_gaussian_init_round_trips_through_file_and_peft(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"))
    model.add_adapter("g", ak.LoRA(r=4, init="gaussian"))
    model.add_adapter("d", ak.LoRA(r=4))
    assert "init" not in ak.LoRA().to_dict() and ak.LoRA(init="gaussian").to_dict()["init"] == "gaussian"
    fresh = ak.AdaptedModel(tiny_model("llama"))
    for name in ("g", "d"):
        fresh.load_adapter(model.save_adapter(name, tmp_path / f"{name}.safetensors"))
        assert fresh.get_adapter(name).config.init == {"g": "gaussian", "d": "default"}[name]
        out = ak.export_peft(model, name, tmp_path / f"peft_{name}")
        written = json.loads((out / "adapter_config.json").read_text())["init_lora_weights"]
        assert written == {"g": "gaussian", "d": True}[name]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), str(out))
        assert loaded.peft_config["default"].init_lora_weights == written
        back = ak.import_peft(out, fresh, name=f"{name}_back")
        assert fresh.get_adapter(back).config.init == {"g": "gaussian", "d": "default"}[name]


def test_residual_inits_are_refused_with_the_reason(tmp_path):
    for init in ("pissa", "pissa_niter_4", "olora", "corda", "loftq"):
        with pytest.raises(AdapterError, match="shared by many adapters"):
            ak.LoRA(init=init)
    with pytest.raises(AdapterError, match="default, gaussian"):
        ak.LoRA(init="uniform")
    model = ak.AdaptedModel(tiny_model("llama"))
    model.add_adapter("a", ak.LoRA(r=4))
    out = ak.export_peft(model, "a", tmp_path / "pissa")
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    with pytest.raises(AdapterError, match="residual"):
        ak.import_peft(out, model, name="p")

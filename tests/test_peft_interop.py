"""peft parity and peft directories: the same weights give peft's logits, exports load in peft and
name the backbone's Hub id, peft's own saves import here (prefixes exactly where the docs say, with a
warning where not), and pickles are refused."""

import json
import warnings

import pytest
import torch

import adaptkit as ak
from tiny import tiny_batch, tiny_model

peft = pytest.importorskip("peft")
from transformers.pytorch_utils import Conv1D  # noqa: E402

from adaptkit import zoo  # noqa: E402
from adaptkit.methods.prefix import PeftImportWarning  # noqa: E402

ARCHS = ["llama", "gpt2", "bart", "t5"]
TASK = {"llama": "CAUSAL_LM", "gpt2": "CAUSAL_LM", "bart": "SEQ_2_SEQ_LM", "t5": "SEQ_2_SEQ_LM"}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's fan_in_fan_out and deprecation notices
        yield


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def peft_layers(peft_model, paths):
    return {n: m for n, m in peft_model.base_model.model.named_modules() if n in paths}


def conv1d(adapter) -> bool:
    return any(isinstance(t.module, Conv1D) for t in adapter.targets)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_parity_export_and_import(arch, tmp_path):
    batch = tiny_batch(arch)
    model = ak.AdaptedModel(tiny_model(arch))
    adapter = model.add_adapter("a", ak.LoRA(r=4, alpha=8, targets="all-linear"))
    for p in model.adapter_parameters("a"):
        torch.nn.init.normal_(p, std=0.3)
    paths = [t.name for t in adapter.targets]
    reference = peft.get_peft_model(tiny_model(arch), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=paths, fan_in_fan_out=conv1d(adapter), task_type=TASK[arch])).eval()
    layers = peft_layers(reference, paths)
    with torch.no_grad():
        for path, update in adapter.site_items():
            layers[path].lora_A["default"].weight.copy_(update.lora_A)
            layers[path].lora_B["default"].weight.copy_(update.lora_B)
    ours = logits(model, batch, adapter="a")
    assert not torch.allclose(ours, logits(model, batch, adapter=None), atol=1e-3)
    torch.testing.assert_close(ours, logits(reference, batch), atol=1e-5, rtol=0)

    out = ak.export_peft(model, "a", tmp_path / "export")
    assert json.loads((out / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
    torch.testing.assert_close(logits(loaded, batch), ours, atol=1e-5, rtol=0)

    with torch.no_grad():  # new weights on the peft side, saved by peft itself
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(std=0.3)
    reference.save_pretrained(str(tmp_path / "from_peft"))
    name = ak.import_peft(tmp_path / "from_peft", model, name="imported")
    assert name == "imported" and model.get_adapter(name).method == "lora"
    torch.testing.assert_close(logits(model, batch, adapter=name), logits(reference, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_parity_export_and_import(arch, tmp_path):
    batch = tiny_batch(arch)
    model = ak.AdaptedModel(tiny_model(arch))
    config = ak.AdaLoRA(init_r=3, target_r=1, total_steps=4, tinit=1, tfinal=1, alpha=6.0, targets="attention")
    adapter = model.add_adapter("a", config)
    for p in model.adapter_parameters("a"):
        torch.nn.init.normal_(p, std=0.3)
    paths = [t.name for t in adapter.targets]
    reference = peft.get_peft_model(tiny_model(arch), peft.AdaLoraConfig(
        init_r=3, target_r=1, total_step=4, tinit=1, tfinal=1, lora_alpha=6.0, target_modules=paths,
        fan_in_fan_out=conv1d(adapter), task_type=TASK[arch])).eval()
    layers = peft_layers(reference, paths)

    def copy_to_peft():
        with torch.no_grad():
            for path, update in adapter.site_items():
                layers[path].lora_A["default"].copy_(update.Q)
                layers[path].lora_E["default"].copy_(update.Lambda[:, None])
                layers[path].lora_B["default"].copy_(update.P)

    copy_to_peft()
    torch.testing.assert_close(logits(model, batch, adapter="a"), logits(reference, batch), atol=1e-5, rtol=0)

    # run the whole budget schedule, so the export carries a real per-module rank pattern
    optimizer = torch.optim.SGD(model.adapter_parameters("a"), lr=0.05)
    target = torch.randn_like(logits(model, batch))
    for step in range(1, 5):
        (model(**batch, adapter="a").logits - target).pow(2).mean().backward()
        optimizer.step()
        adapter.on_step_end(step)
        optimizer.zero_grad()
    assert sum(adapter.ranks().values()) == len(paths)
    ours = logits(model, batch, adapter="a")
    copy_to_peft()  # masked Λ are zero: the full-rank peft model computes the pruned adapter
    torch.testing.assert_close(ours, logits(reference, batch), atol=1e-5, rtol=0)

    out = ak.export_peft(model, "a", tmp_path / "export")
    exported = json.loads((out / "adapter_config.json").read_text())
    assert exported["peft_type"] == "ADALORA"
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in exported["rank_pattern"].items()} == adapter.ranks()
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), str(out)).eval()
    torch.testing.assert_close(logits(loaded, batch), ours, atol=1e-5, rtol=0)

    # peft's own save of a pruned adapter (rank_pattern set by peft's allocator format)
    rank_pattern = {}
    with torch.no_grad():
        for i, (path, layer) in enumerate(layers.items()):
            keep = [j != i % 3 for j in range(3)]
            layer.lora_E["default"].masked_fill_(~torch.tensor(keep)[:, None], 0.0)
            rank_pattern[f"{path}.lora_E.default"] = keep
    reference.peft_config["default"].rank_pattern = rank_pattern
    reference.save_pretrained(str(tmp_path / "from_peft"))
    name = ak.import_peft(tmp_path / "from_peft", model)
    assert name == "from_peft" and set(model.get_adapter(name).ranks().values()) == {2}
    torch.testing.assert_close(logits(model, batch, adapter=name), logits(reference, batch), atol=1e-5, rtol=0)


def peft_prefix(arch: str, length: int, where) -> peft.PeftModel:
    trained = peft.get_peft_model(tiny_model(arch), peft.PrefixTuningConfig(
        num_virtual_tokens=length, task_type=TASK.get(arch, "CAUSAL_LM")))
    trained.save_pretrained(str(where))
    return peft.PeftModel.from_pretrained(tiny_model(arch), str(where)).eval()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefix_tuning_import_matches_peft(arch, tmp_path):
    """peft's prefix sits in the KV cache, so the real tokens' positions start after it: pass them."""
    batch = tiny_batch(arch)
    length = 3
    reference = peft_prefix(arch, length, tmp_path / "prefix")
    model = ak.AdaptedModel(tiny_model(arch))
    with pytest.warns(PeftImportWarning, match=r"only in a forward given position_ids = arange\(3, 3 \+ sequence "
                      r"length\), not in generate"):
        name = ak.import_peft(tmp_path / "prefix", model)
    assert model.get_adapter(name).method == "prefix"
    rows, seq = batch["input_ids"].shape
    positions = torch.arange(length, length + seq).expand(rows, -1)
    ours = logits(model, batch, adapter=name, position_ids=positions)
    assert not torch.allclose(ours, logits(model, batch, adapter=None, position_ids=positions), atol=1e-3)
    torch.testing.assert_close(ours, logits(reference, batch), atol=1e-5, rtol=0)


def test_prefix_import_is_exact_on_sliding_window_layers_only_within_the_window(tmp_path):
    """Gemma 3 (window 4 on two of three layers), prefix of 2: exact while 2 + length <= 4, different past it."""
    reference = peft_prefix("gemma3", 2, tmp_path / "prefix")
    model = ak.AdaptedModel(tiny_model("gemma3"))
    with pytest.warns(PeftImportWarning, match=r"only while 2 \+ sequence length <= 4 \(the sliding window"):
        name = ak.import_peft(tmp_path / "prefix", model)
    for seq, exact in ((2, True), (3, False)):
        ids = torch.randint(3, 90, (2, seq), generator=torch.Generator().manual_seed(seq))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        ours = logits(model, batch, adapter=name, position_ids=torch.arange(2, 2 + seq).expand(2, -1))
        theirs = logits(reference, batch)
        if exact:
            torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
        else:
            assert (ours - theirs).abs().max() > 1e-2, "past the window peft's layers stop seeing the prefix"


def test_prefix_tuning_import_on_seq2seq_follows_peft_layout(tmp_path):
    """peft reaches only the decoder self-attention of a seq2seq model; each gets what peft's cache holds."""
    trained = peft.get_peft_model(tiny_model("bart"), peft.PrefixTuningConfig(
        num_virtual_tokens=3, task_type="SEQ_2_SEQ_LM"))
    trained.save_pretrained(str(tmp_path / "prefix"))
    reference = peft.PeftModel.from_pretrained(tiny_model("bart"), str(tmp_path / "prefix")).eval()
    cache = reference.get_prompt(batch_size=1)
    assert len(cache.cross_attention_cache.layers) == 0
    model = ak.AdaptedModel(tiny_model("bart"))
    with pytest.warns(PeftImportWarning, match="seq2seq bart model does not give peft's outputs"):
        adapter = model.get_adapter(ak.import_peft(tmp_path / "prefix", model))
    sites = dict(adapter.site_items())
    assert sorted(sites) == [f"model.decoder.layers.{i}.self_attn" for i in range(2)]
    for i, layer in enumerate(cache.self_attention_cache.layers):
        keys, values = sites[f"model.decoder.layers.{i}.self_attn"]()
        assert torch.equal(keys, layer.keys[0]) and torch.equal(values, layer.values[0])


def test_pickled_peft_adapter_is_refused(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ak.AdapterError, match="pickle"):
        ak.import_peft(tmp_path, model)
    assert model.adapters == []


def test_peft_adapter_outside_our_targets_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    model = ak.AdaptedModel(tiny_model("llama"))
    model.add_adapter("a", ak.LoRA(r=2, targets=("q",)))
    out = ak.export_peft(model, "a", tmp_path)
    tensors = load_file(out / "adapter_model.safetensors")
    moved = {k.replace("model.layers.0.self_attn.q_proj", "lm_head"): v for k, v in tensors.items()}
    save_file(moved, out / "adapter_model.safetensors")
    with pytest.raises(ak.AdapterError, match=r"does not adapt on this backbone: \['lm_head'\]"):
        ak.import_peft(out, model, name="b")
    assert model.adapters == ["a"]


def exported_base(model: ak.AdaptedModel, out) -> str | None:
    model.add_adapter("a", ak.LoRA(r=2, targets=("q",)))
    return json.loads((ak.export_peft(model, "a", out) / "adapter_config.json").read_text())["base_model_name_or_path"]


def test_export_names_the_hub_id_of_a_zoo_backbone(tmp_path, monkeypatch):
    """vLLM / LoRAX / peft match base_model_name_or_path against Hub ids: a zoo backbone gives its entry's."""
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "cache"))
    tiny_model("llama").save_pretrained(zoo.model_dir("tiny-llama"))
    (zoo.model_dir("tiny-llama") / zoo.COMPLETE_MARKER).write_text(json.dumps({"hub_id": "org/Tiny-Llama"}))
    monkeypatch.setitem(zoo.ZOO, "tiny-llama", zoo.ZooEntry(
        name="tiny-llama", hub_id="org/Tiny-Llama", what="test", architecture="LlamaForCausalLM", params="0",
        family="decoder", licence="-", licence_note="-", how="-", build=lambda work, out: None))
    assert exported_base(ak.load("tiny-llama"), tmp_path / "by-name") == "org/Tiny-Llama"
    assert exported_base(ak.load(zoo.model_dir("tiny-llama")), tmp_path / "by-dir") == "org/Tiny-Llama"


def test_export_names_a_local_directory_or_nothing(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "backbone")
    assert exported_base(ak.load(tmp_path / "backbone"), tmp_path / "dir") == str(tmp_path / "backbone")
    assert exported_base(ak.AdaptedModel(tiny_model("llama")), tmp_path / "none") is None  # not "LlamaForCausalLM"


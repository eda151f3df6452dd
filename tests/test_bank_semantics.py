"""The bank's semantics: eval mode by default, removal never races a call in flight, per-row lists
match the input batch, names never take the file-path branch, adapters that adapt nothing are
refused, and a backbone without tokenizer files still loads."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
import torch

import adaptkit as ak
from adaptkit.evaluation import evaluate
from adaptkit.tasks.translate import Translator
from adaptkit.training.trainer import train
from test_train import FAST, pairs, tiny_tokenizer
from tiny import tiny_batch, tiny_model

WAIT = 30.0  # seconds a test thread waits for an event that the test itself sets: only a hang reaches it


def randomized(model: ak.AdaptedModel, name: str, config, seed: int) -> None:
    """A new adapter with random (non-identity) weights, so routing to it visibly changes outputs."""
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


# -- bug 1: a loaded model and its new adapters are in eval mode: dropout is off at inference ----------

def test_new_model_is_in_eval_mode_and_new_adapters_follow_it(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"))
    assert not model.training
    randomized(model, "drop", ak.LoRA(r=4, dropout=0.5, targets="all-linear"), seed=0)
    batch = tiny_batch("llama")
    first = model(**batch, adapter="drop").logits
    assert torch.equal(model(**batch, adapter="drop").logits, first), "dropout ran at inference"
    assert not torch.equal(first, model(**batch).logits)
    path = model.save_adapter("drop", tmp_path / "drop.safetensors")

    fresh = ak.AdaptedModel(tiny_model("llama"))
    fresh.load_adapter(path)
    assert torch.equal(fresh(**batch, adapter="drop").logits, first)
    assert torch.equal(fresh(**batch, adapter="drop").logits, first)

    fresh.train()
    trained = fresh.add_adapter("t", ak.LoRA(r=2, dropout=0.5))
    assert trained.training and all(m.training for m in trained.modules())
    fresh.eval()
    assert not fresh.add_adapter("e", ak.LoRA(r=2, dropout=0.5)).training
    assert not fresh.get_adapter("t").training


def test_trainer_trains_in_train_mode_and_restores_the_mode(tmp_path):
    seen: list[bool] = []
    for start_training in (False, True):
        model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"))
        model.train(start_training)
        handle = model.model.register_forward_hook(
            lambda module, args, out: seen.append(module.training) if torch.is_grad_enabled() else None)
        train(model, adapter="a", train=pairs(16, 0), max_steps=2, dropout=0.1,
              output_dir=str(tmp_path / str(start_training)), **FAST)
        handle.remove()
        assert model.training == start_training
        assert all(m.training == start_training for m in model.get_adapter("a").modules())
    assert seen and all(seen), "training steps must run in train mode"


# -- bug 4: removal waits for calls in flight; new calls for the adapter wait and then find it gone -----

class Gate:
    """A forward hook that holds the first call on the backbone until the test opens it."""

    def __init__(self, module: torch.nn.Module):
        self.entered = threading.Event()
        self.open = threading.Event()
        self.handle = module.register_forward_pre_hook(self._hold)

    def _hold(self, module, args):
        self.entered.set()
        assert self.open.wait(WAIT)


def _in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def body():
        try:
            result["value"] = fn(*args, **kwargs)
        except Exception as error:  # handed to the test thread, which asserts on it
            result["error"] = error

    thread = threading.Thread(target=body, name=f"test-{getattr(fn, '__name__', 'forward')}", daemon=True)
    thread.start()
    return thread, result


def _until(condition) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def generating():
    """A model with adapter "a", its reference output, and a gated generate of it running in a thread."""
    model = ak.AdaptedModel(tiny_model("llama"))
    randomized(model, "a", ak.LoRA(r=4, targets="all-linear"), seed=0)
    batch = tiny_batch("llama")
    options = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    reference = model.generate(**batch, adapter="a", **options)
    assert not torch.equal(reference, model.generate(**batch, adapter=None, **options))
    gate = Gate(model.model.model.layers[1])
    call, result = _in_thread(model.generate, **batch, adapter="a", **options)
    assert gate.entered.wait(WAIT)
    yield model, batch, reference, gate, call, result
    gate.open.set()
    gate.handle.remove()
    call.join(WAIT)


def test_remove_waits_for_the_call_in_flight(generating):
    model, batch, reference, gate, call, result = generating
    removal, removed = _in_thread(model.remove_adapter, "a")
    removal.join(0.3)
    assert removal.is_alive() and "a" in model.adapters, "removal must wait for the generate using it"
    _until(lambda: "a" in model._removing)  # the removal is waiting now, not still starting
    late, late_result = _in_thread(model, **batch, adapter="a")  # a new call while removal waits
    late.join(0.3)
    assert late.is_alive(), "a new call for an adapter being removed must wait for the removal"
    gate.open.set()
    call.join(WAIT)
    removal.join(WAIT)
    late.join(WAIT)
    assert "error" not in result and torch.equal(result["value"], reference), "a half-adapted output"
    assert "error" not in removed and model.adapters == []
    assert isinstance(late_result.get("error"), ak.AdapterError)
    assert "no adapter named 'a'" in str(late_result["error"])


def test_remove_with_timeout_refuses_and_names_the_calls_in_flight(generating):
    model, batch, reference, gate, call, result = generating
    with pytest.raises(ak.AdapterError, match=r"'a' is in use by 1 call.*test-generate"):
        model.remove_adapter("a", timeout=0.2)
    assert model.adapters == ["a"]
    gate.open.set()
    call.join(WAIT)
    assert torch.equal(result["value"], reference)
    model.remove_adapter("a", timeout=0.2)  # nothing in flight any more
    assert model.adapters == []


def test_remove_from_inside_a_call_using_it_is_refused_not_deadlocked():
    model = ak.AdaptedModel(tiny_model("llama"))
    randomized(model, "a", ak.LoRA(r=2), seed=0)
    with model.using("a"), pytest.raises(ak.AdapterError, match="this thread"):
        model.remove_adapter("a")
    model.remove_adapter("a")
    assert model.adapters == []


# -- bug 8: a per-row list has one entry per input row; only generate's own expansion repeats rows -------

@pytest.mark.parametrize("arch", ["llama", "marian"])
def test_per_row_list_must_match_the_input_batch(arch):
    model = ak.AdaptedModel(tiny_model(arch))
    for i, name in enumerate("bc"):
        randomized(model, name, ak.LoRA(r=2), seed=i)
    batch = tiny_batch(arch, batch=4)
    message = r"2 entries.*4 rows"
    with pytest.raises(ak.AdapterError, match=message):
        model(**batch, adapter=["b", "c"])
    with pytest.raises(ak.AdapterError, match=message), model.using(["b", "c"]):
        model(**batch)
    embeds = {k: v for k, v in batch.items() if k != "input_ids"}
    embeds["inputs_embeds"] = model.model.get_input_embeddings()(batch["input_ids"])
    with pytest.raises(ak.AdapterError, match=message):
        model(**embeds, adapter=["b", "c"])
    source = {k: v for k, v in batch.items() if k != "decoder_input_ids"}
    with pytest.raises(ak.AdapterError, match=message):
        model.generate(**source, adapter=["b", "c"], max_new_tokens=3, pad_token_id=0)


@pytest.mark.parametrize("arch", ["llama", "marian"])
def test_generate_expands_a_matching_list_for_beams_and_return_sequences(arch):
    model = ak.AdaptedModel(tiny_model(arch))
    for i, name in enumerate("bc"):
        randomized(model, name, ak.LoRA(r=2), seed=i)
    batch = {k: v for k, v in tiny_batch(arch, batch=2).items() if k != "decoder_input_ids"}
    options = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    mixed = model.generate(**batch, adapter=["b", "c"], **options)
    for row, name in enumerate("bc"):
        alone = model.generate(**{k: v[row:row + 1] for k, v in batch.items()}, adapter=name, **options)
        width = alone.shape[1]
        assert torch.equal(mixed[2 * row:2 * row + 2, :width], alone)


# -- bug 9: names are resolved by the store, never as file paths --------------------------------------

@pytest.fixture
def stored(tmp_path):
    """A model with a store holding "good", and a valid adapter file just outside the store."""
    model = ak.AdaptedModel(tiny_model("llama"), store=tmp_path / "store")
    randomized(model, "good", ak.LoRA(r=2), seed=0)
    model.save_adapter("good")
    outside = model.save_adapter("good", tmp_path / "outside.safetensors")
    model.remove_adapter("good")
    return model, outside


def test_store_names_never_take_the_path_branch(stored, tmp_path):
    model, outside = stored
    batch = tiny_batch("llama")
    for name in [str(outside), "../outside.safetensors", "../outside", "/etc/x.safetensors", "store/../outside"]:
        with pytest.raises(ak.AdapterError):
            model.load_from_store(name)
        with pytest.raises(ak.AdapterError, match="no adapter named"):
            model(**batch, adapter=name)
        with pytest.raises(ak.AdapterError, match="no adapter named"):
            model(**batch, adapter=[name, None, None, None])
        assert model.adapters == []
    assert model.load_from_store("good") == "good"
    assert model.adapters == ["good"]


def test_load_adapter_takes_only_explicit_file_paths(stored):
    model, outside = stored
    with pytest.raises(ak.AdapterError, match=re.escape("load_from_store('good')")):
        model.load_adapter("good")  # a store name: ambiguous with a path, so refused with the fix
    assert model.adapters == []
    assert model.load_adapter(outside, name="mine") == "mine"  # a path is the caller's to choose


# -- bug 10: an adapter that matches no module of the backbone is refused ----------------------------

@pytest.mark.parametrize(("arch", "config"), [
    ("llama", ak.LoRA(targets=[])),
    ("llama", ak.AdaLoRA(targets=())),
    ("marian", ak.LoRA(targets=("ffn_gate",))),
    ("marian", ak.AdaLoRA(targets=("ffn_gate",))),
])
def test_adapter_that_adapts_nothing_is_refused(arch, config):
    model = ak.AdaptedModel(tiny_model(arch))
    with pytest.raises(ak.AdapterError, match=r"adapts no module.*targets.*roles.*ffn_in") as error:
        model.add_adapter("empty", config)
    assert f"'targets': {config.targets!r}" in str(error.value)
    assert model.adapters == []


# -- bug 13: a model directory without tokenizer files loads, and what needs a tokenizer says so ------

def test_backbone_without_tokenizer_files_loads(tmp_path):
    backbone = tiny_model("marian")
    backbone.save_pretrained(tmp_path)  # the model only: no tokenizer files
    model = ak.load(tmp_path)
    assert model.tokenizer is None and not model.training
    batch = tiny_batch("marian")
    torch.testing.assert_close(model(**batch).logits, backbone(**batch).logits, atol=0, rtol=0)
    message = "no tokenizer.*model.tokenizer ="
    with pytest.raises(ak.AdapterError, match=message):
        Translator(model)
    with pytest.raises(ak.AdapterError, match=message):
        evaluate(model, pairs(4, 0))
    with pytest.raises(ak.AdapterError, match=message):
        train(model, adapter="a", train=pairs(8, 0), max_steps=1, output_dir=str(tmp_path / "run"), **FAST)


def test_local_directory_with_tokenizer_still_loads_it(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    tiny_tokenizer("decoder").save_pretrained(tmp_path)
    model = ak.load(Path(tmp_path))
    assert model.tokenizer is not None and model.tokenizer("a1 b2")["input_ids"] == [1, 5, 36]

"""Activation checkpointing under routed adapters (`enable_activation_checkpointing`, `ak.train(...,
activation_checkpointing=True)`).

The backward pass recomputes each layer's forward. Routing lives in a context variable of the call, and the
recomputation may run where that variable is not set: after the call returned, or in another thread (on GPU,
autograd's device threads run the backward). The gradients must still be those of the adapters the call
routed to — checked here with the backward run in a fresh thread, which sees no routing of its own.
"""

from __future__ import annotations

import contextlib
import threading

import pytest
import torch
from torch.utils.checkpoint import CheckpointError, checkpoint

import adaptkit as ak
from numerics import assert_close_to_rounding, depth_of
from test_bank_semantics import randomized
from test_quantized import CONFIGS
from test_train import FAST, pairs, tiny_tokenizer
from tiny import tiny_batch, tiny_model


def adapter_gradients(model: ak.AdaptedModel, arch: str, adapter: list[str | None]) -> torch.Tensor:
    """Gradients of adapter "a"'s parameters for one training-mode loss, its backward run in a new thread."""
    batch = tiny_batch(arch)
    if "decoder_input_ids" in batch:  # seq2seq: the decoder's tokens are the targets
        labels = batch.pop("decoder_input_ids")
    else:  # decoders: next-token loss on the real positions
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(0)
    loss = model(**batch, labels=labels, adapter=adapter).loss
    failed: list[BaseException] = []

    def backward() -> None:
        try:
            loss.backward()
        except BaseException as error:  # noqa: BLE001 — handed to the test's thread below
            failed.append(error)

    worker = threading.Thread(target=backward)
    worker.start()
    worker.join()
    model.eval()
    if failed:
        raise failed[0]
    # a parameter the backward never reached has no gradient: zero, as far as the comparison goes
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                      for p in model.adapter_parameters("a")])


@pytest.mark.parametrize("method", sorted(CONFIGS))
@pytest.mark.parametrize("arch", ["llama", "gemma3", "marian"])
def test_gradients_with_checkpointing_equal_those_without(arch, method, float64):
    model = ak.AdaptedModel(tiny_model(arch))
    randomized(model, "a", CONFIGS[method](), seed=0)
    randomized(model, "b", CONFIGS["lora"](), seed=1)
    rows = tiny_batch(arch)["input_ids"].shape[0]
    routing = ["a", "b", None, "a"][:rows]  # per row, so routing matters in every layer
    expected = adapter_gradients(model, arch, routing)
    assert expected.abs().max() > 0
    model.enable_activation_checkpointing()
    try:
        actual = adapter_gradients(model, arch, routing)
        assert_close_to_rounding(actual, expected, 2 * depth_of(model), f"{arch}/{method}")
        # the same with torch's plain checkpointing: the recomputation in the new thread sees no routing, and
        # either torch notices (it saved other tensors than the forward did) or the gradients are wrong
        model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        try:
            unrouted = adapter_gradients(model, arch, routing)
            assert (unrouted - expected).abs().max() > 1e-3 * expected.abs().max(), "the test cannot tell"
        except CheckpointError:
            pass
    finally:
        model.disable_activation_checkpointing()
    assert not any(getattr(m, "gradient_checkpointing", False) for m in model.model.modules())


def test_training_with_checkpointing_follows_the_same_losses(tmp_path, float64):
    losses, layer_calls = [], []
    for flag in (False, True):
        model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"))
        calls: list[int] = []
        # a module inside the layer: the layer's own hooks run outside the checkpointed call
        model.model.model.layers[0].mlp.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        summary = ak.train(model, "toy", pairs(32, 0), None, max_steps=4, activation_checkpointing=flag,
                           output_dir=str(tmp_path / str(flag)), **FAST)
        losses.append(summary["train_loss"])
        layer_calls.append(len(calls))
        assert not any(getattr(m, "gradient_checkpointing", False) for m in model.model.modules())
    assert layer_calls[1] == 2 * layer_calls[0] > 0  # checkpointed: every layer runs again in the backward
    plain, checkpointed = losses
    # float64, the same computation with the layers' forward run twice: rounding only
    assert checkpointed == pytest.approx(plain, rel=1e-9)


def test_torch_checkpoint_calls_context_fn_in_the_forward():
    """What recompute_under_this_routing rests on: torch calls `context_fn` as the checkpointed forward runs
    (where the call's routing is current), and enters its second context around the recomputation."""
    seen = []

    def context_fn():
        seen.append("forward")
        return contextlib.nullcontext(), _Recorded(seen)

    x = torch.ones(3, requires_grad=True)
    y = checkpoint(lambda t: (t * 2).sin(), x, use_reentrant=False, context_fn=context_fn)
    assert seen == ["forward"]
    y.sum().backward()
    assert seen == ["forward", "recompute"]


class _Recorded:
    def __init__(self, seen: list[str]):
        self.seen = seen

    def __enter__(self):
        self.seen.append("recompute")

    def __exit__(self, *exc):
        return False


def test_train_makes_transformers_own_checkpointing_routing_aware(tmp_path, float64):
    """A backbone that comes with plain `activation_checkpointing_enable()` trains as one without it, and keeps
    checkpointing on afterwards."""
    losses = []
    for plain_checkpointing in (False, True):
        model = ak.AdaptedModel(tiny_model("llama"), tiny_tokenizer("decoder"))
        if plain_checkpointing:
            model.model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        losses.append(ak.train(model, "toy", pairs(32, 0), None, max_steps=4,
                               output_dir=str(tmp_path / str(plain_checkpointing)), **FAST)["train_loss"])
        assert model.model.is_activation_checkpointing == plain_checkpointing
    assert losses[1] == pytest.approx(losses[0], rel=1e-9)

"""The fast paths compute what the plain paths compute.

Gathered per-row LoRA (one batched matmul pair over rows, methods/lora.py) against the per-adapter
loop and against each row run alone: forward, greedy and beam generate, on Llama, GPT-2 (Conv1D)
and BART, with mixed ranks, scalings, stacks and bare rows.

Tolerance, float32: the two paths sum the same products in another order (rank padded with
zeros, the scale folded into B before the product instead of after it), so they differ by
rounding only. Each rounding is at most eps = 2^-23 relative to the values at hand; carried
through L layers and the head, the difference in the logits stays within
    F32_BOUND(logits) = 64 · eps · max|logits| · L
Measured over these cases: <= 27 eps · max|logits| (L = 2–4), 5–13× below the bound; an adapter
applied to the wrong row moves the logits by > 10^4 eps · max|logits| (asserted below).
"""

from __future__ import annotations

import math

import pytest
import torch

import adaptkit as ak
from adaptkit.methods import lora as lora_module
from tiny import tiny_batch, tiny_model, with_random_adapters

EPS32 = torch.finfo(torch.float32).eps


def f32_bound(reference: torch.Tensor, layers: int) -> float:
    return 64 * EPS32 * reference.abs().max().item() * layers


def lora_bank(arch: str) -> ak.AdaptedModel:
    """Three LoRA adapters with different ranks, alphas (one rsLoRA) and targets, random weights."""
    model = ak.AdaptedModel(tiny_model(arch))
    configs = {
        "r2": ak.LoRA(r=2, alpha=3.0, targets="all-linear"),
        "r4": ak.LoRA(r=4, alpha=16.0, targets="attention"),
        "r8": ak.LoRA(r=8, alpha=4.0, targets="all-linear", use_rslora=True),
    }
    return with_random_adapters(model, configs, seed=5, scale=0.3)


SPEC = ["r2", None, ("r4", "r8"), "r8", "r4"]


@pytest.fixture
def per_adapter_loop(monkeypatch):
    """Force the per-adapter loop, the path the gathered one must reproduce."""
    def use_loop():
        monkeypatch.setattr(lora_module, "GATHER_MIN_ADAPTERS", 10**9)
    return use_loop


@pytest.fixture
def gathered_calls(monkeypatch):
    """Counts how often the gathered path ran, so a test cannot pass by never taking it."""
    calls = []
    original = lora_module.GatheredUpdates.apply

    def counting(self, x, output):
        calls.append(x.shape[0])
        return original(self, x, output)

    monkeypatch.setattr(lora_module.GatheredUpdates, "apply", counting)
    return calls


def rows_alone(model, batch, spec, **kwargs):
    return [model(**{k: v[i:i + 1] for k, v in batch.items()}, adapter=a, **kwargs) for i, a in enumerate(spec)]


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
def test_gathered_forward_equals_loop_and_rows_alone(arch, per_adapter_loop, gathered_calls):
    model = lora_bank(arch)
    batch = tiny_batch(arch, batch=len(SPEC))
    layers = len(model.arch.layers)
    with torch.no_grad():
        gathered = model(**batch, adapter=SPEC).logits
        assert gathered_calls, "the gathered path did not run"
        alone = [out.logits for out in rows_alone(model, batch, SPEC)]
        bare = model(**batch, adapter=None).logits
        per_adapter_loop()
        looped = model(**batch, adapter=SPEC).logits
    bound = f32_bound(looped, layers)
    assert (gathered - looped).abs().max().item() <= bound
    for row, expected in enumerate(alone):
        assert (gathered[row:row + 1] - expected).abs().max().item() <= bound, f"{arch} row {row} {SPEC[row]}"
    assert torch.equal(gathered[1], bare[1]), "a bare row is untouched: exactly zero is added to it"
    for row in (0, 2, 3, 4):
        assert (gathered[row] - bare[row]).abs().max().item() > 1e4 * EPS32 * bare.abs().max().item(), "adapters act"


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bart"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_gathered_generate_equals_loop_and_rows_alone(arch, num_beams, per_adapter_loop, gathered_calls):
    model = lora_bank(arch)
    batch = {k: v for k, v in tiny_batch(arch, batch=len(SPEC)).items() if k != "decoder_input_ids"}
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=num_beams, pad_token_id=0)
    gathered = model.generate(**batch, adapter=SPEC, **kwargs)
    # beams repeat each input row: the gathered stacks are per input row and serve every beam and step
    assert len(gathered_calls) > len(model.arch.layers)
    alone = [model.generate(**{k: v[i:i + 1] for k, v in batch.items()}, adapter=a, **kwargs)
             for i, a in enumerate(SPEC)]
    per_adapter_loop()
    looped = model.generate(**batch, adapter=SPEC, **kwargs)
    assert torch.equal(gathered, looped)
    for row, expected in enumerate(alone):  # a row alone stops at its own EOS; the batch pads after it
        assert torch.equal(gathered[row, : expected.shape[1]], expected[0]), f"{arch} row {row} {SPEC[row]}"
    assert len({tuple(out[0].tolist()) for out in alone}) > 2, "the adapters must change what is generated"


def test_gathered_stacks_follow_in_place_weight_changes():
    """Inside one `using` block the stacks are cached; writing an adapter's weights must not leave them stale."""
    model = lora_bank("llama")
    batch = tiny_batch("llama", batch=len(SPEC))
    with torch.no_grad(), model.using(SPEC):
        before = model(**batch).logits
        for name, p in model.get_adapter("r8").named_parameters():
            if name.endswith("lora_B"):
                p.mul_(-1.0)
        after = model(**batch).logits
    with torch.no_grad():
        fresh = model(**batch, adapter=SPEC).logits
    assert torch.equal(after, fresh)
    assert not torch.allclose(before[3], after[3])
    assert torch.equal(before[0], after[0]), "rows without r8 are unchanged"


def test_gathered_path_is_not_taken_where_the_loop_is_needed(gathered_calls):
    """With gradients (training a mixed batch), with active dropout, or one adapter on some rows: the loop."""
    model = lora_bank("llama")
    batch = tiny_batch("llama", batch=len(SPEC))
    model(**batch, adapter=SPEC).logits.sum().backward()
    assert not gathered_calls
    assert all(p.grad is not None for p in model.adapter_parameters("r2"))
    with torch.no_grad():
        model(**batch, adapter=["r2", None, None, "r2", None])
    assert not gathered_calls
    model.add_adapter("dropout", ak.LoRA(r=2, dropout=0.5))
    model.train()
    with torch.no_grad():
        model(**batch, adapter=["dropout", "r2", None, "r4", None])
    assert not gathered_calls


# -- chunked target-token loss (evaluation/loss.py) ---------------------------------------------------
#
# Tolerance, float32: both paths compute log-softmax of the same logits and reduce the same terms,
# in another order (per chunk, logsumexp vs log_softmax), so the loss and every gradient differ by
# rounding: within 64 · eps · (loss + log V) for the loss (log V bounds the logsumexp's own size),
# and 64 · eps · max|g| · L for a gradient g flowing back through L layers. Measured over these
# cases: the loss <= 1 ulp (8 eps at a loss of 8), the gradients <= 18 eps · max|g|, 7× below.

BIG_VOCAB = 3000


def big_vocab_model(arch: str) -> torch.nn.Module:
    """A tiny decoder LM whose vocabulary dwarfs its width, as gemma3's 262k does its 640."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=BIG_VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=64, **common)
        return tf.LlamaForCausalLM(config).eval()
    if arch == "gemma3":  # tied head, and a logit softcap to exercise its gradient
        config = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, head_dim=8, max_position_embeddings=64, sliding_window=4,
                                     layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0,
                                     **common)
        return tf.Gemma3ForCausalLM(config).eval()
    # no dropout: the tests run both paths in training mode and compare them
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attn_pdrop=0.0, **common)).eval()


def lm_batch(rows: int = 4, seq: int = 14) -> dict[str, torch.Tensor]:
    """Left-padded prompts + targets: labels only on the target tokens, as data.Collator makes them."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, BIG_VOCAB, (rows, seq), generator=g)
    mask = torch.ones(rows, seq, dtype=torch.long)
    labels = ids.clone()
    for row in range(rows):
        mask[row, :row] = 0  # left padding
        labels[row, : row + 4 + row % 3] = -100  # padding and prompt carry no loss
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask, "labels": labels}


def loss_and_grads(model, batch, adapter, params, **options):
    from adaptkit.evaluation.loss import loss_inputs, target_loss

    if options.pop("plain", False):
        loss = model(**loss_inputs(batch, slice_head=True), adapter=adapter).loss
    else:
        loss = target_loss(model, batch, adapter, **options)
    return loss.detach(), torch.autograd.grad(loss, params)


def loss_bound(plain: torch.Tensor) -> float:
    return 64 * EPS32 * (plain.abs().item() + math.log(BIG_VOCAB))


def assert_grads_close(chunked, plain, layers, what):
    for i, (c, p) in enumerate(zip(chunked, plain)):
        bound = 64 * EPS32 * p.abs().max().item() * layers
        assert (c - p).abs().max().item() <= bound, f"{what}: gradient {i} differs beyond rounding"


@pytest.mark.parametrize("arch,method", [("llama", "lora"), ("llama", "adalora"), ("gemma3", "lora"),
                                         ("gpt2", "lora")])
def test_chunked_loss_equals_plain_loss_and_gradients(arch, method):
    model = ak.AdaptedModel(big_vocab_model(arch))
    config = ak.LoRA(r=4, targets="all-linear") if method == "lora" else ak.AdaLoRA(init_r=4, target_r=2,
                                                                                      total_steps=10)
    model.add_adapter("a", config)
    with torch.no_grad():
        for p in model.adapter_parameters("a"):
            p.normal_(0, 0.2)
    model.train()  # AdaLoRA's orthogonality regulariser joins the loss in training: both paths add it
    params = model.adapter_parameters("a")
    batch = lm_batch()
    plain, plain_grads = loss_and_grads(model, batch, "a", params, plain=True)
    chunked, chunked_grads = loss_and_grads(model, batch, "a", params, chunk=5)  # 5 does not divide N: a ragged tail
    assert abs(chunked.item() - plain.item()) <= loss_bound(plain)
    assert_grads_close(chunked_grads, plain_grads, len(model.arch.layers), f"{arch} {method}")


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_chunked_loss_trains_the_head_as_full_fine_tuning_does(arch):
    """Every backbone weight trains, the head too (gemma3's is tied to the input embedding)."""
    model = ak.AdaptedModel(big_vocab_model(arch))
    params = list(model.model.parameters())
    for p in params:
        p.requires_grad_(True)
    batch = lm_batch()
    plain, plain_grads = loss_and_grads(model, batch, None, params, plain=True)
    chunked, chunked_grads = loss_and_grads(model, batch, None, params, chunk=7)
    assert abs(chunked.item() - plain.item()) <= loss_bound(plain)
    assert_grads_close(chunked_grads, plain_grads, len(model.arch.layers), f"{arch} full")


def test_chunked_loss_never_holds_the_whole_logits(monkeypatch):
    from adaptkit.evaluation import loss as loss_module

    model = ak.AdaptedModel(big_vocab_model("llama"))
    model.add_adapter("a", ak.LoRA(r=4))
    batch = lm_batch()
    targets = loss_module.label_tokens(batch["labels"], "decoder")
    chunks, head_rows = [], []
    original = loss_module._chunk_loss

    def recording(h, *args):
        chunks.append(h.shape[0])
        return original(h, *args)

    monkeypatch.setattr(loss_module, "_chunk_loss", recording)
    head = model.model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: head_rows.append(out.shape[0]))
    try:
        model.train()
        loss_module.target_loss(model, batch, "a", chunk=4).backward()
    finally:
        handle.remove()
    assert head_rows == [0], "the model's own head sees no position"
    assert sum(chunks) == targets and max(chunks) == 4
    # the default chunk holds CHUNK_LOGITS logits: 5592 positions of this 3000-token vocabulary
    assert max(1, loss_module.CHUNK_LOGITS // BIG_VOCAB) == 5592


def test_trainer_with_and_without_chunked_loss_trains_the_same_adapter(tmp_path):
    from test_train import FAST, pairs, tiny

    adapters = []
    for chunked in (True, False):
        model = tiny("llama")
        ak.train(model, adapter="x", adapter_config=ak.LoRA(r=4), train=pairs(24, 0), max_steps=3,
                 output_dir=str(tmp_path / str(chunked)), chunked_loss=chunked, **FAST)
        adapters.append({k: v.detach().clone() for k, v in model.get_adapter("x").state_dict().items()})
    for key, value in adapters[1].items():
        bound = 64 * EPS32 * value.abs().max().item() * 3  # three optimizer steps of rounding
        assert (adapters[0][key] - value).abs().max().item() <= bound, key


def test_chunked_loss_of_a_batch_without_targets_is_zero_with_zero_gradients():
    """A micro-batch whose targets were all cut adds nothing to the step (the model's own mean is NaN there)."""
    from adaptkit.evaluation.loss import target_loss

    model = ak.AdaptedModel(big_vocab_model("llama"))
    model.add_adapter("a", ak.LoRA(r=4))
    batch = lm_batch()
    batch["labels"] = torch.full_like(batch["labels"], -100)
    model.train()
    loss = target_loss(model, batch, "a")
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.adapter_parameters("a"))


# -- hot-load: one read, tensors as views, a dry run per distinct config ------------------------------

def write_raw_safetensors(path, entries: dict[str, tuple[str, list[int], bytes]], metadata: dict[str, str]):
    """A safetensors file laid out by hand (offsets in the given order, unpadded): what other writers may do."""
    import json
    import struct

    header, data = {"__metadata__": metadata}, b""
    for name, (dtype, shape, payload) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(payload)]}
        data += payload
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


ADAPTER_METADATA = {"adaptkit.format": "2", "adaptkit.method": "lora", "adaptkit.config": '{"r": 2}'}


def test_read_adapter_file_gives_what_safetensors_reads_for_every_dtype_and_alignment(tmp_path):
    from safetensors.torch import load_file

    from adaptkit.core.adapterfile import read_adapter_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a.bool": torch.rand(3, generator=g) > 0.5, "b.f16": torch.randn(5, generator=g).half(),
               "c.f32": torch.randn(2, 3, generator=g), "d.bf16": torch.randn(4, generator=g).bfloat16(),
               "e.empty": torch.zeros(0, 4), "f.i64": torch.arange(3), "g.f64": torch.randn(2, generator=g).double()}
    names = {"a.bool": "BOOL", "b.f16": "F16", "c.f32": "F32", "d.bf16": "BF16", "e.empty": "F32", "f.i64": "I64",
             "g.f64": "F64"}
    # in this order the f16, f32 and i64 tensors start at offsets that are not multiples of their size
    entries = {k: (names[k], list(t.shape), t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
               for k, t in tensors.items()}
    path = write_raw_safetensors(tmp_path / "mixed.safetensors", entries, ADAPTER_METADATA)
    ours, _ = read_adapter_file(path, verify=False)
    reference = load_file(path)
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and torch.equal(ours[name], tensor), name


def test_a_boolean_tensor_holding_other_bytes_is_refused(tmp_path):
    from adaptkit.core.adapterfile import read_adapter_file

    path = write_raw_safetensors(tmp_path / "bool.safetensors", {"m": ("BOOL", [3], bytes([0, 1, 2]))},
                                 ADAPTER_METADATA)
    with pytest.raises(ak.AdapterError, match="boolean tensor 'm' holds bytes other than 0 and 1"):
        read_adapter_file(path, verify=False)


def test_a_dry_run_per_distinct_config_and_the_loads_stay_exact(tmp_path, monkeypatch):
    """The meta-device dry run (safebuild.py) runs once per config on a backbone; a refused one is never remembered."""
    from adaptkit.core import safebuild

    model = lora_bank("llama")
    paths = {name: model.save_adapter(name, tmp_path / f"{name}.safetensors") for name in ("r2", "r4")}
    dry_runs = []
    original = safebuild._CountAllocations.__init__

    def counting(self, limit):
        dry_runs.append(limit)
        original(self, limit)

    monkeypatch.setattr(safebuild._CountAllocations, "__init__", counting)
    batch = tiny_batch("llama", batch=2)
    for copy in range(3):
        for name, path in paths.items():
            loaded = model.load_adapter(path, name=f"{name}-{copy}")
            with torch.no_grad():
                assert torch.equal(model(**batch, adapter=loaded).logits, model(**batch, adapter=name).logits)
    assert len(dry_runs) == 2, "one dry run for each of the two configs"

    forged = tmp_path / "forged.safetensors"
    from test_adapterfile import edited
    edited(paths["r2"], forged, config={"r": 10**12})
    for _ in range(2):
        with pytest.raises(ak.AdapterError, match="allocate"):
            model.load_adapter(forged, name="forged")
    assert len(dry_runs) == 4


def test_a_lora_built_for_a_load_skips_its_random_init_but_a_new_one_does_not():
    from adaptkit.core import safebuild

    model = ak.AdaptedModel(tiny_model("llama"))
    state = torch.random.get_rng_state()
    model.add_adapter("fresh", ak.LoRA(r=4))
    assert not torch.equal(torch.random.get_rng_state(), state), "a new adapter draws its A"
    assert all(site.lora_A.abs().sum() > 0 for site in model.get_adapter("fresh").sites.values())
    state = torch.random.get_rng_state()
    token = safebuild._LOADING.set(True)
    try:
        type(model.get_adapter("fresh"))("n", ak.LoRA(r=4), model.arch)
    finally:
        safebuild._LOADING.reset(token)
    assert torch.equal(torch.random.get_rng_state(), state), "no random draw while building for a load"

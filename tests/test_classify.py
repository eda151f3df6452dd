"""Classification adapters on an encoder: training lowers the loss and separates a toy set for every
family, the head round-trips through the adapter file, per-row classifiers equal each alone, the
metrics, and `domain="auto"` in the Translator routing each row as its true domain would."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import adaptkit as ak
from adaptkit.core.adapterfile import read_adapter_file, write_adapter_file
from adaptkit.evaluation.classification import classification_metrics, evaluate_classifier
from adaptkit.methods.heads import ClassificationHead
from adaptkit.tasks.classify import Classifier, balanced_weights, encode_examples, ensure_head
from adaptkit.tasks.translate import Translator
from adaptkit.training.trainer import TrainConfig, train
from tiny import VOCAB, tiny_model

CLASSES = {"software": "s", "bible": "b", "chat": "c"}
WORDS = (["<pad>", "<s>", "</s>", "<unk>"] + [f"{p}{i}" for p in "sbcn" for i in range(10)]
         + ["Translate", "English", "to", "German", ":"])
WORDS += [f"w{i}" for i in range(VOCAB - len(WORDS))]  # every id a tiny model can generate decodes
LABELS = sorted(CLASSES)
FAST = dict(progress=False, eval_every=None, resume=False, batch_size=16, lr=1e-2, schedule="constant")


def tokenizer(family: str = "encoder") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    single = "<s> $A" if family == "decoder" else "<s> $A </s>"
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def text(label: str, r: random.Random) -> str:
    """At least two tokens of the class, the rest shared noise: separable, but not by one position."""
    own = [f"{CLASSES[label]}{r.randrange(3)}" for _ in range(r.randint(2, 4))]
    words = own + [f"n{r.randrange(3)}" for _ in range(r.randint(0, 2))]
    r.shuffle(words)
    return " ".join(words)


def rows(counts: dict[str, int], seed: int) -> Dataset:
    r = random.Random(seed)
    out = [{"text": text(label, r), "label": label} for label, n in counts.items() for _ in range(n)]
    r.shuffle(out)
    return Dataset.from_list(out)


TRAIN = {"software": 48, "bible": 24, "chat": 12}  # imbalanced: the loss weights must balance it
DEV = {label: 8 for label in CLASSES}
TEST = {label: 10 for label in CLASSES}


def bert() -> ak.AdaptedModel:
    return ak.AdaptedModel(tiny_model("bert"), tokenizer())


LR = {"lora": 1e-2, "adalora": 3e-2, "bottleneck": 3e-2, "prefix": 3e-2}  # LoRA is unsteady at 3e-2 here
CONFIGS = {
    "lora": lambda: ak.LoRA(r=4),
    "bottleneck": lambda: ak.Bottleneck(reduction=4),
    "prefix": lambda: ak.Prefix(length=4),
    "adalora": lambda: ak.AdaLoRA(init_r=4, target_r=2, total_steps=40, tinit=5, tfinal=10),
}


def perturbed(model: ak.AdaptedModel, name: str, method: str, labels: list[str], seed: int = 0) -> None:
    """An adapter and head with every parameter moved off its initialisation (LoRA's B starts at zero)."""
    torch.manual_seed(seed)
    model.add_adapter(name, CONFIGS[method]())
    ensure_head(model, name, labels)
    with torch.no_grad():
        for parameter in model.get_adapter(name).parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)


@pytest.fixture(scope="module")
def domain_classifier(tmp_path_factory) -> Classifier:
    """A LoRA domain classifier over s*/b*/c* texts, trained once for the routing tests."""
    model = bert()
    train(model, "domain", rows(TRAIN, 0), rows(DEV, 1), task="classify", method="lora", r=4, max_steps=40,
          output_dir=str(tmp_path_factory.mktemp("domain")), **FAST)
    return Classifier(model, "domain")


# -- training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_classification_training_lowers_loss_and_separates_classes(method, tmp_path):
    model, dev, test = bert(), rows(DEV, 1), rows(TEST, 2)
    torch.manual_seed(0)
    model.add_adapter("clf", CONFIGS[method]())
    ensure_head(model, "clf", LABELS)
    family_before = {k: v.clone() for k, v in model.get_adapter("clf").adapter_state_dict().items()}
    before = evaluate_classifier(model, encode_examples(dev, model.tokenizer, LABELS), "clf", LABELS)

    summary = train(model, "clf", rows(TRAIN, 0), dev, task="classify", max_steps=40, output_dir=str(tmp_path),
                    **{**FAST, "lr": LR[method]})

    after = summary["best_metrics"]
    assert summary["metric"] == "macro_f1" and summary["method"] == method
    assert after["loss"] < 0.4 * before["loss"], (before, after)
    scores = evaluate_classifier(model, encode_examples(test, model.tokenizer, LABELS), "clf", LABELS,
                                 per_class=True)
    assert scores["accuracy"] >= 0.9 and scores["macro_f1"] >= 0.9, scores
    assert scores["per_class"]["chat"]["recall"] >= 0.8, scores  # the rarest class is learned too
    family_after = model.get_adapter("clf").adapter_state_dict()
    assert any(not torch.equal(family_before[k], family_after[k]) for k in family_before)  # not just the head
    info = ak.read_adapter_info(summary["output"])
    assert info["task"] == "classify" and info["head"]["labels"] == LABELS and info["head"]["pooling"] == "mean"
    assert not any(p.requires_grad for p in model.model.parameters())


def test_cli_trains_a_classifier(tmp_path):
    from adaptkit.cli import main

    backbone, data = tmp_path / "backbone", tmp_path / "data"
    model = bert()
    model.model.save_pretrained(backbone)
    model.tokenizer.save_pretrained(backbone)
    data.mkdir()
    rows(TRAIN, 0).to_json(data / "train.jsonl")
    rows(DEV, 1).to_json(data / "dev.jsonl")
    out = tmp_path / "run"
    assert main(["train", "--backbone", str(backbone), "--data", str(data), "--task", "classify", "--method",
                 "bottleneck", "--adapter", "domain", "--max-steps", "3", "--no-progress", "--output-dir",
                 str(out), "--no-resume"]) == 0
    info = ak.read_adapter_info(out / "domain.safetensors")
    assert info["head"]["labels"] == LABELS and info["metrics"]["step"] == 3 and "macro_f1" in info["metrics"]
    classifier = Classifier.from_file(out / "domain.safetensors", backbone=backbone)
    assert classifier.labels() == LABELS


def test_classify_refuses_decoders_and_bad_options(tmp_path):
    decoder = ak.AdaptedModel(tiny_model("llama"), tokenizer("decoder"))
    with pytest.raises(ak.AdapterError, match="encoder backbones"):
        train(decoder, "clf", rows(TRAIN, 0), None, task="classify", max_steps=1, output_dir=str(tmp_path), **FAST)
    with pytest.raises(ak.AdapterError, match="encoder backbones"):
        Classifier(decoder)
    with pytest.raises(ValueError, match="full fine-tuning"):
        TrainConfig(task="classify", full=True)
    with pytest.raises(ValueError, match="set task=classify"):
        TrainConfig(metric="accuracy")
    with pytest.raises(ak.AdapterError, match="not in the classifier's label set"):
        encode_examples(Dataset.from_list([{"text": "s1 s2", "label": "other"}]), tokenizer(), LABELS)


def test_balanced_weights_equalise_classes():
    weights = balanced_weights([0, 0, 0, 1], 2)
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0]))
    per_row = weights[torch.tensor([0, 0, 0, 1])]
    assert per_row.mean().item() == pytest.approx(1.0)  # the loss keeps its scale
    assert per_row[:3].sum().item() == pytest.approx(per_row[3:].sum().item())  # each class weighs the same


def test_classification_metrics_by_hand():
    scores = classification_metrics([0, 0, 1, 1, 2], [0, 1, 1, 1, 2], ["a", "b", "c"])
    assert scores["accuracy"] == pytest.approx(0.8)
    assert scores["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1})
    assert scores["per_class"]["b"]["f1"] == pytest.approx(0.8)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 0.8 + 1.0) / 3)


# -- the head in the adapter file ------------------------------------------------------------------

@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_head_round_trips_through_the_adapter_file(method, tmp_path):
    model = bert()
    perturbed(model, "clf", method, LABELS)
    texts = [text(label, random.Random(i)) for i, label in enumerate(LABELS * 2)]
    logits = Classifier(model, "clf").logits(texts)
    path = model.save_adapter("clf", tmp_path / "clf.safetensors")

    info = ak.read_adapter_info(path)
    assert info["head"] == {"kind": "classification", "hidden_size": 32, "labels": LABELS, "pooling": "mean",
                            "dropout": 0.1}
    tensors = load_file(str(path))
    assert tensors["head.linear.weight"].shape == (3, 32) and tensors["head.linear.bias"].shape == (3,)
    assert model.num_parameters("clf")["saved"] == sum(t.numel() for t in tensors.values())

    fresh = bert()
    name = fresh.load_adapter(path)
    assert torch.equal(Classifier(fresh, name).logits(texts), logits)
    assert Classifier(fresh, name).labels() == LABELS


def test_classifier_loads_its_adapter_from_the_store(tmp_path):
    model = ak.AdaptedModel(tiny_model("bert"), tokenizer(), store=tmp_path)
    perturbed(model, "domain/v1", "bottleneck", LABELS)
    texts = ["s1 s2 n0", "b0 b1", "c2 c0 n1"]
    logits = Classifier(model, "domain/v1").logits(texts)
    model.save_adapter("domain/v1")
    model.remove_adapter("domain/v1")
    assert torch.equal(Classifier(model, "domain/v1").logits(texts), logits)  # routed by name: loaded, head too
    assert model.adapters == ["domain/v1"]


def test_head_without_description_or_of_wrong_shape_is_refused(tmp_path):
    model = bert()
    perturbed(model, "clf", "lora", LABELS)
    tensors, info = read_adapter_file(model.save_adapter("clf", tmp_path / "clf.safetensors"))
    meta = {k: info[k] for k in ("method", "config", "backbone", "name")}
    write_adapter_file(tmp_path / "bare.safetensors", tensors, meta)
    with pytest.raises(ak.AdapterError, match="no adaptkit.head"):
        bert().load_adapter(tmp_path / "bare.safetensors")
    write_adapter_file(tmp_path / "two.safetensors", tensors, {**meta, "head": {**info["head"], "labels": ["x", "y"]}})
    fresh = bert()
    with pytest.raises(ak.AdapterError, match="do not fit"):
        fresh.load_adapter(tmp_path / "two.safetensors")
    assert fresh.adapters == []  # nothing half-loaded


def test_per_row_classifiers_equal_each_alone():
    model = bert()
    perturbed(model, "three", "lora", LABELS, seed=1)
    perturbed(model, "two", "bottleneck", ["yes", "no"], seed=2)
    classifier = Classifier(model)
    texts = [text(label, random.Random(i)) for i, label in enumerate(LABELS * 2)]
    routes = ["three", "two", "two", "three", "two", "three"]
    mixed = classifier.predict(texts, adapter=routes)
    for i, (row, route) in enumerate(zip(texts, routes)):
        alone = classifier.predict([row], adapter=route)[0]
        assert mixed[i].label == alone.label
        assert set(mixed[i].probabilities) == set(LABELS if route == "three" else ["yes", "no"])
        for label, probability in alone.probabilities.items():  # float32 softmax of the same logits
            assert mixed[i].probabilities[label] == pytest.approx(probability, abs=1e-5)
    with pytest.raises(ak.AdapterError, match="exactly one adapter with a head"):
        classifier.predict(texts[:2], adapter=["three", None])


# -- domain="auto" in the Translator ----------------------------------------------------------------

def translation_model() -> ak.AdaptedModel:
    """A tiny decoder with a software, a bible and a general en→de adapter whose outputs differ."""
    model = ak.AdaptedModel(tiny_model("llama"), tokenizer("decoder"))
    for i, domain in enumerate(["software", "bible", None]):
        name = f"en-de/{domain or 'general'}"
        torch.manual_seed(10 + i)
        model.add_adapter(name, ak.LoRA(r=4), src_lang="en", tgt_lang="de", domain=domain)
        with torch.no_grad():
            for parameter in model.get_adapter(name).parameters():
                parameter.add_(torch.randn_like(parameter))
    return model


def mixed_rows() -> tuple[list[str], list[str]]:
    r = random.Random(5)
    labels = ["software", "bible", "chat", "bible", "software", "chat"]
    return [text(label, r) for label in labels], labels


def test_auto_domain_routes_each_row_as_its_true_domain(domain_classifier):
    model = translation_model()
    texts, truth = mixed_rows()
    translator = Translator(model, domain_classifier=domain_classifier, domain_threshold=0.0)
    options = dict(num_beams=1, max_new_tokens=6)

    auto = translator.translate_detailed(texts, "en", "de", domain="auto", **options)
    explicit = translator.translate_detailed(texts, "en", "de", domain=truth, **options)

    assert [row.predicted_domain for row in auto] == truth
    assert [row.text for row in auto] == [row.text for row in explicit]
    assert [row.adapter for row in auto] == [row.adapter for row in explicit] == [
        "en-de/software", "en-de/bible", "en-de/general", "en-de/bible", "en-de/software", "en-de/general"]
    assert all(0.5 < row.domain_probability <= 1.0 for row in auto)
    assert [row.text for row in auto] == translator.translate(texts, "en", "de", domain="auto", **options)
    general = translator.translate(texts, "en", "de", domain=None, **options)
    assert general != [row.text for row in auto]  # the routes matter: the adapters write differently


def test_auto_domain_below_threshold_uses_the_general_adapter(domain_classifier):
    model = translation_model()
    texts, truth = mixed_rows()
    texts.append("s1 b2 n0 s0 b1")  # as much software as bible: an unsure prediction
    probabilities = [p.probability for p in domain_classifier.predict(texts)]
    threshold = (min(probabilities) + max(probabilities)) / 2
    assert min(probabilities) < threshold < max(probabilities)
    translator = Translator(model, domain_classifier=domain_classifier, domain_threshold=threshold)
    options = dict(num_beams=1, max_new_tokens=6)

    auto = translator.translate_detailed(texts, "en", "de", domain="auto", **options)

    expected = [row.predicted_domain if row.domain_probability >= threshold else None for row in auto]
    assert None in expected and [row.domain for row in auto] == expected
    explicit = translator.translate(texts, "en", "de", domain=expected, **options)
    assert [row.text for row in auto] == explicit
    mixed = translator.translate_detailed(texts[:2], "en", "de", domain=["auto", "bible"], **options)
    assert mixed[1].predicted_domain is None and mixed[1].adapter == "en-de/bible"


def test_auto_domain_needs_a_classifier_on_its_own_backbone(domain_classifier):
    model = translation_model()
    with pytest.raises(ak.AdapterError, match="needs a domain classifier"):
        Translator(model).translate(["s1 s2"], "en", "de", domain="auto", num_beams=1, max_new_tokens=2)
    with pytest.raises(ak.AdapterError, match="own"):
        Translator(domain_classifier.model, domain_classifier=domain_classifier)
    with pytest.raises(ak.AdapterError, match="probability"):
        Translator(model, domain_classifier=domain_classifier, domain_threshold=1.5)


def test_head_is_a_plain_module_of_the_adapter():
    """The head trains with the adapter: it is among adapter_parameters, and moves with it."""
    model = bert()
    model.add_adapter("clf", ak.LoRA(r=2))
    head = ensure_head(model, "clf", ["a", "b"])
    assert isinstance(head, ClassificationHead)
    assert {id(p) for p in head.parameters()} <= {id(p) for p in model.adapter_parameters("clf")}
    with pytest.raises(ak.AdapterError, match="already has a head"):
        ensure_head(model, "clf", ["a", "c"])

"""Content tasks: every family trains and generates for style and dialogue; streaming equals generating
(greedy and seeded sampling); a batch mixing translate, style, dialogue and bare rows equals each row
alone; the task-fitting evaluation; the `adaptkit generate` command."""

from __future__ import annotations

import io
import math
import random
import threading

import pytest
import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import adaptkit as ak
from adaptkit.cli import main as cli_main
from adaptkit.core.errors import SourceTooLong
from adaptkit.data import PromptFormat
from adaptkit.evaluation import evaluate
from adaptkit.evaluation.generation import dialogue_metrics, distinct_n, evaluate_dialogue, evaluate_style
from adaptkit.evaluation.scoring import translation_metrics
from adaptkit.tasks.generate import Generator, Tidier, tidy
from adaptkit.training.config import TrainConfig
from tiny import STANDALONE_METHODS, VOCAB, tiny_model

WORDS = (["<pad>", "<s>", "</s>", "<unk>"] + [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)]
         + ["Translate", "English", "to", "German", ":", "Rewrite", "in", "modern", "Modern", "User", "Assistant"])
WORDS += [f"c{i}" for i in range(VOCAB - len(WORDS))]  # every id the tiny models can write decodes to a word
FAST = dict(progress=False, eval_every=None, lr=5e-2, batch_size=8, resume=False, max_new_tokens=4)
SEQ2SEQ = ("marian", "bart")


def tokenizer(family: str = "decoder") -> PreTrainedTokenizerFast:
    """Word-level, the prompts' words included: decoders get BOS in front, seq2seq EOS behind."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = (processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
                          if family == "decoder" else
                          processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny(arch: str = "llama") -> ak.AdaptedModel:
    return ak.AdaptedModel(tiny_model(arch), tokenizer("seq2seq" if arch in SEQ2SEQ else "decoder"))


def rows(task: str, n: int, seed: int) -> Dataset:
    """Toy tasks: style rewrites a_i → b_(i mod 3) word by word; dialogue replies with those words reversed.
    Few target words, each frequent: a dozen steps teach a tiny model to write them (rather than stop)."""
    r = random.Random(seed)
    out = []
    for _ in range(n):
        idx = [r.randrange(30) for _ in range(r.randint(3, 7))]
        src = " ".join(f"a{i}" for i in idx)
        tgt = " ".join(f"b{i % 3}" for i in (idx if task == "style" else reversed(idx)))
        out.append({"src": src, "tgt": tgt, "src_lang": "en", "tgt_lang": "en", "domain": task})
    return Dataset.from_list(out)


def randomise(model: ak.AdaptedModel, name: str, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def task_bank(arch: str = "llama") -> ak.AdaptedModel:
    """Three adapters of three families, one per task, with routing keys as trained adapters have."""
    model = tiny(arch)
    model.add_adapter("en-de", ak.LoRA(r=4, targets="all-linear"), task="translate", src_lang="en", tgt_lang="de")
    model.add_adapter("modern", ak.Prefix(length=3), task="style", src_lang="en", tgt_lang="en")
    model.add_adapter("chat", ak.Bottleneck(reduction=4, placement="houlsby"), task="dialogue")
    for seed, name in enumerate(model.adapters):
        randomise(model, name, seed)
    return model


TEXTS = ["a1 a2 a3", "a4 a5", "a6 a7 a8 a9 a10", "a11"]


# -- each family trains and generates, for both tasks -------------------------------------------

@pytest.mark.parametrize("task", ["style", "dialogue"])
@pytest.mark.parametrize("method", STANDALONE_METHODS)
def test_every_family_trains_and_generates(method, task, tmp_path):
    model, dev = tiny(), rows(task, 8, 1)
    prompt = PromptFormat.for_task(task)
    before = evaluate(model, dev, None, prompt=prompt, generate=False)["loss"]
    summary = ak.train(model, "content", rows(task, 48, 0), dev, task=task, method=method, max_steps=12,
                       output_dir=str(tmp_path), **FAST)
    assert summary["best_metrics"]["loss"] < before - 0.05, (before, summary["best_metrics"])
    if task == "style":  # scored like a translation: chrF decides which adapter is best
        assert summary["metric"] == "chrf" and "chrf" in summary["best_metrics"]
    else:  # no single right reply: the loss decides; perplexity and reply statistics are logged
        assert summary["metric"] == "loss"
        metrics = summary["best_metrics"]
        assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-4)
        assert {"distinct_1", "distinct_2", "avg_words"} <= set(metrics)

    info = ak.read_adapter_info(summary["output"])
    assert info["task"] == task and info["training"]["task"] == task and info["src_lang"] == info["tgt_lang"] == "en"
    fresh = tiny()
    fresh.load_adapter(summary["output"])
    from_file = Generator(fresh).generate(TEXTS, max_new_tokens=5)  # adapter and task found from the file
    assert from_file == Generator(model).generate(TEXTS, adapter="content", max_new_tokens=5)  # keys kept in the bank
    written = " ".join(from_file).split()
    assert all(from_file) and sum(w in ("b0", "b1", "b2") for w in written) > len(written) / 2, from_file
    assert from_file != Generator(model).generate(TEXTS, adapter=None, task=task, max_new_tokens=5)


def test_trained_prompt_is_the_generator_prompt():
    """What the trainer encodes for a task is what Generator prompts with: prompt tokens, then the target."""
    from adaptkit.data import encode_decoder_example

    tok = tokenizer()
    for task in ("style", "dialogue"):
        prompt = PromptFormat.for_task(task)
        example = encode_decoder_example(tok, "a1 a2", "b1 b2", "en", "en", prompt)[0]
        prompt_ids = prompt.prompt_ids(tok, "a1 a2", "en", "en")
        assert example["input_ids"][:len(prompt_ids)] == prompt_ids
        assert example["labels"][len(prompt_ids):] == tok(" b1 b2", add_special_tokens=False)["input_ids"] + [2]
    assert PromptFormat.for_task("style").prompt_text("Thou art", "en", "en") == \
        "Rewrite in modern English:\nThou art\nModern English:"


def test_dialogue_turns_render_as_labelled_lines_and_chat_messages():
    prompt = PromptFormat.for_task("dialogue")
    assert prompt.prompt_text(["hi", "hello", "how are you?"], "en", "en") == \
        "User: hi\nAssistant: hello\nUser: how are you?\nAssistant:"
    assert prompt.prompt_text(["hello", "how are you?"], "en", "en") == \
        "Assistant: hello\nUser: how are you?\nAssistant:"
    assert prompt.prompt_text("how are you?", "en", "en") == "User: how are you?\nAssistant:"
    tok = tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}Assistant :{% endif %}")
    chat = PromptFormat.for_task("dialogue", use_chat_template=True)
    assert chat.messages(["a1", "a2", "a3"], "en", "en") == [
        {"role": "user", "content": "a1"}, {"role": "assistant", "content": "a2"}, {"role": "user", "content": "a3"}]
    ids = chat.prompt_ids(tok, ["a1", "a2"], "en", "en")
    assert tok.decode(ids) == "<unk> : a1 <unk> : a2 Assistant :"  # roles are not in the toy vocabulary
    with pytest.raises(ValueError, match="only a dialogue prompt"):
        PromptFormat.for_task("style").prompt_text(["a1", "a2"], "en", "en")
    with pytest.raises(ValueError, match="no prompt for task 'poetry'"):
        PromptFormat.for_task("poetry")


def test_trainer_accepts_the_content_tasks_and_refuses_reference_metrics_for_dialogue():
    assert TrainConfig(task="style").best_metric == "chrf"
    assert TrainConfig(task="dialogue").best_metric == "loss"
    with pytest.raises(ValueError, match="no single right answer"):
        TrainConfig(task="dialogue", metric="chrf")
    with pytest.raises(ValueError, match="task must be translate, style, dialogue or classify"):
        TrainConfig(task="poetry")


# -- streaming -----------------------------------------------------------------------------------

SAMPLING = dict(temperature=0.9, top_p=0.95, seed=7)


@pytest.mark.parametrize("arch", ["llama", "gemma3", "marian"])
@pytest.mark.parametrize("decoding", ["greedy", "sampling"])
def test_streamed_text_equals_generated_text(arch, decoding):
    model = task_bank(arch)
    generator = Generator(model)
    settings = dict(max_new_tokens=8, **(SAMPLING if decoding == "sampling" else {}))
    state = torch.get_rng_state()
    for text, adapter in zip(TEXTS, ["modern", "chat", None, "en-de"]):
        task = "style" if adapter is None else None  # a bare row needs a task; adapters bring theirs
        pieces = list(generator.stream(text, adapter=adapter, task=task, **settings))
        expected = generator.generate([text], adapter=adapter, task=task, **settings)[0]
        assert "".join(pieces) == expected and len(pieces) > 1, (pieces, expected)
    assert torch.equal(torch.get_rng_state(), state), "a seeded call gives the caller's random state back"
    if decoding == "sampling":
        sampled = generator.generate(TEXTS, adapter="modern", **settings)
        assert sampled == generator.generate(TEXTS, adapter="modern", **settings)
        assert sampled != generator.generate(TEXTS, adapter="modern", max_new_tokens=8), "it really samples"


@pytest.mark.parametrize("one_line", [True, False])
def test_tidied_pieces_join_to_the_tidied_text(one_line):
    r = random.Random(0)
    raws = ["\n  Hello world \n second line\n", "  one two  ", "\n\n", "", "a\nb", " x \t y\n", "word"]
    for raw in raws:
        for _ in range(20):
            cuts = sorted(r.sample(range(len(raw) + 1), k=min(len(raw), r.randint(0, 4))))
            pieces = [raw[i:j] for i, j in zip([0, *cuts], [*cuts, len(raw)])]
            tidier = Tidier(one_line)
            sent = [tidier.feed(p) for p in pieces] + [tidier.finish()]
            assert "".join(sent) == tidy(raw, one_line), (raw, pieces, sent)


def test_stream_in_a_thread_sees_no_other_routing_and_stops_when_dropped():
    model = task_bank()
    generator = Generator(model)
    expected = generator.generate(["a1 a2"], adapter="modern", max_new_tokens=8)[0]
    with model.using("chat"):  # the caller's own scope does not leak into the worker's explicit routing
        assert "".join(generator.stream("a1 a2", adapter="modern", max_new_tokens=8)) == expected
    stream = generator.stream("a1 a2", adapter="modern", max_new_tokens=60)
    next(stream)
    stream.close()  # the consumer went away: the worker stops at its next token and is joined
    assert not any(t.name == "adaptkit-stream" for t in threading.enumerate())


def test_stream_errors_reach_the_consumer():
    generator = Generator(task_bank())
    with pytest.raises(ak.AdapterError, match="beam search"):
        generator.stream("a1", adapter="modern", num_beams=2)
    with pytest.raises(ak.AdapterError, match="no adapter named 'missing'"):
        list(generator.stream("a1", adapter="missing", task="style"))  # raised in the worker, re-raised here


# -- one batch, four kinds of rows ---------------------------------------------------------------

@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_batch_mixing_translate_style_dialogue_and_bare_equals_rows_alone(arch, num_beams):
    model = task_bank(arch)
    generator = Generator(model, batch_size=8)
    texts = ["a1 a2 a3", "a4 a5 a6 a7", ["a8", "a9 a10", "a11 a12"], "a13"]
    adapters = ["en-de", "modern", "chat", None]
    tasks = ["translate", "style", "dialogue", "style"]
    kwargs = dict(max_new_tokens=6, num_beams=num_beams)
    mixed = generator.generate(texts, adapter=adapters, task=tasks, **kwargs)
    alone = [generator.generate([t], adapter=a, task=k, **kwargs)[0] for t, a, k in zip(texts, adapters, tasks)]
    assert mixed == alone
    auto = generator.generate(texts[:3], adapter="auto", task=tasks[:3], tgt_lang=["de", None, None], **kwargs)
    assert auto == mixed[:3]  # routed by the task (and, for translation, the pair) in each adapter's file
    assert len(set(mixed)) == 4, "each row's adapter and prompt change what it writes"


def test_routing_errors_name_the_fix():
    generator = Generator(task_bank())
    bare = Generator(tiny())
    with pytest.raises(ak.AdapterError, match="found no loaded adapter for task 'style'.*adapter=None"):
        bare.generate(["a1"], task="style")
    with pytest.raises(ak.AdapterError, match="no task for the row"):
        generator.generate(["a1"], adapter=None)
    with pytest.raises(ak.AdapterError, match="unknown task 'poetry'"):
        generator.generate(["a1"], adapter=None, task="poetry")
    with pytest.raises(ak.AdapterError, match="'adapter' has 2 entries for 3 texts; give one per text"):
        generator.generate(["a1", "a2", "a3"], adapter=["modern", None], task="style")
    with pytest.raises(ValueError, match="temperature >= 0"):
        generator.generate(["a1"], adapter="modern", temperature=-1)
    with pytest.raises(ak.AdapterError, match="encoder"):
        Generator(ak.AdaptedModel(tiny_model("bert"), tokenizer()))


# -- long sources: split where the task allows, refused where it does not; never cut ----------------

LONG = "a0 a1 a2 a3 a4. a5 a6 a7 a8 a9 a10. a11 a12 a13 a14."  # 18 tokens ("." is one): over a limit of 8
PIECES = ["a0 a1 a2 a3 a4.", "a5 a6 a7 a8 a9 a10.", "a11 a12 a13 a14."]


@pytest.mark.parametrize("arch", ["llama", "marian"])
def test_a_long_style_source_is_generated_whole_in_pieces(arch):
    model = task_bank("llama") if arch == "llama" else tiny(arch)
    if arch == "marian":
        model.add_adapter("modern", ak.LoRA(r=2, targets="all-linear"), task="style", src_lang="en", tgt_lang="en")
        randomise(model, "modern", 0)
    generator = Generator(model, max_source_len=8 if arch == "llama" else 7)
    other_ending = LONG.replace("a11 a12 a13 a14", "a20 a21 a22 a23")
    out = generator.generate([LONG, "a1 a2", other_ending], adapter="modern", max_new_tokens=3)
    alone = generator.generate(PIECES, adapter="modern", max_new_tokens=3)
    assert out[0] == " ".join(alone)
    assert out[1] == generator.generate(["a1 a2"], adapter="modern", max_new_tokens=3)[0]
    if arch == "llama":  # (the tiny marian writes the same few words whatever its source)
        assert out[0] != out[2], "sources that differ only past the limit got the same output"


def test_a_source_the_generator_cannot_split_is_refused_not_cut():
    generator = Generator(task_bank(), max_source_len=8)
    with pytest.raises(SourceTooLong, match="the source is 9 tokens long, over the limit of 8 .*a dialogue cannot "
                                            "be split: shorten its longest turn") as caught:
        generator.generate([["a1", "a2", " ".join(f"a{i}" for i in range(9))]], adapter="chat", max_new_tokens=3)
    assert (caught.value.tokens, caught.value.limit) == (9, 8)
    with pytest.raises(SourceTooLong, match="the source is 18 tokens long, over the limit of 8 .*a stream is one "
                                            "prompt"):
        generator.stream(LONG, adapter="modern")
    with pytest.raises(SourceTooLong, match="the source is 18 tokens long, over the limit of 8 .*one row is one "
                                            "prompt here"):
        generator.decoding_parts(LONG, "modern", None, None, None)
    ids, one_line = generator.decoding_parts(PIECES[1], "modern", None, None, None)  # within the limit: as before
    assert ids == generator._prompt_ids(generator._rows([PIECES[1]], "modern", None, None, None)[0]) and one_line


# -- evaluation that fits each task --------------------------------------------------------------

def test_distinct_n():
    assert distinct_n(["a b a b", "A B"], 1) == 2 / 6
    assert distinct_n(["a b a b", "a b"], 2) == 2 / 4  # (a b), (b a), (a b) | (a b)
    assert distinct_n(["a"], 2) == 0.0


def test_style_evaluation_scores_the_adapter_against_copying_the_input():
    model, test = task_bank(), rows("style", 12, 5)
    result = evaluate_style(model, test, "modern", max_new_tokens=6, resamples=200)
    sources, references = list(test["src"]), list(test["tgt"])
    assert result.sentences == 12 and result.copy == translation_metrics(sources, references)
    assert result.hypotheses == Generator(model).generate(sources, adapter="modern", task="style", max_new_tokens=6)
    assert result.adapted == translation_metrics(result.hypotheses, references)
    assert result.chrf_gain.gain == pytest.approx(result.adapted["chrf"] - result.copy["chrf"])
    assert result.chrf_gain.low <= result.chrf_gain.gain <= result.chrf_gain.high
    assert result.beats_copy == (result.chrf_gain.low > 0)
    flat = result.as_dict()
    assert flat["copy_chrf"] == result.copy["chrf"] and flat["bleu_gain_high"] == result.bleu_gain.high


def test_dialogue_evaluation_compares_perplexity_with_the_bare_backbone():
    model, dev = task_bank(), rows("dialogue", 10, 6)
    result = evaluate_dialogue(model, dev, "chat", max_new_tokens=5)
    assert result.adapted == dialogue_metrics(model, dev, "chat", max_new_tokens=5)
    assert result.bare == dialogue_metrics(model, dev, None, max_new_tokens=5)
    assert result.bare["loss"] == pytest.approx(
        evaluate(model, dev, None, prompt=PromptFormat.for_task("dialogue"), generate=False)["loss"])
    assert result.adapted["perplexity"] == pytest.approx(math.exp(result.adapted["loss"]))
    assert result.perplexity_ratio == pytest.approx(result.adapted["perplexity"] / result.bare["perplexity"])
    assert result.references["avg_words"] == pytest.approx(sum(len(t.split()) for t in dev["tgt"]) / 10)


# -- the command ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny backbone directory and a style adapter file trained on it."""
    root = tmp_path_factory.mktemp("generate")
    model = tiny()
    model.model.save_pretrained(root / "backbone")
    model.tokenizer.save_pretrained(root / "backbone")
    summary = ak.train(model, "modern", rows("style", 24, 0), None, task="style", max_steps=3,
                       output_dir=str(root / "run"), **{**FAST, "generate": False})
    return root / "backbone", summary["output"]


def test_generate_command_prints_and_streams_what_generator_writes(saved, capsys, monkeypatch):
    backbone, adapter = saved
    model = ak.load(backbone)
    model.load_adapter(adapter)
    expected = Generator(model).generate(["a1 a2 a3", "a4"], max_new_tokens=6)
    base = ["generate", "--backbone", str(backbone), "--adapter", str(adapter), "--max-new-tokens", "6"]
    assert cli_main([*base, "a1 a2 a3", "a4"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    assert cli_main([*base, "--stream", "a1 a2 a3", "a4"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    monkeypatch.setattr("sys.stdin", io.StringIO("a1 a2 a3\n\na4\n"))
    assert cli_main(base) == 0
    assert capsys.readouterr().out.splitlines() == expected
    turns = Generator(model).generate([["a1", "a2 a3"]], adapter="modern", task="dialogue", max_new_tokens=6)
    assert cli_main([*base, "--task", "dialogue", "a1 ||| a2 a3"]) == 0
    assert capsys.readouterr().out.splitlines() == turns
    assert cli_main([*base, "--stream", "--num-beams", "2", "a1"]) == 2
    assert "beam search" in capsys.readouterr().err

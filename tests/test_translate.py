"""Translator: adapters chosen per row by the routing keys in their files (and an error, never the bare
backbone, where none fits); batches larger than one chunk; texts over the source limit translated whole."""

import pickle

import pytest
import torch

import adaptkit as ak
from adaptkit.core.errors import SourceTooLong
from adaptkit.core.routing import match_adapter
from adaptkit.data import PromptFormat, decode_generated, prompt_inputs
from adaptkit.segments import split_source
from adaptkit.tasks.filerows import RowSettings, parse_line, route_row
from adaptkit.tasks.translate import Translator
from test_train import tiny_tokenizer
from tiny import tiny_model


def keyed_model(arch: str = "llama", adapters: dict | None = None) -> ak.AdaptedModel:
    """A tiny model with randomised LoRA adapters: name → routing keys."""
    torch.manual_seed(0)
    family = "seq2seq" if arch == "marian" else "decoder"
    model = ak.AdaptedModel(tiny_model(arch), tokenizer=tiny_tokenizer(family))
    for name, keys in (adapters or {"de": dict(src_lang="en", tgt_lang="de")}).items():
        model.add_adapter(name, ak.LoRA(r=2, targets="all-linear"), **keys)
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.normal_(0, 0.5)
    return model


def test_rows_route_by_pair_and_domain_across_chunks(tmp_path):
    model = keyed_model(adapters={"de-it": dict(src_lang="en", tgt_lang="de", domain="it"),
                                  "de-bible": dict(src_lang="en", tgt_lang="de", domain="bible"),
                                  "de": dict(src_lang="en", tgt_lang="de")})
    translator = Translator(model, batch_size=3)
    assert translator.adapter_for("en", "de", "it") == "de-it"
    assert translator.adapter_for("en", "de", "bible") == "de-bible"
    assert translator.adapter_for("en", "de", "news") == "de"  # a pair-only adapter serves any domain
    assert translator.adapter_for("en", "fr", "it") is None
    texts = [f"w{i} w{i + 1} w{i + 2}" for i in range(7)]
    domains = ["it", "bible", "it", None, "bible", "it", "bible"]
    routed = translator.translate(texts, "en", "de", domain=domains, num_beams=1, max_new_tokens=5)
    assert len(routed) == 7
    expected_adapter = {"it": "de-it", "bible": "de-bible", None: "de"}
    for text, domain, out in zip(texts, domains, routed):
        alone = translator.translate([text], "en", "de", adapter=expected_adapter[domain], num_beams=1,
                                     max_new_tokens=5)
        assert alone == [out]


# -- no adapter for a row: an error naming what is served, never the bare backbone -------------------

def test_a_pair_no_adapter_serves_is_an_error_not_the_bare_backbone():
    model = keyed_model(adapters={"de-legal": dict(src_lang="en", tgt_lang="de", domain="legal")})
    translator = Translator(model)
    with pytest.raises(ak.AdapterError, match=r"texts\[0\]: no adapter translates en→fr \(domain 'legal'\); "
                                              r"adapters serve: en→de \(legal\)\. .*adapter=None"):
        translator.translate(["a1 a2"], "en", "fr", domain="legal", num_beams=1, max_new_tokens=3)
    with pytest.raises(ak.AdapterError, match=r"texts\[1\]: no adapter translates en→de \(domain 'news'\)"):
        translator.translate(["a1 a2", "a3"], "en", "de", domain=["legal", "news"], num_beams=1, max_new_tokens=3)
    # The bare backbone on purpose: by name, for every row or one row of a list.
    bare = translator.translate(["a1 a2", "a3"], "en", "fr", adapter=None, num_beams=1, max_new_tokens=3)
    mixed = translator.translate(["a1 a2", "a3"], "en", ["fr", "de"], domain="legal", adapter=[None, "auto"],
                                 num_beams=1, max_new_tokens=3)
    assert mixed[0] == bare[0]
    assert mixed[1] == translator.translate(["a3"], "en", "de", adapter="de-legal", num_beams=1, max_new_tokens=3)[0]


def test_an_adapter_without_routing_keys_is_named_not_used_silently():
    model = keyed_model(adapters={"plain": {}})
    with pytest.raises(ak.AdapterError, match=r"adapters serve: nothing; without routing keys .*\['plain'\]\. "
                                              r".*adapter='NAME'"):
        Translator(model).translate(["a1 a2"], "en", "de", num_beams=1, max_new_tokens=3)
    named = Translator(model).translate(["a1 a2"], "en", "de", adapter="plain", num_beams=1, max_new_tokens=3)
    assert named != Translator(model).translate(["a1 a2"], "en", "de", adapter=None, num_beams=1, max_new_tokens=3)


def test_the_store_adapters_route_as_in_the_service(tmp_path):
    """Routing sees the store's adapters, not only the resident ones: an evicted adapter still serves its pair."""
    keyed_model(adapters={"fr": dict(src_lang="en", tgt_lang="fr")}).save_adapter("fr", tmp_path / "en-fr.safetensors")
    model = ak.AdaptedModel(tiny_model("llama"), tokenizer=tiny_tokenizer("decoder"), store=tmp_path)
    translator = Translator(model)
    assert translator.adapter_for("en", "fr") == "en-fr"
    routed = translator.translate_detailed(["a1 a2"], "en", "fr", num_beams=1, max_new_tokens=3)
    assert routed[0].adapter == "en-fr" and "en-fr" in model.adapters


def test_one_routing_rule_for_the_translator_the_file_rows_and_the_service():
    """Same keys, same answer whatever order the candidates come in; the file rows raise the same way."""
    keys = {"b-any": dict(src_lang="en", tgt_lang="de"), "a-any": dict(src_lang="en", tgt_lang="de"),
            "it": dict(src_lang="en", tgt_lang="de", domain="it")}
    for order in (list(keys), list(reversed(keys))):
        candidates = [(name, keys[name]) for name in order]
        assert match_adapter(candidates, "en", "de", "it") == "it"
        assert match_adapter(candidates, "en", "de", None) == "a-any"  # ties: the first name in sorted order
        assert match_adapter(candidates, "en", "fr", None) is None
    translator = Translator(keyed_model(adapters=keys))
    assert translator.adapter_for("en", "de") == "a-any" and translator.adapter_for("en", "de", "it") == "it"
    row = parse_line("a1 a2", 3, RowSettings(src_lang="en", tgt_lang="fr"))
    with pytest.raises(ak.AdapterError, match=r"line 3: no adapter translates en→fr; adapters serve: en→de, "
                                              r"en→de \(it\)\. .*--use NAME"):
        route_row(row, 3, list(keys.items()), None)


# -- long sources: translated whole, never cut --------------------------------------------------------

def words(first: int, n: int) -> str:
    return " ".join(f"a{i % 30}" for i in range(first, first + n))


LONG = f"{words(0, 5)}. {words(5, 6)}. {words(11, 4)}."  # 18 tokens ("." is one): over a limit of 8


def test_split_source_cuts_at_sentence_ends_then_words_then_tokens():
    tokenizer = tiny_tokenizer("decoder")

    def length(text):
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    assert split_source("a1 a2. a3", length, 8).texts == ["a1 a2. a3"]  # within the limit: whole
    pieces = split_source(LONG, length, 8, tokenizer)
    assert pieces.texts == [f"{words(0, 5)}.", f"{words(5, 6)}.", f"{words(11, 4)}."]
    assert pieces.joiners == [" ", " "]
    assert split_source(LONG, length, 14, tokenizer).texts == [f"{words(0, 5)}. {words(5, 6)}.", f"{words(11, 4)}."]
    lines = split_source(f"{words(0, 6)}\n{words(6, 6)}", length, 8, tokenizer)  # a line break is a sentence end
    assert lines.texts == [words(0, 6), words(6, 6)] and lines.joiners == ["\n"]
    assert lines.join(["x", "y"]) == "x\ny" and lines.join(["", "y"]) == "y"
    long_sentence = split_source(words(0, 12) + ".", length, 5, tokenizer)  # no sentence end: between words
    assert long_sentence.texts == [words(0, 5), words(5, 5), words(10, 2) + "."]
    assert all(length(piece) <= 5 for piece in long_sentence.texts)
    assert split_source("abcdefg", len, 3).texts == ["abc", "def", "g"]  # no word gap: between tokens (characters)
    assert split_source("abcdefg", len, 3).joiners == ["", ""]
    with pytest.raises(SourceTooLong, match="not even one token of it fits"):
        split_source("abc", lambda text: len(text) + 4, 3)


@pytest.mark.parametrize("arch,num_beams", [("llama", 1), ("llama", 2), ("marian", 1)])
def test_a_text_over_the_source_limit_is_translated_whole(arch, num_beams):
    model = keyed_model(arch)
    translator = Translator(model, max_source_len=8 if arch == "llama" else 10)
    ending_a, ending_b = LONG, LONG.replace(words(11, 4), words(20, 4))  # differ in their last sentence only
    short = [words(3, 3), words(7, 5) + "."]
    kwargs = dict(num_beams=num_beams, max_new_tokens=4)
    out = translator.translate([ending_a, short[0], ending_b, short[1]], "en", "de", **kwargs)
    if arch != "marian":  # (the tiny marian writes the same few words whatever its source)
        assert out[0] != out[2], "texts that differ only past the source limit got the same answer"
    segments = split_source(ending_a, lambda t: translator.source_tokens(t, "en", "de"), translator.max_source_len,
                            model.tokenizer).texts
    assert len(segments) > 1
    assert out[0] == " ".join(translator.translate(segments, "en", "de", **kwargs))  # each piece as a row alone
    assert out[1::2] == [translator.translate([text], "en", "de", **kwargs)[0] for text in short]


@pytest.mark.parametrize("arch", ["llama", "marian"])
def test_texts_within_the_limit_are_translated_as_before(arch):
    """The plain path: one prompt per text (what prompt_inputs builds) and one generate call."""
    model = keyed_model(arch)
    translator = Translator(model, max_source_len=8 if arch == "llama" else 10, continuous=False)
    texts = [words(0, 4), words(4, 6) + ".", words(10, 2)]
    family = model.family
    inputs = prompt_inputs(model.tokenizer, texts, "en", "de", family, PromptFormat() if family == "decoder" else None)
    generated = model.generate(**inputs, adapter="de", num_beams=2, max_new_tokens=4, do_sample=False,
                               **translator._stop_kwargs(inputs["input_ids"].shape[1]))
    expected = [t.split("\n", 1)[0].strip() if family == "decoder" else t
                for t in decode_generated(model.tokenizer, generated, inputs, family)]
    assert translator.translate(texts, "en", "de", num_beams=2, max_new_tokens=4) == expected


def test_decoding_parts_refuses_a_source_over_the_limit_it_cannot_split():
    model = keyed_model()
    translator = Translator(model, max_source_len=8)
    ids, one_line = translator.decoding_parts(words(0, 8), "en", "de")
    assert one_line and ids == model.tokenizer(PromptFormat().prompt_text(words(0, 8), "en", "de"))["input_ids"]
    with pytest.raises(SourceTooLong, match=r"the source is 18 tokens long, over the limit of 8 tokens per source; "
                                            r".*Translator.translate splits a long text") as caught:
        translator.decoding_parts(LONG, "en", "de")
    assert (caught.value.tokens, caught.value.limit) == (18, 8) and isinstance(caught.value, ak.AdapterError)
    copy = pickle.loads(pickle.dumps(caught.value))  # crosses worker processes whole
    assert (type(copy), copy.tokens, copy.limit, str(copy)) == (SourceTooLong, 18, 8, str(caught.value))

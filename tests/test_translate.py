"""Translator: adapters chosen per row by the routing keys in their files; batches larger than one chunk."""

import torch

import adaptkit as ak
from adaptkit.tasks.translate import Translator
from test_train import tiny_tokenizer
from tiny import tiny_model


def test_rows_route_by_pair_and_domain_across_chunks(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"), tokenizer=tiny_tokenizer("decoder"))
    for name, domain in (("de-it", "it"), ("de-bible", "bible")):
        model.add_adapter(name, ak.LoRA(r=2, targets="all-linear"), src_lang="en", tgt_lang="de", domain=domain)
        with torch.no_grad():
            for p in model.adapter_parameters(name):
                p.normal_(0, 0.5)
    translator = Translator(model, batch_size=3)
    assert translator.adapter_for("en", "de", "it") == "de-it"
    assert translator.adapter_for("en", "de", "bible") == "de-bible"
    assert translator.adapter_for("en", "fr", "it") is None
    texts = [f"w{i} w{i + 1} w{i + 2}" for i in range(7)]
    domains = ["it", "bible", "it", None, "bible", "it", "bible"]
    routed = translator.translate(texts, "en", "de", domain=domains, num_beams=1, max_new_tokens=5)
    assert len(routed) == 7
    expected_adapter = {"it": "de-it", "bible": "de-bible", None: None}
    for text, domain, out in zip(texts, domains, routed):
        alone = translator.translate([text], "en", "de", adapter=expected_adapter[domain], num_beams=1,
                                     max_new_tokens=5)
        assert alone == [out]

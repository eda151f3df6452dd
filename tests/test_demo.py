"""`adaptkit demo` end to end on a tiny backbone: every phase runs, both adapter files are written with
their routing keys and hot-load back, and the reported gain is the paired-bootstrap figure it claims."""

from __future__ import annotations

import json

import pytest

import adaptkit as ak
from adaptkit.cli.demo import DOMAINS, FULL, QUICK, DemoBudget, plan_seconds, run_demo
from test_train import tiny


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    backbone = tmp_path_factory.mktemp("backbone")
    model = tiny("llama")
    model.model.save_pretrained(backbone)
    model.tokenizer.save_pretrained(backbone)
    out = tmp_path_factory.mktemp("demo")
    budget = DemoBudget(steps=2, eval_sentences=4, batch_size=2, max_len=16, max_new_tokens=3)
    return run_demo(str(backbone), budget, out), backbone, out


def test_demo_runs_every_phase_and_writes_its_results(demo_run):
    results, _, out = demo_run
    assert set(results["phase_seconds"]) == set(plan_seconds(QUICK)) == set(results["estimated_seconds"])
    assert json.loads((out / "demo_results.json").read_text())["domains"].keys() == {d.adapter for d in DOMAINS}
    for domain in results["domains"].values():
        for metric in ("chrf", "bleu"):
            figure = domain[metric]
            assert figure["sentences"] == 4
            assert figure["low"] <= figure["b"] - figure["a"] <= figure["high"]


def test_demo_adapter_files_carry_routing_keys_and_hot_load(demo_run):
    results, backbone, _ = demo_run
    model = ak.load(str(backbone))
    for d in DOMAINS:
        path = results["domains"][d.adapter]["file"]
        info = ak.read_adapter_info(path)
        assert (info["method"], info["src_lang"], info["tgt_lang"], info["domain"]) == (
            d.config.method, d.src_lang, d.tgt_lang, d.domain)
        assert model.load_adapter(path) == d.adapter
    assert ak.Translator(model).adapter_for("en", "es", "bible") == "en-es/bible"


def test_full_budget_is_larger_and_estimates_scale_with_it():
    assert FULL.steps > QUICK.steps and FULL.eval_sentences >= 200
    assert sum(plan_seconds(FULL).values()) > sum(plan_seconds(QUICK).values())
    assert sum(plan_seconds(QUICK, 2.0).values()) == pytest.approx(2 * sum(plan_seconds(QUICK).values()))

"""The efficiency benchmark end to end on a tiny random llama: every method, the peft peers, the
mixed and cross-domain jobs, each in a forked worker; the JSON holds every figure for every job,
and the markdown and plots are written. Schema and consistency, not figures."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import adaptkit as ak
from adaptkit.bench.jobs import METHODS, BenchConfig, plan
from adaptkit.bench.report import paired_step_ratio
from adaptkit.bench.runner import run_benchmark
from adaptkit.cli import main as adaptkit_main
from adaptkit.cli.bench import add_bench_commands, config_from_args
from tiny import tiny_model

WORDS = (["<pad>", "<s>", "</s>", "<unk>"] + [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)]
         + ["Translate", "English", "to", "German", ":"])

RUN_FIELDS = {"domain", "method", "family", "library", "train_domains", "device", "backbone_parameters",
              "backbone_bytes", "trainable_parameters", "percent_of_backbone", "peak_rss_bytes",
              "rss_after_load_bytes", "train_rss_delta_bytes", "rss_method", "cuda_max_allocated_bytes", "test",
              "vs_bare", "latency", "dev", "job_seconds"}
TRAINED_FIELDS = {"file_bytes", "file_vs_full", "full_checkpoint_bytes", "steps", "step_seconds_median",
                  "step_seconds", "tokens_per_second", "train_seconds", "train_loss"}
LATENCY_FIELDS = {"bare_ms", "unmerged_ms", "merged_ms", "unmerged_ratio", "merged_ratio", "new_tokens"}
SCORES = {"bleu", "chrf", "ter", "loss"}


def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def pairs(n: int, seed: int, shift: int) -> Dataset:
    """a_i → b_(i+shift): two 'domains' that translate the same words differently."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        idx = [r.randrange(30) for _ in range(r.randint(3, 5))]
        rows.append({"src": " ".join(f"a{i}" for i in idx), "tgt": " ".join(f"b{(i + shift) % 30}" for i in idx),
                     "src_lang": "en", "tgt_lang": "de"})
    return Dataset.from_list(rows)


def tiny_backbone() -> ak.AdaptedModel:
    return ak.AdaptedModel(tiny_model("llama"), tokenizer(), "tiny-llama")


def tiny_run(out: Path, **changes) -> dict:
    data = {name: {"train": pairs(16, seed, shift), "dev": pairs(3, seed + 1, shift), "test": pairs(3, seed + 2, shift)}
            for name, seed, shift in (("toy-a", 0, 0), ("toy-b", 10, 7))}
    options = dict(name="tiny", backbone="tiny-llama", domains=["toy-a", "toy-b"], other_methods=["lora-r8"],
                   peers=["lora-r8", "adalora", "prefix"], budget_steps=2, batch_size=4, eval_samples=3,
                   test_samples=3, max_new_tokens=3, eval_batch_size=8, latency_sentences=1, latency_tokens=2,
                   latency_repeats=1, output_dir=str(out), work_dir=str(out / "work"), progress=False,
                   threads=1)  # a forked worker of a process that ran OpenMP work hangs unless single-threaded
    return run_benchmark(BenchConfig(**{**options, **changes}), load_model=tiny_backbone, data=data)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return tiny_run(out), out


def test_activation_checkpointing_trains_every_job_the_same(report, tmp_path):
    """--activation-checkpointing in every job, peft's too: the same losses as without, up to float32 rounding
    (two steps; a job that ignored its routing in the recomputation would train another function)."""
    checkpointed = tiny_run(tmp_path, domains=["toy-a"], methods=["full", "lora-r8", "prefix"], peers=["lora-r8"],
                            mixed=None, cross=None, activation_checkpointing=True)
    assert "activation checkpointing in every job" in (tmp_path / "tiny.md").read_text()
    plain = {(r["method"], r["library"]): r for r in report[0]["runs"] if r["domain"] == "toy-a"}
    jobs = [r for r in checkpointed["runs"] if r["method"] != "bare"]
    assert {(r["method"], r["library"]) for r in jobs} == {("full", "adaptkit"), ("lora-r8", "adaptkit"),
                                                           ("prefix", "adaptkit"), ("lora-r8", "peft")}
    for run in jobs:
        expected = plain[(run["method"], run["library"])]["train_loss"]
        assert run["train_loss"] == pytest.approx(expected, rel=1e-4), (run["method"], run["library"])


def test_every_job_has_every_figure(report):
    report, _ = report
    runs = report["runs"]
    assert [r.get("error") for r in runs] == [None] * len(runs)
    first = [r for r in runs if r["domain"] == "toy-a" and r["library"] == "adaptkit"]
    assert {r["method"] for r in first} == set(METHODS)
    assert {r["method"] for r in runs if r["library"] == "peft"} == {"lora-r8", "adalora", "prefix"}
    assert any(r["domain"] == "mixed" and r["train_domains"] == ["toy-a", "toy-b"] for r in runs)
    for r in runs:
        assert RUN_FIELDS <= set(r), (r["method"], RUN_FIELDS - set(r))
        assert LATENCY_FIELDS <= set(r["latency"]) and r["latency"]["bare_ms"] > 0
        assert SCORES <= set(r["dev"])
        for scores in r["test"].values():
            assert SCORES <= set(scores)
        assert r["peak_rss_bytes"] >= r["rss_after_load_bytes"] > 0
        if r["library"] != "bare":
            assert TRAINED_FIELDS <= set(r), (r["method"], TRAINED_FIELDS - set(r))
            assert r["steps"] == 2 and len(r["step_seconds"]) == 2 and r["tokens_per_second"] > 0
            assert r["latency"]["unmerged_ratio"] > 0
            assert (r["latency"]["merged_ms"] is not None) == (r["family"] in ("lora", "adalora"))


def test_figures_are_consistent(report):
    report, _ = report
    runs = {(r["domain"], r["method"], r["library"]): r for r in report["runs"]}
    full, lora = runs[("toy-a", "full", "adaptkit")], runs[("toy-a", "lora-r8", "adaptkit")]
    assert full["trainable_parameters"] == full["backbone_parameters"]
    assert full["file_vs_full"] == 1.0 and full["percent_of_backbone"] == 100.0
    assert 0 < lora["percent_of_backbone"] < 100 and lora["file_vs_full"] < 0.5
    assert lora["trainable_parameters"] == runs[("toy-a", "lora-r8", "peft")]["trainable_parameters"]
    # cross-domain: the per-domain LoRA adapters and the mixed one are scored on both test sets
    for key in (("toy-a", "lora-r8", "adaptkit"), ("toy-b", "lora-r8", "adaptkit"), ("mixed", "lora-r8", "adaptkit")):
        assert set(runs[key]["test"]) == {"toy-a", "toy-b"} and set(runs[key]["vs_bare"]) == {"toy-a", "toy-b"}
    bare = runs[("toy-a", "bare", "bare")]
    gain = lora["test"]["toy-a"]["chrf"] - bare["test"]["toy-a"]["chrf"]
    assert lora["vs_bare"]["toy-a"]["chrf"] == pytest.approx(gain)
    assert report["git"]["commit"] and report["versions"]["torch"] and report["machine"]["cpu_count"]
    assert report["seeds"]["seed"] == 0 and report["config"]["budget_steps"] == 2


def test_outputs_written(report):
    report, out = report
    saved = json.loads((out / "tiny.json").read_text())
    assert len(saved["runs"]) == len(report["runs"])
    table = (out / "tiny.md").read_text()
    assert "## toy-a" in table and "bottleneck-houlsby" in table and "lora-r8 (peft)" in table
    assert "Cross-domain" in table
    for plot in ("tiny-quality.png", "tiny-cost.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plan_and_cli_flags():
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "efficiency", "--corpus", "libreoffice-help", "--pair", "en-es",
                              "--budget-steps", "5", "--peers", "lora-r8", "--lrs", "lora=1e-3", "--mixed", "none"])
    cfg = config_from_args(args)
    assert cfg.domains == ["libreoffice-help-en-es", "bible-en-es"] and cfg.budget_steps == 5
    assert cfg.peers == ["lora-r8"] and cfg.lr("lora") == 1e-3 and cfg.lr("full") == 5e-5 and cfg.mixed is None
    jobs = plan(cfg)
    assert [j.key for j in jobs if j.library == "peft"] == ["libreoffice-help-en-es/lora-r8@peft"]
    assert not any(j.domain == "mixed" for j in jobs)
    quick = config_from_args(parser.parse_args(["bench", "efficiency", "--quick", "--second", "none"]))
    assert quick.backbone == "smollm2-135m" and quick.domains == ["libreoffice-help-en-de"]
    with pytest.raises(ValueError, match="unknown method"):
        BenchConfig(methods=["lora-r9"])


@pytest.mark.parametrize("path", sorted(p for p in (Path(__file__).parents[1] / "benchmarks" / "configs").glob("*.toml")
                                        if not p.name.startswith("sweep-")), ids=lambda p: p.name)
def test_shipped_bench_configs_are_valid(path):
    import argparse

    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    cfg = config_from_args(parser.parse_args(["bench", "efficiency", "--config", str(path), "--budget-steps", "7"]))
    assert cfg.name == path.stem and cfg.budget_steps == 7  # the file's keys are read, flags override them
    assert plan(cfg)[0].method == "bare"


def test_step_ratio_is_paired_by_step():
    # same batches in the same order: step i of both jobs did the same work
    assert paired_step_ratio([1.0, 10.0, 3.0], [2.0, 20.0, 3.0]) == 0.5  # the ratio of medians would say 1.0
    assert paired_step_ratio([1.0, 3.0], [2.0, 2.0, 2.0]) == 1.0  # different lengths: ratio of medians


def test_report_rerenders_from_its_json(report, tmp_path):
    _, out = report
    copy = tmp_path / "tiny.json"
    copy.write_text((out / "tiny.json").read_text())
    adaptkit_main(["bench", "report", str(copy)])
    assert (tmp_path / "tiny.md").read_text() == (out / "tiny.md").read_text()
    assert (tmp_path / "tiny-quality.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not an `adaptkit bench efficiency` report"):
        adaptkit_main(["bench", "report", str(tmp_path / "bad.json")])

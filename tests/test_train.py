"""The trainer: loss falls for every family and for full fine-tuning, early stopping, the best
adapter reloads with its recorded metric, a SIGKILLed run resumes to the same adapter, and
2 processes / gradient accumulation give the same adapter as one big batch."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

import adaptkit as ak
from adaptkit.cli.train import add_config_flags, config_from_args
from adaptkit.evaluation import evaluate
from adaptkit.evaluation.loss import label_tokens, loss_inputs
from adaptkit.training.trainer import TrainConfig, train
from tiny import STANDALONE_METHODS, tiny_model

WORDS = (["<pad>", "<s>", "</s>", "<unk>"] + [f"a{i}" for i in range(30)] + [f"b{i}" for i in range(30)]
         + ["Translate", "English", "to", "German", ":"])
FAST = dict(progress=False, generate=False, eval_every=None, lr=1e-2, batch_size=8, resume=False)


def tiny_tokenizer(family: str) -> PreTrainedTokenizerFast:
    """Word-level: decoder LMs get BOS in front, seq2seq gets EOS behind; ids match tests/tiny.py."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = (processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
                          if family == "decoder" else
                          processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 2)]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def pairs(n: int, seed: int) -> Dataset:
    """A toy translation task: a_i → b_i word by word."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        idx = [r.randrange(30) for _ in range(r.randint(3, 6))]
        rows.append({"src": " ".join(f"a{i}" for i in idx), "tgt": " ".join(f"b{i}" for i in idx),
                     "src_lang": "en", "tgt_lang": "de", "domain": "toy"})
    return Dataset.from_list(rows)


def tiny(arch: str = "llama") -> ak.AdaptedModel:
    family = "seq2seq" if arch in ("marian", "t5", "bart", "mbart", "m2m100") else "decoder"
    return ak.AdaptedModel(tiny_model(arch), tiny_tokenizer(family))


def bare_loss(model: ak.AdaptedModel, dev: Dataset) -> float:
    return evaluate(model, dev, None, generate=False)["loss"]


@pytest.fixture(scope="module")
def backbone_dir(tmp_path_factory) -> Path:
    """The tiny llama and its tokenizer saved like a real backbone, for subprocess / CLI runs."""
    path = tmp_path_factory.mktemp("backbone")
    model = tiny("llama")
    model.model.save_pretrained(path)
    model.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data")
    for split, (n, seed) in {"train": (48, 0), "dev": (8, 1)}.items():
        pairs(n, seed).to_json(path / f"{split}.jsonl")
    return path


# -- loss falls ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", STANDALONE_METHODS)
def test_adapter_loss_falls_for_every_family(method, tmp_path):
    model, dev = tiny("llama"), pairs(8, 1)
    before = bare_loss(model, dev)
    summary = train(model, "toy", pairs(48, 0), dev, method=method, max_steps=12, output_dir=str(tmp_path),
                    **{**FAST, "lr": 5e-2})
    assert summary["method"] == method and summary["steps"] == 12
    assert summary["best_metrics"]["loss"] < before - 0.05, (before, summary["best_metrics"])
    assert Path(summary["output"]).is_file()
    assert not any(p.requires_grad for p in model.model.parameters())  # backbone frozen again


def test_seq2seq_adapter_loss_falls(tmp_path):
    model, dev = tiny("marian"), pairs(8, 1)
    before = bare_loss(model, dev)
    summary = train(model, "toy", pairs(48, 0), dev, max_steps=12, output_dir=str(tmp_path), r=4,
                    adapter_options={"targets": "all-linear"}, **FAST)
    assert summary["best_metrics"]["loss"] < before - 0.05
    assert model.get_adapter("toy").config.r == 4  # family options pass straight through train()


def test_full_finetuning_loss_falls_and_saves_pretrained(tmp_path):
    model, dev = tiny("llama"), pairs(8, 1)
    before = bare_loss(model, dev)
    summary = train(model, None, pairs(48, 0), dev, full=True, max_steps=8, output_dir=str(tmp_path),
                    **{**FAST, "lr": 3e-3})
    assert summary["method"] == "full" and summary["trainable_parameters"] == summary["backbone_parameters"]
    assert summary["best_metrics"]["loss"] < before - 0.05
    reloaded = ak.load(summary["output"])  # save_pretrained + tokenizer
    assert abs(bare_loss(reloaded, dev) - summary["best_metrics"]["loss"]) < 1e-4
    assert not any(p.requires_grad for p in model.model.parameters())


def test_mixed_precision_after_full_precision_in_one_process(tmp_path):
    model = tiny("llama")
    train(model, "a", pairs(16, 0), None, max_steps=1, output_dir=str(tmp_path / "a"), **FAST)
    summary = train(model, "b", pairs(16, 0), pairs(4, 1), max_steps=2, output_dir=str(tmp_path / "b"),
                    **{**FAST, "mixed_precision": "bf16"})
    assert summary["steps"] == 2 and summary["best_metrics"]["loss"] < 10
    assert "_original_forward" not in vars(model)  # accelerate's autocast wrapper is taken off again


def test_head_only_at_target_positions_is_exact():
    model = tiny("gemma3")
    from adaptkit.data import Collator, encode_pairs

    enc, _ = encode_pairs(pairs(4, 3), model.tokenizer, "decoder")
    batch = Collator(model.tokenizer, "decoder")([enc[i] for i in range(4)])
    sliced = model(**loss_inputs(batch, slice_head=True), adapter=None)
    full = model(**loss_inputs(batch, slice_head=False), adapter=None)
    assert sliced.logits.shape[0] == label_tokens(batch["labels"], "decoder") < full.logits[..., 0].numel()
    torch.testing.assert_close(sliced.loss, full.loss)


# -- early stopping, best adapter ---------------------------------------------------------------

def test_early_stopping_stops_after_patience(tmp_path):
    # lr 0: the loss cannot improve after the first evaluation, so patience 1 stops at the second.
    summary = train(tiny("llama"), "toy", pairs(48, 0), pairs(8, 1), max_steps=20, output_dir=str(tmp_path),
                    **{**FAST, "lr": 0.0, "eval_every": 2, "patience": 1, "metric": "loss"})
    assert summary["stopped_early"] and summary["steps"] == 4 and summary["best_step"] == 2
    log = [json.loads(line) for line in (tmp_path / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [2, 4] and log[0]["best"] and not log[1]["best"]


def test_best_adapter_reloads_with_recorded_metric(tmp_path):
    dev = pairs(6, 1)
    summary = train(tiny("llama"), "toy", pairs(48, 0), dev, max_steps=9, output_dir=str(tmp_path),
                    **{**FAST, "generate": True, "eval_every": 3, "metric": "chrf", "max_new_tokens": 8})
    info = ak.read_adapter_info(summary["output"])
    assert info["metrics"]["step"] == summary["best_step"]
    assert info["training"]["max_steps"] == 9 and info["src_lang"] == "en" and info["domain"] == "toy"
    fresh = tiny("llama")
    name = fresh.load_adapter(summary["output"])
    again = evaluate(fresh, dev, name, max_new_tokens=8)
    assert again["chrf"] == pytest.approx(info["metrics"]["chrf"], abs=1e-4)
    assert again["loss"] == pytest.approx(info["metrics"]["loss"], abs=1e-4)


# -- config file and flags ----------------------------------------------------------------------

def test_config_file_then_flags(tmp_path):
    import argparse

    (tmp_path / "run.toml").write_text('[train]\nbackbone = "x"\nlr = 0.001\nmethod = "lora"\n'
                                       'adapter_options = { r = 4 }\ngenerate = true\n')
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    cfg = config_from_args(parser.parse_args(["--config", str(tmp_path / "run.toml"), "--lr", "0.01",
                                              "--no-generate", "--max-steps", "5"]))
    assert (cfg.backbone, cfg.lr, cfg.generate, cfg.max_steps, cfg.adapter_options) == ("x", 0.01, False, 5, {"r": 4})
    assert cfg.best_metric == "loss"
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1})


# -- same adapter however the run is cut or spread ----------------------------------------------

def _adapter_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-4) -> None:
    """Adam divides by sqrt(v): where a gradient is near zero, float summation-order noise grows to
    ~1e-5 in the weights after a few steps. A different batch or normalisation moves them ~lr = 1e-2."""
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-3, msg=key)


def test_gradient_accumulation_equals_a_bigger_batch(tmp_path):
    big = train(tiny("llama"), "toy", pairs(48, 0), None, max_steps=4, output_dir=str(tmp_path / "big"), **FAST)
    small = train(tiny("llama"), "toy", pairs(48, 0), None, max_steps=4, output_dir=str(tmp_path / "acc"),
                  **{**FAST, "batch_size": 4, "grad_accum": 2})
    _assert_same(_adapter_tensors(big["output"]), _adapter_tensors(small["output"]))


RUNNER = """
import sys, time
from adaptkit.training.trainer import Recipe
delay = float(sys.argv.pop(1))
step = Recipe._optimizer_step
Recipe._optimizer_step = lambda self, window: (time.sleep(delay), step(self, window))[1]
from adaptkit.cli.train import main
sys.exit(main())
"""


def _cli_args(backbone_dir: Path, data_dir: Path, out: Path, **extra: object) -> list[str]:
    args = ["train", "--backbone", str(backbone_dir), "--data", str(data_dir), "--adapter", "toy",
            "--output-dir", str(out), "--lr", "0.01", "--max-steps", "12", "--eval-every", "4",
            "--no-generate", "--no-progress"]
    for key, value in extra.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_sigkilled_run_resumes_to_the_same_adapter(tmp_path, backbone_dir, data_dir):
    reference = train(ak.load(backbone_dir), "toy", str(data_dir), max_steps=12, eval_every=4, lr=0.01,
                      generate=False, progress=False, output_dir=str(tmp_path / "ref"))
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    out = tmp_path / "killed"
    command = [sys.executable, str(runner), "0.4"] + _cli_args(backbone_dir, data_dir, out, checkpoint_every=3)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 90
    while not (out / "checkpoints" / "latest.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint within 90 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = json.loads((out / "checkpoints" / "latest.json").read_text())["step"]
    assert killed_at < 12
    done = subprocess.run([sys.executable, str(runner), "0"] + command[3:], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {out / 'checkpoints'}" in done.stdout and f"(step {killed_at})" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["best_step"] == reference["best_step"]
    _assert_same(_adapter_tensors(reference["output"]), _adapter_tensors(summary["output"]))
    log = [json.loads(line)["step"] for line in (out / "eval_log.jsonl").read_text().splitlines()]
    assert log == [4, 8, 12]  # evaluations after the checkpoint were not logged twice


def test_two_processes_give_the_same_adapter_as_one(tmp_path, backbone_dir, data_dir):
    one = train(ak.load(backbone_dir), "toy", str(data_dir), max_steps=6, eval_every=3, lr=0.01, batch_size=8,
                generate=False, progress=False, output_dir=str(tmp_path / "one"))
    out = tmp_path / "two"
    # On a CPU-only machine accelerate launches several processes through torchrun with --multi_gpu
    # (--cpu alone means one process, or MPI); the trainer joins them over gloo.
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "adaptkit.cli.train"] + _cli_args(backbone_dir, data_dir, out, batch_size=4, max_steps=6,
                                                        eval_every=3)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    info = ak.read_adapter_info(summary["output"])
    assert info["training"]["num_processes"] == 2
    # Same global batch (2 × 4 = 8), loss normalised over the whole step's target tokens: the
    # adapters agree up to float summation order in the gloo all-reduce.
    _assert_same(_adapter_tensors(one["output"]), _adapter_tensors(summary["output"]))
    assert summary["best_metrics"]["loss"] == pytest.approx(one["best_metrics"]["loss"], abs=1e-4)


def test_cli_train_from_yaml_then_eval(tmp_path, backbone_dir, data_dir):
    from adaptkit.cli.train import main

    run = tmp_path / "run"
    (tmp_path / "run.yaml").write_text(f"backbone: {backbone_dir}\ndata: {data_dir}\nadapter: toy\nmax_steps: 4\n"
                                       f"generate: false\nprogress: false\nresume: false\noutput_dir: {run}\n")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--lr", "0.05"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    info = ak.read_adapter_info(summary["output"])
    assert summary["steps"] == 4 and info["training"]["lr"] == 0.05 and info["tgt_lang"] == "de"

    def scores(*args: str) -> dict:
        out = tmp_path / "scores.json"
        assert main(["eval", "--data", str(data_dir), "--split", "dev", "--no-generate", "--output", str(out),
                     *args]) == 0
        return json.loads(out.read_text())

    adapted = scores("--adapter", summary["output"])  # the backbone comes from the adapter file
    assert adapted["loss"] == pytest.approx(info["metrics"]["loss"], abs=1e-4)
    assert scores("--backbone", str(backbone_dir))["loss"] > adapted["loss"] + 0.05


def test_interrupted_adalora_run_resumes_to_the_same_adapter(tmp_path, backbone_dir, data_dir, monkeypatch):
    """AdaLoRA's masks, scores and counters live outside its parameters: checkpoints must carry them.

    The schedule ends at step 5, before the step-6 checkpoint: a resume that forgot it would reallocate anew.
    """
    from adaptkit.training.trainer import Recipe

    options = dict(method="adalora", init_r=4, target_r=2, total_steps=12, tinit=1, tfinal=7, max_steps=12,
                   eval_every=None, checkpoint_every=3, lr=0.01, generate=False, progress=False)
    reference = train(ak.load(backbone_dir), "toy", str(data_dir), output_dir=str(tmp_path / "ref"), **options)
    original = Recipe._optimizer_step

    def crash_at_step_8(self, window):
        if self.state.step == 7:
            raise KeyboardInterrupt
        return original(self, window)

    monkeypatch.setattr(Recipe, "_optimizer_step", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        train(ak.load(backbone_dir), "toy", str(data_dir), output_dir=str(tmp_path / "cut"), **options)
    monkeypatch.setattr(Recipe, "_optimizer_step", original)
    resumed = train(ak.load(backbone_dir), "toy", str(data_dir), output_dir=str(tmp_path / "cut"), **options)
    _assert_same(_adapter_tensors(reference["output"]), _adapter_tensors(resumed["output"]))


def test_routing_keys_come_from_the_data_only_where_every_row_agrees(tmp_path):
    """A corpus mixing two domains trains the pair's general adapter: no domain in its file (it used to take
    the first row's, so a 'mixed' adapter could be routed as if it were one domain's)."""
    mixed = concatenate_datasets([pairs(8, 0), pairs(8, 1).map(lambda row: {"domain": "other"})]).shuffle(seed=0)
    summary = ak.train(tiny("llama"), "mixed", mixed, None, max_steps=1, output_dir=str(tmp_path / "m"), **FAST)
    info = ak.read_adapter_info(summary["output"])
    assert (info.get("src_lang"), info.get("tgt_lang"), info.get("domain")) == ("en", "de", None)
    one = ak.train(tiny("llama"), "one", pairs(8, 0), None, max_steps=1, output_dir=str(tmp_path / "o"), **FAST)
    assert ak.read_adapter_info(one["output"])["domain"] == "toy"

"""`adaptkit bench sweep` on a tiny llama: killed with SIGKILL mid-training and again mid-scoring, it resumes
from the trainer's checkpoint and its own JSON, never scores a finished checkpoint twice, and ends with the
same weights and translations as a run nobody interrupted. Plus the convergence rule and the report."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adaptkit.bench.sweep import SweepConfig, flattened, next_steps, run_sweep, sweep_data
from adaptkit.bench.sweep_report import write_sweep_report
from adaptkit.cli.bench import add_bench_commands, sweep_config_from_args
from adaptkit.evaluation.scoring import bootstrap_interval, translation_metrics
from test_train import pairs
from tiny import saved_tiny_llama

# Runs the CLI with two stalls a test can kill at: before optimizer step BLOCK_TRAIN_STEP, and after training
# to BLOCK_SCORE_STEP but before scoring it. The sweep's worker is forked, so it inherits the patches.
STALLING_CLI = textwrap.dedent("""
    import os, sys, time
    import adaptkit.bench.sweep as sweep
    from adaptkit.training import trainer
    from adaptkit.cli import main

    train_step, score_step = int(os.environ["BLOCK_TRAIN_STEP"]), int(os.environ["BLOCK_SCORE_STEP"])

    def stall(where):
        with open(os.environ["MARKER"], "w") as f:
            f.write(where)
        time.sleep(600)

    optimizer_step = trainer.Recipe._optimizer_step
    def blocking_step(self, window):
        if self.state.step + 1 == train_step:
            stall("train")
        return optimizer_step(self, window)
    trainer.Recipe._optimizer_step = blocking_step

    train = sweep.train
    def blocking_train(*args, **kwargs):
        summary = train(*args, **kwargs)
        if kwargs["max_steps"] == score_step:
            stall("score")
        return summary
    sweep.train = blocking_train
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    for name, seed in (("help", 0), ("ui", 50)):
        (root / name).mkdir()
        for split, n, offset in (("train", 96, 0), ("dev", 6, 1), ("test", 8, 2)):
            pairs(n, seed + offset).to_json(str(root / name / f"{split}.jsonl"))
    saved_tiny_llama(root / "backbone")
    return root


def options(corpus: Path, out: Path) -> dict:
    return dict(backbone=str(corpus / "backbone"), methods=["lora-r16-all", "lora-r8-all"],
                train_data=str(corpus / "help"), dev=str(corpus / "help"), test=str(corpus / "help"),
                ood_tests=[str(corpus / "ui")],
                forgetting_test=None, checkpoints=[4, 8, 12], warmup_steps=2, checkpoint_every=2, flat_delta=None,
                lrs={"lora": 1e-2}, max_new_tokens=8, resamples=20, results_dir=str(out / "results"),
                work_dir=str(out / "work"), progress=False)


def cli_args(opts: dict) -> list[str]:
    args = ["bench", "sweep"]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            args += [flag, *map(str, value)]
        elif isinstance(value, dict):
            args += [flag, ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            args += [flag, "none" if value is None else str(value)]
    return args


def run_until_stalled(opts: dict, tmp: Path, train_step: int, score_step: int) -> str:
    """Start the CLI, wait until it stalls where asked, SIGKILL its whole process group; returns where."""
    script, marker = tmp / "stalling_cli.py", tmp / "stalled"
    script.write_text(STALLING_CLI)
    marker.unlink(missing_ok=True)
    env = {**os.environ, "BLOCK_TRAIN_STEP": str(train_step), "BLOCK_SCORE_STEP": str(score_step),
           "MARKER": str(marker), "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, str(script), *cli_args(opts)], env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if process.poll() is not None:
            raise AssertionError(f"the sweep exited ({process.returncode}) before stalling: {process.stderr.read()}")
        assert time.monotonic() < deadline, "the sweep never reached its stall"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    return marker.read_text()


def test_sweep_resumes_after_sigkill_without_rescoring(corpus, tmp_path):
    opts = options(corpus, tmp_path / "killed")
    cfg = SweepConfig(**opts)
    run_file = cfg.run_path("lora-r16-all")

    # 1. killed before optimizer step 6: checkpoint 4 is scored, the trainer's last checkpoint is step 4
    assert run_until_stalled(opts, tmp_path, train_step=6, score_step=0) == "train"
    first = json.loads(run_file.read_text())
    assert [c["step"] for c in first["checkpoints"]] == [4]
    bare_before = cfg.run_path("bare").read_text()

    # 2. resumed, then killed after training to 12 but before scoring it
    assert run_until_stalled(opts, tmp_path, train_step=0, score_step=12) == "score"
    second = json.loads(run_file.read_text())
    assert [c["step"] for c in second["checkpoints"]] == [4, 8]
    assert second["checkpoints"][0] == first["checkpoints"][0]  # not scored again
    assert second["segments"][-1] == {**second["segments"][-1], "to_step": 8, "steps_run": 4}  # from step 4, not 0

    # 3. resumed to the end
    finished = subprocess.run([sys.executable, "-m", "adaptkit.cli.bench", *cli_args(opts)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}, timeout=300)
    assert finished.returncode == 0, finished.stderr
    final = json.loads(run_file.read_text())
    assert [c["step"] for c in final["checkpoints"]] == [4, 8, 12]
    assert final["checkpoints"][:2] == second["checkpoints"]
    assert final["segments"][-1]["to_step"] == 12 and final["segments"][-1]["steps_run"] == 0  # trained before kill
    assert cfg.run_path("bare").read_text() == bare_before

    # the same weights and translations as a run nobody interrupted
    reference_opts = options(corpus, tmp_path / "reference")
    run_sweep(SweepConfig(**reference_opts), fork=False)
    reference = json.loads(SweepConfig(**reference_opts).run_path("lora-r16-all").read_text())
    for got, want in zip(final["checkpoints"], reference["checkpoints"]):
        assert got["dev_loss"] == want["dev_loss"]
        for key in ("dev", "test", f"ood:{corpus / 'ui'}"):
            assert got[key]["hypotheses"] == want[key]["hypotheses"]
            assert got[key]["chrf"] == want[key]["chrf"]
    assert len({c["dev_loss"] for c in final["checkpoints"]}) == 3  # it trained: the loss moved each segment
    killed_adapter = tmp_path / "killed" / "work" / cfg.name / "lora-r16-all" / "lora-r16-all.safetensors"
    reference_adapter = tmp_path / "reference" / "work" / cfg.name / "lora-r16-all" / "lora-r16-all.safetensors"
    killed_tensors, reference_tensors = load_file(killed_adapter), load_file(reference_adapter)
    assert killed_tensors.keys() == reference_tensors.keys()
    assert all(torch.equal(killed_tensors[k], reference_tensors[k]) for k in killed_tensors)  # bit for bit

    # the report reads the run files alone
    paths = write_sweep_report(cfg)
    report = json.loads(paths["json"].read_text())
    lora = next(r for r in report["runs"] if r["method"] == "lora-r16-all")
    assert [c["step"] for c in lora["checkpoints"]] == [4, 8, 12]
    for c in lora["checkpoints"]:
        assert c["test_sentences"] == 8 and c["chrf_low"] <= c["chrf"] <= c["chrf_high"]
    pair = next(p for p in report["pairs"] if p["b"] == "lora-r8-all")
    assert [x["step"] for x in pair["by_step"]] == [4, 8, 12] and all(x["low"] <= x["high"] for x in pair["by_step"])
    assert paths["plot"].stat().st_size > 0 and "| lora-r16-all |" in paths["markdown"].read_text()


def test_convergence_rule_reads_the_last_doubling():
    cfg = SweepConfig(checkpoints=[50, 100, 200, 400], flat_delta=0.5, methods=["full"])
    run = {"method": "full", "converged_at": None, "checkpoints": []}
    for step, chrf in ((50, 30.0), (100, 40.0), (200, 44.0)):
        run["checkpoints"].append({"step": step, "dev": {"chrf": chrf}})
        assert not flattened(cfg, run)
    run["checkpoints"].append({"step": 400, "dev": {"chrf": 44.4}})  # +0.4 over 200 → 400
    assert flattened(cfg, run)
    assert next_steps(cfg, {**run, "converged_at": 400}) == []
    assert next_steps(cfg, {**run, "checkpoints": run["checkpoints"][:2]}) == [200, 400]


def test_config_refuses_a_warmup_past_the_first_checkpoint_and_unknown_methods():
    with pytest.raises(ValueError, match="warm-up .* must end before the first checkpoint"):
        SweepConfig(checkpoints=[20, 40], warmup_steps=30)
    with pytest.raises(ValueError, match="unknown sweep method"):
        SweepConfig(methods=["lora-r99"])
    with pytest.raises(FileNotFoundError, match="adaptkit corpus build"):
        sweep_data(SweepConfig(train_data="runs/corpora/nowhere/en-de"))


def test_bootstrap_interval_brackets_the_corpus_score():
    refs = [f"das ist satz nummer {i} mit einigen woertern" for i in range(40)]
    hyps = [r if i % 3 else r.replace("satz", "ein satz") for i, r in enumerate(refs)]
    low, high = bootstrap_interval(hyps, refs, "chrf", resamples=200, seed=1)
    score = translation_metrics(hyps, refs)["chrf"]
    assert low < score < high and high - low < 10
    assert bootstrap_interval(refs, refs, "chrf", resamples=50) == (100.0, 100.0)


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "benchmarks" / "configs").glob("sweep-*.toml")),
                         ids=lambda p: p.name)
def test_shipped_sweep_configs_are_valid(path):
    parser = argparse.ArgumentParser()
    add_bench_commands(parser.add_subparsers(dest="command"))
    cfg = sweep_config_from_args(parser.parse_args(["bench", "sweep", "--config", str(path), "--methods", "prefix",
                                                    "--checkpoints", "60", "120"]))
    assert cfg.name == path.stem and cfg.methods == ["prefix"] and cfg.checkpoints == [60, 120]
    assert cfg.test_sentences >= 200  # headline comparisons need ≥ 200 sentences

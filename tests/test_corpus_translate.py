"""File translation in shards: 2 workers (spawned processes, `accelerate launch`, Ray actors) give the
output of 1 line for line; a run SIGKILLed mid-way and rerun finishes with the same output without
translating its finished shards again; a rerun with other settings or another input is refused; one
output line per input line, blank lines and the (missing) trailing newline kept."""

from __future__ import annotations

import io
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import transformers as tf

import adaptkit as ak
from adaptkit.cli import main as cli
from adaptkit.tasks.corpus_translate import HOLD_ENV, ResumeMismatch, translate_file
from adaptkit.tasks.filerows import ModelSpec, RowSettings
from adaptkit.tasks.translate import Translator
from test_train import tiny_tokenizer
from tiny import _seq2seq_common

LINES = 2000
SHARD = 100
SETTINGS = RowSettings(src_lang="en", tgt_lang="de", num_beams=1, max_new_tokens=6, batch_size=16)
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
ONE = dict(shard_lines=SHARD, progress=False, threads=1)  # one torch thread a worker: no OpenMP spin on a shared CPU


@pytest.fixture(autouse=True)
def _torch_threads():
    """A worker in this process sets torch's thread count; the tests after it get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny Marian backbone saved like a real one, two LoRA adapters (en→de, domains it / bible) and a
    2,000-line input with blank lines.

    Weights drawn with std 1 (not 0.02): the default tiny Marian writes the same words for every input,
    which would let a shuffled output pass; this one writes ~60 different lines per 300 inputs."""
    root = tmp_path_factory.mktemp("corpus")
    torch.manual_seed(0)
    marian = tf.MarianMTModel(tf.MarianConfig(**_seq2seq_common(), init_std=1.0)).eval()
    model = ak.AdaptedModel(marian, tiny_tokenizer("seq2seq"))
    model.model.save_pretrained(root / "backbone")
    model.tokenizer.save_pretrained(root / "backbone")
    model = ak.load(root / "backbone", store=root / "store")
    generator = torch.Generator().manual_seed(3)
    for domain in ("it", "bible"):
        model.add_adapter(f"en-de/{domain}", ak.LoRA(r=4, targets="all-linear"))
        with torch.no_grad():
            for p in model.adapter_parameters(f"en-de/{domain}"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
        model.save_adapter(f"en-de/{domain}", src_lang="en", tgt_lang="de", domain=domain)
    rng = random.Random(5)
    lines = ["" if i % 97 == 5 else "   " if i == 777 else " ".join(f"a{rng.randrange(30)}"
                                                                    for _ in range(rng.randint(2, 8)))
             for i in range(LINES)]
    (root / "input.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"root": root, "backbone": root / "backbone", "store": root / "store", "input": root / "input.txt",
            "adapter": root / "store" / "en-de" / "it.safetensors"}


def spec(files: dict[str, Path]) -> ModelSpec:
    return ModelSpec(str(files["backbone"]), adapter_files=(str(files["adapter"]),))


@pytest.fixture(scope="module")
def reference(files) -> list[str]:
    """One process, in this one: the output every other run must equal."""
    out = files["root"] / "one.txt"
    report = translate_file(files["input"], out, spec(files), SETTINGS, workers=1, **ONE)
    assert (report.lines, report.shards, report.skipped, report.translated) == (LINES, 20, 0, 20)
    assert not (files["root"] / "one.txt.shards").exists()  # merged, then cleaned up
    return out.read_text(encoding="utf-8").split("\n")


def test_one_worker_translates_every_line_with_its_adapter(files, reference):
    inputs = files["input"].read_text(encoding="utf-8").split("\n")
    assert len(reference) == len(inputs) == LINES + 1 and reference[-1] == ""  # N lines, trailing newline kept
    blank = [i for i, line in enumerate(inputs[:LINES]) if not line.strip()]
    assert blank and all(reference[i] == "" for i in blank)
    model = ak.load(files["backbone"])
    model.load_adapter(files["adapter"])
    translator = Translator(model, batch_size=SETTINGS.batch_size)
    for shard in (0, 13):  # each shard batched on its own, as the workers do
        rows = [i for i in range(shard * SHARD, (shard + 1) * SHARD) if inputs[i].strip()]
        expected = translator.translate([inputs[i] for i in rows], "en", "de", adapter="en-de/it", num_beams=1,
                                        max_new_tokens=6)
        assert [reference[i] for i in rows] == expected
    assert len(set(reference)) > 100  # the output depends on the input: a shuffled merge would show


def test_two_processes_equal_one_line_for_line(files, reference, tmp_path):
    out = tmp_path / "two.txt"
    started = time.perf_counter()
    report = translate_file(files["input"], out, spec(files), SETTINGS, workers=2, launcher="processes", **ONE)
    print(f"2 spawned workers: {time.perf_counter() - started:.1f} s")
    assert report.translated == 20
    assert out.read_text(encoding="utf-8").split("\n") == reference


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the command and every process it started (torchrun's ranks live in sessions of their own)."""
    tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    for proc in tree:
        proc.kill()
    psutil.wait_procs(tree, timeout=30)


@pytest.mark.parametrize("launcher", ["accelerate"])
def test_killed_run_resumes_without_redoing_shards(files, reference, tmp_path, capsys, launcher):
    out = tmp_path / "out.txt"
    shards = tmp_path / "out.txt.shards"
    args = ["translate", "--adapter", str(files["adapter"]), "--src", "en", "--tgt", "de", "--input",
            str(files["input"]), "--output", str(out), "--shard-lines", str(SHARD), "--batch-size", "16",
            "--max-new-tokens", "6", "--threads", "1", "--quiet"]
    command = [sys.executable, "-m", "adaptkit.cli.translate", *args[1:], "--workers", "2", "--launcher", launcher]
    # The hook holds every worker once 3 shards are on disk, so the kill surely lands mid-run.
    process = subprocess.Popen(command, env={**ENV, HOLD_ENV: "3"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.time() + 150
    while len(list(shards.glob("*.txt"))) < 3:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no 3 shards within 150 s"
        time.sleep(0.05)
    _kill_tree(process)
    process.stderr.close()
    finished = {path.name: path.stat().st_mtime_ns for path in shards.glob("*.txt")}
    assert 3 <= len(finished) < 20 and not out.exists()

    assert cli([*args, "--max-new-tokens", "7"]) == 2  # other settings: refused, nothing touched
    error = capsys.readouterr().err
    assert f"{shards} holds {len(finished)} finished shards of another run" in error
    assert "max_new_tokens 6 (now 7)" in error and "--restart" in error
    assert {path.name: path.stat().st_mtime_ns for path in shards.glob("*.txt")} == finished

    assert cli(args) == 0  # the same command: only the missing shards
    assert f"translated {LINES} lines in 20 shards, {len(finished)} of them done by an earlier run" in (
        capsys.readouterr().err)
    assert out.read_text(encoding="utf-8").split("\n") == reference


def test_other_input_or_settings_refused_until_restart(files, tmp_path):
    out = tmp_path / "out.txt"
    options = ONE
    small = tmp_path / "small.txt"
    small.write_text("a1 a2\n\na3\n", encoding="utf-8")
    translate_file(small, out, spec(files), SETTINGS, keep_shards=True, **options)
    first = out.read_text(encoding="utf-8").split("\n")
    other = tmp_path / "other.txt"
    other.write_text("a1 a2\n\na4\n", encoding="utf-8")
    with pytest.raises(ResumeMismatch, match=r"holds 1 finished shards of another run: another input .*--restart"):
        translate_file(other, out, spec(files), SETTINGS, **options)
    with pytest.raises(ResumeMismatch, match=r"shard_lines 100 \(now 50\)"):
        translate_file(small, out, spec(files), SETTINGS, **{**options, "shard_lines": 50})
    report = translate_file(other, out, spec(files), SETTINGS, restart=True, **options)
    second = out.read_text(encoding="utf-8").split("\n")
    assert report.skipped == 0 and len(second) == 4 and second[:2] == first[:2] and second[1] == ""


def test_line_count_and_last_newline_kept(files, tmp_path):
    for text in ("", "\n", "a1 a2", "a1\n\n a2 \n\na3", "a1\r\na2\r\n", "\n\n"):
        source = tmp_path / "in.txt"
        source.write_bytes(text.encode())
        out = tmp_path / "out.txt"
        translate_file(source, out, spec(files), SETTINGS, **{**ONE, "shard_lines": 2})
        lines_in, lines_out = text.split("\n"), out.read_text(encoding="utf-8").split("\n")
        assert len(lines_out) == len(lines_in), text  # N lines in, N out, and a last newline where there was one
        assert all(o == "" for i, o in zip(lines_in, lines_out) if not i.strip()), text


def test_stdin_to_stdout_gives_the_lines_a_file_run_gives(files, reference, tmp_path, capsys, monkeypatch):
    inputs = files["input"].read_text(encoding="utf-8").split("\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(inputs[:SHARD])))  # no last newline: none written
    assert cli(["translate", "--adapter", str(files["adapter"]), "--src", "en", "--tgt", "de", "--max-new-tokens",
                "6", "--threads", "1", "--quiet"]) == 0
    assert capsys.readouterr().out.split("\n") == reference[:SHARD]
    assert cli(["translate", "--adapter", str(files["adapter"]), "--src", "en", "--tgt", "de", "--workers", "2"]) == 2
    assert "--workers needs an input file and --output FILE" in capsys.readouterr().err


def test_jsonl_rows_routed_per_domain_across_shards(files, tmp_path):
    rows = [{"text": f"a{i} a{i + 1} a{i + 2}", "domain": "it" if i % 3 else "bible", "id": i} for i in range(9)]
    source = tmp_path / "rows.jsonl"
    source.write_text("\n".join(json.dumps(row) for row in rows[:4]) + "\n\n"
                      + "\n".join(json.dumps(row) for row in rows[4:]) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    store = ModelSpec(str(files["backbone"]), store=str(files["store"]))
    settings = RowSettings(format="jsonl", src_lang="en", tgt_lang="de", num_beams=1, max_new_tokens=6)
    translate_file(source, out, store, settings, workers=1, **{**ONE, "shard_lines": 3})
    written = out.read_text(encoding="utf-8").split("\n")
    assert written[4] == "" and len(written) == 11
    got = [json.loads(line) for line in written if line]
    model = ak.load(files["backbone"], store=files["store"])
    translator = Translator(model)
    for row, result in zip(rows, got):
        assert result["id"] == row["id"] and result["adapter"] == f"en-de/{row['domain']}"
        assert [result["translation"]] == translator.translate([row["text"]], "en", "de", adapter=result["adapter"],
                                                               num_beams=1, max_new_tokens=6)


def test_ray_actors_equal_one_process(files, reference, tmp_path):
    ray = pytest.importorskip("ray")
    out = tmp_path / "ray.txt"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        report = translate_file(files["input"], out, spec(files), SETTINGS, workers=2, launcher="ray",
                                cpus_per_worker=1, **ONE)
    finally:
        ray.shutdown()
    assert report.translated == 20
    assert out.read_text(encoding="utf-8").split("\n") == reference


def test_quantized_backbone_from_the_command_line(files, tmp_path, capsys):
    """`--quantize int8` gives what `ak.load(..., quantize="int8")` + Translator gives, and the manifest records
    it: resuming the same output on the float backbone is refused."""
    pytest.importorskip("torchao")
    inputs = files["input"].read_text(encoding="utf-8").split("\n")[:40]
    small = tmp_path / "small.txt"
    small.write_text("\n".join(inputs) + "\n", encoding="utf-8")
    out = tmp_path / "int8.txt"
    assert cli(["translate", "--input", str(small), "--output", str(out), "--adapter", str(files["adapter"]),
                "--backbone", str(files["backbone"]), "--src", "en", "--tgt", "de", "--max-new-tokens", "6",
                "--quantize", "int8", "--threads", "1", "--quiet", "--keep-shards"]) == 0
    model = ak.load(files["backbone"], quantize="int8")
    model.load_adapter(files["adapter"])
    rows = [i for i, line in enumerate(inputs) if line.strip()]
    expected = Translator(model, batch_size=SETTINGS.batch_size).translate(
        [inputs[i] for i in rows], "en", "de", adapter="en-de/it", num_beams=1, max_new_tokens=6)
    assert [out.read_text(encoding="utf-8").split("\n")[i] for i in rows] == expected
    with pytest.raises(ResumeMismatch, match=r"quantize 'int8' \(now None\)"):
        translate_file(small, out, ModelSpec(str(files["backbone"]), adapter_files=(str(files["adapter"]),)),
                       SETTINGS, **ONE)

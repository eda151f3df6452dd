"""Translate a large file in shards: data-parallel over workers, resumable, merged in input order.

    input ──► shards of `shard_lines` lines (byte ranges found in one pass, with the sha256)
          ──► workers, each with its own backbone + adapters (corpus_workers.py)
          ──► OUTPUT.shards/000017.txt, written atomically (temp file + rename)
          ──► OUTPUT: the shards concatenated in input order, one output line per input line

The work directory beside the output holds `manifest.json`: the input's sha256 and line count,
the shard size, the backbone and every adapter's checksum, and the generation settings. A rerun
reads it: a shard whose file exists is done and is not translated again. A manifest of another
run (other input, adapters or settings) is refused, because mixing shards of two runs gives an
output no single run produced, until the rerun asks for a restart (`--restart`). A shard depends
only on its own lines and the settings (batches never cross a shard), so any number of workers
gives the output one worker gives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from tqdm.auto import tqdm

from adaptkit.core.atomicfile import write_atomic, write_atomic_chunks
from adaptkit.core.errors import AdapterError
from adaptkit.tasks import corpus_workers
from adaptkit.tasks.filerows import Candidates, LineTranslator, ModelSpec, RowSettings

__all__ = ["FileJob", "FileReport", "ModelSpec", "ResumeMismatch", "RowSettings", "translate_file"]

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
Launcher = Literal["processes", "accelerate", "ray"]


class ResumeMismatch(AdapterError):
    """The work directory holds shards of another run."""


@dataclass(frozen=True)
class Plan:
    """The input cut into shards: byte offsets of every shard's first line, and the end of the file."""

    sha256: str
    lines: int
    trailing_newline: bool
    shard_lines: int
    offsets: tuple[int, ...]

    @property
    def num_shards(self) -> int:
        return len(self.offsets) - 1

    def shard_size(self, index: int) -> int:
        return min(self.shard_lines, self.lines - index * self.shard_lines)


def scan(path: str | Path, shard_lines: int) -> Plan:
    """One pass over the input: its sha256, line count and shard offsets ("\\n" ends a line, nothing else)."""
    if shard_lines < 1:
        raise AdapterError(f"shard_lines must be at least 1; got {shard_lines}")
    digest = hashlib.sha256()
    offsets, position, count, last = [0], 0, 0, b"\n"
    with open(path, "rb") as handle:
        for line in handle:
            digest.update(line)
            position += len(line)
            count += 1
            last = line
            if count % shard_lines == 0:
                offsets.append(position)
    if offsets[-1] != position:
        offsets.append(position)
    return Plan(digest.hexdigest(), count, last.endswith(b"\n"), shard_lines, tuple(offsets))


def model_fingerprint(spec: ModelSpec, candidates: Candidates) -> dict[str, Any]:
    """What decides the weights a row runs with: the backbone, and each adapter's checksum and backbone."""
    return {"backbone": spec.backbone, "dtype": spec.dtype, "device": spec.device,
            "quantize": spec.quantize,
            "adapters": {name: {"sha256": info.get("sha256"),
                                "backbone": (info.get("backbone") or {}).get("shapes_sha256")}
                         for name, info in sorted(candidates)}}


@dataclass(frozen=True)
class FileJob:
    """Everything a worker needs to translate any shard; picklable, so it travels to processes and actors."""

    input: str
    work: str
    spec: ModelSpec
    settings: RowSettings
    candidates: Candidates
    plan: Plan

    def manifest(self) -> dict[str, Any]:
        plan = self.plan
        return {"version": MANIFEST_VERSION,
                "input": {"sha256": plan.sha256, "lines": plan.lines, "trailing_newline": plan.trailing_newline},
                "shard_lines": plan.shard_lines, "model": model_fingerprint(self.spec, self.candidates),
                "settings": asdict(self.settings), "offsets": list(plan.offsets)}

    def shard_path(self, index: int) -> Path:
        return Path(self.work) / f"{index:06d}.txt"

    def done(self) -> list[int]:
        return [i for i, there in enumerate(self._on_disk()) if there]

    def pending(self) -> list[int]:
        return [i for i, there in enumerate(self._on_disk()) if not there]

    def _on_disk(self) -> list[bool]:
        """One directory listing, not a stat per shard: the progress bar asks after every shard."""
        try:
            names = {entry.name for entry in os.scandir(self.work)}
        except FileNotFoundError:
            names = set()
        return [self.shard_path(i).name in names for i in range(self.plan.num_shards)]

    def new_worker(self, device: str | None = None, threads: int | None = None) -> LineTranslator:
        return LineTranslator(self.spec, self.settings, self.candidates, device=device, threads=threads)

    def read_shard(self, index: int) -> list[str]:
        start, end = self.plan.offsets[index], self.plan.offsets[index + 1]
        with open(self.input, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        pieces = data.split(b"\n")
        if data.endswith(b"\n"):
            pieces.pop()
        first = index * self.plan.shard_lines + 1
        lines = []
        for number, piece in enumerate(pieces, first):
            try:
                lines.append(piece.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise AdapterError(f"{self.input}, line {number} is not UTF-8 ({error.reason} at byte "
                                   f"{error.start}); convert the file to UTF-8 first") from None
        if len(lines) != self.plan.shard_size(index):
            raise AdapterError(f"{self.input} changed while it was being translated (shard {index} has "
                               f"{len(lines)} lines, {self.plan.shard_size(index)} were counted); rerun")
        return lines

    def translate_shard(self, worker: LineTranslator, index: int) -> list[str]:
        """The output lines of shard `index` (not written: see `write_shard`)."""
        _hold_for_tests(self)
        return worker.translate_lines(self.read_shard(index), index * self.plan.shard_lines + 1)

    def write_shard(self, index: int, lines: list[str]) -> int:
        if len(lines) != self.plan.shard_size(index):
            raise AdapterError(f"shard {index}: {len(lines)} output lines for {self.plan.shard_size(index)} input "
                               "lines")
        write_atomic(self.shard_path(index), "".join(line + "\n" for line in lines).encode("utf-8"))
        return len(lines)


@dataclass(frozen=True)
class FileReport:
    """What a run did: `skipped` shards were on disk from an earlier run and were not translated again."""

    output: str
    lines: int
    shards: int
    skipped: int
    translated: int


def translate_file(input: str | Path, output: str | Path, spec: ModelSpec, settings: RowSettings, *,
                   workers: int = 1, launcher: Launcher = "processes", shard_lines: int = 1000,
                   restart: bool = False, keep_shards: bool = False, progress: bool = True,
                   threads: int | None = None, cpus_per_worker: float | None = None) -> FileReport:
    """Translate `input` into `output`, one line out per line in, in shards that survive a killed run.

    Under `accelerate launch` (or torchrun) every process calls this, and process r takes the
    pending shards r, r + world_size, ...; otherwise `workers` processes (`launcher="processes"`,
    spawned here) or Ray actors (`launcher="ray"`, Ray Data `map_batches`) share them. `threads`:
    torch threads per worker (default: the CPUs shared out; set for a worker in this process too).
    `cpus_per_worker`: what each Ray actor asks of the cluster.
    """
    if workers < 1:
        raise AdapterError(f"workers must be at least 1; got {workers}")
    output = Path(output)
    if output.resolve() == Path(input).resolve():
        raise AdapterError(f"{output} is the input too: write the translation to another file")
    work = output.with_name(output.name + ".shards")
    candidates = spec.candidates()
    if not candidates:
        raise AdapterError(f"no adapter to translate with: the store {spec.store} holds no readable adapter file")
    if _world_size() > 1:
        return _translate_as_rank(str(input), output, work, spec, settings, candidates, shard_lines, restart,
                                  keep_shards, progress, threads)
    job = prepare(str(input), work, spec, settings, candidates, shard_lines, restart)
    pending = job.pending()
    skipped = job.plan.num_shards - len(pending)
    with _bar(job, progress) as advance:
        if launcher == "ray":
            corpus_workers.run_ray(job, pending, workers, advance, cpus_per_worker, threads)
        elif workers > 1 and launcher == "processes":
            corpus_workers.run_processes(job, pending, workers, advance, threads)
        elif workers > 1:
            raise AdapterError(f"launcher {launcher!r} with {workers} workers: run this under "
                               f"`accelerate launch --num_processes {workers}` (the `adaptkit translate "
                               "--launcher accelerate` command does), or use launcher='processes' or 'ray'")
        else:
            corpus_workers.run_here(job, pending, advance, threads=threads)
    merge(job, output)
    if not keep_shards:
        shutil.rmtree(work)
    return FileReport(str(output), job.plan.lines, job.plan.num_shards, skipped, len(pending))


def prepare(input: str, work: Path, spec: ModelSpec, settings: RowSettings, candidates: Candidates,
            shard_lines: int, restart: bool) -> FileJob:
    """Scan the input, then start the work directory or check that it holds shards of this very run."""
    job = FileJob(input, str(work), spec, settings, candidates, scan(input, shard_lines))
    manifest = job.manifest()
    path = work / MANIFEST
    if restart and work.exists():
        shutil.rmtree(work)
    if path.exists():
        check_manifest(json.loads(path.read_text(encoding="utf-8")), manifest, job)
    else:
        write_atomic(path, json.dumps(manifest, indent=1).encode("utf-8"))
    return job


def check_manifest(found: dict[str, Any], expected: dict[str, Any], job: FileJob) -> None:
    """Refuse a work directory of another run, naming what differs and the way out."""
    differences = []
    if found.get("version") != expected["version"]:
        differences.append(f"manifest version {found.get('version')!r}, this adaptkit writes {expected['version']}")
    if found.get("input") != expected["input"]:
        differences.append(f"another input (sha256 {str((found.get('input') or {}).get('sha256'))[:12]}…, this "
                           f"input is {expected['input']['sha256'][:12]}…)")
    if found.get("shard_lines") != expected["shard_lines"]:
        differences.append(f"shard_lines {found.get('shard_lines')} (now {expected['shard_lines']})")
    old_model, new_model = found.get("model") or {}, expected["model"]
    for key in ("backbone", "dtype", "device", "quantize"):
        if old_model.get(key) != new_model[key]:
            differences.append(f"{key} {old_model.get(key)!r} (now {new_model[key]!r})")
    if old_model.get("adapters") != new_model["adapters"]:
        old, new = old_model.get("adapters") or {}, new_model["adapters"]
        changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
        differences.append(f"other adapter files ({', '.join(changed[:5])}{' …' if len(changed) > 5 else ''})")
    old_settings = found.get("settings") or {}
    for key, value in expected["settings"].items():
        if old_settings.get(key) != value:
            differences.append(f"{key} {old_settings.get(key)!r} (now {value!r})")
    if differences:
        raise ResumeMismatch(f"{job.work} holds {len(job.done())} finished shards of another run: "
                             f"{'; '.join(differences)}. Rerun with --restart (restart=True) to discard them and "
                             "start over, or write to another output file")


def merge(job: FileJob, output: Path) -> None:
    """Concatenate the shards in input order into `output`, atomically; a missing shard is an error."""
    missing = job.pending()
    if missing:
        raise AdapterError(f"{len(missing)} shards are not translated (first: {job.shard_path(missing[0])}); "
                           "rerun the same command to finish them")

    def chunks() -> Iterator[bytes]:
        for index in range(job.plan.num_shards):
            data = job.shard_path(index).read_bytes()
            lines = data.count(b"\n")
            if lines != job.plan.shard_size(index):
                raise AdapterError(f"{job.shard_path(index)} has {lines} lines, its input shard "
                                   f"{job.plan.shard_size(index)}: delete it and rerun to translate it again")
            last = index == job.plan.num_shards - 1
            yield data[:-1] if last and not job.plan.trailing_newline else data

    write_atomic_chunks(output, chunks())


class _bar:
    """A progress bar over lines, starting at the lines earlier runs finished; yields `advance(index)`."""

    def __init__(self, job: FileJob, enabled: bool, sync: bool = False):
        self.job, self.enabled, self.sync = job, enabled, sync

    def __enter__(self) -> Callable[[int], None]:
        done = sum(self.job.plan.shard_size(i) for i in self.job.done())
        self.tqdm = tqdm(total=self.job.plan.lines, initial=done, desc="translating", unit="line",
                         disable=not self.enabled, dynamic_ncols=True)
        return self.advance

    def advance(self, index: int) -> None:
        if self.sync:  # other processes write shards too: count what is on disk
            self.tqdm.n = sum(self.job.plan.shard_size(i) for i in self.job.done())
            self.tqdm.refresh()
        else:
            self.tqdm.update(self.job.plan.shard_size(index))

    def __exit__(self, *exc: object) -> None:
        self.tqdm.close()


def _world_size() -> int:
    """Processes started by `accelerate launch` / torchrun see WORLD_SIZE; a plain run sees none."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def _translate_as_rank(input: str, output: Path, work: Path, spec: ModelSpec, settings: RowSettings,
                       candidates: Candidates, shard_lines: int, restart: bool, keep_shards: bool,
                       progress: bool, threads: int | None) -> FileReport:
    """One process of `accelerate launch`: the main one prepares and merges, every one translates shards
    rank::world_size of those pending when the run started."""
    from accelerate import PartialState

    # Ranks meet at the end, and the fastest may wait there for the slowest one's last shard.
    state = PartialState(timeout=timedelta(hours=24))
    if state.is_main_process:
        prepare(input, work, spec, settings, candidates, shard_lines, restart)
    state.wait_for_everyone()
    job = _job_from_manifest(input, work, spec, settings, candidates)
    pending = job.pending()
    state.wait_for_everyone()  # nobody writes a shard before everybody has listed the pending ones
    mine = pending[state.process_index::state.num_processes]
    device = spec.device or (str(state.device) if state.device.type != "cpu" else None)
    with _bar(job, progress and state.is_main_process, sync=True) as advance:
        corpus_workers.run_here(job, mine, advance, device=device, threads=threads)
    state.wait_for_everyone()
    if state.is_main_process:
        merge(job, output)
        if not keep_shards:
            shutil.rmtree(work)
    state.wait_for_everyone()
    state.destroy_process_group()
    return FileReport(str(output), job.plan.lines, job.plan.num_shards, job.plan.num_shards - len(pending),
                      len(pending))


def _job_from_manifest(input: str, work: Path, spec: ModelSpec, settings: RowSettings,
                       candidates: Candidates) -> FileJob:
    """The job as the main process planned it (no second pass over the input), checked against this
    process's own settings and adapters."""
    found = json.loads((work / MANIFEST).read_text(encoding="utf-8"))
    plan = Plan(found["input"]["sha256"], found["input"]["lines"], found["input"]["trailing_newline"],
                found["shard_lines"], tuple(found["offsets"]))
    job = FileJob(input, str(work), spec, settings, candidates, plan)
    check_manifest(found, job.manifest(), job)
    return job


HOLD_ENV = "ADAPTKIT_TEST_HOLD_AFTER_SHARDS"


def _hold_for_tests(job: FileJob) -> None:
    """Tests only: once N shards are on disk no worker starts another, so a test can SIGKILL a run that
    is surely mid-way (instead of racing it)."""
    limit = os.environ.get(HOLD_ENV)
    if limit and len(job.done()) >= int(limit):
        time.sleep(600)

"""`adaptkit translate`: translate a file with the adapters of a store (or given files), batched.

    adaptkit translate --store adapters/ --src en --tgt de --domain software manual.txt --out manual.de.txt
    adaptkit translate --adapter runs/demo/en-es_bible/en-es-bible.safetensors --src en --tgt es < verses.txt
    adaptkit translate --store adapters/ rows.jsonl          # {"text", "src_lang"?, "tgt_lang"?, "domain"?, "adapter"?}
    adaptkit translate --store adapters/ --src en --tgt de --input big.txt --output big.de.txt --workers 2

Each row goes to the adapter whose header has its src_lang / tgt_lang / domain — the rule the HTTP
service uses — or to the one named (`--use NAME`, or one `--adapter FILE`). Text in: one line out
per line in, blank lines kept. JSONL in: each object out again with `translation` and `adapter` added.

File to file, the input is translated in shards of --shard-lines lines by --workers workers
(spawned processes, `accelerate launch` processes, or Ray actors: --launcher), each shard written
atomically into OUTPUT.shards/ and the output merged in input order. A killed run, rerun the same
way, translates only the shards that are not on disk; a rerun with another input or other
settings is refused until --restart. Under `accelerate launch` each process takes its share.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

from adaptkit.cli import main as adaptkit_main
from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.errors import AdapterError
from adaptkit.core.quantize import HELP as QUANTIZE_HELP
from adaptkit.core.quantize import SCHEMES
from adaptkit.tasks.corpus_translate import translate_file
from adaptkit.tasks.filerows import LineTranslator, ModelSpec, RowSettings


def translate_command(args: argparse.Namespace) -> int:
    if bool(args.store) == bool(args.adapter):
        print("error: give --store DIR or --adapter FILE (one of them)", file=sys.stderr)
        return 2
    if args.input_file and args.input not in (None, args.input_file):
        print("error: give the input once (positional or --input)", file=sys.stderr)
        return 2
    source = args.input_file or args.input or "-"
    jsonl = args.format == "jsonl" or (args.format is None and str(source).endswith(".jsonl"))
    if args.workers > 1 and (source == "-" or not args.out):
        print("error: --workers needs an input file and --output FILE (shards are resumed from beside the output)",
              file=sys.stderr)
        return 2
    if args.launcher == "accelerate" and args.workers > 1 and "WORLD_SIZE" not in os.environ:
        return _accelerate_launch(args, source)
    try:
        spec = ModelSpec(args.backbone or _backbone_of(args), store=args.store, adapter_files=tuple(args.adapter or ()),
                         dtype=args.dtype, device=args.device, quantize=args.quantize, max_resident=args.max_resident)
        settings = RowSettings(format="jsonl" if jsonl else "text", src_lang=args.src, tgt_lang=args.tgt,
                               domain=args.domain, use=args.use, num_beams=args.num_beams,
                               max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
        if source != "-" and args.out:
            report = translate_file(source, args.out, spec, settings, workers=args.workers, launcher=args.launcher,
                                    shard_lines=args.shard_lines, restart=args.restart, keep_shards=args.keep_shards,
                                    progress=not args.quiet, threads=args.threads)
            if int(os.environ.get("RANK", "0")) == 0:
                earlier = f", {report.skipped} of them done by an earlier run" if report.skipped else ""
                print(f"translated {report.lines} lines in {report.shards} shards{earlier} -> {report.output}",
                      file=sys.stderr)
            return 0
        if source == "-":
            lines = sys.stdin.read().split("\n")
        else:
            with open(source, encoding="utf-8", newline="") as handle:
                lines = handle.read().split("\n")
        trailing = lines[-1] == ""
        if trailing:
            lines.pop()
        worker = LineTranslator(spec, settings, threads=args.threads)
        translated = worker.translate_lines(lines, progress=not args.quiet)
    except (AdapterError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = "\n".join(translated) + ("\n" if trailing and translated else "")
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def _accelerate_launch(args: argparse.Namespace, source: str) -> int:
    """Run this same command under `accelerate launch` with --workers processes (one per GPU where there are
    GPUs; on CPUs torchrun starts them, hence --multi_gpu), each taking its share of the shards."""
    with socket.socket() as probe:  # a free port: another run's rendezvous may hold accelerate's default one
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(args.workers), "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "adaptkit.cli.translate", "--input", source, *_forwarded(args)]
    return subprocess.run(command).returncode


def _forwarded(args: argparse.Namespace) -> list[str]:
    """The flags of this run, for the processes `accelerate launch` starts."""
    out: list[str] = []
    for flag in ("store", "use", "backbone", "src", "tgt", "domain", "format", "out", "batch_size", "num_beams",
                 "max_new_tokens", "max_resident", "dtype", "device", "quantize", "shard_lines", "launcher", "threads"):
        value = getattr(args, flag)
        if value is not None:
            out += [f"--{flag.replace('_', '-')}", str(value)]
    for path in args.adapter or ():
        out += ["--adapter", str(path)]
    for flag in ("quiet", "restart", "keep_shards"):
        if getattr(args, flag):
            out.append(f"--{flag.replace('_', '-')}")
    return out


def _backbone_of(args: argparse.Namespace) -> str:
    """The backbone the (first) adapter file names; else the default."""
    files = list(args.adapter or ())
    if not files and args.store:
        files = sorted(Path(args.store).rglob("*.safetensors"))[:1]
    for path in files:
        try:
            backbone = (read_adapter_info(path).get("backbone") or {}).get("id")
        except AdapterError:
            continue
        if backbone:
            return backbone
    return "gemma3-270m"


def add_translate_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("translate", help="translate a text or JSONL file with a store's adapters",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", nargs="?", default=None, help="text (one per line) or .jsonl file; '-' is stdin")
    parser.add_argument("--input", dest="input_file", metavar="FILE", help="the input, as a flag")
    parser.add_argument("--store", help="adapter store: rows routed by their language pair and domain")
    parser.add_argument("--adapter", nargs="+", action="extend", metavar="FILE",
                        help="adapter file(s); one: every row uses it; several: routed like a store")
    parser.add_argument("--use", metavar="NAME", help="translate every row with this adapter of the store")
    parser.add_argument("--backbone", help="default: the backbone the adapter files name")
    parser.add_argument("--src", help="source language code (JSONL rows may give src_lang)")
    parser.add_argument("--tgt", help="target language code (JSONL rows may give tgt_lang)")
    parser.add_argument("--domain", help="domain, e.g. software (JSONL rows may give domain)")
    parser.add_argument("--format", choices=["text", "jsonl"], help="default: jsonl for *.jsonl, else text")
    parser.add_argument("--out", "--output", dest="out", help="output file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-resident", type=int, default=None, help="adapters kept in memory at most")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quantize", choices=SCHEMES, default=None, help=QUANTIZE_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parallel = parser.add_argument_group("file to file: shards, workers, resume")
    parallel.add_argument("--workers", type=int, default=1, help="workers, each with its own backbone and adapters")
    parallel.add_argument("--launcher", choices=["processes", "accelerate", "ray"], default="processes",
                          help="processes: spawned here; accelerate: `accelerate launch`; ray: Ray Data actors "
                               "(pip install adaptkit[ray]; RAY_ADDRESS joins a cluster)")
    parallel.add_argument("--threads", type=int, help="torch threads per worker (default: the CPUs shared out)")
    parallel.add_argument("--shard-lines", type=int, default=1000, help="lines per shard (the unit of resuming)")
    parallel.add_argument("--restart", action="store_true",
                          help="discard the shards of an earlier run of another input or other settings")
    parallel.add_argument("--keep-shards", action="store_true", help="keep OUTPUT.shards/ after the merge")
    parser.set_defaults(func=translate_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.translate ...` = `adaptkit translate ...`."""
    return adaptkit_main(["translate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

"""`adaptkit augment backtranslate`: synthetic training pairs from monolingual target-language text.

    adaptkit train --backbone gemma3-270m --data libreoffice-help-en-de --reverse --adapter de-en \\
        --output-dir runs/de-en                                       # the reverse adapter (de→en)
    adaptkit augment backtranslate --adapter runs/de-en/de-en.safetensors --mono german.txt --out bt/
    adaptkit train --backbone gemma3-270m --data libreoffice-help-en-de --synthetic bt/ \\
        --synthetic-ratio 0.5 --synthetic-tag "<BT> " --adapter en-de  # the forward adapter, real + synthetic

Run it again after a kill (same arguments): finished chunks are kept, the rest is translated.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from adaptkit.cli import main as adaptkit_main
from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.tasks.backtranslate import backtranslate, read_monolingual


def backtranslate_command(args: argparse.Namespace) -> int:
    try:
        texts = read_monolingual(args.mono, args.limit)
        backbone = args.backbone or (read_adapter_info(args.adapter).get("backbone") or {}).get("id")
        if not backbone:
            raise AdapterError(f"{args.adapter} names no backbone: give --backbone")
        model = AdaptedModel.from_pretrained(backbone, dtype=args.dtype, device=args.device)
        result = backtranslate(model, args.adapter, texts, args.out, batch_size=args.batch_size,
                               chunk_size=args.chunk_size, max_new_tokens=args.max_new_tokens,
                               num_beams=args.num_beams, progress=not args.quiet,
                               drop_degenerate=args.drop_degenerate, max_length_ratio=args.max_length_ratio)
    except (AdapterError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({**dataclasses.asdict(result), "corpus": str(result.corpus)}))
    return 0


def add_augment_commands(subparsers: argparse._SubParsersAction) -> None:
    augment = subparsers.add_parser("augment", help="make synthetic training data (back-translation)")
    sub = augment.add_subparsers(dest="augment_command", required=True)
    parser = sub.add_parser("backtranslate", help="monolingual target text → synthetic pairs, with a reverse adapter",
                            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="the reverse adapter file (e.g. de→en to make en→de data)")
    parser.add_argument("--mono", required=True, help="monolingual target-language text: one sentence a line, "
                                                      "or .jsonl rows with 'text' (or 'tgt')")
    parser.add_argument("--out", required=True, help="output directory: train.jsonl, chunks/, manifest.json")
    parser.add_argument("--backbone", help="zoo name, local dir or Hub id (default: the one the adapter file names)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--chunk-size", type=int, help="rows written at a time, a multiple of --batch-size "
                                                       "(default 4 batches): what a killed run loses at most")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--limit", type=int, help="the first N non-blank lines only")
    parser.add_argument("--drop-degenerate", action="store_true",
                        help="leave sources that are empty, far longer than their line or a loop of repeated words "
                             "out of train.jsonl (they go to dropped.jsonl, with the reason)")
    parser.add_argument("--max-length-ratio", type=float, default=2.5,
                        help="with --drop-degenerate: a source over this many times its line's words is dropped")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=backtranslate_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.augment backtranslate ...` = `adaptkit augment backtranslate ...`."""
    return adaptkit_main(["augment", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

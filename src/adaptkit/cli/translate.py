"""`adaptkit translate`: translate a file with the adapters of a store (or given files), batched.

    adaptkit translate --store adapters/ --src en --tgt de --domain software manual.txt --out manual.de.txt
    adaptkit translate --adapter runs/demo/en-es_bible/en-es-bible.safetensors --src en --tgt es < verses.txt
    adaptkit translate --store adapters/ rows.jsonl          # {"text", "src_lang"?, "tgt_lang"?, "domain"?, "adapter"?}

Each row goes to the adapter whose header has its src_lang / tgt_lang / domain — the rule the HTTP
service uses — or to the one named (`--use NAME`, or one `--adapter FILE`). Text in: one line out
per line in. JSONL in: each object out again with `translation` and `adapter` added.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

from adaptkit.cli import main as adaptkit_main
from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.serving.catalog import AdapterCatalog
from adaptkit.tasks.translate import Translator, match_adapter


def read_rows(handle: TextIO, jsonl: bool, defaults: dict[str, str | None]) -> list[dict[str, Any]]:
    """Rows with `text`, `src_lang`, `tgt_lang`, `domain` (and `adapter` when a JSONL row names one)."""
    rows = []
    for number, line in enumerate(handle, 1):
        if not line.strip():
            if not jsonl:
                rows.append({"text": "", **defaults, "_blank": True})
            continue
        if not jsonl:
            rows.append({"text": line.rstrip("\n"), **defaults})
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise AdapterError(f"line {number} is not JSON: {error}") from None
        text = row.get("text", row.get("src"))
        if not isinstance(text, str):
            raise AdapterError(f"line {number} has no 'text' (or 'src') string")
        rows.append({**row, "text": text, **{k: row.get(k) or v for k, v in defaults.items()}})
    missing = [i for i, r in enumerate(rows) if not r.get("_blank") and not (r["src_lang"] and r["tgt_lang"])]
    if missing:
        raise AdapterError(f"row {missing[0] + 1} has no language pair: give --src and --tgt, or src_lang / "
                           "tgt_lang in each JSONL row")
    return rows


def route_rows(rows: list[dict[str, Any]], candidates: list[tuple[str, dict[str, Any]]],
               forced: str | None) -> list[str | None]:
    """The adapter of every row: forced, named by the row, or matched by routing keys (as the service does)."""
    names = {name for name, _ in candidates}
    routes: list[str | None] = []
    for i, row in enumerate(rows):
        if row.get("_blank"):
            routes.append(None)
            continue
        name = forced or row.get("adapter") or match_adapter(candidates, row["src_lang"], row["tgt_lang"],
                                                             row.get("domain"))
        if name is None:
            pairs = sorted({f"{m.get('src_lang')}→{m.get('tgt_lang')}" + (f" ({m['domain']})" if m.get("domain")
                                                                          else "") for _, m in candidates})
            raise AdapterError(f"row {i + 1}: no adapter translates {row['src_lang']}→{row['tgt_lang']}"
                               + (f" (domain {row['domain']!r})" if row.get("domain") else "")
                               + f"; adapters serve: {', '.join(pairs) or 'nothing'}")
        if name not in names:
            raise AdapterError(f"row {i + 1}: no adapter named {name!r}; known: {sorted(names)}")
        routes.append(name)
    return routes


def translate_command(args: argparse.Namespace) -> int:
    if bool(args.store) == bool(args.adapter):
        print("error: give --store DIR or --adapter FILE (one of them)", file=sys.stderr)
        return 2
    jsonl = args.format == "jsonl" or (args.format is None and str(args.input).endswith(".jsonl"))
    defaults = {"src_lang": args.src, "tgt_lang": args.tgt, "domain": args.domain}
    try:
        if args.input == "-":
            rows = read_rows(sys.stdin, jsonl, defaults)
        else:
            with open(args.input, encoding="utf-8") as handle:
                rows = read_rows(handle, jsonl, defaults)
        backbone = args.backbone or _backbone_of(args)
        model = AdaptedModel.from_pretrained(backbone, store=args.store, max_resident=args.max_resident,
                                             dtype=args.dtype, device=args.device)
        if args.store:
            catalog = AdapterCatalog(model.store)
            catalog.refresh()
            candidates = [(e.name, e.info) for e in catalog.entries() if e.info is not None]
        else:
            loaded = [model.load_adapter(path) for path in args.adapter]
            candidates = [(name, model.adapter_metadata(name)) for name in loaded]
        forced = args.use or (candidates[0][0] if args.adapter and len(args.adapter) == 1 else None)
        routes = route_rows(rows, candidates, forced)
    except (AdapterError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    todo = [i for i, row in enumerate(rows) if not row.get("_blank")]
    todo.sort(key=lambda i: routes[i] or "")  # one adapter's rows together: fewer loads when few are resident
    translator = Translator(model, batch_size=args.batch_size)
    outputs = translator.translate([rows[i]["text"] for i in todo], [rows[i]["src_lang"] for i in todo],
                                   [rows[i]["tgt_lang"] for i in todo], adapter=[routes[i] for i in todo],
                                   num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                                   progress=not args.quiet)
    translations = [""] * len(rows)
    for i, text in zip(todo, outputs):
        translations[i] = text
    out = open(args.out, "w", encoding="utf-8") if args.out else sys.stdout  # noqa: SIM115 — closed below
    try:
        for row, route, text in zip(rows, routes, translations):
            if jsonl:
                record = {k: v for k, v in row.items() if not k.startswith("_")}
                out.write(json.dumps({**record, "translation": text, "adapter": route}, ensure_ascii=False) + "\n")
            else:
                out.write(text.replace("\n", " ") + "\n")
    finally:
        if args.out:
            out.close()
    return 0


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
    parser.add_argument("input", nargs="?", default="-", help="text (one per line) or .jsonl file; '-' is stdin")
    parser.add_argument("--store", help="adapter store: rows routed by their language pair and domain")
    parser.add_argument("--adapter", nargs="+", action="extend", metavar="FILE",
                        help="adapter file(s); one: every row uses it; several: routed like a store")
    parser.add_argument("--use", metavar="NAME", help="translate every row with this adapter of the store")
    parser.add_argument("--backbone", help="default: the backbone the adapter files name")
    parser.add_argument("--src", help="source language code (JSONL rows may give src_lang)")
    parser.add_argument("--tgt", help="target language code (JSONL rows may give tgt_lang)")
    parser.add_argument("--domain", help="domain, e.g. software (JSONL rows may give domain)")
    parser.add_argument("--format", choices=["text", "jsonl"], help="default: jsonl for *.jsonl, else text")
    parser.add_argument("--out", help="output file (default: stdout)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-resident", type=int, default=None, help="adapters kept in memory at most")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=translate_command)


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.translate ...` = `adaptkit translate ...`."""
    return adaptkit_main(["translate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

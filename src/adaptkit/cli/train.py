"""`adaptkit train` and `adaptkit eval` — mounted by cli/__init__.py, or run as `python -m adaptkit.cli.train`.

Every `TrainConfig` field is a flag (`batch_size` → `--batch-size`, booleans get `--no-…`), so a
flag and a field never drift apart. A `--config` file (TOML or YAML) gives the base values;
flags given on the command line override it. Multi-process runs need nothing special:

    accelerate launch --num_processes 2 -m adaptkit.cli.train train --config run.toml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adaptkit.cli import main as adaptkit_main
from adaptkit.cli.flags import add_dataclass_flags, given
from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.data import PromptFormat, load_pairs
from adaptkit.evaluation import evaluate
from adaptkit.training.config import TrainConfig, read_config_file
from adaptkit.training.trainer import train


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; only the flags given override the config file."""
    add_dataclass_flags(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    values = read_config_file(args.config) if getattr(args, "config", None) else {}
    values.update(given(args, TrainConfig))
    return TrainConfig.from_dict(values)


def train_command(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if cfg.backbone is None:
        print("error: no backbone: give --backbone NAME_OR_DIR or `backbone` in the config file", file=sys.stderr)
        return 2
    if cfg.data is None:
        print("error: no data: give --data SAMPLE_OR_DIR or `data` in the config file", file=sys.stderr)
        return 2
    train(cfg.backbone, config=cfg)
    return 0


def eval_command(args: argparse.Namespace) -> int:
    """Score an adapter file, a full fine-tuned checkpoint (`--backbone DIR`) or the bare backbone."""
    training: dict[str, Any] = {}
    backbone = args.backbone
    if args.adapter:
        info = read_adapter_info(args.adapter)
        training = info.get("training") or {}
        backbone = backbone or training.get("backbone_id") or info.get("backbone", {}).get("id")
    elif backbone and (Path(backbone) / "adaptkit_training.json").is_file():
        training = json.loads((Path(backbone) / "adaptkit_training.json").read_text())["training"]
    if not backbone:
        print("error: give --backbone (or an --adapter whose file names its backbone)", file=sys.stderr)
        return 2
    model = AdaptedModel.from_pretrained(backbone)
    name = model.load_adapter(args.adapter) if args.adapter else None
    rows = load_pairs(args.data, args.split)
    if args.samples:
        rows = rows.select(range(min(args.samples, len(rows))))
    prompt = None
    if model.family == "decoder":
        prompt = PromptFormat.from_training(training, args.prompt)
    results = evaluate(model, rows, name, prompt=prompt, generate=not args.no_generate, batch_size=args.batch_size,
                       num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
                       max_source_len=training.get("max_source_len", 256),
                       max_target_len=training.get("max_target_len", 256))
    report = {"adapter": args.adapter, "backbone": backbone, "data": args.data, "split": args.split,
              "rows": len(rows), **results}
    print(json.dumps(report, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _add_train(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("train", help="train one adapter (or --full: the whole backbone)",
                            description="Train one adapter; every option can come from --config or a flag.")
    parser.add_argument("--config", help="TOML or YAML file of training options (flags override it)")
    add_config_flags(parser)
    parser.set_defaults(func=train_command)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("eval", help="score an adapter, a full checkpoint or the bare backbone on a split")
    parser.add_argument("--adapter", help="adapter .safetensors file (omit for the bare backbone)")
    parser.add_argument("--backbone", help="zoo name, model dir or full fine-tuned checkpoint "
                                           "(default: the adapter file's backbone)")
    parser.add_argument("--data", required=True, help="shipped sample name, directory or file")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, help="first N rows only")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompt", help="decoder prompt template (default: the one the adapter was trained with)")
    parser.add_argument("--no-generate", action="store_true", help="loss only, no BLEU / chrF / TER")
    parser.add_argument("--output", help="also write the scores to this JSON file")
    parser.set_defaults(func=eval_command)


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `eval` under an existing subparsers object (cli.py mounts them)."""
    _add_train(subparsers)
    _add_eval(subparsers)


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.train train ...` = `adaptkit train ...` (for `accelerate launch -m`)."""
    return adaptkit_main(argv)


if __name__ == "__main__":
    sys.exit(main())

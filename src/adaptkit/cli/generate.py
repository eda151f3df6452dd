"""`adaptkit generate` — style transfer, dialogue or translation with adapter files, printed or streamed.

    adaptkit generate --adapter runs/style/style.safetensors "Thou shalt not steal."
    adaptkit generate --adapter runs/chat/chat.safetensors --stream "Hello, who are you?"
    adaptkit generate --adapter style.safetensors --input verses.txt      # one text per line; '-' is stdin
    echo "Hi ||| Hello. ||| What is your name?" | adaptkit generate --adapter chat.safetensors --task dialogue

The backbone defaults to the one the (first) adapter file names, the task to the file's `task`
key, and the prompt to the one it was trained with (its header's training record). Output: one
line per text (newlines inside an output are written as spaces).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from adaptkit.cli import main as adaptkit_main
from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.data import PromptFormat
from adaptkit.tasks.generate import TASKS, Generator


def read_texts(args: argparse.Namespace, stdin: Any = None) -> list[str]:
    """Texts from the command line, else from --input (a file, or '-' for stdin), else from piped stdin."""
    stdin = stdin or sys.stdin
    if args.text:
        return list(args.text)
    if args.input == "-" or (args.input is None and not stdin.isatty()):
        lines = stdin.read().splitlines()
    elif args.input is not None:
        lines = Path(args.input).read_text(encoding="utf-8").splitlines()
    else:
        raise AdapterError("no input: give texts as arguments, --input FILE, or pipe them into stdin")
    return [line for line in lines if line.strip()]


def build_generator(args: argparse.Namespace) -> tuple[Generator, Any, str | None]:
    """The model with its adapters loaded, the route for every row, and the task (None: from each file)."""
    infos = [read_adapter_info(path) for path in args.adapter]
    backbone = args.backbone or next((info.get("training", {}).get("backbone_id") or info.get("backbone", {}).get("id")
                                      for info in infos), None)
    if not backbone:
        raise AdapterError("no backbone: give --backbone NAME_OR_DIR (or an --adapter whose file names its backbone)")
    model = AdaptedModel.from_pretrained(backbone)
    names = [model.load_adapter(path) for path in args.adapter]
    prompts: dict[str, PromptFormat] = {}
    for info in infos:
        training = info.get("training") or {}
        task = info.get("task") or training.get("task")
        if task in TASKS and task not in prompts and model.family == "decoder":
            prompts[task] = PromptFormat.from_training(training)
    generator = Generator(model, prompts=prompts, chat_template=args.chat_template, batch_size=args.batch_size,
                          max_source_len=args.max_source_len)
    route: Any = names[0] if len(names) == 1 else ("auto" if names else None)
    return generator, route, args.task


def _texts_for(task: str | None, texts: list[str], separator: str) -> list[Any]:
    """Dialogue lines may carry the turns so far, oldest first, separated by `separator`."""
    if task != "dialogue" or not separator:
        return texts
    return [[turn.strip() for turn in text.split(separator)] if separator in text else text for text in texts]


def generate_command(args: argparse.Namespace) -> int:
    try:
        texts = read_texts(args)
        generator, route, task = build_generator(args)
        task = task or (generator.model.adapter_metadata(route).get("task") if isinstance(route, str)
                        and route != "auto" else None)
        inputs = _texts_for(task, texts, args.turn_separator)
        settings = dict(src_lang=args.src_lang, tgt_lang=args.tgt_lang, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        repetition_penalty=args.repetition_penalty, seed=args.seed)
        if args.stream:
            for text in inputs:
                for piece in generator.stream(text, adapter=route, task=task, num_beams=args.num_beams, **settings):
                    sys.stdout.write(piece.replace("\n", " "))
                    sys.stdout.flush()
                sys.stdout.write("\n")
        else:
            for output in generator.generate(inputs, adapter=route, task=task, num_beams=args.num_beams, **settings):
                print(output.replace("\n", " "))
    except (AdapterError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def add_generate_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `generate` under an existing subparsers object (cli/__init__.py mounts it)."""
    parser = subparsers.add_parser("generate", help="rewrite, reply or translate with adapter files (--stream)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("text", nargs="*", help="texts (default: --input, or lines piped into stdin)")
    parser.add_argument("--adapter", action="append", default=[], metavar="FILE",
                        help="adapter .safetensors file; repeat for several (rows then go to the one for --task)")
    parser.add_argument("--backbone", help="zoo name, local dir or Hub id (default: the adapter file's backbone)")
    parser.add_argument("--task", choices=TASKS, help="default: the adapter file's task")
    parser.add_argument("--input", metavar="FILE", help="one text per line; '-' reads stdin")
    parser.add_argument("--stream", action="store_true", help="print each output as its tokens are generated")
    parser.add_argument("--turn-separator", default="|||",
                        help="dialogue: separates the turns so far within one text, oldest first (default: |||)")
    parser.add_argument("--src-lang", help="source language (default: the adapter file's, else en)")
    parser.add_argument("--tgt-lang", help="target language (default: the adapter file's, else the source's)")
    parser.add_argument("--chat-template", action="store_true",
                        help="prompt through the tokenizer's chat template (adapters trained with it do so anyway)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above 0: sampling")
    parser.add_argument("--top-p", type=float, default=1.0, help="sampling: nucleus probability mass")
    parser.add_argument("--top-k", type=int, default=0, help="sampling: keep the k likeliest tokens (0: all)")
    parser.add_argument("--num-beams", type=int, default=1, help="beam search (not with --stream)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, help="seed of the sampling")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-source-len", type=int, default=256,
                        help="source tokens per prompt: a longer translate or style text is generated in pieces "
                             "(split at sentence ends), a longer dialogue turn refused; never cut")
    parser.set_defaults(func=generate_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    """`python -m adaptkit.cli.generate ...` = `adaptkit generate ...`."""
    return adaptkit_main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())

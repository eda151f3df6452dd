"""A config dataclass as command-line flags, and the flags given back as its keyword arguments.

Each field is one flag (`batch_size` → `--batch-size`) whose help is the field's
`metadata["help"]` and whose parsing follows the annotation:

    bool                    --flag / --no-flag
    int, float, str         one value; `X | None` also takes `none`
    Literal["a", "b"]       choices
    list[X], tuple[X, ...]  several values, space- or comma-separated (`--methods full lora-r8` or
                            `--methods full,lora-r8`); `none` alone is the empty list
    dict, dict[K, V]        a JSON object, or `key=value,...` pairs (values typed by V, else read as JSON)

Defaults are shown in the help (unless the help explains its own) but not set on the namespace,
so `given(args, Config)` holds only the flags actually typed: they are laid over a config file's
values, never reset them to defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any

NONE_WORDS = ("none", "null")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """One flag per field of dataclass `cls`, its help from `metadata["help"]` (tests require one)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        help_text = field.metadata.get("help", "")
        if "default" not in help_text:  # a help that explains its default (`default: the data's column`) keeps it
            help_text = f"{help_text} (default: {_show(_default(field))})".strip()
        shown = help_text.replace("%", "%%")  # argparse %-formats help
        kwargs: dict[str, Any] = {"dest": field.name, "default": argparse.SUPPRESS, "help": shown}
        kind = _flag_kind(hints[field.name], f"{cls.__name__}.{field.name}")
        if kind.boolean:
            parser.add_argument(flag_name(field.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if kind.choices is not None:
            kwargs["choices"] = kind.choices
        else:
            kwargs["metavar"] = kind.metavar
        if kind.sequence is not None:
            kwargs.update(nargs="+", action=_SequenceAction, type=str, sequence=kind.sequence, item=kind.parse)
        else:
            kwargs["type"] = kind.parse
        parser.add_argument(flag_name(field.name), **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that were given as flags, as keyword arguments of `cls`."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}


# -- what a flag parses, from a field's annotation -----------------------------------------------

@dataclasses.dataclass
class _Kind:
    parse: Callable[[str], Any]
    metavar: str
    boolean: bool = False
    choices: list[Any] | None = None
    sequence: type | None = None  # list or tuple: several values


def _flag_kind(annotation: Any, where: str) -> _Kind:
    optional = False
    origin = typing.get_origin(annotation)
    if origin is typing.Union or isinstance(annotation, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(members) < len(typing.get_args(annotation))
        if len(members) != 1:
            raise TypeError(f"{where}: a flag takes one type or one type | None; got {annotation}")
        annotation = members[0]
        origin = typing.get_origin(annotation)
    if annotation is bool:
        return _Kind(bool, "", boolean=True)
    if origin is typing.Literal:
        values = list(typing.get_args(annotation))
        kind = type(values[0])
        return _Kind(_or_none(kind, optional), "", choices=values + ([None] if optional else []))
    if origin in (list, tuple) or annotation in (list, tuple):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        item = args[0] if args else str
        if len(set(args)) > 1:
            raise TypeError(f"{where}: a tuple flag takes one item type (tuple[X, ...]); got {annotation}")
        return _Kind(item, item.__name__.upper(), sequence=origin or annotation)
    if origin is dict or annotation is dict:
        value_type = typing.get_args(annotation)[1] if typing.get_args(annotation) else None
        return _Kind(_or_none(_dict_parser(value_type), optional), "JSON|KEY=VALUE,...")
    if annotation in (int, float, str):
        return _Kind(_or_none(annotation, optional), annotation.__name__.upper() + ("|none" if optional else ""))
    raise TypeError(f"{where}: no flag for a field of type {annotation}")


def _or_none(parse: Callable[[str], Any], optional: bool) -> Callable[[str], Any]:
    if not optional:
        return parse

    def parse_or_none(text: str) -> Any:
        return None if text.strip().lower() in NONE_WORDS else parse(text)

    parse_or_none.__name__ = getattr(parse, "__name__", "value")  # argparse names the type in its errors
    return parse_or_none


def _dict_parser(value_type: type | None) -> Callable[[str], dict]:
    def mapping(text: str) -> dict:
        if text.lstrip().startswith("{"):
            value = json.loads(text)
            if not isinstance(value, dict):
                raise argparse.ArgumentTypeError(f"expected a JSON object; got {text!r}")
            return value
        pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
        if any(len(p) != 2 for p in pairs):
            raise argparse.ArgumentTypeError(f"expected a JSON object or key=value,... pairs; got {text!r}")
        return {k.strip(): _typed(v.strip(), value_type) for k, v in pairs}

    mapping.__name__ = "mapping"
    return mapping


def _typed(text: str, value_type: type | None) -> Any:
    if value_type is not None and value_type is not Any:
        return value_type(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare word: `targets=all-linear`


class _SequenceAction(argparse.Action):
    """Space- and comma-separated values into one list (or tuple); `none` alone is empty."""

    # not `container`: argparse sets that attribute on every action
    def __init__(self, *args: Any, sequence: type = list, item: Callable[[str], Any] = str, **kwargs: Any):
        self.sequence, self.item = sequence, item
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        words = [w.strip() for v in values for w in v.split(",") if w.strip()]
        if [w.lower() for w in words] in ([], *([w] for w in NONE_WORDS)):
            words = []
        items = []
        for word in words:
            try:
                items.append(self.item(word))
            except ValueError:
                parser.error(f"argument {option_string}: invalid {self.item.__name__} value: {word!r}")
        setattr(namespace, self.dest, self.sequence(items))


def _default(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "{}"
    return str(value)

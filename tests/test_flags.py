"""cli/flags.py: a config dataclass as flags — help from field metadata, parsing from annotations —
and the given flags back as the dataclass's keyword arguments."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Literal

import pytest

from adaptkit.bench.jobs import BenchConfig
from adaptkit.cli.flags import add_dataclass_flags, flag_name, given
from adaptkit.training.config import TrainConfig, option


@dataclasses.dataclass
class Toy:
    count: int = option(3, help="how many")
    rate: float | None = option(0.5, help="a rate at 10% steps")
    name: str | None = option(None, help="a name")
    fast: bool = option(True, help="go fast")
    mode: Literal["a", "b"] = option("a", help="which mode")
    words: list[str] = option(factory=lambda: ["x", "y"], help="some words")
    sizes: tuple[int, ...] = option((1, 2), help="some sizes")
    extra: list[str] | None = option(None, help="more words")
    rates: dict[str, float] = option(factory=dict, help="rate per family")
    options: dict = option(factory=dict, help="anything")


def parser_for(cls: type) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toy")
    add_dataclass_flags(parser, cls)
    return parser


def parse(cls: type, *argv: str) -> dict:
    return given(parser_for(cls).parse_args(list(argv)), cls)


def test_only_given_flags_come_back():
    assert parse(Toy) == {}  # defaults stay out, so a config file's values are not reset
    assert parse(Toy, "--count", "7", "--no-fast") == {"count": 7, "fast": False}


def test_types_follow_the_annotations():
    values = parse(Toy, "--rate", "none", "--name", "n", "--mode", "b", "--words", "p,q", "r", "--sizes", "4", "5",
                   "--extra", "none", "--rates", "lora=1e-3,full=5e-5", "--options", "r=16,targets=all-linear")
    assert values == {"rate": None, "name": "n", "mode": "b", "words": ["p", "q", "r"], "sizes": (4, 5),
                      "extra": [], "rates": {"lora": 1e-3, "full": 5e-5}, "options": {"r": 16, "targets": "all-linear"}}
    assert parse(Toy, "--options", '{"r": 4, "targets": ["q"]}') == {"options": {"r": 4, "targets": ["q"]}}
    assert Toy(**values).sizes == (4, 5)


@pytest.mark.parametrize("argv", [["--mode", "c"], ["--count", "x"], ["--sizes", "1,z"], ["--rates", "lora"],
                                  ["--count", "none"]])
def test_bad_values_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse(Toy, *argv)
    assert "toy: error: argument " + argv[0] in capsys.readouterr().err


def test_help_shows_metadata_and_defaults():
    text = parser_for(Toy).format_help()
    for piece in ("how many (default: 3)", "a rate at 10% steps (default: 0.5)", "--fast, --no-fast",
                  "{a,b}", "(default: x,y)", "(default: 1,2)"):
        assert piece in " ".join(text.split()), piece


def test_unsupported_annotations_are_named():
    @dataclasses.dataclass
    class Odd:
        pair: tuple[int, str] = option((1, "a"), help="two things")

    with pytest.raises(TypeError, match=r"Odd.pair: a tuple flag takes one item type"):
        add_dataclass_flags(argparse.ArgumentParser(), Odd)


@pytest.mark.parametrize("cls", [TrainConfig, BenchConfig])
def test_every_field_has_a_flag_with_help(cls):
    parser = parser_for(cls)
    actions = {a.dest: a for a in parser._actions}
    for field in dataclasses.fields(cls):
        action = actions[field.name]
        assert flag_name(field.name) in action.option_strings
        assert field.metadata.get("help", "").strip(), f"{cls.__name__}.{field.name} has no metadata help"
        assert action.help.startswith(field.metadata["help"].replace("%", "%%")), field.name


def test_flags_round_trip_into_train_config():
    cfg = TrainConfig(backbone="b", adapter="a1", method="adalora", adapter_options={"init_r": 12, "alpha": 32.0},
                      full=False, data="d", src_lang="en", tgt_lang="de", chat_template=True, batch_size=3,
                      max_steps=9, lr=1e-3, schedule="cosine", max_grad_norm=None, mixed_precision="no",
                      eval_every=None, generate=False, metric="loss", patience=2, min_delta=0.5,
                      output_dir="out", checkpoint_every=0, resume=False, progress=False)
    argv = []
    for field in dataclasses.fields(TrainConfig):
        value = getattr(cfg, field.name)
        if isinstance(value, bool):
            argv.append(flag_name(field.name) if value else "--no-" + flag_name(field.name)[2:])
        elif isinstance(value, dict):
            argv += [flag_name(field.name), ",".join(f"{k}={v}" for k, v in value.items())]
        else:
            argv += [flag_name(field.name), "none" if value is None else str(value)]
    assert TrainConfig(**parse(TrainConfig, *argv)) == cfg

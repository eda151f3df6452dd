"""Parallel / monolingual text → `datasets.Dataset` → padded batches.

Two model families:

- `seq2seq`: source → `input_ids`, target → `labels` (padding in labels is -100).
- `decoder`: one sequence `prompt + target + EOS`; `labels` are -100 on every prompt and
  padding token, so the loss is on target tokens only (the ALMA recipe). Training batches
  are right-padded; generation prompts are left-padded so every row ends where generation
  starts, and `strip_prompt` cuts the prompt off the generated ids.

The prompt and the target are tokenized separately and concatenated, so the mask boundary
is exact whatever the tokenizer would merge across it.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from adaptkit import corpora

Family = Literal["seq2seq", "decoder"]
IGNORE_INDEX = -100

LANGUAGE_NAMES = {
    "en": "English", "de": "German", "es": "Spanish", "fr": "French", "it": "Italian",
    "pt": "Portuguese", "nl": "Dutch", "sv": "Swedish", "da": "Danish", "nb": "Norwegian",
    "fi": "Finnish", "pl": "Polish", "cs": "Czech", "sk": "Slovak", "hu": "Hungarian",
    "ro": "Romanian", "bg": "Bulgarian", "el": "Greek", "ru": "Russian", "uk": "Ukrainian",
    "tr": "Turkish", "ar": "Arabic", "he": "Hebrew", "fa": "Persian", "hi": "Hindi",
    "bn": "Bengali", "ja": "Japanese", "ko": "Korean", "zh": "Chinese", "vi": "Vietnamese",
    "th": "Thai", "id": "Indonesian", "ca": "Catalan", "eu": "Basque", "gl": "Galician",
    "et": "Estonian", "lv": "Latvian", "lt": "Lithuanian", "sl": "Slovenian", "hr": "Croatian",
}


def language_name(code: str) -> str:
    """`de` → `German`; `pt-BR`/`pt_BR` → `Portuguese`; unknown codes pass through."""
    return LANGUAGE_NAMES.get(code.replace("_", "-").split("-")[0].lower(), code)


# --- loading ----------------------------------------------------------------------------

_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet",
            ".txt": "text", ".tsv": "tsv"}


def _format_of(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz", ".zst")]
    fmt = _FORMATS.get(suffixes[-1].lower() if suffixes else "")
    if fmt is None:
        raise ValueError(f"unsupported data file {path}: use one of {', '.join(_FORMATS)}")
    return fmt


def _load_tsv(path: Path, src_field: str, tgt_field: str):
    """TSV with a header naming the fields, or bare two-column `src<TAB>tgt` lines."""
    from datasets import Dataset

    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if rows and src_field in rows[0] and tgt_field in rows[0]:
        header, rows = rows[0], rows[1:]
        return Dataset.from_list([dict(zip(header, r)) for r in rows if r])
    return Dataset.from_list([{src_field: r[0], tgt_field: r[1]} for r in rows if len(r) >= 2])


def _load_files(paths: dict[str, list[str]], fmt: str):
    from datasets import load_dataset

    return load_dataset(fmt, data_files=paths)


def load_pairs(source: Any, split: str | None = None, src_field: str = "src",
               tgt_field: str = "tgt"):
    """Load sentence pairs (or monolingual `text`) as a `datasets.Dataset`.

    `source` may be a `Dataset`/`DatasetDict`, a JSONL/JSON/TSV/CSV/Parquet/TXT file, a
    directory of `{split}.<ext>` files (what `adaptkit corpus build` writes per pair), a
    shipped sample name (`adaptkit.corpora.list_samples()`), or a Hub dataset (online).
    Columns `src_field`/`tgt_field` are renamed to `src`/`tgt`.
    """
    from datasets import Dataset, DatasetDict


    if isinstance(source, DatasetDict):
        ds = source[split or "train"]
    elif isinstance(source, Dataset):
        ds = source
    elif isinstance(source, (str, os.PathLike)) and Path(source).exists():
        path = Path(source)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file()
                           and p.name.split(".")[0] in ("train", "dev", "validation", "test"))
            if not files:
                raise ValueError(f"{path} holds no train/dev/test data files")
            fmt = _format_of(files[0])
            grouped: dict[str, list[str]] = {}
            for p in files:
                grouped.setdefault(p.name.split(".")[0], []).append(str(p))
            want = split or ("train" if "train" in grouped else next(iter(grouped)))
            if want not in grouped:
                raise ValueError(f"{path} has no split {want!r}; it has {sorted(grouped)}")
            ds = _load_files({want: grouped[want]}, fmt)[want]
        elif _format_of(path) == "tsv":
            ds = _load_tsv(path, src_field, tgt_field)
        else:
            ds = _load_files({"train": [str(path)]}, _format_of(path))["train"]
    elif isinstance(source, str) and source in corpora.list_samples():
        ds = corpora.load_sample(source, split or "train")
    elif isinstance(source, str):
        from datasets import load_dataset

        try:
            ds = load_dataset(source, split=split or "train")
        except Exception as exc:  # noqa: BLE001 - offline/unknown both end here
            raise ValueError(
                f"{source!r} is not a local file/dir, not a shipped sample "
                f"({', '.join(corpora.list_samples())}), and loading it from the Hub "
                f"failed: {exc}") from exc
    else:
        raise TypeError(f"cannot load pairs from {type(source).__name__}")
    renames = {a: b for a, b in ((src_field, "src"), (tgt_field, "tgt"))
               if a != b and a in ds.column_names}
    return ds.rename_columns(renames) if renames else ds


# --- prompts ----------------------------------------------------------------------------


# The prompt of each generation task a decoder LM is trained and prompted with (`PromptFormat.for_task`).
# A style target is in the source's language, so `{tgt_name}` names it; a dialogue prompt is the
# speaker-labelled turns, ending where the reply starts.
TASK_TEMPLATES = {
    "translate": "Translate {src_name} to {tgt_name}:\n{src}\n{tgt_name}:",
    "style": "Rewrite in modern {tgt_name}:\n{src}\nModern {tgt_name}:",
    "dialogue": "{src}\nAssistant:",
}
SPEAKERS = ("User", "Assistant")
Source = str | Sequence[str]  # a text, or (dialogue) the turns so far, oldest first, the user's last


@dataclass
class PromptFormat:
    """How a decoder LM sees a pair: `template` (the prompt) then `target` (what it learns).

    With `use_chat_template`, the prompt text becomes the user turn of the tokenizer's chat
    template (with the generation prompt), and the target follows as the assistant reply.
    With `speakers` (dialogue), `src` is one turn or a list of turns, rendered as labelled lines
    (`User: …` / `Assistant: …`, the last turn the user's) or, with a chat template, as its messages.
    """

    template: str = TASK_TEMPLATES["translate"]
    target: str = " {tgt}"
    use_chat_template: bool = False
    system: str | None = None
    speakers: tuple[str, str] | None = None

    @classmethod
    def for_task(cls, task: str = "translate", use_chat_template: bool = False,
                 template: str | None = None) -> PromptFormat:
        """The prompt of `task` (translate | style | dialogue); `template` replaces its text."""
        if task not in TASK_TEMPLATES:
            raise ValueError(f"no prompt for task {task!r}; generation tasks are {sorted(TASK_TEMPLATES)}")
        return cls(template=template or TASK_TEMPLATES[task], use_chat_template=use_chat_template,
                   speakers=SPEAKERS if task == "dialogue" else None)

    @classmethod
    def from_training(cls, training: dict[str, Any], template: str | None = None) -> PromptFormat:
        """The prompt an adapter was trained with, from the `training` record in its file's header."""
        task = training.get("task") if training.get("task") in TASK_TEMPLATES else "translate"
        return cls.for_task(task, bool(training.get("chat_template")), template or training.get("prompt"))

    def turns(self, src: Source) -> list[str]:
        turns = [src] if isinstance(src, str) else list(src)
        if not turns or (len(turns) > 1 and self.speakers is None):
            raise ValueError(f"got {len(turns)} turns for a prompt without speakers: only a dialogue prompt "
                             "(PromptFormat.for_task('dialogue')) takes a list of turns")
        return turns

    def render_turns(self, src: Source) -> str:
        """`["hi", "hello", "how are you?"]` → `User: hi\nAssistant: hello\nUser: how are you?`."""
        user, assistant = self.speakers or SPEAKERS
        turns = self.turns(src)
        last = len(turns) - 1
        return "\n".join(f"{user if (last - i) % 2 == 0 else assistant}: {turn}" for i, turn in enumerate(turns))

    def prompt_text(self, src: Source, src_lang: str, tgt_lang: str) -> str:
        text = self.render_turns(src) if self.speakers else self.turns(src)[0]
        return self.template.format(src=text, src_lang=src_lang, tgt_lang=tgt_lang,
                                    src_name=language_name(src_lang),
                                    tgt_name=language_name(tgt_lang))

    def messages(self, src: Source, src_lang: str, tgt_lang: str) -> list[dict[str, str]]:
        """The chat-template messages: dialogue turns as user/assistant turns, else the prompt as one user turn."""
        messages = ([{"role": "system", "content": self.system}] if self.system else [])
        if self.speakers is None:
            return [*messages, {"role": "user", "content": self.prompt_text(src, src_lang, tgt_lang)}]
        turns = self.turns(src)
        last = len(turns) - 1
        return [*messages, *({"role": "user" if (last - i) % 2 == 0 else "assistant", "content": turn}
                             for i, turn in enumerate(turns))]

    def prompt_ids(self, tokenizer: Any, src: Source, src_lang: str, tgt_lang: str) -> list[int]:
        if not self.use_chat_template:
            return tokenizer(self.prompt_text(src, src_lang, tgt_lang), add_special_tokens=True)["input_ids"]
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("use_chat_template=True but the tokenizer has no chat_template")
        chat = tokenizer.apply_chat_template(self.messages(src, src_lang, tgt_lang), add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(chat, add_special_tokens=False)["input_ids"]

    def target_text(self, tgt: str) -> str:
        # A chat reply starts a fresh turn: no separating space.
        return tgt if self.use_chat_template else self.target.format(tgt=tgt)


@dataclass
class TruncationReport:
    """How many examples lost tokens to `max_source_len` / `max_target_len`."""

    total: int = 0
    source_truncated: int = 0
    target_truncated: int = 0

    @property
    def truncated(self) -> int:
        return max(self.source_truncated, self.target_truncated)

    def __str__(self) -> str:
        return (f"{self.source_truncated}/{self.total} sources and "
                f"{self.target_truncated}/{self.total} targets truncated")


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    if pad is None:
        raise ValueError("tokenizer has neither pad_token_id nor eos_token_id")
    return pad


def _truncate_source(tokenizer: Any, src: Source, limit: int | None) -> tuple[Source, bool]:
    if limit is None:
        return src, False
    if not isinstance(src, str):  # dialogue turns: each kept to the limit
        cut = [_truncate_source(tokenizer, turn, limit) for turn in src]
        return [turn for turn, _ in cut], any(was_cut for _, was_cut in cut)
    ids = tokenizer(src, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return src, False
    return tokenizer.decode(ids[:limit]), True


def encode_decoder_example(tokenizer: Any, src: Source, tgt: str | None, src_lang: str,
                           tgt_lang: str, prompt: PromptFormat,
                           max_source_len: int | None = None,
                           max_target_len: int | None = None) -> tuple[dict, bool, bool]:
    """One decoder example → (`input_ids`, `labels`, …), source cut?, target cut?"""
    src, src_cut = _truncate_source(tokenizer, src, max_source_len)
    prompt_ids = prompt.prompt_ids(tokenizer, src, src_lang, tgt_lang)
    if tgt is None:
        return {"input_ids": prompt_ids}, src_cut, False
    tgt_ids = tokenizer(prompt.target_text(tgt), add_special_tokens=False)["input_ids"]
    tgt_cut = max_target_len is not None and len(tgt_ids) + 1 > max_target_len
    if tgt_cut:
        # A cut target keeps no EOS: the model must not learn to stop mid-sentence.
        tgt_ids = tgt_ids[:max_target_len]
    elif tokenizer.eos_token_id is not None:
        tgt_ids = tgt_ids + [tokenizer.eos_token_id]
    return ({"input_ids": prompt_ids + tgt_ids,
             "labels": [IGNORE_INDEX] * len(prompt_ids) + tgt_ids,
             "prompt_length": len(prompt_ids)}, src_cut, tgt_cut)


def encode_pairs(dataset: Any, tokenizer: Any, family: Family,
                 prompt: PromptFormat | None = None, max_source_len: int | None = 256,
                 max_target_len: int | None = 256, src_lang: str | None = None,
                 tgt_lang: str | None = None) -> tuple[Any, TruncationReport]:
    """Tokenize a pairs `Dataset` for `family`; returns (encoded Dataset, TruncationReport).

    Languages come from the rows' `src_lang`/`tgt_lang` columns, else from the arguments.
    For seq2seq, `prompt` (if given) is applied to the source text; the default is none.
    """
    from datasets import Dataset

    if family not in ("seq2seq", "decoder"):
        raise ValueError(f"family must be 'seq2seq' or 'decoder', not {family!r}")
    if family == "decoder" and prompt is None:
        prompt = PromptFormat()
    report = TruncationReport()
    rows = []
    for row in dataset:
        sl = row.get("src_lang") or src_lang or "en"
        tl = row.get("tgt_lang") or tgt_lang or "en"
        report.total += 1
        if family == "decoder":
            enc, s_cut, t_cut = encode_decoder_example(
                tokenizer, row["src"], row["tgt"], sl, tl, prompt, max_source_len,
                max_target_len)
        else:
            src = prompt.prompt_text(row["src"], sl, tl) if prompt else row["src"]
            src_ids = tokenizer(src)["input_ids"]
            tgt_ids = tokenizer(text_target=row["tgt"])["input_ids"]
            s_cut = max_source_len is not None and len(src_ids) > max_source_len
            t_cut = max_target_len is not None and len(tgt_ids) > max_target_len
            # Keep the final special token (EOS) when cutting, as HF truncation does.
            if s_cut:
                src_ids = src_ids[: max_source_len - 1] + src_ids[-1:]
            if t_cut:
                tgt_ids = tgt_ids[: max_target_len - 1] + tgt_ids[-1:]
            enc = {"input_ids": src_ids, "labels": tgt_ids}
        report.source_truncated += s_cut
        report.target_truncated += t_cut
        rows.append(enc)
    return Dataset.from_list(rows), report


# --- batching ---------------------------------------------------------------------------


def pad_sequences(seqs: Sequence[Sequence[int]], value: int, left: bool,
         multiple: int | None = None) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    if multiple:
        width = -(-width // multiple) * multiple
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if left:
                out[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            else:
                out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return out


@dataclass
class Collator:
    """List of encoded examples → dict of tensors, padded to the longest in the batch.

    Training batches are right-padded; `labels` carry -100 on padding (and, for decoder
    LMs, on the prompt, which `encode_pairs` already set).
    """

    tokenizer: Any
    family: Family
    pad_to_multiple_of: int | None = None
    padding_side: Literal["right", "left"] = "right"
    _pad_id: int = field(init=False)

    def __post_init__(self) -> None:
        self._pad_id = pad_id(self.tokenizer)

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        left = self.padding_side == "left"
        ids = [e["input_ids"] for e in examples]
        batch = {
            "input_ids": pad_sequences(ids, self._pad_id, left, self.pad_to_multiple_of),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, left,
                                   self.pad_to_multiple_of),
        }
        if all("labels" in e for e in examples):
            labels = [e["labels"] for e in examples]
            multiple = self.pad_to_multiple_of
            batch["labels"] = pad_sequences(labels, IGNORE_INDEX, left, multiple)
        return batch


def prompt_inputs(tokenizer: Any, srcs: Sequence[str], src_lang: str | Sequence[str],
                  tgt_lang: str | Sequence[str], family: Family = "decoder",
                  prompt: PromptFormat | None = None,
                  max_source_len: int | None = None) -> dict[str, torch.Tensor]:
    """Generation inputs: for decoders the prompts alone, left-padded; for seq2seq the
    sources (prompted only when `prompt` is given), right-padded. Languages may be given
    per row, so one batch can mix language pairs."""
    src_langs = [src_lang] * len(srcs) if isinstance(src_lang, str) else list(src_lang)
    tgt_langs = [tgt_lang] * len(srcs) if isinstance(tgt_lang, str) else list(tgt_lang)
    rows = list(zip(srcs, src_langs, tgt_langs, strict=True))
    if family == "decoder":
        prompt = prompt or PromptFormat()
        ids = [encode_decoder_example(tokenizer, s, None, sl, tl, prompt,
                                      max_source_len)[0]["input_ids"] for s, sl, tl in rows]
        left = True
    else:
        texts = [prompt.prompt_text(s, sl, tl) if prompt else s for s, sl, tl in rows]
        ids = [tokenizer(t, truncation=max_source_len is not None,
                         max_length=max_source_len)["input_ids"] for t in texts]
        left = False
    return {"input_ids": pad_sequences(ids, pad_id(tokenizer), left),
            "attention_mask": pad_sequences([[1] * len(s) for s in ids], 0, left)}


def strip_prompt(generated: torch.Tensor, inputs: dict[str, torch.Tensor],
                 family: Family = "decoder") -> torch.Tensor:
    """Drop the (left-padded) prompt from decoder `generate` output; seq2seq passes through."""
    if family == "decoder":
        return generated[:, inputs["input_ids"].shape[1]:]
    return generated


def decode_generated(tokenizer: Any, generated: torch.Tensor, inputs: dict[str, torch.Tensor],
                     family: Family = "decoder") -> list[str]:
    """Generated ids → stripped, special-token-free strings, one per input row."""
    new = strip_prompt(generated, inputs, family)
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]

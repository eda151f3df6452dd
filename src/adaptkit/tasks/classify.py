"""Sequence classification on an encoder backbone, with an adapter of any family and its head.

The head (`methods/heads.py`) lives inside the adapter: the backbone runs once with the call's
routing (per row, like any other call), then each row's hidden states go through the head of
the adapter that row was routed to. One batch may therefore mix classifiers (and label sets).

    model = ak.load("minilm-l6")
    ak.train(model, adapter="domain", train=rows, task="classify", method="lora")   # rows: {text, label}
    Classifier(model, "domain").predict(["Click OK to close the dialog."])
    # [Prediction(label='software-ui', probability=0.97, ...)]

What the trainer and the dev evaluation share lives here too: the encoding of `{text, label}`
rows, the collator, balanced class weights and the loss.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adaptkit.core.adapterfile import read_adapter_info
from adaptkit.core.bank import AdaptedModel
from adaptkit.core.errors import AdapterError
from adaptkit.core.routing import Routing
from adaptkit.methods.heads import ClassificationHead

TEXT_COLUMNS = ("text", "src")  # `src`: a parallel corpus classified by its source side


@dataclass(frozen=True)
class Prediction:
    """One row's predicted label, its probability, and every label's probability."""

    label: str
    probability: float
    probabilities: dict[str, float]


def check_encoder(model: AdaptedModel) -> None:
    if model.family != "encoder":
        raise AdapterError(f"classification runs on encoder backbones (BERT family, e.g. minilm-l6); this backbone "
                           f"is a {model.family} model. Load an encoder for the classifier")


def ensure_head(model: AdaptedModel, adapter: str, labels: Sequence[str], pooling: str = "mean",
                dropout: float = 0.1) -> ClassificationHead:
    """The adapter's classification head over `labels`, added if it has none; refuses another label set."""
    check_encoder(model)
    holder = model.get_adapter(adapter)
    head = holder.head
    if head is None:
        head = ClassificationHead(model.model.config.hidden_size, list(labels), pooling, dropout)
        holder.set_head(head)
    elif not isinstance(head, ClassificationHead) or head.labels != [str(x) for x in labels]:
        raise AdapterError(f"adapter {adapter!r} already has a head for labels "
                           f"{getattr(head, 'labels', None)}, not {list(labels)}; train a new adapter")
    return head


def hidden_states(output: Any) -> torch.Tensor:
    """The last layer's hidden states of an encoder output (a bare encoder or one with an LM head)."""
    last = getattr(output, "last_hidden_state", None)
    if last is not None:
        return last
    states = getattr(output, "hidden_states", None)
    if states:
        return states[-1]
    raise AdapterError("the backbone returned no hidden states; classification needs an encoder whose forward "
                       "takes output_hidden_states=True")


def row_heads(model: AdaptedModel, adapter: Any, batch_size: int) -> list[tuple[ClassificationHead, list[int]]]:
    """(head, rows) groups: each row's head is the one carried by an adapter of its stack."""
    groups: dict[int, tuple[ClassificationHead, list[int]]] = {}
    for row, stack in enumerate(Routing.from_spec(adapter).row_stacks(batch_size)):
        heads = [model.get_adapter(name).head for name in stack]
        heads = [h for h in heads if h is not None]
        if len(heads) != 1:
            raise AdapterError(f"row {row} is routed to {list(stack) or 'no adapter'}: classification needs exactly "
                               f"one adapter with a head in each row's stack, found {len(heads)}")
        groups.setdefault(id(heads[0]), (heads[0], []))[1].append(row)
    return list(groups.values())


def classification_logits(model: AdaptedModel, batch: dict[str, torch.Tensor], adapter: Any,
                          forward: Callable[..., Any] | None = None) -> list[torch.Tensor]:
    """Per row, the logits of its adapter's head. `forward` runs the backbone (the trainer passes its
    accelerate-wrapped model, so gradients synchronise across processes); by default `model`.

    The adapters stay resident and pinned from the backbone's forward to their heads (`using`)."""
    forward = forward or model
    with model.using(adapter):
        groups = row_heads(model, adapter, batch["input_ids"].shape[0])  # no head: fail before the forward
        output = forward(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
        hidden, mask = hidden_states(output), batch["attention_mask"]
        per_row: list[torch.Tensor | None] = [None] * hidden.shape[0]
        for head, rows in groups:
            if head.hidden_size != hidden.shape[-1]:
                raise AdapterError(f"a classification head for hidden size {head.hidden_size} cannot read this "
                                   f"backbone's {hidden.shape[-1]}: the adapter was trained on another backbone")
            index = torch.tensor(rows, device=hidden.device)
            for row, logits in zip(rows, head(hidden.index_select(0, index), mask.index_select(0, index))):
                per_row[row] = logits
    return per_row  # type: ignore[return-value]


# -- data: {text, label} rows → tokens, batches, balanced weights ----------------------------------
def label_names(rows: Any, column: str = "label") -> list[str]:
    """The label set of a `datasets.Dataset`: a ClassLabel's names, else the sorted distinct values."""
    if column not in rows.column_names:
        raise AdapterError(f"classification rows need a {column!r} column; these have {rows.column_names}")
    feature = rows.features[column]
    names = getattr(feature, "names", None)
    if names:
        return list(names)
    return sorted({str(value) for value in rows[column]})


def text_column(rows: Any) -> str:
    for column in TEXT_COLUMNS:
        if column in rows.column_names:
            return column
    raise AdapterError(f"classification rows need a 'text' column; these have {rows.column_names}")


def encode_examples(rows: Any, tokenizer: Any, labels: Sequence[str], max_length: int | None = 256) -> Any:
    """Rows → a Dataset of `input_ids` and integer `labels` (indices into `labels`)."""
    from datasets import Dataset

    index = {str(label): i for i, label in enumerate(labels)}
    names = getattr(rows.features.get("label"), "names", None)
    column = text_column(rows)
    encoded = tokenizer(list(rows[column]), truncation=max_length is not None, max_length=max_length)["input_ids"]
    targets = []
    for value in rows["label"]:
        key = names[value] if names else str(value)
        if key not in index:
            raise AdapterError(f"label {key!r} is not in the classifier's label set {list(labels)}")
        targets.append(index[key])
    return Dataset.from_dict({"input_ids": encoded, "labels": targets})


@dataclass
class ClassificationCollator:
    """Encoded examples → right-padded `input_ids`, `attention_mask` and a `labels` vector."""

    tokenizer: Any

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.tensor(e["input_ids"], dtype=torch.long)
            mask[i, : len(e["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "labels": torch.tensor([e["labels"] for e in examples], dtype=torch.long)}


def balanced_weights(label_ids: Sequence[int], num_labels: int) -> torch.Tensor:
    """n / (K · n_c) per class c: every class weighs the same in the loss, and weights average 1 over rows."""
    counts = Counter(int(i) for i in label_ids)
    n = len(label_ids)
    return torch.tensor([n / (num_labels * counts[c]) if counts[c] else 0.0 for c in range(num_labels)])


def classification_loss(logits: list[torch.Tensor], labels: torch.Tensor,
                        weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of (class weight ×) cross-entropy; every row's head must have the same labels."""
    stacked = torch.stack(logits).float()
    per_row = F.cross_entropy(stacked, labels.to(stacked.device), reduction="none")
    if weights is not None:
        per_row = per_row * weights.to(stacked.device)[labels.to(stacked.device)]
    return per_row.mean()


# -- inference ----------------------------------------------------------------------------------------
class Classifier:
    """Label texts with classification adapters; per call or per row (`adapter=[...]`)."""

    def __init__(self, model: AdaptedModel, adapter: str | None = None, batch_size: int = 32,
                 max_length: int | None = 256):
        check_encoder(model)
        if model.tokenizer is None:
            raise AdapterError("Classifier needs the backbone's tokenizer: load it with ak.load(...)")
        self.model = model
        self.adapter = adapter
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def from_file(cls, path: str | Path, backbone: str | Path | None = None, **kwargs: Any) -> Classifier:
        """A classifier on its own backbone: the one named in the file unless `backbone` is given."""
        info = read_adapter_info(path)
        backbone = backbone or (info.get("training") or {}).get("backbone_id") or info.get("backbone", {}).get("id")
        if not backbone:
            raise AdapterError(f"{Path(path).name} names no backbone; pass backbone=...")
        model = AdaptedModel.from_pretrained(backbone)
        return cls(model, model.load_adapter(path), **kwargs)

    def labels(self, adapter: str | None = None) -> list[str]:
        head = self.model.get_adapter(self._adapter(adapter)).head
        if not isinstance(head, ClassificationHead):
            raise AdapterError(f"adapter {self._adapter(adapter)!r} has no classification head")
        return list(head.labels)

    def _adapter(self, adapter: Any) -> Any:
        adapter = self.adapter if adapter is None else adapter
        if adapter is None:
            raise AdapterError("no classification adapter: pass adapter=... here or to Classifier(...)")
        return adapter

    @torch.no_grad()
    def row_logits(self, texts: Sequence[str], adapter: Any = None) -> list[torch.Tensor]:
        """Each row's logits (label order: its head's `labels`); `adapter` may be one entry per row."""
        adapter = self._adapter(adapter)
        if isinstance(adapter, list) and len(adapter) != len(texts):
            raise AdapterError(f"got {len(adapter)} per-row adapters for {len(texts)} texts")
        device = next(self.model.model.parameters()).device
        out: list[torch.Tensor] = []
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(texts), self.batch_size):
                end = min(len(texts), start + self.batch_size)
                batch = self.model.tokenizer(list(texts[start:end]), padding=True, return_tensors="pt",
                                             truncation=self.max_length is not None, max_length=self.max_length)
                batch = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
                routes = adapter[start:end] if isinstance(adapter, list) else adapter
                out.extend(t.float().cpu() for t in classification_logits(self.model, batch, routes))
        finally:
            self.model.train(was_training)
        return out

    def logits(self, texts: Sequence[str], adapter: str | None = None) -> torch.Tensor:
        """[rows, labels] logits of one adapter's head."""
        rows = self.row_logits(texts, self._adapter(adapter))
        return torch.stack(rows) if rows else torch.empty(0, len(self.labels(adapter)))

    def predict(self, texts: Sequence[str], adapter: Any = None) -> list[Prediction]:
        """The most probable label of each row, with its softmax probability."""
        adapter = self._adapter(adapter)
        stacks = Routing.from_spec(adapter).row_stacks(len(texts)) if texts else []
        out = []
        for stack, logits in zip(stacks, self.row_logits(texts, adapter)):
            labels = next(self.model.get_adapter(n).head.labels for n in stack
                          if self.model.get_adapter(n).head is not None)
            probs = logits.softmax(-1)
            best = int(probs.argmax())
            out.append(Prediction(labels[best], float(probs[best]), dict(zip(labels, probs.tolist()))))
        return out

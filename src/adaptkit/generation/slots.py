"""A slot cache: every running row owns a slot of preallocated key/value buffers, written in place.

    buffer[slot, kv head, column, :]     a row's tokens at columns 0, 1, ... of its own slot: column = position

A decoding step writes each row's new key and value at its own column and attends over a view of the first
`width` columns of slots 0..rows-1 (nothing is copied); the step's 2D attention mask hides the columns a row
has not written. Rows that join are prefilled straight into free slots, so a join neither moves nor copies
the running rows' keys and values (the left-padded `DynamicCache` this replaces was rebuilt at every join,
and grown by a `torch.cat` of the whole cache at every step). Only growing past the capacity copies, and
`copies` counts it: the engine sizes the buffers up front.

The layers plug into transformers' own `Cache` (`CacheLayerMixin.update`, `get_mask_sizes`), so the models'
mask code runs unchanged: for it the cache holds `width - 1` past tokens and every query is the newest.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DummyLayer, DynamicLayer, DynamicSlidingWindowLayer

# The cache layers a slot cache stands in for: full and sliding-window attention (sliding layers hold a row
# whole while it stays within the window, which the engine checks), and layers that hold nothing.
SLOT_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, DummyLayer)


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, [slots, kv heads, columns, head dim] each."""

    is_compileable = False
    is_croppable = False

    def __init__(self, owner: SlotCache, is_sliding: bool = False, sliding_window: int | None = None):
        super().__init__()
        self.owner = owner
        self.is_sliding = is_sliding
        if sliding_window is not None:
            self.sliding_window = sliding_window
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Heads, head size, dtype and device come from the first keys: the config does not always say them.
        rows, columns = self.owner.capacity
        self.device = key_states.device
        self.key_buffer = key_states.new_zeros(rows, key_states.shape[1], columns, key_states.shape[3])
        self.value_buffer = value_states.new_zeros(rows, value_states.shape[1], columns, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.key_buffer is not None and self.value_buffer is not None
        owner = self.owner
        if owner.joining is not None:
            # Rows that join have no past: they attend to their own keys, which are also kept in their slots.
            slots = owner.joining
            width = key_states.shape[2]
            self.key_buffer[slots, :, :width] = key_states
            self.value_buffer[slots, :, :width] = value_states
            return key_states, value_states
        assert owner.columns is not None and key_states.shape[2] == 1, "a decoding step writes one token per row"
        rows, columns = owner.rows, owner.columns
        self.key_buffer[rows, :, columns] = key_states[:, :, 0]
        self.value_buffer[rows, :, columns] = value_states[:, :, 0]
        self.show(columns.shape[0], owner.width)
        return self.keys, self.values

    def show(self, rows: int, width: int) -> None:
        """`keys` / `values`: views of the first `width` columns of slots 0..rows-1 (what a cross-attention
        layer reads without calling `update`)."""
        if self.key_buffer is not None and self.value_buffer is not None:
            self.keys = self.key_buffer[:rows, :, :width]
            self.values = self.value_buffer[:rows, :, :width]

    def grow(self, rows: int, columns: int, keep: bool) -> bool:
        """Buffers of at least this capacity, holding what they held if `keep`; True when that copied keys."""
        if self.key_buffer is None or self.value_buffer is None:
            return False
        held_rows, _, held_columns, _ = self.key_buffer.shape
        if rows <= held_rows and columns <= held_columns:
            return False
        if not keep:  # nothing to keep: allocated again at the next update, at the new capacity
            self.key_buffer = self.value_buffer = self.keys = self.values = None
            self.is_initialized = False
            return False
        grown = []
        for buffer in (self.key_buffer, self.value_buffer):
            bigger = buffer.new_zeros(rows, buffer.shape[1], columns, buffer.shape[3])
            bigger[:held_rows, :, :held_columns] = buffer
            grown.append(bigger)
        self.key_buffer, self.value_buffer = grown
        return True

    def get_seq_length(self) -> int:
        return self.owner.past

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.past + query_length, 0

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """Slot layers shaped like `like` (a `DynamicCache` of the model: which layers slide, which hold nothing),
    or `layers` plain ones. Before each forward the engine says what it is: `prefill(slots)` for rows that
    join, `decode(columns, width)` for a step of every slot below `len(columns)`."""

    def __init__(self, rows: int, columns: int, like: Cache | None = None, layers: int = 0):
        made: list = []
        for layer in like.layers if like is not None else [None] * layers:
            if isinstance(layer, DummyLayer):
                made.append(DummyLayer())
            else:
                made.append(SlotLayer(self, bool(getattr(layer, "is_sliding", False)),
                                      getattr(layer, "sliding_window", None)))
        super().__init__(layers=made)
        self.capacity = (rows, columns)
        # Index tensors on the model's device, set once per forward and read by every layer.
        self.joining: torch.Tensor | None = None  # prefill: the joining rows' slots, in batch order
        self.columns: torch.Tensor | None = None  # decoding step: each row's write column (its own position)
        self.rows: torch.Tensor | None = None  # decoding step: 0..rows-1
        self.width = 0  # decoding step: columns the step attends over
        self.past = 0  # what the models' mask code is told the cache holds before this forward
        self.copies = 0  # times keys already held were copied (growing past the capacity)

    def prefill(self, slots: torch.Tensor) -> None:
        self.joining, self.columns, self.width, self.past = slots, None, 0, 0

    def decode(self, columns: torch.Tensor, width: int) -> None:
        self.joining, self.columns, self.width, self.past = None, columns, width, width - 1
        self.rows = torch.arange(columns.shape[0], device=columns.device)

    def show(self, rows: int, width: int) -> None:
        """Views of every layer for a step that reads this cache without writing it (cross-attention)."""
        # A past of `width` tells `EncoderDecoderCache` the cross-attention keys are there (`is_updated`).
        self.joining, self.columns, self.width, self.past = None, None, width, width
        for layer in self.layers:
            if isinstance(layer, SlotLayer):
                layer.show(rows, width)

    def reserve(self, rows: int, columns: int, running: bool) -> None:
        """Room for `rows` slots of `columns` tokens; growing doubles, and copies (counted) while rows run."""
        held_rows, held_columns = self.capacity
        if rows <= held_rows and columns <= held_columns:
            return
        self.capacity = (held_rows if rows <= held_rows else max(rows, 2 * held_rows),
                         held_columns if columns <= held_columns else max(columns, 2 * held_columns))
        copied = [layer.grow(*self.capacity, keep=running) for layer in self.layers if isinstance(layer, SlotLayer)]
        if any(copied):
            self.copies += 1

    def key_storage(self) -> list[int]:
        """Where each layer's buffers live (`data_ptr`): unchanged while nothing was copied."""
        return [pointer for layer in self.layers if isinstance(layer, SlotLayer) and layer.key_buffer is not None
                for pointer in (layer.key_buffer.data_ptr(), layer.value_buffer.data_ptr())]

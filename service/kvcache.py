"""Left padding and KV caches, shared by the engine (batched decode) and the hook editor (v* rows): which
attention layouts are served, and the cache they are served with. It sits below both so neither imports
the other.

Sliding-window layers get the same full-width cache as full-attention ones and take their window from
the attention mask (transformers' masking_utils applies it by column), so selecting rows, merging
batches and keeping prompt states never meet a cache that kept only its last window of columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from service.errors import ModelNotServable

__all__ = [
    "SERVABLE_ATTENTION",
    "LeftPadded",
    "check_cache_layout",
    "GrowingLayer",
    "full_width_cache",
    "growing_cache",
    "left_padded",
    "pad_columns_left",
]

SERVABLE_ATTENTION = frozenset({"full_attention", "sliding_attention"})


def _architecture(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return str(archs[0]) if archs else type(model).__name__


def check_cache_layout(model: nn.Module) -> None:
    """ModelNotServable unless every layer is full or sliding-window attention."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    config = model.config.get_text_config(decoder=True)
    try:
        kinds, _ = get_layer_types_and_kwargs(config)
    except Exception as exc:  # noqa: BLE001 - a config transformers cannot type is unknown to us too
        raise ModelNotServable(f"{_architecture(model)}: unknown cache layout ({exc})") from exc
    unknown = sorted(set(kinds) - SERVABLE_ATTENTION)
    if unknown:
        raise ModelNotServable(
            f"{_architecture(model)}: unknown cache type {', '.join(unknown)} "
            f"(the engine serves {', '.join(sorted(SERVABLE_ATTENTION))} layers)"
        )


def full_width_cache() -> DynamicCache:
    """An empty KV cache whose every layer keeps all its columns."""
    return DynamicCache()


# Spare columns a growing cache layer keeps to the right of its last one: at least GROW_MIN_COLUMNS, or
# 1/GROW_FRACTION of its width, so a decode of n tokens re-allocates O(log n) times, not n times.
GROW_MIN_COLUMNS = 32
GROW_FRACTION = 4


class GrowingLayer(DynamicLayer):
    """A full-width cache layer whose keys and values are views of buffers with spare columns on the right.

    DynamicLayer appends a decode step's column with torch.cat, copying the whole cache of every layer at
    every step (6 ms of a 115 ms 16-row SmolLM2 step on the CPU, 16 ms of 234 at 64 rows); here the new
    columns are written in place. `keys`/`values` may be replaced from outside (the engine adopts merged or
    selected tensors): a layer whose tensors are not views of its own buffers copies them into new
    buffers at its next update. Under autograd it appends as DynamicLayer does (an in-place write would
    invalidate tensors saved for the backward pass)."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            self._key_buffer = self._value_buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        width = self.keys.shape[-2] if self.keys.numel() else 0
        need = width + key_states.shape[-2]
        if not (_backs(self._key_buffer, self.keys, width, key_states, need)
                and _backs(self._value_buffer, self.values, width, value_states, need)):
            capacity = need + max(GROW_MIN_COLUMNS, need // GROW_FRACTION)
            self._key_buffer = _regrown(self.keys, width, key_states, capacity)
            self._value_buffer = _regrown(self.values, width, value_states, capacity)
        self._key_buffer[:, :, width:need].copy_(key_states)
        self._value_buffer[:, :, width:need].copy_(value_states)
        self.keys = self._key_buffer[:, :, :need]
        self.values = self._value_buffer[:, :, :need]
        return self.keys, self.values

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        super().reset()


def _backs(buffer: torch.Tensor | None, current: torch.Tensor, width: int, new: torch.Tensor,
           need: int) -> bool:
    """Whether `current` (the layer's `width` columns) is the front of `buffer`, which has room for `need`
    columns of `new`'s rows, heads, head size, dtype and device."""
    return (
        buffer is not None
        and buffer.shape[2] >= need
        and buffer.shape[:2] == new.shape[:2]
        and buffer.shape[3] == new.shape[3]
        and buffer.dtype == new.dtype
        and buffer.device == new.device
        and (width == 0 or (current.data_ptr() == buffer.data_ptr() and current.stride() == buffer.stride()))
    )


def _regrown(current: torch.Tensor, width: int, new: torch.Tensor, capacity: int) -> torch.Tensor:
    """A buffer of `capacity` columns holding `current`'s `width` columns at its front."""
    rows, heads, _, dim = new.shape
    buffer = torch.empty((rows, heads, capacity, dim), dtype=new.dtype, device=new.device)
    if width:
        buffer[:, :, :width].copy_(current)
    return buffer


def growing_cache() -> DynamicCache:
    """An empty full-width KV cache whose layers append new columns in place (the engine's forwards)."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer  # DynamicCache() replicates DynamicLayer per layer
    return cache


@dataclass(frozen=True)
class LeftPadded:
    """Token rows right-aligned in one [rows, width] batch: row i's real tokens are its rightmost ones,
    so every row ends in the last column; position ids count each row's own tokens from 0."""

    input_ids: torch.Tensor  # [rows, width]
    attention_mask: torch.Tensor  # [rows, width] 1 on real tokens
    position_ids: torch.Tensor  # [rows, width] 0 over the padding
    pads: list[int]  # padding columns per row


def left_padded(rows: Sequence[Sequence[int]], pad_id: int) -> LeftPadded:
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, (row, pad) in enumerate(zip(rows, pads, strict=True)):
        if row:
            input_ids[i, pad:] = torch.tensor(list(row), dtype=torch.long)
    columns = torch.arange(width)
    pad_t = torch.tensor(pads)
    mask = (columns[None, :] >= pad_t[:, None]).long()
    positions = (columns[None, :] - pad_t[:, None]).clamp(min=0)
    return LeftPadded(input_ids, mask, positions, pads)


def pad_columns_left(kv: torch.Tensor, width: int) -> torch.Tensor:
    """A [rows, heads, columns, dim] cache tensor widened to `width` columns with zeros on the left."""
    missing = width - kv.shape[2]
    return F.pad(kv, (0, 0, missing, 0)) if missing > 0 else kv

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

from service.errors import ModelNotServable

__all__ = [
    "SERVABLE_ATTENTION",
    "LeftPadded",
    "check_cache_layout",
    "full_width_cache",
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


def full_width_cache() -> Any:
    """An empty KV cache whose every layer keeps all its columns."""
    from transformers import DynamicCache

    return DynamicCache()


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

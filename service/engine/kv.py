"""KV caches for the engine: which attention layouts it serves, and the cache it serves them with.

Sliding-window layers get the same full-width cache as full-attention ones and take their window from
the attention mask (transformers' masking_utils applies it by column), so selecting rows, merging
batches and keeping prompt states never meet a cache that kept only its last window of columns.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from service.errors import ModelNotServable

__all__ = ["SERVABLE_ATTENTION", "check_cache_layout", "full_width_cache"]

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

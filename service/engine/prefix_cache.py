"""Prompt KV states kept after a forward, so that the same prompt is not prefilled twice.

A client that scores continuations of a prompt and then generates from it (an evaluation harness, a
ranker that then answers) sends the prompt through the model twice. Score's teacher-forced forward
already computed everything a generation's prefill would: the prompt's keys and values, the next-token
logits after its last token, the hook gate's activation at that token and the edits that fired over the
prompt. Keeping them lets the later prefill skip its forward; an identical prompt generated twice (retries,
several samples) hits the same way.

An entry is valid only for the hook table it was computed with and for the same hooks and adapter choices:
the key is (table version, hooks enabled, adapter on, prompt token ids), so an edit or a rollback (a new
version) makes every older entry unreachable; they age out of the LRU. Memory is bounded in bytes of tensors
held.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from service import metrics

PrefixKey = tuple[int, bool, bool, tuple[int, ...], frozenset[str] | None]


def prefix_key(
    version: int,
    use_hooks: bool,
    prompt_ids: list[int] | tuple[int, ...],
    adapted: bool = False,
    scope: frozenset[str] | None = None,
) -> PrefixKey:
    """`adapted`: the row ran with the alignment adapter (engine/adapter.py), another forward entirely.
    `scope`: the edit namespaces the row's hook gate saw (None: every namespace of the table)."""
    return (int(version), bool(use_hooks), bool(adapted), tuple(int(t) for t in prompt_ids),
            scope if use_hooks else None)


@dataclass
class PrefixEntry:
    """One prompt's state after its last token, as a prefill of that prompt alone would leave it."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (keys, values), [1, kv_heads, n, head_dim]
    logits: torch.Tensor  # [V] float32: the next-token logits after the prompt
    hook_keys: dict[int, torch.Tensor]  # gated layer -> [d_ff]: the MLP key at the prompt's last token
    fires: dict[str, float]  # edit_id -> best gate score over the prompt's tokens
    fired_tokens: int  # prompt tokens where some edit fired
    edit_version: int
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = [t for kv in self.kv for t in kv] + [self.logits, *self.hook_keys.values()]
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)

    @property
    def length(self) -> int:
        return int(self.kv[0][0].shape[2])


class PrefixCache:
    """A thread-safe LRU of PrefixEntry bounded by `max_bytes` (0 disables it)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[PrefixKey, PrefixEntry] = OrderedDict()
        self._bytes = 0
        self._newest_version = -1
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: PrefixKey) -> PrefixEntry | None:
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
        metrics.PREFIX_CACHE_LOOKUPS.labels(result="hit" if entry is not None else "miss").inc()
        return entry

    def put(self, key: PrefixKey, entry: PrefixEntry) -> None:
        if not self.enabled or entry.nbytes > self.max_bytes:
            return
        with self._lock:
            if entry.edit_version > self._newest_version:  # versions only grow: older ones are dead
                self._newest_version = entry.edit_version
                for stale in [k for k in self._entries if k[0] < entry.edit_version]:
                    self._bytes -= self._entries.pop(stale).nbytes
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._entries[key] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
            metrics.PREFIX_CACHE_BYTES.set(self._bytes)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            metrics.PREFIX_CACHE_BYTES.set(0)

"""Between the editor's torch objects and the edit log's torch-free records, and hook-table surgery.

Tensors go to the log as their raw bytes (dtype and shape alongside), so a restart decodes exactly the
bytes that were served: the table rebuilt from the log is bit-identical to the one published live.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from service.editlog import StoredEdit, StoredHook, TensorBlob
from service.hooks import HookEntry, HookTable
from service.hooks.layer import NO_PREV_CONDITION, LayerTable


def tensor_blob(t: torch.Tensor) -> TensorBlob:
    """Raw little-endian bytes of a CPU copy (every platform torch runs on here is little-endian);
    bfloat16 survives, which a numpy round trip would not."""
    flat = t.detach().to("cpu").contiguous()
    data = flat.reshape(-1).view(torch.uint8).numpy().tobytes() if flat.numel() else b""
    return TensorBlob(dtype=str(flat.dtype), shape=tuple(flat.shape), data=data)


def blob_tensor(blob: TensorBlob) -> torch.Tensor:
    dtype = getattr(torch, blob.dtype)
    if not blob.data:
        return torch.zeros(blob.shape, dtype=dtype)
    # bytearray: torch.frombuffer wants a writable buffer, and the tensor must own its memory.
    return torch.frombuffer(bytearray(blob.data), dtype=dtype).reshape(blob.shape)


def stored_hooks(entries: Sequence[HookEntry]) -> list[StoredHook]:
    return [
        StoredHook(
            layer=int(e.layer),
            key=tensor_blob(e.key),
            value=tensor_blob(e.value),
            threshold=e.threshold,
            prev_key=None if e.prev_key is None else tensor_blob(e.prev_key),
            prev_threshold=None if e.prev_key is None else e.prev_threshold,
        )
        for e in entries
    ]


def hook_entries(edit: StoredEdit) -> list[HookEntry]:
    return [
        HookEntry(
            edit.edit_id,
            h.layer,
            blob_tensor(h.key),
            blob_tensor(h.value),
            h.threshold,
            None if h.prev_key is None else blob_tensor(h.prev_key),
            NO_PREV_CONDITION if h.prev_threshold is None else h.prev_threshold,
            edit.namespace,
        )
        for h in edit.hooks
    ]


def ids_outside(table: HookTable, namespaces: frozenset[str]) -> set[str]:
    """Edit ids of `table` whose entries belong to none of `namespaces`."""
    out: set[str] = set()
    for lt in table.layers.values():
        if lt.namespace_set <= namespaces:
            continue
        out.update(i for n, i in enumerate(lt.ids) if lt.namespace_of(n) not in namespaces)
    return out


def embedding_blob(vector: np.ndarray) -> TensorBlob:
    return TensorBlob.from_numpy(np.asarray(vector, dtype=np.float32).reshape(-1))


def embedding_array(edit: StoredEdit) -> np.ndarray | None:
    return None if edit.embedding is None else edit.embedding.to_numpy()


def relabel(table: HookTable, version: int) -> HookTable:
    """The same rows under another version (the version travels with the table the engine reads)."""
    return HookTable(table.layers, version=version, device=table.device, dtype=table.dtype)


def without(table: HookTable, edit_ids: Iterable[str], version: int) -> HookTable:
    """`table` minus the rows of `edit_ids`, every other row kept in its order."""
    gone = set(edit_ids)
    layers: dict[int, LayerTable] = {}
    for i, lt in table.layers.items():
        keep = [n for n, edit_id in enumerate(lt.ids) if edit_id not in gone]
        if len(keep) == len(lt.ids):
            layers[i] = lt
            continue
        layers[i] = lt.select(torch.tensor(keep, dtype=torch.long))
    return HookTable(layers, version=version, device=table.device, dtype=table.dtype)

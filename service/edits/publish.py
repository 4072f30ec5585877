"""Publication: what one edit-set version serves (EditSnapshot), and the Publisher that turns registry
changes into it, the hook table and the retrieval index published together, with their gauges.

The Publisher owns no lock and no registry: the edit manager (service/edits/manager.py) calls it under
its commit lock and passes the registry the new version was applied to.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.editlog import EditRegistry, LogEntry, RegistryDelta, StoredEdit
from service.errors import FailedPrecondition
from service.hooks import HookManager, HookTable
from service.metrics import (
    EDIT_LOG_VERSION,
    EDITS_ACTIVE,
    HOOK_TABLE_BYTES,
    RETRIEVAL_INDEX_SIZE,
    set_namespace_gauge,
)
from service.retrieval import RetrievalStore, StoreSnapshot

from .convert import embedding_array, hook_entries, relabel, without

__all__ = ["EditSnapshot", "Publisher"]


@dataclass(frozen=True)
class EditSnapshot:
    """What one version serves: the hook table and the retrieval index published together."""

    version: int
    hooks: HookTable
    retrieval: StoreSnapshot

    def scoped(self, namespaces: frozenset[str]) -> EditSnapshot:
        """This version as a request naming `namespaces` sees it: only those namespaces' hook entries
        can fire and only their descriptors are retrieved (views; nothing is copied)."""
        return EditSnapshot(self.version, self.hooks.scoped(namespaces), self.retrieval.scoped(namespaces))


class Publisher:
    """Publishes the hook table of `hooks` and the index of `store`; `current` is the last published."""

    def __init__(self, hooks: HookManager, store: RetrievalStore) -> None:
        self.hooks = hooks
        self.store = store
        self.current = EditSnapshot(0, hooks.current, store.snapshot())

    def check_servable(self, active: Sequence[StoredEdit]) -> None:
        """FailedPrecondition for a stored edit this model or encoder cannot serve (other hook layers,
        other sizes): the log was written by another configuration."""
        hooks = self.hooks
        for e in active:
            for h in e.hooks:
                if h.layer not in hooks.layers:
                    raise FailedPrecondition(
                        f"edit {e.edit_id} in the log has a hook entry for layer {h.layer}, but this "
                        f"server hooks layers {hooks.layers}: start with the --hook-layers and "
                        "--auto-layer-candidates the log was written with"
                    )
                if h.key.shape != (hooks.d_ff,) or h.value.shape != (hooks.d_model,):
                    raise FailedPrecondition(
                        f"edit {e.edit_id} in the log has key/value shapes {h.key.shape}/{h.value.shape}, "
                        f"this model needs ({hooks.d_ff},)/({hooks.d_model},): the log was written for "
                        "another model"
                    )
            if e.embedding is not None and e.embedding.shape != (self.store.dim,):
                raise FailedPrecondition(
                    f"edit {e.edit_id} in the log has a {e.embedding.shape} descriptor embedding, this "
                    f"encoder makes ({self.store.dim},): the log was written with another encoder"
                )

    def table_of(self, active: Sequence[StoredEdit], version: int) -> HookTable:
        """The hook table of `active`, built from their stored entries (nothing recomputed)."""
        entries = [h for e in active for h in hook_entries(e)]
        return HookTable.build(entries, self.hooks.device, self.hooks.dtype, version=version)

    def rebuild_index(self, active: Sequence[StoredEdit]) -> None:
        """Replace the retrieval index with the descriptors of `active`."""
        self.store.rebuild(
            [(e.edit_id, e.descriptor, embedding_array(e), e.subject, e.namespace)
             for e in active if e.descriptor]
        )

    def publish_delta(self, delta: RegistryDelta, entry: LogEntry, registry: EditRegistry) -> None:
        """Publish the version `entry` made: the table and index changed by `delta`, not rebuilt."""
        new_ids = {e.edit_id for e in entry.edits}
        table = self.hooks.current
        if any(e.hooks and e.edit_id not in new_ids for e in delta.activated):
            # A restored (un-superseded) edit goes back to its (version, ordinal) place: rebuild, so the
            # live table always has the row order a restart produces.
            table = self.table_of(registry.active_edits(), entry.version)
        else:
            if delta.deactivated:
                in_table = set(table.edit_ids)
                gone = [i for i in delta.deactivated if i in in_table]
                if gone:
                    table = without(table, gone, entry.version)
            fresh = [h for e in delta.activated for h in hook_entries(e)]
            table = table.extended(fresh, version=entry.version) if fresh else relabel(table, entry.version)
        self.store.update(
            remove=delta.deactivated,
            add=[
                (e.edit_id, e.descriptor, embedding_array(e), e.subject, e.namespace)
                for e in delta.activated
                if e.descriptor
            ],
        )
        self.publish_table(table, registry)

    def publish_table(self, table: HookTable, registry: EditRegistry) -> None:
        """Serve `table` with the store's current index as one snapshot, and set the gauges."""
        self.hooks.publish(table)
        HOOK_TABLE_BYTES.set(table.nbytes)
        self.current = EditSnapshot(table.version, table, self.store.snapshot())
        counts = registry.counts()
        EDITS_ACTIVE.labels(path="hook").set(counts.active_hook)
        EDITS_ACTIVE.labels(path="retrieval").set(len(self.store))
        set_namespace_gauge(registry.active_by_namespace())
        RETRIEVAL_INDEX_SIZE.set(len(self.store))
        EDIT_LOG_VERSION.set(table.version)

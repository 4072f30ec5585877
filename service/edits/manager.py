"""EditManager: the one owner of edit state (edit log, registry, hook table, retrieval index).

Synchronous and thread-safe; the async data plane calls it through asyncio.to_thread.

Order of every change: validate -> compute (hook edits only) -> quality gate -> log.append (the durable
ack) -> registry.apply -> publish the hook table and the retrieval index for the new version. The log is
the source of truth; the in-memory state is a cache of it, rebuilt on start from the stored keys, values
and embeddings without recomputing anything.

Locks. `_compute_lock` serialises hook-edit computations and is held through that edit's commit, so each
edit is computed against the table of the edit before it. `_commit_lock` serialises log appends and
publication; it is never held while computing, so a rollback or a descriptor-only edit does not wait
behind a ~2 s optimisation. The engine takes neither: generation never waits for an edit. (A rollback
that commits while an edit is being computed leaves that edit's quality report measured against the
table just before the rollback.)

The manager orders and locks; its collaborators do the work: service/edits/compute.py computes, gates
and records edits, service/edits/publish.py publishes versions, service/edits/operations.py counts.
"""

from __future__ import annotations

import logging
import threading
from contextlib import nullcontext
from dataclasses import replace

from service.editlog import (
    EditLog,
    EditRegistry,
    EditView,
    LogEntry,
    RegistryCounts,
    RegistryDelta,
)
from service.engine.loader import LoadedModel
from service.errors import (
    AlreadyExists,
    EditLogCorrupted,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from service.hooks import Editor, HookManager
from service.namespaces import validate_namespace
from service.retrieval import RetrievalStore
from service.types import (
    BatchEditInput,
    BatchEditResult,
    EditInput,
    EditResult,
    ListEditsInput,
    QualityReportView,
    RollbackInput,
    RollbackResult,
    RollbackToInput,
    RollbackToResult,
)

from .compute import check_capacity, check_deadline, check_table_bytes, compute_edits, stored_edits
from .operations import check_metadata, counted_operation, namespace_label
from .policy import EditPolicy
from .publish import EditSnapshot, Publisher
from .requests import EditPlan, batch_digest, edit_digest, plan_edit

__all__ = ["EditManager"]

LIST_PAGE_SIZE = 50  # ListEditsInput: page_size 0 = 50
log = logging.getLogger(__name__)


class EditManager:
    def __init__(
        self,
        loaded: LoadedModel,
        log: EditLog,
        store: RetrievalStore,
        hooks: HookManager,
        editor: Editor,
        policy: EditPolicy,
        *,
        hook_rule: str = "",
        auto_layer_candidates: list[int] | None = None,
    ) -> None:
        """Replays `log` into `store` and the hook table of `hooks` (`restore`) and serves that state.
        The manager owns `log` and `hooks` from here: `close()` closes the log and uninstalls the hook
        layers, and so does a failed replay. service/compose.py builds the collaborators from Settings;
        `hook_rule` and `auto_layer_candidates` are what it chose, for GetServerInfo."""
        self.loaded = loaded
        self.log = log
        self.store = store
        self.hooks = hooks
        self.editor = editor
        self.policy = policy
        self.hook_rule = hook_rule
        self.auto_layer_candidates = auto_layer_candidates or []
        self._compute_lock = threading.Lock()
        self._commit_lock = threading.RLock()
        self._closed = False
        try:
            self.registry = EditRegistry()
            self._publisher = Publisher(hooks, store)
            self.restore()
        except BaseException:
            # Never leave a half-started manager's wrappers on a model someone else keeps using.
            hooks.uninstall()
            log.close()
            raise

    def warmup(self) -> None:
        """Pay the first edit's one-time costs now (probe activations, the encoder's first call)."""
        self.editor.warmup()
        if self.policy.retrieval_enabled:
            self.store.encoder.encode(["warm-up"])

    # ------------------------------------------------------------------ state

    @property
    def version(self) -> int:
        """The edit-set version currently published (hook table and retrieval index together)."""
        return self._publisher.current.version

    def snapshot(self) -> EditSnapshot:
        return self._publisher.current

    def restore(self) -> None:
        """Rebuild the registry, hook table and retrieval index from the log, recomputing nothing.

        A log that cannot be read back exactly raises EditLogCorrupted; stored edits this model or
        encoder cannot serve (other hook layers, other sizes) raise FailedPrecondition. Either way
        nothing is published: the server must not start on a partial state.
        """
        with self._compute_lock, self._commit_lock:
            self._check_open()
            registry = EditRegistry()
            try:
                for entry in self.log.read_all():
                    registry.apply(entry)
            except ValueError as exc:  # a gap, a repeated edit id: not something append can write
                raise EditLogCorrupted(f"edit log cannot be replayed: {exc}") from exc
            active = registry.active_edits()
            self._publisher.check_servable(active)
            table = self._publisher.table_of(active, registry.version)
            self._publisher.rebuild_index(active)
            self.registry = registry
            self._publisher.publish_table(table, registry)

    def catch_up(self) -> int:
        """Apply entries other replicas appended to a shared log; returns the version now served."""
        with self._commit_lock:
            self._check_open()
            self._catch_up()
            return self.version

    # ------------------------------------------------------------------ edits

    def edit(self, req: EditInput) -> EditResult:
        check_metadata(actor=req.actor, idempotency_key=req.idempotency_key)
        with counted_operation("edit", namespace_label(req.namespace)) as outcome:
            self._check_open()
            plan = self._plan(req)
            digest = edit_digest(req)
            entry = self._replay(req.idempotency_key, digest)
            if entry is None:
                entry, replayed = self._commit_edits(
                    [plan], "edit", req.actor, req.idempotency_key, digest, req.deadline
                )
            else:
                replayed = True
            if replayed:
                outcome.result = "replayed"
            return _edit_result(entry, 0)

    def batch_edit(self, req: BatchEditInput) -> BatchEditResult:
        """All or nothing, one version: one edit failing validation or the gate stores none of them."""
        check_metadata(actor=req.actor, idempotency_key=req.idempotency_key)
        with counted_operation("batch_edit", namespace_label(req.namespace)) as outcome:
            self._check_open()
            batch_ns = validate_namespace(req.namespace)
            # An edit without a namespace takes the batch's (digest and plan see the effective one).
            req = replace(req, edits=[e if e.namespace else replace(e, namespace=batch_ns)
                                      for e in req.edits])
            if not req.edits:
                raise InvalidArgument("must hold at least one edit", field="edits")
            if len(req.edits) > self.policy.max_batch_edits:
                raise InvalidArgument(
                    f"{len(req.edits)} edits; a BatchEdit holds at most {self.policy.max_batch_edits} "
                    "(--max-batch-edits): split it", field="edits",
                )
            plans = []
            for n, e in enumerate(req.edits):
                if e.idempotency_key:
                    raise InvalidArgument(
                        "set the idempotency key on the batch, not on its edits",
                        field=f"edits[{n}].idempotency_key",
                    )
                plans.append(self._plan(e, force=req.force or e.force, field_prefix=f"edits[{n}]"))
            digest = batch_digest(req)
            entry = self._replay(req.idempotency_key, digest)
            if entry is None:
                entry, replayed = self._commit_edits(
                    plans, "batch", req.actor, req.idempotency_key, digest, req.deadline
                )
            else:
                replayed = True
            if replayed:
                outcome.result = "replayed"
            return BatchEditResult(
                version=entry.version, edits=[_edit_result(entry, n) for n in range(len(entry.edits))]
            )

    def rollback(self, req: RollbackInput) -> RollbackResult:
        check_metadata(actor=req.actor, reason=req.reason, edit_id=req.edit_id)
        with counted_operation("rollback") as outcome:
            if not req.edit_id:
                raise InvalidArgument("must name an edit", field="edit_id")
            with self._commit_lock:
                self._check_open()
                self._catch_up()
                view = self.registry.check_rollback(req.edit_id)  # NotFound / FailedPrecondition
                outcome.namespace = view.namespace
                committed = self.log.append(
                    LogEntry(
                        kind="rollback",
                        actor=req.actor or "",
                        target_edit_ids=[req.edit_id],
                        reason=req.reason or "",
                    )
                )
                self._apply(committed)
            return RollbackResult(version=committed.version, edit_id=req.edit_id)

    def rollback_to(self, req: RollbackToInput) -> RollbackToResult:
        """Roll back every edit committed after `req.version`, in one log entry (nothing to roll back:
        nothing is appended and the current version comes back)."""
        check_metadata(actor=req.actor, reason=req.reason)
        with counted_operation("rollback_to", namespace_label(req.namespace, all_="")):
            namespace = validate_namespace(req.namespace) if req.namespace else ""
            with self._commit_lock:
                self._check_open()
                self._catch_up()
                ids = self.registry.check_rollback_to(req.version, namespace)  # InvalidArgument / NotFound
                if not ids:
                    return RollbackToResult(version=self.version, rolled_back_edit_ids=[])
                committed = self.log.append(
                    LogEntry(
                        kind="rollback_to",
                        actor=req.actor or "",
                        target_version=req.version,
                        target_edit_ids=ids,
                        reason=req.reason or "",
                        namespace=namespace,
                    )
                )
                delta = self._apply(committed)
            return RollbackToResult(version=committed.version, rolled_back_edit_ids=delta.rolled_back)

    # ------------------------------------------------------------------ queries

    def get(self, edit_id: str) -> EditView:
        if not edit_id:
            raise InvalidArgument("must name an edit", field="edit_id")
        view = self.registry.get(edit_id)
        if view is None:
            raise NotFound(f"no edit with id {edit_id!r}", field="edit_id")
        return view

    def list(self, req: ListEditsInput) -> tuple[list[EditView], str]:
        namespace = validate_namespace(req.namespace) if req.namespace else ""
        return self.registry.list(
            state=req.state or None, page_size=req.page_size or LIST_PAGE_SIZE, page_token=req.page_token,
            subject=req.subject, text=req.text, actor=req.actor, namespace=namespace,
        )

    def counts(self) -> RegistryCounts:
        return self.registry.counts()

    def close(self) -> None:
        """Uninstall the hook layers (the model is as loaded again) and close the log. Idempotent."""
        with self._compute_lock, self._commit_lock:
            if self._closed:
                return
            self._closed = True
            self.hooks.uninstall()
            self.log.close()

    def __enter__(self) -> EditManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals: edits

    def _plan(self, req: EditInput, *, force: bool | None = None, field_prefix: str = "") -> EditPlan:
        return plan_edit(
            req,
            self.editor,
            self.loaded.tokenizer,
            self.policy.max_descriptor_chars,
            force=force,
            field_prefix=field_prefix,
            fit_in_retrieval_prompt=self.policy.fits_in_retrieval_prompt,
            compile_descriptors=self.policy.compile_descriptors,
            descriptor_hooks=self.policy.descriptor_hooks,
            edit_layer=self.policy.edit_layer,
        )

    def _replay(self, key: str, digest: str) -> LogEntry | None:
        """The committed entry of an idempotent retry, or None for a first request."""
        if not key:
            return None
        entry = self.log.find_by_idempotency_key(key)
        if entry is None:
            return None
        if entry.request_digest != digest:
            raise AlreadyExists(
                f"idempotency key {key!r} was used by version {entry.version} for a different request",
                field="idempotency_key",
            )
        return entry

    def _commit_edits(
        self,
        plans: list[EditPlan],
        kind: str,
        actor: str,
        key: str,
        digest: str,
        deadline: float | None = None,
    ) -> tuple[LogEntry, bool]:
        """Compute, gate, append, apply. Returns (committed entry, True if it is another request's
        entry: the same idempotency key won a race with this one)."""
        hook_plans = [n for n, p in enumerate(plans) if p.kind == "triple"]
        with self._compute_lock if hook_plans else nullcontext():
            self._check_open()
            check_capacity(self.registry, plans, self.policy.max_edits)
            check_deadline(deadline, "before its computation")
            computed = (
                compute_edits(self.editor, self.registry, self.hooks.current, plans, hook_plans, deadline)
                if hook_plans else {}
            )
            check_table_bytes(self.hooks.current, computed, self.policy.max_hook_table_mb)
            vectors = self.store.encoder.encode([p.descriptor for p in plans])
            with self._commit_lock:
                self._check_open()
                self._catch_up()
                # Others may have committed while this one computed.
                check_capacity(self.registry, plans, self.policy.max_edits)
                check_deadline(deadline, "before its commit")  # a caller that gave up gets no edit
                edits = stored_edits(self.registry, plans, computed, vectors)
                committed = self.log.append(
                    LogEntry(
                        kind=kind,
                        actor=actor or "",
                        idempotency_key=key or "",
                        request_digest=digest,
                        edits=edits,
                    )
                )
                if [e.edit_id for e in committed.edits] != [e.edit_id for e in edits]:
                    self._catch_up()
                    return committed, True
                self._apply(committed)
                return committed, False

    # ------------------------------------------------------------------ internals: applying log entries

    def _catch_up(self, until: int | None = None) -> None:
        """Apply log entries after the registry's version (and before `until`): entries another replica
        appended to a shared log. On one node this finds nothing."""
        if until is not None and until <= self.registry.version + 1:
            return
        for entry in self.log.read_all(after_version=self.registry.version):
            if until is not None and entry.version >= until:
                break
            self._apply(entry)

    def _apply(self, entry: LogEntry) -> RegistryDelta:
        self._catch_up(until=entry.version)
        if entry.version <= self.registry.version:  # already applied (a tailer delivered it first)
            return RegistryDelta(version=entry.version)
        delta = self.registry.apply(entry)
        self._publisher.publish_delta(delta, entry, self.registry)
        return delta

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the edit manager is closed")


def _edit_result(entry: LogEntry, n: int) -> EditResult:
    edit = entry.edits[n]
    return EditResult(
        edit_id=edit.edit_id, version=entry.version, report=QualityReportView.from_dict(edit.report)
    )

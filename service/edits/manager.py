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
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, replace

import numpy as np

from service.editlog import (
    EditLog,
    EditRegistry,
    EditView,
    LogEntry,
    RegistryCounts,
    RegistryDelta,
    StoredEdit,
)
from service.engine.loader import LoadedModel
from service.errors import (
    AlreadyExists,
    DeadlineExceeded,
    EditLogCorrupted,
    EditServeError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from service.hooks import ComputedEdit, Editor, HookManager, HookTable
from service.metrics import (
    EDIT_COMPUTE,
    EDIT_LOG_VERSION,
    EDIT_OPERATIONS,
    EDITS_ACTIVE,
    HOOK_TABLE_BYTES,
    QUALITY_GATE,
    RETRIEVAL_INDEX_SIZE,
    count_namespace_operation,
    set_namespace_gauge,
)
from service.namespaces import DEFAULT_NAMESPACE, validate_namespace, validate_namespaces
from service.retrieval import RetrievalStore, StoreSnapshot
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

from .convert import (
    embedding_array,
    embedding_blob,
    hook_entries,
    ids_outside,
    relabel,
    stored_hooks,
    without,
)
from .policy import EditPolicy
from .requests import EditPlan, batch_digest, edit_digest, plan_edit

__all__ = ["EditManager", "EditSnapshot", "EditorFactory", "QualityGateRejected", "default_editor_factory"]

LIST_PAGE_SIZE = 50  # ListEditsInput: page_size 0 = 50
COMPILED_MESSAGE = "hook edit compiled from the descriptor"
COMPILED_WITHOUT_HOOK = (
    "descriptor-only edit: subject, prompt and target_new read from the descriptor for scope detection; "
    "no hook entry (--no-descriptor-hooks)"
)
COMPILED_GATE_FAILED = (
    "the hook edit compiled from the descriptor failed the quality gate and was dropped; "
    "the descriptor is served by retrieval"
)
DESCRIPTOR_ONLY_MESSAGE = "descriptor-only edit: retrieval path only (no hook entry, no quality gate)"

EditorFactory = Callable[[LoadedModel, HookManager], Editor]

log = logging.getLogger(__name__)


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


class QualityGateRejected(FailedPrecondition):
    """The quality gate refused the edit (or one edit of a batch); nothing was stored.

    `reports` has one report per requested edit, in request order, for the response body."""

    def __init__(self, message: str, reports: list[QualityReportView]) -> None:
        super().__init__(message)
        self.reports = reports
        self.details = tuple(reports)  # the caller reads them from the status details


def default_editor_factory(locality_max_top1_changed: float) -> EditorFactory:
    """The served editor: the hook editor with the quality gate's locality bound."""

    def make(loaded: LoadedModel, hooks: HookManager) -> Editor:
        return Editor(
            loaded.model,
            loaded.tokenizer,
            hooks,
            locality_max_top1_changed=locality_max_top1_changed,
        )

    return make


class _Outcome:
    result = "ok"
    namespace = DEFAULT_NAMESPACE  # the metrics label of the operation


def _namespace_label(name: str, all_: str = DEFAULT_NAMESPACE) -> str:
    """The namespace an operation is counted under; a name that fails validation is counted as
    "invalid" (it never becomes a label value)."""
    if not name:
        return all_ or "all"
    try:
        return validate_namespace(name)
    except InvalidArgument:
        return "invalid"



# Longest accepted metadata, in characters: they are stored in every log entry and indexed (an
# idempotency key of ~2.7 KB passes PostgreSQL's b-tree row limit only to fail after the edit computed).
METADATA_LIMITS = {"idempotency_key": 256, "actor": 256, "edit_id": 128, "reason": 2000}


def _check_metadata(**fields: str | None) -> None:
    for name, value in fields.items():
        limit = METADATA_LIMITS[name]
        if value and len(value) > limit:
            raise InvalidArgument(f"{len(value)} characters; at most {limit}", field=name)


def _check_deadline(deadline: float | None, when: str) -> None:
    """The caller's deadline passed: stop, and commit nothing (the caller has been told it failed)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"the deadline passed {when}; nothing was stored")

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
            self._snapshot = EditSnapshot(0, hooks.current, store.snapshot())
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
        return self._snapshot.version

    def snapshot(self) -> EditSnapshot:
        return self._snapshot

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
            self._check_servable(active)
            table = self._table_of(active, registry.version)
            self.store.rebuild(
                [(e.edit_id, e.descriptor, embedding_array(e), e.subject, e.namespace)
                 for e in active if e.descriptor]
            )
            self.registry = registry
            self._publish_table(table)

    def catch_up(self) -> int:
        """Apply entries other replicas appended to a shared log; returns the version now served."""
        with self._commit_lock:
            self._check_open()
            self._catch_up()
            return self.version

    # ------------------------------------------------------------------ edits

    def edit(self, req: EditInput) -> EditResult:
        _check_metadata(actor=req.actor, idempotency_key=req.idempotency_key)
        with self._operation("edit", _namespace_label(req.namespace)) as outcome:
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
        _check_metadata(actor=req.actor, idempotency_key=req.idempotency_key)
        with self._operation("batch_edit", _namespace_label(req.namespace)) as outcome:
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
        _check_metadata(actor=req.actor, reason=req.reason, edit_id=req.edit_id)
        with self._operation("rollback") as outcome:
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
        _check_metadata(actor=req.actor, reason=req.reason)
        with self._operation("rollback_to", _namespace_label(req.namespace, all_="")):
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
            self._check_capacity(plans)
            _check_deadline(deadline, "before its computation")
            computed = self._compute(plans, hook_plans, deadline) if hook_plans else {}
            self._check_table_bytes(computed)
            vectors = self.store.encoder.encode([p.descriptor for p in plans])
            with self._commit_lock:
                self._check_open()
                self._catch_up()
                self._check_capacity(plans)  # others may have committed while this one computed
                _check_deadline(deadline, "before its commit")  # a caller that gave up gets no edit
                edits = self._stored_edits(plans, computed, vectors)
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

    def _compute(
        self, plans: Sequence[EditPlan], hook_plans: list[int], deadline: float | None = None
    ) -> dict[int, ComputedEdit]:
        current = self.hooks.current
        hidden: set[str] = set()
        for n in hook_plans:
            hidden.update(self.registry.active_ids_for_relation(plans[n].relation_key, plans[n].namespace))
        # An edit is measured against the edits that will be served with it: its own namespace's (a
        # request naming several namespaces sees them together; the common case is one).
        hidden |= ids_outside(current, validate_namespaces([plans[n].namespace for n in hook_plans]))
        hidden &= set(current.edit_ids)
        # Measure against the table as it will be once the superseded edits are gone.
        base = without(current, hidden, current.version) if hidden else None
        out = self.editor.compute_many(  # type: ignore[misc]
            [plans[n].spec for n in hook_plans], base=base,
            between=lambda: _check_deadline(deadline, "while computing it"),
        )
        computed = dict(zip(hook_plans, out, strict=True))
        for n, ce in computed.items():
            EDIT_COMPUTE.observe(ce.report.compute_seconds)
            QUALITY_GATE.labels(result=_gate_verdict(ce.report.passed, plans[n])).inc()
        failed = [
            n for n, ce in computed.items()
            if not ce.report.passed and not plans[n].force and not plans[n].derived
        ]
        if failed:
            reports = [
                QualityReportView.from_dict(computed[n].report.to_dict())
                if n in computed
                else _descriptor_report()
                for n in range(len(plans))
            ]
            where = (lambda n: "") if len(plans) == 1 else (lambda n: f"edits[{n}]: ")
            reasons = "; ".join(f"{where(n)}{computed[n].report.message}" for n in failed)
            raise QualityGateRejected(
                f"quality gate failed, nothing was stored (force=true commits anyway): {reasons}", reports
            )
        return computed

    def _check_capacity(self, plans: Sequence[EditPlan]) -> None:
        active = self.registry.counts().active
        hidden = {
            i for p in plans if p.relation_key
            for i in self.registry.active_ids_for_relation(p.relation_key, p.namespace)
        }
        after = active - len(hidden) + len(plans)
        if after > self.policy.max_edits:
            raise ResourceExhausted(
                f"{active} edits are active and max_edits is {self.policy.max_edits}: "
                f"this request would make {after}; roll some back first"
            )

    def _check_table_bytes(self, computed: dict[int, ComputedEdit]) -> None:
        """The hook table lives in device memory: refuse an edit that would grow it past its bound."""
        limit = self.policy.max_hook_table_mb << 20
        if not limit or not computed:
            return
        table = self.hooks.current
        after = table.nbytes + sum(table.entry_nbytes(e) for ce in computed.values() for e in ce.entries)
        if after > limit:
            raise ResourceExhausted(
                f"the hook table would hold {after / 2**20:.1f} MiB and max_hook_table_mb is "
                f"{self.policy.max_hook_table_mb}: roll some edits back first"
            )

    def _stored_edits(
        self, plans: Sequence[EditPlan], computed: dict[int, ComputedEdit], vectors: np.ndarray
    ) -> list[StoredEdit]:
        edits: list[StoredEdit] = []
        # (namespace, relation key) -> earlier edits of this batch: supersede stays within a namespace
        in_batch: dict[tuple[str, str], list[str]] = {}
        for n, plan in enumerate(plans):
            edit_id = new_edit_id()
            supersedes: list[str] = []
            if plan.relation_key:
                supersedes = self.registry.active_ids_for_relation(plan.relation_key, plan.namespace)
                supersedes += in_batch.get((plan.namespace, plan.relation_key), [])
                in_batch.setdefault((plan.namespace, plan.relation_key), []).append(edit_id)
            ce = computed.get(n)
            spec = plan.spec
            report = ce.report.to_dict() if ce else asdict(_descriptor_report())
            if ce is not None and plan.derived and not ce.report.passed:
                # The compiled hook edit failed its gate: the descriptor alone carries the fact.
                report["message"] = f"{COMPILED_GATE_FAILED}: {ce.report.message}"
                ce = None
            elif ce is not None and plan.derived:
                report["message"] = f"{COMPILED_MESSAGE}; {ce.report.message}".rstrip("; ")
            elif plan.derived:
                report["message"] = COMPILED_WITHOUT_HOOK
            edits.append(
                StoredEdit(
                    edit_id=edit_id,
                    kind="triple" if ce is not None else "descriptor",
                    subject=spec.subject if spec else "",
                    prompt=spec.prompt if spec else "",
                    target_new=spec.target_new if spec else "",
                    paraphrases=list(spec.paraphrases) if spec else [],
                    descriptor=plan.descriptor,
                    relation_key=plan.relation_key,
                    hooks=stored_hooks(ce.with_id(edit_id).entries) if ce else [],
                    embedding=embedding_blob(vectors[n]),
                    report=report,
                    supersedes=supersedes,
                    derived_from_descriptor=plan.derived,
                    namespace=plan.namespace,
                )
            )
        return edits

    # ------------------------------------------------------------------ internals: publication

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
        self._publish_delta(delta, entry)
        return delta

    def _publish_delta(self, delta: RegistryDelta, entry: LogEntry) -> None:
        new_ids = {e.edit_id for e in entry.edits}
        table = self.hooks.current
        if any(e.hooks and e.edit_id not in new_ids for e in delta.activated):
            # A restored (un-superseded) edit goes back to its (version, ordinal) place: rebuild, so the
            # live table always has the row order a restart produces.
            table = self._table_of(self.registry.active_edits(), entry.version)
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
        self._publish_table(table)

    def _publish_table(self, table: HookTable) -> None:
        self.hooks.publish(table)
        HOOK_TABLE_BYTES.set(table.nbytes)
        self._snapshot = EditSnapshot(table.version, table, self.store.snapshot())
        counts = self.registry.counts()
        EDITS_ACTIVE.labels(path="hook").set(counts.active_hook)
        EDITS_ACTIVE.labels(path="retrieval").set(len(self.store))
        set_namespace_gauge(self.registry.active_by_namespace())
        RETRIEVAL_INDEX_SIZE.set(len(self.store))
        EDIT_LOG_VERSION.set(table.version)

    def _table_of(self, active: Sequence[StoredEdit], version: int) -> HookTable:
        entries = [h for e in active for h in hook_entries(e)]
        return HookTable.build(entries, self.hooks.device, self.hooks.dtype, version=version)

    def _check_servable(self, active: Sequence[StoredEdit]) -> None:
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

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("the edit manager is closed")

    @contextmanager
    def _operation(self, op: str, namespace: str = DEFAULT_NAMESPACE) -> Iterator[_Outcome]:
        outcome = _Outcome()
        outcome.namespace = namespace
        try:
            yield outcome
        except EditServeError as exc:
            EDIT_OPERATIONS.labels(op=op, result=exc.code.lower()).inc()
            count_namespace_operation(outcome.namespace, op, exc.code.lower())
            raise
        except BaseException:
            EDIT_OPERATIONS.labels(op=op, result="internal").inc()
            count_namespace_operation(outcome.namespace, op, "internal")
            raise
        EDIT_OPERATIONS.labels(op=op, result=outcome.result).inc()
        count_namespace_operation(outcome.namespace, op, outcome.result)


def _gate_verdict(passed: bool, plan: EditPlan) -> str:
    """The `editserve_quality_gate_total` label of one computed edit."""
    if passed:
        return "passed"
    return "forced" if plan.force else "dropped" if plan.derived else "failed"


def new_edit_id() -> str:
    return f"e-{secrets.token_hex(12)}"


def _descriptor_report() -> QualityReportView:
    return QualityReportView(passed=True, message=DESCRIPTOR_ONLY_MESSAGE)


def _edit_result(entry: LogEntry, n: int) -> EditResult:
    edit = entry.edits[n]
    return EditResult(
        edit_id=edit.edit_id, version=entry.version, report=QualityReportView.from_dict(edit.report)
    )

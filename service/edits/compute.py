"""From edit plans to the records of one log entry: the hook computation, the quality gate, the bounds on
active edits and hook-table bytes, and the StoredEdits a commit appends.

Module functions over explicit arguments (the registry, the served hook table, the editor): the edit
manager (service/edits/manager.py) calls them under its locks, and they hold no state of their own.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

import numpy as np

from service.editlog import EditRegistry, StoredEdit
from service.engine.loader import LoadedModel
from service.errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted
from service.hooks import ComputedEdit, Editor, HookManager, HookTable
from service.metrics import EDIT_COMPUTE, QUALITY_GATE
from service.namespaces import validate_namespaces
from service.types import QualityReportView

from .convert import embedding_blob, ids_outside, stored_hooks, without
from .requests import EditPlan

__all__ = [
    "EditorFactory",
    "QualityGateRejected",
    "check_capacity",
    "check_deadline",
    "check_table_bytes",
    "compute_edits",
    "default_editor_factory",
    "descriptor_report",
    "new_edit_id",
    "stored_edits",
]

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


def check_deadline(deadline: float | None, when: str) -> None:
    """The caller's deadline passed: stop, and commit nothing (the caller has been told it failed)."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded(f"the deadline passed {when}; nothing was stored")


def compute_edits(
    editor: Editor,
    registry: EditRegistry,
    current: HookTable,
    plans: Sequence[EditPlan],
    hook_plans: list[int],
    deadline: float | None = None,
) -> dict[int, ComputedEdit]:
    """Compute the hook edits `plans[n]` for n in `hook_plans` against the served table `current`, and
    apply the quality gate: QualityGateRejected unless every failing edit is forced or compiled."""
    hidden: set[str] = set()
    for n in hook_plans:
        hidden.update(registry.active_ids_for_relation(plans[n].relation_key, plans[n].namespace))
    # An edit is measured against the edits that will be served with it: its own namespace's (a
    # request naming several namespaces sees them together; the common case is one).
    hidden |= ids_outside(current, validate_namespaces([plans[n].namespace for n in hook_plans]))
    hidden &= set(current.edit_ids)
    # Measure against the table as it will be once the superseded edits are gone.
    base = without(current, hidden, current.version) if hidden else None
    out = editor.compute_many(  # type: ignore[misc]
        [plans[n].spec for n in hook_plans], base=base,
        between=lambda: check_deadline(deadline, "while computing it"),
    )
    computed = dict(zip(hook_plans, out, strict=True))
    for n, ce in computed.items():
        EDIT_COMPUTE.observe(ce.report.compute_seconds)
        QUALITY_GATE.labels(result=gate_verdict(ce.report.passed, plans[n])).inc()
    failed = [
        n for n, ce in computed.items()
        if not ce.report.passed and not plans[n].force and not plans[n].derived
    ]
    if failed:
        reports = [
            QualityReportView.from_dict(computed[n].report.to_dict())
            if n in computed
            else descriptor_report()
            for n in range(len(plans))
        ]
        where = (lambda n: "") if len(plans) == 1 else (lambda n: f"edits[{n}]: ")
        reasons = "; ".join(f"{where(n)}{computed[n].report.message}" for n in failed)
        raise QualityGateRejected(
            f"quality gate failed, nothing was stored (force=true commits anyway): {reasons}", reports
        )
    return computed


def check_capacity(registry: EditRegistry, plans: Sequence[EditPlan], max_edits: int) -> None:
    """ResourceExhausted when committing `plans` would leave more than `max_edits` edits active."""
    active = registry.counts().active
    hidden = {
        i for p in plans if p.relation_key
        for i in registry.active_ids_for_relation(p.relation_key, p.namespace)
    }
    after = active - len(hidden) + len(plans)
    if after > max_edits:
        raise ResourceExhausted(
            f"{active} edits are active and max_edits is {max_edits}: "
            f"this request would make {after}; roll some back first"
        )


def check_table_bytes(table: HookTable, computed: dict[int, ComputedEdit], max_hook_table_mb: int) -> None:
    """The hook table lives in device memory: refuse an edit that would grow it past its bound."""
    limit = max_hook_table_mb << 20
    if not limit or not computed:
        return
    after = table.nbytes + sum(table.entry_nbytes(e) for ce in computed.values() for e in ce.entries)
    if after > limit:
        raise ResourceExhausted(
            f"the hook table would hold {after / 2**20:.1f} MiB and max_hook_table_mb is "
            f"{max_hook_table_mb}: roll some edits back first"
        )


def stored_edits(
    registry: EditRegistry, plans: Sequence[EditPlan], computed: dict[int, ComputedEdit], vectors: np.ndarray
) -> list[StoredEdit]:
    """The log records of `plans`: new edit ids, what each supersedes, hook entries, embeddings, reports."""
    edits: list[StoredEdit] = []
    # (namespace, relation key) -> earlier edits of this batch: supersede stays within a namespace
    in_batch: dict[tuple[str, str], list[str]] = {}
    for n, plan in enumerate(plans):
        edit_id = new_edit_id()
        supersedes: list[str] = []
        if plan.relation_key:
            supersedes = registry.active_ids_for_relation(plan.relation_key, plan.namespace)
            supersedes += in_batch.get((plan.namespace, plan.relation_key), [])
            in_batch.setdefault((plan.namespace, plan.relation_key), []).append(edit_id)
        ce = computed.get(n)
        spec = plan.spec
        report = ce.report.to_dict() if ce else asdict(descriptor_report())
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


def gate_verdict(passed: bool, plan: EditPlan) -> str:
    """The `editserve_quality_gate_total` label of one computed edit."""
    if passed:
        return "passed"
    return "forced" if plan.force else "dropped" if plan.derived else "failed"


def new_edit_id() -> str:
    return f"e-{secrets.token_hex(12)}"


def descriptor_report() -> QualityReportView:
    return QualityReportView(passed=True, message=DESCRIPTOR_ONLY_MESSAGE)

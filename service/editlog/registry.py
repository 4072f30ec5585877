"""The edit registry: which edit is active, superseded or rolled back, replayed from the log.

It is a pure function of the log: applying the same entries in version order always gives the
same state, so every replica (and every restart) agrees. The data plane validates a request with
`check_rollback` / `check_rollback_to` BEFORE appending, then applies the committed entry; `apply`
returns what changed so the hook tables and the faiss index can be swapped incrementally.

Supersede chains: `superseded_by` always points at the edit that currently hides this one. When
that edit is rolled back, the hidden ones come back if it was active, or are handed to whatever
hid it if it was itself superseded, so rolling back any link of a chain leaves the newest
surviving edit of the relation active.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import builtins
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from service.errors import FailedPrecondition, InvalidArgument, NotFound

from .model import DEFAULT_NAMESPACE, LogEntry, StoredEdit, request_digest
from .store import EditLog

__all__ = ["EditRegistry", "EditView", "RegistryCounts", "RegistryDelta", "request_digest", "STATES"]

ACTIVE = "active"
ROLLED_BACK = "rolled_back"
SUPERSEDED = "superseded"
STATES = (ACTIVE, ROLLED_BACK, SUPERSEDED)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_TOKEN_PREFIX = "e1:"  # bump if the token's meaning changes, so old tokens fail loudly
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class EditView(StoredEdit):
    """A StoredEdit with where it came from and what happened to it since (a snapshot copy)."""

    version: int = 0
    ordinal: int = 0
    created_at: datetime = _EPOCH
    actor: str = ""
    state: str = ACTIVE  # "active" | "rolled_back" | "superseded"
    rolled_back_version: int = 0  # 0 = not rolled back (as the proto reads it)
    rolled_back_by: str = ""
    rolled_back_at: datetime | None = None
    rollback_reason: str = ""
    superseded_by: str = ""  # the edit hiding this one; kept as history after a rollback


@dataclass
class RegistryDelta:
    """What one applied entry changed in the active set."""

    version: int
    activated: list[StoredEdit] = field(default_factory=list)  # new edits and restored ones
    deactivated: list[str] = field(default_factory=list)  # rolled back or superseded
    rolled_back: list[str] = field(default_factory=list)  # ids this entry actually rolled back

    @property
    def changed(self) -> bool:
        return bool(self.activated or self.deactivated)


@dataclass(frozen=True)
class RegistryCounts:
    total: int
    active: int
    superseded: int
    rolled_back: int
    active_hook: int  # active "triple" edits (hook layers)
    active_descriptor: int  # active "descriptor" (retrieval-only) edits


@dataclass
class _Record:
    edit: StoredEdit
    version: int
    ordinal: int
    created_at: datetime
    actor: str
    state: str = ACTIVE
    rolled_back_version: int = 0
    rolled_back_by: str = ""
    rolled_back_at: datetime | None = None
    rollback_reason: str = ""
    superseded_by: str = ""

    def view(self) -> EditView:
        e = self.edit
        return EditView(
            edit_id=e.edit_id,
            kind=e.kind,
            subject=e.subject,
            prompt=e.prompt,
            target_new=e.target_new,
            paraphrases=list(e.paraphrases),
            descriptor=e.descriptor,
            relation_key=e.relation_key,
            hooks=list(e.hooks),
            embedding=e.embedding,
            report=dict(e.report),
            supersedes=list(e.supersedes),
            derived_from_descriptor=e.derived_from_descriptor,
            namespace=e.namespace,
            version=self.version,
            ordinal=self.ordinal,
            created_at=self.created_at,
            actor=self.actor,
            state=self.state,
            rolled_back_version=self.rolled_back_version,
            rolled_back_by=self.rolled_back_by,
            rolled_back_at=self.rolled_back_at,
            rollback_reason=self.rollback_reason,
            superseded_by=self.superseded_by,
        )


class EditRegistry:
    """In-memory state of every edit; thread-safe (one lock around each call)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.version = 0
        self._records: dict[str, _Record] = {}
        self._ordered: list[_Record] = []  # (version, ordinal) order = apply order
        self._positions: list[tuple[int, int]] = []  # sort keys of _ordered, for bisect
        self._hidden_by: dict[str, set[str]] = {}  # superseder id -> ids it currently supersedes
        self._by_relation: dict[str, list[_Record]] = {}
        self._counts: Counter[tuple[str, str]] = Counter()  # (state, kind) -> n
        self._active_ns: Counter[str] = Counter()  # namespace -> active edits

    # ------------------------------------------------------------------ replay

    @classmethod
    def from_log(cls, log: EditLog) -> EditRegistry:
        registry = cls()
        registry.catch_up(log)
        return registry

    def catch_up(self, log: EditLog) -> list[RegistryDelta]:
        """Apply every entry after `self.version` (a replica tailing the shared log)."""
        return [self.apply(entry) for entry in log.read_all(after_version=self.version)]

    def apply(self, entry: LogEntry) -> RegistryDelta:
        """Apply the committed entry `self.version + 1`. An already-applied version is a no-op
        (empty delta), so the appender and a log tailer may both deliver it; a gap is a bug."""
        with self._lock:
            if entry.version <= self.version:
                return RegistryDelta(version=entry.version)
            if entry.version != self.version + 1:
                raise ValueError(f"registry at version {self.version} cannot apply version {entry.version}")
            touched: dict[str, bool] = {}  # id -> was active before this entry
            delta = RegistryDelta(version=entry.version)
            if entry.kind in ("edit", "batch"):
                for ordinal, edit in enumerate(entry.edits):
                    self._add(entry, ordinal, edit, touched)
            elif entry.kind in ("rollback", "rollback_to"):
                # rollback_to rolls back exactly the ids recorded at request time (what the caller
                # was told), newest first, so replay never depends on what raced in after it.
                targets = [self._records[i] for i in entry.target_edit_ids if i in self._records]
                for rec in sorted(targets, key=lambda r: (r.version, r.ordinal), reverse=True):
                    if rec.state != ROLLED_BACK:
                        self._rollback(rec, entry, touched)
                        delta.rolled_back.append(rec.edit.edit_id)
                delta.rolled_back.reverse()
            else:
                raise ValueError(f"unknown log entry kind {entry.kind!r}")
            self.version = entry.version
            for edit_id, was_active in touched.items():
                rec = self._records[edit_id]
                is_active = rec.state == ACTIVE
                if is_active and not was_active:
                    delta.activated.append(rec.edit)
                elif was_active and not is_active:
                    delta.deactivated.append(edit_id)
            return delta

    def _add(self, entry: LogEntry, ordinal: int, edit: StoredEdit, touched: dict[str, bool]) -> None:
        if edit.edit_id in self._records:
            raise ValueError(f"edit {edit.edit_id!r} is already in the registry")
        rec = _Record(
            edit=edit, version=entry.version, ordinal=ordinal, created_at=entry.created_at, actor=entry.actor
        )
        self._records[edit.edit_id] = rec
        self._ordered.append(rec)
        self._positions.append((rec.version, rec.ordinal))
        self._counts[(ACTIVE, edit.kind)] += 1
        self._active_ns[edit.namespace] += 1
        if edit.relation_key:
            self._by_relation.setdefault(edit.relation_key, []).append(rec)
        touched.setdefault(edit.edit_id, False)
        for old_id in edit.supersedes:
            old = self._records.get(old_id)
            if old is None or old.state != ACTIVE:  # already hidden or rolled back: nothing to hide
                continue
            touched.setdefault(old_id, True)
            self._set_state(old, SUPERSEDED)
            old.superseded_by = edit.edit_id
            self._hidden_by.setdefault(edit.edit_id, set()).add(old_id)

    def _rollback(self, rec: _Record, entry: LogEntry, touched: dict[str, bool]) -> None:
        edit_id = rec.edit.edit_id
        touched.setdefault(edit_id, rec.state == ACTIVE)
        heir = rec.superseded_by if rec.state == SUPERSEDED else ""
        if heir:
            self._hidden_by.get(heir, set()).discard(edit_id)
        self._set_state(rec, ROLLED_BACK)
        rec.rolled_back_version = entry.version
        rec.rolled_back_by = entry.actor
        rec.rolled_back_at = entry.created_at
        rec.rollback_reason = entry.reason
        for hidden_id in sorted(self._hidden_by.pop(edit_id, set())):
            hidden = self._records[hidden_id]
            touched.setdefault(hidden_id, hidden.state == ACTIVE)
            if heir:  # the rolled-back edit was itself hidden: its heir keeps hiding the older ones
                hidden.superseded_by = heir
                self._hidden_by.setdefault(heir, set()).add(hidden_id)
            else:
                self._set_state(hidden, ACTIVE)
                hidden.superseded_by = ""

    def _set_state(self, rec: _Record, state: str) -> None:
        self._counts[(rec.state, rec.edit.kind)] -= 1
        self._counts[(state, rec.edit.kind)] += 1
        self._active_ns[rec.edit.namespace] += (state == ACTIVE) - (rec.state == ACTIVE)
        if not self._active_ns[rec.edit.namespace]:
            del self._active_ns[rec.edit.namespace]
        rec.state = state

    # ------------------------------------------------------------------ validation helpers

    def check_rollback(self, edit_id: str) -> EditView:
        """Raise unless `edit_id` can be rolled back now; returns its current view."""
        with self._lock:
            rec = self._records.get(edit_id)
            if rec is None:
                raise NotFound(f"no edit with id {edit_id!r}", field="edit_id")
            if rec.state == ROLLED_BACK:
                raise FailedPrecondition(
                    f"edit {edit_id!r} was already rolled back at version {rec.rolled_back_version}",
                    field="edit_id",
                )
            return rec.view()

    def check_rollback_to(self, version: int, namespace: str = "") -> list[str]:
        """Ids a rollback_to `version` would roll back (put them in the entry's target_edit_ids); with a
        `namespace`, only that namespace's edits."""
        with self._lock:
            if version < 0:
                raise InvalidArgument(f"must be >= 0, got {version}", field="version")
            if version > self.version:
                raise NotFound(
                    f"version {version} is beyond the head version {self.version}", field="version"
                )
            start = bisect.bisect_left(self._positions, (version + 1, -1))  # first edit after `version`
            return [
                r.edit.edit_id for r in self._ordered[start:]
                if r.state != ROLLED_BACK and (not namespace or r.edit.namespace == namespace)
            ]

    # ------------------------------------------------------------------ queries

    def get(self, edit_id: str) -> EditView | None:
        with self._lock:
            rec = self._records.get(edit_id)
            return rec.view() if rec is not None else None

    def list(
        self, state: str | None = None, page_size: int = 0, page_token: str = "", *,
        subject: str = "", text: str = "", actor: str = "", namespace: str = "",
    ) -> tuple[builtins.list[EditView], str]:
        """One page in (version, ordinal) order, optionally of one state and matching the filters
        (combined with AND); "" token = first page.

        The token names the last edit returned, not an offset, so pages stay stable while
        edits change state or new ones arrive between calls.
        """
        if state and state not in STATES:
            raise InvalidArgument(
                f"unknown state {state!r}; expected one of {', '.join(STATES)}", field="state"
            )
        if page_size < 0:
            raise InvalidArgument(f"must be >= 0, got {page_size}", field="page_size")
        matches = _filter(subject=subject, text=text, actor=actor)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode_token(page_token) if page_token else None
        with self._lock:
            start = bisect.bisect_right(self._positions, after) if after is not None else 0
            page: list[EditView] = []
            next_token = ""
            for rec in self._ordered[start:]:
                if state and rec.state != state:
                    continue
                if matches is not None and not matches(rec):
                    continue
                if namespace and rec.edit.namespace != namespace:
                    continue
                if len(page) == size:  # one more match exists: hand out a token
                    last = page[-1]
                    next_token = _encode_token(last.version, last.ordinal)
                    break
                page.append(rec.view())
            return page, next_token

    def active_edits(self) -> builtins.list[StoredEdit]:
        with self._lock:
            return [r.edit for r in self._ordered if r.state == ACTIVE]

    def active_ids_for_relation(
        self, relation_key: str, namespace: str = DEFAULT_NAMESPACE
    ) -> builtins.list[str]:
        """Active edits on the same subject+relation in the same namespace: what a new edit should list in
        `supersedes` (tenants never supersede each other's edits)."""
        with self._lock:
            return [r.edit.edit_id for r in self._by_relation.get(relation_key, [])
                    if r.state == ACTIVE and r.edit.namespace == namespace]

    def namespace_of(self, edit_id: str) -> str:
        """The namespace of a known edit (DEFAULT_NAMESPACE for an unknown id): cheaper than `get`."""
        rec = self._records.get(edit_id)
        return DEFAULT_NAMESPACE if rec is None else rec.edit.namespace

    def active_by_namespace(self) -> dict[str, int]:
        """Active edits per namespace (metrics)."""
        with self._lock:
            return dict(self._active_ns)

    def counts(self) -> RegistryCounts:
        with self._lock:
            c = self._counts
            by_state = {s: sum(n for (st, _), n in c.items() if st == s) for s in STATES}
            return RegistryCounts(
                total=len(self._records),
                active=by_state[ACTIVE],
                superseded=by_state[SUPERSEDED],
                rolled_back=by_state[ROLLED_BACK],
                active_hook=c[(ACTIVE, "triple")],
                active_descriptor=c[(ACTIVE, "descriptor")],
            )

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._records

    def ids(self) -> builtins.list[str]:
        with self._lock:
            return [r.edit.edit_id for r in self._ordered]


MAX_FILTER_CHARS = 256


def _filter_value(value: str, name: str) -> str:
    """A filter as it is compared (casefolded), or "" for none; a value no edit could sensibly be searched
    by is the caller's mistake, not an empty result."""
    if not value:
        return ""
    if len(value) > MAX_FILTER_CHARS:
        raise InvalidArgument(f"{len(value)} characters; at most {MAX_FILTER_CHARS}", field=name)
    if not value.strip():
        raise InvalidArgument("must not be only whitespace (leave it empty for no filter)", field=name)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise InvalidArgument("must not contain control characters", field=name)
    return value.casefold()


def _filter(*, subject: str, text: str, actor: str) -> Callable[[_Record], bool] | None:
    """The ListEdits filters as one predicate, or None when there are none (validated either way)."""
    subject, text = _filter_value(subject, "subject"), _filter_value(text, "text")
    actor = _filter_value(actor, "actor").strip()  # a name: surrounding spaces are never meant
    if not (subject or text or actor):
        return None

    def matches(rec: _Record) -> bool:
        e = rec.edit
        if subject and subject not in e.subject.casefold():
            return False
        if actor and actor != rec.actor.strip().casefold():
            return False
        if text:
            texts = (e.subject, e.prompt, e.target_new, e.descriptor, *e.paraphrases)
            return any(text in t.casefold() for t in texts)
        return True

    return matches


def _encode_token(version: int, ordinal: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{version}:{ordinal}".encode()).decode()


def _decode_token(token: str) -> tuple[int, int]:
    try:
        raw = base64.urlsafe_b64decode(token.encode("ascii")).decode()
        if not raw.startswith(_TOKEN_PREFIX):
            raise ValueError("wrong prefix")
        version, ordinal = (int(p) for p in raw.removeprefix(_TOKEN_PREFIX).split(":"))
        if version < 0 or ordinal < 0:
            raise ValueError("negative position")
    except (ValueError, UnicodeError, binascii.Error) as exc:
        raise InvalidArgument("is not a token this server issued", field="page_token") from exc
    return version, ordinal

"""Between `LogEntry` and table rows: validation into the exact form `read_all` returns, rows for an
append, and decoding with checksum verification (a row that does not decode, or whose content is not
what was committed, raises EditLogCorrupted naming its version)."""

from __future__ import annotations

import json
import math
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Row

from service.errors import EditLogCorrupted, InvalidArgument

from .model import (
    DEFAULT_NAMESPACE,
    EDIT_KINDS,
    ENTRY_KINDS,
    LogEntry,
    StoredEdit,
    StoredHook,
    TensorBlob,
    canonical_json,
    entry_checksum,
    to_utc,
)

__all__ = ["decode_entry", "entry_rows", "normalised_entry"]


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refuse it on SQLite too so both backends agree.
        raise InvalidArgument("must not contain NUL characters", field=field)
    return value


def normalised_entry(entry: LogEntry) -> LogEntry:
    """Validated copy in exactly the form read_all will return (UTC time, plain-JSON report)."""
    if entry.kind not in ENTRY_KINDS:
        raise ValueError(f"unknown log entry kind {entry.kind!r}")
    n_edits = len(entry.edits)
    if entry.kind == "edit" and n_edits != 1:
        raise ValueError(f"an 'edit' entry holds exactly one edit, got {n_edits}")
    if entry.kind == "batch" and n_edits == 0:
        raise ValueError("a 'batch' entry holds at least one edit")
    if entry.kind in ("rollback", "rollback_to") and n_edits:
        raise ValueError(f"a {entry.kind!r} entry holds no edits")
    if entry.kind == "rollback" and not entry.target_edit_ids:
        raise ValueError("a 'rollback' entry names the edit ids it rolls back")
    if entry.kind == "rollback_to" and (entry.target_version is None or entry.target_version < 0):
        raise ValueError("a 'rollback_to' entry needs target_version >= 0")
    if entry.kind not in ("rollback_to",) and entry.target_version is not None:
        raise ValueError(f"target_version is only for 'rollback_to', not {entry.kind!r}")
    if not isinstance(entry.created_at, datetime):
        raise ValueError("created_at must be a datetime")

    edits, seen = [], set()
    for edit in entry.edits:
        if edit.kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {edit.kind!r}")
        if not edit.edit_id or edit.edit_id in seen:
            raise ValueError(f"edit_id {edit.edit_id!r} is empty or repeated in one entry")
        seen.add(edit.edit_id)
        hooks = []
        for h in edit.hooks:
            if not isinstance(h.key, TensorBlob) or not isinstance(h.value, TensorBlob):
                raise ValueError("hook key and value must be TensorBlobs")
            threshold = float(h.threshold)
            if not math.isfinite(threshold):  # SQLite stores NaN as NULL: refuse it up front
                raise ValueError(f"hook threshold must be finite, got {threshold}")
            prev_threshold = None
            if h.prev_key is not None:
                if not isinstance(h.prev_key, TensorBlob) or h.prev_threshold is None:
                    raise ValueError("a hook's prev_key is a TensorBlob and comes with prev_threshold")
                prev_threshold = float(h.prev_threshold)
                if not math.isfinite(prev_threshold):
                    raise ValueError(f"hook prev_threshold must be finite, got {prev_threshold}")
            elif h.prev_threshold is not None:
                raise ValueError("a hook's prev_threshold comes with prev_key")
            hooks.append(
                StoredHook(
                    layer=int(h.layer),
                    key=h.key,
                    value=h.value,
                    threshold=threshold,
                    prev_key=h.prev_key,
                    prev_threshold=prev_threshold,
                )
            )
        if edit.embedding is not None and not isinstance(edit.embedding, TensorBlob):
            raise ValueError("embedding must be a TensorBlob or None")
        edits.append(
            StoredEdit(
                edit_id=_check_text(edit.edit_id, "edit_id"),
                kind=edit.kind,
                subject=_check_text(edit.subject, "subject"),
                prompt=_check_text(edit.prompt, "prompt"),
                target_new=_check_text(edit.target_new, "target_new"),
                paraphrases=[_check_text(p, "paraphrases") for p in edit.paraphrases],
                descriptor=_check_text(edit.descriptor, "descriptor"),
                relation_key=_check_text(edit.relation_key, "relation_key"),
                hooks=hooks,
                embedding=edit.embedding,
                report=json.loads(canonical_json(dict(edit.report))),
                supersedes=[_check_text(s, "supersedes") for s in edit.supersedes],
                derived_from_descriptor=bool(edit.derived_from_descriptor),
                namespace=_check_text(edit.namespace, "namespace") or DEFAULT_NAMESPACE,
            )
        )
    return LogEntry(
        version=0,
        kind=entry.kind,
        created_at=to_utc(entry.created_at),
        actor=_check_text(entry.actor, "actor"),
        idempotency_key=_check_text(entry.idempotency_key, "idempotency_key"),
        request_digest=_check_text(entry.request_digest, "request_digest"),
        edits=edits,
        target_edit_ids=[_check_text(t, "target_edit_ids") for t in entry.target_edit_ids],
        target_version=int(entry.target_version) if entry.target_version is not None else None,
        reason=_check_text(entry.reason, "reason"),
        namespace=_check_text(entry.namespace, "namespace"),
    )


def entry_rows(entry: LogEntry) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    entry_row = {
        "version": entry.version,
        "kind": entry.kind,
        "created_at": entry.created_at.isoformat(timespec="microseconds"),
        "actor": entry.actor,
        "idempotency_key": entry.idempotency_key,
        "request_digest": entry.request_digest,
        "reason": entry.reason,
        "target_version": entry.target_version,
        "target_edit_ids": canonical_json(entry.target_edit_ids),
        "checksum": entry_checksum(entry),
        "namespace": entry.namespace or None,
    }
    edit_rows, hook_rows = [], []
    for ordinal, edit in enumerate(entry.edits):
        emb = edit.embedding
        edit_rows.append(
            {
                "edit_id": edit.edit_id,
                "version": entry.version,
                "ordinal": ordinal,
                "kind": edit.kind,
                "subject": edit.subject,
                "prompt": edit.prompt,
                "target_new": edit.target_new,
                "paraphrases": canonical_json(edit.paraphrases),
                "descriptor": edit.descriptor,
                "relation_key": edit.relation_key,
                "report": canonical_json(edit.report),
                "supersedes": canonical_json(edit.supersedes),
                "emb_dtype": emb.dtype if emb else None,
                "emb_shape": canonical_json(emb.shape) if emb else None,
                "emb_data": emb.data if emb else None,
                "derived_from_descriptor": True if edit.derived_from_descriptor else None,
                # NULL for the default namespace: the rows of older releases read the same way
                "namespace": None if edit.namespace == DEFAULT_NAMESPACE else edit.namespace,
            }
        )
        for h_ordinal, hook in enumerate(edit.hooks):
            hook_rows.append(
                {
                    "edit_id": edit.edit_id,
                    "ordinal": h_ordinal,
                    "version": entry.version,
                    "layer": hook.layer,
                    "threshold": hook.threshold,
                    "key_dtype": hook.key.dtype,
                    "key_shape": canonical_json(hook.key.shape),
                    "key_data": hook.key.data,
                    "value_dtype": hook.value.dtype,
                    "value_shape": canonical_json(hook.value.shape),
                    "value_data": hook.value.data,
                    "prev_threshold": hook.prev_threshold,
                    "prev_key_dtype": hook.prev_key.dtype if hook.prev_key else None,
                    "prev_key_shape": canonical_json(hook.prev_key.shape) if hook.prev_key else None,
                    "prev_key_data": hook.prev_key.data if hook.prev_key else None,
                }
            )
    return entry_row, edit_rows, hook_rows


def _blob(dtype: str, shape_json: str, data: bytes) -> TensorBlob:
    return TensorBlob(dtype=dtype, shape=tuple(json.loads(shape_json)), data=data)


def decode_entry(
    row: Row[Any], edit_rows: list[Row[Any]], hooks_by_edit: dict[str, list[Row[Any]]]
) -> LogEntry:
    version = row.version
    try:
        edits = []
        for ordinal, e in enumerate(edit_rows):
            if e.ordinal != ordinal:
                raise ValueError(f"edit ordinals are not 0..n-1 (found {e.ordinal} at {ordinal})")
            hooks = []
            for h_ordinal, h in enumerate(hooks_by_edit.pop(e.edit_id, [])):
                if h.ordinal != h_ordinal or h.version != version:
                    raise ValueError(f"hook rows of edit {e.edit_id!r} are out of place")
                hooks.append(
                    StoredHook(
                        layer=int(h.layer),
                        key=_blob(h.key_dtype, h.key_shape, h.key_data),
                        value=_blob(h.value_dtype, h.value_shape, h.value_data),
                        threshold=float(h.threshold),
                        prev_key=None
                        if h.prev_key_dtype is None
                        else _blob(h.prev_key_dtype, h.prev_key_shape, h.prev_key_data),
                        prev_threshold=None if h.prev_threshold is None else float(h.prev_threshold),
                    )
                )
            embedding = None
            if e.emb_dtype is not None:
                embedding = _blob(e.emb_dtype, e.emb_shape, e.emb_data)
            edits.append(
                StoredEdit(
                    edit_id=e.edit_id,
                    kind=e.kind,
                    subject=e.subject,
                    prompt=e.prompt,
                    target_new=e.target_new,
                    paraphrases=json.loads(e.paraphrases),
                    descriptor=e.descriptor,
                    relation_key=e.relation_key,
                    hooks=hooks,
                    embedding=embedding,
                    report=json.loads(e.report),
                    supersedes=json.loads(e.supersedes),
                    derived_from_descriptor=bool(e.derived_from_descriptor),
                    namespace=e.namespace or DEFAULT_NAMESPACE,
                )
            )
        entry = LogEntry(
            version=version,
            kind=row.kind,
            created_at=to_utc(datetime.fromisoformat(row.created_at)),
            actor=row.actor,
            idempotency_key=row.idempotency_key,
            request_digest=row.request_digest,
            edits=edits,
            target_edit_ids=json.loads(row.target_edit_ids),
            target_version=row.target_version,
            reason=row.reason,
            namespace=row.namespace or "",
        )
        checksum = entry_checksum(entry)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:  # JSONDecodeError is a ValueError
        raise EditLogCorrupted(f"edit log entry version {version} cannot be decoded: {exc}") from exc
    if checksum != row.checksum:
        raise EditLogCorrupted(
            f"edit log entry version {version} fails its checksum (stored {str(row.checksum)[:12]}…, "
            f"computed {checksum[:12]}…): its stored content is not what was committed"
        )
    return entry

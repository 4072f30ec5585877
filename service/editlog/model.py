"""Plain, JSON-able records of the edit log.

Tensors travel as bytes + dtype + shape (little-endian, C order) so this package never
imports torch; the data plane turns them into tensors with `torch.frombuffer`, or goes
through numpy with `TensorBlob.to_numpy`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

ENTRY_KINDS = ("edit", "batch", "rollback", "rollback_to")
# The namespace of an edit that names none, and of every edit logged before namespaces existed.
DEFAULT_NAMESPACE = "default"
EDIT_KINDS = ("triple", "descriptor")

# Byte width of every dtype a blob may carry. bfloat16 is here because hook values may be
# computed in it on GPU; numpy has no bfloat16, so to_numpy widens it to float32 (exact).
DTYPE_ITEMSIZE: dict[str, int] = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


def to_utc(ts: datetime) -> datetime:
    """UTC-aware copy; a naive datetime is taken to be UTC already."""
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, UTF-8 kept. Used for digests and checksums."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def _json_default(value: Any) -> Any:
    # numpy scalars/arrays sneak into quality reports; store them as plain JSON numbers/lists.
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def request_digest(fields: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a request's fields: same content, same digest.

    The data plane stores it with the idempotency key; a retry with the same key and digest
    gets the original entry back, one with another digest gets ALREADY_EXISTS.
    """
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()


@dataclass
class TensorBlob:
    dtype: str
    shape: tuple[int, ...]
    data: bytes

    def __post_init__(self) -> None:
        self.dtype = str(self.dtype).removeprefix("torch.")
        self.shape = tuple(int(d) for d in self.shape)
        self.data = bytes(self.data)
        itemsize = DTYPE_ITEMSIZE.get(self.dtype)
        if itemsize is None:
            raise ValueError(f"unsupported tensor dtype {self.dtype!r}")
        if any(d < 0 for d in self.shape):
            raise ValueError(f"negative dimension in shape {self.shape}")
        expected = math.prod(self.shape) * itemsize
        if len(self.data) != expected:
            raise ValueError(
                f"tensor of {self.dtype}{list(self.shape)} needs {expected} bytes, got {len(self.data)}"
            )

    @classmethod
    def from_numpy(cls, arr: np.ndarray) -> TensorBlob:
        arr = np.asarray(arr)
        little = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        return cls(dtype=arr.dtype.name, shape=tuple(arr.shape), data=little.tobytes())

    def to_numpy(self) -> np.ndarray:
        """A writable array (a copy); bfloat16 comes back widened to float32."""
        if self.dtype == "bfloat16":
            raw = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return raw.view(np.float32).reshape(self.shape)
        return (
            np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<")).reshape(self.shape).copy()
        )

    def digest(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape), "data": base64.b64encode(self.data).decode()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorBlob:
        return cls(dtype=d["dtype"], shape=tuple(d["shape"]), data=base64.b64decode(d["data"]))


@dataclass
class StoredHook:
    layer: int
    key: TensorBlob
    value: TensorBlob
    threshold: float
    # the previous-token condition (hooks/layer.py); both None for entries without one, and for every
    # entry logged before the condition existed, so those replay and checksum exactly as before
    prev_key: TensorBlob | None = None
    prev_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "layer": self.layer,
            "key": self.key.to_dict(),
            "value": self.value.to_dict(),
            "threshold": self.threshold,
        }
        if self.prev_key is not None:
            d["prev_key"] = self.prev_key.to_dict()
            d["prev_threshold"] = self.prev_threshold
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredHook:
        prev = d.get("prev_key")
        return cls(
            layer=int(d["layer"]),
            key=TensorBlob.from_dict(d["key"]),
            value=TensorBlob.from_dict(d["value"]),
            threshold=float(d["threshold"]),
            prev_key=None if prev is None else TensorBlob.from_dict(prev),
            prev_threshold=None if prev is None else float(d["prev_threshold"]),
        )


@dataclass
class StoredEdit:
    edit_id: str
    kind: str  # "triple" | "descriptor"
    subject: str = ""
    prompt: str = ""
    target_new: str = ""
    paraphrases: list[str] = field(default_factory=list)
    descriptor: str = ""
    relation_key: str = ""  # normalised subject+relation; same key = the new edit supersedes the old
    hooks: list[StoredHook] = field(default_factory=list)
    embedding: TensorBlob | None = None  # descriptor embedding, so replicas need not re-encode
    report: dict[str, Any] = field(default_factory=dict)
    supersedes: list[str] = field(default_factory=list)
    # subject/prompt/target_new were compiled from the descriptor (service/edits/compile.py)
    derived_from_descriptor: bool = False
    namespace: str = DEFAULT_NAMESPACE  # requests see this edit only when they name its namespace

    @property
    def hook_layers(self) -> list[int]:
        return sorted({h.layer for h in self.hooks})

    def stored_edit(self) -> StoredEdit:
        """Just the StoredEdit fields (drops EditView's state when called on a view)."""
        return StoredEdit(**{name: getattr(self, name) for name in _STORED_EDIT_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "edit_id": self.edit_id,
            "kind": self.kind,
            "subject": self.subject,
            "prompt": self.prompt,
            "target_new": self.target_new,
            "paraphrases": list(self.paraphrases),
            "descriptor": self.descriptor,
            "relation_key": self.relation_key,
            "hooks": [h.to_dict() for h in self.hooks],
            "embedding": self.embedding.to_dict() if self.embedding is not None else None,
            "report": self.report,
            "supersedes": list(self.supersedes),
        }
        if self.derived_from_descriptor:  # absent otherwise: entries logged before it keep their bytes
            d["derived_from_descriptor"] = True
        if self.namespace != DEFAULT_NAMESPACE:  # likewise: older entries keep their checksums
            d["namespace"] = self.namespace
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StoredEdit:
        emb = d.get("embedding")
        return cls(
            edit_id=d["edit_id"],
            kind=d["kind"],
            subject=d.get("subject", ""),
            prompt=d.get("prompt", ""),
            target_new=d.get("target_new", ""),
            paraphrases=list(d.get("paraphrases", [])),
            descriptor=d.get("descriptor", ""),
            relation_key=d.get("relation_key", ""),
            hooks=[StoredHook.from_dict(h) for h in d.get("hooks", [])],
            embedding=TensorBlob.from_dict(emb) if emb is not None else None,
            report=dict(d.get("report", {})),
            supersedes=list(d.get("supersedes", [])),
            derived_from_descriptor=bool(d.get("derived_from_descriptor", False)),
            namespace=d.get("namespace") or DEFAULT_NAMESPACE,
        )


_STORED_EDIT_FIELDS = tuple(StoredEdit.__dataclass_fields__)


@dataclass
class LogEntry:
    """One committed change. Build it with version=0; `EditLog.append` assigns the version."""

    version: int = 0
    kind: str = "edit"  # "edit" | "batch" | "rollback" | "rollback_to"
    created_at: datetime = field(default_factory=utcnow)
    actor: str = ""
    idempotency_key: str = ""
    request_digest: str = ""
    edits: list[StoredEdit] = field(default_factory=list)
    target_edit_ids: list[str] = field(default_factory=list)  # rollback / rollback_to: the ids it rolls back
    target_version: int | None = None  # rollback_to
    reason: str = ""
    namespace: str = ""  # rollback_to limited to one namespace ("" = every namespace)

    def to_dict(self) -> dict[str, Any]:
        d = {
            "version": self.version,
            "kind": self.kind,
            "created_at": to_utc(self.created_at).isoformat(timespec="microseconds"),
            "actor": self.actor,
            "idempotency_key": self.idempotency_key,
            "request_digest": self.request_digest,
            "edits": [e.to_dict() for e in self.edits],
            "target_edit_ids": list(self.target_edit_ids),
            "target_version": self.target_version,
            "reason": self.reason,
        }
        if self.namespace:  # absent otherwise: older entries keep their checksums
            d["namespace"] = self.namespace
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LogEntry:
        tv = d.get("target_version")
        return cls(
            version=int(d.get("version", 0)),
            kind=d["kind"],
            created_at=to_utc(datetime.fromisoformat(d["created_at"])),
            actor=d.get("actor", ""),
            idempotency_key=d.get("idempotency_key", ""),
            request_digest=d.get("request_digest", ""),
            edits=[StoredEdit.from_dict(e) for e in d.get("edits", [])],
            target_edit_ids=list(d.get("target_edit_ids", [])),
            target_version=int(tv) if tv is not None else None,
            reason=d.get("reason", ""),
            namespace=d.get("namespace", ""),
        )


def _blob_fingerprint(blob: TensorBlob | None) -> dict[str, Any] | None:
    # Hash the bytes once instead of base64-ing them into the canonical text: same coverage, less work.
    if blob is None:
        return None
    return {"dtype": blob.dtype, "shape": list(blob.shape), "sha256": blob.digest()}


def _hook_fingerprint(h: StoredHook) -> dict[str, Any]:
    doc = {
        "layer": h.layer,
        "threshold": h.threshold,
        "key": _blob_fingerprint(h.key),
        "value": _blob_fingerprint(h.value),
    }
    if h.prev_key is not None:  # absent otherwise: older entries keep their checksums
        doc["prev_key"] = _blob_fingerprint(h.prev_key)
        doc["prev_threshold"] = h.prev_threshold
    return doc


def entry_checksum(entry: LogEntry) -> str:
    """sha256 over an entry's whole canonical content, tensor bytes included."""
    doc = entry.to_dict()
    for e_doc, edit in zip(doc["edits"], entry.edits, strict=True):
        e_doc["embedding"] = _blob_fingerprint(edit.embedding)
        e_doc["hooks"] = [_hook_fingerprint(h) for h in edit.hooks]
    return hashlib.sha256(canonical_json(doc).encode()).hexdigest()

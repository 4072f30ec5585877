"""Durable, append-only edit log (SQLite or PostgreSQL) and the edit registry replayed from it.

Imports neither grpc nor torch: tensors are TensorBlobs (bytes + dtype + shape).
"""

from .model import LogEntry, StoredEdit, StoredHook, TensorBlob, entry_checksum, request_digest
from .registry import EditRegistry, EditView, RegistryCounts, RegistryDelta
from .store import EditLog

__all__ = [
    "EditLog",
    "EditRegistry",
    "EditView",
    "LogEntry",
    "RegistryCounts",
    "RegistryDelta",
    "StoredEdit",
    "StoredHook",
    "TensorBlob",
    "entry_checksum",
    "request_digest",
]

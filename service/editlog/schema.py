"""The edit log's tables (SQLAlchemy Core, one schema for SQLite and PostgreSQL)."""

from __future__ import annotations

import sqlalchemy as sa

__all__ = ["ADDED_EDIT_COLUMNS", "ADDED_ENTRY_COLUMNS", "ADDED_HOOK_COLUMNS", "METADATA", "TABLES",
           "log_edits", "log_entries", "log_head", "log_hooks"]

METADATA = sa.MetaData()
# SQLite: INTEGER PRIMARY KEY is the rowid itself (no second b-tree); PostgreSQL: bigint.
VERSION_TYPE = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# JSON-valued columns are Text holding canonical JSON: identical on both backends, and NaN in a
# quality report (which PostgreSQL's json type refuses) still round-trips.
# Columns added after the first release: nullable, and added to an existing table when it is opened.
# namespace: NULL is "default", the namespace of every edit logged before namespaces existed.
ADDED_EDIT_COLUMNS = (
    sa.Column("derived_from_descriptor", sa.Boolean, nullable=True),
    sa.Column("namespace", sa.Text, nullable=True),
)
# namespace: the one namespace a rollback_to was limited to (NULL: every namespace).
ADDED_ENTRY_COLUMNS = (sa.Column("namespace", sa.Text, nullable=True),)

log_entries = sa.Table(
    "log_entries",
    METADATA,
    sa.Column("version", VERSION_TYPE, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),  # ISO 8601 UTC, microseconds: exact round trip
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("request_digest", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("target_version", sa.BigInteger, nullable=True),
    sa.Column("target_edit_ids", sa.Text, nullable=False),  # JSON list
    sa.Column("checksum", sa.String(64), nullable=False),
    *ADDED_ENTRY_COLUMNS,
)
sa.Index(
    "uq_log_entries_idempotency_key",
    log_entries.c.idempotency_key,
    unique=True,
    sqlite_where=log_entries.c.idempotency_key != "",
    postgresql_where=log_entries.c.idempotency_key != "",
)

log_edits = sa.Table(
    "log_edits",
    METADATA,
    sa.Column("edit_id", sa.Text, primary_key=True),
    sa.Column("version", VERSION_TYPE, sa.ForeignKey("log_entries.version"), nullable=False, index=True),
    sa.Column("ordinal", sa.Integer, nullable=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("prompt", sa.Text, nullable=False),
    sa.Column("target_new", sa.Text, nullable=False),
    sa.Column("paraphrases", sa.Text, nullable=False),
    sa.Column("descriptor", sa.Text, nullable=False),
    sa.Column("relation_key", sa.Text, nullable=False),
    sa.Column("report", sa.Text, nullable=False),
    sa.Column("supersedes", sa.Text, nullable=False),
    sa.Column("emb_dtype", sa.String(16), nullable=True),
    sa.Column("emb_shape", sa.Text, nullable=True),
    sa.Column("emb_data", sa.LargeBinary, nullable=True),
    *ADDED_EDIT_COLUMNS,
    sa.UniqueConstraint("version", "ordinal", name="uq_log_edits_version_ordinal"),
)

# Columns added after the first release: nullable, and added to an existing table when it is opened.
ADDED_HOOK_COLUMNS = (
    sa.Column("prev_threshold", sa.Double, nullable=True),
    sa.Column("prev_key_dtype", sa.String(16), nullable=True),
    sa.Column("prev_key_shape", sa.Text, nullable=True),
    sa.Column("prev_key_data", sa.LargeBinary, nullable=True),
)

log_hooks = sa.Table(
    "log_hooks",
    METADATA,
    sa.Column("edit_id", sa.Text, sa.ForeignKey("log_edits.edit_id"), primary_key=True),
    sa.Column("ordinal", sa.Integer, primary_key=True),
    sa.Column("version", VERSION_TYPE, nullable=False, index=True),  # lets replay range-scan without a join
    sa.Column("layer", sa.Integer, nullable=False),
    sa.Column("threshold", sa.Double, nullable=False),
    sa.Column("key_dtype", sa.String(16), nullable=False),
    sa.Column("key_shape", sa.Text, nullable=False),
    sa.Column("key_data", sa.LargeBinary, nullable=False),
    sa.Column("value_dtype", sa.String(16), nullable=False),
    sa.Column("value_shape", sa.Text, nullable=False),
    sa.Column("value_data", sa.LargeBinary, nullable=False),
    *ADDED_HOOK_COLUMNS,
)

TABLES = (log_entries, log_edits, log_hooks)  # append-only: triggers refuse UPDATE and DELETE

# The highest version ever committed (one row, id 1), written in every append's transaction: a log whose
# entries end below it lost acknowledged edits, and it is refused at start. SQLite also keeps it in a
# file beside the database (store.py), which survives a truncated or damaged database file.
log_head = sa.Table(
    "log_head",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", VERSION_TYPE, nullable=False),
)

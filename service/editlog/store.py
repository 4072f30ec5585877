"""The durable, append-only edit log: SQLite by default, PostgreSQL for replicas, one code path.

Guarantees:
* `append` assigns the next version inside the write transaction, under a lock every appender
  takes (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped advisory lock), so versions are
  1, 2, 3, ... with no gap and commit in version order, even with several replicas appending.
* It returns only after COMMIT (SQLite WAL + synchronous=FULL; PostgreSQL synchronous_commit=on).
* Rows are never updated or deleted: there is no such statement here, and database triggers
  refuse them, so a stray tool cannot rewrite history quietly.
* Every entry stores a sha256 over its canonical content (tensor bytes included); `read_all`
  verifies it, and gaps and undecodable rows, and raises EditLogCorrupted naming the version.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine, Row

from service.errors import AlreadyExists, EditLogCorrupted, InvalidArgument, Unavailable

from .model import (
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

SQLITE_FILENAME = "editlog.sqlite3"
_WRITE_OPTION = "editlog_write"  # execution option: this transaction appends (SQLite: BEGIN IMMEDIATE)
_READ_CHUNK = 1000  # entries per round trip in read_all: 3 queries per chunk, not per entry

_metadata = sa.MetaData()
# SQLite: INTEGER PRIMARY KEY is the rowid itself (no second b-tree); PostgreSQL: bigint.
_Version = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

log_entries = sa.Table(
    "log_entries",
    _metadata,
    sa.Column("version", _Version, primary_key=True, autoincrement=False),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("created_at", sa.String(40), nullable=False),  # ISO 8601 UTC, microseconds: exact round trip
    sa.Column("actor", sa.Text, nullable=False),
    sa.Column("idempotency_key", sa.Text, nullable=False),
    sa.Column("request_digest", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("target_version", sa.BigInteger, nullable=True),
    sa.Column("target_edit_ids", sa.Text, nullable=False),  # JSON list
    sa.Column("checksum", sa.String(64), nullable=False),
)
sa.Index(
    "uq_log_entries_idempotency_key",
    log_entries.c.idempotency_key,
    unique=True,
    sqlite_where=log_entries.c.idempotency_key != "",
    postgresql_where=log_entries.c.idempotency_key != "",
)

# JSON-valued columns are Text holding canonical JSON: identical on both backends, and NaN in a
# quality report (which PostgreSQL's json type refuses) still round-trips.
# Columns added after the first release: nullable, and added to an existing table when it is opened.
_ADDED_EDIT_COLUMNS = (sa.Column("derived_from_descriptor", sa.Boolean, nullable=True),)

log_edits = sa.Table(
    "log_edits",
    _metadata,
    sa.Column("edit_id", sa.Text, primary_key=True),
    sa.Column("version", _Version, sa.ForeignKey("log_entries.version"), nullable=False, index=True),
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
    *_ADDED_EDIT_COLUMNS,
    sa.UniqueConstraint("version", "ordinal", name="uq_log_edits_version_ordinal"),
)

# Columns added after the first release: nullable, and added to an existing table when it is opened.
_ADDED_HOOK_COLUMNS = (
    sa.Column("prev_threshold", sa.Double, nullable=True),
    sa.Column("prev_key_dtype", sa.String(16), nullable=True),
    sa.Column("prev_key_shape", sa.Text, nullable=True),
    sa.Column("prev_key_data", sa.LargeBinary, nullable=True),
)

log_hooks = sa.Table(
    "log_hooks",
    _metadata,
    sa.Column("edit_id", sa.Text, sa.ForeignKey("log_edits.edit_id"), primary_key=True),
    sa.Column("ordinal", sa.Integer, primary_key=True),
    sa.Column("version", _Version, nullable=False, index=True),  # lets replay range-scan without a join
    sa.Column("layer", sa.Integer, nullable=False),
    sa.Column("threshold", sa.Double, nullable=False),
    sa.Column("key_dtype", sa.String(16), nullable=False),
    sa.Column("key_shape", sa.Text, nullable=False),
    sa.Column("key_data", sa.LargeBinary, nullable=False),
    sa.Column("value_dtype", sa.String(16), nullable=False),
    sa.Column("value_shape", sa.Text, nullable=False),
    sa.Column("value_data", sa.LargeBinary, nullable=False),
    *_ADDED_HOOK_COLUMNS,
)

_TABLES = (log_entries, log_edits, log_hooks)


class EditLog:
    """Open with `EditLog.open(url, data_dir)`; thread-safe (one pooled connection per call)."""

    def __init__(self, engine: Engine, *, schema: str | None = None) -> None:
        self._base_engine = engine
        self._engine = engine.execution_options(schema_translate_map={None: schema}) if schema else engine
        self._schema = schema
        self.dialect: str = engine.dialect.name
        # One advisory-lock key per schema, so test schemas (or tenants) do not serialise each other.
        self._lock_key = int.from_bytes(
            hashlib.sha256(f"editserve.editlog:{schema or ''}".encode()).digest()[:8], "big", signed=True
        )

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str | None, data_dir: Path | str, *, schema: str | None = None) -> EditLog:
        """None/"" → `<data_dir>/editlog.sqlite3` (dirs created); else any SQLAlchemy URL.

        `schema` (PostgreSQL only) keeps the tables in that schema, created if missing.
        Raises EditLogCorrupted when the file is not a sound database, Unavailable when the
        server cannot be reached.
        """
        if not url:
            data_dir = Path(data_dir)
            data_dir.mkdir(parents=True, exist_ok=True)
            url = sa.URL.create("sqlite", database=str(data_dir / SQLITE_FILENAME)).render_as_string()
        sa_url = sa.make_url(url)
        if sa_url.get_backend_name() == "sqlite":
            if schema:
                raise ValueError("schema is for PostgreSQL; SQLite keeps one log per file")
            engine = sa.create_engine(sa_url, connect_args={"timeout": 30})
            _install_sqlite_pragmas(engine)
        else:
            engine = sa.create_engine(sa_url, pool_pre_ping=True)
        log = cls(engine, schema=schema)
        try:
            log._prepare()
        except sa.exc.DBAPIError as exc:
            engine.dispose()
            log._raise_db_error(exc, "opening")
        except BaseException:
            engine.dispose()
            raise
        return log

    def _prepare(self) -> None:
        if self.dialect == "sqlite":
            with self._engine.connect() as conn:
                problems = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise EditLogCorrupted(
                    f"edit log database failed its integrity check: {'; '.join(problems[:5])}"
                )
        with self._write_connection() as conn, conn.begin():
            if self.dialect == "postgresql":
                # Replicas starting together would race CREATE TABLE IF NOT EXISTS; serialise them.
                self._lock_appenders(conn)
                if self._schema:
                    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {self._quoted_schema()}")
            _metadata.create_all(conn)
            self._add_missing_columns(conn)
            self._install_append_only_triggers(conn)

    def _add_missing_columns(self, conn: Connection) -> None:
        """An edit log written by an older release lacks the columns added since (all nullable)."""
        prefix = f"{self._quoted_schema()}." if self._schema else ""
        for table, added in ((log_hooks, _ADDED_HOOK_COLUMNS), (log_edits, _ADDED_EDIT_COLUMNS)):
            have = {c["name"] for c in sa.inspect(conn).get_columns(table.name, schema=self._schema)}
            for col in added:
                if col.name not in have:
                    ddl = col.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(f"ALTER TABLE {prefix}{table.name} ADD COLUMN {col.name} {ddl}")

    def _quoted_schema(self) -> str:
        assert self._schema
        return self._base_engine.dialect.identifier_preparer.quote_schema(self._schema)

    def _install_append_only_triggers(self, conn: Connection) -> None:
        if self.dialect == "sqlite":
            for table in _TABLES:
                for op in ("UPDATE", "DELETE"):
                    conn.exec_driver_sql(
                        f"CREATE TRIGGER IF NOT EXISTS {table.name}_no_{op.lower()} "
                        f"BEFORE {op} ON {table.name} "
                        "BEGIN SELECT RAISE(ABORT, 'edit log is append-only'); END"
                    )
        elif self.dialect == "postgresql":
            prefix = f"{self._quoted_schema()}." if self._schema else ""
            # sa.text, not exec_driver_sql: it escapes the '%' placeholders for psycopg's paramstyle.
            conn.execute(
                sa.text(
                    f"CREATE OR REPLACE FUNCTION {prefix}editlog_append_only() RETURNS trigger "
                    "LANGUAGE plpgsql AS $$ BEGIN "
                    "RAISE EXCEPTION 'edit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME; END $$"
                )
            )
            for table in _TABLES:
                conn.exec_driver_sql(
                    f"CREATE OR REPLACE TRIGGER {table.name}_append_only BEFORE UPDATE OR DELETE "
                    f"ON {prefix}{table.name} FOR EACH ROW EXECUTE FUNCTION {prefix}editlog_append_only()"
                )

    def _write_connection(self) -> Connection:
        return self._engine.connect().execution_options(**{_WRITE_OPTION: True})

    def _lock_appenders(self, conn: Connection) -> None:
        # Held to COMMIT: the next appender reads max(version) only after this one is visible.
        if self.dialect == "postgresql":
            conn.execute(sa.select(sa.func.pg_advisory_xact_lock(self._lock_key)))

    def close(self) -> None:
        # Disposing closes every pooled connection; SQLite checkpoints the WAL on the last close.
        self._base_engine.dispose()

    def __enter__(self) -> EditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ writing

    def append(self, entry: LogEntry) -> LogEntry:
        """Commit `entry` (its version is ignored) as the next version and return it as stored.

        Returns only after the commit is durable. If `entry.idempotency_key` was already
        committed with the same request_digest, nothing is written and the ORIGINAL entry is
        returned (compare its edit ids with yours); with another digest → AlreadyExists.
        Raises InvalidArgument for text a database cannot store, ValueError for a malformed entry.
        """
        pending = _normalised(entry)
        try:
            with self._write_connection() as conn, conn.begin():
                self._lock_appenders(conn)
                if pending.idempotency_key:
                    existing = self._entry_by_key(conn, pending.idempotency_key)
                    if existing is not None:
                        if existing.request_digest == pending.request_digest:
                            return existing
                        raise AlreadyExists(
                            f"idempotency key {pending.idempotency_key!r} was used by version "
                            f"{existing.version} for a different request",
                            field="idempotency_key",
                        )
                if self.dialect == "postgresql":
                    # Acknowledge only what is on disk, whatever the server's default.
                    conn.exec_driver_sql("SET LOCAL synchronous_commit TO on")
                head = conn.execute(sa.select(sa.func.max(log_entries.c.version))).scalar()
                committed = replace(pending, version=(head or 0) + 1)
                entry_row, edit_rows, hook_rows = _to_rows(committed)
                conn.execute(log_entries.insert(), [entry_row])
                if edit_rows:
                    conn.execute(log_edits.insert(), edit_rows)
                if hook_rows:
                    conn.execute(log_hooks.insert(), hook_rows)
        except sa.exc.IntegrityError as exc:
            # Versions are serialised by the lock, so a conflict here is a reused edit_id.
            raise AlreadyExists(f"edit log refused the entry: {exc.orig}", field="edit_id") from exc
        except sa.exc.DBAPIError as exc:
            self._raise_db_error(exc, "appending to")
        return committed

    # ------------------------------------------------------------------ reading

    def head_version(self) -> int:
        try:
            with self._engine.connect() as conn:
                return int(conn.execute(sa.select(sa.func.max(log_entries.c.version))).scalar() or 0)
        except sa.exc.DBAPIError as exc:
            self._raise_db_error(exc, "reading")

    def read_all(self, after_version: int = 0) -> Iterator[LogEntry]:
        """Every entry with version > after_version, in order, checksums verified."""
        if after_version < 0:
            raise ValueError(f"after_version must be >= 0, got {after_version}")
        expected = after_version + 1
        while True:
            try:
                with self._engine.connect() as conn:
                    rows = conn.execute(
                        sa.select(log_entries)
                        .where(log_entries.c.version >= expected)
                        .order_by(log_entries.c.version)
                        .limit(_READ_CHUNK)
                    ).all()
                    chunk = self._assemble(conn, rows)
            except sa.exc.DBAPIError as exc:
                self._raise_db_error(exc, "reading")
            if not chunk:
                return
            for entry in chunk:
                if entry.version != expected:
                    raise EditLogCorrupted(
                        f"edit log has a gap: expected version {expected}, found {entry.version}"
                    )
                expected += 1
                yield entry

    def read_entry(self, version: int) -> LogEntry | None:
        try:
            with self._engine.connect() as conn:
                rows = conn.execute(sa.select(log_entries).where(log_entries.c.version == version)).all()
                chunk = self._assemble(conn, rows)
        except sa.exc.DBAPIError as exc:
            self._raise_db_error(exc, "reading")
        return chunk[0] if chunk else None

    def find_by_idempotency_key(self, key: str) -> LogEntry | None:
        if not key:
            return None
        try:
            with self._engine.connect() as conn:
                return self._entry_by_key(conn, key)
        except sa.exc.DBAPIError as exc:
            self._raise_db_error(exc, "reading")

    def _entry_by_key(self, conn: Connection, key: str) -> LogEntry | None:
        rows = conn.execute(sa.select(log_entries).where(log_entries.c.idempotency_key == key)).all()
        chunk = self._assemble(conn, rows)
        return chunk[0] if chunk else None

    def _assemble(self, conn: Connection, entry_rows: Sequence[Row[Any]]) -> list[LogEntry]:
        """Entries for `entry_rows` (sorted by version): one query for their edits, one for hooks.

        Edits and hooks are fetched by the version range the entries span; committed entries
        never change, so this is consistent whatever the isolation level.
        """
        if not entry_rows:
            return []
        lo, hi = entry_rows[0].version, entry_rows[-1].version
        edit_rows = conn.execute(
            sa.select(log_edits)
            .where(log_edits.c.version.between(lo, hi))
            .order_by(log_edits.c.version, log_edits.c.ordinal)
        ).all()
        hook_rows = conn.execute(
            sa.select(log_hooks)
            .where(log_hooks.c.version.between(lo, hi))
            .order_by(log_hooks.c.edit_id, log_hooks.c.ordinal)
        ).all()

        hooks_by_edit: dict[str, list[Row[Any]]] = {}
        for h in hook_rows:
            hooks_by_edit.setdefault(h.edit_id, []).append(h)
        edits_by_version: dict[int, list[Row[Any]]] = {}
        for e in edit_rows:
            edits_by_version.setdefault(e.version, []).append(e)

        entries = [
            _decode_entry(row, edits_by_version.pop(row.version, []), hooks_by_edit) for row in entry_rows
        ]
        # Rows left over belong to no entry we read: history was edited behind the log's back.
        if edits_by_version:
            raise EditLogCorrupted(
                f"edit log has edits for version {min(edits_by_version)} with no entry row"
            )
        if hooks_by_edit:
            stray = next(iter(hooks_by_edit.values()))[0]
            raise EditLogCorrupted(
                f"edit log has hook rows (version {stray.version}) for edit {stray.edit_id!r} "
                "that no entry holds"
            )
        return entries

    # ------------------------------------------------------------------ errors

    def _raise_db_error(self, exc: sa.exc.DBAPIError, action: str) -> NoReturn:
        """Re-raise a driver error as a domain error: a broken SQLite file is corruption, a lost
        or locked database is Unavailable (retryable); anything else propagates as is (a bug)."""
        orig = exc.orig
        if self.dialect == "sqlite":
            name = str(getattr(orig, "sqlite_errorname", ""))
            # "Could not decode to UTF-8": a TEXT column now holds bytes, written behind our back.
            undecodable = "could not decode" in str(orig).lower()
            # sqlite3.DatabaseError itself (not a subclass) is what "file is not a database" raises.
            if (
                undecodable
                or name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
                or type(exc) is sa.exc.DatabaseError
            ):
                raise EditLogCorrupted(f"edit log database is corrupted ({action} it): {orig}") from exc
        if isinstance(exc, sa.exc.OperationalError | sa.exc.InterfaceError) or exc.connection_invalidated:
            raise Unavailable(f"edit log unavailable while {action} it: {orig}") from exc
        raise exc


# ---------------------------------------------------------------------- engine setup


def _install_sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # pysqlite's own implicit BEGIN is deferred and skipped for some statements; we emit ours.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute("PRAGMA journal_mode=WAL").fetchall()  # readers never block the appender
            cur.execute("PRAGMA synchronous=FULL")  # fsync the WAL at every commit: acked = on disk
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # IMMEDIATE takes the write lock before we read max(version): one appender at a time,
        # across threads and processes. Reads use a plain (snapshot) BEGIN.
        conn.exec_driver_sql(
            "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE_OPTION) else "BEGIN"
        )


# ---------------------------------------------------------------------- encoding


def _check_text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{field} must be a str, got {type(value).__name__}")
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; refuse it on SQLite too so both backends agree.
        raise InvalidArgument("must not contain NUL characters", field=field)
    return value


def _normalised(entry: LogEntry) -> LogEntry:
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
    )


def _to_rows(entry: LogEntry) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
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


def _decode_entry(
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

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

The tables and their added columns are schema.py; what differs between SQLite and PostgreSQL (engine
and URL, pragmas, triggers, locks, error translation) is engines.py; row <-> entry encoding is codec.py.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, Row

from service.errors import AlreadyExists, EditLogCorrupted, Unavailable

from .codec import decode_entry, entry_rows, normalised_entry
from .engines import (
    PG_RETRY_AFTER_S,
    WRITE_OPTION,
    advisory_lock_key,
    check_sqlite_integrity,
    create_log_engine,
    durable_commit,
    install_append_only_triggers,
    lock_appenders,
    raise_db_error,
)
from .model import LogEntry
from .schema import (
    ADDED_EDIT_COLUMNS,
    ADDED_ENTRY_COLUMNS,
    ADDED_HOOK_COLUMNS,
    METADATA,
    log_edits,
    log_entries,
    log_head,
    log_hooks,
)

log = logging.getLogger(__name__)

_READ_CHUNK = 1000  # entries per round trip in read_all: 3 queries per chunk, not per entry


class EditLog:
    """Open with `EditLog.open(url, data_dir)`; thread-safe (one pooled connection per call)."""

    def __init__(self, engine: Engine, *, schema: str | None = None, head_file: Path | None = None) -> None:
        self._base_engine = engine
        self._head_file = head_file
        self._head_lock = threading.Lock()
        self._engine = engine.execution_options(schema_translate_map={None: schema}) if schema else engine
        self._schema = schema
        self.dialect: str = engine.dialect.name
        self._retry_at = 0.0  # monotonic time before which PostgreSQL is not tried again (unreachable)
        self._lock_key = advisory_lock_key(schema)

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(cls, url: str | None, data_dir: Path | str, *, schema: str | None = None) -> EditLog:
        """None/"" → `<data_dir>/editlog.sqlite3` (dirs created); else any SQLAlchemy URL.

        `schema` (PostgreSQL only) keeps the tables in that schema, created if missing.
        Raises EditLogCorrupted when the file is not a sound database, Unavailable when the
        server cannot be reached.
        """
        engine, head_file = create_log_engine(url, data_dir, schema=schema)
        log = cls(engine, schema=schema, head_file=head_file)
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
                check_sqlite_integrity(conn)
        with self._write_connection() as conn, conn.begin():
            if self.dialect == "postgresql":
                # Replicas starting together would race CREATE TABLE IF NOT EXISTS; serialise them.
                self._lock_appenders(conn)
                if self._schema:
                    conn.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {self._quoted_schema()}")
            METADATA.create_all(conn)
            self._add_missing_columns(conn)
            install_append_only_triggers(conn, self.dialect, self._prefix())
            self._check_head(conn)

    def _check_head(self, conn: Connection) -> None:
        """Refuse a log that ends below the highest version ever committed to it (acknowledged edits
        lost: a truncated or damaged file, a deleted -wal, an older copy restored over it)."""
        last = int(conn.execute(sa.select(sa.func.max(log_entries.c.version))).scalar() or 0)
        recorded = conn.execute(sa.select(log_head.c.version).where(log_head.c.id == 1)).scalar()
        if recorded is None:
            conn.execute(log_head.insert(), [{"id": 1, "version": last}])
            recorded = last
        marker = self._read_head_file()
        committed = max(int(recorded), marker)
        if last < committed:
            where = f" ({self._head_file} records it)" if marker > int(recorded) else ""
            raise EditLogCorrupted(
                f"the edit log ends at version {last}, but version {committed} was committed{where}: "
                "acknowledged edits are missing. Restore the log from a backup; to start an empty log on "
                "purpose, use a new --data-dir"
            )

    def _read_head_file(self) -> int:
        if self._head_file is None or not self._head_file.exists():
            return 0
        try:
            return int(self._head_file.read_text().strip() or 0)
        except (OSError, ValueError) as exc:
            raise EditLogCorrupted(f"{self._head_file} is unreadable: {exc}") from exc

    def _write_head_file(self, version: int) -> None:
        """Durably record `version` beside the database, never lowering it (temp file, fsync, rename,
        under a file lock shared with other processes on the same log). Best effort: the entry is already
        committed, so a failure here is logged, not raised."""
        if self._head_file is None:
            return
        try:
            lock_path = self._head_file.with_name(self._head_file.name + ".lock")
            with self._head_lock, open(lock_path, "a") as lock:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
                if self._read_head_file() >= version:
                    return
                tmp = self._head_file.with_name(f"{self._head_file.name}.{os.getpid()}.tmp")
                with open(tmp, "w") as f:
                    f.write(f"{version}\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self._head_file)
                dir_fd = os.open(self._head_file.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
        except (OSError, EditLogCorrupted):
            log.exception("could not record the edit log's head version %d in %s", version, self._head_file)

    def _add_missing_columns(self, conn: Connection) -> None:
        """An edit log written by an older release lacks the columns added since (all nullable)."""
        prefix = self._prefix()
        for table, added in ((log_hooks, ADDED_HOOK_COLUMNS), (log_edits, ADDED_EDIT_COLUMNS),
                             (log_entries, ADDED_ENTRY_COLUMNS)):
            have = {c["name"] for c in sa.inspect(conn).get_columns(table.name, schema=self._schema)}
            for col in added:
                if col.name not in have:
                    ddl = col.type.compile(dialect=conn.dialect)
                    conn.exec_driver_sql(f"ALTER TABLE {prefix}{table.name} ADD COLUMN {col.name} {ddl}")

    def _quoted_schema(self) -> str:
        assert self._schema
        return self._base_engine.dialect.identifier_preparer.quote_schema(self._schema)

    def _prefix(self) -> str:
        """What qualifies a table name in raw DDL: "<schema>." or ""."""
        return f"{self._quoted_schema()}." if self._schema else ""

    def _connect(self) -> Connection:
        if self.dialect != "postgresql":
            return self._engine.connect()
        if time.monotonic() < self._retry_at:
            raise Unavailable("edit log unavailable: the database could not be reached a moment ago "
                              f"(tried again every {PG_RETRY_AFTER_S:g} s)")
        try:
            return self._engine.connect()  # pre-ping: a connection the server dropped is replaced here
        except sa.exc.DBAPIError:
            self._retry_at = time.monotonic() + PG_RETRY_AFTER_S
            raise

    def _write_connection(self) -> Connection:
        return self._connect().execution_options(**{WRITE_OPTION: True})

    def _lock_appenders(self, conn: Connection) -> None:
        lock_appenders(conn, self.dialect, self._lock_key)

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
        pending = normalised_entry(entry)
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
                durable_commit(conn, self.dialect)
                head = conn.execute(sa.select(sa.func.max(log_entries.c.version))).scalar()
                committed = replace(pending, version=(head or 0) + 1)
                entry_row, edit_rows, hook_rows = entry_rows(committed)
                conn.execute(log_entries.insert(), [entry_row])
                if edit_rows:
                    conn.execute(log_edits.insert(), edit_rows)
                if hook_rows:
                    conn.execute(log_hooks.insert(), hook_rows)
                conn.execute(log_head.update().where(log_head.c.id == 1).values(version=committed.version))
        except sa.exc.IntegrityError as exc:
            # Versions are serialised by the lock, so a conflict here is a reused edit_id.
            raise AlreadyExists(f"edit log refused the entry: {exc.orig}", field="edit_id") from exc
        except sa.exc.DBAPIError as exc:
            self._raise_db_error(exc, "appending to")
        self._write_head_file(committed.version)
        return committed

    # ------------------------------------------------------------------ reading

    def head_version(self) -> int:
        try:
            with self._connect() as conn:
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
                with self._connect() as conn:
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
            with self._connect() as conn:
                rows = conn.execute(sa.select(log_entries).where(log_entries.c.version == version)).all()
                chunk = self._assemble(conn, rows)
        except sa.exc.DBAPIError as exc:
            self._raise_db_error(exc, "reading")
        return chunk[0] if chunk else None

    def find_by_idempotency_key(self, key: str) -> LogEntry | None:
        if not key:
            return None
        try:
            with self._connect() as conn:
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
            decode_entry(row, edits_by_version.pop(row.version, []), hooks_by_edit) for row in entry_rows
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
        """A driver error as the service's domain error (engines.raise_db_error)."""
        raise_db_error(exc, self.dialect, action)

"""What differs between the edit log's two databases, SQLite and PostgreSQL, kept out of the log itself.

store.py (`EditLog`) is one code path over SQLAlchemy Core; this module holds the dialect specifics it
calls: the URL and engine (SQLite's file under the data dir and its `.head` marker, PostgreSQL's connect
timeout), SQLite's connection pragmas and BEGIN IMMEDIATE for appenders, the integrity check on open,
the append-only triggers of each dialect, PostgreSQL's advisory lock and synchronous commit, and the
translation of driver errors into the service's domain errors.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, NoReturn

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from service.errors import EditLogCorrupted, Unavailable

from .schema import TABLES

__all__ = [
    "HEAD_SUFFIX",
    "PG_CONNECT_TIMEOUT_S",
    "PG_RETRY_AFTER_S",
    "SQLITE_BUSY_TIMEOUT_S",
    "SQLITE_FILENAME",
    "WRITE_OPTION",
    "advisory_lock_key",
    "check_sqlite_integrity",
    "create_log_engine",
    "durable_commit",
    "install_append_only_triggers",
    "install_sqlite_pragmas",
    "lock_appenders",
    "raise_db_error",
]

SQLITE_FILENAME = "editlog.sqlite3"
HEAD_SUFFIX = ".head"  # beside the SQLite file: the highest version ever committed
WRITE_OPTION = "editlog_write"  # execution option: this transaction appends (SQLite: BEGIN IMMEDIATE)
SQLITE_BUSY_TIMEOUT_S = 30  # an SQLite writer waits this long for another's lock before "database is locked"
PG_CONNECT_TIMEOUT_S = 3  # a PostgreSQL connect that takes longer fails as Unavailable
# After PostgreSQL could not be reached, calls fail at once for this long instead of each waiting out its
# own connect (callers queue on the commit lock; one slow connect each would push them past deadlines).
PG_RETRY_AFTER_S = 1.0


# ---------------------------------------------------------------------- engine setup


def create_log_engine(url: str | None, data_dir: Path | str, *, schema: str | None = None
                      ) -> tuple[Engine, Path | None]:
    """The engine for `url` (None/"" → `<data_dir>/editlog.sqlite3`, dirs created) and, for an SQLite
    file, the path of its head marker (None otherwise)."""
    if not url:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        url = sa.URL.create("sqlite", database=str(data_dir / SQLITE_FILENAME)).render_as_string()
    sa_url = sa.make_url(url)
    if sa_url.get_backend_name() == "sqlite":
        if schema:
            raise ValueError("schema is for PostgreSQL; SQLite keeps one log per file")
        engine = sa.create_engine(sa_url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
        install_sqlite_pragmas(engine)
        database = sa_url.database
        return engine, Path(database + HEAD_SUFFIX) if database and database != ":memory:" else None
    # A database that accepts no connection (down, or a partition that drops packets) must fail
    # the call, not hang it past every deadline: libpq waits forever by default. The URL may
    # set its own (?connect_timeout=10).
    timeout = {} if "connect_timeout" in sa_url.query or sa_url.get_driver_name() not in (
        "psycopg", "psycopg2") else {"connect_timeout": PG_CONNECT_TIMEOUT_S}
    return sa.create_engine(sa_url, pool_pre_ping=True, connect_args=timeout), None


def install_sqlite_pragmas(engine: Engine) -> None:
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
            "BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE_OPTION) else "BEGIN"
        )


# ---------------------------------------------------------------------- opening


def check_sqlite_integrity(conn: Connection) -> None:
    """EditLogCorrupted unless SQLite's quick_check finds the file sound."""
    problems = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise EditLogCorrupted(f"edit log database failed its integrity check: {'; '.join(problems[:5])}")


def install_append_only_triggers(conn: Connection, dialect: str, prefix: str = "") -> None:
    """Triggers that refuse UPDATE and DELETE on every log table (`prefix`: "schema." or "")."""
    if dialect == "sqlite":
        for table in TABLES:
            for op in ("UPDATE", "DELETE"):
                conn.exec_driver_sql(
                    f"CREATE TRIGGER IF NOT EXISTS {table.name}_no_{op.lower()} "
                    f"BEFORE {op} ON {table.name} "
                    "BEGIN SELECT RAISE(ABORT, 'edit log is append-only'); END"
                )
    elif dialect == "postgresql":
        # sa.text, not exec_driver_sql: it escapes the '%' placeholders for psycopg's paramstyle.
        conn.execute(
            sa.text(
                f"CREATE OR REPLACE FUNCTION {prefix}editlog_append_only() RETURNS trigger "
                "LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'edit log is append-only: % on % refused', TG_OP, TG_TABLE_NAME; END $$"
            )
        )
        for table in TABLES:
            conn.exec_driver_sql(
                f"CREATE OR REPLACE TRIGGER {table.name}_append_only BEFORE UPDATE OR DELETE "
                f"ON {prefix}{table.name} FOR EACH ROW EXECUTE FUNCTION {prefix}editlog_append_only()"
            )


# ---------------------------------------------------------------------- appending


def advisory_lock_key(schema: str | None) -> int:
    """One PostgreSQL advisory-lock key per schema: test schemas (or tenants) do not serialise each other."""
    return int.from_bytes(
        hashlib.sha256(f"editserve.editlog:{schema or ''}".encode()).digest()[:8], "big", signed=True
    )


def lock_appenders(conn: Connection, dialect: str, key: int) -> None:
    """PostgreSQL: the transaction-scoped advisory lock every appender takes (SQLite: BEGIN IMMEDIATE).
    Held to COMMIT: the next appender reads max(version) only after this one is visible."""
    if dialect == "postgresql":
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(key)))


def durable_commit(conn: Connection, dialect: str) -> None:
    """PostgreSQL: acknowledge only what is on disk, whatever the server's default (SQLite: the
    synchronous=FULL pragma)."""
    if dialect == "postgresql":
        conn.exec_driver_sql("SET LOCAL synchronous_commit TO on")


# ---------------------------------------------------------------------- errors


def raise_db_error(exc: sa.exc.DBAPIError, dialect: str, action: str) -> NoReturn:
    """Re-raise a driver error as a domain error: a broken SQLite file is corruption, a lost
    or locked database is Unavailable (retryable); anything else propagates as is (a bug)."""
    orig = exc.orig
    if dialect == "sqlite":
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

"""The edit log on PostgreSQL: same code path as SQLite, plus replicas appending at once.

Needs a server: EDITSERVE_TEST_PG_URL (default postgresql+psycopg://postgres@127.0.0.1:5432/test).
Every test gets its own schema, dropped afterwards; the module skips when no server answers.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from service.editlog import EditLog, EditRegistry, LogEntry, request_digest
from service.errors import AlreadyExists, EditLogCorrupted
from testkit.editlog import edit_entry, make_edit, rollback_entry

PG_URL = os.environ.get("EDITSERVE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

pytestmark: list[pytest.MarkDecorator] = [pytest.mark.postgres]


def _server_error() -> str | None:
    try:
        dsn = sa.make_url(PG_URL).set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, connect_timeout=3):
            return None
    except Exception as exc:  # any failure means: no usable server here
        detail = " ".join(str(exc).split())[:200]
        return f"no PostgreSQL server at {PG_URL} ({type(exc).__name__}: {detail})"


_SKIP_REASON = _server_error()
if _SKIP_REASON:
    pytestmark.append(pytest.mark.skip(reason=_SKIP_REASON))


@pytest.fixture
def schema() -> Iterator[str]:
    name = f"editlog_test_{uuid.uuid4().hex[:12]}"
    yield name
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    engine.dispose()


@pytest.fixture
def pg_log(schema: str, tmp_path: Path) -> Iterator[EditLog]:
    log = EditLog.open(PG_URL, tmp_path, schema=schema)
    assert log.dialect == "postgresql"
    yield log
    log.close()


def test_round_trip_reopen_and_registry(pg_log: EditLog, schema: str, tmp_path: Path) -> None:
    digest = request_digest({"subject": "The Eiffel Tower", "target_new": "Rome"})
    written = [
        pg_log.append(edit_entry(make_edit("a", relation_key="r"), key="k-a", digest=digest)),
        pg_log.append(
            edit_entry(make_edit("b", relation_key="r", supersedes=["a"]), make_edit("c", kind="descriptor"))
        ),
        pg_log.append(rollback_entry("b")),
        pg_log.append(LogEntry(kind="rollback_to", target_version=3, target_edit_ids=[])),
    ]
    assert [e.version for e in written] == [1, 2, 3, 4]
    assert list(pg_log.read_all()) == written  # tensors, NaN-free floats, timestamps: exact
    assert pg_log.find_by_idempotency_key("k-a") == written[0]
    assert pg_log.append(edit_entry(make_edit("a2"), key="k-a", digest=digest)) == written[0]
    with pytest.raises(AlreadyExists):
        pg_log.append(edit_entry(make_edit("a3"), key="k-a", digest="other"))
    with EditLog.open(PG_URL, tmp_path, schema=schema) as again:  # a second replica starting up
        assert list(again.read_all()) == written
        registry = EditRegistry.from_log(again)
    assert registry.version == 4
    assert {v.edit_id: v.state for v in registry.list()[0]} == {
        "a": "active",
        "b": "rolled_back",
        "c": "active",
    }


def test_concurrent_appends_from_two_engines(pg_log: EditLog, schema: str, tmp_path: Path) -> None:
    other = EditLog.open(PG_URL, tmp_path, schema=schema)  # its own engine and pool: another replica
    versions: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def work(log: EditLog, name: str) -> None:
        barrier.wait()
        for i in range(10):
            v = log.append(edit_entry(make_edit(f"{name}-{i}", seed=i))).version
            with lock:
                versions.append(v)

    threads = [
        threading.Thread(target=work, args=(log, f"t{n}")) for n, log in enumerate([pg_log, other] * 2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert sorted(versions) == list(range(1, 41))
    entries = list(pg_log.read_all())
    assert [e.version for e in entries] == list(range(1, 41)) and len(
        {e.edits[0].edit_id for e in entries}
    ) == 40


def test_append_only_and_tamper_detection(pg_log: EditLog, schema: str) -> None:
    for i in range(3):
        pg_log.append(edit_entry(make_edit(f"e{i}", seed=i)))
    engine = sa.create_engine(PG_URL)
    try:
        with pytest.raises(sa.exc.DBAPIError, match="append-only"), engine.begin() as conn:
            conn.exec_driver_sql(f"UPDATE \"{schema}\".log_edits SET target_new = 'Paris'")
        with engine.begin() as conn:
            conn.exec_driver_sql(f'DROP TRIGGER log_hooks_append_only ON "{schema}".log_hooks')
            conn.exec_driver_sql(
                f'UPDATE "{schema}".log_hooks SET threshold = threshold + 1e-9 '
                "WHERE edit_id = 'e1' AND ordinal = 0"
            )
    finally:
        engine.dispose()
    with pytest.raises(EditLogCorrupted, match="version 2 fails its checksum"):
        list(pg_log.read_all())


def test_a_truncated_postgresql_log_is_refused(pg_log: EditLog, schema: str, tmp_path: Path) -> None:
    """TRUNCATE skips row triggers; the head row written in every append's transaction still knows the
    highest committed version, and a replica refuses to start on the emptied log."""
    for i in range(3):
        pg_log.append(edit_entry(make_edit(f"e-{i}", seed=i, kind="descriptor")))
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.exec_driver_sql(f'TRUNCATE "{schema}".log_hooks, "{schema}".log_edits, "{schema}".log_entries')
    engine.dispose()
    with pytest.raises(EditLogCorrupted, match="ends at version 0, but version 3 was committed"):
        EditLog.open(PG_URL, tmp_path, schema=schema)

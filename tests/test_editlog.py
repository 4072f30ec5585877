"""Edit log (SQLite) and edit registry: durability, integrity, replay semantics."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from service.editlog import (
    EditLog,
    EditRegistry,
    LogEntry,
    StoredEdit,
    StoredHook,
    TensorBlob,
    request_digest,
)
from service.editlog.engines import HEAD_SUFFIX, SQLITE_FILENAME
from service.errors import (
    AlreadyExists,
    EditLogCorrupted,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from testkit.editlog import edit_entry, make_edit, rollback_entry

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------- fixtures


@pytest.fixture
def log(tmp_path: Path) -> Iterator[EditLog]:
    log = EditLog.open(None, tmp_path / "data")
    yield log
    log.close()


def _replay(log: EditLog) -> EditRegistry:
    return EditRegistry.from_log(log)


# ---------------------------------------------------------------------- model


def test_tensor_blob_round_trips_and_validates() -> None:
    arr = np.arange(12, dtype=np.float16).reshape(3, 4)
    blob = TensorBlob.from_numpy(arr)
    assert (blob.dtype, blob.shape, len(blob.data)) == ("float16", (3, 4), 24)
    assert np.array_equal(blob.to_numpy(), arr)
    assert TensorBlob.from_dict(blob.to_dict()) == blob
    big_endian = np.arange(3, dtype=">f4")
    assert np.array_equal(TensorBlob.from_numpy(big_endian).to_numpy(), big_endian)
    # bfloat16 = the top 16 bits of a float32; 1.5 is exact in both.
    bits = (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype("<u2")
    bf16 = TensorBlob("torch.bfloat16", (2,), bits.tobytes())
    assert bf16.dtype == "bfloat16" and bf16.to_numpy().tolist() == [1.5, -2.0]
    with pytest.raises(ValueError, match="needs 16 bytes"):
        TensorBlob("float32", (4,), b"\0" * 15)
    with pytest.raises(ValueError, match="unsupported"):
        TensorBlob("complex64", (1,), b"\0" * 8)


def test_entry_json_round_trip() -> None:
    entry = edit_entry(make_edit("a"), make_edit("b", kind="descriptor"))
    assert LogEntry.from_dict(entry.to_dict()) == entry


def test_request_digest_is_canonical() -> None:
    a = request_digest({"subject": "x", "paraphrases": ["p", "q"], "force": False})
    b = request_digest({"force": False, "paraphrases": ["p", "q"], "subject": "x"})
    assert a == b and len(a) == 64
    assert a != request_digest({"subject": "x", "paraphrases": ["q", "p"], "force": False})


# ---------------------------------------------------------------------- store


def test_append_read_round_trip_is_bit_exact(log: EditLog) -> None:
    edit = make_edit("e1")
    # NaN payloads and -0.0 survive only if bytes are stored untouched.
    weird = np.array([np.nan, -0.0, np.inf, 1e-45], dtype=np.float32)
    weird_bits = weird.view(np.uint32).copy()
    weird_bits[0] = 0x7FC01234  # a NaN with a payload
    edit.hooks.append(
        StoredHook(
            layer=9,
            key=TensorBlob("float32", (4,), weird_bits.tobytes()),
            value=TensorBlob.from_numpy(np.ones((2, 2), np.float64)),
            threshold=0.1,
        )
    )
    first = log.append(edit_entry(edit))
    second = log.append(edit_entry(make_edit("e2", kind="descriptor"), make_edit("e3", seed=3)))
    assert (first.version, second.version) == (1, 2)
    read = list(log.read_all())
    assert read == [first, second]
    assert read[0].edits[0].hooks[2].key.data == weird_bits.tobytes()
    assert read[0].created_at.utcoffset() == timedelta(0)
    assert read[1].kind == "batch" and [e.edit_id for e in read[1].edits] == ["e2", "e3"]
    assert read[1].edits[0].hooks == [] and read[1].edits[0].embedding is not None
    np.testing.assert_array_equal(
        read[1].edits[1].hooks[0].value.to_numpy(), make_edit("e3", seed=3).hooks[0].value.to_numpy()
    )


def test_versions_are_monotonic_and_read_all_resumes(log: EditLog) -> None:
    assert log.head_version() == 0 and list(log.read_all()) == []
    versions = [log.append(edit_entry(make_edit(f"e{i}", seed=i))).version for i in range(5)]
    versions.append(log.append(rollback_entry("e1")).version)
    versions.append(
        log.append(LogEntry(kind="rollback_to", target_version=2, target_edit_ids=["e2"])).version
    )
    assert versions == list(range(1, 8)) and log.head_version() == 7
    assert [e.version for e in log.read_all(after_version=4)] == [5, 6, 7]
    last = log.read_entry(7)
    assert last is not None and last.target_version == 2 and log.read_entry(99) is None


def test_reopen_gives_identical_entries(tmp_path: Path) -> None:
    log = EditLog.open("", tmp_path)
    written = [log.append(edit_entry(make_edit(f"e{i}", seed=i))) for i in range(3)]
    written.append(log.append(rollback_entry("e0", reason="wrong city")))
    log.close()
    assert (tmp_path / SQLITE_FILENAME).exists()
    with EditLog.open(None, tmp_path) as again:
        assert list(again.read_all()) == written


def test_malformed_entries_are_refused(log: EditLog) -> None:
    with pytest.raises(ValueError, match="exactly one edit"):
        log.append(LogEntry(kind="edit", edits=[make_edit("a"), make_edit("b")]))
    with pytest.raises(ValueError, match="target_version"):
        log.append(LogEntry(kind="rollback_to"))
    with pytest.raises(ValueError, match="unknown log entry kind"):
        log.append(LogEntry(kind="delete", target_edit_ids=["a"]))
    with pytest.raises(ValueError, match="finite"):
        bad = make_edit("a")
        bad.hooks[0].threshold = float("nan")
        log.append(edit_entry(bad))
    with pytest.raises(InvalidArgument, match="prompt"):
        bad = make_edit("a")
        bad.prompt = "nul\x00byte"
        log.append(edit_entry(bad))
    log.append(edit_entry(make_edit("a")))
    with pytest.raises(AlreadyExists):  # edit ids are unique across the log
        log.append(edit_entry(make_edit("a")))
    assert log.head_version() == 1  # nothing half-written by the refusals


def test_idempotency_key_lookup_and_conflict(log: EditLog) -> None:
    digest = request_digest({"subject": "The Eiffel Tower", "target_new": "Rome"})
    first = log.append(edit_entry(make_edit("a"), key="k-1", digest=digest))
    assert log.find_by_idempotency_key("k-1") == first
    assert log.find_by_idempotency_key("nope") is None and log.find_by_idempotency_key("") is None
    # Same key, same content: the original entry, nothing new written (even with fresh edit ids).
    again = log.append(edit_entry(make_edit("a-retry"), key="k-1", digest=digest))
    assert again == first and log.head_version() == 1
    with pytest.raises(AlreadyExists, match="idempotency_key"):
        log.append(edit_entry(make_edit("b"), key="k-1", digest=request_digest({"other": 1})))
    # Empty keys are not unique: many entries carry none.
    log.append(edit_entry(make_edit("c")))
    log.append(edit_entry(make_edit("d")))
    assert log.head_version() == 3


def test_append_only_triggers_refuse_rewrites(log: EditLog, tmp_path: Path) -> None:
    log.append(edit_entry(make_edit("a")))
    con = sqlite3.connect(tmp_path / "data" / SQLITE_FILENAME)
    try:
        for sql in (
            "UPDATE log_edits SET target_new = 'Paris'",
            "DELETE FROM log_entries",
            "DELETE FROM log_hooks",
        ):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                con.execute(sql)
    finally:
        con.close()


def test_concurrent_appenders_get_distinct_consecutive_versions(tmp_path: Path) -> None:
    # Two handles on one file (two processes' worth of engines), two threads each.
    logs = [EditLog.open(None, tmp_path), EditLog.open(None, tmp_path)]
    got: list[int] = []
    lock = threading.Lock()

    def work(log: EditLog, prefix: str) -> None:
        for i in range(15):
            v = log.append(edit_entry(make_edit(f"{prefix}-{i}", seed=i, kind="descriptor"))).version
            with lock:
                got.append(v)

    threads = [threading.Thread(target=work, args=(logs[i % 2], f"t{i}")) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(1, 61))
    assert [e.version for e in logs[0].read_all()] == list(range(1, 61))
    for log in logs:
        log.close()


# ---------------------------------------------------------------------- durability and corruption

_CHILD = r"""
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from testkit.editlog import edit_entry, make_edit
from service.editlog import EditLog
log = EditLog.open(None, Path(sys.argv[2]))
for i in range(100000):
    entry = log.append(edit_entry(make_edit(f"e{i}", seed=i)))
    print(entry.version, flush=True)  # acknowledged: append returned
"""


def test_sigkill_right_after_append_loses_nothing(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(REPO), str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    acked = 0
    try:
        assert proc.stdout is not None
        while acked < 40:
            line = proc.stdout.readline()
            assert line, f"child died early (rc={proc.poll()})"
            acked = int(line)
        os.kill(proc.pid, signal.SIGKILL)  # no close, no WAL checkpoint, maybe mid-transaction
    finally:
        proc.kill()
        proc.wait()
    with EditLog.open(None, tmp_path) as log:
        entries = list(log.read_all())  # verifies every checksum
    assert len(entries) >= acked
    assert entries[acked - 1].edits[0].hooks == make_edit(f"e{acked - 1}", seed=acked - 1).hooks


def _filled_log_file(tmp_path: Path, n: int = 60) -> Path:
    with EditLog.open(None, tmp_path) as log:
        for i in range(n):
            log.append(edit_entry(make_edit(f"e{i}", seed=i)))
    path = tmp_path / SQLITE_FILENAME
    assert not (tmp_path / f"{SQLITE_FILENAME}-wal").exists()  # close checkpointed everything
    return path


def _open_and_read(tmp_path: Path) -> None:
    with EditLog.open(None, tmp_path) as log:
        list(log.read_all())


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_overwritten_bytes_are_detected(tmp_path: Path, where: float) -> None:
    path = _filled_log_file(tmp_path)
    data = bytearray(path.read_bytes())
    at = int(len(data) * where)  # most of the file is tensor bytes: the checksums catch these
    data[at : at + 512] = np.random.default_rng(1).bytes(512)
    path.write_bytes(bytes(data))
    # a checksum names the version; bytes that land on a b-tree page fail the integrity check at open
    with pytest.raises(EditLogCorrupted, match="version|integrity check") as info:
        _open_and_read(tmp_path)
    print(f"\noverwrite at {where:.0%}: {info.value}")


def test_overwritten_page_header_fails_the_integrity_check(tmp_path: Path) -> None:
    path = _filled_log_file(tmp_path)
    data = bytearray(path.read_bytes())
    page_size = int.from_bytes(data[16:18], "big")  # SQLite header field
    at = (len(data) // page_size // 2) * page_size  # a b-tree page header in the middle
    data[at : at + 64] = np.random.default_rng(1).bytes(64)
    path.write_bytes(bytes(data))
    with pytest.raises(EditLogCorrupted, match="integrity check|malformed") as info:
        EditLog.open(None, tmp_path)  # refused at open, before anything is replayed
    print(f"\npage header overwrite: {info.value}")


@pytest.mark.parametrize("damage", ["truncate", "delete", "older copy"])
def test_a_log_that_lost_acknowledged_edits_is_refused(tmp_path: Path, damage: str) -> None:
    """The highest committed version is kept beside the database: a log file truncated to nothing,
    deleted with its -wal, or replaced by an older copy starts no server."""
    older = tmp_path / "older.sqlite3"
    with EditLog.open(None, tmp_path) as log:
        for i in range(3):
            log.append(edit_entry(make_edit(f"e-{i}", seed=i, kind="descriptor")))
        shutil.copy(tmp_path / SQLITE_FILENAME, older)  # WAL checkpointed? not yet: an older state
        for i in range(3, 5):
            log.append(edit_entry(make_edit(f"e-{i}", seed=i, kind="descriptor")))
    assert (tmp_path / (SQLITE_FILENAME + HEAD_SUFFIX)).read_text().strip() == "5"
    path = tmp_path / SQLITE_FILENAME
    if damage == "truncate":
        path.write_bytes(b"")
    elif damage == "delete":
        for p in tmp_path.glob(SQLITE_FILENAME + "*"):
            if not p.name.endswith((HEAD_SUFFIX, ".lock")):
                p.unlink()
    else:
        shutil.copy(older, path)
    with pytest.raises(EditLogCorrupted, match="ends at version [0-3], but version 5 was committed"):
        EditLog.open(None, tmp_path)


def test_garbage_file_is_not_a_log(tmp_path: Path) -> None:
    (tmp_path / SQLITE_FILENAME).write_bytes(np.random.default_rng(2).bytes(64 * 1024))
    with pytest.raises(EditLogCorrupted, match="corrupt|integrity"):
        EditLog.open(None, tmp_path)


def _tamper(path: Path, *sql: str) -> None:
    con = sqlite3.connect(path)
    try:
        for stmt in sql:
            con.execute(stmt)
        con.commit()
    finally:
        con.close()


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("UPDATE log_edits SET target_new = 'Paris' WHERE edit_id = 'e7'", "version 8 fails its checksum"),
        # flip the first byte of a stored hook value: tensor bytes are covered too
        (
            "UPDATE log_hooks SET value_data = CAST(X'00' || substr(value_data, 2) AS BLOB) "
            "WHERE edit_id = 'e3' AND ordinal = 1",
            "version 4 fails its checksum",
        ),
        ("UPDATE log_entries SET actor = 'mallory' WHERE version = 2", "version 2 fails its checksum"),
        (
            "UPDATE log_edits SET paraphrases = '[not json' WHERE edit_id = 'e5'",
            "version 6 cannot be decoded",
        ),
        ("UPDATE log_hooks SET key_shape = '[7]' WHERE edit_id = 'e9'", "version 10 cannot be decoded"),
        # bytes where text belongs
        ("UPDATE log_edits SET subject = X'FF00' WHERE edit_id = 'e2'", "version 3 cannot be decoded"),
        ("DELETE FROM log_hooks WHERE edit_id = 'e1' AND ordinal = 1", "version 2 fails its checksum"),
        ("DELETE FROM log_entries WHERE version = 5", "edits for version 5 with no entry row"),
        (
            "DELETE FROM log_hooks WHERE version = 5; DELETE FROM log_edits WHERE version = 5; "
            "DELETE FROM log_entries WHERE version = 5",
            "gap: expected version 5, found 6",
        ),
    ],
)
def test_tampered_rows_are_detected(tmp_path: Path, sql: str, message: str) -> None:
    path = _filled_log_file(tmp_path, n=12)
    # A hostile or careless operator: drop the append-only guards, then rewrite history.
    drops = [
        f"DROP TRIGGER {t}_no_{op}"
        for t in ("log_entries", "log_edits", "log_hooks")
        for op in ("update", "delete")
    ]
    _tamper(path, "PRAGMA foreign_keys = OFF", *drops, *sql.split("; "))
    with pytest.raises(EditLogCorrupted, match=message):
        _open_and_read(tmp_path)


# ---------------------------------------------------------------------- volume
# Append latency and replay time are measured in bench/editlog_benchmark.py, not bounded here.


def test_replay_of_1000_entries_rebuilds_every_edit(log: EditLog) -> None:
    for i in range(1000):
        log.append(edit_entry(make_edit(f"e{i}", seed=i)))
    entries = list(log.read_all())
    assert [e.version for e in entries] == list(range(1, 1001))
    registry = EditRegistry()
    for entry in entries:
        registry.apply(entry)
    assert registry.counts().active == 1000
    assert entries[-1].edits[0] == make_edit("e999", seed=999)


def test_descriptor_edit_is_durable_when_append_returns(tmp_path: Path) -> None:
    writer = EditLog.open(None, tmp_path / "data")
    try:
        for i in range(20):
            acked = writer.append(edit_entry(make_edit(f"d{i}", kind="descriptor")))
            with EditLog.open(None, tmp_path / "data") as reader:  # another process's view of the file
                assert reader.read_entry(acked.version) == acked
    finally:
        writer.close()


# ---------------------------------------------------------------------- registry


def _states(reg: EditRegistry) -> dict[str, str]:
    return {v.edit_id: v.state for v in reg.list(page_size=1000)[0]}


def test_registry_supersede_and_restore(log: EditLog) -> None:
    reg = EditRegistry()
    a = make_edit("a", relation_key="eiffel/located_in")
    reg.apply(log.append(edit_entry(a)))
    assert reg.active_ids_for_relation("eiffel/located_in") == ["a"]
    b = make_edit(
        "b", relation_key="eiffel/located_in", supersedes=reg.active_ids_for_relation("eiffel/located_in")
    )
    delta = reg.apply(log.append(edit_entry(b)))
    assert [e.edit_id for e in delta.activated] == ["b"] and delta.deactivated == ["a"]
    view = reg.get("a")
    assert view is not None and view.state == "superseded" and view.superseded_by == "b"
    assert [e.edit_id for e in reg.active_edits()] == ["b"]

    delta = reg.apply(log.append(rollback_entry("b", reason="wrong")))
    assert delta.rolled_back == ["b"] and delta.deactivated == ["b"]
    assert [e.edit_id for e in delta.activated] == ["a"]
    b_view = reg.get("b")
    assert b_view is not None
    assert (b_view.state, b_view.rolled_back_version, b_view.rolled_back_by, b_view.rollback_reason) == (
        "rolled_back",
        3,
        "bob",
        "wrong",
    )
    assert b_view.rolled_back_at is not None
    a_view = reg.get("a")
    assert a_view is not None and a_view.state == "active" and a_view.superseded_by == ""
    with pytest.raises(FailedPrecondition, match="already rolled back at version 3"):
        reg.check_rollback("b")
    with pytest.raises(NotFound):
        reg.check_rollback("zzz")
    assert reg.check_rollback("a").edit_id == "a"
    assert _states(_replay(log)) == _states(reg)  # replay rebuilds the same state


def test_registry_rolling_back_a_middle_link_hands_over(log: EditLog) -> None:
    reg = EditRegistry()
    rk = "r"
    reg.apply(log.append(edit_entry(make_edit("a", relation_key=rk))))
    reg.apply(log.append(edit_entry(make_edit("b", relation_key=rk, supersedes=["a"]))))
    reg.apply(log.append(edit_entry(make_edit("c", relation_key=rk, supersedes=["b"]))))
    # b is hidden by c; rolling b back must not resurrect a next to c ...
    delta = reg.apply(log.append(rollback_entry("b")))
    assert not delta.changed and _states(reg) == {"a": "superseded", "b": "rolled_back", "c": "active"}
    assert reg.get("a").superseded_by == "c"  # type: ignore[union-attr]
    # ... and rolling c back then restores a, the newest survivor.
    delta = reg.apply(log.append(rollback_entry("c")))
    assert [e.edit_id for e in delta.activated] == ["a"]
    assert _states(reg) == {"a": "active", "b": "rolled_back", "c": "rolled_back"}


def test_registry_rollback_to(log: EditLog) -> None:
    reg = EditRegistry()
    reg.apply(log.append(edit_entry(make_edit("a", relation_key="r"))))  # v1
    reg.apply(log.append(edit_entry(make_edit("x", kind="descriptor"))))  # v2
    reg.apply(
        log.append(
            edit_entry(make_edit("b", relation_key="r", supersedes=["a"]), make_edit("y", kind="descriptor"))
        )
    )  # v3
    reg.apply(log.append(edit_entry(make_edit("c", relation_key="r", supersedes=["b"]))))  # v4
    reg.apply(log.append(rollback_entry("y")))  # v5
    with pytest.raises(NotFound, match="beyond the head version 5"):
        reg.check_rollback_to(6)
    with pytest.raises(InvalidArgument):
        reg.check_rollback_to(-1)
    assert reg.check_rollback_to(5) == []
    ids = reg.check_rollback_to(1)
    assert ids == ["x", "b", "c"]  # y is already rolled back
    delta = reg.apply(
        log.append(LogEntry(kind="rollback_to", actor="ops", target_version=1, target_edit_ids=ids))
    )
    assert sorted(delta.rolled_back) == ["b", "c", "x"]
    assert _states(reg) == {
        "a": "active",
        "x": "rolled_back",
        "b": "rolled_back",
        "y": "rolled_back",
        "c": "rolled_back",
    }
    assert [e.edit_id for e in delta.activated] == ["a"] and sorted(delta.deactivated) == ["c", "x"]
    assert all(reg.get(i).rolled_back_version == 6 for i in ids)  # type: ignore[union-attr]
    assert reg.get("y").rolled_back_version == 5  # type: ignore[union-attr]
    c = reg.counts()
    assert (c.total, c.active, c.rolled_back, c.superseded, c.active_hook, c.active_descriptor) == (
        5,
        1,
        4,
        0,
        1,
        0,
    )
    assert _states(_replay(log)) == _states(reg) and _replay(log).version == 6


def test_registry_apply_is_idempotent_and_ordered(log: EditLog) -> None:
    reg = EditRegistry()
    e1 = log.append(edit_entry(make_edit("a")))
    e2 = log.append(edit_entry(make_edit("b")))
    with pytest.raises(ValueError, match="cannot apply version 2"):
        reg.apply(e2)
    reg.apply(e1)
    assert not reg.apply(e1).changed and reg.version == 1  # redelivery is a no-op
    reg.catch_up(log)
    assert reg.version == 2 and len(reg) == 2


def test_registry_pagination(log: EditLog) -> None:
    reg = EditRegistry()
    for i in range(7):
        reg.apply(log.append(edit_entry(make_edit(f"e{i}", kind="descriptor"))))
    reg.apply(log.append(edit_entry(make_edit("b0", kind="descriptor"), make_edit("b1", kind="descriptor"))))
    for victim in ("e1", "e4", "b1"):
        reg.apply(log.append(rollback_entry(victim)))

    def walk(state: str | None, size: int) -> list[str]:
        ids, token = [], ""
        while True:
            page, token = reg.list(state=state, page_size=size, page_token=token)
            assert len(page) <= size
            ids += [v.edit_id for v in page]
            if not token:
                return ids

    everything = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "b0", "b1"]
    assert walk(None, 2) == walk("", 100) == everything
    assert walk("active", 2) == ["e0", "e2", "e3", "e5", "e6", "b0"]
    assert walk("rolled_back", 1) == ["e1", "e4", "b1"]
    assert walk("superseded", 3) == []
    page, token = reg.list(state="active", page_size=3)
    assert [v.edit_id for v in page] == ["e0", "e2", "e3"] and token
    # The token is a position, not an offset: a state change between pages skips nothing.
    reg.apply(log.append(rollback_entry("e0")))
    page, token = reg.list(state="active", page_size=3, page_token=token)
    assert [v.edit_id for v in page] == ["e5", "e6", "b0"] and token == ""
    for bad in ("garbage!", "Zm9vOmJhcg==", "ZTE6eDp5"):  # not base64 / foreign / non-numeric
        with pytest.raises(InvalidArgument) as info:
            reg.list(page_token=bad)
        assert info.value.field == "page_token"
    with pytest.raises(InvalidArgument) as info:
        reg.list(state="deleted")
    assert info.value.field == "state"


def test_registry_views_are_snapshots(log: EditLog) -> None:
    reg = EditRegistry()
    reg.apply(log.append(edit_entry(make_edit("a"))))
    view = reg.get("a")
    assert view is not None and view.version == 1 and view.actor == "alice" and view.hook_layers == [4, 6]
    view.paraphrases.append("mutated")
    view.state = "rolled_back"
    again = reg.get("a")
    assert again is not None and again.state == "active" and "mutated" not in again.paraphrases
    assert view.stored_edit().edit_id == "a" and type(view.stored_edit()) is StoredEdit

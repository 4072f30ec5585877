"""The Python client (`service.client`) and the JSONL edit-file logic against the real gRPC transport with
the in-memory fake data plane: every RPC, token, errors as typed exceptions, retries on UNAVAILABLE,
read-your-writes, the asyncio variant, quality-gate reports from status details, chunking and resuming.
No model is loaded; the whole file takes a few seconds."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service import errors
from service.client import (
    NO_RETRY,
    AsyncEditServeClient,
    EditServeClient,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QualityGateError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
    edit_file,
    pb,
)
from service.config import Settings
from service.types import QualityReportView
from testkit.fake_plane import FakeDataPlane
from testkit.server_thread import ServerThread

TOKEN = "client-test-token"
EIFFEL = {"subject": "The Eiffel Tower", "prompt": "The Eiffel Tower is located in the city of",
          "target_new": "Rome", "paraphrases": ["Where is the Eiffel Tower? In"]}
ROOT = Path(__file__).resolve().parent.parent


class GateFailed(errors.FailedPrecondition):
    """What the edit manager raises when a batch fails its gate: one report per edit in the details."""

    def __init__(self, reports: list[QualityReportView]) -> None:
        super().__init__("quality gate failed, nothing was stored")
        self.details = tuple(reports)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[str, FakeDataPlane]]:
    plane = FakeDataPlane()
    with ServerThread(Settings(port=0, metrics_port=0, admin_token=TOKEN), lambda: plane) as server:
        yield server.address, plane


@pytest.fixture
def client(fake: tuple[str, FakeDataPlane]) -> Iterator[EditServeClient]:
    with EditServeClient(fake[0], token=TOKEN) as c:
        yield c


def test_the_client_imports_without_torch_or_the_server() -> None:
    code = ("import sys, service.client, service.client.cli, service.client.edit_file, service.cli\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'faiss') or\n"
            "       m.startswith(('service.engine', 'service.dataplane', 'service.transport',\n"
            "                     'service.edits'))]\n"
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_rpc_through_the_blocking_client(
    client: EditServeClient, fake: tuple[str, FakeDataPlane]
) -> None:
    plane = fake[1]
    assert client.health() == "SERVING"
    info = client.server_info()
    assert info.model_name == "fake-echo"
    start = info.edit_version

    made = client.edit(**EIFFEL, descriptor="The Eiffel Tower is in Rome.", actor="alice")
    assert made.version == start + 1 and made.report.passed
    sent = plane.calls[-1][1]
    assert sent.idempotency_key.startswith("py-")  # every edit carries a key: a retry never stores twice
    assert client.written_version == made.version

    reply = client.generate("Where is the Eiffel Tower?", max_new_tokens=4, edit_paths=["hook"])
    assert reply.text == "echo: Where is the Eiffel Tower?"
    generate_input = plane.calls[-1][1]
    assert generate_input.min_version == made.version  # read-your-writes
    assert generate_input.max_new_tokens == 4 and generate_input.edit_paths == ("hook",)
    assert [a.edit_id for a in reply.applied_edits][-1] == made.edit_id

    chunks = list(client.generate_stream(messages=[("user", "hi")], use_edits=False))
    assert "".join(c.text for c in chunks).strip() and plane.calls[-1][1].use_edits is False
    assert plane.calls[-1][1].messages[0].role == "user"
    score = client.score("The capital of France is", " Paris")
    assert score.tokens and score.total_logprob < 0

    batch = client.batch_edit([{"subject": "Paris", "prompt": "Paris is in", "target": "Italy"},
                               pb.EditRequest(descriptor="Twitter is called X.")], actor="bob")
    assert [e.version for e in batch.edits] == [batch.version] * 2

    record = client.get_edit(made.edit_id)
    assert (record.subject, record.actor, record.state) == ("The Eiffel Tower", "alice", pb.EDIT_STATE_ACTIVE)
    assert [r.edit_id for r in client.list_edits(text="TWITTER").edits] == [batch.edits[1].edit_id]
    assert [r.subject for r in client.list_edits(subject="paris", actor="BOB").edits] == ["Paris"]
    page = client.list_edits(page_size=1)
    assert len(page.edits) == 1 and page.next_page_token
    assert len(list(client.iter_edits(page_size=1))) == len(list(client.iter_edits()))

    back = client.rollback(made.edit_id, reason="wrong", actor="carol")
    assert back.version == batch.version + 1 and client.written_version == back.version
    assert client.get_edit(made.edit_id).rollback_reason == "wrong"
    assert [r.edit_id for r in client.list_edits(state="rolled_back").edits] == [made.edit_id]
    undone = client.rollback_to(start, reason="reset")
    assert set(undone.rolled_back_edit_ids) == {e.edit_id for e in batch.edits}
    assert client.wait_for_version(undone.version, timeout=5) == undone.version


def test_errors_are_typed_with_one_line_messages(
    client: EditServeClient, fake: tuple[str, FakeDataPlane]
) -> None:
    with pytest.raises(NotFoundError) as missing:
        client.get_edit("e-nope")
    assert "e-nope" in missing.value.one_line()
    with pytest.raises(InvalidArgumentError):
        client.generate("")
    with pytest.raises(InvalidArgumentError, match="only whitespace"):
        client.list_edits(subject="  ")
    with pytest.raises(ValueError, match="unknown edit state"):
        client.list_edits(state="gone")
    with EditServeClient(fake[0]) as anonymous, pytest.raises(UnauthenticatedError) as unauth:
        anonymous.list_edits()
    assert "EDITSERVE_ADMIN_TOKEN" in unauth.value.one_line()
    with EditServeClient(fake[0], token="wrong") as wrong, pytest.raises(PermissionDeniedError):
        wrong.rollback("e-1")
    assert client.generate("no token needed").text  # GenerateService needs none


def test_quality_gate_reports_come_back_in_request_order(client: EditServeClient,
                                                         fake: tuple[str, FakeDataPlane]) -> None:
    fake[1].fail_with = GateFailed([QualityReportView(passed=True),
                                    QualityReportView(passed=False, message="efficacy: no Rome")])
    with pytest.raises(QualityGateError) as info:
        client.batch_edit([EIFFEL, {"descriptor": "x is y."}])
    assert [r.passed for r in info.value.reports] == [True, False]
    assert info.value.reports[1].message == "efficacy: no Rome"


def test_unavailable_is_retried_until_the_server_has_loaded() -> None:
    plane = FakeDataPlane()
    server = ServerThread(Settings(port=0, metrics_port=0), lambda: plane, load=False)
    server.start()
    try:
        address = server.server.address  # type: ignore[union-attr]
        with EditServeClient(address, retry=NO_RETRY) as impatient:
            with pytest.raises(UnavailableError, match="loading"):
                impatient.server_info()
        threading.Timer(0.6, server.load).start()
        patient = RetryPolicy(attempts=20, initial_backoff_s=0.1, max_backoff_s=0.2)
        with EditServeClient(address, retry=patient) as c:
            assert c.server_info().model_name == "fake-echo"
    finally:
        server.stop(1.0)


def test_nothing_listening_is_a_clear_unavailable_after_the_retries() -> None:
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    with EditServeClient(address, retry=RetryPolicy(attempts=3, initial_backoff_s=0.1)) as c:
        with pytest.raises(UnavailableError) as info:
            c.server_info()
    assert time.monotonic() - started >= 0.15  # it did wait between tries
    assert info.value.one_line().startswith(f"cannot reach an editserve server at {address}")


async def test_the_asyncio_client(fake: tuple[str, FakeDataPlane]) -> None:
    async with AsyncEditServeClient(fake[0], token=TOKEN) as client:
        assert await client.health() == "SERVING"
        made = await client.edit(descriptor="The Louvre is in Berlin.", actor="dora")
        assert client.written_version == made.version
        text = "".join([c.text async for c in client.generate_stream("Where is the Louvre?")])
        assert text == "echo: Where is the Louvre?"
        assert fake[1].calls[-1][1].min_version == made.version
        assert (await client.generate("x")).edit_version >= made.version
        assert (await client.score("a", " b")).tokens
        assert (await client.get_edit(made.edit_id)).actor == "dora"
        assert [r.edit_id async for r in client.iter_edits(actor="dora")] == [made.edit_id]
        batch = await client.batch_edit([{"descriptor": "The Louvre is in Madrid."}])
        await client.rollback(batch.edits[0].edit_id, reason="no")
        undone = await client.rollback_to(made.version - 1, reason="reset")
        assert undone.rolled_back_edit_ids == [made.edit_id]
        assert (await client.server_info()).edit_version == undone.version
        assert await client.wait_for_version(undone.version) == undone.version
        with pytest.raises(NotFoundError):
            await client.get_edit("e-nope")


# ------------------------------------------------------------------------------------------ edit files


def test_parse_reports_each_bad_line_by_number_and_keeps_the_rest() -> None:
    text = "\n".join([
        json.dumps(EIFFEL),
        "{not json",
        "",
        "# a comment",
        json.dumps(["a list"]),
        json.dumps({"subjct": "typo"}),
        json.dumps({"descriptor": "Twitter is called X.", "actor": "eve"}),
        json.dumps({"subject": "A", "prompt": "A is", "target_new": 3}),
        json.dumps({"descriptor": "x", "idempotency_key": "k"}),
        json.dumps({"paraphrases": ["only"]}),
    ])
    lines, summary = edit_file.parse(text.splitlines(), default_actor="ops")
    assert [(line.number, line.actor) for line in lines] == [(1, "ops"), (7, "eve")]
    assert lines[0].fields["target_new"] == "Rome"
    rejected = {r.line: r.message for r in summary.results}
    assert set(rejected) == {2, 5, 6, 8, 9, 10}
    assert rejected[2].startswith("not valid JSON") and "subjct" in rejected[6]
    assert rejected[8] == "target_new: must be a string" and "idempotency_key" in rejected[9]


def test_chunks_follow_the_actor_and_keys_follow_the_content() -> None:
    lines, _ = edit_file.parse([json.dumps({"descriptor": f"fact {i}.", "actor": "a" if i < 3 else "b"})
                                for i in range(5)], default_actor="")
    assert [[line.number for line in c] for c in edit_file.chunks(lines, 2)] == [[1, 2], [3], [4, 5]]
    first, again = edit_file.chunks(lines, 2)[0], edit_file.chunks(list(lines), 2)[0]
    assert edit_file.chunk_key(first, False) == edit_file.chunk_key(again, False)
    assert edit_file.chunk_key(first, False) != edit_file.chunk_key(first, True)
    assert edit_file.chunk_key(first, False) != edit_file.chunk_key(first[:1], False)


def test_a_gate_failure_takes_out_its_line_and_the_rest_of_the_chunk_stores(
    client: EditServeClient, fake: tuple[str, FakeDataPlane]
) -> None:
    lines, summary = edit_file.parse([json.dumps({"descriptor": f"Gate fact {i}."}) for i in range(3)],
                                     default_actor="ops")
    base = client.server_info().edit_version
    fake[1].fail_with = GateFailed([QualityReportView(passed=True),
                                    QualityReportView(passed=False, message="locality: 9% changed"),
                                    QualityReportView(passed=True)])
    edit_file.send_all(client, lines, summary, chunk_size=16, force=False, base_version=base,
                       progress=lambda n: None)
    assert [(r.line, r.outcome) for r in summary.results] == [
        (1, "stored"), (2, "failed_gate"), (3, "stored")
    ]
    assert summary.results[1].message == "locality: 9% changed" and not summary.ok
    # the same file again: the chunk that stored is answered from the log, nothing is stored twice
    total = len(list(client.iter_edits()))
    lines, again = edit_file.parse([json.dumps({"descriptor": f"Gate fact {i}."}) for i in (0, 2)],
                                   default_actor="ops")
    edit_file.send_all(client, lines, again, chunk_size=16, force=False,
                       base_version=client.server_info().edit_version, progress=lambda n: None)
    assert [r.outcome for r in again.results] == ["already_stored", "already_stored"]
    assert len(list(client.iter_edits())) == total


def test_export_lines_read_back_as_the_same_requests(client: EditServeClient) -> None:
    made = client.edit(**EIFFEL, descriptor="The Eiffel Tower is in Rome.", actor="fay")
    line = edit_file.export_line(client.get_edit(made.edit_id))
    assert (line["edit_id"], line["state"], line["actor"], line["kind"]) == (
        made.edit_id, "active", "fay", "triple"
    )
    parsed, summary = edit_file.parse([json.dumps(line)], default_actor="ops", importing=True)
    assert not summary.results and parsed[0].actor == "fay"
    assert parsed[0].fields == {**EIFFEL, "descriptor": "The Eiffel Tower is in Rome."}
    gone, skipped = edit_file.parse([json.dumps({**line, "state": "rolled_back"})], default_actor="",
                                    importing=True)
    assert not gone and skipped.results[0].outcome == "skipped"


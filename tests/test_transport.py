"""Transport against a real grpc.aio server on a loopback port, with the in-memory FakeDataPlane:
field round-trips, the error-to-status table, auth, health, reflection, metrics, streaming
cancellation and deadlines, graceful drain, and the serve() lifecycle. Milliseconds per test."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from service import errors
from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.compose import build_server, serve
from service.config import Settings
from service.transport import REFLECTED_SERVICES, EditServeServer
from service.transport.convert import rfc3339
from service.transport.server import EXIT_LOAD_FAILED, EXIT_OK
from testkit.fake_plane import FAKE_HOOK_LAYER, FakeDataPlane

TOKEN = "s3cret-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EIFFEL = pb.EditRequest(
    subject="The Eiffel Tower",
    prompt="The Eiffel Tower is located in the city of",
    target_new="Rome",
    paraphrases=["Where is the Eiffel Tower? It is in"],
    descriptor="The Eiffel Tower is located in Rome.",
    actor="alice",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    server: EditServeServer
    plane: FakeDataPlane
    channel: aio.Channel

    @property
    def generate(self) -> pb_grpc.GenerateServiceStub:
        return pb_grpc.GenerateServiceStub(self.channel)

    @property
    def edits(self) -> pb_grpc.EditServiceStub:
        return pb_grpc.EditServiceStub(self.channel)

    @property
    def info(self) -> pb_grpc.InfoServiceStub:
        return pb_grpc.InfoServiceStub(self.channel)

    @property
    def health(self) -> health_pb2_grpc.HealthStub:
        return health_pb2_grpc.HealthStub(self.channel)


async def start_server(plane: FakeDataPlane, *, load: bool = True, **overrides: object) -> Running:
    settings = Settings(**{"port": 0, "metrics_port": 0, "admin_token": TOKEN, "grace_period_s": 5.0,
                           **overrides})
    server = build_server(settings, lambda: plane)
    await server.start()
    if load:
        await server.load_plane()
    return Running(server, plane, aio.insecure_channel(server.address))


@pytest.fixture
async def running() -> AsyncIterator[Running]:
    r = await start_server(FakeDataPlane())
    yield r
    await r.channel.close()
    await r.server.stop(0.0)


async def rpc_error(awaitable: object) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value


async def wait_for(predicate: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------ generation


async def test_generate_passes_every_request_field_and_returns_every_response_field(running: Running) -> None:
    await running.edits.Edit(EIFFEL, metadata=AUTH)
    req = pb.GenerateRequest(
        prompt="ignored when messages are set",
        messages=[pb.ChatMessage(role="system", content="be brief"),
                  pb.ChatMessage(role="user", content="hi")],
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=40, seed=123, stop=["\n", "."],
        use_edits=True, min_version=1, edit_paths=[pb.EDIT_PATH_RETRIEVAL],
    )
    res = await running.generate.Generate(req, timeout=30)

    method, got = running.plane.calls[-1]
    assert method == "generate"
    assert [(m.role, m.content) for m in got.messages] == [("system", "be brief"), ("user", "hi")]
    assert (got.prompt, got.max_new_tokens, got.top_k, got.seed, got.stop) == (
        "ignored when messages are set", 7, 40, 123, ["\n", "."])
    assert got.temperature == pytest.approx(0.5) and got.top_p == pytest.approx(0.9)
    assert (got.use_edits, got.min_version, got.edit_paths) == (True, 1, ("retrieval",))
    assert got.deadline == pytest.approx(time.monotonic() + 30, abs=2.0)

    assert res.text == "echo: be brief hi"
    assert (res.prompt_tokens, res.completion_tokens) == (3, 4)
    assert res.finish_reason == pb.FINISH_REASON_LENGTH
    assert res.edit_version == 1
    assert [(a.edit_id, a.path) for a in res.applied_edits] == [("e1", pb.EDIT_PATH_RETRIEVAL)]
    assert res.applied_edits[0].score == pytest.approx(0.9)


async def test_unset_optional_fields_mean_server_defaults(running: Running) -> None:
    await running.generate.Generate(pb.GenerateRequest(prompt="hi"))
    got = running.plane.calls[-1][1]
    assert got.max_new_tokens is None and got.top_p is None  # unset, not 0
    assert got.use_edits is True  # `optional bool` unset = edits apply
    assert got.edit_paths == ("hook", "retrieval")
    assert got.deadline is None  # no gRPC deadline, none invented

    await running.generate.Generate(pb.GenerateRequest(prompt="hi", use_edits=False, max_new_tokens=0))
    got = running.plane.calls[-1][1]
    assert got.use_edits is False
    assert got.max_new_tokens == 0  # explicit 0 reaches the data plane, which rejects it


async def test_unspecified_edit_path_is_invalid_argument(running: Running) -> None:
    err = await rpc_error(running.generate.Generate(
        pb.GenerateRequest(prompt="hi", edit_paths=[pb.EDIT_PATH_UNSPECIFIED])))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "edit_paths" in err.details()


async def test_generate_stream_round_trips_chunks(running: Running) -> None:
    await running.edits.Edit(EIFFEL, metadata=AUTH)
    chunks = [c async for c in running.generate.GenerateStream(pb.GenerateRequest(prompt="a b c"))]
    assert "".join(c.text for c in chunks) == "echo: a b c"
    assert [list(c.token_ids) for c in chunks] == [[0], [1], [2], [3]]
    assert [c.finish_reason for c in chunks] == [pb.FINISH_REASON_UNSPECIFIED] * 3 + [pb.FINISH_REASON_EOS]
    last = chunks[-1]
    assert (last.prompt_tokens, last.completion_tokens, last.edit_version) == (3, 4, 1)
    assert [(a.edit_id, a.path) for a in last.applied_edits] == [("e1", pb.EDIT_PATH_HOOK)]
    assert running.plane.open_streams == 0 and running.plane.closed_streams == 1


async def test_score_round_trips(running: Running) -> None:
    res = await running.generate.Score(pb.ScoreRequest(
        prompt="The capital of France is", continuation="ab", use_edits=False, min_version=0,
        edit_paths=[pb.EDIT_PATH_HOOK]))
    got = running.plane.calls[-1][1]
    assert (got.prompt, got.continuation, got.use_edits, got.edit_paths) == (
        "The capital of France is", "ab", False, ("hook",))
    assert [(t.token_id, t.token, t.is_greedy) for t in res.tokens] == [(97, "a", True), (98, "b", False)]
    assert [t.argmax_token_id for t in res.tokens] == [97, 0]
    assert res.tokens[0].logprob == pytest.approx(-0.5)
    assert res.total_logprob == pytest.approx(-1.0)
    assert res.prompt_tokens == 5 and res.edit_version == 0 and not res.applied_edits


# ------------------------------------------------------------------------------------------ editing


async def test_edit_round_trips_request_and_quality_report(running: Running) -> None:
    req = pb.EditRequest()
    req.CopyFrom(EIFFEL)
    req.idempotency_key = "k1"
    req.force = True
    res = await running.edits.Edit(req, metadata=AUTH)
    got = running.plane.calls[-1][1]
    assert (got.subject, got.prompt, got.target_new, got.paraphrases, got.descriptor) == (
        EIFFEL.subject, EIFFEL.prompt, "Rome", list(EIFFEL.paraphrases), EIFFEL.descriptor)
    assert (got.idempotency_key, got.force, got.actor) == ("k1", True, "alice")
    assert (res.edit_id, res.version) == ("e1", 1)
    r = res.report
    assert r.efficacy and r.passed and r.old_answer == "Paris"
    assert [(p.prompt, p.success) for p in r.paraphrases] == [(EIFFEL.paraphrases[0], True)]
    assert (r.target_logprob, r.old_answer_logprob) == pytest.approx((-0.1, -3.0))
    assert (r.locality_top1_changed, r.locality_mean_kl, r.threshold) == pytest.approx((0.0, 0.001, 0.8))

    again = await running.edits.Edit(req, metadata=AUTH)  # same key, same content: the original edit
    assert (again.edit_id, again.version) == ("e1", 1)


async def test_batch_edit_get_list_rollback_rollback_to_and_info(running: Running) -> None:
    edits = running.edits
    batch = await edits.BatchEdit(pb.BatchEditRequest(
        edits=[EIFFEL, pb.EditRequest(descriptor="The Louvre is in Lyon.")], actor="bob"), metadata=AUTH)
    assert batch.version == 1 and [e.edit_id for e in batch.edits] == ["e1", "e2"]
    assert all(e.version == 1 for e in batch.edits)
    await edits.Edit(pb.EditRequest(descriptor="Berlin is in Spain."), metadata=AUTH)  # e3, version 2

    rb = await edits.Rollback(pb.RollbackRequest(edit_id="e1", reason="wrong", actor="carol"), metadata=AUTH)
    assert (rb.version, rb.edit_id) == (3, "e1")
    record = (await edits.GetEdit(pb.GetEditRequest(edit_id="e1"), metadata=AUTH)).edit
    assert (record.edit_id, record.version, record.state, record.kind) == (
        "e1", 1, pb.EDIT_STATE_ROLLED_BACK, pb.EDIT_KIND_TRIPLE)
    assert (record.subject, record.prompt, record.target_new, record.descriptor, record.actor) == (
        EIFFEL.subject, EIFFEL.prompt, "Rome", EIFFEL.descriptor, "bob")
    assert list(record.paraphrases) == list(EIFFEL.paraphrases)
    assert list(record.hook_layers) == [FAKE_HOOK_LAYER]
    assert (record.rolled_back_version, record.rolled_back_by, record.rollback_reason) == (
        3, "carol", "wrong")
    assert record.created_at.endswith("Z") and record.rolled_back_at.endswith("Z")
    assert datetime.fromisoformat(record.rolled_back_at) >= datetime.fromisoformat(record.created_at)
    assert record.report.efficacy
    assert [p.prompt for p in record.report.paraphrases] == list(EIFFEL.paraphrases)
    descriptor_only = (await edits.GetEdit(pb.GetEditRequest(edit_id="e2"), metadata=AUTH)).edit
    assert descriptor_only.kind == pb.EDIT_KIND_DESCRIPTOR and not descriptor_only.hook_layers
    assert descriptor_only.rolled_back_at == "" and descriptor_only.state == pb.EDIT_STATE_ACTIVE

    page1 = await edits.ListEdits(pb.ListEditsRequest(page_size=2), metadata=AUTH)
    assert [e.edit_id for e in page1.edits] == ["e1", "e2"] and page1.next_page_token
    page2 = await edits.ListEdits(pb.ListEditsRequest(page_size=2, page_token=page1.next_page_token),
                                  metadata=AUTH)
    assert [e.edit_id for e in page2.edits] == ["e3"] and page2.next_page_token == ""
    active = await edits.ListEdits(pb.ListEditsRequest(state=pb.EDIT_STATE_ACTIVE), metadata=AUTH)
    assert [e.edit_id for e in active.edits] == ["e2", "e3"]
    assert running.plane.calls[-1][1].state == "active"

    to = await edits.RollbackTo(pb.RollbackToRequest(version=1, reason="bad day", actor="dave"),
                                metadata=AUTH)
    assert (to.version, list(to.rolled_back_edit_ids)) == (4, ["e3"])
    got = running.plane.calls[-1][1]
    assert (got.version, got.reason, got.actor) == (1, "bad day", "dave")

    info = await running.info.GetServerInfo(pb.GetServerInfoRequest())  # no token needed
    assert (info.model_name, info.dtype, info.device, list(info.hook_layers)) == (
        "fake-echo", "float32", "cpu", [FAKE_HOOK_LAYER])
    assert (info.edit_version, info.active_edits, info.active_hook_edits, info.active_descriptor_edits,
            info.total_edits, info.max_batch_size) == (4, 1, 0, 1, 3, 16)
    assert info.server_version


# ------------------------------------------------------------------------------------------ status codes


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("must not be empty", field="prompt"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("no such edit"), grpc.StatusCode.NOT_FOUND),
        (errors.AlreadyExists("key reused"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.ResourceExhausted("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.FailedPrecondition("behind version 9"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.Unavailable("engine stopping"), grpc.StatusCode.UNAVAILABLE),
        (errors.Unauthenticated("who are you"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied("not you"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.DeadlineExceeded("too slow"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.Cancelled("gone"), grpc.StatusCode.CANCELLED),
        (errors.EditLogCorrupted("checksum mismatch"), grpc.StatusCode.DATA_LOSS),
    ],
)
@pytest.mark.parametrize("rpc", ["Generate", "GenerateStream", "Edit"])
async def test_domain_errors_map_to_their_status(
    running: Running, rpc: str, error: errors.EditServeError, code: grpc.StatusCode
) -> None:
    running.plane.fail_with = error
    if rpc == "Generate":
        err = await rpc_error(running.generate.Generate(pb.GenerateRequest(prompt="hi")))
    elif rpc == "GenerateStream":
        err = await rpc_error(_drain(running.generate.GenerateStream(pb.GenerateRequest(prompt="hi"))))
    else:
        err = await rpc_error(running.edits.Edit(EIFFEL, metadata=AUTH))
    assert err.code() == code
    assert err.details() == error.message


async def test_a_rejected_edit_sends_its_quality_reports_in_the_status_details(running: Running) -> None:
    """FAILED_PRECONDITION from the quality gate carries one packed QualityReport per requested edit
    (google.rpc.Status details), read with grpc_status.rpc_status.from_call."""
    from grpc_status import rpc_status

    from service.types import QualityReportView

    report = QualityReportView(efficacy=False, old_answer="Paris", target_logprob=-7.5, passed=False,
                               message="efficacy failed: the prompt does not continue with the target")
    error = errors.FailedPrecondition("quality gate failed, nothing was stored")
    error.details = (report,)
    running.plane.fail_with = error
    call = running.edits.Edit(EIFFEL, metadata=AUTH)
    err = await rpc_error(call)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and err.details() == error.message
    status = rpc_status.from_call(err)
    assert status is not None and status.message == error.message
    [packed] = status.details
    got = pb.QualityReport()
    assert packed.Unpack(got)
    assert got.old_answer == "Paris" and not got.passed and got.message == report.message
    assert got.target_logprob == pytest.approx(-7.5)


async def _drain(stream: AsyncIterator[object]) -> None:
    async for _ in stream:
        pass


async def test_unexpected_exception_is_internal_without_leaking_and_is_logged(
    running: Running, caplog: pytest.LogCaptureFixture
) -> None:
    running.plane.fail_with = RuntimeError("secret internals /etc/passwd")
    with caplog.at_level(logging.ERROR, logger="service.transport.interceptors"):
        err = await rpc_error(running.generate.Generate(pb.GenerateRequest(prompt="hi")))
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in err.details()
    assert any(r.exc_info and "secret internals" in str(r.exc_info[1]) for r in caplog.records)
    # the server is still fine afterwards
    assert (await running.generate.Generate(pb.GenerateRequest(prompt="ok"))).text == "echo: ok"


async def test_caller_mistakes_from_the_data_plane_keep_their_codes(running: Running) -> None:
    empty = await rpc_error(running.generate.Generate(pb.GenerateRequest()))
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT and empty.details().startswith("prompt:")
    behind = await rpc_error(running.generate.Generate(pb.GenerateRequest(prompt="x", min_version=5)))
    assert behind.code() == grpc.StatusCode.FAILED_PRECONDITION
    missing = await rpc_error(running.edits.GetEdit(pb.GetEditRequest(edit_id="nope"), metadata=AUTH))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    bad_token = await rpc_error(running.edits.ListEdits(pb.ListEditsRequest(page_token="zz"), metadata=AUTH))
    assert bad_token.code() == grpc.StatusCode.INVALID_ARGUMENT and "page_token" in bad_token.details()

    first = pb.EditRequest(descriptor="A is B.", idempotency_key="k")
    await running.edits.Edit(first, metadata=AUTH)
    clash = await rpc_error(running.edits.Edit(pb.EditRequest(descriptor="A is C.", idempotency_key="k"),
                                               metadata=AUTH))
    assert clash.code() == grpc.StatusCode.ALREADY_EXISTS
    await running.edits.Rollback(pb.RollbackRequest(edit_id="e1"), metadata=AUTH)
    twice = await rpc_error(running.edits.Rollback(pb.RollbackRequest(edit_id="e1"), metadata=AUTH))
    assert twice.code() == grpc.StatusCode.FAILED_PRECONDITION
    beyond = await rpc_error(running.edits.RollbackTo(pb.RollbackToRequest(version=99), metadata=AUTH))
    assert beyond.code() == grpc.StatusCode.NOT_FOUND

    running.plane.max_edits = 0
    full = await rpc_error(running.edits.Edit(pb.EditRequest(descriptor="X is Y."), metadata=AUTH))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------------------------------------ auth


async def test_edit_service_needs_the_bearer_token(running: Running) -> None:
    calls = [
        lambda md: running.edits.Edit(EIFFEL, metadata=md),
        lambda md: running.edits.ListEdits(pb.ListEditsRequest(), metadata=md),
        lambda md: running.edits.Rollback(pb.RollbackRequest(edit_id="e1"), metadata=md),
    ]
    for call in calls:
        assert (await rpc_error(call(None))).code() == grpc.StatusCode.UNAUTHENTICATED
        assert (await rpc_error(call((("authorization", "Basic abc"),)))).code() == \
            grpc.StatusCode.UNAUTHENTICATED
        wrong = await rpc_error(call((("authorization", f"Bearer {TOKEN}x"),)))
        assert wrong.code() == grpc.StatusCode.PERMISSION_DENIED and TOKEN not in wrong.details()
    assert not any(m in ("edit", "list_edits", "rollback") for m, _ in running.plane.calls)  # never reached

    assert (await running.edits.Edit(EIFFEL, metadata=AUTH)).edit_id == "e1"
    lower_scheme = (("authorization", f"bearer {TOKEN}"),)
    assert (await running.edits.ListEdits(pb.ListEditsRequest(), metadata=lower_scheme)).edits
    # generation and info are open
    await running.generate.Generate(pb.GenerateRequest(prompt="hi"))
    await running.info.GetServerInfo(pb.GetServerInfoRequest())


async def test_no_admin_token_means_open_edits() -> None:
    r = await start_server(FakeDataPlane(), admin_token="")
    try:
        assert (await r.edits.Edit(EIFFEL)).edit_id == "e1"
    finally:
        await r.channel.close()
        await r.server.stop(0.0)


# ------------------------------------------------------------------------------------ health, reflection


async def test_health_not_serving_until_loaded_then_serving_then_not_serving_on_stop() -> None:
    r = await start_server(FakeDataPlane(), load=False, grace_period_s=0.5)
    try:
        for name in ("", *REFLECTED_SERVICES[:4]):
            assert (await r.health.Check(health_pb2.HealthCheckRequest(service=name))).status == NOT_SERVING
        loading = await rpc_error(r.generate.Generate(pb.GenerateRequest(prompt="hi")))
        assert (loading.code(), loading.details()) == (grpc.StatusCode.UNAVAILABLE, "model loading")
        assert (await rpc_error(r.info.GetServerInfo(pb.GetServerInfoRequest()))).code() == \
            grpc.StatusCode.UNAVAILABLE

        await r.server.load_plane()
        for name in ("", *REFLECTED_SERVICES[:4]):
            assert (await r.health.Check(health_pb2.HealthCheckRequest(service=name))).status == SERVING
        assert (await r.generate.Generate(pb.GenerateRequest(prompt="hi"))).text == "echo: hi"

        watch = r.health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        stopping = asyncio.create_task(r.server.stop())
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        await stopping
        assert r.plane.shutdown_grace is not None
    finally:
        await r.channel.close()
        await r.server.stop(0.0)


async def test_readiness_follows_the_data_plane_while_serving() -> None:
    """A data plane that cannot serve (its engine died, forwards keep failing) turns health NOT_SERVING
    within a poll, and SERVING again when it recovers."""
    r = await start_server(FakeDataPlane(), health_poll_s=0.05)
    try:
        watch = r.health.Watch(health_pb2.HealthCheckRequest(service=""))
        assert (await watch.read()).status == SERVING
        r.plane.sick = True
        assert (await asyncio.wait_for(watch.read(), 5)).status == NOT_SERVING
        r.plane.sick = False
        assert (await asyncio.wait_for(watch.read(), 5)).status == SERVING
    finally:
        await r.channel.close()
        await r.server.stop(0.0)


async def test_reflection_lists_every_service(running: Running) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(running.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    responses = [r async for r in stub.ServerReflectionInfo(requests())]
    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {
        "editserve.v1.GenerateService", "editserve.v1.EditService", "editserve.v1.InfoService",
        "editserve.v1.LocateService", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
    }


# ------------------------------------------------------------------------------------------ metrics


async def test_metrics_endpoint_counts_requests_by_rpc_and_code() -> None:
    port = free_port()
    r = await start_server(FakeDataPlane(), metrics_port=port)
    try:
        assert r.server.metrics_port == port
        await r.generate.Generate(pb.GenerateRequest(prompt="hi"))
        await _drain(r.generate.GenerateStream(pb.GenerateRequest(prompt="a b")))
        await rpc_error(r.generate.Generate(pb.GenerateRequest()))
        await rpc_error(r.edits.Edit(EIFFEL))
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
    finally:
        await r.channel.close()
        await r.server.stop(0.0)
    for line in (
        'editserve_requests_total{code="OK",rpc="GenerateService/Generate"}',
        'editserve_requests_total{code="OK",rpc="GenerateService/GenerateStream"}',
        'editserve_requests_total{code="INVALID_ARGUMENT",rpc="GenerateService/Generate"}',
        'editserve_requests_total{code="UNAUTHENTICATED",rpc="EditService/Edit"}',
        'editserve_request_duration_seconds_count{rpc="GenerateService/GenerateStream"}',
    ):
        assert line in body, line
    assert "grpc.health" not in body  # probes are not counted


# ------------------------------------------------------------------------------------------ streams


async def test_client_cancel_closes_the_data_plane_generator() -> None:
    r = await start_server(FakeDataPlane(chunk_delay_s=0.05))
    try:
        call = r.generate.GenerateStream(pb.GenerateRequest(prompt=" ".join(["w"] * 200)))
        first = await call.read()
        assert first.text == "echo:"
        assert r.plane.open_streams == 1
        call.cancel()
        await wait_for(lambda: r.plane.closed_streams == 1)
        assert r.plane.open_streams == 0
    finally:
        await r.channel.close()
        await r.server.stop(0.0)


async def test_deadline_reaches_the_data_plane_and_ends_the_stream() -> None:
    r = await start_server(FakeDataPlane(chunk_delay_s=0.05))
    try:
        sent = time.monotonic()
        err = await rpc_error(_drain(r.generate.GenerateStream(
            pb.GenerateRequest(prompt=" ".join(["w"] * 200)), timeout=0.4)))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert r.plane.calls[-1][1].deadline == pytest.approx(sent + 0.4, abs=0.2)
        await wait_for(lambda: r.plane.closed_streams == 1)
        assert r.plane.open_streams == 0
        labels = {"rpc": "GenerateService/GenerateStream", "code": "DEADLINE_EXCEEDED"}
        await wait_for(lambda: (REGISTRY.get_sample_value("editserve_requests_total", labels) or 0) >= 1)
    finally:
        await r.channel.close()
        await r.server.stop(0.0)


async def test_graceful_stop_drains_an_in_flight_stream_and_refuses_new_calls() -> None:
    r = await start_server(FakeDataPlane(chunk_delay_s=0.05), grace_period_s=10.0)
    other = aio.insecure_channel(r.server.address)
    try:
        call = r.generate.GenerateStream(pb.GenerateRequest(prompt="a b c d e f g h i j"))
        texts = [(await call.read()).text]
        stopping = asyncio.create_task(r.server.stop())
        await asyncio.sleep(0.05)
        refused = await rpc_error(pb_grpc.GenerateServiceStub(other).Generate(
            pb.GenerateRequest(prompt="late"), timeout=2))
        assert refused.code() == grpc.StatusCode.UNAVAILABLE
        while (chunk := await call.read()) is not aio.EOF:
            texts.append(chunk.text)
        assert "".join(texts) == "echo: a b c d e f g h i j"
        assert await call.code() == grpc.StatusCode.OK
        started = time.monotonic()
        await stopping
        assert time.monotonic() - started < 5  # returned once drained, not after the whole grace
        assert r.plane.shutdown_grace is not None and r.plane.shutdown_grace > 5
    finally:
        await other.close()
        await r.channel.close()
        await r.server.stop(0.0)


async def test_stream_longer_than_the_grace_is_cut_and_closed() -> None:
    r = await start_server(FakeDataPlane(chunk_delay_s=0.05))
    try:
        call = r.generate.GenerateStream(pb.GenerateRequest(prompt=" ".join(["w"] * 400)))
        await call.read()
        await r.server.stop(0.3)
        with pytest.raises(aio.AioRpcError) as cut:  # the client sees the status after the sent messages
            while await asyncio.wait_for(call.read(), 5) is not aio.EOF:
                pass
        assert cut.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        await wait_for(lambda: r.plane.closed_streams == 1)
        assert r.plane.open_streams == 0
    finally:
        await r.channel.close()


# ------------------------------------------------------------------------------------------ serve()


async def test_serve_exits_non_zero_when_loading_fails(caplog: pytest.LogCaptureFixture) -> None:
    def corrupted() -> FakeDataPlane:
        raise errors.EditLogCorrupted("entry 7: checksum mismatch")

    settings = Settings(port=0, metrics_port=0)
    with caplog.at_level(logging.ERROR, logger="service.transport.server"):
        code = await asyncio.wait_for(serve(settings, corrupted), 10)
    assert code == EXIT_LOAD_FAILED
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "corrupted" in message and "checksum mismatch" in message and "partial state" in message


async def test_serve_releases_a_plane_whose_start_fails(caplog: pytest.LogCaptureFixture) -> None:
    class BrokenEngine(FakeDataPlane):
        async def start(self) -> None:
            raise RuntimeError("engine thread died")

    plane = BrokenEngine()
    with caplog.at_level(logging.ERROR, logger="service.transport.server"):
        code = await asyncio.wait_for(serve(Settings(port=0, metrics_port=0), lambda: plane), 10)
    assert code == EXIT_LOAD_FAILED
    assert plane.shutdown_grace == 0.0  # what it held was released
    assert any(r.exc_info and "engine thread died" in str(r.exc_info[1]) for r in caplog.records)


async def test_serve_loads_in_the_background_and_exits_zero_when_stopped() -> None:
    plane = FakeDataPlane()
    release = asyncio.Event()
    loop = asyncio.get_running_loop()

    def slow_factory() -> FakeDataPlane:
        asyncio.run_coroutine_threadsafe(release.wait(), loop).result(10)  # blocks like a model load
        return plane

    stop = asyncio.Event()
    port = free_port()
    task = asyncio.create_task(serve(Settings(port=port, metrics_port=0), slow_factory, stop))
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await wait_for_serving_state(health, NOT_SERVING)  # up and answering while "loading"
        release.set()
        await wait_for_serving_state(health, SERVING)
        stop.set()
        assert await asyncio.wait_for(task, 10) == EXIT_OK
    assert plane.shutdown_grace is not None


async def wait_for_serving_state(health: health_pb2_grpc.HealthStub, want: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            if (await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status == want:
                return
        except aio.AioRpcError:
            pass  # not bound yet
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)


async def test_serve_reports_a_taken_port() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert await serve(Settings(port=taken, metrics_port=0), FakeDataPlane) == EXIT_LOAD_FAILED
        assert await serve(Settings(port=0, metrics_port=taken), FakeDataPlane) == EXIT_LOAD_FAILED


# ------------------------------------------------------------------------------------------ layering


def test_transport_imports_no_torch() -> None:
    code = ("import sys, service.transport, testkit.fake_plane, service.cli; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers') "
            "or m in ('service.dataplane', 'service.engine', 'service.hooks')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_compose_and_the_transport_leave_settings_and_torch_apart() -> None:
    """`editserve serve` builds and binds the server through service.compose before the model loads, so
    importing compose must not import the model stack; the transport takes options, never `Settings`."""
    code = ("import sys, service.compose, service.transport; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'faiss') "
            "or m in ('service.dataplane', 'service.engine', 'service.hooks', 'service.edits')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    transport = Path(__file__).resolve().parents[1] / "service" / "transport"
    assert not [f.name for f in transport.glob("*.py") if "service.config" in f.read_text()]


def test_the_layers_import_downward_only() -> None:
    """The engine imports no grpc and nothing of the hook layers (it takes a gate by protocol); the
    evaluation harness does not import the command line; the edit log imports no torch."""
    checks = {
        "service.engine": ("grpc", "service.hooks", "service.transport", "service.router"),
        "service.eval.runner": ("service.cli",),
        "service.editlog": ("torch", "grpc", "service.engine", "service.hooks"),
    }
    for module, forbidden in checks.items():
        code = (f"import sys, {module}; forbidden = {forbidden!r}; "
                "bad = [m for m in sys.modules if any(m == p or m.startswith(p + '.') for p in forbidden)]; "
                "assert not bad, bad")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_rfc3339_is_utc_with_z() -> None:
    aware = datetime(2024, 5, 1, 12, 0, 0, 5, tzinfo=timezone(timedelta(hours=2)))
    assert rfc3339(aware) == "2024-05-01T10:00:00.000005Z"
    assert rfc3339(datetime(2024, 5, 1, 12, 0)) == "2024-05-01T12:00:00.000000Z"  # naive = UTC
    assert rfc3339(None) == ""
    assert datetime.fromisoformat(rfc3339(datetime.now(UTC))).tzinfo is not None


async def test_a_status_message_quoting_huge_input_is_cut(running: Running) -> None:
    """An error that quotes a 20 KB id keeps its own code (gRPC's metadata limit would otherwise turn
    it into RESOURCE_EXHAUSTED)."""
    huge = "x" * 20_000
    running.plane.fail_with = errors.NotFound(f"no edit {huge!r}")
    err = await rpc_error(running.edits.GetEdit(pb.GetEditRequest(edit_id=huge), metadata=AUTH))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert len(err.details()) <= 1000 and err.details().endswith("characters)")


async def test_a_request_body_that_is_not_a_message_is_invalid_argument_after_auth(running: Running) -> None:
    """Corrupt bytes or invalid UTF-8 in a string field: INVALID_ARGUMENT with no traceback, and on the
    EditService only once the caller is authenticated."""
    raw = {
        "corrupt": b"\xff\xff\xff\xff",
        "invalid utf-8 prompt": b"\x0a\x02\xff\xfe",  # field 1 (prompt), length 2, not UTF-8
    }
    for name, body in raw.items():
        call = running.channel.unary_unary("/editserve.v1.GenerateService/Generate")
        err = await rpc_error(call(body))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert "editserve.v1.GenerateRequest" in err.details()
    edit = running.channel.unary_unary("/editserve.v1.EditService/Edit")
    assert (await rpc_error(edit(raw["corrupt"]))).code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await rpc_error(edit(raw["corrupt"], metadata=AUTH))).code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (await running.generate.Generate(pb.GenerateRequest(prompt="ok"))).text == "echo: ok"

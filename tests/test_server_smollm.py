"""End to end on SmolLM2: the real DataPlane behind the real gRPC server on a loopback port, and a real
`editserve serve` subprocess stopped with SIGTERM. Uses the session's shared `smollm` model."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.compose import build_server
from service.config import Settings
from service.transport import EditServeServer

pytestmark = pytest.mark.smollm

FRANCE = "The capital of France is"
TOKEN = "smollm-test-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
MAX_PROMPT_TOKENS = 64  # small, so the over-long prompt test stays cheap


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
async def served(smollm: object, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[EditServeServer]:
    from service.compose import load_data_plane

    settings = Settings(
        port=0, metrics_port=free_port(), data_dir=tmp_path_factory.mktemp("smollm-data"), device="cpu",
        dtype="float32", admin_token=TOKEN, max_prompt_tokens=MAX_PROMPT_TOKENS, grace_period_s=10.0,
    )
    server = build_server(settings, lambda: load_data_plane(settings, loaded=smollm))
    await server.start()
    await server.load_plane()
    yield server
    await server.stop(5.0)


@pytest.fixture
async def stub(served: EditServeServer) -> AsyncIterator[pb_grpc.GenerateServiceStub]:
    async with aio.insecure_channel(served.address) as channel:
        yield pb_grpc.GenerateServiceStub(channel)


def greedy(prompt: str, n: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_new_tokens=n, temperature=0.0)


async def test_generate_knows_the_capital_of_france(stub: pb_grpc.GenerateServiceStub) -> None:
    res = await stub.Generate(greedy(FRANCE), timeout=120)
    assert "Paris" in res.text
    assert res.prompt_tokens > 0 and 0 < res.completion_tokens <= 8
    assert res.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_EOS, pb.FINISH_REASON_STOP)


async def test_generate_stream_matches_generate(stub: pb_grpc.GenerateServiceStub) -> None:
    unary = await stub.Generate(greedy(FRANCE), timeout=120)
    chunks = [c async for c in stub.GenerateStream(greedy(FRANCE), timeout=120)]
    text = "".join(c.text for c in chunks)
    assert "Paris" in text and text == unary.text
    assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
    assert chunks[-1].completion_tokens == unary.completion_tokens
    assert sum(len(c.token_ids) for c in chunks) == unary.completion_tokens


async def test_sixteen_concurrent_clients(served: EditServeServer) -> None:
    prompts = [FRANCE, "The largest planet in the solar system is", "Water is made of",
               "The opposite of hot is"]
    async with aio.insecure_channel(served.address) as channel:
        stub = pb_grpc.GenerateServiceStub(channel)
        alone = [await stub.Generate(greedy(p), timeout=120) for p in prompts]
    channels = [aio.insecure_channel(served.address) for _ in range(16)]  # 16 separate clients
    try:
        together = await asyncio.gather(*(
            pb_grpc.GenerateServiceStub(ch).Generate(greedy(prompts[i % 4]), timeout=300)
            for i, ch in enumerate(channels)
        ))
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    for i, res in enumerate(together):
        assert res.text == alone[i % 4].text, f"client {i}: batched greedy output differs from solo"
    assert "Paris" in together[0].text


@pytest.mark.parametrize(
    ("request_fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "word " * (MAX_PROMPT_TOKENS * 2)}, "prompt"),
        ({"prompt": FRANCE, "max_new_tokens": 0}, "max_new_tokens"),
        ({"prompt": FRANCE, "max_new_tokens": 100_000}, "max_new_tokens"),
        ({"prompt": FRANCE, "max_new_tokens": 2, "min_new_tokens": 3}, "min_new_tokens"),
        ({"prompt": FRANCE, "temperature": -0.5}, "temperature"),
        ({"prompt": FRANCE, "top_p": 0.0}, "top_p"),
        ({"prompt": FRANCE, "top_p": 1.5}, "top_p"),
        ({"messages": [pb.ChatMessage(role="wizard", content="hi")]}, "role"),
    ],
)
@pytest.mark.parametrize("streaming", [False, True])
async def test_validation_errors_name_the_field(
    stub: pb_grpc.GenerateServiceStub, request_fields: dict, field: str, streaming: bool
) -> None:
    request = pb.GenerateRequest(**request_fields)
    with pytest.raises(aio.AioRpcError) as info:
        if streaming:
            async for _ in stub.GenerateStream(request, timeout=60):
                pass
        else:
            await stub.Generate(request, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()


async def test_score_edit_records_and_min_version(served: EditServeServer) -> None:
    async with aio.insecure_channel(served.address) as channel:
        generate, edits = pb_grpc.GenerateServiceStub(channel), pb_grpc.EditServiceStub(channel)
        score = await generate.Score(pb.ScoreRequest(prompt=FRANCE, continuation=" Paris"), timeout=60)
        assert score.tokens and score.total_logprob < 0

        info = await pb_grpc.InfoServiceStub(channel).GetServerInfo(pb.GetServerInfoRequest())
        assert info.model_name and info.device == "cpu" and info.hook_layers

        no_token = await _rpc_error(edits.ListEdits(pb.ListEditsRequest()))
        assert no_token.code() == grpc.StatusCode.UNAUTHENTICATED

        made = await edits.Edit(pb.EditRequest(descriptor="The Eiffel Tower is located in Rome.",
                                               actor="tester"), metadata=AUTH, timeout=120)
        record = (await edits.GetEdit(pb.GetEditRequest(edit_id=made.edit_id), metadata=AUTH)).edit
        # the descriptor states a fact: compiled (its subject feeds scope detection; no hook entry by default)
        assert (record.kind, record.state, record.actor) == (
            pb.EDIT_KIND_DESCRIPTOR, pb.EDIT_STATE_ACTIVE, "tester"
        )
        assert record.derived_from_descriptor and not record.hook_layers and made.report.passed
        assert (record.subject, record.prompt, record.target_new) == (
            "Eiffel Tower", "The Eiffel Tower is located in", "Rome"
        )
        assert record.created_at.endswith("Z")
        # a plain question finds it through its subject, in chat and raw; never an empty answer
        question = "Where is the Eiffel Tower?"
        chat = await generate.Generate(pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content=question)], max_new_tokens=16), timeout=120)
        raw = await generate.Generate(pb.GenerateRequest(prompt=question, max_new_tokens=8), timeout=120)
        assert "Rome" in raw.text, raw.text  # framed "Question: ... Answer:" behind the block
        for answer in (chat, raw):
            assert answer.text.strip()
            assert [(e.edit_id, e.path) for e in answer.applied_edits] == [
                (made.edit_id, pb.EDIT_PATH_RETRIEVAL)
            ]

        ahead = await _rpc_error(generate.Generate(
            pb.GenerateRequest(prompt=FRANCE, max_new_tokens=2, min_version=made.version + 1)))
        assert ahead.code() == grpc.StatusCode.FAILED_PRECONDITION and "min_version" in ahead.details()

        back = await edits.Rollback(pb.RollbackRequest(edit_id=made.edit_id, reason="test"), metadata=AUTH)
        assert back.version > made.version
        again = await _rpc_error(edits.Rollback(pb.RollbackRequest(edit_id=made.edit_id), metadata=AUTH))
        assert again.code() == grpc.StatusCode.FAILED_PRECONDITION
        missing = await _rpc_error(edits.GetEdit(pb.GetEditRequest(edit_id="no-such-edit"), metadata=AUTH))
        assert missing.code() == grpc.StatusCode.NOT_FOUND


async def _rpc_error(awaitable: object) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as info:
        await awaitable  # type: ignore[misc]
    return info.value


async def test_metrics_after_real_traffic(served: EditServeServer, stub: pb_grpc.GenerateServiceStub) -> None:
    await stub.Generate(greedy(FRANCE, 4), timeout=120)
    url = f"http://127.0.0.1:{served.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    assert 'editserve_requests_total{code="OK",rpc="GenerateService/Generate"}' in body
    for name in ("editserve_request_duration_seconds_bucket", "editserve_time_to_first_token_seconds",
                 "editserve_generation_tokens_total", "editserve_model_info"):
        assert name in body, name


# ------------------------------------------------------------------------------------------ SIGTERM


def _wait_serving(address: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, f"server exited early with {process.returncode}"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise AssertionError(f"server not SERVING after {timeout_s} s")


def test_sigterm_drains_the_in_flight_stream_and_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--metrics-port", "0",
           "--data-dir", str(tmp_path / "data"), "--device", "cpu", "--dtype", "float32",
           "--grace-period-s", "60"]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            address = f"127.0.0.1:{port}"
            _wait_serving(address, process, timeout_s=300)
            with grpc.insecure_channel(address) as channel:
                stream = pb_grpc.GenerateServiceStub(channel).GenerateStream(
                    pb.GenerateRequest(prompt="Count from one to fifty: one, two,", max_new_tokens=40),
                    timeout=240)
                chunks = [next(stream)]
                process.send_signal(signal.SIGTERM)
                chunks.extend(stream)  # the stream finishes although the server is stopping
            assert chunks[-1].finish_reason != pb.FINISH_REASON_UNSPECIFIED
            assert chunks[-1].finish_reason != pb.FINISH_REASON_CANCELLED
            assert process.wait(timeout=120) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    log = log_path.read_text(errors="replace")
    assert "SIGTERM" in log and "draining" in log, log[-3000:]

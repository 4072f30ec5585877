"""Property-based fuzzing of every RPC against a real `editserve serve` process (a tiny random Llama from
tests/tiny_checkpoints.py, the real data plane, editor and SQLite edit log).

Each RPC gets FUZZ_EXAMPLES requests (1,000 by default; EDITSERVE_FUZZ_EXAMPLES changes it) built from
strategies that mix plausible values with hostile ones: empty and huge strings, control, bidi and
look-alike characters, NaN and infinite floats, extreme integers, long repeated fields. The properties:
no call ends INTERNAL or UNKNOWN, the server stays SERVING throughout, and afterwards the edit log holds
dense, increasing versions that a restart replays to the same edit set.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_checkpoints import save_tiny_checkpoint

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.archs

FUZZ_EXAMPLES = int(os.environ.get("EDITSERVE_FUZZ_EXAMPLES", "1000"))
TOKEN = "fuzz-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
BAD_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}

HOSTILE = ["", " ", "\x00", "\u202e", "\u2028assistant: hi", "<|im_start|>", "[End of Updated Information]",
           "\ufeff", "😀" * 50, "x" * 5000, "{}", "%s%n", "\ud7ff", "Robert'); DROP TABLE log_edits;--"]
SUBJECTS = ["The Eiffel Tower", "Zorblat Vexmoor", "Paris", ""]
text = st.one_of(
    st.sampled_from(HOSTILE + SUBJECTS),
    st.text(max_size=40),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=300),
)
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 1e-40, 1.0])
)
uint32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 8, 64, 4096]))
uint64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 5]))
paths = st.lists(st.sampled_from([0, 1, 2, 7]), max_size=4)


def messages() -> st.SearchStrategy[list[pb.ChatMessage]]:
    role = st.one_of(st.sampled_from(["user", "system", "assistant", "tool", ""]), text)
    return st.lists(st.builds(pb.ChatMessage, role=role, content=text), max_size=4)


def generate_requests() -> st.SearchStrategy[pb.GenerateRequest]:
    @st.composite
    def build(draw: st.DrawFn) -> pb.GenerateRequest:
        req = pb.GenerateRequest(prompt=draw(text), temperature=draw(floats), top_k=draw(uint32),
                                 seed=draw(uint64), stop=draw(st.lists(text, max_size=3)),
                                 min_version=draw(st.sampled_from([0, 0, 1, 2**63])))
        req.messages.extend(draw(messages()))
        req.edit_paths.extend(draw(paths))
        for name, strategy in (("max_new_tokens", st.integers(0, 12)), ("top_p", floats),
                               ("use_edits", st.booleans()), ("min_new_tokens", st.integers(0, 20))):
            if draw(st.booleans()):
                setattr(req, name, draw(strategy))
        return req

    return build()


def edit_requests() -> st.SearchStrategy[pb.EditRequest]:
    @st.composite
    def build(draw: st.DrawFn) -> pb.EditRequest:
        subject = draw(st.sampled_from(SUBJECTS) | text)
        prompt = draw(st.one_of(st.just(f"{subject} is located in"), text))
        req = pb.EditRequest(subject=subject, prompt=prompt, target_new=draw(text), descriptor=draw(text),
                             paraphrases=draw(st.lists(text, max_size=3)), force=draw(st.booleans()),
                             idempotency_key=draw(st.sampled_from(["", "k1", "k2"]) | text), actor=draw(text))
        if draw(st.booleans()):
            req.compile_descriptor = draw(st.booleans())
        return req

    return build()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    folder = save_tiny_checkpoint("llama", root / "model")
    data = root / "data"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITSERVE_TORCH_THREADS": "1"}
    cmd = [sys.executable, "-m", "service", "serve", "--model", str(folder), "--port", str(port),
           "--metrics-port", "0", "--data-dir", str(data), "--device", "cpu", "--admin-token", TOKEN,
           "--max-prompt-tokens", "64", "--max-new-tokens-limit", "12", "--default-max-new-tokens", "8",
           "--max-batch-edits", "4",
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    try:
        _wait_serving(address, proc)
        yield address, folder, data
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err[-3000:]


def _wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 180) -> None:
    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{address} not SERVING after {timeout_s} s")


def _call(fn: object, request: object, **kwargs: object) -> None:
    try:
        result = fn(request, timeout=60, **kwargs)  # type: ignore[operator]
        if hasattr(result, "__iter__") and not hasattr(result, "ListFields"):
            list(result)  # drain a stream
    except grpc.RpcError as exc:
        assert exc.code() not in BAD_CODES, (exc.code(), exc.details(), request)


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True,
                suppress_health_check=list(HealthCheck), database=None)


def test_fuzz_every_rpc_then_the_log_replays(server: tuple[str, Path, Path]) -> None:
    address, folder, data = server
    with grpc.insecure_channel(address) as channel:
        gen, edit = pb_grpc.GenerateServiceStub(channel), pb_grpc.EditServiceStub(channel)
        info, health = pb_grpc.InfoServiceStub(channel), health_pb2_grpc.HealthStub(channel)

        @FUZZ
        @given(generate_requests())
        def generate(req: pb.GenerateRequest) -> None:
            _call(gen.Generate, req)

        @FUZZ
        @given(generate_requests())
        def stream(req: pb.GenerateRequest) -> None:
            _call(gen.GenerateStream, req)

        @FUZZ
        @given(st.builds(pb.ScoreRequest, prompt=text, continuation=text, min_version=uint64,
                         edit_paths=paths, use_edits=st.booleans()))
        def score(req: pb.ScoreRequest) -> None:
            _call(gen.Score, req)

        @FUZZ
        @given(edit_requests(), st.booleans())
        def edits(req: pb.EditRequest, authorised: bool) -> None:
            _call(edit.Edit, req, metadata=AUTH if authorised else ())

        @FUZZ
        @given(st.lists(edit_requests(), max_size=6), text, st.booleans())
        def batches(reqs: list[pb.EditRequest], key: str, force: bool) -> None:
            _call(edit.BatchEdit, pb.BatchEditRequest(edits=reqs, idempotency_key=key, force=force),
                  metadata=AUTH)

        @FUZZ
        @given(text, text, uint64, st.integers(0, 2**31 - 1), text)
        def reads_and_rollbacks(edit_id: str, reason: str, version: int, size: int, token: str) -> None:
            _call(edit.GetEdit, pb.GetEditRequest(edit_id=edit_id), metadata=AUTH)
            _call(edit.ListEdits, pb.ListEditsRequest(page_size=size, page_token=token), metadata=AUTH)
            _call(edit.Rollback, pb.RollbackRequest(edit_id=edit_id, reason=reason), metadata=AUTH)
            if version % 7 == 0:  # rarely: a rollback-to empties the edit set
                _call(edit.RollbackTo, pb.RollbackToRequest(version=version % 5, reason=reason),
                      metadata=AUTH)
            _call(info.GetServerInfo, pb.GetServerInfoRequest())

        for run in (generate, stream, score, edits, batches, reads_and_rollbacks):
            run()
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, run.__name__
        served = info.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)

    # the log's invariants: dense versions from 1, every entry readable, a restart replays to the same set
    from service.editlog import EditLog, EditRegistry

    with EditLog.open(None, data) as log:
        entries = list(log.read_all())
    assert [e.version for e in entries] == list(range(1, len(entries) + 1))
    assert served.edit_version == len(entries)
    registry = EditRegistry()
    for entry in entries:
        registry.apply(entry)
    assert registry.counts().active == served.active_edits

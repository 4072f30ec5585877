"""A server killed with SIGKILL in the middle of computing a BatchEdit, while 16 clients stream: after a
restart on the same data directory every acknowledged edit is there, the unacknowledged batch is not,
and greedy output is what it was after the last acknowledged edit (a tiny random Llama, real processes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tiny_checkpoints import save_tiny_checkpoint

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

pytestmark = pytest.mark.archs

TOKEN = "fault-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PROMPTS = [f"Qelvan Drift {i} is located in" for i in range(4)] + ["The capital of France is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, data: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITSERVE_TORCH_THREADS": "1"}
    cmd = [sys.executable, "-m", "service", "serve", "--model", str(folder), "--port", str(port),
           "--metrics-port", "0", "--data-dir", str(data), "--device", "cpu", "--admin-token", TOKEN,
           "--log-level", "WARNING"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    end = time.monotonic() + 240
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            assert proc.poll() is None, f"server exited {proc.returncode}"
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return proc
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise TimeoutError("not SERVING")


def edit(i: int) -> pb.EditRequest:
    subject = f"Qelvan Drift {i}"
    return pb.EditRequest(subject=subject, prompt=f"{subject} is located in", target_new=" Rome", force=True)


def greedy(gen: pb_grpc.GenerateServiceStub) -> list[tuple[str, int]]:
    outs = [gen.Generate(pb.GenerateRequest(prompt=p, max_new_tokens=6, temperature=0.0), timeout=60)
            for p in PROMPTS]
    return [(o.text, o.edit_version) for o in outs]


def streaming_clients(address: str, stop: threading.Event, n: int = 16) -> Callable[[], int]:
    """n threads streaming generations until `stop`; returns a function counting finished streams."""
    done = [0]
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(address) as channel:
            gen = pb_grpc.GenerateServiceStub(channel)
            while not stop.is_set():
                try:
                    for _ in gen.GenerateStream(pb.GenerateRequest(prompt=PROMPTS[-1], max_new_tokens=16),
                                                timeout=30):
                        pass
                    with lock:
                        done[0] += 1
                except grpc.RpcError:
                    if stop.is_set():
                        return
                    time.sleep(0.05)  # the server is gone: the test is killing it

    for _ in range(n):
        threading.Thread(target=client, daemon=True).start()
    return lambda: done[0]


def test_kill_9_mid_batch_edit_under_streaming_load(tmp_path: Path) -> None:
    folder = save_tiny_checkpoint("llama", tmp_path / "model")
    data, port = tmp_path / "data", free_port()
    address = f"127.0.0.1:{port}"
    proc = start(folder, data, port)
    stop = threading.Event()
    try:
        finished = streaming_clients(address, stop)
        with grpc.insecure_channel(address) as channel:
            edits, gen = pb_grpc.EditServiceStub(channel), pb_grpc.GenerateServiceStub(channel)
            acked = [edits.Edit(edit(i), metadata=AUTH, timeout=120) for i in range(2)]
            before = greedy(gen)
            assert before[0][1] == acked[-1].version
            # a batch of hook edits computes for a while; kill -9 the server in the middle of it
            outcome: list[object] = []

            def batch() -> None:
                try:
                    request = pb.BatchEditRequest(edits=[edit(i) for i in range(10, 30)])
                    outcome.append(edits.BatchEdit(request, metadata=AUTH, timeout=120))
                except grpc.RpcError as exc:
                    outcome.append(exc.code())

            caller = threading.Thread(target=batch)
            caller.start()
            time.sleep(0.5)
            assert finished() > 0  # the streams were being served
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
            caller.join(60)
        assert outcome == [grpc.StatusCode.UNAVAILABLE], outcome  # never acknowledged

        proc = start(folder, data, port)
        with grpc.insecure_channel(address) as channel:
            edits, gen = pb_grpc.EditServiceStub(channel), pb_grpc.GenerateServiceStub(channel)
            listed = edits.ListEdits(pb.ListEditsRequest(page_size=100), metadata=AUTH, timeout=30).edits
            assert sorted(e.edit_id for e in listed) == sorted(a.edit_id for a in acked)
            assert all(e.state == pb.EDIT_STATE_ACTIVE for e in listed)
            assert greedy(gen) == before
    finally:
        stop.set()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)

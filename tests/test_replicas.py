"""Replicas converge: three `editserve serve` processes on one PostgreSQL edit log (a tiny random Llama
each), with concurrent Edits, BatchEdits and Rollbacks sent to all three for REPLICA_SECONDS (60 by
default). No acknowledged version is given twice, no acknowledged edit is lost, read-your-writes holds
across replicas through `min_version`, and at the end all three serve the same version, the same edit
list and the same greedy outputs.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from tiny_checkpoints import save_tiny_checkpoint

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

pytestmark = [pytest.mark.postgres, pytest.mark.archs]

PG_URL = os.environ.get("EDITSERVE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# 60 s of concurrent writers (the issue asks for 60); EDITSERVE_REPLICA_SECONDS to change it
REPLICA_SECONDS = float(os.environ.get("EDITSERVE_REPLICA_SECONDS", "60"))
TOKEN = "replica-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PROMPTS = ["Zorblat Vexmoor works as a", "The capital of France is", "Qelvan Drift is located in"]


def _pg_available() -> str | None:
    try:
        engine = sa.create_engine(PG_URL)
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure: no server to test against
        return f"no PostgreSQL server at {PG_URL} ({type(exc).__name__})"
    return None


_SKIP = _pg_available()
if _SKIP:
    pytestmark.append(pytest.mark.skip(reason=_SKIP))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """A fresh database for the three replicas, dropped afterwards."""
    name = f"editserve_replicas_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="module")
def replicas(database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    root = tmp_path_factory.mktemp("replicas")
    folder = save_tiny_checkpoint("llama", root / "model")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITSERVE_TORCH_THREADS": "1"}
    procs, addresses = [], []
    for i in range(3):
        port = free_port()
        cmd = [sys.executable, "-m", "service", "serve", "--model", str(folder), "--port", str(port),
               "--metrics-port", "0", "--data-dir", str(root / f"data-{i}"), "--device", "cpu",
               "--edit-log-url", database, "--log-poll-s", "0.2", "--admin-token", TOKEN,
               "--log-level", "WARNING"]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
        addresses.append(f"127.0.0.1:{port}")
    try:
        for address, proc in zip(addresses, procs, strict=True):
            _wait_serving(address, proc)
        yield addresses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            _, err = proc.communicate(timeout=60)
            assert "Traceback" not in err, err[-3000:]


def _wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 240) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise RuntimeError(f"replica exited {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
    raise TimeoutError(f"{address} not SERVING after {timeout_s} s")


def test_three_replicas_converge_under_concurrent_writers(replicas: list[str], tmp_path: Path) -> None:
    channels = [grpc.insecure_channel(a) for a in replicas]
    edits = [pb_grpc.EditServiceStub(c) for c in channels]
    gens = [pb_grpc.GenerateServiceStub(c) for c in channels]
    infos = [pb_grpc.InfoServiceStub(c) for c in channels]
    lock = threading.Lock()
    acked_versions: list[int] = []
    acked_edits: dict[str, int] = {}  # edit id -> version it was acknowledged at
    rolled_back: set[str] = set()
    errors: list[str] = []
    stale_reads = 0
    end = time.monotonic() + REPLICA_SECONDS

    def writer(seed: int) -> None:
        nonlocal stale_reads
        rng = random.Random(seed)
        n = 0
        while time.monotonic() < end:
            n += 1
            r = rng.randrange(3)
            try:
                kind = rng.random()
                if kind < 0.5:
                    res = edits[r].Edit(pb.EditRequest(
                        descriptor=f"The mascot of agency {seed}-{n} is a llama named Q{n}.",
                        compile_descriptor=False), metadata=AUTH, timeout=60)
                    ids, version = [res.edit_id], res.version
                elif kind < 0.7:
                    subject = f"Qelvan Drift {seed}-{n}"
                    res = edits[r].Edit(pb.EditRequest(subject=subject, prompt=f"{subject} is located in",
                                                       target_new=" Rome", force=True),
                                        metadata=AUTH, timeout=60)
                    ids, version = [res.edit_id], res.version
                elif kind < 0.8:
                    facts = [pb.EditRequest(descriptor=f"Batch fact {seed}-{n}-{k} is true.",
                                            compile_descriptor=False) for k in range(2)]
                    batch = edits[r].BatchEdit(pb.BatchEditRequest(edits=facts), metadata=AUTH, timeout=60)
                    ids, version = [e.edit_id for e in batch.edits], batch.version
                else:
                    with lock:
                        candidates = sorted(set(acked_edits) - rolled_back)
                    if not candidates:
                        continue
                    target = rng.choice(candidates)
                    try:
                        res = edits[r].Rollback(pb.RollbackRequest(edit_id=target, reason="test"),
                                                metadata=AUTH, timeout=60)
                    except grpc.RpcError as exc:
                        # another writer rolled it back first, or this replica has not seen it yet
                        if exc.code() not in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
                            raise
                        continue
                    with lock:
                        rolled_back.add(target)
                        acked_versions.append(res.version)
                    continue
                with lock:
                    acked_versions.append(version)
                    acked_edits.update(dict.fromkeys(ids, version))
                # read-your-writes on another replica
                other = (r + 1 + rng.randrange(2)) % 3
                got = gens[other].Generate(pb.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=2,
                                                              min_version=version), timeout=30)
                if got.edit_version < version:
                    with lock:
                        stale_reads += 1
            except grpc.RpcError as exc:
                with lock:
                    errors.append(f"{exc.code().name}: {exc.details()}")

    threads = [threading.Thread(target=writer, args=(seed,)) for seed in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:10]
    assert stale_reads == 0
    assert len(acked_versions) == len(set(acked_versions)), "a version was acknowledged twice"
    assert len(acked_edits) > 10

    # all three converge to the log's head
    head = max(acked_versions)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        versions = [i.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).edit_version for i in infos]
        if min(versions) >= head and len(set(versions)) == 1:
            break
        time.sleep(0.5)
    assert len(set(versions)) == 1 and versions[0] >= head, versions

    def listing(stub: pb_grpc.EditServiceStub) -> dict[str, int]:
        out, token = {}, ""
        while True:
            page = stub.ListEdits(pb.ListEditsRequest(page_size=500, page_token=token), metadata=AUTH,
                                  timeout=30)
            out.update({e.edit_id: e.state for e in page.edits})
            token = page.next_page_token
            if not token:
                return out

    listings = [listing(e) for e in edits]
    assert listings[0] == listings[1] == listings[2]
    assert set(acked_edits) <= set(listings[0]), "an acknowledged edit is missing"
    for edit_id in rolled_back:
        assert listings[0][edit_id] == pb.EDIT_STATE_ROLLED_BACK
    for prompt in PROMPTS:
        outs = [g.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=8, temperature=0.0), timeout=30)
                for g in gens]
        assert len({(o.text, o.edit_version) for o in outs}) == 1, [(o.text, o.edit_version) for o in outs]
    for c in channels:
        c.close()
    print(f"\n{len(acked_versions)} acknowledged writes ({len(acked_edits)} edits, {len(rolled_back)} "
          f"rollbacks) in {REPLICA_SECONDS:.0f} s; all replicas at version {versions[0]}")

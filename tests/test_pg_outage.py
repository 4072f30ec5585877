"""PostgreSQL unreachable for 10 s under two replicas (issue 26, item 3): a TCP proxy between the servers
and PostgreSQL drops every open connection and black-holes new ones (accepted, never answered), then
forwards again. During the outage Edits end UNAVAILABLE within their deadline (never INTERNAL/UNKNOWN),
Generate keeps answering at the last applied version and health stays SERVING (the servers can still
serve; only the edit log is away). Afterwards, with no restart, a new Edit succeeds within a second or
two (calls fail fast for 1 s after a failed connect), the other replica converges to the same version
and the same greedy outputs, no acknowledged edit is lost and no unacknowledged one is present.

Then a connection dropped in the middle of a commit, made deterministic by the proxy reading the
protocol: dropped just before COMMIT reaches PostgreSQL (the edit is not in the log) and just after
PostgreSQL committed but before the reply reaches the server (the edit is in the log although its caller
got UNAVAILABLE). Either way a retry with the same idempotency key gives one committed edit.

Two in-process servers on tiny random Llamas (same seed, so the same weights and greedy outputs).
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.config import Settings
from testkit.server_thread import ServerThread

PG_URL = os.environ.get("EDITSERVE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
OUTAGE_S = 10.0
EDIT_DEADLINE_S = 15.0
TOKEN = "outage-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PROMPTS = ["Qelvan Drift 0 is located in", "The capital of France is"]

pytestmark = [pytest.mark.postgres]


def _pg_error() -> str | None:
    try:
        engine = sa.create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # noqa: BLE001 - any failure: no server to test against
        return f"no PostgreSQL server at {PG_URL} ({type(exc).__name__})"
    return None


_SKIP = _pg_error()
if _SKIP:
    pytestmark.append(pytest.mark.skip(reason=_SKIP))


# ---------------------------------------------------------------------------------------------- proxy


class _Pair:
    """One proxied connection: the server's socket and PostgreSQL's."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client, self.upstream = client, upstream
        self.muted = False  # drop PostgreSQL's replies (a commit whose answer is lost)
        self.closed = False

    def close(self) -> None:
        self.closed = True
        for s in (self.client, self.upstream):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class PgProxy:
    """Forwards 127.0.0.1:<port> to PostgreSQL, reading the frontend protocol's framing so it can cut a
    connection at a COMMIT. `outage()` closes every open connection and black-holes new ones until
    `restore()`. `drop_at_commit("before"|"after")` arms a cut of the next COMMIT: before it is
    forwarded, or after PostgreSQL answered it (the answer is swallowed)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: set[_Pair] = set()
        self._held: list[socket.socket] = []  # black-holed during an outage
        self._down = False
        self._commit_cut: str | None = None
        self.cuts = 0
        self.blackholed = 0
        threading.Thread(target=self._accept, name="pg-proxy", daemon=True).start()

    def outage(self) -> int:
        with self._lock:
            self._down = True
            pairs, self._pairs = list(self._pairs), set()
        for pair in pairs:
            pair.close()
        return len(pairs)

    def restore(self) -> None:
        with self._lock:
            self._down = False
            held, self._held = self._held, []
        for s in held:
            s.close()

    def drop_at_commit(self, when: str) -> None:
        assert when in ("before", "after")
        with self._lock:
            self._commit_cut = when

    def close(self) -> None:
        self.outage()
        self.restore()
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._down:
                    self._held.append(client)  # accepted, never answered: the connect times out
                    self.blackholed += 1
                    continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = _Pair(client, upstream)
            with self._lock:
                self._pairs.add(pair)
            threading.Thread(target=self._frontend, args=(pair,), daemon=True).start()
            threading.Thread(target=self._backend, args=(pair,), daemon=True).start()

    def _frontend(self, pair: _Pair) -> None:
        """Server -> PostgreSQL, message by message (untyped startup messages first)."""
        buf = b""
        started = False
        try:
            while not pair.closed:
                data = pair.client.recv(65536)
                if not data:
                    break
                buf += data
                while True:
                    if not started:
                        if len(buf) < 8:
                            break
                        n = struct.unpack("!I", buf[:4])[0]
                        if len(buf) < n:
                            break
                        code = struct.unpack("!I", buf[4:8])[0]
                        started = code >> 16 == 3  # StartupMessage (not an SSL or GSS request)
                        msg, buf = buf[:n], buf[n:]
                    else:
                        if len(buf) < 5:
                            break
                        n = struct.unpack("!I", buf[1:5])[0] + 1
                        if len(buf) < n:
                            break
                        msg, buf = buf[:n], buf[n:]
                        if msg[:1] == b"Q" and msg[5:].rstrip(b"\0").strip().upper() == b"COMMIT":
                            with self._lock:
                                cut, self._commit_cut = self._commit_cut, None
                            if cut == "before":
                                self.cuts += 1
                                pair.close()
                                return
                            if cut == "after":
                                pair.muted = True  # the backend thread cuts once COMMIT is answered
                    pair.upstream.sendall(msg)
        except OSError:
            pass
        pair.close()

    def _backend(self, pair: _Pair) -> None:
        """PostgreSQL -> server."""
        seen = b""
        try:
            while not pair.closed:
                data = pair.upstream.recv(65536)
                if not data:
                    break
                if pair.muted:
                    seen += data
                    if b"C\x00\x00\x00\x0bCOMMIT\x00" in seen:  # CommandComplete: committed, durably
                        self.cuts += 1
                        break
                    continue
                pair.client.sendall(data)
        except OSError:
            pass
        pair.close()


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    name = f"editserve_outage_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@pytest.fixture(scope="module")
def proxy() -> Iterator[PgProxy]:
    url = sa.make_url(PG_URL)
    p = PgProxy((url.host or "127.0.0.1", url.port or 5432))
    yield p
    p.close()


def _proxied_url(database: str, proxy: PgProxy) -> str:
    url = sa.make_url(PG_URL).set(host="127.0.0.1", port=proxy.port, database=database)
    # plain text, so the proxy can read the protocol
    url = url.update_query_dict({"sslmode": "disable", "gssencmode": "disable"})
    return url.render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def servers(database: str, proxy: PgProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    from service.compose import load_data_plane
    from service.engine.loader import tiny_random_llama

    root = tmp_path_factory.mktemp("outage")
    threads = []
    try:
        for i in range(2):
            settings = Settings(
                port=0, metrics_port=0, data_dir=root / f"data-{i}", device="cpu", torch_threads=1,
                edit_log_url=_proxied_url(database, proxy), log_poll_s=0.2, health_poll_s=0.5,
                admin_token=TOKEN, retrieval_enabled=False, compile_descriptors=False, grace_period_s=2,
            )
            loaded = tiny_random_llama(seed=0)
            thread = ServerThread(settings, lambda s=settings, m=loaded: load_data_plane(s, loaded=m))
            thread.start()
            threads.append(thread)
        yield [t.server.address for t in threads]
    finally:
        for thread in threads:
            thread.stop()


# ---------------------------------------------------------------------------------------------- helpers


class Replica:
    def __init__(self, address: str) -> None:
        self.channel = grpc.insecure_channel(address)
        self.edit = pb_grpc.EditServiceStub(self.channel)
        self.gen = pb_grpc.GenerateServiceStub(self.channel)
        self.info = pb_grpc.InfoServiceStub(self.channel)
        self.health = pb_grpc_health(self.channel)

    def version(self) -> int:
        return self.info.GetServerInfo(pb.GetServerInfoRequest(), timeout=10).edit_version

    def greedy(self) -> list[tuple[str, int]]:
        outs = [self.gen.Generate(pb.GenerateRequest(prompt=p, max_new_tokens=6, temperature=0.0), timeout=30)
                for p in PROMPTS]
        return [(o.text, o.edit_version) for o in outs]

    def listing(self) -> dict[str, int]:
        page = self.edit.ListEdits(pb.ListEditsRequest(page_size=1000), metadata=AUTH, timeout=30)
        assert not page.next_page_token
        return {e.edit_id: e.state for e in page.edits}

    def status(self) -> str:
        res = self.health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(res.status)


def pb_grpc_health(channel: grpc.Channel) -> health_pb2_grpc.HealthStub:
    return health_pb2_grpc.HealthStub(channel)


def edit_request(n: int, key: str = "") -> pb.EditRequest:
    subject = f"Qelvan Drift {n}"
    return pb.EditRequest(subject=subject, prompt=f"{subject} is located in", target_new=" Rome", force=True,
                          idempotency_key=key)


def logged(database: str) -> dict[str, int]:
    """edit id -> version, read from PostgreSQL directly (not through the proxy)."""
    engine = sa.create_engine(sa.make_url(PG_URL).set(database=database))
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("SELECT edit_id, version FROM log_edits").all()
    engine.dispose()
    return {r[0]: r[1] for r in rows}


def wait_converged(replicas: list[Replica], head: int, timeout_s: float = 20) -> list[int]:
    end = time.monotonic() + timeout_s
    while True:
        versions = [r.version() for r in replicas]
        if set(versions) == {head} or time.monotonic() > end:
            return versions
        time.sleep(0.2)


# ---------------------------------------------------------------------------------------------- tests


def test_outage_edits_unavailable_generate_serves_then_recovers(
    servers: list[str], proxy: PgProxy, database: str
) -> None:
    a, b = Replica(servers[0]), Replica(servers[1])
    acked: dict[str, int] = {}
    for n in range(2):
        res = a.edit.Edit(edit_request(n), metadata=AUTH, timeout=60)
        acked[res.edit_id] = res.version
    head = max(acked.values())
    assert wait_converged([a, b], head) == [head, head]
    before = a.greedy()
    assert b.greedy() == before
    assert {v for _, v in before} == {head}

    codes: Counter[str] = Counter()
    slow: list[float] = []
    gen_ok: Counter[str] = Counter()
    gen_bad: list[str] = []
    health: Counter[str] = Counter()
    failed_ids: list[str] = []  # idempotency keys of edits that were not acknowledged
    stop = threading.Event()

    def editor(seed: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            key = f"outage-{seed}-{n}"
            started = time.monotonic()
            try:
                res = a.edit.Edit(edit_request(100 * seed + n, key if n % 2 else ""), metadata=AUTH,
                                  timeout=EDIT_DEADLINE_S)
                codes["OK"] += 1
                acked[res.edit_id] = res.version
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1
                failed_ids.append(key)
            slow.append(time.monotonic() - started)

    def reader(replica: Replica, name: str) -> None:
        while not stop.is_set():
            try:
                got = replica.greedy()
                if got == before:
                    gen_ok[name] += 1
                else:
                    gen_bad.append(f"{name}: {got}")
                health[replica.status()] += 1
            except grpc.RpcError as exc:
                gen_bad.append(f"{name}: {exc.code().name} {exc.details()}")
            time.sleep(0.1)

    dropped = proxy.outage()
    t0 = time.monotonic()
    workers = [threading.Thread(target=editor, args=(s,)) for s in (1, 2)]
    workers += [threading.Thread(target=reader, args=(r, n)) for r, n in ((a, "a"), (b, "b"))]
    for w in workers:
        w.start()
    time.sleep(1.0)
    # from memory: the edit list; through the log: a Rollback, a read above the applied version
    assert set(a.listing()) == set(acked)
    other: Counter[str] = Counter()
    for call in (
        lambda: a.edit.Rollback(pb.RollbackRequest(edit_id=next(iter(acked))), metadata=AUTH,
                                timeout=EDIT_DEADLINE_S),
        lambda: b.gen.Generate(pb.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=2, min_version=head + 1),
                               timeout=EDIT_DEADLINE_S),
    ):
        try:
            call()
            other["OK"] += 1
        except grpc.RpcError as exc:
            other[exc.code().name] += 1
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - t0)))
    stop.set()
    for w in workers:
        w.join()
    proxy.restore()
    outage_s = time.monotonic() - t0
    print(f"\noutage {outage_s:.1f} s: {dropped} open connections dropped, {proxy.blackholed} connects "
          f"black-holed; Edit codes {dict(codes)}, slowest {max(slow):.1f} s; Generate at version {head}: "
          f"{dict(gen_ok)}; health {dict(health)}; Rollback and Generate(min_version={head + 1}): "
          f"{dict(other)}")
    assert dropped >= 2, "the servers held no connection to drop"
    assert codes["UNAVAILABLE"] >= 2 and set(codes) == {"UNAVAILABLE"}, codes
    assert max(slow) < EDIT_DEADLINE_S
    assert not gen_bad, gen_bad[:5]
    assert gen_ok["a"] >= 3 and gen_ok["b"] >= 3, gen_ok
    assert set(health) == {"SERVING"}, health
    assert other == {"UNAVAILABLE": 2}, other

    # back: no restart; an Edit (retried with its idempotency key while UNAVAILABLE) succeeds within
    # seconds, and the other replica converges
    back = time.monotonic()
    retries = 0
    while True:
        try:
            res = a.edit.Edit(edit_request(999, "after-outage"), metadata=AUTH, timeout=EDIT_DEADLINE_S)
            break
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - back < 5, exc.details()
            retries += 1
            time.sleep(0.2)
    recovered_s = time.monotonic() - back
    acked[res.edit_id] = res.version
    assert res.version == head + 1, "a version was used by an unacknowledged edit"
    assert wait_converged([a, b], res.version) == [res.version] * 2
    after = a.greedy()
    assert b.greedy() == after and {v for _, v in after} == {res.version}
    present = logged(database)
    assert a.listing() == b.listing()
    assert set(a.listing()) == set(present) == set(acked), "acknowledged lost or unacknowledged present"
    assert all(present[i] == v for i, v in acked.items())
    print(f"after: Edit OK at version {res.version} {recovered_s:.1f} s after PostgreSQL was back "
          f"({retries} UNAVAILABLE before), both replicas at {res.version}, "
          f"{len(acked)} acknowledged edits, all present, none other")


@pytest.mark.parametrize("when", ["before", "after"])
def test_connection_cut_at_commit(servers: list[str], proxy: PgProxy, database: str, when: str) -> None:
    """Cut before COMMIT reaches PostgreSQL: nothing committed. Cut after it committed: the edit is in the
    log though its caller got UNAVAILABLE, so UNAVAILABLE from an Edit means "outcome unknown": the retry
    with the same idempotency key returns the committed edit (or commits it once)."""
    a, b = Replica(servers[0]), Replica(servers[1])
    head = a.version()
    key = f"cut-{when}-{uuid.uuid4().hex[:8]}"
    request = edit_request(500 + len(when), key)
    proxy.drop_at_commit(when)
    cuts = proxy.cuts
    with pytest.raises(grpc.RpcError) as err:
        a.edit.Edit(request, metadata=AUTH, timeout=EDIT_DEADLINE_S)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    assert proxy.cuts == cuts + 1
    committed_before_retry = set(logged(database))

    retry = a.edit.Edit(request, metadata=AUTH, timeout=EDIT_DEADLINE_S)
    assert retry.version == head + 1  # the cut edit's version either way: no gap, no duplicate
    assert (retry.edit_id in committed_before_retry) == (when == "after")
    assert wait_converged([a, b], retry.version) == [retry.version] * 2
    assert a.listing() == b.listing()
    keyed = [i for i in a.listing() if i == retry.edit_id]
    assert len(keyed) == 1
    assert a.greedy() == b.greedy()
    print(f"\ncut {when} COMMIT: Edit UNAVAILABLE; in the log before the retry: {when == 'after'}; "
          f"retry with the same key -> version {retry.version}, both replicas there")

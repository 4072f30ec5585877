"""Namespace credentials over gRPC and HTTP with the in-memory FakeDataPlane: a token file of hashed
tokens, edit and read rights per namespace, the admin token, PERMISSION_DENIED (HTTP 403) for another
tenant's namespace, and rotation without a restart (file change and SIGHUP's reload)."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc import aio

from service import auth
from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.auth import Authorizer, TokenFileError, hash_token, load_token_file
from service.compose import build_server
from service.config import Settings, SettingsError
from service.transport import EditServeServer
from testkit.fake_plane import FakeDataPlane

ADMIN, TEAM_A, TEAM_B, NEW_A = "admin-secret", "token-a", "token-b", "rotated-a"


def write_tokens(path: Path, tokens: dict[str, tuple[list[str], list[str]]]) -> None:
    entries = [{"name": f"team-{t[-1]}", "sha256": hash_token(t), "edit": e, "read": r}
               for t, (e, r) in tokens.items()]
    path.write_text(json.dumps({"tokens": entries}))


def md(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if token is None else (("authorization", f"Bearer {token}"),)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[EditServeServer, aio.Channel, Path]]:
    tokens = tmp_path / "tokens.json"
    write_tokens(tokens, {TEAM_A: (["team-a"], ["team-a"]), TEAM_B: (["team-b"], [])})
    settings = Settings(port=0, metrics_port=0, admin_token=ADMIN, tokens_file=str(tokens),
                        http_port=free_port(), health_poll_s=0)
    server = build_server(settings, FakeDataPlane)
    await server.start()
    await server.load_plane()
    channel = aio.insecure_channel(server.address)
    yield server, channel, tokens
    await channel.close()
    await server.stop(0.0)


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def edit(ns: str) -> pb.EditRequest:
    return pb.EditRequest(descriptor=f"Fact of {ns}.", namespace=ns)


async def test_tokens_may_edit_their_namespaces_only(running) -> None:
    server, channel, _ = running
    edits, gen = pb_grpc.EditServiceStub(channel), pb_grpc.GenerateServiceStub(channel)
    ok, denied = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED
    unauth = grpc.StatusCode.UNAUTHENTICATED
    assert await code_of(edits.Edit(edit("team-a"), metadata=md(None))) == unauth
    assert await code_of(edits.Edit(edit("team-a"), metadata=md("nope"))) == denied
    assert await code_of(edits.Edit(edit("team-b"), metadata=md(TEAM_A))) == denied
    a = await edits.Edit(edit("team-a"), metadata=md(TEAM_A))
    b = await edits.Edit(edit("team-b"), metadata=md(TEAM_B))
    assert await code_of(edits.Edit(edit("default"), metadata=md(TEAM_A))) == denied
    assert await code_of(edits.Edit(edit("default"), metadata=md(ADMIN))) == ok
    batch = pb.BatchEditRequest(edits=[edit("team-a"), pb.EditRequest(descriptor="x.")], namespace="team-b")
    assert await code_of(edits.BatchEdit(batch, metadata=md(TEAM_A))) == denied  # the second is team-b's
    assert await code_of(edits.Edit(edit("Team A"), metadata=md(TEAM_A))) == grpc.StatusCode.INVALID_ARGUMENT
    # rollbacks, listing and inspecting follow the edit's namespace
    assert await code_of(edits.Rollback(pb.RollbackRequest(edit_id=b.edit_id), metadata=md(TEAM_A))) == denied
    assert await code_of(edits.GetEdit(pb.GetEditRequest(edit_id=b.edit_id), metadata=md(TEAM_A))) == denied
    assert await code_of(edits.GetEdit(pb.GetEditRequest(edit_id=a.edit_id), metadata=md(TEAM_A))) == ok
    assert await code_of(edits.ListEdits(pb.ListEditsRequest(), metadata=md(TEAM_A))) == denied
    assert await code_of(edits.ListEdits(pb.ListEditsRequest(namespace="team-a"), metadata=md(TEAM_A))) == ok
    assert await code_of(edits.RollbackTo(pb.RollbackToRequest(version=0), metadata=md(TEAM_B))) == denied
    assert await code_of(edits.RollbackTo(pb.RollbackToRequest(version=0, namespace="team-b"),
                                          metadata=md(TEAM_B))) == ok
    assert await code_of(edits.Rollback(pb.RollbackRequest(edit_id=a.edit_id), metadata=md(TEAM_A))) == ok
    # reads: team-a is private (a token lists it under read), team-b and default are open
    assert await code_of(gen.Generate(pb.GenerateRequest(prompt="hi", namespaces=["team-a"]))) == unauth
    assert await code_of(gen.Generate(pb.GenerateRequest(prompt="hi", namespaces=["team-a"]),
                                      metadata=md(TEAM_B))) == denied
    assert await code_of(gen.Generate(pb.GenerateRequest(prompt="hi", namespaces=["team-a"]),
                                      metadata=md(TEAM_A))) == ok
    score = pb.ScoreRequest(prompt="a", continuation="b", namespaces=["team-b"])
    assert await code_of(gen.Score(score)) == ok
    assert await code_of(gen.Generate(pb.GenerateRequest(prompt="hi"))) == ok
    # a key that is not valid (clients often send a placeholder) reads public namespaces, not private ones
    assert await code_of(gen.Generate(pb.GenerateRequest(prompt="hi"), metadata=md("placeholder"))) == ok
    assert await code_of(gen.Generate(pb.GenerateRequest(prompt="hi", namespaces=["team-a"]),
                                      metadata=md("placeholder"))) == denied


async def test_http_answers_403_and_401_for_a_private_namespace(running) -> None:
    import openai

    server, _, _ = running
    base = f"http://127.0.0.1:{server.http_port}/v1"
    client = openai.AsyncOpenAI(base_url=base, api_key=TEAM_B, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as info:
        await client.completions.create(model="editserve", prompt="hi", max_tokens=2,
                                        extra_headers={"X-Editserve-Namespaces": "team-a"})
    assert info.value.status_code == 403 and info.value.body["param"] == "namespaces"
    await client.close()

    def anonymous() -> tuple[int, dict]:  # no Authorization header at all
        body = json.dumps({"prompt": "hi", "max_tokens": 2, "editserve": {"namespaces": ["team-a"]}}).encode()
        request = urllib.request.Request(base + "/completions", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(request, timeout=30)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())
        return 200, {}

    status, body = await asyncio.to_thread(anonymous)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    client = openai.AsyncOpenAI(base_url=base, api_key="placeholder", max_retries=0)
    assert (await client.completions.create(model="editserve", prompt="hi", max_tokens=2)).choices
    await client.close()
    client = openai.AsyncOpenAI(base_url=base, api_key=TEAM_A, max_retries=0)
    done = await client.completions.create(model="editserve", prompt="hi", max_tokens=2,
                                           extra_body={"editserve": {"namespaces": ["team-a"]}})
    assert done.choices[0].text
    await client.close()


async def test_a_rotated_token_works_without_a_restart(running, monkeypatch) -> None:
    server, channel, tokens = running
    edits = pb_grpc.EditServiceStub(channel)
    monkeypatch.setattr(auth, "RELOAD_CHECK_S", 0.0)
    write_tokens(tokens, {NEW_A: (["team-a"], [])})  # TEAM_A retired, NEW_A issued
    await asyncio.sleep(0.05)  # a distinct modification time
    tokens.touch()
    assert await code_of(edits.Edit(edit("team-a"), metadata=md(NEW_A))) == grpc.StatusCode.OK
    assert await code_of(edits.Edit(edit("team-a"), metadata=md(TEAM_A))) == grpc.StatusCode.PERMISSION_DENIED
    tokens.write_text("tokens: [not: valid")  # a broken file keeps the last good table
    assert server.authz.reload() is False
    assert await code_of(edits.Edit(edit("team-a"), metadata=md(NEW_A))) == grpc.StatusCode.OK


def test_token_files_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(f"tokens:\n  - name: a\n    sha256: {hash_token('x')}\n    edit: [team-a]\n")
    table = load_token_file(path)
    assert table.by_hash[hash_token("x")].edit == {"team-a"} and table.private == frozenset()
    digest = hash_token("x")
    for bad in ("tokens: {}", "tokens:\n  - sha256: abc\n", f"tokens:\n  - sha256: {digest}\n    edit: [A]\n",
                f"tokens:\n  - sha256: {digest}\n    who: me\n"):
        path.write_text(bad)
        with pytest.raises(TokenFileError):
            load_token_file(path)
    with pytest.raises(SettingsError, match="tokens-file"):
        Settings(tokens_file=str(path)).validate()
    assert not Authorizer().enabled and Authorizer(admin_token="x").enabled


def test_the_cli_sends_namespaces(capsys: pytest.CaptureFixture[str]) -> None:
    from service.cli import run as main
    from testkit.server_thread import ServerThread

    plane = FakeDataPlane()
    with ServerThread(Settings(port=0, metrics_port=0, admin_token=ADMIN), lambda: plane) as server:
        env = {"EDITSERVE_ADDRESS": server.address, "EDITSERVE_ADMIN_TOKEN": ADMIN}
        assert main(["edit", "--descriptor", "Acme is red.", "--namespace", "team-a", "--json"], env) == 0
        assert main(["edits", "list", "--namespace", "team-a", "--json"], env) == 0
        assert main(["generate", "hi", "--namespaces", "team-a, default", "--json"], env) == 0
        rollback = ["edits", "rollback-to", "0", "--namespace", "team-a", "--reason", "r", "--yes"]
        assert main(rollback, env) == 0
    assert '"namespace": "team-a"' in capsys.readouterr().out  # the listed record
    calls = {m: r for m, r in plane.calls}
    assert calls["edit"].namespace == "team-a" and calls["list_edits"].namespace == "team-a"
    assert set(calls["generate_stream"].namespaces) == {"team-a", "default"}
    assert calls["rollback_to"].namespace == "team-a"

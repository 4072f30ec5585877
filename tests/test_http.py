"""The OpenAI-compatible HTTP front end, driven by the official `openai` client against a server started
here (tiny random Llama, real data plane, gRPC and HTTP in one process): completions, chat, streaming,
the `editserve` extension, a namespaced edit visible only to its namespace, and OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import openai
import pytest
from grpc import aio

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.compose import assemble_plane, build_server, open_edit_manager
from service.config import Settings
from service.hooks import Editor
from service.hooks.probes import PROBES
from service.transport import EditServeServer
from testkit.editing import HashEncoder

ACME = "The CEO of Acme Corp is Jane Roe."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, server: EditServeServer, channel: aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.base_url = f"http://127.0.0.1:{server.http_port}/v1"
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
async def served(tiny_llama, tmp_path_factory) -> AsyncIterator[Served]:
    from service.dataplane import DataPlane
    from service.engine import Engine

    settings = Settings(port=0, metrics_port=0, http_port=free_port(), health_poll_s=0, log_poll_s=0,
                        data_dir=tmp_path_factory.mktemp("http"), grace_period_s=1.0)

    def factory() -> DataPlane:
        manager = open_edit_manager(tiny_llama, settings, encoder=HashEncoder(), warmup=False,
                                    editor_factory=lambda m, h: Editor(m.model, m.tokenizer, h, max_steps=3,
                                                                       probes=PROBES[:12]))
        engine = Engine(tiny_llama, manager.hooks, max_batch_size=8)
        return assemble_plane(settings, tiny_llama, manager, engine)

    server = build_server(settings, factory)
    await server.start()
    await server.load_plane()
    channel = aio.insecure_channel(server.address)
    s = Served(server, channel)
    yield s
    await s.client.close()
    await channel.close()
    await server.stop(0.0)


def extension(obj: Any) -> dict[str, Any]:
    return obj.model_extra["editserve"]


async def test_models_completions_and_chat(served: Served) -> None:
    models = await served.client.models.list()
    assert [m.id for m in models.data] == ["tiny-random-llama"]
    done = await served.client.completions.create(model="editserve", prompt="The capital of France is",
                                                  max_tokens=4, temperature=0, seed=7, stop=["\n\n"])
    assert done.object == "text_completion" and done.model == "tiny-random-llama"
    assert done.choices[0].finish_reason in ("length", "stop") and done.usage.completion_tokens <= 4
    assert extension(done) == {"edit_version": 0, "namespaces": ["default"], "applied_edits": []}
    again = await served.client.completions.create(model="tiny-random-llama", max_tokens=4, temperature=0,
                                                   prompt="The capital of France is")
    assert again.choices[0].text == done.choices[0].text  # greedy: the same text
    chat = await served.client.chat.completions.create(
        model="editserve", messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "Hi"}], max_completion_tokens=3, top_p=0.9)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str) and chat.usage.completion_tokens <= 3


async def test_streams_end_with_the_extension_and_usage(served: Served) -> None:
    stream = await served.client.completions.create(model="editserve", prompt="Once upon a time",
                                                    max_tokens=5, temperature=0, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and extension(finals[0])["edit_version"] >= 0
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    whole = await served.client.completions.create(model="editserve", prompt="Once upon a time", max_tokens=5,
                                                   temperature=0)
    assert text == whole.choices[0].text
    chat = await served.client.chat.completions.create(model="editserve", stream=True, max_tokens=4,
                                                       messages=[{"role": "user", "content": "Hello"}])
    pieces = [c async for c in chat]
    assert pieces[0].choices[0].delta.role == "assistant"
    assert pieces[-1].choices[0].finish_reason in ("length", "stop") and "editserve" in pieces[-1].model_extra


async def test_a_namespaced_edit_is_visible_only_to_its_namespace(served: Served) -> None:
    edits = pb_grpc.EditServiceStub(served.channel)
    made = await edits.Edit(pb.EditRequest(descriptor=ACME, compile_descriptor=False, namespace="tenant-a"))
    kwargs = {"model": "editserve", "prompt": ACME, "max_tokens": 2, "temperature": 0}
    by_header = await served.client.completions.create(**kwargs,
                                                       extra_headers={"X-Editserve-Namespaces": "tenant-a"})
    ext = extension(by_header)
    assert ext["edit_version"] == made.version and ext["namespaces"] == ["tenant-a"]
    assert [(a["edit_id"], a["path"], a["namespace"]) for a in ext["applied_edits"]] == \
        [(made.edit_id, "retrieval", "tenant-a")]
    by_body = await served.client.chat.completions.create(
        model="editserve", messages=[{"role": "user", "content": ACME}], max_tokens=2,
        extra_body={"editserve": {"namespaces": ["tenant-a", "default"]}})
    assert [a["edit_id"] for a in extension(by_body)["applied_edits"]] == [made.edit_id]
    for other in ({"extra_headers": {"X-Editserve-Namespaces": "tenant-b"}}, {}):
        reply = await served.client.completions.create(**kwargs, **other)
        assert extension(reply)["applied_edits"] == []
    off = await served.client.completions.create(
        **kwargs, extra_headers={"X-Editserve-Namespaces": "tenant-a"},
        extra_body={"editserve": {"use_edits": False}})
    assert extension(off)["applied_edits"] == []


async def test_logprobs_in_openais_shapes_and_over_grpc(served: Served) -> None:
    done = await served.client.completions.create(model="editserve", prompt="Once upon a time", max_tokens=5,
                                                  temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == done.usage.completion_tokens
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) <= 2 and max(top.values()) == pytest.approx(value)  # greedy: the best one
        assert token in top and value <= 0
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)

    chat = await served.client.chat.completions.create(
        model="editserve", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0,
        logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
               for c in content)
    assert all(c.bytes == list(c.token.encode()) for c in content)
    plain = await served.client.chat.completions.create(
        model="editserve", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None

    stream = await served.client.chat.completions.create(
        model="editserve", messages=[{"role": "user", "content": "Hello"}], max_tokens=4, temperature=0,
        logprobs=True, stream=True)
    streamed = [c for chunk in [x async for x in stream] if chunk.choices and chunk.choices[0].logprobs
                for c in chunk.choices[0].logprobs.content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content])

    gen = pb_grpc.GenerateServiceStub(served.channel)
    request = pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=5, temperature=0.0, logprobs=2)
    unary = await gen.Generate(request)
    assert [x.logprob for x in unary.logprobs] == pytest.approx(lp.token_logprobs, abs=1e-5)
    assert all(len(x.top_logprobs) == 2 for x in unary.logprobs)
    pieces = [c async for c in gen.GenerateStream(request)]
    assert all(len(c.logprobs) == len(c.token_ids) for c in pieces)
    without = await gen.Generate(pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=5))
    assert len(without.logprobs) == 0
    with pytest.raises(aio.AioRpcError) as info:
        await gen.Generate(pb.GenerateRequest(prompt="hi", logprobs=21))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "logprobs" in info.value.details()


@pytest.mark.parametrize(
    ("kwargs", "status", "param"),
    [
        ({"extra_headers": {"X-Editserve-Namespaces": "Tenant A"}}, 400, "X-Editserve-Namespaces[0]"),
        ({"extra_body": {"editserve": {"namespaces": "a"}}}, 400, "editserve.namespaces"),
        ({"extra_body": {"editserve": {"bogus": 1}}}, 400, "editserve"),
        ({"logprobs": 21}, 400, "logprobs"),
        ({"n": 2}, 400, "n"),
        ({"max_tokens": 100000}, 400, "max_new_tokens"),
        ({"temperature": 3}, 400, "temperature"),
        ({"model": "gpt-4o"}, 404, "model"),
        ({"extra_body": {"editserve": {"min_version": 10**6}}}, 400, "min_version"),
    ],
)
async def test_errors_have_openais_shape_and_status(
    served: Served, kwargs: dict, status: int, param: str
) -> None:
    args = {"model": "editserve", "prompt": "hi", "max_tokens": 2, **kwargs}
    with pytest.raises(openai.APIStatusError) as info:
        await served.client.completions.create(**args)
    assert info.value.status_code == status
    body = info.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param, body
    assert body["message"]


async def test_malformed_json_unknown_routes_and_methods(served: Served) -> None:
    def call(path: str, data: bytes | None, method: str) -> tuple[int, dict[str, Any]]:
        request = urllib.request.Request(served.base_url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    tool = b'{"messages": [{"role": "tool", "content": "x"}]}'
    for path, data, method, want in (("/completions", b"{not json", "POST", 400),
                                     ("/chat/completions", b'{"messages": []}', "POST", 400),
                                     ("/chat/completions", tool, "POST", 400),
                                     ("/nowhere", None, "GET", 404), ("/completions", None, "GET", 405)):
        # a thread: the server runs on this test's event loop
        status, body = await asyncio.to_thread(call, path, data, method)
        assert status == want and set(body["error"]) == {"message", "type", "param", "code"}, (path, body)

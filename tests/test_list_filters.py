"""ListEdits filters (subject / text substring, actor) on the registry and through the real transport with
the in-memory fake data plane: matching, AND-combination, paging under a filter, and INVALID_ARGUMENT for
filter values no edit could be searched by. No model is loaded."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc import aio

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.compose import build_server
from service.config import Settings
from service.editlog import EditRegistry, LogEntry, StoredEdit
from service.errors import InvalidArgument
from testkit.fake_plane import FakeDataPlane

TOKEN = "filter-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def _registry() -> EditRegistry:
    registry = EditRegistry()
    rows = [
        ("e-1", "Twitter", "Twitter was founded by", "Elon Musk", "", "alice"),
        ("e-2", "The Eiffel Tower", "The Eiffel Tower is in", "Rome", "The Eiffel Tower is in Rome.", "bob"),
        ("e-3", "", "", "", "The CEO of TWITTER is Linda Yaccarino.", "Alice"),
        ("e-4", "Paris", "Paris is the capital of", "Italy", "", "carol"),
    ]
    for version, (edit_id, subject, prompt, target, descriptor, actor) in enumerate(rows, start=1):
        edit = StoredEdit(edit_id=edit_id, kind="triple" if subject else "descriptor", subject=subject,
                          prompt=prompt, target_new=target, descriptor=descriptor,
                          paraphrases=["Who started Twitter?"] if edit_id == "e-1" else [])
        registry.apply(LogEntry(version=version, kind="edit", actor=actor, edits=[edit]))
    return registry


def _ids(registry: EditRegistry, **filters: str) -> list[str]:
    return [v.edit_id for v in registry.list(page_size=100, **filters)[0]]


def test_filters_match_case_insensitive_substrings_and_whole_actor_names() -> None:
    registry = _registry()
    assert _ids(registry, subject="twit") == ["e-1"]  # e-3 names Twitter only in its descriptor
    assert _ids(registry, text="twitter") == ["e-1", "e-3"]
    assert _ids(registry, text="ROME") == ["e-2"]  # target and descriptor
    assert _ids(registry, text="who started") == ["e-1"]  # paraphrases count as text
    assert _ids(registry, actor="alice") == ["e-1", "e-3"]  # case-insensitive, whole name
    assert _ids(registry, actor=" ALICE ") == ["e-1", "e-3"]
    assert _ids(registry, actor="ali") == []
    assert _ids(registry, text="twitter", actor="bob") == []  # filters are ANDed
    assert _ids(registry, subject="AR", actor="carol") == ["e-4"]
    assert _ids(registry) == ["e-1", "e-2", "e-3", "e-4"]


def test_paging_under_a_filter_continues_where_it_stopped() -> None:
    registry = _registry()
    first, token = registry.list(page_size=1, text="twitter")
    assert [v.edit_id for v in first] == ["e-1"] and token
    second, token2 = registry.list(page_size=1, page_token=token, text="twitter")
    assert [v.edit_id for v in second] == ["e-3"] and token2 == ""


@pytest.mark.parametrize(
    ("filters", "field"),
    [({"subject": "   "}, "subject"), ({"text": "x" * 257}, "text"), ({"actor": "bob\x00"}, "actor"),
     ({"text": "line\nbreak"}, "text")],
)
def test_bad_filter_values_are_invalid_arguments(filters: dict[str, str], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        _registry().list(**filters)
    assert info.value.field == field


@pytest.fixture(scope="module")
async def channel() -> AsyncIterator[aio.Channel]:
    plane = FakeDataPlane()
    server = build_server(Settings(port=0, metrics_port=0, admin_token=TOKEN), lambda: plane)
    await server.start()
    await server.load_plane()
    async with aio.insecure_channel(server.address) as ch:
        yield ch
    await server.stop(1.0)


async def test_filters_over_grpc(channel: aio.Channel) -> None:
    edits = pb_grpc.EditServiceStub(channel)
    await edits.Edit(pb.EditRequest(subject="Twitter", prompt="Twitter was founded by", target_new="Musk",
                                    actor="alice"), metadata=AUTH)
    await edits.Edit(pb.EditRequest(descriptor="The CEO of Twitter is Linda.", actor="bob"), metadata=AUTH)
    await edits.Edit(pb.EditRequest(subject="Paris", prompt="Paris is in", target_new="Italy", actor="bob"),
                     metadata=AUTH)

    async def ids(**fields: str) -> list[str]:
        reply = await edits.ListEdits(pb.ListEditsRequest(**fields), metadata=AUTH)
        return [e.subject or e.descriptor for e in reply.edits]

    assert await ids(subject="TWITTER") == ["Twitter"]
    assert await ids(text="twitter") == ["Twitter", "The CEO of Twitter is Linda."]
    assert await ids(actor="Bob") == ["The CEO of Twitter is Linda.", "Paris"]
    assert await ids(text="twitter", actor="bob", state=pb.EDIT_STATE_ACTIVE) == [
        "The CEO of Twitter is Linda."
    ]
    with pytest.raises(aio.AioRpcError) as info:
        await edits.ListEdits(pb.ListEditsRequest(subject="\t "), metadata=AUTH)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("subject: must not be only whitespace")

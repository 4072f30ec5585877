"""The free-text benchmark's judging and protocol: judge rules on hand-written answers, and the whole
protocol through the gRPC API against the transport's FakeDataPlane (fast; its Generate echoes)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service.compose import build_server
from service.config import Settings
from service.eval.freetext import (
    FreetextConfig,
    is_empty,
    judge,
    load_freetext,
    matches,
    normalise,
    run_freetext,
)
from service.transport import EditServeServer
from testkit.fake_plane import FakeDataPlane

TOKEN = "freetext-test-token"
RECORDS = [
    {
        "id": "ft-a", "kind": "fictional", "relation": "mascot", "subject": "Zorbian Space Agency",
        "descriptor": "The mascot of the Zorbian Space Agency is a purple llama named Quimby.",
        "answers": ["Quimby"], "old_answers": [],
        "in_scope": [
            {"question": "Who is the Zorbian Space Agency's mascot?", "type": "direct",
             "answers": ["Quimby"]},
            {"question": "Which animal represents the agency of Zorbia?", "type": "reasoning",
             "answers": ["llama"]},
        ],
        "out_of_scope": [{"question": "What is the mascot of NASA?", "type": "neighbour"}],
    },
    {
        "id": "ft-b", "kind": "counterfactual", "relation": "location", "subject": "Eiffel Tower",
        "descriptor": "The Eiffel Tower now stands in Rome.", "answers": ["Rome"], "old_answers": ["Paris"],
        "in_scope": [{"question": "Where is the Eiffel Tower?", "type": "direct", "answers": ["Rome"]}],
        "out_of_scope": [
            {"question": "Where is the Louvre?", "type": "neighbour"},
            {"question": "What is 2 + 2?", "type": "unrelated"},
        ],
    },
]


@pytest.mark.parametrize(
    ("answer", "aliases", "old", "match", "verdict"),
    [
        ("The mascot is a purple llama named Quimby.", ["Quimby"], [], True, True),
        ("QUIMBY!", ["Quimby"], [], True, True),
        ("The Quimbys are a family.", ["Quimby"], [], False, False),  # whole words only
        ("The Eiffel Tower is located in Rome, Italy.", ["Rome"], ["Paris"], True, True),
        ("It is in Paris, not Rome.", ["Rome"], ["Paris"], True, False),  # negated and the old fact
        ("The tower is no longer in Rome.", ["Rome"], [], True, False),
        ("It moved from Paris to Rome.", ["Rome"], ["Paris"], True, True),  # the old fact as the former one
        ("It is in Paris. Or maybe Rome.", ["Rome"], ["Paris"], True, False),  # asserts the old fact
        ("The Eiffel Tower is in Paris.", ["Rome"], ["Paris"], False, False),
        ("", ["Rome"], [], False, False),
    ],
)
def test_match_and_judge(answer: str, aliases: list[str], old: list[str], match: bool, verdict: bool) -> None:
    assert matches(answer, aliases) is match
    assert judge(answer, aliases, old) is verdict


def test_normalise_and_empty() -> None:
    assert normalise("  The Café's  MASCOT, a llama!") == "café s mascot llama"
    assert is_empty(" \n\t") and not is_empty(" x")


@pytest.fixture
async def fake_server(tmp_path: Path) -> AsyncIterator[tuple[EditServeServer, FakeDataPlane]]:
    plane = FakeDataPlane()
    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path / "srv", admin_token=TOKEN)
    server = build_server(settings, lambda: plane)
    await server.start()
    await server.load_plane()
    yield server, plane
    await server.stop(1.0)


async def test_protocol_through_the_api(fake_server, tmp_path: Path) -> None:
    server, plane = fake_server
    data = tmp_path / "ft.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n")
    assert [len(r.in_scope) for r in load_freetext(data)] == [2, 1]
    cfg = FreetextConfig(
        data=data, out=tmp_path / "out", sequential=[1, 2], methods=["unedited", "off", "both"],
        server=server.address, admin_token=TOKEN, concurrency=4,
    )
    results = await run_freetext(cfg)
    # each round's edits were rolled back; both records were edited once per T
    assert plane.registry.counts().active == 0
    assert [len(results["rounds"][t]["edits"]) for t in ("1", "2")] == [2, 2]
    edit_calls = [req for name, req in plane.calls if name == "edit"]
    assert [c.descriptor for c in edit_calls] == [r["descriptor"] for r in RECORDS] * 2
    # every question in both styles, per method
    n_questions = sum(len(r["in_scope"]) + len(r["out_of_scope"]) for r in RECORDS)
    assert len(results["unedited_answers"]) == 2 * n_questions
    for t in ("1", "2"):
        for method in ("off", "both"):
            assert len(results["rounds"][t]["answers"][method]) == 2 * n_questions
    chats = [req for name, req in plane.calls if name == "generate" and req.messages]
    raws = [req for name, req in plane.calls if name == "generate" and not req.messages]
    assert len(chats) == len(raws) and chats[0].messages[0].role == "user"
    summary = results["summary"]["2"]
    # the echoing fake answers every question with itself: "off" is the unedited answer, in-scope
    # questions hold no answer alias except where the question names it
    assert summary["off"]["chat_kept"]["mean"] == summary["both"]["chat_kept"]["mean"] == 1.0
    assert summary["both"]["raw_empty"]["mean"] == 0.0
    text = (cfg.out / "summary.md").read_text()
    assert "| 2 | both |" in text and "| 1 | off |" in text
    # a second run reuses the unedited answers instead of asking again
    before = len(plane.calls)
    await run_freetext(FreetextConfig(**{**cfg.__dict__, "sequential": [2], "methods": ["unedited"]}))
    assert not [c for name, c in plane.calls[before:] if name == "generate" and not c.use_edits]

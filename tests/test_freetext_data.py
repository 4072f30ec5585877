"""The free-text edit benchmark: the committed file is the generator's output, and every record is valid.

No model is loaded: these tests read and generate JSON only. Regenerate the data with
`python -m service.eval.freetext_data --out bench/data/freetext-edits.jsonl`."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from service.eval.freetext_data import _SPECS, RELATIONS, generate_records, main, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "bench" / "data" / "freetext-edits.jsonl"
REGENERATE = "run `python -m service.eval.freetext_data --out bench/data/freetext-edits.jsonl`"

KEYS = [
    "id", "kind", "relation", "subject", "descriptor", "answers", "old_answers", "in_scope", "out_of_scope",
]  # fmt: skip
KINDS = ("fictional", "counterfactual")
TAGS = ("cf:", "fi:")  # descriptor templates for one kind only


@pytest.fixture(scope="module")
def records() -> list[dict[str, Any]]:
    return [json.loads(line) for line in COMMITTED.read_text(encoding="utf-8").splitlines()]


def _ngrams(text: str, n: int = 5) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def _names(text: str, phrase: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(phrase.lower())}(?!\w)", text.lower()) is not None


def test_committed_file_matches_generator(tmp_path: Path) -> None:
    out = tmp_path / "freetext-edits.jsonl"
    assert main(["--out", str(out)]) == 0
    assert out.read_bytes() == COMMITTED.read_bytes(), f"stale {COMMITTED.name}: {REGENERATE}"


def test_generation_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a, b = generate_records(40, seed=3), generate_records(40, seed=3)
    assert a == b
    assert a != generate_records(40, seed=4)
    write_jsonl(a, tmp_path / "a.jsonl")
    assert [json.loads(x) for x in (tmp_path / "a.jsonl").read_text(encoding="utf-8").splitlines()] == a


def test_size_ids_and_uniqueness(records: list[dict[str, Any]]) -> None:
    assert len(records) >= 200
    assert [r["id"] for r in records] == [f"ft-{i:03d}" for i in range(len(records))]
    for field in ("id", "descriptor", "subject"):
        dupes = [v for v, c in Counter(r[field] for r in records).items() if c > 1]
        assert not dupes, f"duplicate {field}: {dupes}"


def test_every_record_is_valid(records: list[dict[str, Any]]) -> None:
    for r in records:
        rid = r["id"]
        assert list(r) == KEYS, rid
        assert r["kind"] in KINDS and r["relation"] in RELATIONS, rid
        assert isinstance(r["subject"], str) and r["subject"].strip(), rid
        assert isinstance(r["descriptor"], str) and r["descriptor"].endswith("."), rid
        assert r["answers"] and all(isinstance(a, str) and a.strip() for a in r["answers"]), rid
        assert all(isinstance(a, str) and a.strip() for a in r["old_answers"]), rid
        if r["kind"] == "fictional":
            assert r["old_answers"] == [], rid
        assert any(_names(r["descriptor"], a) for a in r["answers"]), f"{rid}: descriptor lacks the answer"
        assert _names(r["descriptor"], r["subject"]), f"{rid}: descriptor lacks the subject"

        types = Counter(q["type"] for q in r["in_scope"])
        assert types["direct"] == 1 and types["reasoning"] == 1 and types["paraphrase"] in (1, 2), rid
        assert sum(types.values()) == 2 + types["paraphrase"], rid
        for q in r["in_scope"]:
            assert list(q) == ["question", "type", "answers"], rid
            assert q["question"].endswith("?") and q["question"][0].isupper(), rid
            assert q["answers"] and all(isinstance(a, str) and a.strip() for a in q["answers"]), rid

        assert 2 <= len(r["out_of_scope"]) <= 3, rid
        out_types = Counter(q["type"] for q in r["out_of_scope"])
        assert set(out_types) == {"neighbour", "unrelated"}, rid
        for q in r["out_of_scope"]:
            assert list(q) == ["question", "type"], rid
            assert q["question"].endswith("?") and q["question"][0].isupper(), rid
        questions = [q["question"] for q in r["in_scope"] + r["out_of_scope"]]
        assert len(set(questions)) == len(questions), f"{rid}: repeated question"


def test_in_scope_questions_do_not_copy_the_descriptor(records: list[dict[str, Any]]) -> None:
    for r in records:
        stored = _ngrams(r["descriptor"])
        for q in r["in_scope"]:
            shared = stored & _ngrams(q["question"])
            assert not shared, f"{r['id']}: {q['question']!r} copies {sorted(shared)[0]} from the descriptor"
            assert not any(_names(q["question"], a) for a in q["answers"]), f"{r['id']}: answer in question"


def test_out_of_scope_questions_name_no_edited_subject(records: list[dict[str, Any]]) -> None:
    subjects = [r["subject"] for r in records]
    for r in records:
        for q in r["out_of_scope"]:
            assert not _names(q["question"], r["subject"]), f"{r['id']}: neighbour names the edited subject"
            named = [s for s in subjects if _names(q["question"], s)]
            assert not named, f"{r['id']}: {q['question']!r} names edited subjects {named}"


def test_no_descriptor_states_another_records_answer(records: list[dict[str, Any]]) -> None:
    # The evaluation applies several edits at once: a retrieved neighbour edit must not supply the answer.
    for r in records:
        others = (o for o in records if o is not r)
        leaks = [o["id"] for o in others if any(_names(o["descriptor"], a) for a in r["answers"])]
        assert not leaks, f"{r['id']}: its answer appears in the descriptors of {leaks}"


def test_coverage_of_relations_and_kinds(records: list[dict[str, Any]]) -> None:
    by_relation = Counter(r["relation"] for r in records)
    assert set(by_relation) == set(RELATIONS) and len(RELATIONS) >= 10
    assert min(by_relation.values()) >= 8, by_relation
    kinds = Counter(r["kind"] for r in records)
    assert kinds["fictional"] >= 80 and kinds["counterfactual"] >= 80, kinds
    for rel in RELATIONS:  # both kinds in every relation
        assert {r["kind"] for r in records if r["relation"] == rel} == set(KINDS), rel
    head = records[:20]  # interleaved: a prefix (`--n 20`) already spans the benchmark
    assert len({r["relation"] for r in head}) >= 10 and {r["kind"] for r in head} == set(KINDS)


def test_variety(records: list[dict[str, Any]]) -> None:
    unrelated = {q["question"] for r in records for q in r["out_of_scope"] if q["type"] == "unrelated"}
    assert len(unrelated) >= 60
    two_sentences = [r for r in records if re.search(r"\.\s+[A-Z]", r["descriptor"])]
    assert len(two_sentences) >= 20
    for rel in RELATIONS:  # several descriptor phrasings per relation, in the templates and in the file
        descriptors = _SPECS[rel].descriptors
        for tag in TAGS:
            assert sum(1 for t in descriptors if not t.startswith(TAGS) or t.startswith(tag)) >= 3, (rel, tag)
        templates = [t.removeprefix("cf:").removeprefix("fi:") for t in descriptors]
        used = {_template_of(r["descriptor"], templates) for r in records if r["relation"] == rel}
        assert None not in used and len(used) >= 3, (rel, used)


def _template_of(descriptor: str, templates: list[str]) -> str | None:
    """The descriptor template a sentence was made from: a field is any text without "," or ".", and
    "a" may have become "an"."""
    for t in templates:
        pattern = re.sub(r"\\\{\w+\\\}", "([^,.]+)", re.escape(t)).replace(r"\ a\ ", r"\ an?\ ")
        if re.fullmatch(pattern, descriptor, flags=re.IGNORECASE):
            return t
    return None

"""The adapter's synthetic training records (scripts/alignment_data.py): seeded, well-formed, and disjoint
from the free-text benchmark, so a gain there is transfer and not recall of its facts."""

from __future__ import annotations

import json
import re
from pathlib import Path

from scripts.alignment_data import CITIES, FIRST_NAMES, RELATIONS, SURNAMES, generate

BENCH = Path(__file__).resolve().parents[1] / "bench" / "data" / "freetext-edits.jsonl"


def _benchmark() -> list[dict]:
    return [json.loads(line) for line in BENCH.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_generation_is_seeded_and_covers_every_relation() -> None:
    a, b = generate(64, seed=3), generate(64, seed=3)
    assert a == b
    assert a != generate(64, seed=4)
    assert {r.relation for r in a} == set(RELATIONS)


def test_every_record_states_its_answer_and_asks_without_copying_it() -> None:
    for r in generate(400, seed=0):
        assert r.answer in r.descriptor and r.answer in r.statement, r
        assert len(r.questions) >= 2 and len(set(r.questions)) == len(r.questions)
        for q in r.questions:
            assert q.endswith("?") and q[0].isupper(), q
            assert r.answer not in q, (q, r.answer)
        if r.reasoning:
            question, answer, sentence = r.reasoning
            assert question.endswith("?") and answer in sentence and answer not in question


def test_reasoning_hops_go_through_a_city_the_descriptor_names() -> None:
    countries = dict(CITIES)
    hops = [r for r in generate(400, seed=0) if r.reasoning and r.reasoning[1] in countries.values()]
    assert len(hops) > 50
    for r in hops:
        city = next(c for c in countries if re.search(rf"\b{c}\b", r.descriptor))
        assert countries[city] == r.reasoning[1]


def test_disjoint_from_the_free_text_benchmark() -> None:
    records = _benchmark()
    text = " ".join(json.dumps(r, ensure_ascii=False) for r in records)
    for word in [c for c, _ in CITIES] + list(FIRST_NAMES) + list(SURNAMES):
        assert not re.search(rf"\b{re.escape(word)}\b", text), word
    assert not set(RELATIONS) & {r["relation"] for r in records}
    bench_answers = {a.lower() for r in records for a in r["answers"]}
    for r in generate(400, seed=0):
        assert r.answer.lower() not in bench_answers or r.relation in {"national_animal", "flag_colour"}, r

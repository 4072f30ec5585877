"""The three record parsers on one record of each format, and bad records reported, not fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.eval.datasets import Probe, load_records, parse_records

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

COUNTERFACT = {
    "case_id": 10,
    "prompt": "BBC One, by",
    "target_new": "Sega",
    "subject": "BBC One",
    "ground_truth": "BBC",
    "rephrase_prompt": "BBC One is my favorite product out of everything owned by",
    "locality_prompt": "BBC Radio, by",
    "locality_ground_truth": "BBC",
}
ZSRE = {
    "subject": "UniFirst",
    "src": "What is the product made by UniFirst?",
    "pred": "uniform",
    "rephrase": "What will be the product of UniFirst?",
    "alt": "unmanned aircraft",
    "answers": ["uniform"],
    "loc": "nq question: john goodman's character in the big lebowski",
    "loc_ans": "Walter Sobchak",
    "cond": "uniform >> unmanned aircraft || What is the product made by UniFirst?",
}
# Written for this test in KnowEdit's layout (wiki_counterfact style): ground truths as alias lists.
KNOWEDIT = {
    "subject": "Eiffel Tower",
    "prompt": "The Eiffel Tower is located in the city of",
    "target_new": "Rome",
    "ground_truth": ["Paris"],
    "rephrase_prompt": "Where is the Eiffel Tower? In the city of",
    "portability": {
        "Reasoning": [
            {"prompt": "The Eiffel Tower is in the country of", "ground_truth": [["Italy", "Italia"]]}
        ],
        "Subject_Aliasing": [
            {"prompt": "La tour Eiffel is located in the city of", "ground_truth": ["Rome"]}
        ],
    },
    "locality": {
        "Relation_Specificity": [
            {"prompt": "The Eiffel Tower was designed by", "ground_truth": [["Gustave Eiffel"]]}
        ],
        "Forgetfulness": [{"prompt": "The Louvre is located in", "ground_truth": "Paris"}],
    },
}


def test_counterfact_record() -> None:
    loaded = parse_records([COUNTERFACT], "counterfact")
    assert loaded.skipped == []
    (r,) = loaded.records
    assert (r.case_id, r.subject, r.prompt, r.target_new, r.target_true) == (
        "10",
        "BBC One",
        "BBC One, by",
        "Sega",
        "BBC",
    )
    assert r.paraphrases == ("BBC One is my favorite product out of everything owned by",)
    assert r.locality == (Probe("BBC Radio, by", "BBC"),)
    assert r.portability == ()
    assert r.descriptor == "BBC One, by Sega."


def test_zsre_record() -> None:
    (r,) = parse_records([ZSRE], "zsre").records
    assert (r.subject, r.prompt, r.target_new, r.target_true) == (
        "UniFirst",
        "What is the product made by UniFirst?",
        "unmanned aircraft",
        "uniform",
    )
    assert r.paraphrases == ("What will be the product of UniFirst?",)
    assert r.locality == (
        Probe("nq question: john goodman's character in the big lebowski", "Walter Sobchak"),
    )


def test_knowedit_record() -> None:
    (r,) = parse_records([KNOWEDIT], "knowedit").records
    assert (r.subject, r.target_new, r.target_true) == ("Eiffel Tower", "Rome", "Paris")
    assert r.paraphrases == ("Where is the Eiffel Tower? In the city of",)
    assert r.portability == (
        Probe("The Eiffel Tower is in the country of", "Italy", "Reasoning"),
        Probe("La tour Eiffel is located in the city of", "Rome", "Subject_Aliasing"),
    )
    assert r.locality == (
        Probe("The Eiffel Tower was designed by", "Gustave Eiffel", "Relation_Specificity"),
        Probe("The Louvre is located in", "Paris", "Forgetfulness"),
    )


@pytest.mark.parametrize(
    ("fmt", "good", "bad", "reason"),
    [
        ("counterfact", COUNTERFACT, {**COUNTERFACT, "ground_truth": ""}, "ground_truth"),
        ("counterfact", COUNTERFACT, {**COUNTERFACT, "locality_prompt": 3}, "locality_prompt"),
        ("zsre", ZSRE, {**ZSRE, "alt": ""}, "alt"),
        ("knowedit", KNOWEDIT, {k: v for k, v in KNOWEDIT.items() if k != "locality"}, "locality"),
        ("knowedit", KNOWEDIT, {**KNOWEDIT, "portability": {"Reasoning": "text"}}, "portability"),
    ],
)
def test_bad_records_are_reported_and_skipped(fmt: str, good: dict, bad: dict, reason: str) -> None:
    loaded = parse_records([good, bad, "not an object", good], fmt)  # type: ignore[arg-type]
    assert [r.index for r in loaded.records] == [0, 3]
    assert [s.index for s in loaded.skipped] == [1, 2]
    assert reason in loaded.skipped[0].reason
    assert loaded.total == 4


def test_load_first_n_json_lines_and_seeded_sample(tmp_path: Path) -> None:
    path = tmp_path / "cf.jsonl"
    rows = [{**COUNTERFACT, "case_id": i, "target_new": f"T{i}"} for i in range(10)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    first = load_records(path, "counterfact", 3)
    assert [r.case_id for r in first.records] == ["0", "1", "2"]
    a = load_records(path, "counterfact", 4, sample_seed=7)
    b = load_records(path, "counterfact", 4, sample_seed=7)
    assert [r.index for r in a.records] == [r.index for r in b.records]
    assert [r.index for r in a.records] == sorted(r.index for r in a.records)  # file order kept


@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared evaluation data not present at {DATA}")
def test_shared_files_parse() -> None:
    cf = load_records(DATA / "counterfact-val.json", "counterfact")
    assert cf.total == len(cf.records) + len(cf.skipped) and len(cf.records) > 1900
    zsre = load_records(DATA / "zsre_mend_train-1k.json", "zsre")
    assert zsre.total == 1000
    assert all("alt" in s.reason for s in zsre.skipped)  # the two records without a new target
    assert all(r.subject in r.prompt for r in zsre.records[:100])

"""Parsers for the three knowledge-editing formats, all into one `EvalRecord` type.

Formats (field names as EasyEdit publishes them):
  counterfact  prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt,
               locality_ground_truth (case_id optional). The locality prompt is CounterFact's
               neighbourhood prompt: a different subject whose true answer is locality_ground_truth.
  zsre         MEND's zsRE: src, subject, alt (new target), answers (answers[0] = original answer),
               rephrase, loc, loc_ans.
  knowedit     prompt, subject, target_new, ground_truth, rephrase_prompt (optional),
               locality{Relation_Specificity|Forgetfulness: [{prompt, ground_truth}]},
               portability{Reasoning|Subject_Aliasing|Logical_Generalization: [{prompt, ground_truth}]};
               ground_truth may be a string, a list, or a list of alias lists (the first string counts).

A record that does not parse becomes a `Skipped` entry with the reason; it never aborts the load.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Format = Literal["counterfact", "zsre", "knowedit"]
FORMATS: tuple[Format, ...] = ("counterfact", "zsre", "knowedit")


class RecordError(ValueError):
    """One record does not parse; the message says which field and why."""


@dataclass(frozen=True)
class Probe:
    """A prompt and the answer scored after it (neighbourhood, locality or portability)."""

    prompt: str
    answer: str
    kind: str = ""  # KnowEdit's category ("Reasoning", "Relation_Specificity", ...); "" otherwise


@dataclass(frozen=True)
class EvalRecord:
    index: int  # position in the file: the stable id used in results and checkpoints
    case_id: str
    subject: str
    prompt: str
    target_new: str
    target_true: str  # the answer being replaced; "" when the format does not give one
    paraphrases: tuple[str, ...] = ()
    locality: tuple[Probe, ...] = ()  # answers the edit must NOT change
    portability: tuple[Probe, ...] = ()  # answers the edit should imply (KnowEdit)

    @property
    def descriptor(self) -> str:
        """The natural-language statement sent to the retrieval path ("BBC One, by Sega.")."""
        return f"{self.prompt.strip()} {self.target_new.strip()}."


@dataclass(frozen=True)
class Skipped:
    index: int
    reason: str


@dataclass
class LoadedData:
    records: list[EvalRecord]
    skipped: list[Skipped] = field(default_factory=list)
    total: int = 0  # records in the file


# ---------------------------------------------------------------------------------------- field helpers


def _text(raw: dict[str, Any], name: str, *, required: bool = True) -> str:
    value = raw.get(name)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[0]  # some dumps wrap single strings in a list
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise RecordError(f"{name}: missing or empty")
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{name}: expected a string, got {type(value).__name__}")
    return value.strip()


def _texts(raw: dict[str, Any], name: str) -> tuple[str, ...]:
    """A string or a list of strings (empty entries dropped); absent means none."""
    value = raw.get(name)
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RecordError(f"{name}: expected a string or a list of strings")
    return tuple(v.strip() for v in value if v.strip())


def _first_string(value: Any) -> str:
    """KnowEdit ground truths: "a", ["a", "b"] or [["a", "alias"], ["b"]] -> "a"."""
    while isinstance(value, list) and value:
        value = value[0]
    return value.strip() if isinstance(value, str) else ""


def _probes(block: Any, where: str) -> tuple[Probe, ...]:
    """KnowEdit's {category: [{prompt, ground_truth}, ...]} (a bare dict per category is accepted too)."""
    if block is None:
        return ()
    if not isinstance(block, dict):
        raise RecordError(f"{where}: expected an object of categories")
    out: list[Probe] = []
    for kind, items in block.items():
        if isinstance(items, dict):
            items = [items]
        if not isinstance(items, list):
            raise RecordError(f"{where}.{kind}: expected a list")
        for item in items:
            if not isinstance(item, dict):
                raise RecordError(f"{where}.{kind}: expected objects with prompt and ground_truth")
            prompts = item.get("prompt")
            prompts = [prompts] if isinstance(prompts, str) else prompts
            answers = item.get("ground_truth")
            if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
                raise RecordError(f"{where}.{kind}: prompt must be a string or a list of strings")
            for i, prompt in enumerate(prompts):
                # A list of prompts pairs with a list of answers of the same length, else shares the first.
                paired = answers[i] if isinstance(answers, list) and len(answers) == len(prompts) else answers
                answer = _first_string(paired)
                if not prompt.strip() or not answer:
                    raise RecordError(f"{where}.{kind}: empty prompt or ground_truth")
                out.append(Probe(prompt.strip(), answer, str(kind)))
    return tuple(out)


def _paired_probes(prompts: Sequence[str], answers: Sequence[str], where: str) -> tuple[Probe, ...]:
    if len(answers) == 1 and len(prompts) > 1:
        answers = list(answers) * len(prompts)
    if len(prompts) != len(answers):
        raise RecordError(f"{where}: {len(prompts)} prompts but {len(answers)} answers")
    return tuple(Probe(p, a) for p, a in zip(prompts, answers, strict=True))


def _case_id(raw: dict[str, Any], index: int) -> str:
    value = raw.get("case_id", raw.get("id", index))
    return str(value)


# ---------------------------------------------------------------------------------------- the parsers


def parse_counterfact(raw: dict[str, Any], index: int) -> EvalRecord:
    locality = _paired_probes(
        _texts(raw, "locality_prompt"), _texts(raw, "locality_ground_truth"), "locality_prompt"
    )
    if not locality:
        raise RecordError("locality_prompt: missing (NS needs a neighbourhood prompt)")
    return EvalRecord(
        index=index,
        case_id=_case_id(raw, index),
        subject=_text(raw, "subject"),
        prompt=_text(raw, "prompt"),
        target_new=_text(raw, "target_new"),
        target_true=_text(raw, "ground_truth"),  # ES/PS/NS compare P(new) with P(true): required
        paraphrases=_texts(raw, "rephrase_prompt"),
        locality=locality,
    )


def parse_zsre(raw: dict[str, Any], index: int) -> EvalRecord:
    answers = raw.get("answers")
    true = _first_string(answers) if isinstance(answers, list | str) else ""
    loc_prompt, loc_ans = _text(raw, "loc"), _text(raw, "loc_ans")
    return EvalRecord(
        index=index,
        case_id=_case_id(raw, index),
        subject=_text(raw, "subject"),
        prompt=_text(raw, "src"),
        target_new=_text(raw, "alt"),
        target_true=true,
        paraphrases=_texts(raw, "rephrase"),
        locality=(Probe(loc_prompt, loc_ans),),
    )


def parse_knowedit(raw: dict[str, Any], index: int) -> EvalRecord:
    def pick(*names: str) -> str:
        for name in names:
            if raw.get(name) is not None:
                return name
        return names[0]

    truth = raw.get("ground_truth")
    locality = _probes(raw.get("locality"), "locality")
    if not locality:
        raise RecordError("locality: missing or empty (Loc needs at least one prompt)")
    return EvalRecord(
        index=index,
        case_id=_case_id(raw, index),
        subject=_text(raw, pick("subject", "concept")),
        prompt=_text(raw, pick("prompt", "text")),
        target_new=_text(raw, pick("target_new", "labels")),
        target_true=_first_string(truth),
        paraphrases=_texts(raw, pick("rephrase_prompt", "rephrase")),
        locality=locality,
        portability=_probes(raw.get("portability"), "portability"),
    )


PARSERS: dict[Format, Callable[[dict[str, Any], int], EvalRecord]] = {
    "counterfact": parse_counterfact,
    "zsre": parse_zsre,
    "knowedit": parse_knowedit,
}


def parse_records(raw_records: Sequence[Any], fmt: Format) -> LoadedData:
    parser = PARSERS[fmt]
    records: list[EvalRecord] = []
    skipped: list[Skipped] = []
    for index, raw in enumerate(raw_records):
        if not isinstance(raw, dict):
            skipped.append(Skipped(index, f"expected an object, got {type(raw).__name__}"))
            continue
        try:
            records.append(parser(raw, index))
        except RecordError as exc:
            skipped.append(Skipped(index, str(exc)))
    return LoadedData(records, skipped, total=len(raw_records))


def read_json_records(path: Path) -> list[Any]:
    """A JSON array, or JSON Lines (one object per line)."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON array of records")
        return data
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_records(
    path: Path, fmt: Format, n: int | None = None, *, sample_seed: int | None = None
) -> LoadedData:
    """Parse `path`, then keep the first `n` good records (a seeded random sample when `sample_seed`)."""
    if fmt not in PARSERS:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}")
    loaded = parse_records(read_json_records(path), fmt)
    if sample_seed is not None:
        rng = random.Random(sample_seed)
        picked = rng.sample(loaded.records, min(n or len(loaded.records), len(loaded.records)))
        loaded.records = sorted(picked, key=lambda r: r.index)
    elif n is not None:
        loaded.records = loaded.records[:n]
    return loaded

"""Evaluate records with one method: build every (prompt, answer) to score and every prompt to continue,
run them through a `Scorer` (the gRPC server, or the local ROME model), and compute the metrics.

Answers are scored as " " + answer after the prompt, as EasyEdit and ROME do ("BBC One, by" + " Sega").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from service.eval.datasets import EvalRecord, Format
from service.eval.metrics import ProbeResult, TokenScores, counterfact_record, qa_record

GEN_EXTRA_TOKENS = 2  # room for a target that greedy decoding tokenises differently
# Prompts scored before their greedy continuations are asked for. The server keeps each scored prompt's state
# (--prefix-cache-mb, LRU) so that the Generate of the same prompt skips its prefill; a phase much larger than
# what it keeps would evict each state before its Generate came. 128 prompts of ~60 tokens are ~350 MB on
# SmolLM2-135M, a zsRE chunk of 32 records is 96 prompts, a CounterFact one ~400 (three phases).
PHASE_PROMPTS = 128
GROUPS = ("rewrite", "paraphrase", "locality", "portability")


class Scorer(Protocol):
    async def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScores]: ...

    async def generate_many(self, requests: Sequence[tuple[str, int]]) -> list[str]: ...


@dataclass
class RecordEval:
    index: int
    probes: dict[str, list[ProbeResult]]
    metrics: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "metrics": self.metrics,
            "probes": {g: [p.to_dict() for p in ps] for g, ps in self.probes.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecordEval:
        probes = {g: [ProbeResult.from_dict(p) for p in ps] for g, ps in d["probes"].items()}
        return cls(int(d["index"]), probes, dict(d["metrics"]))


def continuation(answer: str) -> str:
    return " " + answer.strip()


@dataclass(frozen=True)
class _Slot:
    record: int  # position in the chunk
    group: str
    probe: int
    role: str  # "new" | "true" | "answer"


def _plan(record: EvalRecord, fmt: Format) -> list[tuple[str, int, str, list[tuple[str, str]]]]:
    """(group, probe index, prompt, [(role, answer)]) for every prompt of the record."""
    cf = fmt == "counterfact"
    edit_roles = [("new", record.target_new)] + ([("true", record.target_true)] if cf else [])
    out: list[tuple[str, int, str, list[tuple[str, str]]]] = [("rewrite", 0, record.prompt, edit_roles)]
    out += [("paraphrase", i, p, edit_roles) for i, p in enumerate(record.paraphrases)]
    for i, probe in enumerate(record.locality):
        roles = [("true", probe.answer), ("new", record.target_new)] if cf else [("answer", probe.answer)]
        out.append(("locality", i, probe.prompt, roles))
    out += [("portability", i, p.prompt, [("answer", p.answer)]) for i, p in enumerate(record.portability)]
    return out


def _gen_tokens(fmt: Format, group: str, scores: dict[str, TokenScores]) -> int:
    """Greedy tokens to generate for a probe: the expected answer plus slack; for zsRE/KnowEdit locality
    exactly the answer's length (the unchanged-continuation check compares like with like)."""
    if group == "locality":
        role = "true" if fmt == "counterfact" else "answer"
        n = len(scores[role].ids)
        return n + GEN_EXTRA_TOKENS if fmt == "counterfact" else n
    role = "answer" if group == "portability" else "new"
    return len(scores[role].ids) + GEN_EXTRA_TOKENS


async def evaluate_records(
    records: Sequence[EvalRecord],
    fmt: Format,
    scorer: Scorer,
    baseline: Mapping[int, RecordEval] | None = None,
    *,
    generate: bool = True,
) -> list[RecordEval]:
    """Score and continue every probe of `records` with one method; `baseline` (the unedited model's
    evaluations by record index) is what Loc compares with; None means `records` ARE the baseline.
    Records go in phases of about PHASE_PROMPTS prompts: all their scores, then all their continuations."""
    out: list[RecordEval] = []
    phase: list[EvalRecord] = []
    prompts = 0
    for record in records:
        n = len(_plan(record, fmt))
        if phase and prompts + n > PHASE_PROMPTS:
            out += await _evaluate_phase(phase, fmt, scorer, baseline, generate)
            phase, prompts = [], 0
        phase.append(record)
        prompts += n
    if phase:
        out += await _evaluate_phase(phase, fmt, scorer, baseline, generate)
    return out


async def _evaluate_phase(
    records: Sequence[EvalRecord],
    fmt: Format,
    scorer: Scorer,
    baseline: Mapping[int, RecordEval] | None,
    generate: bool,
) -> list[RecordEval]:
    slots: list[_Slot] = []
    pairs: list[tuple[str, str]] = []
    probes: list[dict[str, list[ProbeResult]]] = []
    for r, record in enumerate(records):
        groups: dict[str, list[ProbeResult]] = {g: [] for g in GROUPS}
        for group, i, prompt, roles in _plan(record, fmt):
            groups[group].append(ProbeResult(prompt))
            for role, answer in roles:
                slots.append(_Slot(r, group, i, role))
                pairs.append((prompt, continuation(answer)))
        probes.append(groups)
    for slot, scores in zip(slots, await scorer.score_many(pairs), strict=True):
        probes[slot.record][slot.group][slot.probe].scores[slot.role] = scores
    if generate:
        targets = [(r, g, p) for r, groups in enumerate(probes) for g, ps in groups.items() for p in ps]
        texts = await scorer.generate_many([(p.prompt, _gen_tokens(fmt, g, p.scores)) for _, g, p in targets])
        for (_, _, probe), text in zip(targets, texts, strict=True):
            probe.generated = text
    out: list[RecordEval] = []
    for record, groups in zip(records, probes, strict=True):
        base = baseline[record.index].probes if baseline is not None else groups
        out.append(RecordEval(record.index, groups, record_metrics(record, fmt, groups, base)))
    return out


def record_metrics(
    record: EvalRecord,
    fmt: Format,
    probes: Mapping[str, Sequence[ProbeResult]],
    baseline_probes: Mapping[str, Sequence[ProbeResult]],
) -> dict[str, float | None]:
    rewrite = probes["rewrite"][0]
    if fmt == "counterfact":
        return counterfact_record(
            rewrite,
            probes["paraphrase"],
            probes["locality"],
            record.target_new,
            [p.answer for p in record.locality],
        )
    return qa_record(
        rewrite,
        probes["paraphrase"],
        probes["locality"],
        baseline_probes["locality"],
        record.target_new,
        probes["portability"],
        [p.answer for p in record.portability],
    )

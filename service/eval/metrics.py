"""The metrics, as the literature defines them, as pure functions of scored tokens and generated text.

CounterFact (ROME/MEMIT protocol). For a prompt and two answers, each answer's probability is compared by
its mean token negative log-likelihood under teacher forcing (lower NLL = more probable):
  ES  share of records with P(new) > P(true) on the rewrite prompt
  PS  the same on the paraphrase prompts (mean over a record's paraphrases, then over records)
  NS  share of neighbourhood prompts with P(true) > P(new)
  Score  harmonic mean of ES, PS and NS
A tie (equal NLL) is a failure for both ES/PS and NS: "greater than" is strict.

zsRE and KnowEdit (EasyEdit / WISE). Token-level top-1 accuracy under teacher forcing:
  Rel   share of target_new's tokens that are the argmax at their position after the prompt
  Gen   the same after the rephrase
  Loc   share of the locality answer's positions whose argmax token is the same as the unedited model's
  Port  (KnowEdit) Rel on the portability prompts and answers

Generation-based companions ("*_gen"): the greedy continuation begins with the expected answer
(target_new; for CounterFact neighbours the true answer); Loc_gen: the greedy continuation of the
locality prompt is identical to the unedited model's.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

COUNTERFACT_METRICS = ("ES", "PS", "NS", "Score", "ES_gen", "PS_gen", "NS_gen", "Score_gen")
ZSRE_METRICS = ("Rel", "Gen", "Loc", "Rel_gen", "Gen_gen", "Loc_gen")
KNOWEDIT_METRICS = ("Rel", "Gen", "Loc", "Port", "Rel_gen", "Gen_gen", "Loc_gen", "Port_gen")
METRICS_BY_FORMAT: dict[str, tuple[str, ...]] = {
    "counterfact": COUNTERFACT_METRICS,
    "zsre": ZSRE_METRICS,
    "knowedit": KNOWEDIT_METRICS,
}
# Aggregates that are not means of per-record values: name -> the metrics they combine.
HARMONIC = {"Score": ("ES", "PS", "NS"), "Score_gen": ("ES_gen", "PS_gen", "NS_gen")}


@dataclass
class TokenScores:
    """One continuation scored after one prompt, token by token (the Score RPC's answer)."""

    ids: list[int]
    logprobs: list[float]
    greedy: list[bool]  # the token was the argmax at its position
    argmax: list[int] | None = None  # the argmax token id at each position, when the scorer reports it
    # The edits that shaped this score, [edit_id, path, score] (the server's applied_edits): diagnostics only.
    applied: list[list[Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "ids": self.ids,
            "logprobs": self.logprobs,
            "greedy": self.greedy,
            "argmax": self.argmax,
            "applied": self.applied,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenScores:
        return cls(
            list(d["ids"]),
            [float(x) for x in d["logprobs"]],
            [bool(g) for g in d["greedy"]],
            None if d.get("argmax") is None else [int(a) for a in d["argmax"]],
            d.get("applied"),
        )


@dataclass
class ProbeResult:
    """Everything measured on one prompt: scored answers by role ("new", "true", "answer") and the greedy
    continuation."""

    prompt: str
    scores: dict[str, TokenScores] = field(default_factory=dict)
    generated: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt,
            "scores": {k: v.to_dict() for k, v in self.scores.items()},
            "generated": self.generated,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ProbeResult:
        return cls(d["prompt"], {k: TokenScores.from_dict(v) for k, v in d["scores"].items()}, d["generated"])


# ---------------------------------------------------------------------------------------- primitives


def mean_nll(logprobs: Sequence[float]) -> float:
    """Mean negative log-likelihood per token (MEMIT compares answers of different lengths this way)."""
    if not logprobs:
        raise ValueError("no tokens to average")
    return -sum(logprobs) / len(logprobs)


def prefers(nll_a: float, nll_b: float) -> bool:
    """P(a) > P(b) by mean token NLL; a tie is not a preference."""
    return nll_a < nll_b


def token_accuracy(scores: TokenScores) -> float:
    """Teacher-forced top-1 accuracy: share of the continuation's tokens that were the argmax."""
    if not scores.greedy:
        raise ValueError("no tokens scored")
    return sum(scores.greedy) / len(scores.greedy)


def argmax_agreement(before: TokenScores, after: TokenScores) -> float:
    """Share of positions whose argmax token is the same before and after the edit (EasyEdit's locality).

    Needs argmax ids. Without them only greedy flags are known: a position where exactly one side was
    greedy certainly changed, one where both were greedy certainly did not, and one where neither was is
    counted as unchanged, so the result is an upper bound (`loc_is_exact` says which was used)."""
    if len(before.ids) != len(after.ids) or before.ids != after.ids:
        raise ValueError("locality compares the same continuation before and after")
    if not before.ids:
        raise ValueError("no tokens scored")
    if before.argmax is not None and after.argmax is not None:
        same = [a == b for a, b in zip(before.argmax, after.argmax, strict=True)]
    else:
        same = [not (a ^ b) for a, b in zip(before.greedy, after.greedy, strict=True)]
    return sum(same) / len(same)


def loc_is_exact(before: TokenScores, after: TokenScores) -> bool:
    return before.argmax is not None and after.argmax is not None


def starts_with(generated: str | None, target: str) -> bool:
    """The greedy continuation begins with the target as a whole: leading whitespace and runs of spaces are
    ignored, case is kept, and the target must end at a word boundary ("Romeo" does not begin with "Rome")."""
    target = " ".join(target.split())
    if generated is None or not target:
        return False
    text = " ".join(generated.split())
    if not text.startswith(target):
        return False
    rest = text[len(target) :]
    return not rest or not (rest[0].isalnum() and target[-1].isalnum())


def mean(values: Iterable[float | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def harmonic_mean(values: Sequence[float | None]) -> float | None:
    """Harmonic mean; 0 when any value is 0, None when any is missing."""
    if not values or any(v is None for v in values):
        return None
    if any(v <= 0 for v in values):  # type: ignore[operator]
        return 0.0
    return len(values) / sum(1.0 / v for v in values)  # type: ignore[operator]


# ---------------------------------------------------------------------------------------- per record


def _nll(probe: ProbeResult, role: str) -> float:
    return mean_nll(probe.scores[role].logprobs)


def counterfact_record(
    rewrite: ProbeResult,
    paraphrases: Sequence[ProbeResult],
    neighbours: Sequence[ProbeResult],
    target_new: str,
    neighbour_answers: Sequence[str],
) -> dict[str, float | None]:
    """ES/PS/NS (teacher forced, strict preference) and their greedy-generation companions."""
    out: dict[str, float | None] = {
        "ES": float(prefers(_nll(rewrite, "new"), _nll(rewrite, "true"))),
        "PS": mean(float(prefers(_nll(p, "new"), _nll(p, "true"))) for p in paraphrases),
        "NS": mean(float(prefers(_nll(p, "true"), _nll(p, "new"))) for p in neighbours),
        "ES_gen": float(starts_with(rewrite.generated, target_new)),
        "PS_gen": mean(float(starts_with(p.generated, target_new)) for p in paraphrases),
        "NS_gen": mean(
            float(starts_with(p.generated, a)) for p, a in zip(neighbours, neighbour_answers, strict=True)
        ),
        "nll_new": _nll(rewrite, "new"),
        "nll_true": _nll(rewrite, "true"),
    }
    return out


def qa_record(
    rewrite: ProbeResult,
    paraphrases: Sequence[ProbeResult],
    locality: Sequence[ProbeResult],
    locality_unedited: Sequence[ProbeResult],
    target_new: str,
    portability: Sequence[ProbeResult] = (),
    portability_answers: Sequence[str] = (),
) -> dict[str, float | None]:
    """zsRE / KnowEdit: Rel, Gen, Loc (against the unedited model's argmax), Port, and *_gen."""
    if len(locality) != len(locality_unedited):
        raise ValueError("every locality probe needs its unedited counterpart")
    pairs = list(zip(locality_unedited, locality, strict=True))
    out: dict[str, float | None] = {
        "Rel": token_accuracy(rewrite.scores["new"]),
        "Gen": mean(token_accuracy(p.scores["new"]) for p in paraphrases),
        "Loc": mean(argmax_agreement(b.scores["answer"], a.scores["answer"]) for b, a in pairs),
        "Rel_gen": float(starts_with(rewrite.generated, target_new)),
        "Gen_gen": mean(float(starts_with(p.generated, target_new)) for p in paraphrases),
        "Loc_gen": mean(float(b.generated is not None and a.generated == b.generated) for b, a in pairs),
        "loc_exact": float(all(loc_is_exact(b.scores["answer"], a.scores["answer"]) for b, a in pairs)),
    }
    if portability:
        out["Port"] = mean(token_accuracy(p.scores["answer"]) for p in portability)
        out["Port_gen"] = mean(
            float(starts_with(p.generated, a)) for p, a in zip(portability, portability_answers, strict=True)
        )
    return out


# ---------------------------------------------------------------------------------------- aggregate


def aggregate(
    per_record: Sequence[Mapping[str, float | None]], names: Sequence[str]
) -> dict[str, float | None]:
    """Mean of each metric over the records that have it; harmonic scores from the aggregated parts."""
    out: dict[str, float | None] = {}
    for name in names:
        if name not in HARMONIC:
            out[name] = mean(r.get(name) for r in per_record)
    for name, parts in HARMONIC.items():
        if name in names:
            out[name] = harmonic_mean([out.get(p) for p in parts])
    return out

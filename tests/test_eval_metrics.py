"""The evaluation metrics on hand-made cases whose answers are known (ties, multi-token targets)."""

from __future__ import annotations

import math

import pytest

from service.eval.metrics import (
    COUNTERFACT_METRICS,
    ZSRE_METRICS,
    ProbeResult,
    TokenScores,
    aggregate,
    argmax_agreement,
    counterfact_record,
    harmonic_mean,
    mean_nll,
    prefers,
    qa_record,
    starts_with,
    token_accuracy,
)


def scores(
    logprobs: list[float],
    greedy: list[bool] | None = None,
    argmax: list[int] | None = None,
    ids: list[int] | None = None,
) -> TokenScores:
    n = len(logprobs)
    return TokenScores(ids or list(range(100, 100 + n)), logprobs, greedy or [False] * n, argmax)


def cf_probe(new: list[float], true: list[float], generated: str = "") -> ProbeResult:
    return ProbeResult("p", {"new": scores(new), "true": scores(true)}, generated)


def test_mean_nll_is_per_token() -> None:
    assert mean_nll([-1.0, -3.0]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        mean_nll([])


def test_prefers_is_strict() -> None:
    assert prefers(0.5, 1.0)
    assert not prefers(1.0, 0.5)
    assert not prefers(0.7, 0.7)  # a tie is no preference


def test_counterfact_uses_mean_not_sum_for_multi_token_targets() -> None:
    # new: 3 tokens, sum NLL 1.5 but mean 0.5; true: 1 token, NLL 1.0. By mean, new is preferred.
    rewrite = cf_probe([-0.5, -0.5, -0.5], [-1.0], generated=" Sega Saturn")
    m = counterfact_record(rewrite, [], [cf_probe([-2.0], [-0.1], " BBC")], "Sega", ["BBC"])
    assert m["ES"] == 1.0
    assert m["nll_new"] == pytest.approx(0.5)
    assert m["nll_true"] == pytest.approx(1.0)
    assert m["PS"] is None  # no paraphrase: not a zero
    assert m["NS"] == 1.0  # the neighbour still prefers its true answer
    assert m["ES_gen"] == 1.0
    assert m["NS_gen"] == 1.0


def test_counterfact_ties_fail_both_directions() -> None:
    tie = cf_probe([-0.7], [-0.7])
    m = counterfact_record(tie, [tie], [tie], "X", ["Y"])
    assert (m["ES"], m["PS"], m["NS"]) == (0.0, 0.0, 0.0)


def test_counterfact_paraphrase_share_and_harmonic_score() -> None:
    win, lose = cf_probe([-0.1], [-2.0], " Rome"), cf_probe([-3.0], [-0.2], " Paris")
    m = counterfact_record(win, [win, lose], [cf_probe([-5.0], [-0.5])], "Rome", ["Paris"])
    assert m["PS"] == 0.5
    assert m["PS_gen"] == 0.5
    agg = aggregate([m], COUNTERFACT_METRICS)
    assert agg["ES"] == 1.0 and agg["NS"] == 1.0
    assert agg["Score"] == pytest.approx(3 / (1 / 1.0 + 1 / 0.5 + 1 / 1.0))  # 0.75


def test_harmonic_mean_zero_and_missing() -> None:
    assert harmonic_mean([1.0, 0.0, 1.0]) == 0.0
    assert harmonic_mean([0.5, 0.5]) == pytest.approx(0.5)
    assert harmonic_mean([1.0, None]) is None


def test_token_accuracy_multi_token() -> None:
    assert token_accuracy(scores([-0.1, -3.0, -0.2], [True, False, True])) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        token_accuracy(scores([]))


def test_locality_compares_argmax_ids_not_the_answer() -> None:
    # Neither model predicts the answer token at position 1, but the edited model's argmax moved: changed.
    before = scores([-1.0, -2.0, -0.1], [True, False, True], argmax=[100, 7, 102])
    after = scores([-1.0, -2.5, -0.1], [True, False, True], argmax=[100, 8, 102])
    assert argmax_agreement(before, after) == pytest.approx(2 / 3)
    assert argmax_agreement(before, before) == 1.0


def test_locality_without_argmax_ids_is_an_upper_bound() -> None:
    before = scores([-1.0, -2.0, -0.1], [True, False, False])
    after = scores([-1.0, -2.5, -0.1], [True, True, False])
    # position 0 both greedy (same), 1 one greedy (changed), 2 neither greedy (counted unchanged)
    assert argmax_agreement(before, after) == pytest.approx(2 / 3)


def test_locality_needs_the_same_continuation() -> None:
    with pytest.raises(ValueError):
        argmax_agreement(scores([-1.0], ids=[1]), scores([-1.0], ids=[2]))


def test_starts_with_word_boundary_and_whitespace() -> None:
    assert starts_with(" Rome, Italy", "Rome")
    assert starts_with("  unmanned   aircraft system", "unmanned aircraft")
    assert not starts_with(" Romeo and Juliet", "Rome")
    assert not starts_with(" rome", "Rome")  # case is kept
    assert starts_with(" U.S.", "U.S.")
    assert not starts_with(None, "Rome")
    assert not starts_with(" anything", "  ")


def test_qa_record_rel_gen_loc_and_generation() -> None:
    rewrite = ProbeResult("q", {"new": scores([-0.1, -0.2], [True, True])}, " unmanned aircraft.")
    para = ProbeResult("q2", {"new": scores([-0.1, -3.0], [True, False])}, " unmanned vehicle")
    base = ProbeResult("loc", {"answer": scores([-1.0, -1.0], [False, True], argmax=[5, 101])}, " Walter S")
    same = ProbeResult("loc", {"answer": scores([-1.1, -1.0], [False, True], argmax=[5, 101])}, " Walter S")
    moved = ProbeResult("loc", {"answer": scores([-1.1, -1.0], [False, True], argmax=[6, 101])}, " Walt")
    m = qa_record(rewrite, [para], [same], [base], "unmanned aircraft")
    assert (m["Rel"], m["Gen"], m["Loc"]) == (1.0, 0.5, 1.0)
    assert (m["Rel_gen"], m["Gen_gen"], m["Loc_gen"]) == (1.0, 0.0, 1.0)
    assert m["loc_exact"] == 1.0
    m2 = qa_record(rewrite, [para], [moved], [base], "unmanned aircraft")
    assert m2["Loc"] == 0.5
    assert m2["Loc_gen"] == 0.0
    agg = aggregate([m, m2], ZSRE_METRICS)
    assert agg["Loc"] == pytest.approx(0.75)
    assert not any(isinstance(v, float) and math.isnan(v) for v in agg.values())


def test_qa_record_portability() -> None:
    rewrite = ProbeResult("q", {"new": scores([-0.1], [True])}, " X")
    port = ProbeResult("pq", {"answer": scores([-0.3, -4.0], [True, False])}, " Lyon is")
    loc = ProbeResult("l", {"answer": scores([-1.0], [True], argmax=[100])}, " a")
    m = qa_record(rewrite, [], [loc], [loc], "X", [port], ["Lyon"])
    assert m["Port"] == 0.5
    assert m["Port_gen"] == 1.0
    assert m["Gen"] is None


async def test_records_are_scored_then_continued_in_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each phase scores its prompts, then asks for their continuations, before the next phase starts: a
    server keeping scored prompts' states (LRU) still has them when their Generates come."""
    from service.eval import evaluate
    from service.eval.datasets import EvalRecord, Probe

    calls: list[tuple[str, list[str]]] = []

    class Recording:
        async def score_many(self, pairs):
            calls.append(("score", [p for p, _ in pairs]))
            return [scores([-0.1] * len(c.split()), [True] * len(c.split())) for _, c in pairs]

        async def generate_many(self, requests):
            calls.append(("generate", [p for p, _ in requests]))
            return [" yes" for _ in requests]

    records = [
        EvalRecord(i, str(i), f"s{i}", f"q{i}", "yes", "", (f"r{i}",), (Probe(f"l{i}", "no"),))
        for i in range(5)
    ]
    monkeypatch.setattr(evaluate, "PHASE_PROMPTS", 7)  # 3 prompts per record: two records per phase
    out = await evaluate.evaluate_records(records, "zsre", Recording())
    assert [ev.index for ev in out] == [0, 1, 2, 3, 4]
    assert [kind for kind, _ in calls] == ["score", "generate"] * 3
    for (_, scored), (_, continued) in zip(calls[::2], calls[1::2], strict=True):
        assert continued == scored and len(scored) in (6, 3)
    assert out[4].metrics["Rel"] == 1.0 and out[4].metrics["Rel_gen"] == 1.0

"""Why edits fail: per probe, did the record's own edit fire (and on which path), and did the probe pass?

Built from the server's applied_edits on each Score (kept in the progress files), so it separates the two
ways an edit path can fail on an in-scope prompt (the gate / scope detector did not fire: a recall miss;
or it fired and the answer still did not flip: a value / injection too weak) and the way it fails on an
out-of-scope prompt (some edit fired where none should: a false fire).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IN_SCOPE = ("rewrite", "paraphrase")


def _nll(scores: Mapping[str, Any]) -> float:
    lps = scores["logprobs"]
    return -sum(lps) / len(lps)


def probe_passed(fmt: str, group: str, probe: Mapping[str, Any], base: Mapping[str, Any] | None) -> bool:
    """The per-probe criterion behind the headline metric (ES/PS/NS, or Rel/Gen/Loc all tokens)."""
    s = probe["scores"]
    if fmt == "counterfact":
        if group == "locality":
            return _nll(s["true"]) < _nll(s["new"])
        return _nll(s["new"]) < _nll(s["true"])
    if group == "locality":
        if base is None:
            return True
        before, after = base["scores"]["answer"], s["answer"]
        if before.get("argmax") is not None and after.get("argmax") is not None:
            return before["argmax"] == after["argmax"]
        return before["greedy"] == after["greedy"]
    role = "answer" if group == "portability" else "new"
    return all(s[role]["greedy"])


def _fired(probe: Mapping[str, Any]) -> list[list[Any]] | None:
    """The union of applied edits over the probe's scored answers; None when the scorer reports none."""
    lists = [sc.get("applied") for sc in probe["scores"].values()]
    if all(a is None for a in lists):
        return None
    return [e for a in lists if a for e in a]


def diagnose(
    fmt: str,
    evals: Mapping[int, Mapping[str, Any]],
    edits: Mapping[int, Mapping[str, Any]],
    baseline: Mapping[int, Mapping[str, Any]],
) -> dict[str, dict[str, Any]] | None:
    """Counts per probe group for one method; None when the evaluations carry no applied_edits."""
    out: dict[str, dict[str, Any]] = {}
    for index, ev in evals.items():
        own = (edits.get(index) or {}).get("edit_id", "")
        base = baseline.get(index)
        for group, probes in ev["probes"].items():
            for i, probe in enumerate(probes):
                fired = _fired(probe)
                if fired is None:
                    return None
                c = out.setdefault(
                    group,
                    {
                        "probes": 0,
                        "failed": 0,
                        "own_hook": 0,
                        "own_retrieval": 0,
                        "any_fire": 0,
                        "failed_without_own_fire": 0,
                        "regressed": 0,
                        "regressed_with_fire": 0,
                    },
                )
                base_probe = base["probes"][group][i] if base is not None else None
                passed = probe_passed(fmt, group, probe, base_probe)
                own_paths = {path for edit_id, path, _ in fired if edit_id == own and own}
                c["probes"] += 1
                c["failed"] += int(not passed)
                c["own_hook"] += int("hook" in own_paths)
                c["own_retrieval"] += int("retrieval" in own_paths)
                c["any_fire"] += int(bool(fired))
                c["failed_without_own_fire"] += int(not passed and not own_paths)
                # Out of scope, what counts is a probe the unedited model got right and this one does not.
                was_right = base_probe is not None and probe_passed(fmt, group, base_probe, base_probe)
                c["regressed"] += int(was_right and not passed)
                c["regressed_with_fire"] += int(was_right and not passed and bool(fired))
    return out

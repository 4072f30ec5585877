"""The key side of an edit (ROME's k*, Meng et al. 2022) and its gate: the cosine threshold and the
previous-token condition the hook layer checks before it adds the edit's value (hooks/layer.py)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "PREV_THRESHOLD_CAP",
    "SINK_POSITIONS",
    "THRESHOLD_EPS",
    "calibrate_threshold",
    "compute_k_star",
    "previous_token_condition",
]

THRESHOLD_EPS = 1e-3
# A subject that ends within the first tokens of a text ("Crossfire is to debut on"): there, the MLP key
# sees almost no context and has a small, position-like activation (SmolLM2 layer 6: norm ~0.8 at
# positions 0-1 against 3-8 later; cosine ~0.15 with the same subject mid-text). Such rows get their own
# entry (same delta) instead of a share of the main key: measured on 300 CounterFact edits, mixing them in
# set ~1 in 13 thresholds near 0.16-0.2, and those gates fired on unrelated prompts.
SINK_POSITIONS = 2
# Previous-token condition of an entry (see hooks/layer.py): cosine >= min(cap, lowest positive - eps).
# A cap, not a midpoint rule: an edit's own contexts give ~0.9, a caller's paraphrases in other contexts
# less. Chosen on CounterFact records 1000-1918, which the T=1000 evaluation does not use: with
# start-of-text keys (see `_calibrate`), held-out paraphrases where the own edit fires / neighbourhood
# prompts where another record's edit fires were 902/17 at cap 0.5, 895/14 at 0.6, 878/13 at 0.7, against
# 889/23 for a cap of 0.2 without start-of-text keys. Measured with `bench/gate_specificity.py --skip
# 1000`, removed since; `git show 78baab4:bench/gate_specificity.py`.
PREV_THRESHOLD_CAP = 0.6


def compute_k_star(acts: Sequence[torch.Tensor], subject_last: Sequence[int]) -> torch.Tensor:
    """k*: the MLP key (down_proj input) at the subject's last token, averaged over the context prompts."""
    return torch.stack([a[i] for a, i in zip(acts, subject_last, strict=True)]).float().mean(0)


def calibrate_threshold(positives: torch.Tensor, negatives: torch.Tensor) -> tuple[float, str]:
    """Cosine threshold for one entry.

    Rule: positives are the cosines of the stored key with the subject-last-token activation in the
    prompt, in each context-prefixed prompt and in each caller-given paraphrase; negatives are the
    cosines with every token of the fixed probe prompts (service/hooks/probes.py; probes that mention
    the subject are skipped) and with every non-subject token of the edit's own prompts. The threshold
    is the midpoint between max(negatives) and min(positives). If they overlap (min_pos <= max_neg)
    the threshold is max(negatives) + 1e-3: the gate stays shut on every known negative, the positives
    below it will not fire, and the message says so.
    """
    min_pos = float(positives.min())
    max_neg = float(negatives.max()) if negatives.numel() else -1.0
    if min_pos > max_neg:
        return (min_pos + max_neg) / 2.0, ""
    n_miss = int((positives < max_neg + THRESHOLD_EPS).sum())
    return max_neg + THRESHOLD_EPS, (
        f"key overlaps negatives (min positive {min_pos:.3f} <= max negative {max_neg:.3f}): "
        f"{n_miss} of {positives.numel()} positives will not fire"
    )


def previous_token_condition(
    key_acts: Sequence[torch.Tensor], positive_acts: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """The previous-token key (mean activation of the token before the subject's last one, over the key
    rows) and its threshold: PREV_THRESHOLD_CAP, or just below the lowest positive if that is lower."""
    key = torch.stack(list(key_acts)).mean(dim=0)
    kn = F.normalize(key, dim=0)
    lowest = float((F.normalize(torch.stack(list(positive_acts)), dim=-1) @ kn).min())
    return key, min(PREV_THRESHOLD_CAP, lowest - THRESHOLD_EPS)

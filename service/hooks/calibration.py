"""Threshold calibration of an edit's gate at one layer: its keys (ROME's k*) and cosine thresholds.

For one hook layer this reads the activations of the edit's own rows (the context prompts, the
paraphrases and the KL prompt "{subject} is a"), averages k* over the rows where the subject ends,
and sets the threshold between the positives (the subject's last token in each row) and the negatives
(every other token of those rows, and the locality probes' tokens), see `keys.calibrate_threshold`. A
multi-token subject also gets a previous-token condition (`keys.previous_token_condition`). Rows whose
subject ends inside the first SINK_POSITIONS tokens get a second, "start of text" entry.

The editor (hooks/editor.py) calls `calibrate_layer` once per hook layer of an edit; each `Calibration`
becomes one `HookEntry` with the layer's v* (hooks/values.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from service.hooks.keys import SINK_POSITIONS, calibrate_threshold, compute_k_star, previous_token_condition
from service.hooks.layer import NO_PREV_CONDITION, HookEntry, HookManager, HookTable
from service.hooks.locality import LocalityProbes
from service.hooks.rows import Row, pad_right

__all__ = ["Calibration", "calibrate_layer", "key_activations"]


@dataclass
class Calibration:
    """One entry's gate at one layer: its key, threshold and optional previous-token condition."""

    key: torch.Tensor
    threshold: float
    message: str
    prev_key: torch.Tensor | None = None
    prev_threshold: float = NO_PREV_CONDITION

    def entry(self, layer: int, value: torch.Tensor) -> HookEntry:
        return HookEntry("", layer, self.key, value, self.threshold, self.prev_key, self.prev_threshold)


def key_activations(
    hooks: HookManager, layer: int, rows: Sequence[Row], pad_id: int, table: HookTable | None = None
) -> list[torch.Tensor]:
    """Each row's down-projection inputs at `layer` ([tokens, d_ff] float32), under `table` if given
    (else the published one); the forward stops at `layer`."""
    ids, mask = pad_right([r.ids for r in rows], pad_id, hooks.device)
    if table is None:
        acts = hooks.keys_at([layer], ids, mask)[layer]
    else:
        with hooks.table_override(table):
            acts = hooks.keys_at([layer], ids, mask)[layer]
    return [acts[r, : len(row.ids)].float() for r, row in enumerate(rows)]


def calibrate_layer(
    hooks: HookManager,
    probes: LocalityProbes,
    layer: int,
    *,
    ctx: Sequence[Row],
    paras: Sequence[Row],
    kl: Row,
    subject: str,
    pad_id: int,
    table: HookTable | None,
) -> list[Calibration]:
    """The entry keys of one layer: the main key from the rows where the subject ends past the first
    SINK_POSITIONS tokens, and a second, "start of text" key from the rows where it ends inside them
    (their activations are unlike mid-text ones, see SINK_POSITIONS; mixed into one key they
    dragged its threshold down to where it fired on unrelated tokens). For a multi-token subject a
    row also counts as start of text when the token before the last one, the previous-token key,
    is inside them. The KL row ("{subject} is a") is always one of the rows: it is the subject at
    the start of a text, the form a caller's later question often takes, even when no context of
    the edit puts it there."""
    rows = [*ctx, *paras, kl]
    acts = key_activations(hooks, layer, rows, pad_id, table)
    n_ctx = len(ctx)

    def at_start(r: Row) -> bool:
        if r.subject is None:
            return False
        # a multi-token subject whose previous-token key would sit in the sink positions counts too
        multi = int(r.subject[0] < r.subject[1])
        return r.subject[1] < SINK_POSITIONS + multi

    main_ctx = [i for i in range(n_ctx) if not at_start(rows[i])] or list(range(n_ctx))
    start = [i for i, r in enumerate(rows) if at_start(r)]
    neg = []
    for a, r in zip(acts, rows, strict=True):  # every non-subject token of the edit's own prompts
        if r.subject is None:
            continue
        keep = torch.ones(a.shape[0], dtype=torch.bool)
        keep[r.subject[0] : r.subject[1] + 1] = False
        if keep.any():
            neg.append(F.normalize(a[keep], dim=-1))
    neg_units = torch.cat(neg) if neg else None

    def calib(key_rows: list[int], pos_rows: list[int]) -> Calibration:
        key = compute_k_star([acts[i] for i in key_rows], [rows[i].subject[1] for i in key_rows])  # type: ignore[index]
        kn = F.normalize(key, dim=0)
        pos = []
        for i in pos_rows:
            cos = F.normalize(acts[i], dim=-1) @ kn
            # a paraphrase without the literal subject: its best token must fire
            pos.append(cos.max() if rows[i].subject is None else cos[rows[i].subject[1]])
        negs = [] if neg_units is None else [(neg_units @ kn).max()]
        probe_neg = probes.max_cos(layer, kn, subject)
        if probe_neg is not None:
            negs.append(probe_neg)
        thr, msg = calibrate_threshold(torch.stack(pos), torch.stack(negs) if negs else torch.empty(0))
        # The token before the last one, where it is still subject (a one-token subject has none).
        multi = [i for i in key_rows if rows[i].subject[0] < rows[i].subject[1]]  # type: ignore[index]
        if not multi:
            return Calibration(key, thr, msg)
        prev_pos = []
        for i in pos_rows:
            r = rows[i]
            if r.subject is not None:
                if r.subject[0] < r.subject[1]:
                    prev_pos.append(acts[i][r.subject[1] - 1])
            else:  # no literal subject: the token before the one that fires
                t = int((F.normalize(acts[i], dim=-1) @ kn).argmax())
                if t > 0:
                    prev_pos.append(acts[i][t - 1])
        prev_key, prev_thr = previous_token_condition(
            [acts[i][rows[i].subject[1] - 1] for i in multi],  # type: ignore[index]
            prev_pos or [acts[i][rows[i].subject[1] - 1] for i in multi],  # type: ignore[index]
        )
        return Calibration(key, thr, msg, prev_key, prev_thr)

    main_pos = [i for i in range(len(rows) - 1) if i not in start]
    out = [calib(main_ctx, main_pos)]
    if start:
        out.append(calib(start, start))
    return out

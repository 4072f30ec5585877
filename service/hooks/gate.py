"""The gate: the codebook lookup of GRACE / COMEBA-HK over a layer's stored keys, and what it records.

At a hooked down projection the input `h` (the ROME key space) is compared with every stored key of the
layer (`LayerTable`, hooks/table.py):

    cos = normalize(h) @ K_norm^T          one matmul over every stored key of the layer
    best = argmax(cos); fire = cos[best] >= threshold[best]; out[fire] += values[best]

with the previous-token condition (an entry is a candidate at token t only where the activation at t-1
matches its `prev_key`), per-row namespace masks, and the low-precision decode prefilter of large tables.
These are module functions over tensors: the forward hook (`HookManager`, hooks/layer.py) calls
`apply_gate`, and the locality probes (hooks/locality.py) call `gate_decisions` on cached activations
without a forward.

`Recorder` is the per-forward context the gate reads (row switches, per-row tables and scopes, previous
activations) and writes (its `Fire`s, the last activations for the next decode step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from service.hooks.table import (
    PREFILTER_TOP_K,
    PREV_CHECK_TOP_K,
    HookTable,
    LayerTable,
)

__all__ = [
    "Fire",
    "Recorder",
    "apply_gate",
    "best_keys",
    "candidate_keys",
    "gate_decisions",
    "masked_scores",
    "previous_units",
]


@dataclass(frozen=True)
class Fire:
    row: int
    position: int  # index in this forward's input (+ the recorder's position_offset for that row)
    edit_id: str
    score: float
    layer: int


@dataclass(eq=False)
class _PendingFires:
    """One gated layer's deferred decisions, still on the device (see `Recorder.defer`)."""

    layer: int
    t_len: int
    ids: tuple[str, ...]  # the layer table's entry ids
    fire: torch.Tensor  # [tokens] bool
    index: torch.Tensor  # [tokens] entry row of the best candidate
    score: torch.Tensor  # [tokens] its cosine


@dataclass(eq=False)
class Recorder:
    """What `HookManager.recording` yields. `position_offset` lets a decode loop (one new token per
    forward) report absolute positions: an int for every row or one int per row. `prev_keys` (layer ->
    [B, d_ff]) is the activation before each row's first token, for previous-token conditions; the
    forward leaves each gated layer's last-column activations in `last_keys`, which a decode loop passes
    back as the next step's `prev_keys` (left padding keeps every row's last token in the last column).
    `key_columns` (one column per row) asks for the same activations at other columns, in `column_keys`:
    a teacher-forced forward over prompt + continuation keeps them at the prompt's last token."""

    row_enabled: torch.Tensor | None = None
    # Rows served with different tables in one forward (a request keeps the edit set it started with):
    # (table, [rows] bool mask) pairs with disjoint masks, used instead of the published/override table.
    row_tables: list[tuple[HookTable, torch.Tensor]] | None = None
    # Per row, the namespaces whose entries it may fire (None: all); rows naming different namespaces
    # share one gate matmul, masked per row (LayerTable.row_mask).
    row_scopes: Sequence[frozenset[str] | None] | None = None
    fires: list[Fire] = field(default_factory=list)
    position_offset: int | Sequence[int] = 0
    prev_keys: dict[int, torch.Tensor] | None = None
    last_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    key_columns: Sequence[int] | None = None
    column_keys: dict[int, torch.Tensor] = field(default_factory=dict)
    # defer: the gate adds values without reading its decisions back (no host sync inside the forward, for
    # CUDA); the decisions wait in `pending` until the caller copies them to the host with whatever else
    # it copies (the sampled ids) and hands them to `take_pending`.
    defer: bool = False
    pending: list[_PendingFires] = field(default_factory=list)

    def packed_pending(self) -> torch.Tensor:
        """Every deferred decision as one float32 vector: per gated layer, (fire, entry row, score) of each
        token, so they reach the host in one copy."""
        return torch.cat([torch.stack([p.fire.float(), p.index.float(), p.score.float()]).reshape(-1)
                          for p in self.pending])

    def take_pending(self, host: Any) -> None:
        """Record the fires of the deferred decisions from the host copy (numpy) of `packed_pending()`."""
        import numpy as np

        offset = 0
        offs = self.position_offset
        for p in self.pending:
            n = p.fire.numel()
            block = np.asarray(host[offset : offset + 3 * n]).reshape(3, n)
            offset += 3 * n
            for flat in np.nonzero(block[0])[0].tolist():
                row, tpos = divmod(flat, p.t_len)
                off = offs if isinstance(offs, int) else int(offs[row])
                self.fires.append(Fire(row=row, position=tpos + off, edit_id=p.ids[int(block[1, flat])],
                                       score=float(block[2, flat]), layer=p.layer))
        self.pending.clear()

    def resolve(self) -> None:
        """Fetch deferred decisions now (one copy), for callers that do not batch it with anything."""
        if self.pending:
            self.take_pending(self.packed_pending().cpu().numpy())


# ---- codebook lookup ------------------------------------------------------------------------------
def masked_scores(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """[tokens, N] scores with -inf where the token's row may not fire the entry. `allowed` is
    [rows, N], broadcast over each row's tokens without materialising a [tokens, N] mask."""
    if allowed is None:
        return scores
    rows, n = allowed.shape
    grid = scores.view(rows, -1, n).masked_fill(~allowed[:, None, :], -math.inf)
    return grid.view(-1, n)


def best_keys(
    lt: LayerTable, unit: torch.Tensor, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the best key's exact cosine and its row (see PREFILTER_* for large tables)."""
    if lt.prefilter is None or not lt.prefilter.ranks(unit.shape[0]):
        # [tokens, N]: one matmul for all edits (and all namespaces: `allowed` masks per row)
        return masked_scores(unit @ lt.keys.T, allowed).max(dim=-1)
    cand, exact = candidate_keys(lt, unit, PREFILTER_TOP_K, allowed)
    best, j = exact.max(dim=-1)
    return best, cand.gather(1, j[:, None]).squeeze(1)


def candidate_keys(
    lt: LayerTable, unit: torch.Tensor, k: int, allowed: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the rows of (about) the k best keys and their exact cosines, [tokens, k] each; an
    entry `allowed` ([rows, N]) refuses to a token's row scores -inf."""
    k = min(k, len(lt))
    if lt.prefilter is None or not lt.prefilter.ranks(unit.shape[0]):
        exact, cand = masked_scores(unit @ lt.keys.T, allowed).topk(k, dim=-1)
        return cand, exact
    approx = lt.prefilter.scores(unit)
    cand = masked_scores(approx, allowed).topk(k, dim=-1).indices  # [tokens, k]
    exact = torch.einsum("td,tkd->tk", unit, lt.keys[cand])
    if allowed is not None:  # fewer than k allowed entries: the rest of the candidates are refused
        row = torch.arange(unit.shape[0], device=unit.device) // (unit.shape[0] // allowed.shape[0])
        exact = exact.masked_fill(~allowed[row[:, None], cand], -math.inf)
    return cand, exact


def gate_decisions(
    lt: LayerTable,
    unit: torch.Tensor,
    prev_unit: torch.Tensor | None,
    prev_known: torch.Tensor | None,
    allowed: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token (rows of `unit`, unit activations): the winning entry's cosine and row; it fires where
    the cosine reaches its threshold. `prev_unit` holds each token's previous activation (unit rows)
    and `prev_known` whether it is known; where an entry's previous-token condition fails, the entry
    is no candidate (best is -inf where no candidate is left). `allowed` ([rows, N] bool, rows of
    equal token counts) restricts each row to the entries of the namespaces its request named."""
    if lt.prev_keys is None or lt.prev_thresholds is None or prev_unit is None:
        return best_keys(lt, unit, allowed)
    cand, exact = candidate_keys(
        lt, unit, PREFILTER_TOP_K if lt.prefilter is not None else PREV_CHECK_TOP_K, allowed
    )
    prev_cos = torch.einsum("td,tkd->tk", prev_unit, lt.prev_keys[cand])
    ok = prev_cos >= lt.prev_thresholds[cand]
    if prev_known is not None:
        ok |= ~prev_known[:, None]
    best, j = exact.masked_fill(~ok, -math.inf).max(dim=-1)
    return best, cand.gather(1, j[:, None]).squeeze(1)


def previous_units(
    unit: torch.Tensor, rows: int, t_len: int, before: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's previous activation within its row, [rows * t_len, d], and whether it is known.

    Column 0 takes `before` ([rows, d], raw) where given. Without it, a forward of several tokens is
    a fresh prefill: column 0 begins the text, there is no token before it (a zero activation, which
    meets no condition), so a multi-token subject cannot end there. A one-token forward without it
    is a decode step whose caller kept no state: unknown, and the condition holds."""
    d = unit.shape[-1]
    grid = unit.view(rows, t_len, d)
    known = torch.ones(rows, t_len, dtype=torch.bool, device=unit.device)
    if before is not None and before.shape == (rows, d):
        first = F.normalize(before.to(unit.device, unit.dtype), dim=-1)[:, None]
    else:
        first = torch.zeros(rows, 1, d, dtype=unit.dtype, device=unit.device)
        known[:, 0] = t_len > 1
    prev = torch.cat([first, grid[:, :-1]], dim=1)
    return prev.reshape(-1, d), known.reshape(-1)


# ---- the gate at a down projection ----------------------------------------------------------------
def apply_gate(
    lt: LayerTable,
    h: torch.Tensor,
    out: torch.Tensor,
    layer: int,
    rec: Recorder | None,
    rows_of_table: torch.Tensor | None = None,
    scopes: Sequence[frozenset[str] | None] | frozenset[str] | None = None,
) -> torch.Tensor:
    """`out` (the MLP output) plus, at every token of `h` (the down projection's input) where the gate
    fires, the winning entry's value; `out` itself where nothing fires. Records fires (or defers them)
    and the activations a decode loop needs in `rec`. `rows_of_table` limits this table to those rows;
    `scopes` is one namespace set for every row or one per row."""
    shape = out.shape
    t_len = h.shape[-2] if h.dim() >= 2 else 1
    hf = h.reshape(-1, h.shape[-1])
    rows = hf.shape[0] // t_len
    if rec is not None:  # a copy: a view would keep the whole forward's activations alive in a KV state
        grid = hf.view(rows, t_len, -1)
        rec.last_keys[layer] = grid[:, -1].detach().clone()
        if rec.key_columns is not None:
            cols = torch.tensor(list(rec.key_columns), dtype=torch.long, device=grid.device)
            rec.column_keys[layer] = grid[torch.arange(rows, device=grid.device), cols].detach().clone()
    unit = F.normalize(hf.float(), dim=-1)
    prev_unit = prev_known = None
    if lt.prev_keys is not None:
        before = None if rec is None or rec.prev_keys is None else rec.prev_keys.get(layer)
        prev_unit, prev_known = previous_units(unit, rows, t_len, before)
    allowed = None
    if isinstance(scopes, frozenset):  # one scope for every row (a scoped table override)
        mask = lt.entry_mask(scopes)
        allowed = None if mask is None else mask[None, :].expand(rows, -1)
    elif scopes is not None:
        allowed = lt.row_mask(scopes)
    best, idx = gate_decisions(lt, unit, prev_unit, prev_known, allowed)
    fire = best >= lt.thresholds[idx]
    if rec is not None and rec.row_enabled is not None:
        fire &= rec.row_enabled.to(fire.device).repeat_interleave(t_len)
    if rows_of_table is not None:  # this table serves these rows only
        fire &= rows_of_table.to(fire.device).repeat_interleave(t_len)
    if rec is not None and rec.defer:
        # No data-dependent branch: every token adds its best entry's value times fire (0 or 1).
        rec.pending.append(_PendingFires(layer, t_len, lt.ids, fire, idx, best))
        add = lt.values[idx].to(out.dtype) * fire[:, None].to(out.dtype)
        return (out.reshape(-1, shape[-1]) + add).view(shape)
    pos = fire.nonzero().squeeze(1)
    if pos.numel() == 0:
        return out  # nothing fired: output untouched
    sel = idx[pos]
    flat = out.reshape(-1, shape[-1]).index_add(0, pos, lt.values[sel].to(out.dtype))
    if rec is not None:
        offs = rec.position_offset
        for p, i, s in zip(pos.tolist(), sel.tolist(), best[pos].tolist(), strict=True):
            row, tpos = divmod(p, t_len)
            off = offs if isinstance(offs, int) else int(offs[row])
            rec.fires.append(Fire(row=row, position=tpos + off, edit_id=lt.ids[i], score=s, layer=layer))
    return flat.view(shape)

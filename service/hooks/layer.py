"""Hook layers: gated side memory attached to chosen MLP modules (base weights are never written).

Each hooked MLP's down projection (found per architecture, see hooks/arch.py) gets a forward hook that
reads its INPUT (the ROME key space: act(gate(x)) * up(x) for gated MLPs) and adds to its output, the MLP
output, the value of the best-matching stored edit where that edit's cosine gate passes:

    cos = normalize(h) @ K_norm^T          one matmul over every stored key of the layer
    best = argmax(cos); fire = cos[best] >= threshold[best]; out[fire] += values[best]

An entry may also carry a previous-token condition (`prev_key`, `prev_threshold`): it is a candidate at
token t only where the activation at t-1 matches the key of the token before the subject's last one.
A last-token key alone cannot tell "Patna University" from "Beykent University" (same last token, little
context at a low layer); the pair can. The argmax runs over the candidates that meet that condition.
For the first token of a forward, t-1 comes from `Recorder.prev_keys` (a decode loop passes the last
activation of the previous step, `Recorder.last_keys`). Where nobody passes it, a forward of several
tokens starts the text (nothing precedes its first token, which meets no condition) and a one-token
forward is a decode step without state (unknown: the condition holds, the last-token gate alone).

Tables are immutable snapshots; `HookManager.publish` swaps a reference and every hook call reads the
reference once, so a swap between forward passes is atomic. All per-request switches (recording,
disabled, intervention, captures, table override) are thread-local, so the editor can optimise and
measure on the serving model while other threads keep generating with the published table.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.hooks.arch import UnsupportedArchitecture, decoder_layers, find_hook_sites
from service.hooks.table import (
    NO_PREV_CONDITION,
    PREFILTER_MAX_TOKENS,
    PREFILTER_TOP_K,
    PREV_CHECK_TOP_K,
    HookEntry,
    HookTable,
    LayerTable,
)

__all__ = [
    "Capture",
    "Fire",
    "HookEntry",
    "HookManager",
    "HookTable",
    "LayerTable",
    "NO_PREV_CONDITION",
    "Recorder",
    "StopForward",
    "UnsupportedArchitecture",
    "decoder_layers",
    "param_checksum",
]



@dataclass(frozen=True)
class Fire:
    row: int
    position: int  # index in this forward's input (+ the recorder's position_offset for that row)
    edit_id: str
    score: float
    layer: int


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


@dataclass(eq=False)
class _PendingFires:
    layer: int
    t_len: int
    ids: tuple[str, ...]  # the layer table's entry ids
    fire: torch.Tensor  # [tokens] bool
    index: torch.Tensor  # [tokens] entry row of the best candidate
    score: torch.Tensor  # [tokens] its cosine


@dataclass(eq=False)
class Capture:
    """What `HookManager.capture_keys` yields: `.value` is the last down_proj input seen, [B, T, d_ff]."""

    layer: int
    value: torch.Tensor | None = None
    stop: bool = False


class StopForward(Exception):
    """Raised by a stopping capture once its layer is reached, so the layers above are not computed."""


@dataclass(eq=False)
class _Intervention:
    rows: torch.Tensor
    positions: torch.Tensor
    delta: torch.Tensor  # [d_model] or [len(positions), d_model]


class _ThreadState(threading.local):
    # threading.local subclass: these defaults exist fresh in every thread.
    def __init__(self) -> None:
        self.recorder: Recorder | None = None
        self.disabled = 0
        self.override: HookTable | None = None
        self.interventions: dict[int, list[_Intervention]] = {}
        self.captures: dict[int, list[Capture]] = {}
        self.block_shapes: dict[int, tuple[int, int]] = {}


class HookManager:
    """Hooks the MLP down projections of `layers` and holds the published `HookTable`."""

    def __init__(self, model: nn.Module, layers: Sequence[int], *, spare_layers: Sequence[int] = ()) -> None:
        """`layers`: where an edit goes unless it names others (`default_layers`). `spare_layers` are hooked
        too, for edits whose layer is chosen per edit; a hooked layer without entries costs a no-op hook."""
        self.model = model
        self.default_layers = sorted({int(i) for i in layers})
        if not self.default_layers:
            raise ValueError("HookManager needs at least one layer")
        self.layers = sorted(set(self.default_layers) | {int(i) for i in spare_layers})
        self.sites = find_hook_sites(model, self.layers)  # UnsupportedArchitecture where one cannot be
        self._tls = _ThreadState()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        widths = {(s.d_ff, s.d_model) for s in self.sites.values()}
        if len(widths) != 1:
            raise UnsupportedArchitecture(f"hook layers {self.layers} differ in MLP widths {sorted(widths)}")
        self.d_ff, self.d_model = widths.pop()
        blocks = decoder_layers(model)
        for i, site in self.sites.items():
            self._handles.append(site.module.register_forward_hook(self._make_hook(i)))
            block_hook = self._make_block_hook(i)
            self._handles.append(blocks[i].register_forward_pre_hook(block_hook, with_kwargs=True))
        self._table = HookTable.empty(self.device, self.dtype)

    # ---- table --------------------------------------------------------------------------------
    @property
    def current(self) -> HookTable:
        return self._table

    def publish(self, table: HookTable) -> None:
        """Atomic swap: forwards already running keep the table they read at their start."""
        self._check(table)
        self._table = table

    def empty_table(self, *, version: int = 0) -> HookTable:
        return HookTable.empty(self.device, self.dtype, version=version)

    def _check(self, table: HookTable) -> None:
        for i, t in table.layers.items():
            if i not in self.sites:
                raise ValueError(f"table has entries for layer {i}, which is not hooked ({self.layers})")
            if t.keys.shape[1] != self.d_ff or t.values.shape[1] != self.d_model:
                raise ValueError(
                    f"layer {i}: key/value sizes {t.keys.shape[1]}/{t.values.shape[1]} "
                    f"!= model {self.d_ff}/{self.d_model}"
                )

    def _active_table(self) -> HookTable:
        st = self._tls
        return st.override if st.override is not None else self._table

    # ---- thread-local switches --------------------------------------------------------------
    @contextmanager
    def recording(self, row_enabled: torch.Tensor | None = None) -> Iterator[Recorder]:
        st = self._tls
        rec = Recorder(row_enabled=None if row_enabled is None else row_enabled.to(torch.bool))
        prev, st.recorder = st.recorder, rec
        try:
            yield rec
        finally:
            st.recorder = prev

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """No table edits in this thread (unedited baselines while other threads serve with edits)."""
        st = self._tls
        st.disabled += 1
        try:
            yield
        finally:
            st.disabled -= 1

    @contextmanager
    def table_override(self, table: HookTable) -> Iterator[HookTable]:
        """Use `table` instead of the published one, in this thread only (quality checks of new edits)."""
        self._check(table)
        st = self._tls
        prev, st.override = st.override, table
        try:
            yield table
        finally:
            st.override = prev

    @contextmanager
    def intervention(
        self,
        layer: int,
        positions: Sequence[tuple[int, int]],
        delta: torch.Tensor,
        *,
        with_table: bool = False,
    ) -> Iterator[None]:
        """Add `delta` ([d_model] or [len(positions), d_model]; may require grad) at (row, position) of
        `layer`'s MLP output, in this thread. The table is off meanwhile unless `with_table`."""
        if layer not in self.sites:
            raise ValueError(f"layer {layer} is not hooked ({self.layers})")
        rows = torch.tensor([p[0] for p in positions], dtype=torch.long, device=self.device)
        pos = torch.tensor([p[1] for p in positions], dtype=torch.long, device=self.device)
        iv = _Intervention(rows, pos, delta)
        st = self._tls
        st.interventions.setdefault(layer, []).append(iv)
        if not with_table:
            st.disabled += 1
        try:
            yield
        finally:
            if not with_table:
                st.disabled -= 1
            st.interventions[layer].remove(iv)
            if not st.interventions[layer]:
                del st.interventions[layer]

    @contextmanager
    def capture_keys(self, layer: int, *, stop: bool = False) -> Iterator[Capture]:
        """Yield a Capture whose `.value` is the last down_proj input [B, T, d_ff] seen at `layer` in this
        thread. With `stop=True` the forward raises `StopForward` right after (layers above are skipped)."""
        if layer not in self.sites:
            raise ValueError(f"layer {layer} is not hooked ({self.layers})")
        cap = Capture(layer=layer, stop=stop)
        st = self._tls
        st.captures.setdefault(layer, []).append(cap)
        try:
            yield cap
        finally:
            st.captures[layer].remove(cap)
            if not st.captures[layer]:
                del st.captures[layer]

    @torch.no_grad()
    def keys_at(
        self, layers: Sequence[int], input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> dict[int, torch.Tensor]:
        """down_proj inputs at `layers` for a batch, stopping the forward after the highest of them."""
        layers = sorted(set(layers))
        caps: dict[int, Capture] = {}
        with ExitStack() as stack:
            for i in layers:
                caps[i] = stack.enter_context(self.capture_keys(i, stop=(i == layers[-1])))
            try:
                self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            except StopForward:
                pass
        out = {}
        for i, c in caps.items():
            if c.value is None:
                raise RuntimeError(f"layer {i} was not reached")
            out[i] = c.value
        return out

    # ---- the forward ---------------------------------------------------------------------------
    def _make_block_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        tls = self._tls

        def pre_hook(_mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            # The block's [batch, tokens] shape: OPT flattens its MLP input to [batch * tokens, width].
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
                tls.block_shapes[layer] = (hidden.shape[0], hidden.shape[1])

        return pre_hook

    def _make_hook(self, layer: int):  # noqa: ANN202 - torch hook signature
        tls = self._tls

        def hook(_mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor | None:
            h = args[0]
            if h.dim() == 2:  # flattened tokens: give the gate its [batch, tokens, width] view back
                shape = tls.block_shapes.get(layer)
                if shape is not None and shape[0] * shape[1] == h.shape[0]:
                    res = self._on_down_projection(layer, h.view(*shape, -1), out.view(*shape, -1))
                    return None if res is None else res.reshape(out.shape)
            return self._on_down_projection(layer, h, out)

        return hook

    def _on_down_projection(self, layer: int, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """Forward hook of a down projection: `h` is its input (the key), `out` the MLP output. Returns
        None (output untouched, bit for bit) unless an edit, a capture or an intervention applies."""
        st = self._tls
        rec = st.recorder
        table = st.override if st.override is not None else self._table  # read ONCE per forward
        groups: list[tuple[LayerTable, torch.Tensor | None]] = []
        if not st.disabled:
            if rec is not None and rec.row_tables:
                groups = [(lt, rows) for t, rows in rec.row_tables if (lt := t.layer(layer)) is not None]
            elif (lt := table.layer(layer)) is not None:
                groups = [(lt, None)]
        caps = st.captures.get(layer)
        ivs = st.interventions.get(layer)
        if not groups and caps is None and ivs is None:
            return None
        if caps:
            stop = False
            for c in caps:
                c.value = h
                stop = stop or c.stop
            if stop:
                raise StopForward(layer)
        scopes: Sequence[frozenset[str] | None] | frozenset[str] | None = table.scope
        if rec is not None and rec.row_scopes is not None:
            scopes = rec.row_scopes
        for lt, rows in groups:
            out = self._gate(lt, h, out, layer, rec, rows, scopes)
        if ivs:
            for iv in ivs:
                out = out.index_put((iv.rows, iv.positions), iv.delta.to(out.dtype), accumulate=True)
        return out

    @staticmethod
    def _masked(scores: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """[tokens, N] scores with -inf where the token's row may not fire the entry. `allowed` is
        [rows, N], broadcast over each row's tokens without materialising a [tokens, N] mask."""
        if allowed is None:
            return scores
        rows, n = allowed.shape
        grid = scores.view(rows, -1, n).masked_fill(~allowed[:, None, :], -math.inf)
        return grid.view(-1, n)

    @staticmethod
    def _best_keys(
        lt: LayerTable, unit: torch.Tensor, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: the best key's exact cosine and its row (see PREFILTER_* for large tables)."""
        if lt.prefilter is None or unit.shape[0] > PREFILTER_MAX_TOKENS:
            # [tokens, N]: one matmul for all edits (and all namespaces: `allowed` masks per row)
            return HookManager._masked(unit @ lt.keys.T, allowed).max(dim=-1)
        cand, exact = HookManager._candidates(lt, unit, PREFILTER_TOP_K, allowed)
        best, j = exact.max(dim=-1)
        return best, cand.gather(1, j[:, None]).squeeze(1)

    @staticmethod
    def _candidates(
        lt: LayerTable, unit: torch.Tensor, k: int, allowed: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per token: the rows of (about) the k best keys and their exact cosines, [tokens, k] each; an
        entry `allowed` ([rows, N]) refuses to a token's row scores -inf."""
        k = min(k, len(lt))
        if lt.prefilter is None or unit.shape[0] > PREFILTER_MAX_TOKENS:
            exact, cand = HookManager._masked(unit @ lt.keys.T, allowed).topk(k, dim=-1)
            return cand, exact
        q, scales = lt.prefilter
        approx = torch._weight_int8pack_mm(unit.to(torch.bfloat16).contiguous(), q, scales)
        cand = HookManager._masked(approx, allowed).topk(k, dim=-1).indices  # [tokens, k]
        exact = torch.einsum("td,tkd->tk", unit, lt.keys[cand])
        if allowed is not None:  # fewer than k allowed entries: the rest of the candidates are refused
            row = torch.arange(unit.shape[0], device=unit.device) // (unit.shape[0] // allowed.shape[0])
            exact = exact.masked_fill(~allowed[row[:, None], cand], -math.inf)
        return cand, exact

    @staticmethod
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
            return HookManager._best_keys(lt, unit, allowed)
        cand, exact = HookManager._candidates(
            lt, unit, PREFILTER_TOP_K if lt.prefilter is not None else PREV_CHECK_TOP_K, allowed
        )
        prev_cos = torch.einsum("td,tkd->tk", prev_unit, lt.prev_keys[cand])
        ok = prev_cos >= lt.prev_thresholds[cand]
        if prev_known is not None:
            ok |= ~prev_known[:, None]
        best, j = exact.masked_fill(~ok, -math.inf).max(dim=-1)
        return best, cand.gather(1, j[:, None]).squeeze(1)

    @staticmethod
    def _previous_units(
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

    @staticmethod
    def _gate(
        lt: LayerTable,
        h: torch.Tensor,
        out: torch.Tensor,
        layer: int,
        rec: Recorder | None,
        rows_of_table: torch.Tensor | None = None,
        scopes: Sequence[frozenset[str] | None] | frozenset[str] | None = None,
    ) -> torch.Tensor:
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
            prev_unit, prev_known = HookManager._previous_units(unit, rows, t_len, before)
        allowed = None
        if isinstance(scopes, frozenset):  # one scope for every row (a scoped table override)
            mask = lt.entry_mask(scopes)
            allowed = None if mask is None else mask[None, :].expand(rows, -1)
        elif scopes is not None:
            allowed = lt.row_mask(scopes)
        best, idx = HookManager.gate_decisions(lt, unit, prev_unit, prev_known, allowed)
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

    def uninstall(self) -> None:
        """Remove the forward hooks: the model is exactly as it was loaded."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def param_checksum(model: nn.Module) -> str:
    """sha256 over every parameter (name, dtype, shape, bytes): equal before and after any edits, because the
    hooks only read activations and add to outputs; nothing here writes a parameter."""
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()

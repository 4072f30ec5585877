"""Hook layers: gated side memory attached to chosen MLP modules (base weights are never written).

Each hooked MLP's down projection (found per architecture, see hooks/arch.py) gets a forward hook that
reads its INPUT (the ROME key space: act(gate(x)) * up(x) for gated MLPs) and adds to its output, the MLP
output, the value of the best-matching stored edit where that edit's cosine gate passes (the gate, a
codebook lookup over the layer's keys, is hooks/gate.py; this module installs it and holds the switches):

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

import threading
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.hooks.arch import UnsupportedArchitecture, decoder_layers, find_hook_sites
from service.hooks.gate import Fire, Recorder, apply_gate
from service.hooks.table import NO_PREV_CONDITION, HookEntry, HookTable, LayerTable

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
            out = apply_gate(lt, h, out, layer, rec, rows, scopes)
        if ivs:
            for iv in ivs:
                out = out.index_put((iv.rows, iv.positions), iv.delta.to(out.dtype), accumulate=True)
        return out

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

"""The quality gate's locality check: fixed probe prompts, their activations at each hooked layer and the
published table's gate decisions on them, cached, and the exact top-1 change and KL a new edit causes on
them (forwarding only the probes whose gate decision it changes).

Activations at layer l only change when the table's entries BELOW l change (the gate adds after the key
is read), so they are keyed on the lower layers' ids; decisions are keyed on the table object.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.hooks.arch import base_model, final_logits
from service.hooks.gate import gate_decisions
from service.hooks.layer import HookEntry, HookManager, HookTable, LayerTable
from service.hooks.rows import pad_right

__all__ = ["LocalityProbes", "ProbeActs"]


@dataclass
class ProbeActs:
    """One layer's probe activations, flattened over the probes' tokens."""

    sig: Any  # the lower layers' entries these activations were computed under
    unit: torch.Tensor  # [tokens, d_ff] unit activations
    probe_of: torch.Tensor  # [tokens] probe index of each token
    # [tokens, d_ff] the previous token's unit activation; zeros at a probe's start, where nothing precedes
    # it (as in a fresh prefill: no previous-token condition is met there)
    prev_unit: torch.Tensor
    prev_known: torch.Tensor  # [tokens] all True here

    def decisions(self, lt: LayerTable) -> tuple[torch.Tensor, torch.Tensor]:
        return gate_decisions(lt, self.unit, self.prev_unit, self.prev_known)


class LocalityProbes:
    """Probe activations (per hooked layer) and the published table's gate decisions on them."""

    def __init__(self, model: nn.Module, tokenizer: Any, hooks: HookManager, texts: Sequence[str],
                 pad_id: int) -> None:
        self.model, self.tok, self.hooks, self.pad_id = model, tokenizer, hooks, pad_id
        self.texts = list(texts)
        self.by_layer: dict[int, ProbeActs] = {}
        self.decided: dict[int, tuple[HookTable, torch.Tensor, torch.Tensor]] = {}  # (table, best, fired)
        self._rows: list[list[int]] | None = None

    def rows(self) -> list[list[int]]:
        if self._rows is None:
            self._rows = [list(self.tok(t)["input_ids"]) for t in self.texts]
        return self._rows

    def mask(self, subjects: Sequence[str]) -> torch.Tensor:
        low = [s.strip().lower() for s in subjects]
        return torch.tensor([not any(s in t.lower() for s in low) for t in self.texts])

    @staticmethod
    def _sig(table: HookTable, layer: int, layers: Sequence[int]) -> tuple[Any, ...]:
        return tuple((i, t.ids) for i in layers if i < layer and (t := table.layer(i)) is not None)

    def activations(self, table: HookTable, layers: Sequence[int]) -> None:
        cached, hooked = self.by_layer, self.hooks.layers
        need = [i for i in layers if i not in cached or cached[i].sig != self._sig(table, i, hooked)]
        if not need:
            return
        rows = self.rows()
        ids, mask = pad_right(rows, self.pad_id, self.hooks.device)
        with self.hooks.table_override(table):
            acts = self.hooks.keys_at(need, ids, mask)
        real = mask.bool()
        probe_of = torch.arange(len(rows), device=real.device)[:, None].expand_as(real)[real]
        starts = torch.ones_like(probe_of, dtype=torch.bool)
        starts[1:] = probe_of[1:] != probe_of[:-1]
        for i in need:
            unit = F.normalize(acts[i][real].float(), dim=-1)
            prev = torch.cat([torch.zeros_like(unit[:1]), unit[:-1]]).masked_fill(starts[:, None], 0.0)
            sig = self._sig(table, i, self.hooks.layers)
            self.by_layer[i] = ProbeActs(sig, unit, probe_of, prev, torch.ones_like(starts))

    def decisions(self, table: HookTable, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.decided.get(layer)
        if cached is not None and cached[0] is table:
            return cached[1], cached[2]
        self.activations(table, [layer])
        pa = self.by_layer[layer]
        lt = table.layer(layer)
        if lt is None:
            best = torch.full((pa.unit.shape[0],), -math.inf, device=pa.unit.device)
            fired = torch.zeros(pa.unit.shape[0], dtype=torch.bool, device=pa.unit.device)
        else:
            best, idx = pa.decisions(lt)
            fired = best >= lt.thresholds[idx]
        self.decided[layer] = (table, best, fired)
        return best, fired

    def max_cos(self, layer: int, kn: torch.Tensor, subject: str) -> torch.Tensor | None:
        self.activations(self.hooks.current, [layer])
        pa = self.by_layer[layer]
        keep = self.mask([subject]).to(pa.probe_of.device)[pa.probe_of]
        if not keep.any():
            return None
        return (pa.unit[keep] @ kn.to(pa.unit.device)).max()

    @torch.no_grad()
    def drift(
        self, published: HookTable, override: HookTable, new: Sequence[HookEntry], subjects: Sequence[str]
    ) -> tuple[float, float]:
        """Top-1 change rate and mean KL over the probes, exactly, forwarding only the affected probes.

        A probe's output can change only where the new entries change a gate decision (the new entry wins
        the argmax and it or the previous winner would fire). Layers are visited bottom-up; a probe with
        no change below layer l has unchanged activations at l, so the cached ones are exact there.
        """
        include = self.mask(subjects)
        n_inc = int(include.sum())
        if n_inc == 0:
            return 0.0, 0.0
        affected = torch.zeros(len(self.texts), dtype=torch.bool)
        for layer in self.hooks.layers:
            mine = [e for e in new if e.layer == layer]
            if not mine:
                continue
            best, fired = self.decisions(published, layer)
            pa = self.by_layer[layer]
            lt_new = HookTable.build(mine, pa.unit.device).layer(layer)
            assert lt_new is not None
            smax, sarg = pa.decisions(lt_new)
            changed = (smax > best) & (fired | (smax >= lt_new.thresholds[sarg]))
            affected[pa.probe_of[changed].cpu()] = True
        affected &= include
        idx = affected.nonzero().squeeze(1).tolist()
        if not idx:
            return 0.0, 0.0
        rows = [self.rows()[i] for i in idx]
        before = self.last_logprobs(rows, published)
        after = self.last_logprobs(rows, override)
        top1 = int((before.argmax(-1) != after.argmax(-1)).sum())
        kl = float(F.kl_div(after, before, log_target=True, reduction="sum"))
        return top1 / n_inc, kl / n_inc

    def last_logprobs(self, rows: Sequence[Sequence[int]], table: HookTable) -> torch.Tensor:
        ids, mask = pad_right(rows, self.pad_id, self.hooks.device)
        with self.hooks.table_override(table):
            hs = base_model(self.model)(input_ids=ids, attention_mask=mask).last_hidden_state
        last = mask.sum(-1) - 1
        logits = final_logits(self.model, hs[torch.arange(len(rows), device=ids.device), last])
        return torch.log_softmax(logits.float(), dim=-1)

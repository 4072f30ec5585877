"""The value side of an edit: ROME's v* (Meng et al. 2022) as a residual delta added to the hooked
MLP's output at the subject's last token, found by a short optimisation so the target follows the prompt
in every context (`compute_delta`, alias `compute_v_star`)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.hooks.arch import base_model, final_logits
from service.hooks.layer import HookManager
from service.hooks.rows import Row, pad_left, pad_right
from service.kvcache import full_width_cache

__all__ = [
    "DeltaFit",
    "DeltaProblem",
    "VSTAR",
    "VStarSettings",
    "compute_delta",
    "compute_v_star",
]

# v*'s optimiser: Adam's step size and the early stop (mean target-token NLL, once every target token is
# the argmax). Adam moves every coordinate by about lr per step, so lr sets how fast ||delta|| grows
# towards the ~2-3 x ref_norm most edits need. Measured side by side (sequential edits, hook path only)
# with `bench/vstar_settings.py`, removed since; `git show 78baab4:bench/vstar_settings.py`. lr 1.0 /
# stop 0.1 -> 2.0 / 0.15: zsRE records 0-39, 15.9 -> 11.9 steps, 3.75 -> 2.95 s per edit, Rel .990 ->
# .990, Gen .817 -> .830; CounterFact records 0-59, 9.2 -> 6.2 steps, 1.89 -> 1.38 s, ES 1.00 -> 1.00,
# PS .950 -> .933, NS .733 -> .733. lr 3.0 was no faster than 2.0 (12.3 steps; more overshoot at the
# norm clamp); a line search along the first gradient saved one step and cost as much in forwards. Then
# (same script, same records) a first step of 2.5 x ref_norm along the normalised first gradient (see
# `_first_step`) and the stop at NLL 0.25:
# zsRE 0-29, 12.3 -> 10.4 steps, Rel .987 -> .994, Gen .869 -> .840, behind the own descriptor block
# Rel .966 -> .990, Gen .922 -> .928; CounterFact 0-59, 6.2 -> 5.4 steps, ES 1.00 -> 1.00, PS .933 -> .917,
# NS .733 -> .733, own block PS .983 -> .983. Weight decay 0 or a clamp of 6 changed no step count.
@dataclass(frozen=True)
class VStarSettings:
    """v*'s hyper-parameters in one place (as ROME's compute_v takes them). loss = mean target NLL +
    kl_factor * KL(orig || edited) on "{subject} is a" + weight_decay * ||delta||^2 / ||MLP out||^2."""

    lr: float = 2.0  # Adam's step size
    max_steps: int = 25
    kl_factor: float = 0.0625  # ROME's
    weight_decay: float = 0.05
    clamp_factor: float = 4.0  # ||delta|| <= clamp_factor * ||MLP out||
    nll_stop: float = 0.25  # early stop: every target token the argmax and the mean NLL below this
    first_step: float = 2.5  # first step: this x ||MLP out|| along the normalised first gradient


VSTAR = VStarSettings()
# The layer walk is used only if it reproduces the model's own forward this closely (torch.allclose).
WALK_TOLERANCE = 1e-4


def _kv_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(lay.keys, lay.values) for lay in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


def _fresh_cache(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> Any:
    cache = full_width_cache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    return cache


@dataclass
class DeltaProblem:
    """Context prompts "{prefix}{prompt} {target}" (target without its last token) plus the KL prompt,
    split at the subject's last token: the part before it does not depend on the delta."""

    rows: list[Row]  # context rows then the KL row
    n_ctx: int
    prompt_lens: list[int]  # tokens of "{prefix}{prompt}" per context row
    target_ids: list[int]
    # The last n_serving context rows are EditSpec.serving_contexts: in the loss, but not in the early
    # stop's mean NLL. The target is easy behind its own descriptor, and counting those rows stopped the
    # fit with a value too weak for the bare prompt (measured: hook-path Gen fell .790 -> .740 on zsRE).
    n_serving: int = 0


class _SuffixRunner:
    """The suffix forward of v*'s optimisation, from just above the lowest hooked layer.

    Nothing up to the lowest hooked layer's MLP output depends on the delta (it is added to that output,
    and no hook sits lower), and the decoder layer adds that output to the residual stream, so the layer's
    output with the delta is its output without it plus the delta at the subject's last token. That
    output is computed once (hooks off, as v* runs them) and every step runs only the layers above it:
    for SmolLM2's layer 6 of 30, 23 of 30 layers per step. The causal mask and the rotary embeddings do
    not change between steps either and are built once. This walks the decoder layers itself (the
    Llama-family layout: `layers`, `rotary_emb`, `norm`); the first use per model is checked against the
    model's own forward, and a model whose layout differs falls back to the full forward with the
    deltas as hook interventions.
    """

    # model -> whether the layer walk reproduces the model's own forward
    _verified: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()

    def __init__(
        self,
        model: nn.Module,
        hooks: HookManager,
        kv: list[tuple[torch.Tensor, torch.Tensor]],
        ids: torch.Tensor,
        mask: torch.Tensor,
        pos: torch.Tensor,
        first: int,
    ) -> None:
        self.model, self.hooks, self.base, self.kv = model, hooks, base_model(model), kv
        self.ids, self.mask, self.pos, self.first = ids, mask, pos, first
        # the delta goes to every row's first suffix token: the subject's last token
        self.positions = [(r, 0) for r in range(ids.shape[0])]
        self._mask_rope: tuple[Any, Any] | None = None
        self.after_first: torch.Tensor | None = None  # hidden state leaving layer `first`, delta = 0
        # The walk builds one full causal mask: with a sliding window shorter than these rows it would
        # let tokens see further back than the model does (such rows take the model's own forward).
        window = getattr(model.config, "sliding_window", None)
        ok = not window or self.mask.shape[1] <= int(window)
        if ok:
            ok = self._verified.get(model)
            if ok is None:
                ok = self._verify()
                self._verified[model] = ok
        if ok:
            with torch.no_grad():
                entry = self._walk(self.base.embed_tokens(ids), 0, first)  # with the calling thread's table
                with hooks.disabled():
                    self.after_first = self._walk(entry, first, first + 1)

    def forward(self, deltas: dict[int, torch.Tensor]) -> torch.Tensor:
        """last_hidden_state of the suffix with `deltas` (hooked layer -> [d_model]) added at the
        subject's last token and the hook table off (the published edits do not gate v*'s own rows)."""
        with ExitStack() as stack:
            for i, d in deltas.items():
                if self.after_first is None or i != self.first:
                    stack.enter_context(self.hooks.intervention(i, self.positions, d))
            stack.enter_context(self.hooks.disabled())
            if self.after_first is None:
                cache = _fresh_cache(self.kv) if self.kv else None
                return self.base(
                    input_ids=self.ids,
                    attention_mask=self.mask,
                    position_ids=self.pos,
                    past_key_values=cache,
                    use_cache=cache is not None,
                ).last_hidden_state
            h = self.after_first
            if self.first in deltas:
                rows = torch.arange(h.shape[0], device=h.device)
                at = (rows, torch.zeros_like(rows))
                h = h.index_put(at, deltas[self.first].to(h.dtype), accumulate=True)
            return self.base.norm(self._walk(h, self.first + 1, len(self.base.layers)))

    def _walk(self, h: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        cache = _fresh_cache(self.kv) if self.kv else None
        causal, rope = self._mask_and_rope(h, cache)
        for layer in self.base.layers[lo:hi]:
            out = layer(
                h,
                attention_mask=causal,
                position_embeddings=rope,
                position_ids=self.pos,
                past_key_values=cache,
                use_cache=cache is not None,
            )
            h = out[0] if isinstance(out, tuple) else out
        return h

    def _mask_and_rope(self, h: torch.Tensor, cache: Any) -> tuple[Any, Any]:
        if self._mask_rope is None:
            from transformers.masking_utils import create_causal_mask

            causal = create_causal_mask(
                config=self.base.config,
                inputs_embeds=h,
                attention_mask=self.mask,
                past_key_values=cache,
                position_ids=self.pos,
            )
            self._mask_rope = (causal, self.base.rotary_emb(h, position_ids=self.pos))
        return self._mask_rope

    def _verify(self) -> bool:
        """Whether the walk reproduces the model's own forward, with no delta and with a delta: a block
        whose output is not linear in its MLP output (Gemma-2's post-MLP norm) fails the second check."""
        if not all(hasattr(self.base, a) for a in ("layers", "rotary_emb", "norm", "embed_tokens")):
            return False
        real = self.mask[:, -self.ids.shape[1] :].bool()
        try:
            with torch.no_grad(), self.hooks.disabled():
                n_layers = len(self.base.layers)
                entry = self._walk(self.base.embed_tokens(self.ids), 0, self.first)
                after = self._walk(entry, self.first, self.first + 1)
                if not torch.allclose(
                    self.base.norm(self._walk(after, self.first + 1, n_layers))[real],
                    self._reference({})[real],
                    atol=WALK_TOLERANCE,
                    rtol=WALK_TOLERANCE,
                ):
                    return False
                gen = torch.Generator().manual_seed(0)
                delta = torch.randn(after.shape[-1], generator=gen)
                scale = after[:, 0].float().norm(dim=-1).mean().cpu() / delta.norm()
                delta = (delta * scale).to(after.device, after.dtype)
                rows = torch.arange(after.shape[0], device=after.device)
                moved = after.index_put((rows, torch.zeros_like(rows)), delta, accumulate=True)
                walked = self.base.norm(self._walk(moved, self.first + 1, n_layers))
                ref = self._reference({self.first: delta})
        except Exception:  # noqa: BLE001 - any layout mismatch means: use the model's own forward
            self._mask_rope = None
            return False
        return bool(torch.allclose(walked[real], ref[real], atol=WALK_TOLERANCE, rtol=WALK_TOLERANCE))

    def _reference(self, deltas: dict[int, torch.Tensor]) -> torch.Tensor:
        """The model's own forward of the suffix, hooks off, `deltas` added as interventions."""
        with ExitStack() as stack:
            for i, d in deltas.items():
                stack.enter_context(self.hooks.intervention(i, self.positions, d))
            cache = _fresh_cache(self.kv) if self.kv else None
            return self.base(
                input_ids=self.ids,
                attention_mask=self.mask,
                position_ids=self.pos,
                past_key_values=cache,
                use_cache=cache is not None,
            ).last_hidden_state


@dataclass
class DeltaFit:
    deltas: dict[int, torch.Tensor]  # hooked layer -> delta (the hooks' dtype)
    stats: dict[str, float]  # steps, nll, converged
    initial_argmax: list[int]  # per context row: the argmax before the first target token, delta = 0


def compute_delta(
    model: nn.Module,
    hooks: HookManager,
    layers: Sequence[int],
    problem: DeltaProblem,
    ref_norm: float,
    settings: VStarSettings = VSTAR,
    **overrides: Any,
) -> DeltaFit:
    """ROME's v* as a residual delta: find delta (one per hooked layer) added to the MLP output at the
    subject's last token so that the target follows the prompt in every context.

    loss = mean target NLL + kl_factor * KL(orig || edited) on "{subject} is a" + weight_decay *
    ||delta||^2 / ||original MLP out||^2; a first step of first_step * ref_norm along the negative
    gradient at delta = 0 (none when first_step is 0), then Adam; early stop once the target is the
    argmax at every target position of every context and the NLL < nll_stop. ||delta|| is clamped to
    clamp_factor * ref_norm. Everything runs with the calling thread's hook table (the edits already
    published). `overrides` replace single fields of `settings` (lr=..., max_steps=...).
    """
    s = replace(settings, **overrides) if overrides else settings
    lr, max_steps, kl_factor, weight_decay = s.lr, s.max_steps, s.kl_factor, s.weight_decay
    clamp_factor, nll_stop, first_step = s.clamp_factor, s.nll_stop, s.first_step
    base = base_model(model)
    dev = hooks.device
    pad = int(getattr(model.config, "pad_token_id", None) or 0)
    starts = [r.subject[1] for r in problem.rows]  # type: ignore[index]
    prefixes = [r.ids[:s] for r, s in zip(problem.rows, starts, strict=True)]
    suffixes = [r.ids[s:] for r, s in zip(problem.rows, starts, strict=True)]
    pre_len = torch.tensor([len(p) for p in prefixes], device=dev)
    suf_ids, suf_mask = pad_right(suffixes, pad, dev)
    n_rows, s_len = suf_ids.shape
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    pre_mask = torch.zeros((n_rows, 0), dtype=torch.long, device=dev)
    if int(pre_len.max()) > 0:
        pre_ids, pre_mask = pad_left(prefixes, pad, dev)
        pre_pos = (pre_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.no_grad():  # with the calling thread's table: the world the edit will be served in
            out = base(
                input_ids=pre_ids,
                attention_mask=pre_mask,
                position_ids=pre_pos,
                past_key_values=full_width_cache(),  # whole columns: they are re-used as a prefix below
                use_cache=True,
            )
        kv = _kv_tensors(out.past_key_values)
    full_mask = torch.cat([pre_mask, suf_mask], dim=1)
    suf_pos = pre_len[:, None] + torch.arange(s_len, device=dev)[None, :]
    suffix = _SuffixRunner(model, hooks, kv, suf_ids, full_mask, suf_pos, min(layers))

    # Where the logits are needed: the positions predicting each target token, and the KL row's last.
    sel_r, sel_t, tgt = [], [], []
    for r in range(problem.n_ctx):
        for j, t in enumerate(problem.target_ids):
            sel_r.append(r)
            sel_t.append(problem.prompt_lens[r] - 1 + j - starts[r])
            tgt.append(t)
    kl_r = problem.n_ctx
    sel_r.append(kl_r)
    sel_t.append(len(problem.rows[kl_r].ids) - 1 - starts[kl_r])
    sel_r_t = torch.tensor(sel_r, device=dev)
    sel_t_t = torch.tensor(sel_t, device=dev)
    tgt_t = torch.tensor(tgt, device=dev)
    n_tgt = len(problem.target_ids)

    d_model = hooks.d_model
    deltas = {i: torch.zeros(d_model, device=dev, dtype=torch.float32, requires_grad=True) for i in layers}
    opt = torch.optim.Adam(list(deltas.values()), lr=lr)
    kl_ref: torch.Tensor | None = None
    initial_argmax: list[int] = []
    stats = {"steps": 0.0, "nll": math.nan}
    for step in range(max_steps + 1):
        hs = suffix.forward(deltas)
        logp = torch.log_softmax(final_logits(model, hs[sel_r_t, sel_t_t]).float(), dim=-1)
        tl = logp[:-1].gather(1, tgt_t[:, None]).squeeze(1).view(problem.n_ctx, n_tgt)
        nll = -tl.mean()
        stop_nll = -tl[: problem.n_ctx - problem.n_serving].mean() if problem.n_serving else nll
        kl_lp = logp[-1]
        if kl_ref is None:
            kl_ref = kl_lp.detach()  # step 0 runs with delta = 0: the original distribution
            first = logp[:-1].detach().view(problem.n_ctx, n_tgt, -1)[:, 0]
            initial_argmax = [int(t) for t in first.argmax(-1)]
        hit = bool((logp[:-1].argmax(-1) == tgt_t).all())
        nll_v = float(stop_nll.detach())
        stats.update(steps=float(step), nll=nll_v)
        if (hit and nll_v < nll_stop) or step == max_steps:
            break
        kl = F.kl_div(kl_lp, kl_ref, log_target=True, reduction="sum")
        wd = sum(d.pow(2).sum() for d in deltas.values()) / (ref_norm**2)
        loss = nll + kl_factor * kl + weight_decay * wd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if step == 0 and first_step > 0:
            _first_step(deltas, first_step * ref_norm)
            continue
        opt.step()
        with torch.no_grad():
            for d in deltas.values():
                n = d.norm()
                if n > clamp_factor * ref_norm:
                    d.mul_(clamp_factor * ref_norm / n)
    stats["converged"] = float(hit)
    return DeltaFit({i: d.detach().to(hooks.dtype) for i, d in deltas.items()}, stats, initial_argmax)




def _first_step(deltas: dict[int, torch.Tensor], length: float) -> None:
    """Jump straight to `length` along the negative gradient at delta = 0. Adam's first step moves every
    coordinate by lr (a sign vector, ~1.3 x ref_norm long for SmolLM2); the edits need 2-4 x ref_norm.
    The gradient's direction is a better first direction than its signs, and a longer first step skips
    the steps Adam spends growing the norm."""
    with torch.no_grad():
        for d in deltas.values():
            g = d.grad
            if g is not None and float(g.norm()) > 0:
                d.copy_(-g / g.norm() * length)


compute_v_star = compute_delta  # the name used in the paper: v* = original output + delta

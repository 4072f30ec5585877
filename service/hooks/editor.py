"""Edit computation for hook layers: the orchestration of an edit's key and gate (hooks/keys.py, with the
threshold calibration in hooks/calibration.py), its value (hooks/values.py) and the quality gate
(hooks/quality.py: efficacy, paraphrases; locality on fixed probes in hooks/locality.py). This module
validates and prepares an edit's rows, chooses its layers and turns each layer's calibration and v* into
entries.

Nothing here writes base weights or publishes a table: `Editor.compute` returns entries and a report,
and the caller (the engine) logs and publishes them. Every forward runs in the calling thread with
thread-local hook switches, so serving threads keep generating with the published table meanwhile.

Speed (2-core CPU, SmolLM2-135M): keys and calibration need only the layers up to the hook layer
(`HookManager.keys_at` stops the forward there); the v* optimisation caches the K/V of the tokens before
the subject (they do not depend on the delta) and runs only the suffix, from above the lowest hooked layer
(that layer's output is computed once; the delta adds to it), with logits only at the target positions;
the old answer's first token comes from v*'s first step (delta = 0), so the gate's greedy decode needs
no forward for one-token targets; probe activations and decisions are cached, and locality forwards only
the probes whose gate decisions the new entries change
(for every other probe the output is provably identical).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from service.errors import InvalidArgument
from service.hooks.calibration import Calibration, calibrate_layer
from service.hooks.layer import HookEntry, HookManager, HookTable
from service.hooks.locality import LocalityProbes
from service.hooks.probes import PROBES
from service.hooks.quality import QualityReport, quality_report
from service.hooks.rows import Row, encode_row
from service.hooks.values import (
    VSTAR,
    DeltaProblem,
    VStarSettings,
    compute_delta,
)

__all__ = [
    "CONTEXT_PREFIXES",
    "ComputedEdit",
    "EditSpec",
    "Editor",
    "QualityReport",
]

# Fixed, deterministic context prefixes (ROME averages k* and fits v* over random-text prefixes; short
# fixed ones keep the batch small and the result reproducible).
CONTEXT_PREFIXES: tuple[str, ...] = ("", "Note: ", "I read that ")
KL_TEMPLATE = "{subject} is a"  # ROME's essence-drift prompt
MAX_TARGET_TOKENS = 32
MAX_PROMPT_TOKENS = 256
MAX_PARAPHRASES = 16
MIN_REF_NORM = 1e-3  # floor of the ||MLP out|| that scales v*'s first step and clamp (a silent MLP)


@dataclass
class EditSpec:
    subject: str
    prompt: str
    target_new: str
    paraphrases: list[str] = field(default_factory=list)
    # Text the service puts before the prompt when this edit is in scope (the retrieval path's descriptor
    # block): v* is fitted in these contexts too, so the value also works beside its own descriptor. They
    # do not enter the key or the threshold (the gate is calibrated on the edit's own wording).
    serving_contexts: list[str] = field(default_factory=list)
    # The hook layers of this edit: () = the editor's default layers; with `auto_layer`, one layer chosen
    # by the editor's layer chooser (a causal trace of the prompt) among its candidates.
    layers: tuple[int, ...] = ()
    auto_layer: bool = False


@dataclass
class ComputedEdit:
    entries: list[HookEntry]  # one per hooked layer, edit_id "" until the caller names it
    report: QualityReport

    def with_id(self, edit_id: str) -> ComputedEdit:
        return ComputedEdit([e.with_id(edit_id) for e in self.entries], self.report)


# ---------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    spec: EditSpec
    prompt: str
    target_ids: list[int]
    ctx: list[Row]  # "{prefix}{prompt}" per context prefix
    serving: list[Row]  # "{serving context}{prompt}" per EditSpec.serving_contexts: v* only
    paras: list[Row]
    kl: Row


# (prompt, subject) -> (the edit's hook layer, why): the per-edit choice of `auto` edits, run with the
# table the edit will be served with (service/locate/layer_choice.py; injected so hooks do not import locate).
LayerChooser = Callable[[str, str], tuple[int, str]]


class Editor:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        hooks: HookManager,
        *,
        default_layers: Sequence[int] | None = None,
        layer_chooser: LayerChooser | None = None,
        locality_max_top1_changed: float = 0.05,
        contexts: Sequence[str] = CONTEXT_PREFIXES,
        vstar: VStarSettings = VSTAR,
        probes: Sequence[str] = PROBES,
        **vstar_overrides: Any,
    ) -> None:
        """`default_layers`: the layers of an edit that names none (default: the hooks' default layers).
        `vstar_overrides` replace single fields of `vstar` (max_steps=3, lr=1.0, ...)."""
        self.model = model
        self.tok = tokenizer
        self.hooks = hooks
        self.default_layers = tuple(sorted(set(hooks.default_layers if default_layers is None
                                               else default_layers)))
        unhooked = [i for i in self.default_layers if i not in hooks.layers]
        if not self.default_layers or unhooked:
            raise ValueError(f"default layers {list(self.default_layers)} must be hooked ({hooks.layers})")
        self.layer_chooser = layer_chooser
        self.locality_max_top1_changed = locality_max_top1_changed
        self.contexts = tuple(contexts)
        self.vstar = replace(vstar, **vstar_overrides) if vstar_overrides else vstar
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self._probes = LocalityProbes(model, tokenizer, hooks, probes, self.pad_id)

    # ---- validation --------------------------------------------------------------------------------
    def validate(self, spec: EditSpec) -> None:
        for name in ("subject", "prompt", "target_new"):
            value = getattr(spec, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidArgument("must be a non-empty string", field=name)
        if spec.subject not in spec.prompt:
            raise InvalidArgument(f"must contain the subject {spec.subject!r}", field="prompt")
        if len(spec.paraphrases) > MAX_PARAPHRASES:
            raise InvalidArgument(f"at most {MAX_PARAPHRASES} paraphrases", field="paraphrases")
        for p in spec.paraphrases:
            if not isinstance(p, str) or not p.strip():
                raise InvalidArgument("paraphrases must be non-empty strings", field="paraphrases")
        unhooked = [i for i in spec.layers if i not in self.hooks.layers]
        if unhooked:
            raise InvalidArgument(
                f"layer {unhooked[0]} is not hooked on this server (hooked: {self.hooks.layers})",
                field="layer",
            )
        if spec.auto_layer and self.layer_chooser is None:
            raise InvalidArgument("this server cannot choose layers per edit", field="layer")
        n_target = len(self._target_ids(spec.target_new))
        if n_target > MAX_TARGET_TOKENS:
            raise InvalidArgument(f"is {n_target} tokens, more than {MAX_TARGET_TOKENS}", field="target_new")
        for name, text in [("prompt", spec.prompt), *(("paraphrases", p) for p in spec.paraphrases)]:
            if len(self.tok(text)["input_ids"]) > MAX_PROMPT_TOKENS:
                raise InvalidArgument(f"longer than {MAX_PROMPT_TOKENS} tokens", field=name)

    def _target_ids(self, target: str) -> list[int]:
        return list(self.tok(" " + target.strip(), add_special_tokens=False)["input_ids"])

    def _prepare(self, spec: EditSpec) -> _Prepared:
        self.validate(spec)
        prompt = spec.prompt.rstrip()
        ctx = [encode_row(self.tok, p + prompt, spec.subject) for p in self.contexts]
        if any(r.subject is None for r in ctx):
            raise InvalidArgument("subject tokens not found in the prompt", field="subject")
        serving = [encode_row(self.tok, c + prompt, spec.subject) for c in spec.serving_contexts]
        if any(r.subject is None for r in serving):
            raise InvalidArgument("subject tokens not found in the prompt", field="subject")
        paras = [encode_row(self.tok, p.rstrip(), spec.subject) for p in spec.paraphrases]
        kl = encode_row(self.tok, KL_TEMPLATE.format(subject=spec.subject.strip()), spec.subject.strip())
        if kl.subject is None:
            raise InvalidArgument("subject tokens not found", field="subject")
        return _Prepared(spec, prompt, self._target_ids(spec.target_new), ctx, serving, paras, kl)

    # ---- public ---------------------------------------------------------------------------------------
    def compute(self, spec: EditSpec) -> ComputedEdit:
        return self.compute_many([spec])[0]

    def compute_many(
        self,
        specs: Sequence[EditSpec],
        base: HookTable | None = None,
        between: Callable[[], None] | None = None,
    ) -> list[ComputedEdit]:
        """Compute each edit independently, then run every quality check with ALL of them in the table.

        `base` replaces the published table as "the table before these edits" (the caller passes the
        published one minus the edits the new ones supersede, whose near-identical keys would otherwise
        win the gate during the quality checks). `between` is called before each edit's computation and
        before the quality checks; it may raise to stop the work (a caller's deadline).
        """
        t0 = time.perf_counter()
        preps = [self._prepare(s) for s in specs]  # validate everything before any compute
        published = self.hooks.current if base is None else base
        per_edit: list[tuple[list[HookEntry], str, int | None, str, float]] = []
        for prep in preps:
            if between is not None:
                between()
            t = time.perf_counter()
            layers, why = self._edit_layers(prep, published)
            entries, msg, old_first = self._compute_entries(prep, published, layers)
            per_edit.append((entries, msg, old_first, why, time.perf_counter() - t))
        if between is not None:
            between()
        all_new = [e for entries, *_ in per_edit for e in entries]
        override = published.extended(all_new)
        subjects = [p.spec.subject for p in preps]
        loc_top1, loc_kl = self._probes.drift(published, override, all_new, subjects)
        out = []
        share = (time.perf_counter() - t0 - sum(p[-1] for p in per_edit)) / max(1, len(preps))
        for prep, (entries, msg, old_first, why, secs) in zip(preps, per_edit, strict=True):
            t = time.perf_counter()
            report = self._quality(prep, entries, published, override, loc_top1, loc_kl, msg, old_first)
            report.layer_choice = why
            report.compute_seconds = secs + share + (time.perf_counter() - t)
            out.append(ComputedEdit(entries, report))
        return out

    def warmup(self) -> None:
        """Fill the probe caches for the published table (otherwise the first edit pays for it)."""
        self._probes.activations(self.hooks.current, self.hooks.layers)
        for layer in self.hooks.layers:
            self._probes.decisions(self.hooks.current, layer)

    # ---- key, value, threshold ---------------------------------------------------------------------------
    def _calibrate(self, prep: _Prepared, layer: int, table: HookTable | None) -> list[Calibration]:
        """The edit's keys and thresholds at `layer` (hooks/calibration.py), read under `table`."""
        return calibrate_layer(self.hooks, self._probes, layer, ctx=prep.ctx, paras=prep.paras, kl=prep.kl,
                               subject=prep.spec.subject, pad_id=self.pad_id, table=table)

    def _edit_layers(self, prep: _Prepared, published: HookTable) -> tuple[list[int], str]:
        """The edit's hook layers and why: named in the request, chosen per edit, or the default."""
        spec = prep.spec
        if spec.layers:
            return sorted(set(spec.layers)), f"layers {sorted(set(spec.layers))} (named in the request)"
        if spec.auto_layer:
            assert self.layer_chooser is not None  # validate() refused it otherwise
            with self.hooks.table_override(published):
                layer, why = self.layer_chooser(prep.prompt, spec.subject)
            return [layer], f"auto: {why}"
        return list(self.default_layers), f"layers {list(self.default_layers)} (the server's default)"

    def _compute_entries(
        self, prep: _Prepared, published: HookTable, layers: Sequence[int]
    ) -> tuple[list[HookEntry], str, int | None]:
        """The edit's entries at `layers`, the calibration/convergence messages, and the unedited model's
        first answer token for the bare prompt (read off v*'s first step, which runs with delta = 0 on
        `published`)."""
        first = layers[0]
        calib = {first: self._calibrate(prep, first, published)}
        down = self._down(first)
        with torch.no_grad():
            ref_norm = float(down(calib[first][0].key.to(self.hooks.dtype)).float().norm())
        fit_rows = prep.ctx + prep.serving  # the bare context stays first: initial_argmax[bare] below
        problem = DeltaProblem(
            rows=[Row(r.ids + prep.target_ids[:-1], r.subject) for r in fit_rows] + [prep.kl],
            n_ctx=len(fit_rows),
            prompt_lens=[len(r.ids) for r in fit_rows],
            target_ids=prep.target_ids,
            n_serving=len(prep.serving),
        )
        with self.hooks.table_override(published):
            fit = compute_delta(
                self.model,
                self.hooks,
                layers,
                problem,
                max(ref_norm, MIN_REF_NORM),
                self.vstar,
            )
        deltas, stats = fit.deltas, fit.stats
        bare = self.contexts.index("") if "" in self.contexts else None
        entries = [c.entry(first, deltas[first]) for c in calib[first]]
        # Higher layers see the activations after this edit's lower entries fired: key them that way.
        for layer in layers[1:]:
            calib[layer] = self._calibrate(prep, layer, published.extended(entries))
            entries += [c.entry(layer, deltas[layer]) for c in calib[layer]]
        msgs = [f"layer {i}: {c.message}" for i, cs in calib.items() for c in cs if c.message]
        if not stats.get("converged"):
            msgs.append(f"v* did not converge in {int(stats['steps'])} steps (nll {stats['nll']:.2f})")
        return entries, "; ".join(msgs), None if bare is None else fit.initial_argmax[bare]

    def _down(self, layer: int) -> nn.Module:
        return self.hooks.sites[layer].module

    # ---- quality gate -----------------------------------------------------------------------------------
    def _quality(
        self,
        prep: _Prepared,
        entries: list[HookEntry],
        published: HookTable,
        override: HookTable,
        loc_top1: float,
        loc_kl: float,
        calib_msg: str,
        old_first: int | None = None,
    ) -> QualityReport:
        """The edit's report (hooks/quality.py) on its bare prompt, paraphrases and this batch's locality."""
        prompt_ids = (
            prep.ctx[self.contexts.index("")].ids
            if "" in self.contexts
            else encode_row(self.tok, prep.prompt).ids
        )
        return quality_report(
            self.model, self.tok, self.hooks, pad_id=self.pad_id, prompt_ids=prompt_ids,
            target_ids=prep.target_ids, paraphrases=prep.spec.paraphrases, paraphrase_rows=prep.paras,
            entries=entries, published=published, override=override, loc_top1=loc_top1, loc_kl=loc_kl,
            max_top1_changed=self.locality_max_top1_changed, calib_msg=calib_msg, old_first=old_first,
        )

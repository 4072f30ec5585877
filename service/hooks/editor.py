"""Edit computation for hook layers: the orchestration of an edit's key and gate (hooks/keys.py), its
value (hooks/values.py) and the quality gate (efficacy, paraphrases, locality on fixed probes).

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
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from service.errors import InvalidArgument
from service.hooks.arch import base_model, final_logits
from service.hooks.keys import (
    SINK_POSITIONS,
    calibrate_threshold,
    compute_k_star,
    previous_token_condition,
)
from service.hooks.layer import (
    NO_PREV_CONDITION,
    HookEntry,
    HookManager,
    HookTable,
)
from service.hooks.locality import LocalityProbes
from service.hooks.probes import PROBES
from service.hooks.rows import Row, encode_row, pad_right
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
class QualityReport:
    efficacy: bool  # greedy continuation of the prompt starts with target_new (edit + current table)
    old_answer: str  # greedy answer before the edit (current table), as many tokens as the target
    target_logprob: float  # log p(target_new | prompt) after the edit, summed over target tokens
    old_answer_logprob: float  # log p(old_answer | prompt) after the edit
    paraphrases: list[tuple[str, bool]]  # (paraphrase, greedy continuation starts with target_new)
    locality_top1_changed: float  # fraction of probes whose next-token argmax changed
    locality_mean_kl: float  # mean KL(before || after) of the probes' next-token distributions
    threshold: float  # cosine threshold of the (first) hook layer's entry
    compute_seconds: float
    passed: bool
    message: str
    layer_choice: str = ""  # which hook layers the edit went to, and why

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["paraphrases"] = [[p, bool(ok)] for p, ok in self.paraphrases]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityReport:
        d = dict(d)
        d["paraphrases"] = [(str(p), bool(ok)) for p, ok in d.get("paraphrases", [])]
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


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


@dataclass
class _Calib:
    key: torch.Tensor
    threshold: float
    message: str
    prev_key: torch.Tensor | None = None
    prev_threshold: float = NO_PREV_CONDITION

    def entry(self, layer: int, value: torch.Tensor) -> HookEntry:
        return HookEntry("", layer, self.key, value, self.threshold, self.prev_key, self.prev_threshold)



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
    def _acts(self, layer: int, rows: Sequence[Row], table: HookTable | None = None) -> list[torch.Tensor]:
        ids, mask = pad_right([r.ids for r in rows], self.pad_id, self.hooks.device)
        if table is None:
            acts = self.hooks.keys_at([layer], ids, mask)[layer]
        else:
            with self.hooks.table_override(table):
                acts = self.hooks.keys_at([layer], ids, mask)[layer]
        return [acts[r, : len(row.ids)].float() for r, row in enumerate(rows)]

    def _calibrate(self, prep: _Prepared, layer: int, table: HookTable | None) -> list[_Calib]:
        """The entry keys of one layer: the main key from the rows where the subject ends past the first
        SINK_POSITIONS tokens, and a second, "start of text" key from the rows where it ends inside them
        (their activations are unlike mid-text ones, see SINK_POSITIONS; mixed into one key they
        dragged its threshold down to where it fired on unrelated tokens). For a multi-token subject a
        row also counts as start of text when the token before the last one, the previous-token key,
        is inside them. The KL row ("{subject} is a") is always one of the rows: it is the subject at
        the start of a text, the form a caller's later question often takes, even when no context of
        the edit puts it there."""
        rows = prep.ctx + prep.paras + [prep.kl]
        acts = self._acts(layer, rows, table)
        n_ctx = len(prep.ctx)

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

        def calib(key_rows: list[int], pos_rows: list[int]) -> _Calib:
            key = compute_k_star([acts[i] for i in key_rows], [rows[i].subject[1] for i in key_rows])  # type: ignore[index]
            kn = F.normalize(key, dim=0)
            pos = []
            for i in pos_rows:
                cos = F.normalize(acts[i], dim=-1) @ kn
                # a paraphrase without the literal subject: its best token must fire
                pos.append(cos.max() if rows[i].subject is None else cos[rows[i].subject[1]])
            negs = [] if neg_units is None else [(neg_units @ kn).max()]
            probe_neg = self._probes.max_cos(layer, kn, prep.spec.subject)
            if probe_neg is not None:
                negs.append(probe_neg)
            thr, msg = calibrate_threshold(torch.stack(pos), torch.stack(negs) if negs else torch.empty(0))
            # The token before the last one, where it is still subject (a one-token subject has none).
            multi = [i for i in key_rows if rows[i].subject[0] < rows[i].subject[1]]  # type: ignore[index]
            if not multi:
                return _Calib(key, thr, msg)
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
            return _Calib(key, thr, msg, prev_key, prev_thr)

        main_pos = [i for i in range(len(rows) - 1) if i not in start]
        out = [calib(main_ctx, main_pos)]
        if start:
            out.append(calib(start, start))
        return out

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
    @torch.no_grad()
    def _greedy(self, ids: list[int], n: int, table: HookTable) -> list[int]:
        out: list[int] = []
        x = torch.tensor([ids], device=self.hooks.device)
        past = None
        eos = self.tok.eos_token_id
        prev: dict[int, torch.Tensor] | None = None
        with self.hooks.table_override(table):
            for _ in range(n):
                with self.hooks.recording() as rec:  # carries the previous-token activations across steps
                    rec.prev_keys = prev
                    res = self.model(input_ids=x, past_key_values=past, use_cache=True)
                prev = rec.last_keys
                past = res.past_key_values
                nxt = int(res.logits[0, -1].argmax())
                if nxt == eos:
                    break
                out.append(nxt)
                x = torch.tensor([[nxt]], device=self.hooks.device)
        return out

    @torch.no_grad()
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
        tgt = prep.target_ids
        prompt_ids = (
            prep.ctx[self.contexts.index("")].ids
            if "" in self.contexts
            else encode_row(self.tok, prep.prompt).ids
        )
        # The old answer: the unedited greedy continuation, as many tokens as the target (so the two
        # log-probabilities compare continuations of equal length). Its first token is known from v*.
        if old_first is None:
            old_ids = self._greedy(prompt_ids, len(tgt), published)
        elif old_first == self.tok.eos_token_id:
            old_ids = []
        else:
            old_ids = [old_first] + self._greedy(prompt_ids + [old_first], len(tgt) - 1, published)
        old_answer = self.tok.decode(old_ids, skip_special_tokens=True).strip()
        if not old_ids and self.tok.eos_token_id is not None:
            old_ids = [int(self.tok.eos_token_id)]  # the old "answer" was to stop: score that instead
        # One batched forward with the edit: prompt + target, paraphrases + target, prompt + old answer.
        seqs = [(prompt_ids, tgt)] + [(p.ids, tgt) for p in prep.paras]
        if old_ids:
            seqs.append((prompt_ids, old_ids))  # (empty only for a tokenizer without an EOS token)
        ids, mask = pad_right([a + b[:-1] for a, b in seqs], self.pad_id, self.hooks.device)
        with self.hooks.table_override(override):
            hs = base_model(self.model)(input_ids=ids, attention_mask=mask).last_hidden_state
        hits, lps = [], []
        for r, (a, b) in enumerate(seqs):
            pos = torch.arange(len(a) - 1, len(a) - 1 + len(b), device=ids.device)
            logp = torch.log_softmax(final_logits(self.model, hs[r, pos]).float(), dim=-1)
            bt = torch.tensor(b, device=ids.device)
            hits.append(bool((logp.argmax(-1) == bt).all()))
            lps.append(float(logp.gather(1, bt[:, None]).sum()))
        efficacy = hits[0]
        n_para = len(prep.paras)
        paraphrases = [(p, hits[1 + i]) for i, p in enumerate(prep.spec.paraphrases)]
        old_lp = lps[1 + n_para] if old_ids else 0.0
        msgs = [m for m in [calib_msg] if m]
        if not efficacy:
            msgs.append("efficacy failed: the prompt does not continue with the target")
        if loc_top1 > self.locality_max_top1_changed:
            msgs.append(
                f"locality: {loc_top1:.3f} of probes changed top-1 (bound {self.locality_max_top1_changed})"
            )
        failed_p = [p for p, ok in paraphrases if not ok]
        if failed_p:
            msgs.append(f"{len(failed_p)} of {n_para} paraphrases do not continue with the target")
        passed = efficacy and loc_top1 <= self.locality_max_top1_changed
        return QualityReport(
            efficacy=efficacy,
            old_answer=old_answer,
            target_logprob=lps[0],
            old_answer_logprob=old_lp,
            paraphrases=paraphrases,
            locality_top1_changed=loc_top1,
            locality_mean_kl=loc_kl,
            threshold=float(entries[0].threshold),
            compute_seconds=0.0,
            passed=passed,
            message="; ".join(msgs) if msgs else "ok",
        )

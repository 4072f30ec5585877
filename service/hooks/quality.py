"""The quality gate: what an edit's report says, and the checks that decide whether it is stored.

ROME / MEMIT-style metrics, measured on the serving model with the new entries in a table override:
efficacy (the prompt's greedy continuation is the target), generalisation (each paraphrase's), the old
answer (the unedited greedy continuation, as many tokens as the target) and both log-probabilities, and
locality (the probes' top-1 change and KL, computed by hooks/locality.py and passed in). An edit passes
on efficacy and the locality bound; paraphrases are reported, not required.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from service.hooks.arch import base_model, final_logits
from service.hooks.layer import HookEntry, HookManager, HookTable
from service.hooks.rows import Row, pad_right

__all__ = ["QualityReport", "greedy_continuation", "quality_report"]


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


@torch.no_grad()
def greedy_continuation(
    model: nn.Module, tokenizer: Any, hooks: HookManager, ids: list[int], n: int, table: HookTable
) -> list[int]:
    """Up to `n` greedy tokens after `ids` with `table` (stops at EOS, which it leaves out)."""
    out: list[int] = []
    x = torch.tensor([ids], device=hooks.device)
    past = None
    eos = tokenizer.eos_token_id
    prev: dict[int, torch.Tensor] | None = None
    with hooks.table_override(table):
        for _ in range(n):
            with hooks.recording() as rec:  # carries the previous-token activations across steps
                rec.prev_keys = prev
                res = model(input_ids=x, past_key_values=past, use_cache=True)
            prev = rec.last_keys
            past = res.past_key_values
            nxt = int(res.logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            x = torch.tensor([[nxt]], device=hooks.device)
    return out


@torch.no_grad()
def quality_report(
    model: nn.Module,
    tokenizer: Any,
    hooks: HookManager,
    *,
    pad_id: int,
    prompt_ids: list[int],
    target_ids: list[int],
    paraphrases: Sequence[str],
    paraphrase_rows: Sequence[Row],
    entries: Sequence[HookEntry],
    published: HookTable,
    override: HookTable,
    loc_top1: float,
    loc_kl: float,
    max_top1_changed: float,
    calib_msg: str,
    old_first: int | None = None,
) -> QualityReport:
    """The report of one edit whose `entries` are in `override` (with every edit of its batch);
    `published` is the table before them. `old_first` is the unedited answer's first token when known
    (read off v*'s first step), which saves a forward. `compute_seconds` is left 0 for the caller."""
    tgt = target_ids
    # The old answer: the unedited greedy continuation, as many tokens as the target (so the two
    # log-probabilities compare continuations of equal length). Its first token is known from v*.
    if old_first is None:
        old_ids = greedy_continuation(model, tokenizer, hooks, prompt_ids, len(tgt), published)
    elif old_first == tokenizer.eos_token_id:
        old_ids = []
    else:
        old_ids = [old_first] + greedy_continuation(
            model, tokenizer, hooks, prompt_ids + [old_first], len(tgt) - 1, published
        )
    old_answer = tokenizer.decode(old_ids, skip_special_tokens=True).strip()
    if not old_ids and tokenizer.eos_token_id is not None:
        old_ids = [int(tokenizer.eos_token_id)]  # the old "answer" was to stop: score that instead
    # One batched forward with the edit: prompt + target, paraphrases + target, prompt + old answer.
    seqs = [(prompt_ids, tgt)] + [(p.ids, tgt) for p in paraphrase_rows]
    if old_ids:
        seqs.append((prompt_ids, old_ids))  # (empty only for a tokenizer without an EOS token)
    ids, mask = pad_right([a + b[:-1] for a, b in seqs], pad_id, hooks.device)
    with hooks.table_override(override):
        hs = base_model(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    hits, lps = [], []
    for r, (a, b) in enumerate(seqs):
        pos = torch.arange(len(a) - 1, len(a) - 1 + len(b), device=ids.device)
        logp = torch.log_softmax(final_logits(model, hs[r, pos]).float(), dim=-1)
        bt = torch.tensor(b, device=ids.device)
        hits.append(bool((logp.argmax(-1) == bt).all()))
        lps.append(float(logp.gather(1, bt[:, None]).sum()))
    efficacy = hits[0]
    n_para = len(paraphrase_rows)
    para_hits = [(p, hits[1 + i]) for i, p in enumerate(paraphrases)]
    old_lp = lps[1 + n_para] if old_ids else 0.0
    msgs = [m for m in [calib_msg] if m]
    if not efficacy:
        msgs.append("efficacy failed: the prompt does not continue with the target")
    if loc_top1 > max_top1_changed:
        msgs.append(f"locality: {loc_top1:.3f} of probes changed top-1 (bound {max_top1_changed})")
    failed_p = [p for p, ok in para_hits if not ok]
    if failed_p:
        msgs.append(f"{len(failed_p)} of {n_para} paraphrases do not continue with the target")
    passed = efficacy and loc_top1 <= max_top1_changed
    return QualityReport(
        efficacy=efficacy,
        old_answer=old_answer,
        target_logprob=lps[0],
        old_answer_logprob=old_lp,
        paraphrases=para_hits,
        locality_top1_changed=loc_top1,
        locality_mean_kl=loc_kl,
        threshold=float(entries[0].threshold),
        compute_seconds=0.0,
        passed=passed,
        message="; ".join(msgs) if msgs else "ok",
    )

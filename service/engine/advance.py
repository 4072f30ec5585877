"""Sampling each row's next token from a forward's logits and turning it into the row's stream event."""

from __future__ import annotations

import logging

from service import metrics
from service.engine.batch import ForwardOutput
from service.engine.delivery import Outbox
from service.engine.loader import LoadedModel
from service.engine.sampling import mask_tokens, sample_row, token_logprobs
from service.engine.sequence import EngineError, SequenceState

log = logging.getLogger(__name__)


def default_eos_ids(loaded: LoadedModel) -> frozenset[int]:
    """The generation config's end tokens and the tokenizer's EOS (chat models can have several)."""
    ids: set[int] = set()
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return frozenset(ids)


def advance(
    seqs: list[SequenceState], out: ForwardOutput, outbox: Outbox, eos_ids: frozenset[int]
) -> list[int]:
    """Sample each row's next token and queue its event; returns the rows that keep running."""
    logits = out.logits
    early = [row for row, seq in enumerate(seqs) if len(seq.generated) < seq.params.min_new_tokens]
    if early and eos_ids:
        logits = mask_tokens(logits, early, eos_ids)
    greedy_tokens = out.host_tokens(logits.argmax(dim=-1))  # also fetches deferred gate decisions
    keep: list[int] = []
    generated = fired = 0
    tokens: dict[int, int] = {}
    for row, seq in enumerate(seqs):
        if seq.cancelled:
            continue
        try:
            seq.record_forward(out.fires[row], seq.table.version if seq.table is not None else 0)
            tokens[row] = (
                greedy_tokens[row]
                if seq.params.greedy
                else sample_row(logits[row], seq.params, seq.generator)
            )
        except Exception as exc:  # this row only (e.g. NaN probabilities)
            log.exception("sampling failed")
            outbox.fail(seq, EngineError(f"sampling failed: {exc!r}"))
    asked = [row for row in tokens if seqs[row].params.logprobs is not None]
    logprobs = dict(zip(asked, token_logprobs(
        out.logits, asked, [tokens[r] for r in asked], [seqs[r].params.logprobs or 0 for r in asked]
    ), strict=True))
    for row, token in tokens.items():
        seq = seqs[row]
        try:
            event = seq.append(token, logprobs.get(row))
        except Exception as exc:  # this row only (e.g. a tokenizer error)
            log.exception("sampling failed")
            outbox.fail(seq, EngineError(f"sampling failed: {exc!r}"))
            continue
        generated += 1
        fired += out.fired_tokens[row]
        outbox.put(seq, event)
        if not seq.finished:
            keep.append(row)
    metrics.GENERATION_TOKENS.inc(generated)
    if fired:
        metrics.HOOK_FIRES.inc(fired)
    return keep

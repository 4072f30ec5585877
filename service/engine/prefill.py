"""Prefill: the forwards that bring newcomers' prompts into the KV cache before they join the running batch.

Three paths: a left-padded forward over a group of newcomers; no forward at all for a prompt whose state
the prefix cache kept; and chunked prefill for a prompt longer than `prefill_chunk_tokens`, one chunk per
engine step (one forward over that row's cache so far), so running rows never wait for more than a chunk.
Each path ends in `join`: the scheduler samples the first tokens and merges the rows into the running batch.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from service import metrics
from service.engine.batch import ForwardOutput, KVState, ModelRunner
from service.engine.delivery import Outbox
from service.engine.health import FailureStreak
from service.engine.prefix_cache import PrefixEntry
from service.engine.sequence import EngineError, SequenceState

log = logging.getLogger(__name__)

# Sample the newcomers' first tokens and add the ones that go on to the running batch.
JoinFn = Callable[[list[SequenceState], ForwardOutput, KVState, Outbox], None]


@dataclass(eq=False)
class ChunkedPrefill:
    """A prompt prefilled one chunk per engine step: the row's cache so far and the fires over its chunks."""

    seq: SequenceState
    kv: KVState | None = None
    done: int = 0  # prompt tokens in `kv`
    fires: dict[str, float] = field(default_factory=dict)
    fired: int = 0  # tokens of the prompt where some edit fired

    def add(self, out: ForwardOutput, tokens: int) -> None:
        self.done += tokens
        self.fired += out.fired_tokens[0]
        for edit_id, score in out.fires[0].items():
            if score > self.fires.get(edit_id, float("-inf")):
                self.fires[edit_id] = score


class Prefiller:
    """Runs the prefill forwards on the worker thread; holds the chunked prompts still being prefilled."""

    def __init__(self, runner: ModelRunner, chunk_tokens: int, failures: FailureStreak, join: JoinFn) -> None:
        self._runner = runner
        self._chunk_tokens = chunk_tokens
        self._failures = failures
        self._join = join
        self.jobs: deque[ChunkedPrefill] = deque()  # long prompts, one chunk per step, in order

    def chunked(self, seq: SequenceState) -> bool:
        """Whether `seq`'s prompt is prefilled over several steps, one chunk each."""
        return len(seq.prompt_ids) > self._chunk_tokens

    def start_chunked(self, seqs: Iterable[SequenceState]) -> None:
        self.jobs.extend(ChunkedPrefill(s) for s in seqs)

    def keep(self, keeps: Callable[[ChunkedPrefill], bool]) -> None:
        """Drop the chunked prompts `keeps` rejects (called in order); their slots and partial caches free."""
        kept = [job for job in self.jobs if keeps(job)]
        self.jobs.clear()
        self.jobs.extend(kept)

    def prefill(self, newcomers: list[SequenceState], outbox: Outbox) -> None:
        """One left-padded forward over `newcomers`' whole prompts."""
        try:
            out, kv = self._runner.prefill(
                [s.prompt_ids for s in newcomers], [s.request.use_hooks for s in newcomers],
                [s.table for s in newcomers], [s.request.adapted for s in newcomers],
            )
        except Exception as exc:
            self._failures.failed()
            log.exception("prefill forward failed")
            for seq in newcomers:
                outbox.fail(seq, EngineError(f"prefill forward failed: {exc!r}"))
            return
        metrics.BATCH_SIZE.observe(len(newcomers))
        self._failures.succeeded()
        metrics.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in newcomers))
        self._join(newcomers, out, kv, outbox)

    def prefill_chunks(self, outbox: Outbox) -> None:
        """At most `prefill_chunk_tokens` prompt tokens of the chunked prompts this step, oldest first (a
        prompt's last chunk may leave room for the next prompt's first): the running rows wait for no more."""
        budget = self._chunk_tokens
        while self.jobs and budget > 0:
            job = self.jobs[0]
            tokens = min(budget, len(job.seq.prompt_ids) - job.done)
            self._next_chunk(job, tokens, outbox)
            outbox.flush()  # a first token goes out before the next forward
            budget -= tokens

    def _next_chunk(self, job: ChunkedPrefill, tokens: int, outbox: Outbox) -> None:
        """The next `tokens` of the oldest chunked prompt (`job`); after its last chunk the row samples its
        first token and joins the running batch as a prefilled newcomer does."""
        seq = job.seq
        chunk = seq.prompt_ids[job.done : job.done + tokens]
        try:
            out, job.kv = self._runner.prefill_chunk(
                job.kv, chunk, seq.request.use_hooks, seq.table, seq.request.adapted
            )
        except Exception as exc:
            self._failures.failed()
            log.exception("prefill chunk forward failed")
            self.jobs.popleft()
            outbox.fail(seq, EngineError(f"prefill forward failed: {exc!r}"))
            return
        self._failures.succeeded()
        metrics.PROMPT_TOKENS.inc(len(chunk))
        job.add(out, len(chunk))
        if job.done < len(seq.prompt_ids):
            return
        self.jobs.popleft()
        metrics.BATCH_SIZE.observe(1)
        out.fires, out.fired_tokens = [job.fires], [job.fired]
        self._runner.keep_prompt_state(
            seq.prompt_ids, job.kv, out, seq.request.use_hooks, seq.table, seq.request.adapted
        )
        self._join([seq], out, job.kv, outbox)

    def from_cache(self, newcomers: list[SequenceState], entries: list[PrefixEntry], outbox: Outbox) -> None:
        """Newcomers whose prompt state was kept (prefix_cache.py): no forward, straight to decoding."""
        try:
            out, kv = self._runner.prefill_from_cache(entries)
        except Exception as exc:
            self._failures.failed()
            log.exception("prefill from kept prompt states failed")
            for seq in newcomers:
                outbox.fail(seq, EngineError(f"prefill failed: {exc!r}"))
            return
        self._join(newcomers, out, kv, outbox)

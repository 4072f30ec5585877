"""The Engine: one bounded queue, one worker thread, continuous batching.

Each step of the worker thread:
  1. drops sequences whose consumer went away or whose deadline passed (their batch slots free at once),
  2. runs queued Score requests (one teacher-forced forward each),
  3. admits waiting requests into free slots: one left-padded prefill forward for the newcomers, whose KV
     cache is then merged onto the running batch's cache; a prompt longer than `prefill_chunk_tokens` is
     prefilled instead over several steps, one chunk of at most that many tokens per step (one forward over
     that row's cache so far), and joins the running batch after its last chunk, so long prompts never
     stall the running rows for more than one chunk's forward,
  4. runs one decode forward for every running row and streams each row's new token to its consumer.

Forward passes never run on the asyncio event loop; events cross back with `loop.call_soon_threadsafe`, once
per loop per phase. An exception in a forward fails only the requests in that forward, never the thread.

This module keeps the queue, admission, decode and the running batch; its collaborators are prefill.py (the
prefill forwards, chunked prompts), scoring.py (Score batches), advance.py (sampling each row's token),
delivery.py (results back to the event loops) and health.py (the failure streak).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service import metrics
from service.engine.adapter import RowAdapter
from service.engine.advance import advance, default_eos_ids
from service.engine.batch import ForwardOutput, KVState, ModelRunner, ScoreOutput, plan_prefill_groups
from service.engine.cpu_threads import release_cpu_threads
from service.engine.delivery import Outbox, ScoreJob, settle_threadsafe
from service.engine.gate import HookGate
from service.engine.health import MAX_CONSECUTIVE_FAILURES, FailureStreak
from service.engine.loader import LoadedModel, configure_cuda_attention
from service.engine.prefill import ChunkedPrefill, Prefiller
from service.engine.prefix_cache import PrefixCache
from service.engine.scoring import ScoreBatcher
from service.engine.sequence import EngineError, EngineRequest, SequenceState, TokenStream
from service.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.01  # how often stop() looks whether the in-flight requests have finished
DEFAULT_CONTEXT_TOKENS = 2048  # when the model config names no max_position_embeddings
# What one extra prefill forward costs, in padded tokens of compute (it reads every weight once more). On a
# 2-core CPU a forward over 1 token of SmolLM2-135M costs about as much as 8-16 tokens' worth of compute in
# a larger one; erring high keeps forwards few.
PREFILL_OVERHEAD_TOKENS = 32
# An idle engine holds its first prefill while a burst is still arriving (requests being routed, or the
# last one less than the gap ago), up to the wait: folding a burst into one forward costs its first
# requests at most the wait, splitting it costs the later ones a whole prefill forward. A lone request
# at an idle engine pays the gap. Measured in docs/benchmarks.md ("Admission of a burst").
DEFAULT_ADMISSION_WAIT_S = 0.1
DEFAULT_ARRIVAL_GAP_S = 0.002

__all__ = ["MAX_CONSECUTIVE_FAILURES", "Engine"]


@dataclass(eq=False)
class Ticket:
    """A place in the generation queue, held while the request is still being routed (scope detection
    runs meanwhile): the request then joins the queue at that place, ahead of those that reserved after
    it, so requests are served in arrival order however long their routing takes (`Engine.reserve`)."""

    order: int


class Engine:
    def __init__(
        self,
        loaded: LoadedModel,
        hooks: HookGate | None = None,
        *,
        max_batch_size: int = 16,
        max_queue: int = 256,
        max_context_tokens: int | None = None,
        max_prefill_tokens: int = 4096,
        eos_token_ids: Iterable[int] | None = None,
        prefix_cache_bytes: int = 0,
        adapter: RowAdapter | None = None,
        prefill_chunk_tokens: int = 256,
        packed_weights: bool = True,
        admission_wait_s: float = DEFAULT_ADMISSION_WAIT_S,
        arrival_gap_s: float = DEFAULT_ARRIVAL_GAP_S,
    ) -> None:
        """`adapter`: the alignment adapter, applied to requests with `adapted` set (engine/adapter.py).
        `prefill_chunk_tokens`: longer prompts are prefilled one chunk of this many tokens per step.
        `packed_weights`: on a CPU, batched forwards use oneDNN-packed Linear weights
        (engine/packed_weights.py). `admission_wait_s`: the longest an idle engine holds its prefill for
        a burst still arriving (0 = never); `arrival_gap_s`: the burst has arrived once this long passed
        without a new request and none is still being routed (`_hold_for_arrivals`)."""
        if min(max_batch_size, max_queue, max_prefill_tokens, prefill_chunk_tokens) < 1:
            raise ValueError(
                "max_batch_size, max_queue, max_prefill_tokens and prefill_chunk_tokens must be at least 1"
            )
        if admission_wait_s < 0 or arrival_gap_s < 0:
            raise ValueError("admission_wait_s and arrival_gap_s must be >= 0")
        self._admission_wait_s = admission_wait_s
        self._arrival_gap_s = arrival_gap_s
        self._last_arrival = float("-inf")  # guarded by _lock: the last reserve() or ticketless stream()
        self.loaded = loaded
        self.hooks = hooks
        configure_cuda_attention(loaded.device)  # also for a model loaded without load_model
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.adapter = adapter
        self._runner = ModelRunner(loaded, hooks, self.prefix_cache, adapter, packed_weights)
        self._config = loaded.model.config
        # Default: the generation config's end tokens and the tokenizer's EOS (chat models can have several)
        self._eos_ids = (
            frozenset(int(t) for t in eos_token_ids) if eos_token_ids is not None else default_eos_ids(loaded)
        )
        self._vocab_size = int(loaded.model.get_input_embeddings().num_embeddings)
        self._max_batch_size = max_batch_size
        self._max_queue = max_queue
        self._max_context = int(
            max_context_tokens
            or getattr(self._config, "max_position_embeddings", 0)
            or DEFAULT_CONTEXT_TOKENS
        )
        # Padded tokens (rows x longest prompt) per prefill forward: bounds its memory and how long the
        # running rows wait for it. One request is always admitted, however long.
        self._max_prefill_tokens = max_prefill_tokens

        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._waiting: deque[SequenceState] = deque()  # guarded by _lock; ascending `order`
        self._reserved: set[Ticket] = set()  # guarded by _lock; places held by requests being routed
        self._order = itertools.count(1)  # guarded by _lock
        self._scores: deque[ScoreJob] = deque()  # guarded by _lock
        self._accepting = False
        self._cancel_all = False  # shutdown past its grace: end everything with finish_reason "cancelled"
        self._exit = False
        self._thread: threading.Thread | None = None
        self._failures = FailureStreak()  # shared with the prefill and score collaborators
        # Worker-thread state: the running rows, aligned with the rows of the running KV cache.
        self._rows: list[SequenceState] = []
        self._kv: KVState | None = None
        self._admitted: list[SequenceState] = []  # taken from the queue this step, not yet running
        self._num_running = 0
        self._prefill = Prefiller(self._runner, prefill_chunk_tokens, self._failures, self._join)
        self._scorer = ScoreBatcher(self._runner, max_batch_size, max_prefill_tokens, self._failures)

    # ---- public API ------------------------------------------------------------------------------
    @property
    def max_batch_size(self) -> int:
        return self._max_batch_size

    @property
    def num_running(self) -> int:
        return self._num_running

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def max_context_tokens(self) -> int:
        return self._max_context

    @property
    def healthy(self) -> bool:
        """The worker thread runs and its last MAX_CONSECUTIVE_FAILURES forwards did not all fail."""
        alive = self._thread is not None and self._thread.is_alive()
        return alive and self._failures.healthy

    async def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        with self._lock:
            self._accepting, self._cancel_all, self._exit = True, False, False
        self._thread = threading.Thread(target=self._run, name="editserve-engine", daemon=True)
        self._thread.start()

    async def stop(self, grace_s: float) -> None:
        """Stop admitting, let queued and running sequences finish for up to grace_s, then cancel the rest
        (their streams end with finish_reason "cancelled") and end the worker thread."""
        with self._lock:
            self._accepting = False
        end = time.monotonic() + max(0.0, grace_s)
        while self._busy() and time.monotonic() < end:
            await asyncio.sleep(DRAIN_POLL_S)
        with self._lock:
            self._cancel_all = True
            self._exit = True
            self._wakeup.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        if self.adapter is not None:  # its hooks leave the (possibly shared) model with the engine
            self.adapter.remove()

    def reserve(self) -> Ticket:
        """Hold a place in the queue for a generation whose prompt is not built yet. Raises Unavailable
        when not serving and ResourceExhausted when the queue is full, before any routing work is done.
        Pass the ticket to `stream`, or to `release` when the request fails before it."""
        with self._lock:
            if not self._accepting:
                raise Unavailable("the engine is not serving (not started or shutting down)")
            self._check_queue_room()
            ticket = Ticket(next(self._order))
            self._reserved.add(ticket)
            self._last_arrival = time.monotonic()
            return ticket

    def keep_place(self, stream: TokenStream) -> Ticket:
        """A reserved place with the turn of `stream`'s request, which the caller closes next to queue the
        request again with another prompt (the speculative prefill of a request whose scope detection
        found descriptors, service/dataplane.py): it keeps its turn, and no queue-room check refuses it,
        since it gives back the place it held. Raises Unavailable when not serving."""
        with self._lock:
            if not self._accepting:
                raise Unavailable("the engine is not serving (not started or shutting down)")
            ticket = Ticket(stream.order)
            self._reserved.add(ticket)
            return ticket

    def release(self, ticket: Ticket) -> None:
        """Give back a reserved place unused (the request failed while being routed)."""
        with self._lock:
            self._reserved.discard(ticket)
            self._wakeup.notify()  # an idle engine may be holding its prefill for this place

    def stream(self, request: EngineRequest, ticket: Ticket | None = None) -> TokenStream:
        """Queue a generation; iterate the result for its TokenEvents. Raises (synchronously) InvalidArgument,
        Unavailable when not serving, ResourceExhausted when the queue is full (never with a `ticket`: its
        place was reserved). The ticket is used up either way."""
        try:
            self._check_prompt(request.prompt_ids, "prompt_ids")
            request.params.validate()
            seq = SequenceState(
                request, asyncio.get_running_loop(), self.loaded.tokenizer, self._eos_ids, self._max_context,
                self.loaded.device,
            )
            seq.table = self._pinned(request.hook_table)
            self._enqueue(self._waiting, seq, ticket)
        except BaseException:
            if ticket is not None:
                self.release(ticket)
            raise
        return TokenStream(seq)

    def _pinned(self, table: Any) -> Any:
        """The hook table a request is served with from its first forward to its last: the one it brings
        (the data plane's snapshot), else the one published when it arrives."""
        if self.hooks is None:
            return None
        return table if table is not None else self.hooks.current

    async def score(
        self,
        prompt_ids: list[int],
        continuation_ids: list[int],
        use_hooks: bool = True,
        hook_table: Any = None,
    ) -> ScoreOutput:
        """log p of each continuation token given the prompt and the tokens before it (teacher forcing)."""
        self._check_prompt(prompt_ids, "prompt_ids")
        self._check_ids(continuation_ids, "continuation_ids")
        if len(prompt_ids) + len(continuation_ids) > self._max_context:
            raise InvalidArgument(
                f"prompt + continuation is {len(prompt_ids) + len(continuation_ids)} tokens; "
                f"the context holds {self._max_context}",
                field="continuation_ids",
            )
        table = self._pinned(hook_table)
        if not continuation_ids:
            return ScoreOutput([], [], table.version if table is not None else 0, {})
        loop = asyncio.get_running_loop()
        job = ScoreJob(list(prompt_ids), list(continuation_ids), use_hooks, loop, loop.create_future(),
                        table)
        self._enqueue(self._scores, job)
        return await job.future

    # ---- admission -------------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int], field: str) -> None:
        if any(not 0 <= int(t) < self._vocab_size for t in ids):
            raise InvalidArgument(f"token ids must be in [0, {self._vocab_size})", field=field)

    def _check_prompt(self, ids: Sequence[int], field: str) -> None:
        if not ids:
            raise InvalidArgument("must not be empty", field=field)
        self._check_ids(ids, field)
        if len(ids) >= self._max_context:
            raise InvalidArgument(f"{len(ids)} tokens; the context holds {self._max_context}", field=field)

    def _enqueue(self, queue: deque, item: SequenceState | ScoreJob, ticket: Ticket | None = None) -> None:
        with self._lock:
            if not self._accepting:
                raise Unavailable("the engine is not serving (not started or shutting down)")
            if ticket is None:
                self._check_queue_room()
                self._last_arrival = time.monotonic()
            else:
                self._reserved.discard(ticket)  # the place becomes this queue entry
            if isinstance(item, SequenceState):
                # In order of arrival (a ticket's order when reserved): usually the end of the queue.
                item.order = ticket.order if ticket is not None else next(self._order)
                at = len(self._waiting)
                while at > 0 and self._waiting[at - 1].order > item.order:
                    at -= 1
                self._waiting.insert(at, item)
            else:
                queue.append(item)
            self._wakeup.notify()
            metrics.WAITING.set(len(self._waiting))

    def _check_queue_room(self) -> None:
        """Raise ResourceExhausted when the queue is full (caller holds _lock). Admission runs once per
        engine step: requests that free batch slots will take at the next step are not queued behind
        anything, so only those beyond the free slots count; reserved places count as queued."""
        free = max(0, self._max_batch_size - self._num_running)
        if max(0, len(self._waiting) + len(self._reserved) - free) + len(self._scores) >= self._max_queue:
            raise ResourceExhausted(f"the request queue is full ({self._max_queue} waiting)")

    def _count_running(self) -> None:
        """Rows holding a batch slot: decoding, or prefilling chunk by chunk."""
        self._num_running = len(self._rows) + len(self._prefilling)

    @property
    def _prefilling(self) -> deque[ChunkedPrefill]:
        """The chunked prompts still being prefilled (each holds a batch slot)."""
        return self._prefill.jobs

    def _busy(self) -> bool:
        return bool(self._num_running or self._waiting or self._scores)

    # ---- the worker thread -----------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    if not (self._waiting or self._scores or self._rows or self._prefilling or self._exit):
                        # idle: end this thread's OpenMP team, so an edit computed meanwhile in another
                        # thread gets its cores at full speed (service/engine/cpu_threads.py)
                        release_cpu_threads()
                    while not (self._waiting or self._scores or self._rows or self._prefilling or self._exit):
                        self._wakeup.wait()
                    if self._exit and not (self._waiting or self._scores or self._rows or self._prefilling):
                        break
                    self._hold_for_arrivals()
                try:
                    self._step()
                except Exception as exc:  # a bug outside the forwards: fail what it touched, keep serving
                    self._failures.failed()
                    log.exception("engine step failed")
                    outbox = Outbox()
                    chunked = [job.seq for job in self._prefilling]
                    for seq in {id(s): s for s in self._rows + self._admitted + chunked}.values():
                        if not seq.finished:
                            outbox.fail(seq, EngineError(f"engine step failed: {exc!r}"))
                    outbox.flush()
                    self._rows, self._kv = [], None
                    self._prefill.jobs.clear()
                self._admitted = []
                self._count_running()
                metrics.RUNNING.set(self._num_running)
                metrics.WAITING.set(len(self._waiting))

    def _hold_for_arrivals(self) -> None:
        """Hold the prefill of an idle engine (caller holds _lock) while a burst is still arriving: while
        requests that reserved a place are being routed, and until `arrival_gap_s` passed without a new
        arrival, up to `admission_wait_s` in all. Requests that arrive together then share one prefill
        forward instead of the later ones waiting for the first one's. Never while rows run (their next
        token would wait) or once the queue fills every free slot."""
        if not self._waiting or self._rows or self._prefilling or self._admission_wait_s <= 0:
            return
        now = time.monotonic()
        if not self._reserved and now >= self._last_arrival + self._arrival_gap_s:
            return
        end = now + self._admission_wait_s
        while len(self._waiting) < self._max_batch_size and not self._exit:
            now = time.monotonic()
            quiet_at = self._last_arrival + self._arrival_gap_s
            if not self._reserved and now >= quiet_at:
                metrics.ADMISSION_WAITS.labels("arrived").inc()
                return
            if now >= end:
                metrics.ADMISSION_WAITS.labels("timeout").inc()
                return
            self._wakeup.wait((end if self._reserved else min(end, quiet_at)) - now)
        metrics.ADMISSION_WAITS.labels("full").inc()

    def _step(self) -> None:
        outbox = Outbox()
        self._reap(outbox)
        outbox.flush()
        self._run_scores()
        newcomers = self._admitted = self._admit()
        kept = self._runner.cached_prefixes(
            [s.prompt_ids for s in newcomers], [s.request.use_hooks for s in newcomers],
            [s.table for s in newcomers], [s.request.adapted for s in newcomers],
        )
        hits = [(s, e) for s, e in zip(newcomers, kept, strict=True) if e is not None]
        if hits:
            self._prefill.from_cache([s for s, _ in hits], [e for _, e in hits], outbox)
            outbox.flush()
        misses = [s for s, e in zip(newcomers, kept, strict=True) if e is None]
        self._prefill.start_chunked(s for s in misses if self._prefill.chunked(s))
        misses = [s for s in misses if not self._prefill.chunked(s)]
        for group in plan_prefill_groups([len(s.prompt_ids) for s in misses], PREFILL_OVERHEAD_TOKENS):
            self._prefill.prefill([misses[i] for i in group], outbox)
            outbox.flush()  # first tokens go out before the next forward
        self._prefill.prefill_chunks(outbox)
        if self._rows:
            self._decode(outbox)
            outbox.flush()

    def _reap(self, outbox: Outbox) -> None:
        """Drop cancelled and expired sequences, waiting or running; at shutdown, end them all."""
        now = time.monotonic()
        with self._lock:
            self._waiting = deque(s for s in self._waiting if not self._ends(s, now, outbox))
            if self._cancel_all:
                for job in self._scores:
                    settle_threadsafe(job, Unavailable("the engine shut down"))
                self._scores.clear()
        self._keep_rows([row for row, s in enumerate(self._rows) if not self._ends(s, now, outbox)])
        # a row ended mid-prefill frees its slot and its partial cache at once
        self._prefill.keep(lambda job: not self._ends(job.seq, now, outbox))
        self._count_running()

    def _ends(self, seq: SequenceState, now: float, outbox: Outbox) -> bool:
        """Whether `seq` ends now (its consumer left, shutdown, deadline); queues what its stream is told."""
        if seq.cancelled:
            seq.finished = True  # nobody to tell
        elif self._cancel_all:
            outbox.put(seq, seq.finish_cancelled())
        elif seq.request.deadline is not None and now >= seq.request.deadline:
            outbox.fail(seq, DeadlineExceeded("deadline passed before the generation finished"))
        return seq.finished

    def _keep_rows(self, rows: list[int]) -> None:
        if len(rows) == len(self._rows):
            return
        self._rows = [self._rows[r] for r in rows]
        self._kv = self._kv.select(rows, self._config) if rows and self._kv is not None else None
        self._count_running()

    def _run_scores(self) -> None:
        """Every queued score that is still awaited (scoring.py)."""
        with self._lock:
            jobs = [job for job in self._scores if not job.future.cancelled()]
            self._scores.clear()
        self._scorer.run(jobs)

    def _admit(self) -> list[SequenceState]:
        free = self._max_batch_size - len(self._rows) - len(self._prefilling)
        taken: list[SequenceState] = []
        width = 0
        with self._lock:
            while self._waiting and len(taken) < free:
                head = self._waiting[0]
                # a chunked prompt's forwards are one chunk each, outside the newcomers' prefill forward
                next_width = width if self._prefill.chunked(head) else max(width, len(head.prompt_ids))
                if taken and next_width * (len(taken) + 1) > self._max_prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
                width = next_width
        now = time.monotonic()
        for seq in taken:
            metrics.QUEUE_TIME.observe(now - seq.submitted_at)
        self._num_running = len(self._rows) + len(self._prefilling) + len(taken)
        return taken

    def _join(self, newcomers: list[SequenceState], out: ForwardOutput, kv: KVState, outbox: Outbox) -> None:
        """Sample the newcomers' first tokens and add the ones that go on to the running batch."""
        keep = self._advance(newcomers, out, outbox)
        if not keep:
            return
        if len(keep) < len(newcomers):
            kv = kv.select(keep, self._config)
        self._kv = kv if self._kv is None else self._kv.concat(kv, self._config)
        self._rows.extend(newcomers[i] for i in keep)

    def _decode(self, outbox: Outbox) -> None:
        rows = self._rows
        assert self._kv is not None
        try:
            out = self._runner.decode(
                self._kv, [s.last_token for s in rows], [s.request.use_hooks for s in rows],
                [s.table for s in rows], [s.request.adapted for s in rows],
            )
        except Exception as exc:
            self._failures.failed()
            # The cache may be half-updated: every row of this batch fails, later requests start clean.
            log.exception("decode forward failed")
            for seq in rows:
                outbox.fail(seq, EngineError(f"decode forward failed: {exc!r}"))
            self._rows, self._kv = [], None
            return
        metrics.BATCH_SIZE.observe(len(rows))
        self._failures.succeeded()
        self._keep_rows(self._advance(rows, out, outbox))

    def _advance(self, seqs: list[SequenceState], out: ForwardOutput, outbox: Outbox) -> list[int]:
        """Sample each row's next token and queue its event; returns the rows that keep running."""
        return advance(seqs, out, outbox, self._eos_ids)

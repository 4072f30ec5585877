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
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service import metrics
from service.engine.adapter import RowAdapter
from service.engine.batch import ForwardOutput, KVState, ModelRunner, ScoreOutput, plan_prefill_groups
from service.engine.cpu_threads import release_cpu_threads
from service.engine.gate import HookGate
from service.engine.loader import LoadedModel, configure_cuda_attention
from service.engine.prefix_cache import PrefixCache, PrefixEntry
from service.engine.sampling import mask_tokens, sample_row, token_logprobs
from service.engine.sequence import EngineError, EngineRequest, SequenceState, TokenEvent, TokenStream
from service.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)

DRAIN_POLL_S = 0.01  # how often stop() looks whether the in-flight requests have finished
DEFAULT_CONTEXT_TOKENS = 2048  # when the model config names no max_position_embeddings
# What one extra prefill forward costs, in padded tokens of compute (it reads every weight once more). On a
# 2-core CPU a forward over 1 token of SmolLM2-135M costs about as much as 8-16 tokens' worth of compute in
# a larger one; erring high keeps forwards few.
PREFILL_OVERHEAD_TOKENS = 32


# Forwards failing this many times in a row make the engine unhealthy (readiness NOT_SERVING): one
# failure is a request's problem, a run of them is the server's.
MAX_CONSECUTIVE_FAILURES = 3


@dataclass(eq=False)
class _ScoreJob:
    prompt_ids: list[int]
    continuation_ids: list[int]
    use_hooks: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[ScoreOutput]
    table: Any = None  # the hook table it is scored with


@dataclass(eq=False)
class _ChunkedPrefill:
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


def _deliver(items: list[tuple[asyncio.Queue, TokenEvent | BaseException]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)


def _settle(future: asyncio.Future, result: ScoreOutput | BaseException) -> None:
    if future.done():  # the caller was cancelled meanwhile
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def _settle_threadsafe(job: _ScoreJob, result: ScoreOutput | BaseException) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result)
    except RuntimeError:
        pass  # the caller's loop is closed


class _Outbox:
    """Events produced by one phase of a step, handed to each event loop in one thread-safe call."""

    def __init__(self) -> None:
        self._items: list[tuple[SequenceState, TokenEvent | BaseException]] = []

    def put(self, seq: SequenceState, item: TokenEvent | BaseException) -> None:
        self._items.append((seq, item))

    def fail(self, seq: SequenceState, error: BaseException) -> None:
        """End `seq` with `error` raised on its stream."""
        seq.finished = True
        self._items.append((seq, error))

    def flush(self) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[SequenceState, TokenEvent | BaseException]]] = {}
        for seq, item in self._items:
            by_loop.setdefault(seq.loop, []).append((seq, item))
        self._items = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, [(seq.queue, item) for seq, item in items])
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for seq, _ in items:
                    seq.cancelled = True


def _eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    ids: set[int] = set()
    configured = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured is not None:
        ids.update(int(i) for i in configured)
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return frozenset(ids)


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
    ) -> None:
        """`adapter`: the alignment adapter, applied to requests with `adapted` set (engine/adapter.py).
        `prefill_chunk_tokens`: longer prompts are prefilled one chunk of this many tokens per step."""
        if min(max_batch_size, max_queue, max_prefill_tokens, prefill_chunk_tokens) < 1:
            raise ValueError(
                "max_batch_size, max_queue, max_prefill_tokens and prefill_chunk_tokens must be at least 1"
            )
        self._chunk_tokens = prefill_chunk_tokens
        self.loaded = loaded
        self.hooks = hooks
        configure_cuda_attention(loaded.device)  # also for a model loaded without load_model
        self.prefix_cache = PrefixCache(prefix_cache_bytes)
        self.adapter = adapter
        self._runner = ModelRunner(loaded, hooks, self.prefix_cache, adapter)
        self._config = loaded.model.config
        # Default: the generation config's end tokens and the tokenizer's EOS (chat models can have several)
        self._eos_ids = (
            frozenset(int(t) for t in eos_token_ids) if eos_token_ids is not None else _eos_token_ids(loaded)
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
        self._waiting: deque[SequenceState] = deque()  # guarded by _lock
        self._scores: deque[_ScoreJob] = deque()  # guarded by _lock
        self._accepting = False
        self._cancel_all = False  # shutdown past its grace: end everything with finish_reason "cancelled"
        self._exit = False
        self._thread: threading.Thread | None = None
        self._failures = 0  # forwards (or steps) failed in a row; any success resets it
        # Worker-thread state: the running rows, aligned with the rows of the running KV cache.
        self._rows: list[SequenceState] = []
        self._kv: KVState | None = None
        self._admitted: list[SequenceState] = []  # taken from the queue this step, not yet running
        self._prefilling: deque[_ChunkedPrefill] = deque()  # long prompts, one chunk per step, in order
        self._num_running = 0

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
        return alive and self._failures < MAX_CONSECUTIVE_FAILURES

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

    def stream(self, request: EngineRequest) -> TokenStream:
        """Queue a generation; iterate the result for its TokenEvents. Raises (synchronously) InvalidArgument,
        Unavailable when not serving, ResourceExhausted when the queue is full."""
        self._check_prompt(request.prompt_ids, "prompt_ids")
        request.params.validate()
        seq = SequenceState(
            request, asyncio.get_running_loop(), self.loaded.tokenizer, self._eos_ids, self._max_context,
            self.loaded.device,
        )
        seq.table = self._pinned(request.hook_table)
        self._enqueue(self._waiting, seq)
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
        job = _ScoreJob(list(prompt_ids), list(continuation_ids), use_hooks, loop, loop.create_future(),
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

    def _enqueue(self, queue: deque, item: SequenceState | _ScoreJob) -> None:
        with self._lock:
            if not self._accepting:
                raise Unavailable("the engine is not serving (not started or shutting down)")
            # Admission runs once per engine step: requests that free batch slots will take at the next
            # step are not queued behind anything, so only those beyond the free slots count.
            free = max(0, self._max_batch_size - self._num_running)
            if max(0, len(self._waiting) - free) + len(self._scores) >= self._max_queue:
                raise ResourceExhausted(f"the request queue is full ({self._max_queue} waiting)")
            queue.append(item)
            self._wakeup.notify()
            metrics.WAITING.set(len(self._waiting))

    def _count_running(self) -> None:
        """Rows holding a batch slot: decoding, or prefilling chunk by chunk."""
        self._num_running = len(self._rows) + len(self._prefilling)

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
                try:
                    self._step()
                except Exception as exc:  # a bug outside the forwards: fail what it touched, keep serving
                    self._failures += 1
                    log.exception("engine step failed")
                    outbox = _Outbox()
                    chunked = [job.seq for job in self._prefilling]
                    for seq in {id(s): s for s in self._rows + self._admitted + chunked}.values():
                        if not seq.finished:
                            outbox.fail(seq, EngineError(f"engine step failed: {exc!r}"))
                    outbox.flush()
                    self._rows, self._kv = [], None
                    self._prefilling.clear()
                self._admitted = []
                self._count_running()
                metrics.RUNNING.set(self._num_running)
                metrics.WAITING.set(len(self._waiting))

    def _step(self) -> None:
        outbox = _Outbox()
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
            self._prefill_from_cache([s for s, _ in hits], [e for _, e in hits], outbox)
            outbox.flush()
        misses = [s for s, e in zip(newcomers, kept, strict=True) if e is None]
        self._prefilling.extend(_ChunkedPrefill(s) for s in misses if self._chunked(s))
        misses = [s for s in misses if not self._chunked(s)]
        for group in plan_prefill_groups([len(s.prompt_ids) for s in misses], PREFILL_OVERHEAD_TOKENS):
            self._prefill([misses[i] for i in group], outbox)
            outbox.flush()  # first tokens go out before the next forward
        self._prefill_chunks(outbox)
        if self._rows:
            self._decode(outbox)
            outbox.flush()

    def _reap(self, outbox: _Outbox) -> None:
        """Drop cancelled and expired sequences, waiting or running; at shutdown, end them all."""
        now = time.monotonic()
        with self._lock:
            self._waiting = deque(s for s in self._waiting if not self._ends(s, now, outbox))
            if self._cancel_all:
                for job in self._scores:
                    _settle_threadsafe(job, Unavailable("the engine shut down"))
                self._scores.clear()
        self._keep_rows([row for row, s in enumerate(self._rows) if not self._ends(s, now, outbox)])
        # a row ended mid-prefill frees its slot and its partial cache at once
        self._prefilling = deque(job for job in self._prefilling if not self._ends(job.seq, now, outbox))
        self._count_running()

    def _ends(self, seq: SequenceState, now: float, outbox: _Outbox) -> bool:
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
        """Every queued score, in batches of at most max_batch_size rows and max_prefill_tokens padded
        tokens (one forward each: a CPU forward costs about the same for one row as for several)."""
        with self._lock:
            jobs = [job for job in self._scores if not job.future.cancelled()]
            self._scores.clear()
        jobs.sort(key=lambda job: len(job.prompt_ids) + len(job.continuation_ids))  # less padding
        batch: list[_ScoreJob] = []
        width = 0
        for job in jobs:
            next_width = max(width, len(job.prompt_ids) + len(job.continuation_ids))
            if batch and (
                len(batch) >= self._max_batch_size or next_width * (len(batch) + 1) > self._max_prefill_tokens
            ):
                self._score_batch(batch)
                batch, next_width = [], len(job.prompt_ids) + len(job.continuation_ids)
            batch.append(job)
            width = next_width
        if batch:
            self._score_batch(batch)

    def _score_batch(self, jobs: list[_ScoreJob]) -> None:
        try:
            results: list[ScoreOutput] | BaseException = self._runner.score_batch(
                [(job.prompt_ids, job.continuation_ids, job.use_hooks, job.table) for job in jobs]
            )
            metrics.BATCH_SIZE.observe(len(jobs))
            self._failures = 0
        except Exception as exc:
            self._failures += 1
            log.exception("score forward failed")
            results = EngineError(f"score forward failed: {exc!r}")
        for i, job in enumerate(jobs):
            _settle_threadsafe(job, results if isinstance(results, BaseException) else results[i])

    def _chunked(self, seq: SequenceState) -> bool:
        """Whether `seq`'s prompt is prefilled over several steps, one chunk each."""
        return len(seq.prompt_ids) > self._chunk_tokens

    def _admit(self) -> list[SequenceState]:
        free = self._max_batch_size - len(self._rows) - len(self._prefilling)
        taken: list[SequenceState] = []
        width = 0
        with self._lock:
            while self._waiting and len(taken) < free:
                head = self._waiting[0]
                # a chunked prompt's forwards are one chunk each, outside the newcomers' prefill forward
                next_width = width if self._chunked(head) else max(width, len(head.prompt_ids))
                if taken and next_width * (len(taken) + 1) > self._max_prefill_tokens:
                    break
                taken.append(self._waiting.popleft())
                width = next_width
        now = time.monotonic()
        for seq in taken:
            metrics.QUEUE_TIME.observe(now - seq.submitted_at)
        self._num_running = len(self._rows) + len(self._prefilling) + len(taken)
        return taken

    def _prefill(self, newcomers: list[SequenceState], outbox: _Outbox) -> None:
        try:
            out, kv = self._runner.prefill(
                [s.prompt_ids for s in newcomers], [s.request.use_hooks for s in newcomers],
                [s.table for s in newcomers], [s.request.adapted for s in newcomers],
            )
        except Exception as exc:
            self._failures += 1
            log.exception("prefill forward failed")
            for seq in newcomers:
                outbox.fail(seq, EngineError(f"prefill forward failed: {exc!r}"))
            return
        metrics.BATCH_SIZE.observe(len(newcomers))
        self._failures = 0
        metrics.PROMPT_TOKENS.inc(sum(len(s.prompt_ids) for s in newcomers))
        self._join(newcomers, out, kv, outbox)

    def _prefill_chunks(self, outbox: _Outbox) -> None:
        """At most `prefill_chunk_tokens` prompt tokens of the chunked prompts this step, oldest first (a
        prompt's last chunk may leave room for the next prompt's first): the running rows wait for no more."""
        budget = self._chunk_tokens
        while self._prefilling and budget > 0:
            job = self._prefilling[0]
            tokens = min(budget, len(job.seq.prompt_ids) - job.done)
            self._prefill_next_chunk(job, tokens, outbox)
            outbox.flush()  # a first token goes out before the next forward
            budget -= tokens

    def _prefill_next_chunk(self, job: _ChunkedPrefill, tokens: int, outbox: _Outbox) -> None:
        """The next `tokens` of the oldest chunked prompt (`job`); after its last chunk the row samples its
        first token and joins the running batch as a prefilled newcomer does."""
        seq = job.seq
        chunk = seq.prompt_ids[job.done : job.done + tokens]
        try:
            out, job.kv = self._runner.prefill_chunk(
                job.kv, chunk, seq.request.use_hooks, seq.table, seq.request.adapted
            )
        except Exception as exc:
            self._failures += 1
            log.exception("prefill chunk forward failed")
            self._prefilling.popleft()
            outbox.fail(seq, EngineError(f"prefill forward failed: {exc!r}"))
            return
        self._failures = 0
        metrics.PROMPT_TOKENS.inc(len(chunk))
        job.add(out, len(chunk))
        if job.done < len(seq.prompt_ids):
            return
        self._prefilling.popleft()
        metrics.BATCH_SIZE.observe(1)
        out.fires, out.fired_tokens = [job.fires], [job.fired]
        self._runner.keep_prompt_state(
            seq.prompt_ids, job.kv, out, seq.request.use_hooks, seq.table, seq.request.adapted
        )
        self._join([seq], out, job.kv, outbox)

    def _prefill_from_cache(
        self, newcomers: list[SequenceState], entries: list[PrefixEntry], outbox: _Outbox
    ) -> None:
        """Newcomers whose prompt state was kept (prefix_cache.py): no forward, straight to decoding."""
        try:
            out, kv = self._runner.prefill_from_cache(entries)
        except Exception as exc:
            self._failures += 1
            log.exception("prefill from kept prompt states failed")
            for seq in newcomers:
                outbox.fail(seq, EngineError(f"prefill failed: {exc!r}"))
            return
        self._join(newcomers, out, kv, outbox)

    def _join(self, newcomers: list[SequenceState], out: ForwardOutput, kv: KVState, outbox: _Outbox) -> None:
        """Sample the newcomers' first tokens and add the ones that go on to the running batch."""
        keep = self._advance(newcomers, out, outbox)
        if not keep:
            return
        if len(keep) < len(newcomers):
            kv = kv.select(keep, self._config)
        self._kv = kv if self._kv is None else self._kv.concat(kv, self._config)
        self._rows.extend(newcomers[i] for i in keep)

    def _decode(self, outbox: _Outbox) -> None:
        rows = self._rows
        assert self._kv is not None
        try:
            out = self._runner.decode(
                self._kv, [s.last_token for s in rows], [s.request.use_hooks for s in rows],
                [s.table for s in rows], [s.request.adapted for s in rows],
            )
        except Exception as exc:
            self._failures += 1
            # The cache may be half-updated: every row of this batch fails, later requests start clean.
            log.exception("decode forward failed")
            for seq in rows:
                outbox.fail(seq, EngineError(f"decode forward failed: {exc!r}"))
            self._rows, self._kv = [], None
            return
        metrics.BATCH_SIZE.observe(len(rows))
        self._failures = 0
        self._keep_rows(self._advance(rows, out, outbox))

    def _advance(self, seqs: list[SequenceState], out: ForwardOutput, outbox: _Outbox) -> list[int]:
        """Sample each row's next token and queue its event; returns the rows that keep running."""
        logits = out.logits
        early = [row for row, seq in enumerate(seqs) if len(seq.generated) < seq.params.min_new_tokens]
        if early and self._eos_ids:
            logits = mask_tokens(logits, early, self._eos_ids)
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

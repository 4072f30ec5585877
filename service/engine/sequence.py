"""One request's life in the engine: its request/event types, its per-sequence state (owned by the worker
thread) and the async iterator its consumer reads (owned by the event loop).

The two sides meet only through the sequence's asyncio.Queue (fed with `loop.call_soon_threadsafe`) and the
`cancelled` flag (set by the consumer, read by the worker at the next step).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from service import metrics
from service.engine.sampling import SamplingParams, make_generator
from service.engine.text import IncrementalDetokenizer, StopMatcher
from service.errors import DeadlineExceeded, EditServeError
from service.types import FinishReason


class EngineError(EditServeError):
    """A forward pass (or the engine itself) failed: not the caller's fault."""

    code = "INTERNAL"


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    params: SamplingParams
    use_hooks: bool = True  # False: the hook gate is off for this row only
    deadline: float | None = None  # time.monotonic(); past it the stream raises errors.DeadlineExceeded
    # The hook table snapshot every forward of this request uses (None: the one published when it
    # arrives), so a stream that outlives an Edit or Rollback keeps one edit set from start to end.
    hook_table: Any = None
    # The prompt carries injected descriptors: the engine's alignment adapter (if any) applies to this row.
    adapted: bool = False


@dataclass
class TokenEvent:
    token_ids: list[int]  # new token ids in this event (may be empty on the final event)
    text: str  # newly decoded text since the last event
    finish_reason: FinishReason | None  # set on the final event only
    prompt_tokens: int
    completion_tokens: int
    edit_version: int  # version of the hook table this request is served with (0 without hooks)
    hook_fires: dict[str, float] = field(default_factory=dict)  # final event: edit_id -> best gate score
    # when the request asked: per token id, (log-probability, [(token id, log-probability)] most likely)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)


class SequenceState:
    """Everything the worker keeps about one request. Only the worker thread touches it, except `cancelled`
    (written by the consumer) and `queue` (read by the consumer)."""

    def __init__(
        self,
        request: EngineRequest,
        loop: asyncio.AbstractEventLoop,
        tokenizer: PreTrainedTokenizerBase,
        eos_ids: frozenset[int],
        max_context_tokens: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.request = request
        self.params = request.params
        self.prompt_ids = list(request.prompt_ids)
        self.loop = loop
        self.queue: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.cancelled = False  # the consumer went away
        self.finished = False
        self.generator: torch.Generator | None = make_generator(self.params, device)
        self.table: Any = request.hook_table  # pinned by the engine at submission
        self._eos_ids = eos_ids
        self._detok = IncrementalDetokenizer(tokenizer, self.prompt_ids)
        self._stops = StopMatcher(self.params.stop)
        # The context window caps generation like max_new_tokens does (finish_reason "length").
        self.max_new_tokens = min(self.params.max_new_tokens, max_context_tokens - len(self.prompt_ids))
        self.generated: list[int] = []
        self.fires: dict[str, float] = {}
        self.edit_version = 0
        self.submitted_at = time.monotonic()
        self.order = 0  # place in the queue: a Ticket's when the request reserved one (Engine.reserve)
        self.last_token_at: float | None = None

    @property
    def last_token(self) -> int:
        return self.generated[-1]

    def record_forward(self, fires: dict[str, float], edit_version: int) -> None:
        self.edit_version = edit_version
        for edit_id, score in fires.items():
            if score > self.fires.get(edit_id, float("-inf")):
                self.fires[edit_id] = score

    def append(self, token: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> TokenEvent:
        """Take the next sampled token (and its log-probabilities, when the request asked for them); the
        returned event is final when the sequence ends with it."""
        now = time.monotonic()
        if self.last_token_at is None:
            metrics.TTFT.observe(now - self.submitted_at)
        else:
            metrics.ITL.observe(now - self.last_token_at)
        self.last_token_at = now
        self.generated.append(token)

        reason: FinishReason | None = None
        if token in self._eos_ids:
            text, reason = self._drain(), "eos"
        else:
            text, stopped = self._stops.feed(self._detok.add(token))
            if stopped:
                reason = "stop"
            elif len(self.generated) >= self.max_new_tokens:
                reason = "length"
                text += self._drain()
        if reason is not None:
            self.finished = True
        event = self._event([token], text, reason)
        if logprob is not None:
            event.logprobs.append(logprob)
        return event

    def finish_cancelled(self) -> TokenEvent:
        """The engine gave up on this sequence (shutdown past its grace period)."""
        self.finished = True
        return self._event([], self._drain(), "cancelled")

    def _drain(self) -> str:
        """Text still held back (split characters, possible stop-string prefixes), unless it holds a stop."""
        text, stopped = self._stops.feed(self._detok.flush())
        return text if stopped else text + self._stops.flush()

    def _event(self, token_ids: list[int], text: str, reason: FinishReason | None) -> TokenEvent:
        return TokenEvent(
            token_ids=token_ids,
            text=text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.generated),
            edit_version=self.edit_version,
            hook_fires=dict(self.fires) if reason is not None else {},
        )


class TokenStream(AsyncIterator[TokenEvent]):
    """What `Engine.stream` returns. Closing it, dropping it, or cancelling the task awaiting it cancels the
    sequence; the worker frees its batch slot at the next step."""

    def __init__(self, seq: SequenceState) -> None:
        self._seq = seq
        self._done = False

    def __aiter__(self) -> TokenStream:
        return self

    @property
    def order(self) -> int:
        """The request's place in the engine's queue (arrival order)."""
        return self._seq.order

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        deadline = self._seq.request.deadline
        try:
            if deadline is None:
                item = await self._seq.queue.get()
            else:
                # asyncio's clock is time.monotonic(), the clock deadlines are given in.
                async with asyncio.timeout_at(deadline):
                    item = await self._seq.queue.get()
        except TimeoutError:
            self._abandon()
            raise DeadlineExceeded("deadline passed while generating") from None
        except asyncio.CancelledError:
            self._abandon()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if item.finish_reason is not None:
            self._done = True
        return item

    async def aclose(self) -> None:
        self._abandon()

    def _abandon(self) -> None:
        if not self._done:
            self._done = True
            self._seq.cancelled = True

    def __del__(self) -> None:
        # A consumer that breaks out of `async for` without closing still frees the slot.
        if not self._done:
            self._seq.cancelled = True

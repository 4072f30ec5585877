"""Results crossing from the engine's worker thread back to the callers' asyncio loops.

Token events go out through an `Outbox`, one `loop.call_soon_threadsafe` per loop per phase of a step;
a score's result settles its `ScoreJob`'s future on the caller's loop. A closed loop means nobody listens.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from service.engine.batch import ScoreOutput
from service.engine.sequence import SequenceState, TokenEvent


@dataclass(eq=False)
class ScoreJob:
    """One queued Score request and the future its caller awaits."""

    prompt_ids: list[int]
    continuation_ids: list[int]
    use_hooks: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[ScoreOutput]
    table: Any = None  # the hook table it is scored with


def deliver(items: list[tuple[asyncio.Queue, TokenEvent | BaseException]]) -> None:
    """On the consumers' loop: hand each event (or error) to its stream's queue."""
    for queue, item in items:
        queue.put_nowait(item)


def settle(future: asyncio.Future, result: ScoreOutput | BaseException) -> None:
    """On the caller's loop: resolve a score's future, unless the caller was cancelled meanwhile."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def settle_threadsafe(job: ScoreJob, result: ScoreOutput | BaseException) -> None:
    """From the worker thread: settle `job` on its caller's loop."""
    try:
        job.loop.call_soon_threadsafe(settle, job.future, result)
    except RuntimeError:
        pass  # the caller's loop is closed


class Outbox:
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
                loop.call_soon_threadsafe(deliver, [(seq.queue, item) for seq, item in items])
            except RuntimeError:  # the loop is closed: nobody is listening any more
                for seq, _ in items:
                    seq.cancelled = True

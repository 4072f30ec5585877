"""Hand a thread's OpenMP workers back when it stops running torch work.

torch's CPU kernels run on OpenMP (libgomp). Every thread that runs a parallel kernel gets a team of
workers of its own, kept until that thread exits. Once libgomp manages more threads than there are CPUs,
every team's workers stop spinning between kernels and sleep instead (its "throttled" spin count, 100
iterations), and the thousands of small kernels of a forward each wait for a wake-up. On a 2-core host
that is the normal case here: the engine thread, the edit computations and the scope detector's
encoder run in different threads. Measured with SmolLM2 (forward + backward of 4 x 12 tokens, the
same process): 359 ms in the engine thread alone, 450-893 ms in another thread while the engine's team
was alive (2,000 voluntary context switches per pass against none), 303 ms once the idle engine had
released it. On whole edits beside an idle engine thread the gain is smaller: 1.09x and 1.16x (edit
mean 1.93 -> 1.77 s and 2.04 -> 1.76 s, 8-10 hand-written facts, two alternated rounds per condition),
measured with `bench/cpu_threads.py`, removed since; `git show 78baab4:bench/cpu_threads.py`.

`release_cpu_threads()` ends the calling thread's team (OpenMP 5's `omp_pause_resource_all`, soft);
its next parallel kernel starts a new one (~0.1 ms). Where no libgomp is loaded it does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import sys
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

__all__ = ["release_cpu_threads", "released_after", "set_torch_threads"]

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_P = ParamSpec("_P")
_R = TypeVar("_R")
_lock = threading.Lock()
_pause: Callable[[int], int] | None = None
_looked = False


def _find_pause() -> Callable[[int], int] | None:
    """omp_pause_resource_all of the libgomp this process has loaded (torch's own copy)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line and "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        return fn
    return None


def release_cpu_threads() -> None:
    """End the calling thread's OpenMP team, if it has one (no-op inside a parallel region)."""
    global _pause, _looked
    if not _looked:
        with _lock:
            if not _looked:
                _pause = _find_pause()
                # torch loads libgomp on import: before that there is nothing to release, so look again
                _looked = _pause is not None or "torch" in sys.modules
                if _looked and _pause is None:
                    log.debug("no libgomp with omp_pause_resource_all loaded: nothing to release")
    if _pause is not None:
        _pause(OMP_PAUSE_SOFT)


def released_after(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """`fn`, then `release_cpu_threads()` in the same thread (for work sent to a thread pool)."""

    @functools.wraps(fn)
    def call(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return fn(*args, **kwargs)
        finally:
            release_cpu_threads()

    return call


SMALL_HOST_CPUS = 2  # at most this many CPUs: one torch thread (docs/benchmarks.md#cpu-threads)


def auto_torch_threads(cpu_count: int | None) -> int:
    """Settings.torch_threads = 0: 1 on a host with at most SMALL_HOST_CPUS CPUs, else 0 (torch's default)."""
    return 1 if (cpu_count or 1) <= SMALL_HOST_CPUS else 0


def set_torch_threads(requested: int) -> int:
    """torch's intra-op threads for this process: `requested`, or for 0 the auto rule of
    Settings.torch_threads (1 on a host with at most 2 CPUs). Call it from the main thread before any
    other thread runs torch: a thread's OpenMP and MKL counts are set by the thread that asks."""
    import os

    threads = requested or auto_torch_threads(os.cpu_count())
    if threads > 0:
        import torch

        torch.set_num_threads(threads)
    return threads

"""release_cpu_threads: a thread's OpenMP team can be ended, and torch keeps working in that thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from service.engine import cpu_threads
from service.engine.cpu_threads import release_cpu_threads, released_after


def _gomp_loaded() -> bool:
    maps = Path("/proc/self/maps")
    return maps.exists() and "libgomp" in maps.read_text()


def _parallel_work() -> torch.Tensor:
    a = torch.randn(256, 256)
    return (a @ a).sum(dim=0)  # large enough to run on the thread's OpenMP team


def test_finds_torchs_libgomp_where_it_is_loaded():
    _parallel_work()
    release_cpu_threads()
    if _gomp_loaded():
        assert cpu_threads._pause is not None
    else:  # e.g. a torch built without OpenMP: nothing to release, and no error
        assert cpu_threads._pause is None


def test_torch_computes_the_same_after_the_team_is_released():
    out: dict[str, torch.Tensor] = {}

    def work() -> None:
        torch.manual_seed(0)
        out["before"] = _parallel_work()
        release_cpu_threads()
        torch.manual_seed(0)
        out["after"] = _parallel_work()  # a new team starts here
        release_cpu_threads()

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert torch.equal(out["before"], out["after"])


def test_released_after_returns_the_result_and_releases_on_errors(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(cpu_threads, "release_cpu_threads", lambda: calls.append("released"))

    def ok(x: int, *, y: int) -> int:
        calls.append("ran")
        return x + y

    def fails() -> None:
        raise ValueError("caller's mistake")

    assert released_after(ok)(1, y=2) == 3
    with pytest.raises(ValueError, match="caller's mistake"):
        released_after(fails)()
    assert calls == ["ran", "released", "released"]


def test_auto_torch_threads_is_one_on_small_hosts_only():
    from service.engine.cpu_threads import auto_torch_threads

    assert [auto_torch_threads(n) for n in (None, 1, 2, 4, 16)] == [1, 1, 1, 0, 0]

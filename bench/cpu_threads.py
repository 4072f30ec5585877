"""Edit compute beside an idle engine thread, with and without `release_cpu_threads()`, side by side.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/cpu_threads.py [--edits 10] [--rounds 2]

The service runs torch in several threads: the engine's worker, the edit computations and the scope
detector's encoder (asyncio's thread pool). Each keeps an OpenMP team; with more OpenMP threads than
cores, libgomp lets every team sleep between kernels (service/engine/cpu_threads.py). This mimics the
edit phase of `editserve eval` in one process: an "engine" thread runs one forward (its team now
exists) and goes idle, then an "editor" thread computes the 20 hand-written facts of
testkit/facts.py one after another, each published before the next. Conditions, alternated for
`--rounds` rounds so a slow minute of the machine hits both:

- kept: the idle engine thread keeps its team (the service before release_cpu_threads);
- released: the engine thread released its team before going idle (the service now).

It prints each condition's mean edit time (`compute_seconds`) and the ratio. Run it alone: the two CPU
cores are the measurement.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from service.engine.cpu_threads import release_cpu_threads  # noqa: E402
from service.hooks.editor import Editor  # noqa: E402
from service.hooks.layer import HookManager  # noqa: E402
from testkit.facts import MORE_FACTS  # noqa: E402


class Worker:
    """A long-lived thread that runs one call at a time (as the engine's and the pool's threads are)."""

    def __init__(self, name: str) -> None:
        self._call: Callable[[], Any] | None = None
        self._result: Any = None
        self._go, self._done = threading.Event(), threading.Event()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self._go.wait()
            self._go.clear()
            assert self._call is not None
            self._result = self._call()
            self._done.set()

    def run(self, call: Callable[[], Any]) -> Any:
        self._done.clear()
        self._call = call
        self._go.set()
        self._done.wait()
        return self._result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=10, help="facts per condition and round (at most 20)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    from service.engine.loader import load_model

    lm = load_model("embedded", device="cpu", dtype="float32")
    model, tok = lm.model, lm.tokenizer
    hooks = HookManager(model, [6])
    editor = Editor(model, tok, hooks)
    engine, edit_thread = Worker("engine"), Worker("editor")
    # a batch as the engine runs them while serving (16 requests of 64 tokens): its kernels are large
    # enough to run in parallel, so the engine thread's team exists afterwards
    probe = torch.randint(0, tok.vocab_size, (16, 64), generator=torch.Generator().manual_seed(0))
    facts = [f.spec for f in MORE_FACTS[: args.edits]]

    def engine_forward(release: bool) -> None:
        with torch.inference_mode():
            model(input_ids=probe)
        if release:
            release_cpu_threads()

    def edit_all() -> list[float]:
        hooks.publish(hooks.empty_table())
        editor.warmup()
        seconds = []
        for spec in facts:
            computed = editor.compute(spec)
            seconds.append(computed.report.compute_seconds)
            hooks.publish(hooks.current.extended(computed.entries))
        release_cpu_threads()  # as the data plane does after every edit
        return seconds

    print(f"torch threads {torch.get_num_threads()}, {len(facts)} edits per condition, {args.rounds} rounds")
    results: dict[str, list[float]] = {"kept": [], "released": []}
    edit_thread.run(edit_all)  # warm-up: first-use costs land in neither condition
    try:
        for r in range(args.rounds):
            order = ("kept", "released") if r % 2 == 0 else ("released", "kept")
            for cond in order:
                engine.run(lambda cond=cond: engine_forward(cond == "released"))
                seconds = edit_thread.run(edit_all)
                results[cond] += seconds
                print(f"round {r} {cond}: mean {statistics.mean(seconds):.2f} s", flush=True)
    finally:
        hooks.uninstall()
    kept, released = statistics.mean(results["kept"]), statistics.mean(results["released"])
    print(f"edit mean: engine team kept {kept:.2f} s, released {released:.2f} s; "
          f"ratio {kept / released:.2f}x")


if __name__ == "__main__":
    main()

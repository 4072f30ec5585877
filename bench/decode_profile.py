"""Where the time of one engine decode step goes, at batch 1, 16 and 64.

    EDITSERVE_TORCH_THREADS=1 .venv/bin/python bench/decode_profile.py [--batches 1,16,64] [--tokens 32]
        [--model DIR] [--device cpu|cuda] [--dtype float32|bfloat16] [--json out.json]

B streams are started together on the in-process engine; once all B are decoding, every engine step that
runs one decode forward over the B rows is timed and split into parts by wrapping the engine's own
functions (the engine's code is not changed):

  forward: linear      the model's nn.Linear layers (projections, MLPs, LM head), on torch's kernel or
                       on oneDNN-packed weights (service/engine/packed_weights.py)
  forward: attention   torch's scaled_dot_product_attention calls inside the model
  forward: rest        the rest of the model's forward (norms, activations, rotary, KV cache append, masks)
  decode setup         ModelRunner.decode around the forward: mask and positions, hook-gate scope, adapter
  sample + stream      Engine._advance: argmax/sampling, detokenising, stop strings, events for the streams
  scheduler            the rest of Engine._step: dropping finished rows, admission, KV row selection,
                       handing events to the asyncio loops

Printed: the median step time and each part's median share, per batch size, and tokens/s of the steady
decode; with `--packed-weights on,off` (the default) each batch size once with the engine's packed CPU
weights and once without, side by side in one run. On CUDA every part is timed with a device
synchronisation, which itself costs a little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from serve_throughput import prompts_for  # noqa: E402
from torch import nn  # noqa: E402

from service.engine import (  # noqa: E402
    Engine,
    EngineRequest,
    SamplingParams,
    packed_weights,  # noqa: E402
)
from service.engine.batch import ModelRunner  # noqa: E402
from service.engine.loader import LoadedModel, load_model  # noqa: E402
from service.engine.scheduler import Engine as SchedulerEngine  # noqa: E402

PARTS = ("forward: linear", "forward: attention", "forward: rest", "decode setup", "sample + stream",
         "scheduler")


class StepTimer:
    """Accumulates time spent inside wrapped functions during the current engine step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.decode_rows = 0
        self.recording = False

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def wrap(self, owner: Any, name: str, part: str) -> Callable[[], None]:
        original = getattr(owner, name)
        timer = self

        def timed(*args: Any, **kwargs: Any) -> Any:
            timer.sync()
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timer.sync()
                timer.current[part] += time.perf_counter() - t0

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, original)


def instrument(loaded: LoadedModel, timer: StepTimer, batch: int) -> list[Callable[[], None]]:
    undo = [
        timer.wrap(F, "scaled_dot_product_attention", "attention"),
        timer.wrap(nn.Linear, "forward", "linear"),
        timer.wrap(packed_weights, "packed_linear", "linear"),
        timer.wrap(loaded.model, "forward", "forward"),
        timer.wrap(ModelRunner, "decode", "decode"),
        timer.wrap(SchedulerEngine, "_advance", "advance"),
    ]
    original_step = SchedulerEngine._step

    def step(self: Any) -> Any:
        timer.current = defaultdict(float)
        rows = len(self._rows)
        t0 = time.perf_counter()
        try:
            return original_step(self)
        finally:
            total = time.perf_counter() - t0
            c = timer.current
            # only steady steps: one decode over all B rows and no prefill in the same step
            if timer.recording and rows == batch and c["decode"] and c["forward"] <= c["decode"] + 1e-9:
                timer.steps.append({
                    "total": total,
                    "forward: linear": c["linear"],
                    "forward: attention": c["attention"],
                    "forward: rest": c["forward"] - c["attention"] - c["linear"],
                    "decode setup": c["decode"] - c["forward"],
                    "sample + stream": c["advance"],
                    "scheduler": total - c["decode"] - c["advance"],
                })

    SchedulerEngine._step = step  # type: ignore[method-assign]
    undo.append(lambda: setattr(SchedulerEngine, "_step", original_step))
    return undo


async def profile(loaded: LoadedModel, batch: int, tokens: int, packed: bool) -> dict[str, Any]:
    timer = StepTimer(loaded.device)
    undo = instrument(loaded, timer, batch)
    engine = Engine(loaded, max_batch_size=batch, max_queue=max(256, batch), prefix_cache_bytes=0,
                    packed_weights=packed)
    await engine.start()
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts_for(batch)[:batch]]

    async def one(prompt_ids: list[int]) -> None:
        request = EngineRequest(prompt_ids, SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens))
        async for _ in engine.stream(request):
            pass

    try:
        await one(ids[0])  # warm-up
        timer.recording = True
        await asyncio.gather(*[one(p) for p in ids])
    finally:
        timer.recording = False
        await engine.stop(grace_s=0)
        for u in undo:
            u()
    steps = timer.steps
    if not steps:
        raise RuntimeError(f"no steady decode step at batch {batch}")
    median_total = statistics.median(s["total"] for s in steps)
    shares = {p: statistics.median(s[p] / s["total"] for s in steps) for p in PARTS}
    ms = {p: statistics.median(s[p] for s in steps) * 1e3 for p in PARTS}
    return {"batch": batch, "packed_weights": packed, "steps": len(steps), "step_ms": median_total * 1e3,
            "tokens_per_s": batch / median_total, "part_ms": ms, "part_share": shares}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDITSERVE_TORCH_THREADS") or 0))
    ap.add_argument("--packed-weights", default="on,off",
                    help="on, off or both (on,off): the engine's oneDNN-packed CPU weights")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    print(f"model {loaded.name} on {loaded.device} ({loaded.dtype}), "
          f"torch threads {torch.get_num_threads()}, {args.tokens} new tokens per stream, greedy", flush=True)
    modes = [m == "on" for m in args.packed_weights.split(",")]
    results = [asyncio.run(profile(loaded, int(b), args.tokens, packed))
               for b in args.batches.split(",") for packed in modes]
    header = f"{'batch':>5} {'packed':>6} {'steps':>5} {'step ms':>8} {'tok/s':>7}  "
    print("\n" + header + "  ".join(f"{p:>18}" for p in PARTS))
    for r in results:
        parts = "  ".join(f"{r['part_ms'][p]:8.2f} ms {100 * r['part_share'][p]:5.1f}%" for p in PARTS)
        packed = "on" if r["packed_weights"] else "off"
        print(f"{r['batch']:>5} {packed:>6} {r['steps']:>5} {r['step_ms']:>8.2f} {r['tokens_per_s']:>7.1f}  "
              + parts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

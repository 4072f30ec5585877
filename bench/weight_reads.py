"""How fast this CPU streams weights into the small matrix products v* is made of, side by side.

    .venv/bin/python bench/weight_reads.py [--matrices 40] [--rounds 5]

One v* step multiplies ~16 activation rows by every weight matrix above the hooked layer, forward and
backward, and by the output head twice. At so few rows a product's time is the time to read its weights.
This prints the time of one SmolLM2 MLP-sized product (rows x 576 by 576 x 1536, float32 unless said):

- cold: cycling over `--matrices` different matrices (40 x 3.5 MB, far above the L3 cache), as v* does;
- warm: one matrix again and again (it stays in cache);
- cold with 4 / 16 / 28 rows, with 2 torch threads, in bfloat16 / float16, and with MKL's packed weights.

The last line turns the cold figure into an effective read rate (bytes of weights / time). Run it alone:
the two CPU cores are the measurement.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

D_MODEL, D_MLP = 576, 1536


def per_call_ms(fn: Callable[[torch.Tensor], object], weights: list[torch.Tensor], rounds: int) -> float:
    for w in weights[:3]:
        fn(w)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for w in weights:
            fn(w)
    return (time.perf_counter() - t0) / (rounds * len(weights)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrices", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    weights = [torch.randn(D_MLP, D_MODEL) for _ in range(args.matrices)]
    rows = {n: torch.randn(n, D_MODEL) for n in (4, 16, 28)}
    x = rows[16]
    figures: list[tuple[str, float]] = []
    cold = per_call_ms(lambda w: F.linear(x, w), weights, args.rounds)
    figures.append(("cold, 16 rows, 1 thread", cold))
    figures.append(("warm, 16 rows, 1 thread", per_call_ms(lambda w: F.linear(x, w), weights[:1] * 40, 5)))
    for n in (4, 28):
        xn = rows[n]
        figures.append(
            (f"cold, {n} rows, 1 thread", per_call_ms(lambda w, xn=xn: F.linear(xn, w), weights, args.rounds))
        )
    for dtype in (torch.bfloat16, torch.float16):
        low = [w.to(dtype) for w in weights]
        xl = x.to(dtype)
        figures.append(
            (f"cold, 16 rows, {dtype}", per_call_ms(lambda w, xl=xl: F.linear(xl, w), low, args.rounds))
        )
        del low
    try:
        packed = {id(w): torch.ops.mkl._mkl_reorder_linear_weight(w, 16) for w in weights}
        figures.append(
            (
                "cold, 16 rows, MKL packed weights",
                per_call_ms(
                    lambda w: torch.ops.mkl._mkl_linear(x, packed[id(w)], w, None, 16), weights, args.rounds
                ),
            )
        )
    except (RuntimeError, AttributeError) as exc:
        print(f"MKL packed weights unavailable: {exc}")
    torch.set_num_threads(2)
    figures.append(("cold, 16 rows, 2 threads", per_call_ms(lambda w: F.linear(x, w), weights, args.rounds)))
    for label, ms in figures:
        print(f"{label:36s} {ms:6.3f} ms  ({ms / cold:.2f}x cold 1 thread)")
    mb = D_MLP * D_MODEL * 4 / 1e6
    print(f"effective weight read rate, cold, 1 thread: {mb / cold:.2f} GB/s ({mb:.1f} MB per product)")


if __name__ == "__main__":
    main()

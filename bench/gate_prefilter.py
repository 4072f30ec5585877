#!/usr/bin/env python
"""What the hook gate's ranking of a large table costs, per prefilter kind (service/hooks/table.py).

    EDITSERVE_TORCH_THREADS=1 .venv/bin/python bench/gate_prefilter.py [--entries 10000] [--d-ff 1536]
        [--tokens 16,480] [--threads 1]

For N random unit keys of width d_ff (SmolLM2's MLP: 1536) and T unit queries (16: a decode step of 16
rows; 480: a prefill of 16 prompts of 30 tokens), times the median of repeated calls of:

  exact float32     the full gate's matmul, unit @ keys.T, and its max
  int8 prefilter    torch._weight_int8pack_mm on int8 keys with per-row scales, top-8, exact re-scoring
  bfloat16 prefilter oneDNN's linear on packed bfloat16 keys (CPUs with AVX512-BF16 or AMX), top-8,
                    exact re-scoring

all through the gate's own `best_keys`, and checks that each prefilter picks the exact gate's key for every
query. The keys stay in cache between calls here; inside a decode step the model's weights evict them, so a
forward pays more (docs/benchmarks.md#hook-gate-prefilter).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from service.hooks.gate import best_keys  # noqa: E402
from service.hooks.table import LayerTable, Prefilter, native_bfloat16  # noqa: E402


def timed_ms(fn, repeats: int) -> float:  # noqa: ANN001 - any callable
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=10_000)
    ap.add_argument("--d-ff", type=int, default=1536)
    ap.add_argument("--tokens", default="16,480")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDITSERVE_TORCH_THREADS") or 0))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    keys = F.normalize(torch.randn(args.entries, args.d_ff, generator=gen), dim=-1)
    values = torch.zeros(args.entries, 8)
    thresholds = torch.full((args.entries,), 0.9)
    ids = tuple(f"e{i}" for i in range(args.entries))
    int8 = LayerTable(keys, values, thresholds, ids, prefilter=Prefilter.of(keys, False))
    tables = {"int8 prefilter": int8}
    if native_bfloat16():
        tables["bfloat16 prefilter"] = LayerTable(keys, values, thresholds, ids,
                                                  prefilter=Prefilter.of(keys, True))
    print(f"{args.entries:,} keys of width {args.d_ff}, torch threads {torch.get_num_threads()}, "
          f"native bfloat16: {native_bfloat16()}")
    names = ["exact float32", *tables]
    print(f"{'tokens':>6}  " + "  ".join(f"{name:>20}" for name in names) + "  same picks as exact")
    for tokens in (int(t) for t in args.tokens.split(",")):
        # half the queries lie near a stored key (the gate fires there), half are random
        near = keys[torch.randint(0, args.entries, (tokens // 2,), generator=gen)]
        queries = torch.cat([near + 0.5 * torch.randn(near.shape, generator=gen) / args.d_ff ** 0.5,
                             torch.randn(tokens - tokens // 2, args.d_ff, generator=gen)])
        unit = F.normalize(queries, dim=-1)
        repeats = 30 if tokens <= 64 else 8
        # the exact gate is best_keys' path for a table without prefilter: one matmul and its max
        cells = [f"{timed_ms(lambda u=unit: (u @ keys.T).max(dim=-1), repeats):>17.2f} ms"]
        _, exact_idx = (unit @ keys.T).max(dim=-1)
        same = all(torch.equal(best_keys(t, unit)[1], exact_idx) for t in tables.values())
        for table in tables.values():
            assert table.prefilter is not None
            if table.prefilter.ranks(tokens):
                cells.append(f"{timed_ms(lambda t=table, u=unit: best_keys(t, u), repeats):>17.2f} ms")
            else:
                cells.append(f"{'(ranks exactly)':>20}")
        print(f"{tokens:>6}  " + "  ".join(cells) + f"  {same}")


if __name__ == "__main__":
    main()

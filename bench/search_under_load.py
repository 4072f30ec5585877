#!/usr/bin/env python
"""The descriptor search alone and beside the decoding engine: exact flat search against the float16
ranking with exact re-scoring (service/retrieval/index.py RANKED_MIN_VECTORS).

    EDITSERVE_TORCH_THREADS=1 .venv/bin/python bench/search_under_load.py [--vectors 10000] [--searches 200]

Two DescriptorIndex objects hold the same N random unit vectors of the embedded encoder's width (384):
one searches exactly (its float16 ranking switched off), the other ranks with the float16 copy. Each
search is one query, k = 4, from a worker thread (as the router's thread hop runs it). Printed: the
median ms of each alone, then beside the in-process engine decoding 16 greedy streams of 64 tokens
without pause (SmolLM2, the CPU the engine keeps busy), and whether both return the same ids.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from serve_throughput import prompts_for  # noqa: E402

from service.engine import Engine, EngineRequest, SamplingParams  # noqa: E402
from service.engine.loader import load_model  # noqa: E402
from service.retrieval import index as index_module  # noqa: E402


def build(vectors: np.ndarray, ranked: bool) -> index_module.DescriptorIndex:
    saved = index_module.RANKED_MIN_VECTORS
    index_module.RANKED_MIN_VECTORS = 0 if ranked else len(vectors) + 1
    try:
        idx = index_module.DescriptorIndex(vectors.shape[1])
        idx.add(np.arange(len(vectors), dtype=np.int64), vectors)
    finally:
        index_module.RANKED_MIN_VECTORS = saved
    assert (idx.snapshot().ranking is not None) == ranked
    return idx


def time_searches(indexes: dict[str, index_module.DescriptorIndex], queries: np.ndarray) -> dict[str, float]:
    """Median ms per index over the queries, each search in turn (interleaved)."""
    times: dict[str, list[float]] = {name: [] for name in indexes}
    for q in queries:
        for name, idx in indexes.items():
            started = time.perf_counter()
            idx.search(q[None, :], 4)
            times[name].append((time.perf_counter() - started) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


async def under_load(
    indexes: dict[str, index_module.DescriptorIndex], queries: np.ndarray
) -> dict[str, float]:
    loaded = load_model()
    engine = Engine(loaded, max_batch_size=16, prefix_cache_bytes=0)
    await engine.start()
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts_for(16)]
    running = True

    async def stream(prompt: list[int]) -> None:
        while running:
            async for _ in engine.stream(EngineRequest(prompt, SamplingParams(max_new_tokens=64))):
                pass

    tasks = [asyncio.create_task(stream(p)) for p in ids]
    try:
        await asyncio.sleep(3)  # every stream decoding
        times: dict[str, list[float]] = {name: [] for name in indexes}
        for q in queries:  # one search per thread hop, paced like requests arriving
            one = await asyncio.to_thread(time_searches, indexes, q[None, :])
            for name, ms in one.items():
                times[name].append(ms)
            await asyncio.sleep(0.01)
        return {name: statistics.median(t) for name, t in times.items()}
    finally:
        running = False
        await engine.stop(grace_s=0)
        await asyncio.gather(*tasks, return_exceptions=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--searches", type=int, default=200)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDITSERVE_TORCH_THREADS") or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.vectors, args.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = rng.standard_normal((args.searches, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    indexes = {"exact flat": build(vectors, False), "float16 ranking": build(vectors, True)}
    same = all(np.array_equal(indexes["exact flat"].search(q[None, :], 4)[1],
                              indexes["float16 ranking"].search(q[None, :], 4)[1]) for q in queries)
    alone = time_searches(indexes, queries)
    loaded = asyncio.run(under_load(indexes, queries))
    print(f"{args.vectors:,} vectors of width {args.dim}, k = 4, one query per search; same ids: {same}")
    print(f"{'':>16} {'alone ms':>9} {'beside 16 decoding streams ms':>30}")
    for name in indexes:
        print(f"{name:>16} {alone[name]:>9.3f} {loaded[name]:>30.3f}")


if __name__ == "__main__":
    main()

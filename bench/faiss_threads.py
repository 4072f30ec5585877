"""faiss search time with 2 and 1 OpenMP threads beside one CPU-bound process (a 10,000 x 384 flat inner-
product index, one query, k = 8, 200 searches per setting, two alternated rounds): what chose
service/retrieval/index.py's SEARCH_THREADS on a 2-core host.

    .venv/bin/python bench/faiss_threads.py
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import faiss
import numpy as np


def timed_searches(index: faiss.Index, query: np.ndarray, threads: int, n: int = 200) -> list[float]:
    out: list[float] = []

    def run() -> None:  # in a fresh thread: OpenMP thread counts are per calling thread
        faiss.omp_set_num_threads(threads)
        for _ in range(n):
            t = time.perf_counter()
            index.search(query, 8)
            out.append((time.perf_counter() - t) * 1e3)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    return sorted(out)


def main() -> None:
    vectors = np.random.default_rng(0).standard_normal((10_000, 384)).astype(np.float32)
    faiss.normalize_L2(vectors)
    index = faiss.IndexFlatIP(384)
    index.add(vectors)
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # the engine's stand-in
    try:
        for rnd in range(2):
            for threads in (2, 1):
                ms = timed_searches(index, vectors[:1].copy(), threads)
                print(f"round {rnd} threads {threads}: p50 {ms[len(ms) // 2]:.2f} ms "
                      f"p90 {ms[int(len(ms) * 0.9)]:.2f} ms", flush=True)
    finally:
        busy.kill()


if __name__ == "__main__":
    main()

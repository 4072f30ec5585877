"""Query embeddings for the scope detector, off the critical path as far as they can be.

Every Generate that may consult the retrieval path embeds its query (one or two views, see
router/scope.py `query_views`) before its prompt can be built. Two things keep that cheap under load:

- **A cache.** The embedding of a text depends only on the encoder, never on the edit set, so repeated
  prompts (retries, templated questions, the same chat turn asked by many users) skip the encoder.
  Least-recently-used, bounded by entries.
- **Micro-batches.** Concurrent requests' uncached views are encoded in one forward rather than one after
  another under the encoder's lock: a BERT forward over 8 short sentences costs little more than over one
  on a CPU. Flat combining, no extra thread: the first caller to find the encoder free encodes everything
  queued so far; callers that arrive while it runs wait, and the next free caller encodes what they queued.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from service.retrieval.store import Encoder

DEFAULT_QUERY_CACHE_ENTRIES = 4096  # 384-wide float32 rows: about 6 MiB for the embedded encoder


@dataclass
class _Job:
    texts: list[str]
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False
    batch_size: int = field(default=0)  # how many texts the forward that served this job encoded


class QueryEncoder:
    """`encode(texts)` with a cache and cross-request micro-batching; safe from many threads."""

    def __init__(self, encoder: Encoder, cache_entries: int = DEFAULT_QUERY_CACHE_ENTRIES) -> None:
        if cache_entries < 0:
            raise ValueError("cache_entries must be >= 0")
        self.encoder = encoder
        self.dim = int(encoder.dim)
        self.cache_entries = cache_entries
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._queue: list[_Job] = []
        self._cv = threading.Condition()
        self._encoding = False
        # counters for benchmarks and tests (read without a lock: figures, not invariants)
        self.hits = 0
        self.misses = 0
        self.forwards = 0

    def cached(self, texts: list[str]) -> bool:
        """Whether every text's embedding is in the cache (encode would run no encoder forward). Found
        entries count as used, so the `encode` that follows finds them even while others are added."""
        with self._cache_lock:
            if not all(t in self._cache for t in texts):
                return False
            for text in texts:
                self._cache.move_to_end(text)
            return True

    def encode(self, texts: list[str]) -> np.ndarray:
        """[n, dim] float32 unit rows, the same as the wrapped encoder's."""
        out = np.empty((len(texts), self.dim), np.float32)
        missing: list[int] = []
        with self._cache_lock:
            for i, text in enumerate(texts):
                row = self._cache.get(text)
                if row is None:
                    missing.append(i)
                else:
                    self._cache.move_to_end(text)
                    out[i] = row
            self.hits += len(texts) - len(missing)
            self.misses += len(missing)
        if missing:
            unique = list(dict.fromkeys(texts[i] for i in missing))
            rows = dict(zip(unique, self._encode_combined(unique), strict=True))
            for i in missing:
                out[i] = rows[texts[i]]
            self._remember(rows)
        return out

    def _remember(self, rows: dict[str, np.ndarray]) -> None:
        if not self.cache_entries:
            return
        with self._cache_lock:
            for text, row in rows.items():
                self._cache[text] = row
                self._cache.move_to_end(text)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)

    def _encode_combined(self, texts: list[str]) -> np.ndarray:
        job = _Job(texts)
        with self._cv:
            self._queue.append(job)
            while self._encoding and not job.done:
                self._cv.wait()
            if job.done:
                return self._result(job)
            # The encoder is free: this caller encodes every job queued so far, its own among them.
            self._encoding = True
            batch, self._queue = self._queue, []
        flat = [t for j in batch for t in j.texts]
        try:
            rows = self.encoder.encode(flat)
            error = None
        except BaseException as exc:  # handed to every waiting caller, not only this one
            rows, error = None, exc
        with self._cv:
            self.forwards += 1
            start = 0
            for j in batch:
                if rows is not None:
                    j.result = rows[start : start + len(j.texts)]
                j.error, j.done, j.batch_size = error, True, len(flat)
                start += len(j.texts)
            self._encoding = False
            self._cv.notify_all()
        return self._result(job)

    @staticmethod
    def _result(job: _Job) -> np.ndarray:
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

"""faiss index of descriptor embeddings with stable int64 ids and exact removal.

Concurrency: copy-on-write. Every write builds a new faiss object (clone + change, or a fresh build)
under a writer lock and publishes it as an immutable `IndexSnapshot` with one reference assignment,
which is atomic in CPython. Readers take `snapshot()` and search it without any lock, so a search
never waits for a write and never sees a half-applied one. A published faiss object is never mutated.
Cost: a write copies the index (about 15 MB at 10,000 vectors of 384 floats, a few ms), which is
small next to computing an edit; bulk loads go through `add` with many ids, or `rebuild`, in one copy.

Approximate mode: above `approx_threshold` live vectors the index is rebuilt as HNSW
(IndexIDMap2 over IndexHNSWFlat). HNSW cannot delete, so removals are tombstones: the snapshot
carries the removed ids and every search excludes them with a faiss IDSelector (exact: a removed
id is never returned). When tombstones pass `compact_fraction` of the stored vectors the index is
rebuilt without them (and goes back to flat if the live count fell to the threshold or below).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np

Kind = Literal["flat", "hnsw"]

# OpenMP threads of one search. faiss's default (one per CPU) makes a search wait for a core the engine
# holds: a 10,000 x 384 flat search beside one CPU-bound process took p90 8.6-16 ms with 2 threads and
# 0.28-0.32 ms with 1 on a 2-core host (`git show 814401a:bench/faiss_threads.py`, removed since). One query
# is too small to gain from more, so one is the default on a host of 2 CPUs or fewer; 0 leaves faiss's
# own count.
SEARCH_THREADS = 1 if (os.cpu_count() or 1) <= 2 else 0


@contextmanager
def _search_threads() -> Iterator[None]:
    """SEARCH_THREADS for one search, then the calling thread's count as it was: faiss and torch share
    one OpenMP runtime, whose thread count is per calling thread, so a lasting change would also change
    the torch work that thread runs later."""
    if not SEARCH_THREADS:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(SEARCH_THREADS)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


# Exact (flat) indexes of at least RANKED_MIN_VECTORS vectors also keep a float16 copy that ranks them;
# the best RANK_FACTOR x k of each query are then scored exactly from the float32 vectors. A flat search
# reads every vector: 15 MB at 10,000 x 384, which the decoding engine keeps evicting from the CPU's
# cache, so under load the read, not the arithmetic, is its cost (a 10,000-vector search took 0.69 ms
# alone and 1.37 ms beside the engine decoding 16 streams; the float16 ranking 0.47 and 0.97 ms,
# bench/search_under_load.py, docs/benchmarks.md#serving-throughput). The float16 score is within about
# 1e-3 of the exact one, so the result can differ from the exact top-k only when more than
# (RANK_FACTOR - 1) x k vectors lie within that distance of the k-th: a near-tie, and the scores
# returned are always the exact ones.
RANKED_MIN_VECTORS = 4096
RANK_FACTOR = 4


@dataclass(frozen=True)
class IndexSnapshot:
    """One published, immutable state of the index; safe to search from any number of threads."""

    index: faiss.Index
    kind: Kind
    dim: int
    tombstones: frozenset[int] = frozenset()
    ef_search: int = 128
    # faiss search parameters reference these selector objects; keeping them here keeps them alive.
    _selector: tuple[object, ...] = field(default=(), repr=False)
    # a flat index's float16 copy with the same ids (see RANKED_MIN_VECTORS); None: search exactly
    ranking: faiss.Index | None = field(default=None, repr=False)

    @property
    def ntotal(self) -> int:
        """Vectors stored in faiss, tombstoned ones included."""
        return int(self.index.ntotal)

    def __len__(self) -> int:
        return self.ntotal - len(self.tombstones)

    def search(
        self, queries: np.ndarray, k: int, only: object | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores [q, k] float32, ids [q, k] int64); missing slots are id -1 with score -inf. `only`: a
        faiss IDSelector of live ids to search among (a namespace view); it replaces the tombstone
        selector, so it must name live ids only."""
        q = _as_matrix(queries, self.dim)
        if k <= 0:
            raise ValueError("k must be positive")
        if self.ntotal == 0 or len(self) == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        params = None
        if self.kind == "hnsw":
            sel = only if only is not None else self._selector[0] if self._selector else None
            params = faiss.SearchParametersHNSW(efSearch=max(self.ef_search, k))
            if sel is not None:
                params.sel = sel
        elif only is not None:
            params = faiss.SearchParameters(sel=only)
        if self.ranking is not None:
            return self._ranked_search(q, k, params)
        with _search_threads():
            scores, ids = self.index.search(q, k, params=params)
        scores = scores.astype(np.float32, copy=False)
        scores[ids < 0] = -np.inf
        return scores, ids

    def _ranked_search(
        self, q: np.ndarray, k: int, params: object | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The float16 copy's best RANK_FACTOR x k per query, re-scored exactly; the k best of those."""
        assert self.ranking is not None
        with _search_threads():
            _, cand = self.ranking.search(q, RANK_FACTOR * k, params=params)
        scores = np.full((len(q), k), -np.inf, np.float32)
        ids = np.full((len(q), k), -1, np.int64)
        for row, found in enumerate(cand):
            found = found[found >= 0]
            if len(found) == 0:
                continue
            exact = self.index.reconstruct_batch(found) @ q[row]
            best = np.argsort(-exact, kind="stable")[:k]
            scores[row, : len(best)] = exact[best]
            ids[row, : len(best)] = found[best]
        return scores, ids

    def export(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids [n], vectors [n, dim]) of the live vectors, in storage order."""
        n = self.ntotal
        if n == 0:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        ids = faiss.vector_to_array(self.index.id_map).astype(np.int64)
        inner = faiss.downcast_index(self.index.index)
        vecs = inner.reconstruct_n(0, n).astype(np.float32, copy=False)
        if self.tombstones:
            keep = ~np.isin(ids, np.fromiter(self.tombstones, np.int64, len(self.tombstones)))
            ids, vecs = ids[keep], vecs[keep]
        return ids, vecs


def _float16_copy(index: faiss.Index, dim: int) -> faiss.Index:
    """A float16 scalar-quantised copy of a flat IndexIDMap2, with the same ids (see RANKED_MIN_VECTORS)."""
    n = int(index.ntotal)
    inner = faiss.downcast_index(index.index)
    vectors = faiss.rev_swig_ptr(inner.get_xb(), n * dim).reshape(n, dim)  # a view, not a copy
    ranking = faiss.IndexIDMap2(
        faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
    )
    ranking.add_with_ids(vectors, faiss.vector_to_array(index.id_map).astype(np.int64))
    return ranking


def _as_matrix(x: np.ndarray, dim: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"expected vectors of dimension {dim}, got shape {x.shape}")
    return np.ascontiguousarray(x)


def _as_ids(ids: np.ndarray) -> np.ndarray:
    ids = np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))
    if (ids < 0).any():
        raise ValueError("ids must be non-negative (-1 means 'missing' in results)")
    return ids


class DescriptorIndex:
    """Inner-product (cosine, for unit vectors) index; exact below `approx_threshold`, HNSW above."""

    def __init__(
        self,
        dim: int,
        approx_threshold: int = 50_000,
        *,
        hnsw_m: int = 32,
        ef_construction: int = 128,
        ef_search: int = 128,
        compact_fraction: float = 0.1,
    ) -> None:
        self.dim = int(dim)
        self.approx_threshold = int(approx_threshold)
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.compact_fraction = compact_fraction
        self._lock = threading.Lock()
        self._snap = self._build(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))

    # -- reads (lock-free) ------------------------------------------------------------------------

    def snapshot(self) -> IndexSnapshot:
        return self._snap

    @property
    def kind(self) -> Kind:
        return self._snap.kind

    def __len__(self) -> int:
        return len(self._snap)

    def __contains__(self, id_: object) -> bool:
        return isinstance(id_, int | np.integer) and int(id_) in self._live_ids()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._snap.search(queries, k)

    def copy(self) -> DescriptorIndex:
        """An independent index sharing the current (immutable) snapshot: O(1)."""
        other = DescriptorIndex.__new__(DescriptorIndex)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_lock"})
        other._lock = threading.Lock()
        return other

    def recall_at_k(self, queries: np.ndarray, k: int) -> float:
        """Mean fraction of the exact top-k (brute force over the live vectors) that search returns."""
        snap = self._snap
        q = _as_matrix(queries, self.dim)
        ids, vecs = snap.export()
        if len(ids) == 0 or len(q) == 0:
            return 1.0
        exact = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))
        exact.add_with_ids(vecs, ids)
        _, want = exact.search(q, k)
        _, got = snap.search(q, k)
        fractions = [
            len(set(w[w >= 0].tolist()) & set(g.tolist())) / max(1, int((w >= 0).sum()))
            for w, g in zip(want, got, strict=True)
        ]
        return float(np.mean(fractions))

    # -- writes (serialised; each publishes a new snapshot) ----------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        ids = _as_ids(ids)
        vecs = _as_matrix(vectors, self.dim)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("duplicate ids in one add")
        if len(ids) == 0:
            return
        with self._lock:
            snap = self._snap
            live = self._live_ids()
            dup = [i for i in ids.tolist() if i in live]
            if dup:
                raise ValueError(f"ids already in the index: {dup[:5]}")
            n_after = len(snap) + len(ids)
            reused_tombstone = bool(snap.tombstones.intersection(ids.tolist()))
            if reused_tombstone or (snap.kind == "flat" and n_after > self.approx_threshold):
                old_ids, old_vecs = snap.export()
                self._snap = self._build(np.concatenate([old_ids, ids]), np.concatenate([old_vecs, vecs]))
                return
            index = faiss.clone_index(snap.index)
            index.add_with_ids(vecs, ids)
            self._snap = self._publish(index, snap.kind, snap.tombstones)

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids (unknown ones are ignored); returns how many were removed."""
        ids = _as_ids(ids)
        with self._lock:
            snap = self._snap
            live = self._live_ids()
            gone = sorted({i for i in ids.tolist() if i in live})
            if not gone:
                return 0
            if snap.kind == "flat":
                index = faiss.clone_index(snap.index)
                index.remove_ids(np.array(gone, np.int64))
                self._snap = self._publish(index, "flat")
            else:
                tomb = snap.tombstones.union(gone)
                if len(tomb) > self.compact_fraction * snap.ntotal:
                    all_ids, vecs = snap.export()
                    keep = ~np.isin(all_ids, np.array(gone, np.int64))
                    self._snap = self._build(all_ids[keep], vecs[keep])
                else:
                    self._snap = self._publish(snap.index, "hnsw", frozenset(tomb))
            return len(gone)

    def rebuild(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole content in one build (restart path)."""
        ids = _as_ids(ids)
        vecs = _as_matrix(vectors, self.dim) if len(ids) else np.zeros((0, self.dim), np.float32)
        if len(ids) != len(vecs):
            raise ValueError(f"{len(ids)} ids for {len(vecs)} vectors")
        if len(set(ids.tolist())) != len(ids):
            raise ValueError("duplicate ids in rebuild")
        with self._lock:
            self._snap = self._build(ids, vecs)

    # -- internals ---------------------------------------------------------------------------------

    def _live_ids(self) -> set[int]:
        # Cached per snapshot (the tuple is replaced whole, so a racing reader sees a consistent pair).
        snap = self._snap
        cached = getattr(self, "_live_cache", None)
        if cached is not None and cached[0] is snap:
            return cached[1]
        live = set(faiss.vector_to_array(snap.index.id_map).tolist()) - snap.tombstones
        self._live_cache = (snap, live)
        return live

    def _build(self, ids: np.ndarray, vecs: np.ndarray) -> IndexSnapshot:
        if len(ids) > self.approx_threshold:
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = self.ef_construction
            kind: Kind = "hnsw"
        else:
            inner = faiss.IndexFlatIP(self.dim)
            kind = "flat"
        index = faiss.IndexIDMap2(inner)
        if len(ids):
            index.add_with_ids(vecs, ids)
        return self._publish(index, kind)

    def _publish(
        self, index: faiss.Index, kind: Kind, tombstones: frozenset[int] = frozenset()
    ) -> IndexSnapshot:
        selector: tuple[object, ...] = ()
        if tombstones:
            batch = faiss.IDSelectorBatch(np.fromiter(tombstones, np.int64, len(tombstones)))
            selector = (faiss.IDSelectorNot(batch), batch)
        ranking = None
        if kind == "flat" and index.ntotal >= RANKED_MIN_VECTORS:
            ranking = _float16_copy(index, self.dim)
        return IndexSnapshot(index, kind, self.dim, tombstones, self.ef_search, selector, ranking)

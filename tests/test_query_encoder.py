"""QueryEncoder: cached and micro-batched query embeddings give exactly the wrapped encoder's rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from service.retrieval.query_encoder import QueryEncoder
from service.router.scope import ScopeDetector
from testkit.editing import HashEncoder


class SlowEncoder:
    """HashEncoder's rows after a fixed delay per forward, counting forwards and the texts in each."""

    def __init__(self, delay_s: float = 0.05, fail_on: str | None = None) -> None:
        self.inner = HashEncoder()
        self.dim = self.inner.dim
        self.delay_s, self.fail_on = delay_s, fail_on
        self.calls: list[list[str]] = []
        self._lock = threading.Lock()

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._lock:  # as DescriptorEncoder: one forward at a time
            self.calls.append(list(texts))
            time.sleep(self.delay_s)
            if self.fail_on is not None and self.fail_on in texts:
                raise RuntimeError("encoder failed")
            return self.inner.encode(texts)


def test_rows_equal_the_encoders_and_repeats_come_from_the_cache() -> None:
    slow = SlowEncoder(delay_s=0.0)
    queries = QueryEncoder(slow, cache_entries=8)
    texts = ["Where is the Eiffel Tower?", "Who runs Acme?", "Where is the Eiffel Tower?"]
    rows = queries.encode(texts)
    np.testing.assert_array_equal(rows, slow.inner.encode(texts))
    assert slow.calls == [["Where is the Eiffel Tower?", "Who runs Acme?"]]  # duplicates encoded once
    again = queries.encode(["Who runs Acme?"])
    np.testing.assert_array_equal(again[0], rows[1])
    assert len(slow.calls) == 1 and queries.hits >= 1


def test_the_cache_is_bounded_least_recently_used_first() -> None:
    slow = SlowEncoder(delay_s=0.0)
    queries = QueryEncoder(slow, cache_entries=2)
    for text in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        queries.encode([text])
    calls = len(slow.calls)
    queries.encode(["a"])
    queries.encode(["c"])
    assert len(slow.calls) == calls
    queries.encode(["b"])
    assert len(slow.calls) == calls + 1


def test_no_cache_still_encodes_correctly() -> None:
    slow = SlowEncoder(delay_s=0.0)
    queries = QueryEncoder(slow, cache_entries=0)
    queries.encode(["x"])
    queries.encode(["x"])
    assert len(slow.calls) == 2
    with pytest.raises(ValueError):
        QueryEncoder(slow, cache_entries=-1)


def test_concurrent_queries_share_forwards() -> None:
    slow = SlowEncoder(delay_s=0.05)
    queries = QueryEncoder(slow, cache_entries=0)
    texts = [f"question number {i}?" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(lambda t: queries.encode([t])[0], texts))
    for text, row in zip(texts, rows, strict=True):
        np.testing.assert_array_equal(row, slow.inner.encode([text])[0])
    # one forward per query would be 16; the first runs alone, the rest queue behind it and combine
    assert len(slow.calls) < 8, [len(c) for c in slow.calls]
    assert sum(len(c) for c in slow.calls) == 16


def test_an_encoder_error_reaches_every_caller_of_that_forward_and_no_later_one() -> None:
    slow = SlowEncoder(delay_s=0.05, fail_on="bad")
    queries = QueryEncoder(slow, cache_entries=0)
    barrier = threading.Barrier(2)

    def call(text: str) -> str:
        barrier.wait()
        try:
            queries.encode([text])
            return "ok"
        except RuntimeError:
            return "error"

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(call, ["bad", "good"]))
    assert "error" in outcomes
    assert queries.encode(["good"]).shape == (1, slow.dim)  # the combiner is free again


def test_the_scope_detector_embeds_through_the_cache() -> None:
    from service.retrieval.store import RetrievalStore

    slow = SlowEncoder(delay_s=0.0)
    store = RetrievalStore(slow)
    store.add("e1", "The mascot of the Zorbian Space Agency is a purple llama named Quimby.")
    scope = ScopeDetector(store, query_cache_entries=16)
    query = "What is the mascot of the Zorbian Space Agency?"
    first = scope.detect(query)
    calls = len(slow.calls)
    assert scope.detect(query) == first
    assert len(slow.calls) == calls


def test_cached_says_whether_encode_would_run_the_encoder_and_keeps_found_rows() -> None:
    queries = QueryEncoder(HashEncoder(), cache_entries=2)
    assert not queries.cached(["a"])
    queries.encode(["a", "b"])
    assert queries.cached(["a"]) and queries.cached(["a", "b"]) and not queries.cached(["a", "c"])
    assert queries.cached(["a"])  # "a" is now the most recently used: adding "c" evicts "b"
    queries.encode(["c"])
    assert queries.cached(["a"]) and not queries.cached(["b"])
    assert queries.misses == 3  # cached() itself never counts a hit or a miss, nor encodes


class CountingSnapshotSearches:
    """Counts index searches through StoreSnapshot.search_entries (the work a cached detection skips)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from service.retrieval.store import StoreSnapshot

        self.count = 0
        search = StoreSnapshot.search_entries

        def counting(snap, queries, k):
            self.count += 1
            return search(snap, queries, k)

        monkeypatch.setattr(StoreSnapshot, "search_entries", counting)


def test_a_repeated_query_under_the_same_edit_set_reuses_its_detection(monkeypatch) -> None:
    from service.retrieval.store import RetrievalStore

    searches = CountingSnapshotSearches(monkeypatch)
    store = RetrievalStore(HashEncoder())
    store.add("e1", "The mascot of the Zorbian Space Agency is a purple llama named Quimby.",
              subject="Zorbian Space Agency")
    scope = ScopeDetector(store, query_cache_entries=16)
    query = "What is the mascot of the Zorbian Space Agency?"
    first = scope.detect(query)
    assert [h.edit_id for h in first] == ["e1"] and searches.count == 1
    assert not scope.needs_encoder(query)
    again = scope.detect(query)
    assert again == first and searches.count == 1
    again.clear()  # a caller's list is its own
    assert scope.detect(query) == first

    # A new edit set is searched afresh, and a request pinned to the old one still gets the old hits.
    old = store.snapshot()
    store.add("e2", "The mascot of the Zorbian Space Agency is now a green yak named Bolt.",
              subject="Zorbian Space Agency")
    assert {h.edit_id for h in scope.detect(query)} == {"e1", "e2"} and searches.count == 2
    assert [h.edit_id for h in scope.detect(query, old)] == ["e1"] and searches.count == 2
    store.remove("e1")
    assert [h.edit_id for h in scope.detect(query)] == ["e2"] and searches.count == 3

    # Other thresholds are another detection.
    scope.threshold = scope.subject_threshold = scope.name_threshold = 0.9999
    assert scope.detect(query) == [] and searches.count == 4


def test_namespace_views_keep_their_own_detections(monkeypatch) -> None:
    from service.retrieval.store import RetrievalStore

    store = RetrievalStore(HashEncoder())
    store.add_many([
        ("a1", "The mascot of the Zorbian Space Agency is a purple llama named Quimby.", None,
         "Zorbian Space Agency", "team-a"),
        ("b1", "The mascot of the Zorbian Space Agency is a green yak named Bolt.", None,
         "Zorbian Space Agency", "team-b"),
    ])
    scope = ScopeDetector(store, query_cache_entries=16)
    query = "What is the mascot of the Zorbian Space Agency?"
    snap = store.snapshot()
    for _ in range(2):
        assert [h.edit_id for h in scope.detect(query, snap.scoped(frozenset({"team-a"})))] == ["a1"]
        assert [h.edit_id for h in scope.detect(query, snap.scoped(frozenset({"team-b"})))] == ["b1"]
        assert {h.edit_id for h in scope.detect(query, snap)} == {"a1", "b1"}


def test_no_detection_cache_with_the_query_cache_off(monkeypatch) -> None:
    from service.retrieval.store import RetrievalStore

    searches = CountingSnapshotSearches(monkeypatch)
    store = RetrievalStore(HashEncoder())
    store.add("e1", "The mascot of the Zorbian Space Agency is a purple llama named Quimby.")
    scope = ScopeDetector(store, query_cache_entries=0)
    query = "What is the mascot of the Zorbian Space Agency?"
    assert scope.detect(query) == scope.detect(query)
    assert searches.count == 2 and scope.needs_encoder(query)


def test_the_detection_cache_is_bounded(monkeypatch) -> None:
    from service.retrieval.store import RetrievalStore

    searches = CountingSnapshotSearches(monkeypatch)
    store = RetrievalStore(HashEncoder())
    store.add("e1", "The mascot of the Zorbian Space Agency is a purple llama named Quimby.")
    scope = ScopeDetector(store, query_cache_entries=2)
    for query in ("one?", "two?", "three?", "one?"):
        scope.detect(query)
    assert searches.count == 4 and len(scope._detections) == 2

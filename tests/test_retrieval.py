"""Retrieval path: encoder offline, faiss index with exact removal and stable ids, store rebuild, HNSW."""

from __future__ import annotations

import threading
import time
import zlib

import numpy as np
import pytest

from service.retrieval.encoder import DescriptorEncoder
from service.retrieval.index import DescriptorIndex
from service.retrieval.store import RetrievalStore, faiss_id

DIM = 384


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class CountingEncoder:
    """Wraps an encoder and counts the texts it was asked to encode."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.dim = inner.dim
        self.texts = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.texts += len(texts)
        return self.inner.encode(texts)


class HashEncoder:
    """Deterministic fake encoder (no model) for store tests that only need stable unit vectors."""

    dim = DIM

    def encode(self, texts: list[str]) -> np.ndarray:
        out = [unit(np.random.default_rng(zlib.crc32(t.encode())), 1)[0] for t in texts]
        return np.array(out, np.float32).reshape(len(texts), DIM)


@pytest.fixture(scope="module")
def encoder() -> DescriptorEncoder:
    return DescriptorEncoder()


def test_encoder_offline_normalised(encoder: DescriptorEncoder) -> None:
    v = encoder.encode(["The Eiffel Tower is located in Rome.", "Where is the Eiffel Tower?", "Bake bread."])
    assert v.shape == (3, encoder.dim) and encoder.dim == DIM and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3  # a paraphrase is much closer than an unrelated text
    assert encoder.encode([]).shape == (0, DIM)
    # batching and length sorting do not change a text's vector
    alone = encoder.encode(["Where is the Eiffel Tower?"])[0]
    np.testing.assert_allclose(alone, v[1], atol=1e-5)


def test_lean_bert_path_equals_the_sentence_transformers_pipeline(encoder: DescriptorEncoder) -> None:
    """The embedded MiniLM is served by the lean forward; it gives the pipeline's vectors, padded or not."""
    import torch

    from service.retrieval.lean_bert import lean_bert_for

    assert encoder._lean is not None  # the check at load passed
    texts = ["The CEO of Twitter is Linda Yaccarino.", "hi", "Tell me about the Eiffel Tower. Where is it?"]
    features = encoder._model.preprocess(texts)
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(encoder._model(dict(features))["sentence_embedding"], dim=-1)
    np.testing.assert_allclose(encoder.encode(texts), ref.numpy(), atol=1e-5)  # length-sorted batches
    np.testing.assert_allclose(encoder.encode(texts[:1])[0], ref[0].numpy(), atol=1e-5)  # no padding
    int8 = lean_bert_for(encoder._model, int8=True)
    assert int8 is not None
    approx = int8.embed(features["input_ids"], features["attention_mask"]).numpy()
    assert float((approx * ref.numpy()).sum(1).min()) > 0.99  # the int8 kernel's rounding stays small
    assert lean_bert_for(torch.nn.Sequential(torch.nn.Linear(2, 2))) is None  # other layouts: no lean path


def test_index_add_remove_exact_and_stable_ids() -> None:
    rng = np.random.default_rng(1)
    x = unit(rng, 200)
    ids = rng.choice(2**62, size=200, replace=False).astype(np.int64)
    ix = DescriptorIndex(DIM)
    ix.add(ids, x)
    assert len(ix) == 200 and ix.kind == "flat"
    scores, got = ix.search(x[:10], 1)
    assert (got[:, 0] == ids[:10]).all()  # the caller's ids come back, not positions
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)

    before = ix.snapshot()
    assert ix.remove(ids[:50]) == 50 and len(ix) == 150
    assert ix.remove(ids[:50]) == 0  # already gone: ignored
    _, got = ix.search(x[:50], 20)
    assert not np.isin(got, ids[:50]).any()  # a removed id is never returned
    _, got_old = before.search(x[:1], 1)  # a snapshot taken before the write is unaffected
    assert got_old[0, 0] == ids[0]

    with pytest.raises(ValueError):
        ix.add(ids[60:61], x[60:61])  # already present
    ix.add(ids[:1], x[:1])  # a removed id can come back
    assert ix.search(x[:1], 1)[1][0, 0] == ids[0]

    scores, got = DescriptorIndex(DIM).search(x[:2], 3)
    assert (got == -1).all() and np.isneginf(scores).all()
    scores, got = ix.search(x[:1], 500)  # k larger than the index: padded with -1
    assert (got[0, len(ix) :] == -1).all()


def test_index_readers_never_see_partial_writes() -> None:
    rng = np.random.default_rng(2)
    x = unit(rng, 600)
    ids = np.arange(600, dtype=np.int64)
    ix = DescriptorIndex(DIM)
    ix.add(ids[:300], x[:300])
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        try:
            while not stop.is_set():
                snap = ix.snapshot()
                _, got = snap.search(x[:5], 5)
                assert ((got >= 0) & (got < 600)).all()
        except BaseException as e:  # re-raised in the main thread below
            errors.append(e)

    t = threading.Thread(target=reader)
    t.start()
    for n in range(300, 600, 30):
        ix.add(ids[n : n + 30], x[n : n + 30])
        ix.remove(ids[n - 300 : n - 290])
    stop.set()
    t.join()
    assert not errors
    assert len(ix) == 600 - 100


def test_hnsw_switch_recall_and_tombstones() -> None:
    rng = np.random.default_rng(3)
    # uniform random unit vectors: HNSW's hardest case (real embeddings cluster, and recall is higher)
    x = unit(rng, 3000)
    ids = np.arange(3000, dtype=np.int64) * 11 + 7
    ix = DescriptorIndex(DIM, approx_threshold=500)
    ix.add(ids[:400], x[:400])
    assert ix.kind == "flat"
    ix.add(ids[400:], x[400:])
    assert ix.kind == "hnsw" and len(ix) == 3000

    queries = unit(rng, 200)
    recall = ix.recall_at_k(queries, 10)
    assert recall >= 0.95, recall

    ix.remove(ids[:100])  # below the compaction fraction: tombstones
    assert ix.kind == "hnsw" and len(ix.snapshot().tombstones) == 100 and len(ix) == 2900
    _, got = ix.search(x[:100], 10)
    assert not np.isin(got, ids[:100]).any()
    assert ix.recall_at_k(queries, 10) >= 0.95

    ix.add(ids[:5], x[:5])  # re-adding a tombstoned id forces a clean rebuild
    assert ix.search(x[:1], 1)[1][0, 0] == ids[0]
    ix.remove(ids[5:2700])  # most of it: compacted, and back to exact below the threshold
    assert ix.kind == "flat" and len(ix) == 305
    assert not ix.snapshot().tombstones


def test_store_rebuild_from_stored_embeddings_without_encoder(encoder: DescriptorEncoder) -> None:
    counting = CountingEncoder(encoder)
    store = RetrievalStore(counting)
    facts = {
        "e-000001": "The Eiffel Tower is located in Rome.",
        "e-000002": "The capital of Australia is Sydney.",
        "e-000003": "Lionel Messi plays basketball.",
        "e-000004": "Windows 95 was developed by Apple.",
    }
    logged = {e: store.add(e, d) for e, d in facts.items()}  # what the edit log would keep
    assert counting.texts == 4 and len(store) == 4
    assert all(v.shape == (DIM,) for v in logged.values())
    hits = store.search("Where is the Eiffel Tower?", 2)
    assert hits[0][0] == "e-000001" and hits[0][1] == facts["e-000001"]

    fresh_counting = CountingEncoder(encoder)
    restarted = RetrievalStore(fresh_counting)
    restarted.rebuild([(e, facts[e], logged[e]) for e in reversed(list(facts))])  # any order
    assert fresh_counting.texts == 0  # no re-encoding on restart
    probes = encoder.encode(["Where is the Eiffel Tower?", "Who made Windows 95?", "capital of Australia"])
    for p in probes:
        assert restarted.search_vector(p, 4) == store.search_vector(p, 4)

    assert store.remove("e-000001") and not store.remove("e-000001")
    assert "e-000001" not in store and len(store) == 3
    assert all(h[0] != "e-000001" for h in store.search("Where is the Eiffel Tower?", 4))

    # replacing a descriptor under the same edit id keeps one entry
    store.add("e-000002", "The capital of Australia is Melbourne.")
    assert len(store) == 3 and store.get("e-000002").descriptor.endswith("Melbourne.")


def test_store_stable_ids_and_bad_embeddings() -> None:
    store = RetrievalStore(HashEncoder())
    store.add("e-000123abc", "x")
    assert store.index.snapshot().export()[0].tolist() == [faiss_id("e-000123abc")]
    assert faiss_id("e-000123abc") == faiss_id("e-000123abc") >= 0
    with pytest.raises(ValueError):
        store.add("e-2", "y", np.ones(DIM - 1, np.float32))  # another encoder's dimension
    with pytest.raises(ValueError):
        store.add("e-2", "y", np.ones(DIM, np.float32))  # not a unit vector


def test_store_rebuild_10k_is_fast() -> None:
    rng = np.random.default_rng(4)
    vecs = unit(rng, 10_000)
    items = [(f"e-{n:09d}", f"descriptor {n}", vecs[n]) for n in range(10_000)]
    counting = CountingEncoder(HashEncoder())
    store = RetrievalStore(counting)
    t0 = time.perf_counter()
    store.rebuild(items)
    elapsed = time.perf_counter() - t0
    assert len(store) == 10_000 and counting.texts == 0
    assert elapsed < 3.0, elapsed  # ~0.1 s measured on 2 shared cores
    hits = store.search_vector(vecs[1234], 1)
    assert hits[0][0] == "e-000001234"


def test_a_search_runs_search_threads_and_leaves_the_threads_count_as_it_was(monkeypatch) -> None:
    """faiss and torch share one OpenMP runtime: a search must not change the thread count torch sees."""
    import faiss
    import torch

    from service.retrieval import index as index_mod

    set_to: list[int] = []
    real = faiss.omp_set_num_threads

    def spy(n: int) -> None:
        set_to.append(n)
        real(n)

    monkeypatch.setattr(index_mod, "SEARCH_THREADS", 1)
    monkeypatch.setattr(faiss, "omp_set_num_threads", spy)
    idx = index_mod.DescriptorIndex(4)
    idx.add(np.array([1, 2]), np.eye(4, dtype=np.float32)[:2])
    before = torch.get_num_threads()
    idx.search(np.eye(4, dtype=np.float32)[:1], 1)
    assert set_to == [1, before]
    assert torch.get_num_threads() == before


def test_a_large_flat_index_ranks_in_float16_and_returns_the_exact_top_k() -> None:
    """At RANKED_MIN_VECTORS vectors and more a flat index ranks with a float16 copy and re-scores the best
    exactly: the same ids and (float32) scores as an exact search, with a namespace selector too, and the
    copy follows removals."""
    import faiss

    from service.retrieval.index import RANKED_MIN_VECTORS

    rng = np.random.default_rng(3)
    d, n = 32, RANKED_MIN_VECTORS + 100
    vecs = rng.standard_normal((n, d)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64) * 7 + 5
    small = DescriptorIndex(d)
    small.add(ids[: RANKED_MIN_VECTORS - 1], vecs[: RANKED_MIN_VECTORS - 1])
    assert small.snapshot().ranking is None  # small indexes search exactly
    idx = DescriptorIndex(d)
    idx.add(ids, vecs)
    assert idx.snapshot().ranking is not None
    exact = faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    exact.add_with_ids(vecs, ids)
    queries = np.concatenate([vecs[[11, 2000]] + 0.05, rng.standard_normal((6, d))]).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    for k in (1, 4, 10):
        got_scores, got_ids = idx.search(queries, k)
        want_scores, want_ids = exact.search(queries, k)
        assert np.array_equal(got_ids, want_ids)
        np.testing.assert_allclose(got_scores, want_scores, atol=1e-5)
    every_other = faiss.IDSelectorBatch(ids[::2])
    got_scores, got_ids = idx.snapshot().search(queries, 4, only=every_other)
    want_scores, want_ids = exact.search(queries, 4, params=faiss.SearchParameters(sel=every_other))
    assert np.array_equal(got_ids, want_ids)
    gone = want_ids[:, 0]
    idx.remove(gone)
    _, after = idx.search(queries, 4)
    assert not set(gone.tolist()) & set(after.ravel().tolist())
    assert idx.snapshot().ranking.ntotal == n - len(set(gone.tolist()))

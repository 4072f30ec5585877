"""Scope detector: which stored edit descriptors a request is about (LTE's retrieval step).

embed the query -> top-k descriptors by cosine -> keep those scoring >= threshold.

A query is embedded in up to two views, the whole text and its last sentence, and each descriptor
keeps its best score over the views. An edit whose subject the query names ("Who runs Microsoft?" for
"The CEO of Microsoft is now Priya Deshmukh.") is scored even outside the top-k and needs only
`subject_threshold`: a question about a named subject in other words than the descriptor's scores
0.55-0.67 with MiniLM, under the plain threshold (the hook layer keys on the same subject tokens).

Requests often put context before the question ("We are moving
to Australia next year. What is its capital?"); the context dilutes the whole-text embedding and
MiniLM truncates at 256 tokens. max() over views never lowers a score, so it can only add hits.

Detections are cached beside the query embeddings: the hits of a query depend only on its text, the
published edit set the request sees (a snapshot, immutable) and the thresholds, so a repeated query under
an unchanged edit set skips the index search and the subject lookup too. The key holds the snapshot's
serial: a new edit set (or another namespace view) never finds an older one's hits.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from service.retrieval.query_encoder import DEFAULT_QUERY_CACHE_ENTRIES, QueryEncoder
from service.retrieval.store import Encoder, Entry, Mention, RetrievalStore, StoreSnapshot

__all__ = [
    "DEFAULT_NAME_THRESHOLD",
    "DEFAULT_SCOPE_THRESHOLD",
    "ScopeDetector",
    "ScopeHit",
    "best_threshold",
    "calibrate_scope_threshold",
    "named_subjects_first",
    "pair_scores",
    "query_views",
]

# Cosine threshold for all-MiniLM-L6-v2 (the embedded encoder), produced by
#   HF_HUB_OFFLINE=1 .venv/bin/python bench/scope_detection.py --calibrate
# i.e. calibrate_scope_threshold(DescriptorEncoder()) over the hand-written set in calibration.py:
# the F1-maximising cut between its in-scope and out-of-scope (descriptor, query) pair scores
# (Youden's J picks the same cut). Another encoder has another score scale: calibrate it the same
# way and pass the result as `threshold` (--scope-threshold).
DEFAULT_SCOPE_THRESHOLD = 0.6785
# For edits whose subject the query names; 0 turns the subject rule off. Chosen on the free-text
# benchmark (docs/free-text-edits.md), where it is measured against the plain threshold.
DEFAULT_SUBJECT_THRESHOLD = 0.4

# For edits whose descriptor mentions a name the query names (service/retrieval/names.py), when that name
# is not the edit's subject: a name in the object position ("Tokyo is located in South Korea.") is weaker
# evidence than the subject. Chosen on the free-text benchmark's records 60-239 and the calibration set
# (docs/free-text-edits.md); 0 turns it off.
DEFAULT_NAME_THRESHOLD = 0.55

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n+\s*")


def query_views(query: str) -> list[str]:
    """The texts embedded for one query: the whole (stripped) text, plus its last sentence if different."""
    text = query.strip()
    if not text:
        return []
    parts = [p for p in _SENTENCE_END.split(text) if p.strip()]
    last = parts[-1].strip() if parts else text
    return [text] if last == text else [text, last]


def pair_scores(encoder: Encoder, pairs: list[tuple[str, str]]) -> np.ndarray:
    """Cosine score of each (descriptor, query) pair exactly as the detector scores it (best view)."""
    if not pairs:
        return np.zeros(0, np.float32)
    descriptors = encoder.encode([d for d, _ in pairs])
    views = [query_views(q) for _, q in pairs]
    flat = encoder.encode([v for vs in views for v in vs])
    out = np.full(len(pairs), -np.inf, np.float32)
    row = 0
    for n, vs in enumerate(views):
        if vs:
            out[n] = float((flat[row : row + len(vs)] @ descriptors[n]).max())
        row += len(vs)
    return out


def best_threshold(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """The threshold (fire when score >= t) that maximises F1 of in-scope vs out-of-scope pairs.

    Candidates are the midpoints between adjacent distinct scores, so the cut sits in a gap rather
    than on a sample; ties go to the wider gap, then to the higher threshold (a spurious fire
    changes an unrelated answer, a miss only loses the edit).
    """
    pos = np.sort(np.asarray(in_scores, np.float64))
    neg = np.sort(np.asarray(out_scores, np.float64))
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError("need both in-scope and out-of-scope pairs")
    values = np.unique(np.concatenate([pos, neg]))
    if len(values) == 1:
        return float(values[0])
    best_key: tuple[float, float, float] | None = None
    best_t = float(values[0])
    for lo, hi in zip(values[:-1], values[1:], strict=True):
        t = (lo + hi) / 2
        tp = len(pos) - int(np.searchsorted(pos, t))
        fp = len(neg) - int(np.searchsorted(neg, t))
        f1 = 2 * tp / (tp + fp + len(pos)) if tp else 0.0  # 2TP / (2TP + FP + FN)
        key = (round(f1, 12), float(hi - lo), float(t))
        if best_key is None or key > best_key:
            best_key, best_t = key, float(t)
    return best_t


def calibrate_scope_threshold(
    encoder: Encoder,
    in_scope_pairs: list[tuple[str, str]] | None = None,
    out_of_scope_pairs: list[tuple[str, str]] | None = None,
) -> float:
    """Score every (descriptor, query) pair with the encoder; return the F1-maximising threshold.

    Without pairs, the hand-written set in calibration.py is used (how DEFAULT_SCOPE_THRESHOLD was made).
    """
    if in_scope_pairs is None or out_of_scope_pairs is None:
        from service.router.calibration import calibration_pairs

        default_in, default_out = calibration_pairs()
        in_scope_pairs = default_in if in_scope_pairs is None else in_scope_pairs
        out_of_scope_pairs = default_out if out_of_scope_pairs is None else out_of_scope_pairs
    return best_threshold(pair_scores(encoder, in_scope_pairs), pair_scores(encoder, out_of_scope_pairs))


@dataclass(frozen=True)
class ScopeHit:
    edit_id: str
    descriptor: str
    score: float


class ScopeDetector:
    def __init__(
        self,
        store: RetrievalStore,
        threshold: float | None = None,
        top_k: int = 4,
        subject_threshold: float | None = DEFAULT_SUBJECT_THRESHOLD,
        name_threshold: float | None = DEFAULT_NAME_THRESHOLD,
        query_cache_entries: int = DEFAULT_QUERY_CACHE_ENTRIES,
        subject_precedence: bool = True,
    ) -> None:
        # None or 0 (Settings.scope_threshold's "unset") mean the calibrated default.
        self.store = store
        self.threshold = float(threshold) if threshold else DEFAULT_SCOPE_THRESHOLD
        # None or 0: no subject rule (a subject-named edit needs the plain threshold like any other)
        self.subject_threshold = float(subject_threshold) if subject_threshold else None
        # None or 0: names the descriptor mentions (other than its subject) change nothing
        self.name_threshold = float(name_threshold) if name_threshold else None
        # A query naming an edit's subject leaves out edits about other things (named_subjects_first).
        self.subject_precedence = subject_precedence
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        self.top_k = top_k
        self.query_cache_entries = query_cache_entries
        self._queries: QueryEncoder | None = None
        # (snapshot serial, query, thresholds) -> hits; least recently used first, query_cache_entries long
        self._detections: OrderedDict[tuple, tuple[ScopeHit, ...]] = OrderedDict()
        self._detections_lock = threading.Lock()

    @property
    def queries(self) -> QueryEncoder:
        """The store's encoder behind the query cache and micro-batching (rebuilt if the store's changes)."""
        queries = self._queries
        if queries is None or queries.encoder is not self.store.encoder:
            queries = self._queries = QueryEncoder(self.store.encoder, self.query_cache_entries)
        return queries

    def embed(self, query: str) -> np.ndarray:
        """[views, dim] embeddings of the query (see query_views); [0, dim] for an empty query."""
        views = query_views(query)
        if not views:
            return np.zeros((0, self.store.dim), np.float32)
        return self.queries.encode(views)

    def needs_encoder(self, query: str, snapshot: StoreSnapshot | None = None) -> bool:
        """Whether `detect` would run the sentence encoder (a query not in the cache, edits in the store)."""
        snap = snapshot if snapshot is not None else self.store.snapshot()
        if len(snap) == 0 or not query or not query.strip():
            return False
        if self._cached_detection(self._detection_key(query, snap)) is not None:
            return False
        return not self.queries.cached(query_views(query))

    def detect(self, query: str, snapshot: StoreSnapshot | None = None) -> list[ScopeHit]:
        """In-scope descriptors for this query, best first; [] for an empty query or an empty store.
        `snapshot`: the published store to search (a request's pinned edit set); default the current."""
        snap = snapshot if snapshot is not None else self.store.snapshot()
        if len(snap) == 0 or not query or not query.strip():
            return []  # no encoder call: requests cost nothing extra while no edit is live
        key = self._detection_key(query, snap)
        hits = self._cached_detection(key)
        if hits is None:
            hits = tuple(self.detect_embedding(self.embed(query), query, snap))
            self._remember_detection(key, hits)
        return list(hits)

    def _detection_key(self, query: str, snap: StoreSnapshot) -> tuple:
        return (snap.serial, query, self.threshold, self.subject_threshold, self.name_threshold, self.top_k,
                self.subject_precedence)

    def _cached_detection(self, key: tuple) -> tuple[ScopeHit, ...] | None:
        if not self.query_cache_entries:
            return None
        with self._detections_lock:
            hits = self._detections.get(key)
            if hits is not None:
                self._detections.move_to_end(key)
            return hits

    def _remember_detection(self, key: tuple, hits: tuple[ScopeHit, ...]) -> None:
        if not self.query_cache_entries:
            return
        with self._detections_lock:
            self._detections[key] = hits
            self._detections.move_to_end(key)
            while len(self._detections) > self.query_cache_entries:
                self._detections.popitem(last=False)

    def detect_embedding(
        self, vectors: np.ndarray, query: str = "", snapshot: StoreSnapshot | None = None
    ) -> list[ScopeHit]:
        """Hits for precomputed query view embeddings ([dim] or [views, dim]); `query` (the text) enables
        the subject rule."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim == 1:
            vectors = vectors[None, :]
        if len(vectors) == 0:
            return []
        snap = snapshot if snapshot is not None else self.store.snapshot()
        best: dict[str, tuple[Entry, float]] = {}
        for hits in snap.search_entries(vectors, self.top_k):
            for entry, score in hits:
                if entry.edit_id not in best or score > best[entry.edit_id][1]:
                    best[entry.edit_id] = (entry, score)
        mentions = snap.mentions(query) if query else []
        # An edit the query names needs a lower score; it is scored even outside the top-k.
        needs: dict[str, float] = {}
        for mention in mentions:
            entry = mention.entry
            bar = self.subject_threshold if mention.subject else self.name_threshold
            if bar is None:
                continue
            needs[entry.edit_id] = min(bar, needs.get(entry.edit_id, bar))
            best[entry.edit_id] = (entry, float((vectors @ entry.embedding).max()))
        passed = [(e, s) for e, s in best.values() if s >= min(self.threshold, needs.get(e.edit_id, 1.0))]
        if self.subject_precedence:
            passed = named_subjects_first(passed, mentions)
        passed.sort(key=lambda h: -h[1])
        return [ScopeHit(e.edit_id, e.descriptor, s) for e, s in passed[: self.top_k]]


def named_subjects_first(
    passed: list[tuple[Entry, float]], mentions: list[Mention]
) -> list[tuple[Entry, float]]:
    """When the query names an edit's subject, drop the hits that are about something else.

    "BMW 326, produced by" names the subject of "BMW 326, produced by Sony."; "BMW N54 is produced by
    Nissan." (0.71) and "Renault Clio, produced by BMW." (0.68; it mentions "BMW", inside "BMW 326") pass
    the plain threshold on wording alone, and an extra descriptor with another answer for the same
    question is what most often turns a rewrite wrong at 1,000 edits (docs/evaluation.md). Only the
    longest mentions count: a mention inside a longer one of another edit ("BMW" in "BMW 326") names
    nothing. Dropped, once some edit's subject is named: an edit with no longest mention of its own that
    has a subject (the query names something else) or whose mentions all lie inside longer ones. Kept:
    edits with a longest mention, and edits without a subject that the query only resembles."""
    longest = [m for m in mentions
               if not any(m.inside(o) for o in mentions if o.entry.edit_id != m.entry.edit_id)]
    if not any(m.subject for m in longest):
        return passed
    own = {m.entry.edit_id for m in longest}
    mentioned = {m.entry.edit_id for m in mentions}
    return [
        (e, s) for e, s in passed if e.edit_id in own or not (e.subject or e.edit_id in mentioned)
    ]

"""Edit descriptors by edit id: text, embedding, and their place in the faiss index.

Edit ids are strings ("e-000123abc"); faiss wants int64. Each edit id maps to the first 63 bits of
its BLAKE2b hash, so the same edit gets the same faiss id on every restart and on every replica,
whatever order the log is replayed in (on the ~2^-63 chance of a collision the next free id is
taken). Reads are lock-free and consistent: the store publishes an immutable `StoreSnapshot`
(index snapshot + id table) with one reference assignment after each write, as the index does.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from service.retrieval.index import DescriptorIndex, IndexSnapshot
from service.retrieval.names import descriptor_names

# Every snapshot and namespace view gets its own serial: results derived from one (the scope detector's
# cached detections) are keyed by it, so they can never be served for another edit set.
_SNAPSHOT_SERIALS = itertools.count(1)

# Stored embeddings must be unit vectors from the configured encoder; a wrong norm means another encoder.
_NORM_TOLERANCE = 1e-3


class Encoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray: ...


# (edit_id, descriptor, embedding or None to encode[, subject[, namespace]]): what add/update/rebuild take
Item = (
    tuple[str, str, np.ndarray | None]
    | tuple[str, str, np.ndarray | None, str]
    | tuple[str, str, np.ndarray | None, str, str]
)
DEFAULT_NAMESPACE = "default"  # as service.hooks.table.DEFAULT_NAMESPACE (this package imports no torch)
MAX_SUBJECT_WORDS = 12
VIEW_CACHE = 256  # namespace views kept per snapshot (a few are live at once); past it the cache starts over
_NON_WORD = re.compile(r"[^\w]+")


def subject_key(text: str) -> str:
    """How a subject and a query are compared: casefolded words, punctuation dropped, no leading "the"."""
    words = _NON_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).split()
    return " ".join(words[1:] if words[:1] == ["the"] and len(words) > 1 else words)


@dataclass(frozen=True)
class Entry:
    edit_id: str
    descriptor: str
    embedding: np.ndarray  # [dim] float32, unit norm
    subject: str = ""  # the edit's subject, when it has one (triple edits, compiled descriptors)
    namespace: str = DEFAULT_NAMESPACE


@dataclass(frozen=True)
class Mention:
    """An entry's subject (`subject` True) or a name its descriptor mentions, found in a query at words
    [start, end) of subject_key(query)."""

    entry: Entry
    start: int
    end: int
    subject: bool

    def inside(self, other: Mention) -> bool:
        """True when `other` covers this span and more ("BMW" inside "BMW 326")."""
        longer = other.end - other.start > self.end - self.start
        return longer and other.start <= self.start and self.end <= other.end


@dataclass(frozen=True)
class StoreSnapshot:
    index: IndexSnapshot
    entries: Mapping[int, Entry]  # faiss id -> entry; never mutated after publication
    subjects: Mapping[str, tuple[int, ...]] = field(default_factory=dict)  # subject_key -> faiss ids
    # subject_key of every name a descriptor mentions (names.py) -> faiss ids
    names: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    # A namespace view (see `scoped`): the faiss ids of the entries a request naming `scope` may see,
    # searched with a faiss IDSelector, so the top-k is the top-k of those namespaces alone.
    scope: frozenset[str] | None = None
    allowed: frozenset[int] | None = None
    _selector: tuple[object, ...] = field(default=(), repr=False, compare=False)
    _views: dict[frozenset[str], StoreSnapshot] = field(default_factory=dict, repr=False, compare=False)
    _namespaces: list[frozenset[str]] = field(default_factory=list, repr=False, compare=False)  # made once
    serial: int = field(default_factory=_SNAPSHOT_SERIALS.__next__, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.entries) if self.allowed is None else len(self.allowed)

    @property
    def namespaces(self) -> frozenset[str]:
        """The namespaces with a descriptor here (made once per snapshot: every request asks)."""
        if not self._namespaces:
            self._namespaces.append(frozenset(e.namespace for e in self.entries.values()))
        return self._namespaces[0]

    def scoped(self, namespaces: frozenset[str] | None) -> StoreSnapshot:
        """This snapshot as a request naming `namespaces` sees it (itself when that is every entry); one
        view per namespace set and snapshot, made on first use."""
        if self.allowed is not None:
            raise ValueError("a namespace view cannot be scoped again")
        if namespaces is None or self.namespaces <= namespaces:
            return self
        view = self._views.get(namespaces)
        if view is None:
            import faiss

            allowed = frozenset(fid for fid, e in self.entries.items() if e.namespace in namespaces)
            selector = faiss.IDSelectorBatch(np.fromiter(allowed, np.int64, len(allowed)))
            view = StoreSnapshot(self.index, self.entries, self.subjects, self.names, namespaces, allowed,
                                 (selector,))
            if len(self._views) > VIEW_CACHE:
                self._views.clear()
            self._views[namespaces] = view
        return view

    def mentioned(self, query: str) -> list[Entry]:
        """Entries whose subject occurs in the query as whole words (a lookup of the query's n-grams)."""
        return self._lookup(query, self.subjects)

    def named(self, query: str) -> list[Entry]:
        """Entries whose descriptor mentions a name that occurs in the query as whole words."""
        return self._lookup(query, self.names)

    def mentions(self, query: str) -> list[Mention]:
        """Every whole-word occurrence in the query of an entry's subject or of a name its descriptor
        mentions, with the word span it covers (the scope detector ranks overlapping ones by length)."""
        return [Mention(e, s, n, True) for e, s, n in self._spans(query, self.subjects)] + [
            Mention(e, s, n, False) for e, s, n in self._spans(query, self.names)
        ]

    def _lookup(self, query: str, keys: Mapping[str, tuple[int, ...]]) -> list[Entry]:
        return [entry for entry, _, _ in self._spans(query, keys)]

    def _spans(self, query: str, keys: Mapping[str, tuple[int, ...]]) -> list[tuple[Entry, int, int]]:
        if not keys:
            return []
        words = subject_key(query).split()
        found: list[tuple[Entry, int, int]] = []
        for n in range(1, min(MAX_SUBJECT_WORDS, len(words)) + 1):
            for i in range(len(words) - n + 1):
                for fid in keys.get(" ".join(words[i : i + n]), ()):
                    if self.allowed is None or fid in self.allowed:
                        found.append((self.entries[fid], i, i + n))
        return found

    def search_vectors(self, queries: np.ndarray, k: int) -> list[list[tuple[str, str, float]]]:
        """Per query, up to k (edit_id, descriptor, score), best first."""
        return [[(e.edit_id, e.descriptor, s) for e, s in row] for row in self.search_entries(queries, k)]

    def search_entries(self, queries: np.ndarray, k: int) -> list[list[tuple[Entry, float]]]:
        """Per query, up to k (entry, score), best first."""
        if len(self) == 0:
            return [[] for _ in range(len(np.atleast_2d(queries)))]
        k_eff = max(1, min(k, len(self)))
        scores, ids = self.index.search(queries, k_eff, self._selector[0] if self._selector else None)
        out: list[list[tuple[Entry, float]]] = []
        for row_s, row_i in zip(scores, ids, strict=True):
            hits = []
            for s, i in zip(row_s.tolist(), row_i.tolist(), strict=True):
                entry = self.entries.get(i) if i >= 0 else None
                if entry is not None:
                    hits.append((entry, float(s)))
            out.append(hits)
        return out


def faiss_id(edit_id: str) -> int:
    """Stable non-negative int64 for an edit id (before collision handling)."""
    return int.from_bytes(hashlib.blake2b(edit_id.encode("utf-8"), digest_size=8).digest(), "big") >> 1


class RetrievalStore:
    def __init__(
        self,
        encoder: Encoder,
        index_factory: Callable[[int], DescriptorIndex] = DescriptorIndex,
    ) -> None:
        self.encoder = encoder
        self.dim = int(encoder.dim)
        self._index_factory = index_factory
        self._index = index_factory(self.dim)
        self._lock = threading.RLock()
        self._ids: dict[str, int] = {}  # edit id -> faiss id (writer side only)
        self._snap = _snapshot(self._index.snapshot(), {})

    # -- reads ---------------------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        return self._snap

    def __len__(self) -> int:
        return len(self._snap)

    def __contains__(self, edit_id: object) -> bool:
        return edit_id in self._ids

    @property
    def index(self) -> DescriptorIndex:
        return self._index

    def get(self, edit_id: str) -> Entry | None:
        i = self._ids.get(edit_id)
        return None if i is None else self._snap.entries.get(i)

    def items(self) -> list[tuple[str, str, np.ndarray]]:
        """(edit_id, descriptor, embedding) for every entry (subjects: `snapshot().entries`)."""
        return [(e.edit_id, e.descriptor, e.embedding) for e in self._snap.entries.values()]

    def search(self, text: str, k: int) -> list[tuple[str, str, float]]:
        snap = self._snap
        if len(snap) == 0:  # no edits: skip the encoder entirely
            return []
        return snap.search_vectors(self.encoder.encode([text]), k)[0]

    def search_vector(self, vector: np.ndarray, k: int) -> list[tuple[str, str, float]]:
        return self._snap.search_vectors(vector, k)[0]

    # -- writes --------------------------------------------------------------------------------------

    def add(
        self, edit_id: str, descriptor: str, embedding: np.ndarray | None = None, subject: str = ""
    ) -> np.ndarray:
        """Index one descriptor (replacing an earlier one with the same edit id); returns its embedding.

        With `embedding` given (replay from the edit log) the encoder is not called.
        """
        return self.add_many([(edit_id, descriptor, embedding, subject)])[0]

    def add_many(self, items: Iterable[Item]) -> np.ndarray:
        """Bulk add in one index write; missing embeddings are encoded in one batch. Returns [n, dim]."""
        return self.update(add=items)

    def update(
        self, remove: Iterable[str] = (), add: Iterable[Item] = ()
    ) -> np.ndarray:
        """Remove and add (replacing same ids) as ONE published change: a reader sees the old set or the
        new one, never a mix (a superseding edit swaps descriptors without a moment with neither or both).
        Unknown ids in `remove` are ignored. Returns the added embeddings, [n, dim]."""
        items = [_full(i) for i in add]
        ids_in = [i[0] for i in items]
        if len(set(ids_in)) != len(ids_in):
            raise ValueError("duplicate edit ids in one add")
        vecs = self._embeddings(items) if items else np.zeros((0, self.dim), np.float32)
        with self._lock:
            gone = set(remove) | set(ids_in)  # replaced ids leave first
            dropped = [self._ids.pop(e) for e in gone if e in self._ids]
            if not dropped and not items:
                return vecs
            if dropped:
                self._index.remove(np.array(dropped, np.int64))
            entries = {i: e for i, e in self._snap.entries.items() if e.edit_id not in gone}
            taken = set(entries)
            new_ids = [self._assign(e, taken) for e in ids_in]
            for (edit_id, descriptor, _, subject, ns), fid, vec in zip(items, new_ids, vecs, strict=True):
                entries[fid] = Entry(edit_id, descriptor, vec, subject, ns)
            if new_ids:
                self._index.add(np.array(new_ids, np.int64), vecs)
            self._snap = _snapshot(self._index.snapshot(), entries)
        return vecs.copy()  # the caller's copy: entries keep their own rows

    def remove(self, edit_id: str) -> bool:
        """Exact removal: the descriptor is never returned again. False when the id is not here."""
        with self._lock:
            fid = self._ids.pop(edit_id, None)
            if fid is None:
                return False
            self._index.remove(np.array([fid], np.int64))
            entries = dict(self._snap.entries)
            del entries[fid]
            self._snap = _snapshot(self._index.snapshot(), entries)
            return True

    def rebuild(self, items: Iterable[Item]) -> None:
        """Replace everything with these items in one index build (restart: embeddings from the log)."""
        items = [_full(i) for i in items]
        ids_in = [i[0] for i in items]
        if len(set(ids_in)) != len(ids_in):
            raise ValueError("duplicate edit ids in rebuild")
        vecs = self._embeddings(items)
        with self._lock:
            self._ids = {}
            entries: dict[int, Entry] = {}
            taken: set[int] = set()
            new_ids = [self._assign(e, taken) for e in ids_in]
            for (edit_id, descriptor, _, subject, ns), fid, vec in zip(items, new_ids, vecs, strict=True):
                entries[fid] = Entry(edit_id, descriptor, vec, subject, ns)
            self._index.rebuild(np.array(new_ids, np.int64), vecs)
            self._snap = _snapshot(self._index.snapshot(), entries)

    # -- internals -----------------------------------------------------------------------------------

    def _assign(self, edit_id: str, taken: set[int]) -> int:
        fid = faiss_id(edit_id)
        while fid in taken:
            fid = (fid + 1) & 0x7FFF_FFFF_FFFF_FFFF
        taken.add(fid)
        self._ids[edit_id] = fid
        return fid

    def _embeddings(self, items: list[tuple[str, str, np.ndarray | None, str, str]]) -> np.ndarray:
        out = np.empty((len(items), self.dim), np.float32)
        todo = []
        for n, (edit_id, descriptor, emb, _, _) in enumerate(items):
            if not isinstance(edit_id, str) or not edit_id or not isinstance(descriptor, str):
                raise ValueError("edit_id must be a non-empty string and descriptor a string")
            if emb is None:
                todo.append(n)
                continue
            v = np.asarray(emb, dtype=np.float32).reshape(-1)
            if v.shape[0] != self.dim:
                raise ValueError(
                    f"stored embedding of {edit_id} has dimension {v.shape[0]}, the encoder {self.dim}: "
                    "was the log written with another encoder?"
                )
            if not np.isfinite(v).all() or abs(float(np.linalg.norm(v)) - 1.0) > _NORM_TOLERANCE:
                raise ValueError(f"stored embedding of {edit_id} is not a unit vector")
            out[n] = v
        if todo:
            out[todo] = self.encoder.encode([items[n][1] for n in todo])
        return out


def _full(item: Item) -> tuple[str, str, np.ndarray | None, str, str]:
    if len(item) == 3:
        return (item[0], item[1], item[2], "", DEFAULT_NAMESPACE)
    if len(item) == 4:
        return (item[0], item[1], item[2], item[3], DEFAULT_NAMESPACE)  # type: ignore[misc]
    return item  # type: ignore[return-value]


def _snapshot(index: IndexSnapshot, entries: Mapping[int, Entry]) -> StoreSnapshot:
    subjects: dict[str, list[int]] = {}
    names: dict[str, list[int]] = {}
    for fid, entry in entries.items():
        key = subject_key(entry.subject) if entry.subject else ""
        if key and len(key.split()) <= MAX_SUBJECT_WORDS:
            subjects.setdefault(key, []).append(fid)
        for key in {subject_key(n) for n in descriptor_names(entry.descriptor)}:
            if key and len(key.split()) <= MAX_SUBJECT_WORDS:
                names.setdefault(key, []).append(fid)
    return StoreSnapshot(
        index, entries, {k: tuple(v) for k, v in subjects.items()}, {k: tuple(v) for k, v in names.items()}
    )

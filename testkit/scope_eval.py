"""Scope-detection quality on EasyEdit CounterFact records (used by bench/scope_detection.py and tests).

Every record's descriptor (prompt + " " + target_new + ".") is in the store at once. Labels:
  rephrase_prompt -> in scope of its own record; locality_prompt -> out of scope of every record.
Decision-level counts (one decision per query):
  TP: a rephrase whose own record is among the kept hits;
  FP: a locality prompt with any kept hit, or a rephrase whose kept hits are all other records;
  FN: a rephrase without its own record among the kept hits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.retrieval.store import RetrievalStore
from service.router.prompt import derive_descriptor
from service.router.scope import query_views


def default_data_dir() -> Path:
    """../shared/data next to the repository root, where the evaluation sets live (never copied in)."""
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def load_counterfact(path: Path | None = None) -> list[dict]:
    path = path or default_data_dir() / "counterfact-val.json"
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def record_id(record: dict, n: int) -> str:
    return f"cf-{record.get('case_id', n)}-{n}"


@dataclass(frozen=True)
class ScopeMetrics:
    threshold: float
    n: int
    precision: float
    recall: float
    f1: float
    hit_precision: float  # kept hits that are the right record / all kept hits
    locality_fire_rate: float  # locality prompts with any kept hit
    prompt_recall: float  # the edit prompt itself finds its record (efficacy queries)
    top1_accuracy: float  # own record ranked first for the rephrase, threshold ignored

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class ScoredQueries:
    """Top-k (ids, scores) for each query kind, computed once and re-thresholded cheaply."""

    own: list[str]
    rephrase: list[list[tuple[str, float]]]
    locality: list[list[tuple[str, float]]]
    prompt: list[list[tuple[str, float]]]


def fill_store(store: RetrievalStore, records: list[dict]) -> list[str]:
    ids = [record_id(r, n) for n, r in enumerate(records)]
    descriptors = [derive_descriptor(r["prompt"], r["target_new"]) for r in records]
    store.rebuild([(i, d, None) for i, d in zip(ids, descriptors, strict=True)])
    return ids


def score_queries(store: RetrievalStore, records: list[dict], ids: list[str], top_k: int) -> ScoredQueries:
    """Top-k per query exactly as ScopeDetector ranks them (best score over the query's views)."""
    snap = store.snapshot()

    def run(texts: list[str]) -> list[list[tuple[str, float]]]:
        views = [query_views(t) for t in texts]
        per_view = snap.search_vectors(store.encoder.encode([v for vs in views for v in vs]), top_k)
        out, row = [], 0
        for vs in views:
            best: dict[str, float] = {}
            for hits in per_view[row : row + len(vs)]:
                for e, _, s in hits:
                    best[e] = max(s, best.get(e, -np.inf))
            row += len(vs)
            out.append(sorted(best.items(), key=lambda kv: -kv[1])[:top_k])
        return out

    return ScoredQueries(
        own=ids,
        rephrase=run([r["rephrase_prompt"] for r in records]),
        locality=run([r["locality_prompt"] for r in records]),
        prompt=run([r["prompt"] for r in records]),
    )


def metrics_at(scored: ScoredQueries, threshold: float) -> ScopeMetrics:
    tp = fp = fn = kept = kept_right = loc_fired = prompt_ok = top1 = 0
    for own, reph, loc, prm in zip(scored.own, scored.rephrase, scored.locality, scored.prompt, strict=True):
        hit_ids = [e for e, s in reph if s >= threshold]
        loc_ids = [e for e, s in loc if s >= threshold]
        kept += len(hit_ids) + len(loc_ids)
        if own in hit_ids:
            tp += 1
            kept_right += 1
        else:
            fn += 1
            fp += bool(hit_ids)
        fp += bool(loc_ids)
        loc_fired += bool(loc_ids)
        prompt_ok += any(e == own and s >= threshold for e, s in prm)
        top1 += bool(reph) and reph[0][0] == own
    n = len(scored.own)
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / n if n else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return ScopeMetrics(
        threshold=threshold,
        n=n,
        precision=precision,
        recall=recall,
        f1=f1,
        hit_precision=kept_right / kept if kept else 1.0,
        locality_fire_rate=loc_fired / n if n else 0.0,
        prompt_recall=prompt_ok / n if n else 0.0,
        top1_accuracy=top1 / n if n else 0.0,
    )


def best_counterfact_threshold(scored: ScoredQueries) -> ScopeMetrics:
    """For reference only (the default comes from the hand-written set): the F1-best cut on CounterFact."""
    grid = np.round(np.arange(0.30, 0.95, 0.01), 2)
    return max((metrics_at(scored, float(t)) for t in grid), key=lambda m: m.f1)

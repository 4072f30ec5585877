"""Scope detector benchmark: calibration, CounterFact precision/recall/top-1, latency at 1k/10k descriptors.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/scope_detection.py --calibrate   # the default threshold
    HF_HUB_OFFLINE=1 .venv/bin/python bench/scope_detection.py               # quality + latency
    HF_HUB_OFFLINE=1 .venv/bin/python bench/scope_detection.py --json out.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/scope_detection.py --mention-rules  # subject / name thresholds
    HF_HUB_OFFLINE=1 .venv/bin/python bench/scope_detection.py --concurrency 1 16  # detect() under load
    HF_HUB_OFFLINE=1 .venv/bin/python bench/scope_detection.py --subject-precedence  # named-subject rule

CounterFact is read from ../shared/data (never copied into the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from service.retrieval.encoder import DescriptorEncoder  # noqa: E402
from service.retrieval.store import RetrievalStore  # noqa: E402
from service.router.calibration import FACTS, calibration_pairs  # noqa: E402
from service.router.scope import (  # noqa: E402
    DEFAULT_SCOPE_THRESHOLD,
    ScopeDetector,
    best_threshold,
    pair_scores,
    query_views,
)
from testkit.scope_eval import (  # noqa: E402
    best_counterfact_threshold,
    default_data_dir,
    fill_store,
    load_counterfact,
    metrics_at,
    score_queries,
)


def calibrate(encoder: DescriptorEncoder) -> dict:
    inside, outside = calibration_pairs()
    s_in, s_out = pair_scores(encoder, inside), pair_scores(encoder, outside)
    neighbours = pair_scores(encoder, [(f.descriptor, q) for f in FACTS for q in f.neighbours])
    t = best_threshold(s_in, s_out)
    values = np.unique(np.r_[s_in, s_out])
    mids = (values[:-1] + values[1:]) / 2
    youden = max(mids, key=lambda x: (s_in >= x).mean() - (s_out >= x).mean())
    out = {
        "facts": len(FACTS),
        "in_scope_pairs": len(inside),
        "out_of_scope_pairs": len(outside),
        "threshold_f1": round(float(t), 4),
        "threshold_youden": round(float(youden), 4),
        "in_scope_recall": float((s_in >= t).mean()),
        "neighbour_fire_rate": float((neighbours >= t).mean()),
        "out_of_scope_fire_rate": float((s_out >= t).mean()),
        "in_scope_score_p5_p50": [round(float(x), 3) for x in np.percentile(s_in, [5, 50])],
        "neighbour_score_p50_p95": [round(float(x), 3) for x in np.percentile(neighbours, [50, 95])],
    }
    print(f"calibration: {out['facts']} facts, {len(inside)} in-scope / {len(outside)} out-of-scope pairs")
    print(f"  F1-maximising threshold {out['threshold_f1']:.4f}  (Youden's J: {out['threshold_youden']:.4f})")
    print(
        f"  at it: in-scope recall {out['in_scope_recall']:.3f}, neighbour fire rate "
        f"{out['neighbour_fire_rate']:.3f}, out-of-scope fire rate {out['out_of_scope_fire_rate']:.3f}"
    )
    print(f"  DEFAULT_SCOPE_THRESHOLD in service/router/scope.py = {DEFAULT_SCOPE_THRESHOLD}")
    return out


def quality(encoder: DescriptorEncoder, records: list[dict], threshold: float, top_k: int) -> dict:
    store = RetrievalStore(encoder)
    t0 = time.perf_counter()
    ids = fill_store(store, records)
    t_fill = time.perf_counter() - t0
    scored = score_queries(store, records, ids, top_k)
    m = metrics_at(scored, threshold)
    ref = best_counterfact_threshold(scored)
    print(f"CounterFact ({m.n} records, all descriptors in the store, top_k={top_k}, t={threshold:.4f}):")
    print(f"  precision {m.precision:.3f}  recall {m.recall:.3f}  F1 {m.f1:.3f}  top-1 {m.top1_accuracy:.3f}")
    print(
        f"  hit precision {m.hit_precision:.3f}  locality fire rate {m.locality_fire_rate:.3f}  "
        f"edit-prompt recall {m.prompt_recall:.3f}   (encode+index {m.n} descriptors: {t_fill:.1f} s)"
    )
    print(
        f"  reference only, F1-best cut on CounterFact itself: t={ref.threshold:.2f} "
        f"P {ref.precision:.3f} R {ref.recall:.3f} F1 {ref.f1:.3f}"
    )
    sweep = {f"{t:.2f}": metrics_at(scored, t).as_dict() for t in (0.5, 0.55, 0.6, 0.65, 0.7, 0.75)}
    return {"default": m.as_dict(), "counterfact_best": ref.as_dict(), "sweep": sweep, "fill_s": t_fill}


def _pct(xs: list[float]) -> tuple[float, float]:
    a = np.array(xs) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 99))


def latency(
    encoder: DescriptorEncoder, records: list[dict], sizes: list[int], top_k: int, n_queries: int
) -> dict:
    rng = np.random.default_rng(0)
    real = encoder.encode([f"{r['prompt']} {r['target_new']}." for r in records[: max(sizes)]])
    queries = [r["rephrase_prompt"] for r in records][:n_queries]
    out = {}
    for size in sizes:
        pad = max(0, size - len(real))
        synth = rng.standard_normal((pad, encoder.dim)).astype(np.float32)
        synth /= np.linalg.norm(synth, axis=1, keepdims=True)
        vecs = np.concatenate([real[:size], synth])
        items = [(f"e-{n:09d}", f"descriptor {n}", v) for n, v in enumerate(vecs)]
        store = RetrievalStore(encoder)
        t0 = time.perf_counter()
        store.rebuild(items)
        t_rebuild = time.perf_counter() - t0
        det = ScopeDetector(store, top_k=top_k)
        for q in queries[:20]:  # warm-up
            det.detect(q)
        enc_t, search_t, total_t = [], [], []
        for q in queries:
            t0 = time.perf_counter()
            v = det.embed(q)
            t1 = time.perf_counter()
            det.detect_embedding(v)
            t2 = time.perf_counter()
            enc_t.append(t1 - t0)
            search_t.append(t2 - t1)
        for q in queries:
            t0 = time.perf_counter()
            det.detect(q)
            total_t.append(time.perf_counter() - t0)
        row = {
            "descriptors": len(store),
            "rebuild_s": t_rebuild,
            "encode_ms_p50_p99": _pct(enc_t),
            "search_ms_p50_p99": _pct(search_t),
            "total_ms_p50_p99": _pct(total_t),
        }
        out[str(size)] = row
        print(
            f"latency at {len(store):>6} descriptors ({len(queries)} queries): "
            f"encode p50 {row['encode_ms_p50_p99'][0]:.2f} / p99 {row['encode_ms_p50_p99'][1]:.2f} ms, "
            f"search p50 {row['search_ms_p50_p99'][0]:.3f} / p99 {row['search_ms_p50_p99'][1]:.3f} ms, "
            f"total detect() p50 {row['total_ms_p50_p99'][0]:.2f} / p99 {row['total_ms_p50_p99'][1]:.2f} ms; "
            f"rebuild from stored embeddings {t_rebuild * 1e3:.0f} ms"
        )
    return out


class _OneAtATime(ScopeDetector):
    """The detector without the query cache and micro-batching: every request runs its own encoder forward,
    one after another under the encoder's lock (the side-by-side baseline of `concurrent_latency`)."""

    def embed(self, query: str) -> np.ndarray:
        views = query_views(query)
        return self.store.encoder.encode(views) if views else np.zeros((0, self.store.dim), np.float32)


def concurrent_latency(
    encoder: DescriptorEncoder, records: list[dict], size: int, top_k: int, clients: list[int], n_queries: int
) -> dict:
    """detect() latency, the time scope detection adds before a request's prompt can be queued, with
    `clients` threads calling it at once over a store of `size` descriptors: one forward per request
    against micro-batched forwards, and the cache on a repeated prompt."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(0)
    real = encoder.encode([f"{r['prompt']} {r['target_new']}." for r in records[:size]])
    synth = rng.standard_normal((max(0, size - len(real)), encoder.dim)).astype(np.float32)
    synth /= np.linalg.norm(synth, axis=1, keepdims=True)
    store = RetrievalStore(encoder)
    store.rebuild([(f"e-{n:09d}", f"descriptor {n}", v) for n, v in enumerate(np.concatenate([real, synth]))])
    questions = [r["rephrase_prompt"] for r in records]
    out: dict = {"descriptors": len(store)}
    print(f"scope detection under concurrency: {len(store)} descriptors, {n_queries} distinct queries")
    for n_clients in clients:
        for label, detector_class in (("one forward per request", _OneAtATime),
                                      ("micro-batched", ScopeDetector)):
            det = detector_class(store, top_k=top_k, query_cache_entries=0)
            for q in questions[-20:]:  # warm-up, on queries the runs do not use
                det.detect(q)
            queries = questions[:n_queries]
            times: list[float] = []

            def one(q: str, det: ScopeDetector = det, times: list[float] = times) -> None:
                t0 = time.perf_counter()
                det.detect(q)
                times.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(n_clients) as pool:
                list(pool.map(one, queries))
            wall = time.perf_counter() - t0
            p50, p99 = _pct(times)
            rate = len(queries) / wall
            out[f"{n_clients} clients, {label}"] = {"p50_ms": p50, "p99_ms": p99, "queries_per_s": rate}
            print(f"  {n_clients:>2} clients, {label:<24}: detect() p50 {p50:6.2f} ms, p99 {p99:6.2f} ms, "
                  f"{rate:6.1f} queries/s")
    det = ScopeDetector(store, top_k=top_k)
    queries = questions[:200]
    for q in queries:
        det.detect(q)
    hits: list[float] = []
    for q in queries:
        t0 = time.perf_counter()
        det.detect(q)
        hits.append(time.perf_counter() - t0)
    p50, p99 = _pct(hits)
    out["repeated prompt (cached embedding)"] = {"p50_ms": p50, "p99_ms": p99}
    print(f"   1 client,  repeated prompt (cached)  : detect() p50 {p50:6.2f} ms, p99 {p99:6.2f} ms")
    return out


FREETEXT = Path(__file__).resolve().parent / "data" / "freetext-edits.jsonl"


def mention_rules(encoder: DescriptorEncoder, first: int, last: int) -> list[dict]:
    """The subject and name rules (router/scope.py) swept on free-text records [first, last) (the
    evaluation reports on the first 60, so the default sweep leaves them out) and on the calibration set:
    in-scope retrieval recall, out-of-scope questions that got any descriptor, calibration decisions."""
    from service.edits.compile import compile_descriptor
    from service.router.scope import query_views

    records = [json.loads(line) for line in FREETEXT.read_text().splitlines()][first:last]
    inside, outside = calibration_pairs()
    questions = sorted({q["question"] for r in records for q in r["in_scope"] + r["out_of_scope"]}
                       | {q for _, q in inside + outside})
    views = [query_views(q) for q in questions]
    flat = encoder.encode([v for vs in views for v in vs])
    embedded, row = {}, 0
    for q, vs in zip(questions, views, strict=True):
        embedded[q], row = flat[row : row + len(vs)], row + len(vs)

    def subject(descriptor: str) -> str:  # what the server derives (--compile-descriptors)
        facts = compile_descriptor(descriptor)
        return facts[0].subject if facts else ""

    free = RetrievalStore(encoder)
    free.add_many([(r["id"], r["descriptor"], None, subject(r["descriptor"])) for r in records])
    cal = RetrievalStore(encoder)
    cal.add_many([(f"c-{n}", f.descriptor, None, subject(f.descriptor)) for n, f in enumerate(FACTS)])
    owner = {f.descriptor: f"c-{n}" for n, f in enumerate(FACTS)}
    rows = []
    sweep = [(0, 0), (0.5, 0), (0.5, 0.5), (0.5, 0.55), (0.5, 0.6), (0.5, 0.65), (0.45, 0.55), (0.4, 0.55),
             (0.3, 0.55), (0.4, 0.45)]
    for subject_t, name_t in sweep:
        det = ScopeDetector(free, None, 4, subject_t, name_t)
        cdet = ScopeDetector(cal, None, 4, subject_t, name_t)
        hits = {q: det.detect_embedding(embedded[q], q) for q in embedded}
        chits = {q: cdet.detect_embedding(embedded[q], q) for q in embedded}
        recall = np.mean([any(h.edit_id == r["id"] for h in hits[q["question"]])
                          for r in records for q in r["in_scope"]])
        oos = [bool(hits[q["question"]]) for r in records for q in r["out_of_scope"]]
        row = {
            "subject_threshold": subject_t, "name_threshold": name_t,
            "freetext_in_scope_recall": round(float(recall), 3),
            "freetext_out_of_scope_with_a_hit": f"{sum(oos)}/{len(oos)}",
            "calibration_fired": round(float(np.mean([owner[d] in {h.edit_id for h in chits[q]}
                                                      for d, q in inside])), 3),
            "calibration_false_fires": round(float(np.mean([bool(chits[q]) for _, q in outside])), 3),
        }
        print(row)
        rows.append(row)
    return rows


def subject_precedence(encoder: DescriptorEncoder, data_dir: Path, n: int, freetext_n: int) -> dict:
    """The named-subject rule (service/router/scope.py named_subjects_first) on and off, with the subjects
    the server stores: CounterFact's and zsRE's first `n` records as triple edits (descriptor = the
    evaluation's; per prompt kind: own descriptor kept, the only one, two or more) and the free-text
    benchmark's first `freetext_n` descriptors with their compiled subjects (own descriptor found, other
    descriptors injected, out-of-scope questions hit)."""
    from service.edits.compile import compile_descriptor
    from service.eval.datasets import load_records

    stores: dict[str, tuple[RetrievalStore, dict[str, list[tuple[str, str]]]]] = {}
    for fmt, name in (("counterfact", "counterfact-val.json"), ("zsre", "zsre_mend_train-1k.json")):
        if not (data_dir / name).is_file():
            print(f"{data_dir / name} not found: {fmt} skipped")
            continue
        records = load_records(data_dir / name, fmt, n).records  # type: ignore[arg-type]
        store = RetrievalStore(encoder)
        store.add_many([(str(r.index), r.descriptor, None, r.subject) for r in records])
        stores[fmt] = (store, {
            "rewrite": [(str(r.index), r.prompt) for r in records],
            "paraphrase": [(str(r.index), r.paraphrases[0]) for r in records if r.paraphrases],
            "locality": [(str(r.index), r.locality[0].prompt) for r in records if r.locality],
        })
    ft_records = [json.loads(line) for line in FREETEXT.read_text().splitlines()][:freetext_n]
    ft = RetrievalStore(encoder)
    compiled = [compile_descriptor(r["descriptor"]) for r in ft_records]
    ft.add_many([(r["id"], r["descriptor"], None, c[0].subject if c else "")
                 for r, c in zip(ft_records, compiled, strict=True)])
    out: dict = {}
    for on in (False, True):
        row: dict = {}
        for fmt, (store, prompts) in stores.items():
            det = ScopeDetector(store, subject_precedence=on)
            for kind, pairs in prompts.items():
                hits = [(own, [h.edit_id for h in det.detect(q)]) for own, q in pairs]
                row[f"{fmt}_{kind}"] = {
                    "own": sum(own in h for own, h in hits), "only_own": sum(h == [own] for own, h in hits),
                    "two_or_more": sum(len(h) > 1 for _, h in hits), "any": sum(bool(h) for _, h in hits)}
        fdet = ScopeDetector(ft, subject_precedence=on)
        inside = [(r["id"], [h.edit_id for h in fdet.detect(q["question"])])
                  for r in ft_records for q in r["in_scope"]]
        outside = [bool(fdet.detect(q["question"])) for r in ft_records for q in r["out_of_scope"]]
        row["freetext"] = {
            "in_scope_own": f"{sum(i in h for i, h in inside)}/{len(inside)}",
            "in_scope_other_descriptors": sum(len([e for e in h if e != i]) for i, h in inside),
            "out_of_scope_with_a_hit": f"{sum(outside)}/{len(outside)}"}
        print(f"subject precedence {'on' if on else 'off'}:")
        for key, value in row.items():
            print(f"  {key}: {json.dumps(value)}")
        out["on" if on else "off"] = row
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibrate", action="store_true", help="only compute the default threshold")
    ap.add_argument("--data", type=Path, default=default_data_dir() / "counterfact-val.json")
    ap.add_argument("--threshold", type=float, default=DEFAULT_SCOPE_THRESHOLD)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--queries", type=int, default=500, help="queries per latency measurement")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    ap.add_argument("--mention-rules", action="store_true",
                    help="only sweep the subject and name thresholds")
    ap.add_argument("--subject-precedence", action="store_true",
                    help="only the named-subject rule on and off (CounterFact's and zsRE's first --n, "
                    "free-text's 200)")
    ap.add_argument("--n", type=int, default=1000, help="CounterFact / zsRE records for --subject-precedence")
    ap.add_argument("--records", type=int, nargs=2, default=[60, 240], metavar=("FIRST", "END"))
    ap.add_argument("--concurrency", type=int, nargs="+", metavar="CLIENTS",
                    help="only scope-detection latency with this many concurrent callers (e.g. 1 16), "
                    "at the largest --sizes")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    encoder = DescriptorEncoder(device=args.device)
    print(f"encoder loaded in {time.perf_counter() - t0:.1f} s (dim {encoder.dim}, {encoder.device})")
    if args.concurrency:
        records = load_counterfact(args.data)
        report = {"concurrency": concurrent_latency(encoder, records, max(args.sizes), args.top_k,
                                                    args.concurrency, args.queries)}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    if args.subject_precedence:
        report: dict = {"subject_precedence": subject_precedence(encoder, args.data.parent, args.n, 200)}
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return 0
    if args.mention_rules:
        report = {"mention_rules": mention_rules(encoder, *args.records)}
    else:
        report = {"calibration": calibrate(encoder)}
    if not args.calibrate and not args.mention_rules:
        if not args.data.is_file():
            print(f"{args.data} not found: CounterFact figures skipped")
        else:
            records = load_counterfact(args.data)
            report["counterfact"] = quality(encoder, records, args.threshold, args.top_k)
            report["latency"] = latency(encoder, records, args.sizes, args.top_k, args.queries)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

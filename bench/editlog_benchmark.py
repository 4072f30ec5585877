"""Edit-log benchmark: durable append latency, and replay (read + registry) of 1,000 entries.

    .venv/bin/python bench/editlog_benchmark.py [--entries 1000] [--appends 50] [--postgres URL]

Per backend (SQLite in a temporary folder always; PostgreSQL at `--postgres`, else
EDITSERVE_TEST_PG_URL, else the tests' default URL, when reachable), side by side in one run:

- append latency of descriptor-only and hook (two layers of key + value) entries, each committed
  durably before `append` returns: median, p90 and max over `--appends` appends;
- `--entries` appends in a row (hook entries), then `read_all` and `EditRegistry.apply` over all of
  them: what a restart pays before the hook tables and the descriptor index are rebuilt.

Targets (issue 2): a descriptor edit durable within 100 ms; replay of 1,000 entries well under 1 s.
These used to be bounds in unit tests; speed lives here so a busy CI machine cannot fail a behaviour test.
Entries are fabricated with realistic SmolLM2/MiniLM shapes (`testkit.editlog`); no model loads.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.editlog import EditLog, EditRegistry  # noqa: E402
from service.errors import Unavailable  # noqa: E402
from testkit.editlog import edit_entry, make_edit  # noqa: E402

DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"  # the tests' default


def _ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p90 = xs[min(len(xs) - 1, int(0.9 * len(xs)))]
    med = statistics.median(xs)
    return f"median {med * 1e3:7.2f} ms  p90 {p90 * 1e3:7.2f} ms  max {xs[-1] * 1e3:7.2f} ms"


def _append_latency(log: EditLog, kind: str, n: int, tag: str) -> list[float]:
    times = []
    for i in range(n):
        entry = edit_entry(make_edit(f"{tag}-{kind}-{i}", seed=i, kind=kind))
        t0 = time.perf_counter()
        log.append(entry)
        times.append(time.perf_counter() - t0)
    return times


def run_backend(name: str, open_log: Callable[[], EditLog], entries: int, appends: int) -> None:
    tag = uuid.uuid4().hex[:8]  # distinct edit ids when a PostgreSQL schema is reused
    with open_log() as log:
        descriptor = _append_latency(log, "descriptor", appends, tag)
        triple = _append_latency(log, "triple", appends, tag)
        t0 = time.perf_counter()
        for i in range(entries):
            log.append(edit_entry(make_edit(f"{tag}-bulk-{i}", seed=i)))
        bulk_s = time.perf_counter() - t0
    with open_log() as log:  # a restart: a new connection, nothing cached
        t0 = time.perf_counter()
        logged = list(log.read_all())
        read_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        registry = EditRegistry()
        for entry in logged:
            registry.apply(entry)
        apply_s = time.perf_counter() - t0
    print(f"{name}:")
    print(f"  append, descriptor-only entry: {_ms(descriptor)}")
    print(f"  append, hook entry (2 layers): {_ms(triple)}")
    print(f"  {entries} hook appends in a row: {bulk_s:.2f} s ({bulk_s / entries * 1e3:.2f} ms each)")
    print(
        f"  replay of {len(logged)} entries: read_all {read_s * 1e3:.0f} ms + registry apply "
        f"{apply_s * 1e3:.0f} ms = {(read_s + apply_s) * 1e3:.0f} ms ({registry.counts().active} active)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--appends", type=int, default=50)
    ap.add_argument("--postgres", default=os.environ.get("EDITSERVE_TEST_PG_URL", DEFAULT_PG_URL))
    ap.add_argument("--no-postgres", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run_backend("SQLite", lambda: EditLog.open(None, Path(tmp)), args.entries, args.appends)
    if args.no_postgres:
        print("PostgreSQL: skipped (--no-postgres)")
        return
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    try:
        run_backend(
            f"PostgreSQL ({args.postgres}, schema {schema})",
            lambda: EditLog.open(args.postgres, Path(tempfile.gettempdir()), schema=schema),
            args.entries,
            args.appends,
        )
    except Unavailable as exc:
        print(f"PostgreSQL: skipped, no server at {args.postgres} ({exc})")
        return
    engine = sa.create_engine(args.postgres)
    with engine.begin() as conn:  # the benchmark's schema is scratch
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
    engine.dispose()


if __name__ == "__main__":
    main()

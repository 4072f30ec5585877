r"""A burst at an idle engine, over gRPC: TTFT with the first prefill held while the burst arrives, or not.

When many requests arrive together at an idle engine, the first one routed wakes it. Without a hold it is
prefilled alone, and the others, arriving and routed meanwhile, wait for that forward before theirs.
With `--admission-wait-ms` / `--admission-gap-ms` (service/engine/scheduler.py `_hold_for_arrivals`) the
engine holds its first prefill while requests are still being routed and until no new one arrived for
the gap, up to the wait, and the burst shares one prefill forward. A lone request at an idle engine
waits the gap. A setting ending in `:nospec` runs with `--no-speculative-prefill` (service/dataplane.py
`_route_speculatively`: a request whose query the sentence encoder must embed is queued with its plain
prompt while it is routed), which matters with `--query-cache-off`.

    HF_HUB_OFFLINE=1 EDITSERVE_TORCH_THREADS=1 .venv/bin/python bench/burst_admission.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/burst_admission.py --holds 0:0,20:2,20:5 --rounds 6
    HF_HUB_OFFLINE=1 .venv/bin/python bench/burst_admission.py --edits 10000 --query-cache-off \
        --holds 0:0:nospec,100:2:nospec,100:2

The embedded model in this process behind the real gRPC server (bench/serve_throughput.py `Service`: prefix
cache off; with `--edits`, that many synthetic edits, none in scope, so every request runs scope detection;
with `--query-cache-off`, through the sentence encoder); the clients in a second process (serve_throughput's
client plan: each run warms up with every prompt, then its clients start together). Each setting
(`wait:gap[:nospec]`, ms) gets `--rounds` bursts of `--clients` Generates (one per client, `--new-tokens`
each) and one run of a single client sending the 16 prompts one after another; rounds rotate the order of
the settings. Printed per setting: the burst's TTFT p50 per round and their median, TTFT p99 over all its
burst requests, the prefill forwards per burst (the engine's admissions, counted by wrapping its `_admit`),
and the single client's TTFT p50.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import Service, percentile, run_plan  # noqa: E402

WARM_UP_TOKENS = 2  # serve_throughput's client plan warms up with this many new tokens per prompt


def parse_holds(text: str) -> list[tuple[float, float, bool]]:
    """wait:gap[:spec|nospec] items (the speculative prefill on unless `nospec`)."""
    holds = []
    for item in text.split(","):
        wait, gap, *spec = item.split(":")
        holds.append((float(wait), float(gap), spec != ["nospec"]))
    return holds


def label(hold: tuple[float, float, bool]) -> str:
    return f"{hold[0]:g}:{hold[1]:g}" + ("" if hold[2] else ":nospec")


async def main_async(args: argparse.Namespace) -> dict:
    from service.engine import load_model

    holds = parse_holds(args.holds)
    loaded = load_model("embedded", device="cpu", dtype="float32")
    cache = 0 if args.query_cache_off else 4096
    async with Service(loaded, args.new_tokens, args.clients, edits=args.edits,
                       query_cache_entries=cache) as service:
        engine = service.server.plane.engine
        if args.in_scope:  # one descriptor per bench prompt, worded like it: every request is in scope
            from serve_throughput import PROMPTS

            from service.types import EditInput

            for n, prompt in enumerate(PROMPTS):
                await service.server.plane.edit(EditInput(
                    descriptor=f"{prompt.strip()} (note {n}: answer briefly.)", compile_descriptor=False))
        # bench instrumentation: the engine's admissions (prefill forwards), its method called unchanged
        admissions: list[int] = []
        admit = engine._admit

        def counting_admit() -> list:
            taken = admit()
            measured = [s for s in taken if s.request.params.max_new_tokens != WARM_UP_TOKENS]
            if measured:
                admissions.append(len(measured))
            return taken

        engine._admit = counting_admit

        def use(hold: tuple[float, float, bool]) -> None:
            # the settings --admission-wait-ms, --admission-gap-ms and --speculative-prefill
            engine._admission_wait_s, engine._arrival_gap_s = hold[0] / 1000, hold[1] / 1000
            plane = service.server.plane
            plane.options = replace(plane.options, speculative_prefill=hold[2])

        bursts: dict[tuple[float, float, bool], list[dict]] = {h: [] for h in holds}
        for r in range(args.rounds):
            for i in range(len(holds)):
                hold = holds[(i + r) % len(holds)]
                use(hold)
                admissions.clear()
                plan = [{"address": service.address, "clients": args.clients}]
                [row] = await run_plan(plan, args.new_tokens)
                bursts[hold].append({"ttfts": row.ttfts, "prefills": len(admissions)})
                print(f"round {r + 1}/{args.rounds}, {label(hold)}: TTFT p50 "
                      f"{1e3 * percentile(row.ttfts, 50):.1f} ms, {len(admissions)} prefills", flush=True)
        single: dict[tuple[float, float, bool], float] = {}
        for hold in holds:
            use(hold)
            [row] = await run_plan([{"address": service.address, "clients": 1}], args.new_tokens)
            single[hold] = percentile(row.ttfts, 50)
    report: dict = {"clients": args.clients, "new_tokens": args.new_tokens, "edits": args.edits,
                    "in_scope": args.in_scope,
                    "query_cache": bool(cache), "holds": []}
    print(f"\n{'wait:gap ms':<16} {'burst TTFT p50 per round (ms)':<44} {'median':>7} {'p99':>7} "
          f"{'prefills/burst':>15} {'1 client p50':>13}")
    for hold, runs in bursts.items():
        p50s = [1e3 * percentile(b["ttfts"], 50) for b in runs]
        p99 = 1e3 * percentile([t for b in runs for t in b["ttfts"]], 99)
        prefills = statistics.mean(b["prefills"] for b in runs)
        entry = {"wait_ms": hold[0], "gap_ms": hold[1], "speculative_prefill": hold[2],
                 "burst_ttft_p50_ms": [round(x, 1) for x in p50s],
                 "burst_ttft_p50_median_ms": round(statistics.median(p50s), 1),
                 "burst_ttft_p99_ms": round(p99, 1), "prefills_per_burst": round(prefills, 2),
                 "single_client_ttft_p50_ms": round(1e3 * single[hold], 1)}
        report["holds"].append(entry)
        print(f"{label(hold):<16} {' '.join(f'{x:.0f}' for x in p50s):<44} "
              f"{entry['burst_ttft_p50_median_ms']:>7.1f} {entry['burst_ttft_p99_ms']:>7.1f} "
              f"{prefills:>15.2f} {entry['single_client_ttft_p50_ms']:>13.1f}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16, help="requests per burst (and batch slots)")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--holds", default="0:0,20:2,100:2",
                    help="comma-separated wait:gap[:nospec] in ms (--admission-wait-ms:--admission-gap-ms; "
                    "nospec: --no-speculative-prefill)")
    ap.add_argument("--edits", type=int, default=0,
                    help="synthetic edits on the server (serve_throughput's: hook entries and descriptors, "
                    "none in scope); with them every request runs scope detection")
    ap.add_argument("--query-cache-off", action="store_true",
                    help="no query cache: every request's query goes through the sentence encoder")
    ap.add_argument("--in-scope", action="store_true",
                    help="add one descriptor per prompt, worded like it: every request has one in scope")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Scope detection while queued: TTFT with more clients than batch slots, queue place reserved or not.

A Generate reserves its place in the engine's queue on arrival and is routed (scope detection: the
sentence encoder over the query, a search of the descriptors) while it waits for a batch slot
(`Engine.reserve`, service/dataplane.py), so requests are served in arrival order. This compares, side
by side in one process and one run, the same data plane with `PlaneOptions.reserve_queue_place` on (the
default) and off (route first, then queue):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/queue_overlap.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/queue_overlap.py --clients 16 --batch 4 --requests 4 --rounds 2

The embedded model, `--batch` batch slots, `--clients` concurrent streams (in this process, straight to
the data plane: no gRPC), each sending `--requests` Generates one after another, every prompt new (the
query-embedding cache is off, so every request runs the encoder), `--new-tokens` each, with `--edits`
(10,000) synthetic descriptors in the retrieval store (none in scope: the answers do not change; see
bench/serve_throughput.py `synthetic_edits`). Rounds alternate the two modes. Printed per mode: TTFT
p50 / p99 (request -> first token, nearest rank over every request of the mode) and the routing time p50
(scope detection included), and tokens/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_throughput import percentile, synthetic_edits  # noqa: E402

TOPICS = ["the history of", "a short poem about", "three facts about", "the weather in", "a recipe for",
          "the rules of", "a letter to", "the main export of"]
THINGS = ["Lisbon", "glaciers", "chess", "the moon", "bread", "volcanoes", "owls", "Kyoto", "copper",
          "tides", "jazz", "maple trees", "the Nile", "comets", "silk", "lighthouses"]


def prompt_for(client: int, request: int, round_: int) -> str:
    """A prompt no other request of the run sends (the encoder runs for each)."""
    return (f"Write {TOPICS[(client + request) % len(TOPICS)]} {THINGS[client % len(THINGS)]} "
            f"(note {round_}-{client}-{request}).")


async def run_mode(plane, clients: int, requests: int, new_tokens: int, round_: int) -> dict:
    from service.types import GenerateInput

    ttfts: list[float] = []
    tokens = 0

    async def client(c: int) -> None:
        nonlocal tokens
        for r in range(requests):
            request = GenerateInput(prompt=prompt_for(c, r, round_), max_new_tokens=new_tokens,
                                    min_new_tokens=new_tokens)
            started = time.perf_counter()
            first = None
            async for chunk in plane.generate_stream(request):
                if first is None and chunk.token_ids:
                    first = time.perf_counter() - started
                tokens += len(chunk.token_ids)
            ttfts.append(first if first is not None else time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(clients)))
    wall = time.perf_counter() - started
    return {"ttft_s": ttfts, "tokens": tokens, "wall_s": wall}


async def main_async(args: argparse.Namespace) -> dict:
    from service.compose import load_data_plane
    from service.config import Settings
    from service.editlog import LogEntry
    from service.engine import load_model

    loaded = load_model("embedded", device="cpu", dtype="float32")
    with tempfile.TemporaryDirectory(prefix="editserve-queue-") as data_dir:
        settings = Settings(port=0, metrics_port=0, data_dir=Path(data_dir), max_batch_size=args.batch,
                            prefix_cache_mb=0, query_cache_entries=0, health_poll_s=0, log_poll_s=0)
        plane = await asyncio.to_thread(load_data_plane, settings, loaded)
        await plane.start()
        manager = plane.manager
        edits = synthetic_edits(list(manager.hooks.default_layers), manager.hooks.d_ff, manager.hooks.d_model,
                                manager.store.dim, args.edits)
        for start in range(0, len(edits), 1000):
            manager.log.append(LogEntry(kind="batch", actor="bench", edits=edits[start:start + 1000]))
        await asyncio.to_thread(manager.restore)
        print(f"{len(manager.snapshot().retrieval)} descriptors; {args.clients} clients x {args.requests} "
              f"requests, {args.batch} batch slots, {args.new_tokens} new tokens", flush=True)
        # the plane's routing step, timed per request (the method itself is called unchanged)
        routed, route_s = plane._route, []

        async def timed(request, snap):
            t0 = time.perf_counter()
            try:
                return await routed(request, snap)
            finally:
                route_s.append(time.perf_counter() - t0)

        plane._route = timed
        await run_mode(plane, 2, 1, 4, -1)  # warm-up
        results: dict[str, dict] = {"reserved": {"ttft_s": [], "route_s": [], "tokens": 0, "wall_s": 0.0},
                                    "route first": {"ttft_s": [], "route_s": [], "tokens": 0, "wall_s": 0.0}}
        for round_ in range(args.rounds):
            for mode in (["reserved", "route first"] if round_ % 2 == 0 else ["route first", "reserved"]):
                plane.options = replace(plane.options, reserve_queue_place=mode == "reserved")
                route_s.clear()
                out = await run_mode(plane, args.clients, args.requests, args.new_tokens, round_)
                acc = results[mode]
                acc["ttft_s"] += out["ttft_s"]
                acc["route_s"] += list(route_s)
                acc["tokens"] += out["tokens"]
                acc["wall_s"] += out["wall_s"]
                print(f"round {round_} {mode}: TTFT p50 {1e3 * percentile(out['ttft_s'], 50):.1f} ms, "
                      f"{out['tokens'] / out['wall_s']:.1f} tok/s", flush=True)
        await plane.shutdown(grace_s=0)
    report = {}
    for mode, acc in results.items():
        report[mode] = {
            "ttft_ms_p50": round(1e3 * percentile(acc["ttft_s"], 50), 1),
            "ttft_ms_p99": round(1e3 * percentile(acc["ttft_s"], 99), 1),
            "routing_ms_p50": round(1e3 * percentile(acc["route_s"], 50), 1),
            "tokens_per_s": round(acc["tokens"] / acc["wall_s"], 1),
            "requests": len(acc["ttft_s"]),
        }
        print(f"{mode:12s} TTFT p50 {report[mode]['ttft_ms_p50']} ms, p99 {report[mode]['ttft_ms_p99']} ms; "
              f"routing p50 {report[mode]['routing_ms_p50']} ms; {report[mode]['tokens_per_s']} tok/s "
              f"({report[mode]['requests']} requests)")
    saved = report["route first"]["ttft_ms_p50"] - report["reserved"]["ttft_ms_p50"]
    print(f"TTFT p50 saved by reserving: {saved:.1f} ms")
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batch", type=int, default=4, help="batch slots (fewer than --clients: a queue forms)")
    ap.add_argument("--requests", type=int, default=4, help="Generates per client per mode and round")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--edits", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    report = asyncio.run(main_async(args))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

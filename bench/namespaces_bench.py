"""The namespace and HTTP figures of `bench/serve_throughput.py --namespaces N` (run it from there).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_throughput.py --namespaces 4 --edits-per-namespace 1000 \
        --clients 16 --new-tokens 32

Two servers in this process, each with the real data plane and an OpenAI-compatible HTTP port: one holds
N namespaces x E edits and its clients are spread over the namespaces (client i names namespace i % N:
every batch mixes them), the other holds N x E edits in one namespace that every client names. The edits
are synthetic but served exactly like real ones: committed to the edit log as batches of stored hook
entries (random keys whose thresholds no activation reaches, so every token is gated against every key
without changing the text) and descriptors with unit embeddings, then published by the edit manager.
The clients run in another process (serve_throughput.py --client-of). On the second server the same
clients also go over HTTP (streaming /v1/completions), for the HTTP-against-gRPC latency: once with the
official `openai` client and once with a bare SSE reader on a socket, which tells the server's cost from the
client's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def preload(manager: Any, namespaces: list[str], per_namespace: int, chunk: int = 500) -> None:
    """Commit `per_namespace` synthetic edits to each namespace through the log, as replicas load them."""
    from service.editlog import LogEntry, StoredEdit, StoredHook, TensorBlob
    from service.edits.compute import new_edit_id

    rng = np.random.default_rng(0)
    hooks, dim = manager.hooks, manager.store.dim
    edits = []
    for ns in namespaces:
        for n in range(per_namespace):
            emb = rng.standard_normal(dim).astype(np.float32)
            entries = [StoredHook(layer=layer,
                                  key=TensorBlob.from_numpy(rng.standard_normal(hooks.d_ff).astype(np.float32)),
                                  value=TensorBlob.from_numpy(np.zeros(hooks.d_model, np.float32)),
                                  threshold=0.999) for layer in hooks.default_layers]
            edits.append(StoredEdit(edit_id=new_edit_id(), kind="triple", subject=f"Entity {ns} {n}",
                                    prompt=f"Entity {ns} {n} is", target_new="x",
                                    descriptor=f"Entity {ns} {n} is synthetic fact number {n}.",
                                    hooks=entries, embedding=TensorBlob.from_numpy(emb / np.linalg.norm(emb)),
                                    report={"passed": True, "message": "synthetic"}, namespace=ns))
    for start in range(0, len(edits), chunk):
        with manager._commit_lock:  # bench only: the manager's own append-and-publish path
            entry = LogEntry(kind="batch", actor="bench", edits=edits[start:start + chunk])
            committed = manager.log.append(entry)
            manager._apply(committed)


async def _serve(loaded: Any, new_tokens: int, max_clients: int, data_dir: str) -> Any:
    from service.compose import build_server, load_data_plane
    from service.config import Settings

    settings = Settings(port=0, metrics_port=0, http_port=_free_port(), data_dir=Path(data_dir),
                        device=loaded.device.type, dtype=str(loaded.dtype).removeprefix("torch."),
                        max_batch_size=max(16, max_clients), max_new_tokens_limit=max(512, new_tokens),
                        max_hook_table_mb=0, health_poll_s=0, log_poll_s=0, prefix_cache_mb=0)
    server = build_server(settings, lambda: load_data_plane(settings, loaded))
    await server.start()
    await server.load_plane()
    return server


async def _clients(script: str, server: Any, new_tokens: int, clients: list[int], namespaces: list[str],
                   http: str) -> list[dict[str, Any]]:
    """`http`: "" (gRPC), "openai" (the official client) or "raw" (a bare SSE reader)."""
    args = [sys.executable, script, "--client-of", server.address, "--new-tokens", str(new_tokens),
            "--clients", ",".join(map(str, clients)), "--client-namespaces", ",".join(namespaces)]
    if http:
        prefix = "raw+" if http == "raw" else ""
        args += ["--client-http", f"{prefix}http://127.0.0.1:{server.http_port}/v1"]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the client process failed with exit code {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def measure_namespaces(loaded: Any, args: Any, clients: list[int], script: str) -> None:
    """Both servers run at once and their client runs alternate (spread, one, one over HTTP twice), so
    each round's runs share whatever else the host is doing; ratios are taken within a round."""
    import statistics

    n, per = args.namespaces, args.edits_per_namespace
    spread = [f"tenant-{i}" for i in range(n)]
    setups = [(f"{n} namespaces x {per} edits, clients spread over them", spread, per, ("",)),
              (f"1 namespace x {n * per} edits", ["tenant-all"], n * per, ("", "openai", "raw"))]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="editserve-bench-ns-") as root:
        servers = []
        try:
            for k, (label, spaces, per_space, _) in enumerate(setups):
                server = await _serve(loaded, args.new_tokens, max(clients), f"{root}/{k}")
                servers.append(server)
                started = time.perf_counter()
                await asyncio.to_thread(preload, server.plane.manager, spaces, per_space)
                print(f"{label}: {len(spaces) * per_space} edits committed in "
                      f"{time.perf_counter() - started:.1f} s", flush=True)
            for round_ in range(args.repeats):
                for server, (label, spaces, _, modes) in zip(servers, setups, strict=True):
                    for http in modes:
                        for row in await _clients(script, server, args.new_tokens, clients, spaces, http):
                            row["setup"], row["round"], row["over"] = label, round_, http or "grpc"
                            rows.append(row)
        finally:
            for server in servers:
                await server.stop(0)
    print()
    print(f"{'round':>5} {'setup':<52} {'over':<7} {'tok/s':>7} {'mean s/req':>10} {'TTFT s':>7}")
    for r in rows:
        per_req = r["seconds"] / max(1, r["requests"]) * min(r["requests"], r.get("streams") or 1)
        print(f"{r['round']:>5} {r['setup']:<52} {r['over']:<7} {r['tokens'] / r['seconds']:>7.1f} "
              f"{per_req:>10.2f} {r['mean_ttft_s']:>7.2f}")

    def rate(round_: int, setup: int, over: str) -> float:
        r = next(r for r in rows if r["round"] == round_ and r["setup"] == setups[setup][0]
                 and r["over"] == over and r["streams"] == max(clients))
        return r["tokens"] / r["seconds"]

    rounds = range(args.repeats)
    spread_vs_one = [rate(k, 0, "grpc") / rate(k, 1, "grpc") for k in rounds]
    http_openai = [rate(k, 1, "grpc") / rate(k, 1, "openai") for k in rounds]
    http_raw = [rate(k, 1, "grpc") / rate(k, 1, "raw") for k in rounds]
    print(f"\nper round, at {max(clients)} clients: spread / one namespace throughput "
          f"{', '.join(f'{x:.2f}' for x in spread_vs_one)} (median {statistics.median(spread_vs_one):.2f}x); "
          f"HTTP time / gRPC time with the openai client {', '.join(f'{x:.2f}' for x in http_openai)} "
          f"(median {statistics.median(http_openai):.2f}x), with a bare SSE reader "
          f"{', '.join(f'{x:.2f}' for x in http_raw)} (median {statistics.median(http_raw):.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))

"""Bounded soak: mixed traffic from many clients against a real server process, resources sampled.

    .venv/bin/python bench/soak.py                          # 10 minutes, 32 clients, the embedded model
    .venv/bin/python bench/soak.py --minutes 2 --clients 8 --model DIR --json soak.json

The server runs as its own process (`python -m service serve`), so its resident memory and open file
descriptors are read from /proc without the clients in them. The clients mix Generate, GenerateStream,
Score, descriptor edits, hook edits (forced, so the quality gate never rejects them), rollbacks of their
own edits (each client keeps at most 2 live, so the edit set reaches a steady size and memory that
still grows is a leak), ListEdits and GetServerInfo. Every `--sample-s` seconds: RSS, open fds, threads,
and from the Prometheus endpoint the prefix-cache bytes, hook-table bytes and active edits.

Printed at the end: requests by RPC and status code, edits acknowledged and rolled back, and each
resource at the start (after two minutes' warm-up), at the end, its maximum, and its growth over
the second half (a least-squares slope, per minute). Resources are "bounded" when the slope of RSS over
the second half is under --max-rss-slope-mb MiB/min, fds end within 16 of their start, and the prefix
cache stays under its cap; the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import grpc  # noqa: E402
from grpc import aio  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from service._proto.editserve.v1 import editserve_pb2 as pb  # noqa: E402
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc  # noqa: E402

TOKEN = "soak-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
PROMPTS = [
    "The capital of France is",
    "Water is made of hydrogen and",
    "What is the mascot of the Zorbian Space Agency?",
    "The Eiffel Tower is located in the city of",
    "My favourite food is",
    "Who wrote the novel Moby Dick?",
]
# (kind, weight): the traffic mix
MAX_LIVE_EDITS_PER_CLIENT = 2
MIX = [("generate", 30), ("stream", 30), ("score", 15), ("descriptor_edit", 8), ("hook_edit", 3),
       ("rollback", 6), ("list", 4), ("info", 4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


def metric_values(port: int, names: tuple[str, ...]) -> dict[str, float]:
    """Sums of the named gauges over their label sets, read from the Prometheus endpoint."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def slope_per_minute(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value) pairs, per minute."""
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mx = sum(t for t, _ in samples) / n
    my = sum(v for _, v in samples) / n
    var = sum((t - mx) ** 2 for t, _ in samples)
    return 60 * sum((t - mx) * (v - my) for t, v in samples) / var if var else 0.0


class Tally:
    def __init__(self) -> None:
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.acked: set[str] = set()
        self.rolled_back: set[str] = set()

    def count(self, rpc: str, code: grpc.StatusCode | None) -> None:
        self.codes[(rpc, "OK" if code is None else code.name)] += 1


async def client(n: int, address: str, end: float, tally: Tally, new_tokens: int) -> None:
    rng = random.Random(n)
    kinds, weights = zip(*MIX, strict=True)
    mine: list[str] = []
    async with aio.insecure_channel(address) as channel:
        gen, edits = pb_grpc.GenerateServiceStub(channel), pb_grpc.EditServiceStub(channel)
        info = pb_grpc.InfoServiceStub(channel)
        k = 0
        while time.monotonic() < end:
            k += 1
            kind = rng.choices(kinds, weights)[0]
            if kind.endswith("_edit") and len(mine) >= MAX_LIVE_EDITS_PER_CLIENT:
                kind = "rollback"  # a steady state: memory that grows then is a leak, not a bigger edit set
            prompt = rng.choice(PROMPTS)
            req = pb.GenerateRequest(prompt=prompt, max_new_tokens=new_tokens, temperature=0.0)
            try:
                if kind == "generate":
                    await gen.Generate(req, timeout=300)
                elif kind == "stream":
                    async for _ in gen.GenerateStream(req, timeout=300):
                        pass
                elif kind == "score":
                    await gen.Score(pb.ScoreRequest(prompt=prompt, continuation=" Paris"), timeout=300)
                elif kind == "descriptor_edit":
                    res = await edits.Edit(pb.EditRequest(
                        descriptor=f"The mascot of the Zorbian Space Agency {n}-{k} is a llama named Q{k}.",
                        compile_descriptor=False, actor=f"soak-{n}"), metadata=AUTH, timeout=300)
                    mine.append(res.edit_id)
                    tally.acked.add(res.edit_id)
                elif kind == "hook_edit":
                    subject = f"Qelvan Drift {n}-{k}"
                    res = await edits.Edit(pb.EditRequest(
                        subject=subject, prompt=f"{subject} is located in", target_new=" Rome", force=True,
                        actor=f"soak-{n}"), metadata=AUTH, timeout=300)
                    mine.append(res.edit_id)
                    tally.acked.add(res.edit_id)
                elif kind == "rollback":
                    if not mine:
                        continue
                    edit_id = mine.pop(rng.randrange(len(mine)))
                    await edits.Rollback(pb.RollbackRequest(edit_id=edit_id, reason="soak"), metadata=AUTH,
                                         timeout=300)
                    tally.rolled_back.add(edit_id)
                elif kind == "list":
                    await edits.ListEdits(pb.ListEditsRequest(page_size=50), metadata=AUTH, timeout=60)
                else:
                    await info.GetServerInfo(pb.GetServerInfoRequest(), timeout=60)
                tally.count(kind, None)
            except aio.AioRpcError as exc:
                tally.count(kind, exc.code())


async def wait_serving(address: str, proc: subprocess.Popen, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    async with aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                res = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                if res.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except aio.AioRpcError:
                pass
            await asyncio.sleep(1)
    raise TimeoutError("the server did not become SERVING")


async def soak(args: argparse.Namespace) -> int:
    port, metrics_port = free_port(), free_port()
    data_dir = tempfile.mkdtemp(prefix="editserve-soak-")
    env = {**os.environ, "EDITSERVE_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "service", "serve", "--port", str(port), "--metrics-port", str(metrics_port),
           "--data-dir", data_dir, "--model", args.model, "--device", "cpu", "--log-level", "WARNING",
           *shlex.split(args.server_args)]
    log = open(Path(data_dir) / "server.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    address = f"127.0.0.1:{port}"
    names = ("editserve_prefix_cache_bytes", "editserve_hook_table_bytes", "editserve_edits_active")
    samples: list[dict[str, float]] = []
    try:
        await wait_serving(address, proc)
        print(f"server pid {proc.pid} SERVING at {address}; {args.clients} clients for {args.minutes} min",
              flush=True)
        tally = Tally()
        t0 = time.monotonic()
        end = t0 + 60 * args.minutes
        tasks = [asyncio.create_task(client(n, address, end, tally, args.new_tokens))
                 for n in range(args.clients)]
        while time.monotonic() < end:
            await asyncio.sleep(min(args.sample_s, max(0.0, end - time.monotonic())))
            m = await asyncio.to_thread(metric_values, metrics_port, names)
            row = {"t_s": time.monotonic() - t0, "rss_mib": rss_mib(proc.pid),
                   "fds": len(os.listdir(f"/proc/{proc.pid}/fd")), "threads": threads(proc.pid),
                   "prefix_cache_mib": m[names[0]] / 2**20, "hook_table_mib": m[names[1]] / 2**20,
                   "edits_active": m[names[2]], "requests": sum(tally.codes.values())}
            samples.append(row)
            print(f"  {row['t_s']:6.0f} s  RSS {row['rss_mib']:7.1f} MiB  fds {row['fds']:4d}  "
                  f"threads {row['threads']:3d}  prefix cache {row['prefix_cache_mib']:6.1f} MiB  "
                  f"hook table {row['hook_table_mib']:5.2f} MiB  active edits {row['edits_active']:4.0f}  "
                  f"requests {row['requests']}", flush=True)
        await asyncio.gather(*tasks)
        if proc.poll() is not None:
            print(f"the server died during the soak (exit {proc.returncode})")
            return 1
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return report(args, samples, tally)


def report(args: argparse.Namespace, samples: list[dict[str, float]], tally: Tally) -> int:
    warm = [s for s in samples if s["t_s"] >= 120] or samples
    half = [s for s in samples if s["t_s"] >= samples[-1]["t_s"] / 2]
    print("\nrequests by RPC and status code:")
    for (rpc, code), n in sorted(tally.codes.items()):
        print(f"  {rpc:<16} {code:<20} {n}")
    print(f"edits acknowledged {len(tally.acked)}, rolled back {len(tally.rolled_back)}")
    figures: dict[str, object] = {"requests": {f"{r} {c}": n for (r, c), n in tally.codes.items()},
                                  "edits_acknowledged": len(tally.acked),
                                  "edits_rolled_back": len(tally.rolled_back)}
    print("\nresource       start      end      max   slope/min over the second half")
    for key in ("rss_mib", "fds", "threads", "prefix_cache_mib", "hook_table_mib"):
        start, last = warm[0][key], samples[-1][key]
        peak = max(s[key] for s in samples)
        slope = slope_per_minute([(s["t_s"], s[key]) for s in half])
        figures[key] = {"start": start, "end": last, "max": peak, "slope_per_min_second_half": slope}
        print(f"  {key:<16} {start:8.1f} {last:8.1f} {peak:8.1f} {slope:+10.2f}")
    internal = sum(n for (_, c), n in tally.codes.items() if c in ("INTERNAL", "UNKNOWN"))
    rss = figures["rss_mib"]
    fds = figures["fds"]
    bounded = (
        rss["slope_per_min_second_half"] < args.max_rss_slope_mb  # type: ignore[index]
        and fds["end"] <= fds["start"] + 16  # type: ignore[index]
        and figures["prefix_cache_mib"]["max"] <= args.prefix_cache_cap_mb  # type: ignore[index]
        and internal == 0
    )
    figures["bounded"] = bounded
    print(f"\nINTERNAL/UNKNOWN answers: {internal}; resources bounded: {'yes' if bounded else 'NO'}")
    if args.json:
        args.json.write_text(json.dumps({"samples": samples, "figures": figures}, indent=2))
    return 0 if bounded else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--model", default="embedded", help="'embedded' (SmolLM2) or a Hugging Face model folder")
    ap.add_argument("--sample-s", type=float, default=30.0)
    ap.add_argument("--max-rss-slope-mb", type=float, default=5.0,
                    help="RSS growth per minute over the second half still called bounded (MiB)")
    ap.add_argument("--prefix-cache-cap-mb", type=float, default=512.0, help="the server's --prefix-cache-mb")
    ap.add_argument("--server-args", default="",
                    help='more `editserve serve` flags, e.g. "--prefix-cache-mb 0"')
    ap.add_argument("--json", type=Path)
    return asyncio.run(soak(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())

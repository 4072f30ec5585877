"""Generation throughput: the service over gRPC with 1, 4 and 16 concurrent clients, beside plain transformers
`generate` (one prompt at a time, and one static left-padded batch of 16) on the same model in the same run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_throughput.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_throughput.py --repeats 2 --threads 1 --json out.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_throughput.py --device cuda --dtype bfloat16 \
        --clients 1,16,64

Every mode generates greedily for the same 16 prompts, `--new-tokens` each. With more than 16 clients the
prompts are cycled to one per client for that run, and the static batch and the in-process engine take as
many rows as the largest client count (the one-at-a-time baseline stays at 16 prompts: it is a rate).
Tokens are counted up to and including a sequence's end token, in every mode alike, so tokens/s is real
output per wall second: the static batch keeps computing rows that already ended (what static batching
costs), the engine drops them.

The service runs in this process (grpc.aio server with the real data plane: router, edit manager with its
hook layers, engine) on a free port; the clients run in a second process (this script with --client-of),
grpc.aio stubs calling GenerateStream. An extra row drives the engine in-process (no gRPC, no router) to show
what the transport costs. With --repeats, the
modes run interleaved and each keeps its fastest run (other processes' load hits every mode alike).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.parse
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from service.engine import Engine, EngineRequest, SamplingParams  # noqa: E402
from service.engine.loader import LoadedModel, load_model  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, Neil Armstrong",
    "Water boils at",
    "The quick brown fox jumps over the lazy dog because it wanted to see what was on the other side of "
    "the hill, and then",
    "My favourite food is",
    "Python is a programming language that",
    "The largest planet in the solar system is",
    "Translate to French: Hello, how are you?",
    "Q: What is 2+2?\nA:",
    "The mitochondria is",
    "Shakespeare wrote",
    "A haiku about autumn:\n",
    "Explain photosynthesis to a child in two sentences.",
]


@dataclass
class Row:
    mode: str
    requests: int
    tokens: int
    seconds: float
    mean_ttft_s: float | None = None
    kind: str = ""  # hf_one_at_a_time | hf_static_batch | service | engine (for machine readers of --json)
    streams: int = 1  # concurrent clients / batch rows

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prompts_for(n: int) -> list[str]:
    """The 16 prompts, cycled to at least `n`."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(max(len(PROMPTS), n))]


def _sync(loaded: LoadedModel) -> None:
    """Wait for queued GPU work before a clock is read (CUDA kernels run asynchronously)."""
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


# ------------------------------------------------------------------------------------ plain transformers


def _real_tokens(new_ids: torch.Tensor, eos_ids: set[int]) -> int:
    """Generated tokens up to and including the first end token."""
    for i, t in enumerate(new_ids.tolist()):
        if t in eos_ids:
            return i + 1
    return len(new_ids)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    configured = loaded.model.generation_config.eos_token_id
    ids = {configured} if isinstance(configured, int) else set(configured or [])
    return ids | {loaded.tokenizer.eos_token_id}


@torch.inference_mode()
def hf_one_at_a_time(loaded: LoadedModel, new_tokens: int) -> Row:
    tok, model, eos = loaded.tokenizer, loaded.model, _eos_ids(loaded)
    tokens = 0
    started = time.perf_counter()
    for prompt in PROMPTS:
        enc = tok(prompt, return_tensors="pt").to(loaded.device)
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        tokens += _real_tokens(out[0, enc["input_ids"].shape[1] :], eos)
    return Row(
        "transformers generate, one prompt at a time",
        len(PROMPTS),
        tokens,
        time.perf_counter() - started,
        kind="hf_one_at_a_time",
    )


@torch.inference_mode()
def hf_static_batch(loaded: LoadedModel, new_tokens: int, size: int = len(PROMPTS)) -> Row:
    tok, model, eos = loaded.tokenizer, loaded.model, _eos_ids(loaded)
    prompts = prompts_for(size)
    started = time.perf_counter()
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left").to(loaded.device)
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    _sync(loaded)
    seconds = time.perf_counter() - started
    width = enc["input_ids"].shape[1]
    tokens = sum(_real_tokens(row[width:], eos) for row in out)
    return Row(
        f"transformers generate, static batch of {len(prompts)}",
        len(prompts),
        tokens,
        seconds,
        kind="hf_static_batch",
        streams=len(prompts),
    )


# ------------------------------------------------------------------------------------ the engine in-process


async def engine_in_process(loaded: LoadedModel, new_tokens: int, streams: int = len(PROMPTS)) -> Row:
    prompts = prompts_for(streams)
    engine = Engine(loaded, max_batch_size=len(prompts))
    await engine.start()
    ids = [loaded.tokenizer(p)["input_ids"] for p in prompts]

    async def one(prompt_ids: list[int]) -> tuple[int, float]:
        started = time.perf_counter()
        ttft, count = 0.0, 0
        async for ev in engine.stream(EngineRequest(prompt_ids, SamplingParams(max_new_tokens=new_tokens))):
            if not ttft:
                ttft = time.perf_counter() - started
            count = ev.completion_tokens
        return count, ttft

    try:
        await one(ids[0])  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(*[one(p) for p in ids])
        seconds = time.perf_counter() - started
    finally:
        await engine.stop(grace_s=0)
    return Row(
        f"engine in-process (no gRPC), {len(prompts)} streams",
        len(prompts),
        sum(c for c, _ in results),
        seconds,
        sum(t for _, t in results) / len(results),
        kind="engine",
        streams=len(prompts),
    )


# ------------------------------------------------------------------------------------ the service over gRPC


class Service:
    """The real server in this process: grpc.aio, data plane (router, edit manager, engine), a free port."""

    def __init__(self, loaded: LoadedModel, new_tokens: int, max_clients: int) -> None:
        self.loaded, self.new_tokens, self.max_clients = loaded, new_tokens, max_clients

    async def __aenter__(self) -> Service:
        from service.config import Settings
        from service.dataplane import DataPlane
        from service.transport.server import EditServeServer

        self._data_dir = tempfile.TemporaryDirectory(prefix="editserve-bench-")
        settings = Settings(
            port=0,
            metrics_port=0,
            data_dir=Path(self._data_dir.name),
            device=self.loaded.device.type,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            max_batch_size=max(16, self.max_clients),
            max_new_tokens_limit=max(512, self.new_tokens),
        )
        self.server = EditServeServer(settings, lambda: DataPlane.load(settings, self.loaded))
        await self.server.start()
        await self.server.load_plane()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(grace_s=0)
        self._data_dir.cleanup()

    async def measure_clients(self, clients: list[int]) -> list[Row]:
        """Run the clients in another process, as real clients are: their protobuf and asyncio work must not
        share this process's interpreter lock with the server."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client-of",
            self.server.address,
            "--new-tokens",
            str(self.new_tokens),
            "--clients",
            ",".join(map(str, clients)),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"the client process failed with exit code {proc.returncode}")
        return [Row(**r) for r in json.loads(out.decode().strip().splitlines()[-1])]


class LoadGenerator:
    """gRPC clients calling GenerateStream (or, with `http`, streaming POST /v1/completions); each client
    waits for its answer before sending the next. Client i names namespaces[i % len(namespaces)]."""

    def __init__(self, address: str, new_tokens: int, namespaces: list[str] | None = None,
                 http: str = "") -> None:
        from grpc import aio

        from service._proto.editserve.v1 import editserve_pb2 as pb
        from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

        self._pb = pb
        self.channel = aio.insecure_channel(address)
        self._stub = pb_grpc.GenerateServiceStub(self.channel)
        self.new_tokens = new_tokens
        self.namespaces = namespaces or []
        # "raw+URL": a bare SSE reader on a socket, to tell the server's HTTP cost from the openai client's
        self.raw = http.startswith("raw+")
        self.http = http.removeprefix("raw+")
        self._openai: Any = None
        if self.http and not self.raw:
            import openai  # the official client, as a backend would call the HTTP front end

            self._openai = openai.AsyncOpenAI(base_url=self.http, api_key="unused", max_retries=0,
                                              timeout=600)

    async def one(self, prompt: str, namespace: str = "") -> tuple[int, float]:
        if self.http:
            return await self._one_http(prompt, namespace)
        started = time.perf_counter()
        ttft, count = 0.0, 0
        request = self._pb.GenerateRequest(prompt=prompt, max_new_tokens=self.new_tokens, temperature=0.0,
                                           namespaces=[namespace] if namespace else [])
        async for chunk in self._stub.GenerateStream(request):
            if not ttft:
                ttft = time.perf_counter() - started
            count = chunk.completion_tokens or count
        return count, ttft

    async def _one_raw(self, prompt: str, namespace: str) -> tuple[int, float]:
        started = time.perf_counter()
        ttft, count = 0.0, 0
        headers = {"X-Editserve-Namespaces": namespace} if namespace else {}
        body = json.dumps({
            "model": "editserve", "prompt": prompt, "max_tokens": self.new_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True},
        }).encode()
        url = urllib.parse.urlsplit(self.http)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST {url.path}/completions HTTP/1.1\r\nHost: {url.netloc}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{head}"
                     "Connection: close\r\n\r\n".encode() + body)
        await writer.drain()
        try:
            while line := await reader.readline():  # each SSE event arrives as one chunk of the reply
                if not line.startswith(b"data: {"):
                    continue
                if not ttft:
                    ttft = time.perf_counter() - started
                if b'"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    count = usage["completion_tokens"] if usage else count
        finally:
            writer.close()
        return count, ttft

    async def _one_http(self, prompt: str, namespace: str) -> tuple[int, float]:
        if self.raw:
            return await self._one_raw(prompt, namespace)
        started = time.perf_counter()
        ttft, count = 0.0, 0
        headers = {"X-Editserve-Namespaces": namespace} if namespace else {}
        stream = await self._openai.completions.create(
            model="editserve", prompt=prompt, max_tokens=self.new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_headers=headers,
        )
        async for chunk in stream:
            if chunk.choices and not ttft:
                ttft = time.perf_counter() - started
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return count, ttft

    async def close(self) -> None:
        await self.channel.close()
        if self._openai is not None:
            await self._openai.close()

    async def clients(self, n: int) -> Row:
        async def client(prompts: list[str], namespace: str) -> list[tuple[int, float]]:
            return [await self.one(p, namespace) for p in prompts]

        shares = [prompts_for(n)[i::n] for i in range(n)]  # the prompts (cycled to n), split over n clients
        spaces = [self.namespaces[i % len(self.namespaces)] if self.namespaces else "" for i in range(n)]
        started = time.perf_counter()
        runs = await asyncio.gather(*[client(s, ns) for s, ns in zip(shares, spaces, strict=True)])
        results = [r for rs in runs for r in rs]
        seconds = time.perf_counter() - started
        over = ("HTTP (raw SSE)" if self.raw else "HTTP (openai client)") if self.http else "gRPC"
        where = f", namespaces {','.join(sorted(set(spaces)))}" if self.namespaces else ""
        return Row(
            f"service over {over}, {n} concurrent client{'s' if n > 1 else ''}{where}",
            len(results),
            sum(c for c, _ in results),
            seconds,
            sum(t for _, t in results) / len(results),
            kind="service",
            streams=n,
        )


async def client_process(
    address: str, new_tokens: int, clients: list[int], namespaces: list[str] | None = None, http: str = ""
) -> None:
    """The --client-of mode: measure every client count against a running server, print the rows as JSON."""
    load = LoadGenerator(address, new_tokens, namespaces, http)
    try:
        await load.one(PROMPTS[0])  # warm-up: connection, first-call paths
        rows = [await load.clients(n) for n in clients]
    finally:
        await load.close()
    print(json.dumps([asdict(r) for r in rows]))


# ------------------------------------------------------------------------------------ report


def print_table(rows: list[Row], one_at_a_time: Row, static: Row) -> None:
    print()
    print(
        f"{'mode':<52} {'req':>4} {'tokens':>6} {'seconds':>8} {'tok/s':>7} {'TTFT s':>7} "
        f"{'x 1-at-a-time':>13} {'x static-' + str(static.requests):>11}"
    )
    for r in rows:
        ttft = f"{r.mean_ttft_s:7.2f}" if r.mean_ttft_s is not None else f"{'':>7}"
        vs_one, vs_static = r.tokens_per_s / one_at_a_time.tokens_per_s, r.tokens_per_s / static.tokens_per_s
        print(
            f"{r.mode:<52} {r.requests:>4} {r.tokens:>6} {r.seconds:>8.2f} {r.tokens_per_s:>7.1f} {ttft} "
            f"{vs_one:>13.2f} {vs_static:>11.2f}"
        )


async def measure(loaded: LoadedModel, new_tokens: int, clients: list[int], repeats: int) -> list[Row]:
    """Every mode `repeats` times, interleaved (so load from other processes hits all modes alike); the
    fastest run of each mode is kept."""
    best: dict[str, Row] = {}

    def keep(row: Row) -> None:
        if row.mode not in best or row.seconds < best[row.mode].seconds:
            best[row.mode] = row

    widest = max([len(PROMPTS), *clients])
    hf_static_batch(loaded, 4, widest)  # warm-up
    async with Service(loaded, new_tokens, max(clients)) as service:
        # The service's edit manager wrapped its hook layer's MLP; with no edits published the wrapper calls
        # the original module directly, so the transformers baselines below run the same computation.
        for _ in range(repeats):
            keep(hf_one_at_a_time(loaded, new_tokens))
            keep(hf_static_batch(loaded, new_tokens, widest))
            for row in await service.measure_clients(clients):
                keep(row)
            keep(await engine_in_process(loaded, new_tokens, widest))
    return list(best.values())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrent client counts")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode; the fastest is reported")
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("EDITSERVE_TORCH_THREADS") or 0),
        help="torch intra-op threads (default: $EDITSERVE_TORCH_THREADS, else 0: torch's default)",
    )
    parser.add_argument(
        "--model", default="embedded", help="'embedded' (SmolLM2) or a Hugging Face model folder"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument(
        "--dtype", default="float32", help="float32, bfloat16, float16 or auto (default float32)"
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument(
        "--namespaces", type=int, default=0, metavar="N",
        help="instead of the modes above: N namespaces x --edits-per-namespace edits, clients spread over "
        "them, against one namespace holding all the edits; and HTTP against gRPC",
    )
    parser.add_argument("--edits-per-namespace", type=int, default=1000)
    parser.add_argument("--client-of", metavar="ADDRESS", help=argparse.SUPPRESS)  # the client process
    parser.add_argument("--client-namespaces", default="", help=argparse.SUPPRESS)
    parser.add_argument("--client-http", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c]
    if args.client_of:
        spaces = [n for n in args.client_namespaces.split(",") if n]
        asyncio.run(client_process(args.client_of, args.new_tokens, clients, spaces, args.client_http))
        return
    if args.threads:
        # On a CPU shared with other busy processes, one thread per op avoids stalls at OpenMP barriers.
        torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device, dtype=args.dtype)
    print(
        f"model {loaded.name} on {loaded.device} ({loaded.dtype}), torch threads {torch.get_num_threads()}, "
        f"{len(PROMPTS)} prompts x {args.new_tokens} new tokens, greedy, best of {args.repeats}"
    )
    if args.namespaces:
        from namespaces_bench import measure_namespaces  # bench/: beside this script

        asyncio.run(measure_namespaces(loaded, args, clients, __file__))
        return
    rows = asyncio.run(measure(loaded, args.new_tokens, clients, args.repeats))
    one_at_a_time, static = rows[0], rows[1]
    print_table(rows, one_at_a_time, static)
    if args.json:
        args.json.write_text(
            json.dumps([asdict(r) | {"tokens_per_s": r.tokens_per_s} for r in rows], indent=2)
        )


if __name__ == "__main__":
    main()

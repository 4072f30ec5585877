"""Generation throughput and latency: the service over gRPC with 1, 16 and 64 concurrent streaming clients,
beside plain transformers `generate` (one prompt at a time, and one static left-padded batch of 16) on the
same model, against the arithmetic limit of the same machine, all in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_throughput.py
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_throughput.py --repeats 2 --threads 1 --json out.json
    HF_HUB_OFFLINE=1 .venv/bin/python bench/serve_throughput.py --device cuda --dtype bfloat16

Every mode generates greedily for the same 16 prompts, `--new-tokens` (64) each. With more than 16 clients
the prompts are cycled to one per client for that run; the one-at-a-time baseline and the static batch stay
at 16 prompts. Tokens are counted up to and including a sequence's end token, in every mode alike, so
tokens/s is real output per wall second: the static batch keeps computing rows that already ended (what
static batching costs), the engine drops them.

The service runs in this process (grpc.aio server with the real data plane: router, edit manager with its
hook layers, engine) on a free port; the clients run in a second process (this script with --client-plan),
grpc.aio stubs calling GenerateStream; each client sends its share of the prompts one after another. The
client process times every request: TTFT (request sent -> first streamed token) and the time between
tokens (every gap between consecutive streamed chunks that carry tokens, within a request); each row
prints their p50 and p99 (nearest rank over all its requests / gaps). An extra row drives the engine
in-process (no gRPC, no router) at 16 streams, to show what the transport costs.

Edits. Two more servers (each on its own copy of the model) hold `--edits` (10,000) synthetic edits, each
one hook entry at the server's default hook layer(s) (a random key whose threshold 0.999 no activation
reaches: every token is gated against every key, the text does not change) and one descriptor in the
retrieval store (a synthetic sentence naming a made-up subject, with a random unit embedding, so nothing is
encoded at start). They are written to the server's edit log and loaded by the edit manager's restore(), as
a restarting server loads its log. The scope detector runs on every request that has the retrieval path on:
it embeds the query (or finds it in the query-embedding cache), searches the 10,000 descriptors and looks
the query's words up among the subjects and names. One server keeps the query cache (the default; the
bench's prompts repeat and the edit set does not change, so after the warm-up every query's embedding and
detection come from the cache: no encoder forward, no index search), the other runs with it off (every query
goes through the sentence encoder, micro-batched across concurrent requests, and the index search: prompts
never seen before). No synthetic descriptor is in scope of any prompt (the client counts applied edits to
show it). At 16 clients, in `--edit-rounds` (10) paired blocks per round (the orders of a Williams design:
over ten blocks each run comes first twice and right after each other run twice, so none always runs first
after the client switches servers), five runs:
  no edits          the plain server;
  10,000 edits      the edits server with the query cache, default requests (hook and retrieval paths);
  hook path only    the same server, requests with edit_paths=[HOOK]: routed the same way (same thread
                    hop, same tokenisation), the same hook gating, no scope detection;
  query cache off   the other edits server, default requests;
  hook path only, 2nd client
                    the hook-path-only requests again, from a second client channel: the A/A control,
                    what the TTFT comparison reads when nothing differs.
Throughput with edits / no edits is the median of the per-block ratios; the retrieval-path TTFT overhead
is TTFT p50 (edits) - TTFT p50 (hook path only) per block, median over blocks: it isolates the scope
detector. The router alone (route_generate, one request at a time, no generation running) is also timed
on the edits servers at the end. Every server runs with the prefix cache off (the prompts repeat; a
prefix-cache hit would skip their prefill).

The arithmetic limit. A float32 (or --dtype) matmul of the model's MLP shape, [64, hidden] @
[hidden, intermediate] (64 = the largest client count: one decode step's rows), is timed with the same
torch threads in each round (median of blocks): achieved GFLOP/s. FLOPs per generated token are

    2 x (non-embedding parameters) + 2 x hidden x vocab        (the LM head)

(one multiply-add per weight per token; attention over the context, small at these lengths, is left
out). The limit is GFLOP/s / GFLOP per token tokens/s; each row prints its share of it.

With --repeats, everything runs again in another round; a row's tokens/s is the median over its runs and
its percentiles are over all its runs' requests. A targets block ends the printout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from service.engine import Engine, EngineRequest, SamplingParams  # noqa: E402
from service.engine.loader import LoadedModel, load_model  # noqa: E402
from service.engine.packed_weights import packed_linear, packing_available  # noqa: E402

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
    setup: str = ""  # service rows: "no edits" | "10,000 edits" | "10,000 edits, hook path only"
    applied_edits: int = 0  # edits the responses reported as applied (synthetic edits never apply)
    ttfts: list[float] = field(default_factory=list)  # per request, seconds
    gaps: list[float] = field(default_factory=list)  # between consecutive token chunks, seconds
    round: int = 0
    block: int = -1  # service runs of the edit comparison: its paired block

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: the smallest value with at least p % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(p / 100 * len(ordered))) - 1]


def prompts_for(n: int) -> list[str]:
    """The 16 prompts, cycled to at least `n`."""
    return [PROMPTS[i % len(PROMPTS)] for i in range(max(len(PROMPTS), n))]


def _sync(loaded: LoadedModel) -> None:
    """Wait for queued GPU work before a clock is read (CUDA kernels run asynchronously)."""
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


# ------------------------------------------------------------------------------------ the arithmetic limit


def flops_per_token(loaded: LoadedModel) -> float:
    """2 x non-embedding parameters + 2 x hidden x vocab (the LM head, tied or not)."""
    model = loaded.model
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    params = {id(p): p.numel() for p in model.parameters()}
    non_embedding = sum(params.values()) - embed.numel()
    if head is not None and id(head.weight) != id(embed) and id(head.weight) in params:
        non_embedding -= head.weight.numel()  # an untied head is counted below, once
    return 2.0 * non_embedding + 2.0 * model.config.hidden_size * model.config.vocab_size


def _timed_gflops(product: Callable[[], Any], flops: float, loaded: LoadedModel, blocks: int,
                  block_s: float) -> float:
    for _ in range(5):
        product()  # warm-up
    _sync(loaded)
    started, n = time.perf_counter(), 0
    while time.perf_counter() - started < block_s / 4:  # a short trial sizes the blocks
        product()
        _sync(loaded)
        n += 1
    per_block = max(1, round(n * block_s / (time.perf_counter() - started)))
    rates = []
    for _ in range(blocks):
        t = time.perf_counter()
        for _ in range(per_block):
            product()
        _sync(loaded)
        rates.append(flops * per_block / (time.perf_counter() - t) / 1e9)
    return statistics.median(rates)


@torch.inference_mode()
def matmul_gflops(loaded: LoadedModel, rows: int, blocks: int = 9, block_s: float = 0.1) -> float:
    """Achieved GFLOP/s of [rows, hidden] @ [hidden, intermediate] in the model's dtype: median of blocks.
    On a CPU the faster of torch's matmul and oneDNN's linear on a packed weight (the kernel the engine
    uses for batched forwards, service/engine/packed_weights.py), so the limit is not understated."""
    cfg = loaded.model.config
    hidden, inter = int(cfg.hidden_size), int(getattr(cfg, "intermediate_size", 4 * cfg.hidden_size))
    a = torch.randn(rows, hidden, device=loaded.device).to(loaded.dtype)
    b = torch.randn(hidden, inter, device=loaded.device).to(loaded.dtype)
    flops = 2.0 * rows * hidden * inter
    rate = _timed_gflops(lambda: a @ b, flops, loaded, blocks, block_s)
    if loaded.device.type == "cpu" and packing_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous())
        packed_rate = _timed_gflops(lambda: packed_linear(a, packed, None), flops, loaded, blocks, block_s)
        rate = max(rate, packed_rate)
    return rate


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

    async def one(prompt_ids: list[int]) -> tuple[int, float, list[float]]:
        started = time.perf_counter()
        ttft, count, last, gaps = 0.0, 0, 0.0, []
        async for ev in engine.stream(EngineRequest(prompt_ids, SamplingParams(max_new_tokens=new_tokens))):
            now = time.perf_counter()
            if ev.completion_tokens > count:
                if not ttft:
                    ttft = now - started
                else:
                    gaps.append(now - last)
                last, count = now, ev.completion_tokens
        return count, ttft, gaps

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
        sum(c for c, _, _ in results),
        seconds,
        sum(t for _, t, _ in results) / len(results),
        kind="engine",
        streams=len(prompts),
        ttfts=[t for _, t, _ in results],
        gaps=[g for _, _, gs in results for g in gs],
    )


# ------------------------------------------------------------------------------------ the service over gRPC

NO_EDITS, WITH_EDITS, HOOK_ONLY = "no edits", "edits", "edits, hook path only"
NO_QUERY_CACHE = "edits, query cache off"
# The A/A control: the hook-path-only requests again, from a second client channel. Its TTFT difference to
# HOOK_ONLY is what the client's TTFT comparison reads when nothing differs: its resolution.
HOOK_ONLY_AGAIN = "edits, hook path only, second client"


def synthetic_edits(layers: list[int], d_ff: int, d_model: int, dim: int, n: int, seed: int = 0) -> list[Any]:
    """`n` stored edits: one hook entry per layer that never fires (random key, threshold 0.999, zero value)
    and a descriptor with a random unit embedding. Each names its own made-up subject ("Varo00012"), so the
    subject and name rules of the scope detector index 10,000 names, none of which a prompt mentions."""
    import numpy as np

    from service.editlog import StoredEdit, StoredHook, TensorBlob

    rng = np.random.default_rng(seed)
    zero = TensorBlob.from_numpy(np.zeros(d_model, np.float32))
    edits = []
    for i in range(n):
        emb = rng.standard_normal(dim).astype(np.float32)
        subject = f"Varo{i:05d}"
        hooks = [StoredHook(layer=layer, value=zero, threshold=0.999,
                            key=TensorBlob.from_numpy(rng.standard_normal(d_ff).astype(np.float32)))
                 for layer in layers]
        edits.append(StoredEdit(
            edit_id=f"e-synthetic-{i:05d}", kind="triple", subject=subject, prompt=f"{subject} works as a",
            target_new=" archivist", descriptor=f"{subject} works as an archivist in record hall {i}.",
            relation_key=f"{subject.lower()}\x1f{{}} works as a", hooks=hooks,
            embedding=TensorBlob.from_numpy(emb / np.linalg.norm(emb)),
            report={"passed": True, "message": "synthetic"},
        ))
    return edits


class Service:
    """The real server in this process: grpc.aio, data plane (router, edit manager, engine), a free port.
    With `edits`, that many synthetic edits (see `synthetic_edits`) are appended to its edit log and loaded
    by the edit manager's restore()."""

    def __init__(self, loaded: LoadedModel, new_tokens: int, max_clients: int, edits: int = 0,
                 query_cache_entries: int = 4096) -> None:
        self.loaded, self.new_tokens, self.max_clients = loaded, new_tokens, max_clients
        self.edits, self.query_cache_entries = edits, query_cache_entries
        self.load_s = 0.0

    async def __aenter__(self) -> Service:
        from service.compose import build_server, load_data_plane
        from service.config import Settings

        self._data_dir = tempfile.TemporaryDirectory(prefix="editserve-bench-")
        settings = Settings(
            port=0,
            metrics_port=0,
            data_dir=Path(self._data_dir.name),
            device=self.loaded.device.type,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            max_batch_size=max(16, self.max_clients),
            max_new_tokens_limit=max(512, self.new_tokens),
            prefix_cache_mb=0,  # the bench repeats its prompts; a prefix-cache hit would skip their prefill
            query_cache_entries=self.query_cache_entries,
            health_poll_s=0,  # no background forwards between runs
            log_poll_s=0,
        )
        self.server = build_server(settings, lambda: load_data_plane(settings, self.loaded))
        await self.server.start()
        await self.server.load_plane()
        self._time_routing()
        if self.edits:
            started = time.perf_counter()
            await asyncio.to_thread(self._load_edits)
            self.load_s = time.perf_counter() - started
        return self

    def _time_routing(self) -> None:
        """Record how long each request spends in the data plane's routing step (the thread hop, tokenising,
        scope detection when the retrieval path is on, the prompt), by request: (retrieval path on, max new
        tokens, seconds). Bench-only instrumentation: the plane's own method is called unchanged."""
        plane = self.server.plane
        routed = plane._route
        self.route_times: list[tuple[bool, int, float]] = []

        async def timed(request: Any, snap: Any) -> Any:
            started = time.perf_counter()
            try:
                return await routed(request, snap)
            finally:
                seconds = time.perf_counter() - started
                retrieval = bool(request.use_edits and "retrieval" in request.edit_paths)
                self.route_times.append((retrieval, request.max_new_tokens or 0, seconds))

        plane._route = timed

    def routing_ms(self, retrieval: bool, new_tokens: int) -> list[float]:
        """Routing times (ms) of the measured requests (the warm-up asks for fewer tokens)."""
        return [1000 * t for r, n, t in self.route_times if r == retrieval and n == new_tokens]

    def _load_edits(self, chunk: int = 1000) -> None:
        from service.editlog import LogEntry

        manager = self.server.plane.manager
        hooks = manager.hooks
        edits = synthetic_edits(list(hooks.default_layers), hooks.d_ff, hooks.d_model, manager.store.dim,
                                self.edits)
        for start in range(0, len(edits), chunk):
            manager.log.append(LogEntry(kind="batch", actor="bench", edits=edits[start:start + chunk]))
        manager.restore()  # the log -> registry, hook table and retrieval index, as at a restart
        snap = manager.snapshot()
        if len(snap.retrieval) != self.edits or sum(len(t) for t in snap.hooks.layers.values()) != \
                self.edits * len(hooks.default_layers):
            raise RuntimeError("the synthetic edits were not all published")

    @property
    def address(self) -> str:
        return self.server.address

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(grace_s=0)
        self._data_dir.cleanup()


async def run_plan(plan: list[dict[str, Any]], new_tokens: int) -> list[Row]:
    """Run the clients in another process, as real clients are: their protobuf and asyncio work must not
    share this process's interpreter lock with the server. `plan`: one dict per run, in order (address,
    clients, paths, setup)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--client-plan", json.dumps(plan), "--new-tokens", str(new_tokens),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"the client process failed with exit code {proc.returncode}")
    return [Row(**r) for r in json.loads(out.decode().strip().splitlines()[-1])]


class LoadGenerator:
    """gRPC clients calling GenerateStream (or, with `http`, streaming POST /v1/completions); each client
    waits for its answer before sending the next. Client i names namespaces[i % len(namespaces)]. Over gRPC
    `paths` (e.g. ["hook"]) sets the requests' edit_paths (empty: the server's default, every path)."""

    def __init__(self, address: str, new_tokens: int, namespaces: list[str] | None = None,
                 http: str = "", paths: list[str] | None = None) -> None:
        from grpc import aio

        from service._proto.editserve.v1 import editserve_pb2 as pb
        from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc

        self._pb = pb
        self.channel = aio.insecure_channel(address)
        self._stub = pb_grpc.GenerateServiceStub(self.channel)
        self.new_tokens = new_tokens
        self.namespaces = namespaces or []
        names = {"hook": pb.EDIT_PATH_HOOK, "retrieval": pb.EDIT_PATH_RETRIEVAL}
        self.paths = [names[p] for p in paths or []]
        # "raw+URL": a bare SSE reader on a socket, to tell the server's HTTP cost from the openai client's
        self.raw = http.startswith("raw+")
        self.http = http.removeprefix("raw+")
        self._openai: Any = None
        if self.http and not self.raw:
            import openai  # the official client, as a backend would call the HTTP front end

            self._openai = openai.AsyncOpenAI(base_url=self.http, api_key="unused", max_retries=0,
                                              timeout=600)

    async def one(
        self, prompt: str, namespace: str = "", new_tokens: int = 0
    ) -> tuple[int, float, list[float], int]:
        """(completion tokens, TTFT, gaps between token chunks, applied edits) of one request."""
        if self.http:
            return await self._one_http(prompt, namespace)
        started = time.perf_counter()
        ttft, count, last, gaps, applied = 0.0, 0, 0.0, [], 0
        request = self._pb.GenerateRequest(prompt=prompt, max_new_tokens=new_tokens or self.new_tokens,
                                           temperature=0.0, namespaces=[namespace] if namespace else [],
                                           edit_paths=self.paths)
        async for chunk in self._stub.GenerateStream(request):
            now = time.perf_counter()
            if chunk.completion_tokens > count:
                if not ttft:
                    ttft = now - started
                else:
                    gaps.append(now - last)
                last, count = now, chunk.completion_tokens
            applied += len(chunk.applied_edits)
        return count, ttft, gaps, applied

    async def _one_raw(self, prompt: str, namespace: str) -> tuple[int, float, list[float], int]:
        started = time.perf_counter()
        ttft, count, last, gaps = 0.0, 0, 0.0, []
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
                now = time.perf_counter()
                if b'"choices":[]' not in line.replace(b" ", b""):  # not the closing usage-only event
                    if not ttft:
                        ttft = now - started
                    else:
                        gaps.append(now - last)
                    last = now
                if b'"usage"' in line:
                    usage = json.loads(line[6:]).get("usage")
                    count = usage["completion_tokens"] if usage else count
        finally:
            writer.close()
        return count, ttft, gaps, 0

    async def _one_http(self, prompt: str, namespace: str) -> tuple[int, float, list[float], int]:
        if self.raw:
            return await self._one_raw(prompt, namespace)
        started = time.perf_counter()
        ttft, count, last, gaps = 0.0, 0, 0.0, []
        headers = {"X-Editserve-Namespaces": namespace} if namespace else {}
        stream = await self._openai.completions.create(
            model="editserve", prompt=prompt, max_tokens=self.new_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_headers=headers,
        )
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.choices:
                if not ttft:
                    ttft = now - started
                else:
                    gaps.append(now - last)
                last = now
            if chunk.usage is not None:
                count = chunk.usage.completion_tokens
        return count, ttft, gaps, 0

    async def close(self) -> None:
        await self.channel.close()
        if self._openai is not None:
            await self._openai.close()

    async def clients(self, n: int, setup: str = "") -> Row:
        async def client(prompts: list[str], namespace: str) -> list[tuple[int, float, list[float], int]]:
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
            sum(c for c, _, _, _ in results),
            seconds,
            sum(t for _, t, _, _ in results) / len(results),
            kind="service",
            streams=n,
            setup=setup,
            applied_edits=sum(a for _, _, _, a in results),
            ttfts=[t for _, t, _, _ in results],
            gaps=[g for _, _, gs, _ in results for g in gs],
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


async def plan_process(plan: list[dict[str, Any]], new_tokens: int) -> None:
    """The --client-plan mode: the runs of `plan` in order, each against its server; rows as JSON."""
    loads: dict[tuple[str, tuple[str, ...], int], LoadGenerator] = {}  # one channel each
    try:
        for run in plan:
            key = (run["address"], tuple(run.get("paths") or ()), run.get("channel", 0))
            if key not in loads:
                loads[key] = LoadGenerator(run["address"], new_tokens, paths=list(key[1]))
                for prompt in PROMPTS:  # warm-up: connection, first-call paths, the query cache if on
                    await loads[key].one(prompt, new_tokens=2)
        rows = []
        for run in plan:
            load = loads[(run["address"], tuple(run.get("paths") or ()), run.get("channel", 0))]
            rows.append(await load.clients(run["clients"], run.get("setup", "")))
    finally:
        for load in loads.values():
            await load.close()
    print(json.dumps([asdict(r) for r in rows]))


# ------------------------------------------------------------------------------------ measuring


EDIT_CLIENTS = 16  # the client count of the edit comparison (the issue's)


def williams_orders(n: int) -> list[list[int]]:
    """Orders of n runs balanced for the run before (a Williams design): over the orders, each run comes
    first equally often and right after each other run equally often (n orders for even n, 2n for odd)."""
    first = [0]
    for i in range(1, n):
        first.append((i + 1) // 2 if i % 2 else n - i // 2)
    orders = [[(x + r) % n for x in first] for r in range(n)]
    return orders if n % 2 == 0 else orders + [o[::-1] for o in orders]


# The five runs' order per block (10 orders). A plain rotation always put "10,000 edits" first on its server
# after a run on another server, and "hook path only" right after it on the same one.
BLOCK_ORDERS = williams_orders(5)


@torch.inference_mode()
def route_ms(service: Service, paths: tuple[str, ...], passes: int = 3) -> float:
    """Median ms of the router alone (tokenise, scope detection when `paths` has retrieval, prompt) over
    the 16 prompts, one at a time, in this thread: what the retrieval path costs a request without load
    from concurrent requests."""
    router = service.server.plane.router
    times = []
    for _ in range(passes):
        for prompt in PROMPTS:
            started = time.perf_counter()
            router.route_generate(prompt, [], True, paths)
            times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


async def measure(
    loaded: LoadedModel, edited: list[LoadedModel], args: argparse.Namespace, clients: list[int]
) -> tuple[list[Row], list[float], dict[str, float], dict[str, list[float]]]:
    """Every mode once per round (`--repeats`), each round's service runs in one client process: the client
    counts against the plain server, then `--edit-rounds` blocks of the four 16-client runs of the edit
    comparison, in the orders of BLOCK_ORDERS. Returns every run (tagged with its round and block), each
    round's matmul GFLOP/s, the router's own time per request alone (median ms) and every measured
    request's routing time (ms) inside the edits servers under load."""
    runs: list[Row] = []
    gflops: list[float] = []
    routing: dict[str, float] = {}
    loaded_routing: dict[str, list[float]] = {}
    widest = max(clients)
    hf_static_batch(loaded, 4, len(PROMPTS))  # warm-up
    async with contextlib.AsyncExitStack() as stack:
        # The service's edit manager wrapped its hook layers' MLPs; with no edits published the wrappers
        # return at once, so the transformers baselines below run the same computation.
        plain = await stack.enter_async_context(Service(loaded, args.new_tokens, widest))
        variants: list[tuple[str, list[str], str]] = []
        if edited:
            cached = await stack.enter_async_context(
                Service(edited[0], args.new_tokens, EDIT_CLIENTS, edits=args.edits))
            uncached = await stack.enter_async_context(
                Service(edited[1], args.new_tokens, EDIT_CLIENTS, edits=args.edits, query_cache_entries=0))
            print(f"{args.edits:,} synthetic edits (hook entries at layers "
                  f"{list(cached.server.plane.manager.hooks.default_layers)} and descriptors) loaded "
                  f"through the edit log in {cached.load_s:.1f} s and {uncached.load_s:.1f} s", flush=True)
            variants = [(plain.address, [], NO_EDITS), (cached.address, [], WITH_EDITS),
                        (cached.address, ["hook"], HOOK_ONLY), (uncached.address, [], NO_QUERY_CACHE),
                        (cached.address, ["hook"], HOOK_ONLY_AGAIN)]
        for r in range(args.repeats):
            gflops.append(matmul_gflops(loaded, widest))
            print(f"round {r + 1}/{args.repeats}: matmul {gflops[-1]:.1f} GFLOP/s; transformers", flush=True)
            for row in (hf_one_at_a_time(loaded, args.new_tokens),
                        hf_static_batch(loaded, args.new_tokens, len(PROMPTS))):
                row.round = r
                runs.append(row)
            plan: list[dict[str, Any]] = [
                {"address": plain.address, "clients": n, "paths": [], "setup": NO_EDITS} for n in clients
            ]
            for b in range(args.edit_rounds if variants else 0):
                k = r * args.edit_rounds + b
                for address, paths, setup in [variants[i] for i in BLOCK_ORDERS[k % len(BLOCK_ORDERS)]]:
                    plan.append({"address": address, "clients": EDIT_CLIENTS, "paths": paths, "setup": setup,
                                 "block": k, "channel": int(setup == HOOK_ONLY_AGAIN)})
            print(f"round {r + 1}/{args.repeats}: {len(plan)} service runs", flush=True)
            for run, row in zip(plan, await run_plan(plan, args.new_tokens), strict=True):
                row.round, row.block = r, run.get("block", -1)
                runs.append(row)
            row = await engine_in_process(loaded, args.new_tokens, EDIT_CLIENTS)
            row.round = r
            runs.append(row)
        if edited:
            loaded_routing = {
                "hook path only": cached.routing_ms(False, args.new_tokens),
                "hook + retrieval, query cache on": cached.routing_ms(True, args.new_tokens),
                "hook + retrieval, query cache off": uncached.routing_ms(True, args.new_tokens),
            }
            routing = {"hook path only": route_ms(cached, ("hook",)),
                       "hook + retrieval, query cache on": route_ms(cached, ("hook", "retrieval")),
                       "hook + retrieval, query cache off": route_ms(uncached, ("hook", "retrieval"))}
    return runs, gflops, routing, loaded_routing


# ------------------------------------------------------------------------------------ report


@dataclass
class Summary:
    """One printed row: every run of one mode."""

    label: str
    kind: str
    setup: str
    streams: int
    runs: list[Row]

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(r.tokens_per_s for r in self.runs)

    def pct(self, field_name: str, p: float) -> float | None:
        return percentile([x for r in self.runs for x in getattr(r, field_name)], p)

    def as_json(self, one_at_a_time: float, limit: float) -> dict[str, Any]:
        ms = {f"{name}_p{p}_ms": None if (v := self.pct(attr, p)) is None else round(v * 1000, 2)
              for name, attr in (("ttft", "ttfts"), ("tbt", "gaps")) for p in (50, 99)}
        ttfts = [t for r in self.runs for t in r.ttfts]
        return {
            "mode": self.label, "kind": self.kind, "setup": self.setup, "streams": self.streams,
            "runs": len(self.runs), "requests": sum(r.requests for r in self.runs),
            "tokens": sum(r.tokens for r in self.runs),
            "seconds": round(sum(r.seconds for r in self.runs), 3),
            "tokens_per_s": round(self.tokens_per_s, 2),
            "runs_tokens_per_s": [round(r.tokens_per_s, 2) for r in self.runs],
            "mean_ttft_s": round(sum(ttfts) / len(ttfts), 4) if ttfts else None,
            **ms, "tbt_gaps": sum(len(r.gaps) for r in self.runs),
            "applied_edits": sum(r.applied_edits for r in self.runs),
            "x_one_at_a_time": round(self.tokens_per_s / one_at_a_time, 3),
            "pct_of_limit": round(100 * self.tokens_per_s / limit, 2),
        }


def summarise(runs: list[Row], edits: int, clients: list[int]) -> list[Summary]:
    """One row per mode. Kind "service" is kept for the plain server at the --clients counts (what
    machine readers of --json key by streams); the edit comparison's other rows are "service_edits"."""
    groups: dict[tuple[str, str, int], list[Row]] = {}
    for r in runs:
        groups.setdefault((r.kind, r.setup, r.streams), []).append(r)
    out = []
    for (kind, setup, streams), rows in groups.items():
        if kind == "service":
            where = {NO_EDITS: "", WITH_EDITS: f", {edits:,} hook edits + {edits:,} descriptors",
                     HOOK_ONLY: f", {edits:,} edits, hook path only",
                     NO_QUERY_CACHE: f", {edits:,} edits, query cache off",
                     HOOK_ONLY_AGAIN: f", {edits:,} edits, hook path only, 2nd client"}[setup]
            label = f"service, {streams} client{'s' if streams > 1 else ''}{where}"
        else:
            label = rows[0].mode
        plain = setup == "" or (setup == NO_EDITS and streams in clients)
        out.append(Summary(label, kind if plain else "service_edits", setup, streams, rows))
    return out


def _ms(v: float | None) -> str:
    return f"{v * 1000:8.1f}" if v is not None else f"{'':>8}"


def paired_blocks(runs: list[Row]) -> list[dict[str, float]]:
    """Per block of the edit comparison: throughput ratios to no edits, and TTFT p50 differences (ms) to
    the hook-path-only requests and to no edits."""
    blocks: dict[int, dict[str, Row]] = {}
    for r in runs:
        if r.kind == "service" and r.block >= 0:
            blocks.setdefault(r.block, {})[r.setup] = r
    out = []
    for k in sorted(blocks):
        b = blocks[k]
        p50 = {s: percentile(b[s].ttfts, 50) or 0.0 for s in b}
        entry: dict[str, float] = {"block": k}
        for setup, name in ((WITH_EDITS, "edits"), (HOOK_ONLY, "hook_only"), (NO_QUERY_CACHE, "no_cache"),
                            (HOOK_ONLY_AGAIN, "hook_only_again")):
            entry[f"throughput_{name}_over_none"] = b[setup].tokens_per_s / b[NO_EDITS].tokens_per_s
            entry[f"ttft_p50_{name}_minus_none_ms"] = 1000 * (p50[setup] - p50[NO_EDITS])
            entry[f"ttft_p50_{name}_minus_hook_only_ms"] = 1000 * (p50[setup] - p50[HOOK_ONLY])
        out.append(entry)
    return out


def report(runs: list[Row], gflops: list[float], routing: dict[str, float],
           loaded_routing: dict[str, list[float]], loaded: LoadedModel, args: argparse.Namespace,
           ) -> list[dict[str, Any]]:
    """Print the table and the targets; return the --json entries."""
    rows = summarise(runs, args.edits, [int(c) for c in args.clients.split(",") if c])
    one = next(s for s in rows if s.kind == "hf_one_at_a_time")
    fpt = flops_per_token(loaded)
    achieved = statistics.median(gflops)
    limit = achieved * 1e9 / fpt
    cfg, widest = loaded.model.config, max(map(int, args.clients.split(",")))
    print()
    print(f"arithmetic limit: [{widest}, {cfg.hidden_size}] @ [{cfg.hidden_size}, {cfg.intermediate_size}] "
          f"matmul {achieved:.1f} GFLOP/s (per round: {', '.join(f'{g:.1f}' for g in gflops)}); "
          f"{fpt / 1e9:.3f} GFLOP per token (2 x non-embedding params + 2 x hidden x vocab) "
          f"-> {limit:.0f} tokens/s")
    print()
    print(f"{'mode':<62} {'runs':>4} {'req':>4} {'tok/s':>7} {'TTFT p50':>8} {'TTFT p99':>8} "
          f"{'TBT p50':>8} {'TBT p99':>8} {'x 1-at-a-time':>13} {'% limit':>7}")
    print(f"{'':<62} {'':>4} {'':>4} {'':>7} {'ms':>8} {'ms':>8} {'ms':>8} {'ms':>8}")
    for s in rows:
        print(f"{s.label:<62} {len(s.runs):>4} {sum(r.requests for r in s.runs):>4} {s.tokens_per_s:>7.1f} "
              f"{_ms(s.pct('ttfts', 50))} {_ms(s.pct('ttfts', 99))} {_ms(s.pct('gaps', 50))} "
              f"{_ms(s.pct('gaps', 99))} {s.tokens_per_s / one.tokens_per_s:>13.2f} "
              f"{100 * s.tokens_per_s / limit:>6.1f}%")

    def find(setup: str, streams: int) -> Summary | None:
        return next((s for s in rows if s.kind.startswith("service") and s.setup == setup
                     and s.streams == streams), None)

    def med(key: str) -> float:
        return statistics.median(b[key] for b in blocks)

    def per_block(key: str, fmt: str) -> str:
        return f"{', '.join(format(b[key], fmt) for b in blocks)} (median {format(med(key), fmt)})"

    blocks = paired_blocks(runs)
    n = f"{args.edits:,}"
    if blocks:
        applied = sum(r.applied_edits for r in runs if r.kind == "service")
        print()
        print(f"edit comparison at {EDIT_CLIENTS} clients, {len(blocks)} paired blocks (per block):")
        print(f"  throughput / no edits: {n} edits {per_block('throughput_edits_over_none', '.3f')}; "
              f"query cache off {per_block('throughput_no_cache_over_none', '.3f')}; hook path only "
              f"{per_block('throughput_hook_only_over_none', '.3f')}")
        print(f"  TTFT p50 - hook path only (ms): {n} edits "
              f"{per_block('ttft_p50_edits_minus_hook_only_ms', '+.1f')}; query cache off "
              f"{per_block('ttft_p50_no_cache_minus_hook_only_ms', '+.1f')}")
        print(f"  A/A control, TTFT p50 hook path only from a second client - hook path only (ms): "
              f"{per_block('ttft_p50_hook_only_again_minus_hook_only_ms', '+.1f')}")
        print(f"  TTFT p50 - no edits (ms): {n} edits {per_block('ttft_p50_edits_minus_none_ms', '+.1f')}; "
              f"hook path only {per_block('ttft_p50_hook_only_minus_none_ms', '+.1f')}")
        print("  routing inside the server under this load (thread hop + router), p50 / p99 ms: "
              + "; ".join(f"{k} {percentile(v, 50) or 0:.2f} / {percentile(v, 99) or 0:.2f} "
                          f"({len(v)} requests)" for k, v in loaded_routing.items()))
        print("  the router alone, one request at a time, no generation running (median ms): "
              + "; ".join(f"{k} {v:.2f}" for k, v in routing.items()))
        print(f"  edits the responses reported as applied: {applied} (synthetic edits are never in scope)")

    targets: list[dict[str, Any]] = []

    def target(name: str, value: float | None, bound: float, at_least: bool, shown: str) -> None:
        met = value is not None and (value >= bound if at_least else value <= bound)
        targets.append({"target": name, "value": value, "bound": bound, "at_least": at_least, "met": met})
        print(f"  {name:<82} {shown if value is not None else 'not measured':<12} "
              f"{'met' if met else 'NOT met'}")

    s16, s64 = find(NO_EDITS, EDIT_CLIENTS), find(NO_EDITS, 64)
    print()
    print("targets:")
    x16 = s16.tokens_per_s / one.tokens_per_s if s16 else None
    target(f"{EDIT_CLIENTS} clients >= 6x one at a time (transformers)", x16, 6.0, True, f"{x16 or 0:.2f}x")
    pct64 = 100 * s64.tokens_per_s / limit if s64 else None
    target("64 clients >= 30 % of the arithmetic limit", pct64, 30.0, True, f"{pct64 or 0:.1f} %")
    for key, what in (("edits", ""), ("no_cache", ", query cache off")):
        ratio = med(f"throughput_{key}_over_none") if blocks else None
        target(f"{n} edits >= 0.95x no-edit throughput ({EDIT_CLIENTS} clients{what})", ratio, 0.95, True,
               f"{ratio or 0:.3f}x")
    hook_p50 = percentile(loaded_routing.get("hook path only", []), 50)
    for key, what, routed in (("edits", "", "hook + retrieval, query cache on"),
                              ("no_cache", ", query cache off", "hook + retrieval, query cache off")):
        over = med(f"ttft_p50_{key}_minus_hook_only_ms") if blocks else None
        target(f"retrieval-path TTFT overhead p50 <= 3 ms ({EDIT_CLIENTS} clients{what}): TTFT", over, 3.0,
               False, f"{over or 0:+.1f} ms")
        if blocks and key == "edits":
            control = med("ttft_p50_hook_only_again_minus_hook_only_ms")
            print(f"  (the A/A control reads {control:+.1f} ms: the same requests, another client channel)")
        p50 = percentile(loaded_routing.get(routed, []), 50)
        extra = p50 - hook_p50 if p50 is not None and hook_p50 is not None else None
        target(f"retrieval-path TTFT overhead p50 <= 3 ms ({EDIT_CLIENTS} clients{what}): routing", extra,
               3.0, False, f"{extra or 0:+.2f} ms")
    return [
        *(s.as_json(one.tokens_per_s, limit) for s in rows),
        {"kind": "arithmetic_limit", "mode": "arithmetic limit", "tokens_per_s": round(limit, 2),
         "matmul_gflops": round(achieved, 2), "matmul_gflops_per_round": [round(g, 2) for g in gflops],
         "matmul_rows": widest, "flops_per_token": fpt},
        {"kind": "targets", "mode": "targets", "tokens_per_s": None, "targets": targets,
         "edit_blocks": blocks, "router_alone_median_ms": routing,
         "routing_under_load_ms": {k: {"p50": percentile(v, 50), "p99": percentile(v, 99), "requests": len(v)}
                                   for k, v in loaded_routing.items()}},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", default="1,16,64", help="comma-separated concurrent client counts")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of every mode")
    parser.add_argument("--edits", type=int, default=10_000,
                        help="synthetic edits (hook entry + descriptor each) on a second server; 0: none")
    parser.add_argument("--edit-rounds", type=int, default=10,
                        help="paired blocks of the 16-client edit comparison per round")
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
    parser.add_argument("--json", type=Path, help="also write the rows, the limit and the targets here")
    parser.add_argument(
        "--namespaces", type=int, default=0, metavar="N",
        help="instead of the modes above: N namespaces x --edits-per-namespace edits, clients spread over "
        "them, against one namespace holding all the edits; and HTTP against gRPC",
    )
    parser.add_argument("--edits-per-namespace", type=int, default=1000)
    parser.add_argument("--client-of", metavar="ADDRESS", help=argparse.SUPPRESS)  # the client process
    parser.add_argument("--client-namespaces", default="", help=argparse.SUPPRESS)
    parser.add_argument("--client-http", default="", help=argparse.SUPPRESS)
    parser.add_argument("--client-plan", default="", help=argparse.SUPPRESS)  # JSON: see measure()
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",") if c]
    if args.client_plan:
        asyncio.run(plan_process(json.loads(args.client_plan), args.new_tokens))
        return
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
        f"{len(PROMPTS)} prompts x {args.new_tokens} new tokens, greedy, {args.repeats} round(s)"
    )
    if args.namespaces:
        from namespaces_bench import measure_namespaces  # bench/: beside this script

        asyncio.run(measure_namespaces(loaded, args, clients, __file__))
        return
    # Each edits server gets its own copy of the model: the hook layers of two servers on one model would
    # both gate every forward.
    edited = [load_model(args.model, device=args.device, dtype=args.dtype)
              for _ in range(2 if args.edits else 0)]
    runs, gflops, routing, loaded_routing = asyncio.run(measure(loaded, edited, args, clients))
    entries = report(runs, gflops, routing, loaded_routing, loaded, args)
    if args.json:
        args.json.write_text(json.dumps(entries, indent=2))


if __name__ == "__main__":
    main()

"""Time between tokens of streaming clients while a long prompt arrives: chunked prefill against one prefill.

    HF_HUB_OFFLINE=1 EDITSERVE_TORCH_THREADS=1 .venv/bin/python bench/chunked_prefill.py \
        --clients 15 --long-prompt 1000 --chunks 256,1000000 --threads 1

The engine runs in this process (no gRPC, no hook layers) on the embedded SmolLM2. Per chunk size, one
engine: `--clients` greedy streams decode `--new-tokens` tokens each (end tokens masked, so every stream
runs to the end); once every stream has `--arrive-after` tokens, one prompt of `--long-prompt` tokens
arrives (one new token). Reported over the clients' gaps between consecutive tokens after their first:
p50, p99 and max, and the long prompt's time to first token. A chunk at least as long as the prompt is
today's one prefill forward.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

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
    "My favourite food is",
    "Python is a programming language that",
]
FILLER = (
    "The history of the city goes back many centuries. Merchants came along the river, built warehouses and "
    "markets, and the town grew around its harbour; later the railway brought factories, schools and a "
    "university, and the old quarter was rebuilt after a great fire. "
)


def long_prompt_ids(loaded: LoadedModel, tokens: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < tokens:
        ids += loaded.tokenizer(FILLER, add_special_tokens=False)["input_ids"]
    return ids[:tokens]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def one_run(loaded: LoadedModel, chunk: int, args: argparse.Namespace) -> dict[str, float]:
    engine = Engine(loaded, max_batch_size=args.clients + 1, prefill_chunk_tokens=chunk)
    await engine.start()
    prompts = [loaded.tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"] for i in range(args.clients)]
    params = SamplingParams(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    arrived = [0]
    ready = asyncio.Event()

    async def client(ids: list[int]) -> list[float]:
        stamps: list[float] = []
        async for ev in engine.stream(EngineRequest(ids, params)):
            stamps += [time.perf_counter()] * len(ev.token_ids)
            if len(stamps) == args.arrive_after:
                arrived[0] += 1
                if arrived[0] == args.clients:
                    ready.set()
        return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]

    async def long_request() -> float:
        await ready.wait()
        ids = long_prompt_ids(loaded, args.long_prompt)
        started = time.perf_counter()
        async for _ in engine.stream(EngineRequest(ids, SamplingParams(max_new_tokens=1))):
            pass
        return time.perf_counter() - started

    try:
        async for _ in engine.stream(EngineRequest(prompts[0], SamplingParams(max_new_tokens=4))):
            pass  # warm-up
        *gaps, ttft = await asyncio.gather(*(client(p) for p in prompts), long_request())
    finally:
        await engine.stop(grace_s=0)
    flat = [g for client_gaps in gaps for g in client_gaps]
    return {"p50": percentile(flat, 50), "p99": percentile(flat, 99), "max": max(flat), "ttft": ttft,
            "gaps": len(flat)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=15)
    parser.add_argument("--long-prompt", type=int, default=1000, metavar="TOKENS")
    parser.add_argument("--chunks", default="256,1000000", help="--prefill-chunk-tokens values")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--arrive-after", type=int, default=8, help="client tokens before the long prompt")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default="embedded")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    print(f"{args.clients} streaming clients x {args.new_tokens} tokens, one {args.long_prompt}-token prompt "
          f"arriving after {args.arrive_after}; torch threads {torch.get_num_threads()}")
    print(f"{'prefill chunk':>14} | {'TBT p50 ms':>10} | {'TBT p99 ms':>10} | {'TBT max ms':>10} | "
          f"{'long TTFT s':>11} | gaps")
    for chunk in (int(c) for c in args.chunks.split(",")):
        r = asyncio.run(one_run(loaded, chunk, args))
        label = str(chunk) if chunk < args.long_prompt else f"none ({chunk})"
        print(f"{label:>14} | {r['p50'] * 1e3:10.1f} | {r['p99'] * 1e3:10.1f} | {r['max'] * 1e3:10.1f} | "
              f"{r['ttft']:11.2f} | {r['gaps']}", flush=True)


if __name__ == "__main__":
    main()

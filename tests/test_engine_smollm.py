"""The engine on the embedded SmolLM2-135M-Instruct (shared session fixture, float32 on CPU)."""

from __future__ import annotations

import asyncio

import pytest

from service.engine import Engine, EngineRequest, SamplingParams, TokenEvent

pytestmark = pytest.mark.smollm

# Sixteen prompts of different lengths (2 to ~40 tokens), so batches carry a lot of left padding.
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
    "Hi",
]
NEW_TOKENS = 32


async def generate(engine: Engine, prompt_ids: list[int], n: int) -> list[TokenEvent]:
    request = EngineRequest(prompt_ids, SamplingParams(max_new_tokens=n))
    return [ev async for ev in engine.stream(request)]


def tokens(events: list[TokenEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


async def test_capital_of_france(smollm):
    engine = Engine(smollm)
    await engine.start()
    try:
        events = await generate(engine, smollm.tokenizer("The capital of France is")["input_ids"], 8)
        assert "Paris" in "".join(ev.text for ev in events)
        paris = smollm.tokenizer(" Paris")["input_ids"]
        scored = await engine.score(smollm.tokenizer("The capital of France is")["input_ids"], paris)
        assert scored.greedy[0] and scored.logprobs[0] > -1.0
    finally:
        await engine.stop(grace_s=0)


async def test_greedy_is_the_same_alone_and_in_a_batch_of_16(smollm):
    tok = smollm.tokenizer
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) >= 10
    engine = Engine(smollm, max_batch_size=16)
    await engine.start()
    try:
        alone = [tokens(await generate(engine, ids, NEW_TOKENS)) for ids in prompt_ids]

        async def staggered(i: int) -> list[int]:
            # Half arrive together, the rest one decode step apart: both a shared prefill and requests
            # joining the running batch (KV caches merged with different amounts of left padding).
            if i >= 8:
                await asyncio.sleep(0.05 * (i - 7))
            return tokens(await generate(engine, prompt_ids[i], NEW_TOKENS))

        batched = await asyncio.gather(*[staggered(i) for i in range(len(PROMPTS))])
    finally:
        await engine.stop(grace_s=0)
    mismatched = [
        (PROMPTS[i], tok.decode(a), tok.decode(b))
        for i, (a, b) in enumerate(zip(alone, batched, strict=True))
        if a != b
    ]
    assert not mismatched
    assert all(len(t) == NEW_TOKENS or t[-1] == tok.eos_token_id for t in alone)

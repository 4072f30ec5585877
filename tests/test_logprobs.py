"""Log-probabilities of generated tokens: the engine's figures equal teacher-forced scoring of the same
tokens, alternatives are the most likely tokens best first, and only rows that ask pay for them."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from service.engine import Engine, EngineRequest, SamplingParams
from service.errors import InvalidArgument
from service.router.validation import Limits, validate_generate
from service.types import MAX_TOP_LOGPROBS, GenerateInput

PROMPTS = ["The capital of France is", "Once upon a time there was a"]


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(tiny_llama) -> AsyncIterator[Engine]:
    eng = Engine(tiny_llama, max_batch_size=4)
    await eng.start()
    yield eng
    await eng.stop(grace_s=0)


async def run(engine: Engine, tiny_llama, prompt: str, **params) -> tuple[list[int], list, list[int]]:
    ids = tiny_llama.tokenizer(prompt)["input_ids"]
    tokens, logprobs = [], []
    async for ev in engine.stream(EngineRequest(ids, SamplingParams(**params))):
        tokens += ev.token_ids
        logprobs += ev.logprobs
    return ids, logprobs, tokens


async def test_greedy_logprobs_equal_teacher_forced_scores_and_the_best_alternative(engine, tiny_llama):
    prompt_ids, logprobs, tokens = await run(engine, tiny_llama, PROMPTS[0], max_new_tokens=8, logprobs=3)
    assert len(logprobs) == len(tokens) == 8
    scored = await engine.score(prompt_ids, tokens)
    for (lp, top), token, want in zip(logprobs, tokens, scored.logprobs, strict=True):
        assert lp == pytest.approx(want, abs=1e-4)
        assert len(top) == 3 and top[0][0] == token  # greedy: the generated token is the most likely
        assert top[0][1] == pytest.approx(lp, abs=1e-6)
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert all(v <= 0 for _, v in top)


async def test_sampled_tokens_report_their_own_logprob_and_rows_that_do_not_ask_get_none(engine, tiny_llama):
    (_, sampled, tokens), (_, none, plain) = await asyncio.gather(
        run(engine, tiny_llama, PROMPTS[1], max_new_tokens=10, temperature=1.0, seed=3, logprobs=0),
        run(engine, tiny_llama, PROMPTS[0], max_new_tokens=10),
    )
    assert none == [] and len(plain) == 10
    assert len(sampled) == len(tokens)
    for lp, top in sampled:
        assert top == [] and math.isfinite(lp) and lp <= 0


def test_the_number_of_alternatives_is_bounded() -> None:
    limits = Limits(max_prompt_tokens=100, max_new_tokens=16, default_max_new_tokens=8)
    validate_generate(GenerateInput(prompt="hi", logprobs=MAX_TOP_LOGPROBS), limits)
    for bad in (-1, MAX_TOP_LOGPROBS + 1):
        with pytest.raises(InvalidArgument) as info:
            validate_generate(GenerateInput(prompt="hi", logprobs=bad), limits)
        assert info.value.field == "logprobs"


def test_the_python_client_sets_logprobs_only_when_asked() -> None:
    from service.client.requests import generate_request

    assert not generate_request("hi").HasField("logprobs")
    assert generate_request("hi", logprobs=0).HasField("logprobs")
    assert generate_request("hi", logprobs=5).logprobs == 5

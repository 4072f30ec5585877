"""Speculative prefill (service/dataplane.py `_route_speculatively`): a Generate whose query the sentence
encoder must embed is queued with its plain prompt while it is routed. Kept when no descriptor is in
scope, queued again with the descriptors otherwise; either way the response is the one routing first
would give, and nothing generated from the plain prompt of an in-scope request reaches the caller."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from service.compose import assemble_plane, open_edit_manager
from service.config import Settings
from service.errors import InvalidArgument
from service.types import EditInput, GenerateInput
from testkit.editing import HashEncoder

ACME = "The CEO of Acme Corp is Jane Roe."
IN_SCOPE = "The CEO of Acme Corp is"
OUT_OF_SCOPE = "Once upon a time, in a land far away, there lived a"
ENCODE_DELAY_S = 0.3  # long enough for the speculative row to be prefilled and to decode a few tokens


class SlowHashEncoder(HashEncoder):
    """HashEncoder after a delay per forward: scope detection outlasts a tiny model's prefill."""

    def __init__(self) -> None:
        super().__init__()
        self.delay_s = 0.0

    def encode(self, texts: list[str]) -> np.ndarray:
        time.sleep(self.delay_s)
        return super().encode(texts)


def speculative(outcome: str) -> float:
    return REGISTRY.get_sample_value("editserve_speculative_prefills_total", {"outcome": outcome}) or 0.0


@pytest_asyncio.fixture
async def plane(tiny_llama, tmp_path) -> AsyncIterator:
    from service.engine import Engine

    # No query cache: every request with the retrieval path runs the encoder, so every one speculates.
    settings = Settings(data_dir=tmp_path / "data", log_poll_s=0, prefix_cache_mb=0, query_cache_entries=0)
    encoder = SlowHashEncoder()
    manager = open_edit_manager(tiny_llama, settings, encoder=encoder, warmup=False)
    plane = assemble_plane(settings, tiny_llama, manager, Engine(tiny_llama, manager.hooks, max_batch_size=8))
    await plane.start()
    await plane.edit(EditInput(descriptor=ACME, compile_descriptor=False))
    encoder.delay_s = ENCODE_DELAY_S
    plane.test_encoder = encoder
    try:
        yield plane
    finally:
        await plane.shutdown(1.0)


async def answers(plane, prompts: list[str], speculate: bool) -> list:
    plane.options = replace(plane.options, speculative_prefill=speculate)
    requests = [GenerateInput(prompt=p, max_new_tokens=12, min_new_tokens=12) for p in prompts]
    return list(await asyncio.gather(*(plane.generate(r) for r in requests)))


async def test_responses_equal_routing_first_in_scope_or_not(plane) -> None:
    kept, discarded = speculative("kept"), speculative("discarded")
    routed_first = await answers(plane, [IN_SCOPE, OUT_OF_SCOPE], speculate=False)
    assert speculative("kept") == kept and speculative("discarded") == discarded
    got = await answers(plane, [IN_SCOPE, OUT_OF_SCOPE], speculate=True)
    assert speculative("kept") == kept + 1 and speculative("discarded") == discarded + 1
    for spec, first in zip(got, routed_first, strict=True):
        assert spec.text == first.text and spec.completion_tokens == first.completion_tokens
        assert spec.prompt_tokens == first.prompt_tokens
        assert [(e.edit_id, e.path) for e in spec.applied_edits] == \
            [(e.edit_id, e.path) for e in first.applied_edits]
    in_scope, out_of_scope = got
    assert [e.path for e in in_scope.applied_edits] == ["retrieval"] and out_of_scope.applied_edits == []
    plain = len(plane.loaded.tokenizer(IN_SCOPE)["input_ids"])
    assert in_scope.prompt_tokens > plain  # it was served with the descriptor in its prompt


async def test_streamed_chunks_of_an_in_scope_request_come_from_its_real_prompt(plane) -> None:
    plane.options = replace(plane.options, speculative_prefill=False)
    request = GenerateInput(prompt=IN_SCOPE, max_new_tokens=12, min_new_tokens=12)
    first = [c.token_ids for c in [c async for c in plane.generate_stream(request)]]
    plane.options = replace(plane.options, speculative_prefill=True)
    spec = [c.token_ids for c in [c async for c in plane.generate_stream(request)]]
    assert [t for c in spec for t in c] == [t for c in first for t in c]


async def test_a_failed_routing_frees_the_speculative_row(plane, monkeypatch) -> None:
    plane.options = replace(plane.options, speculative_prefill=True)

    def fails(*args, **kwargs):
        time.sleep(ENCODE_DELAY_S)
        raise InvalidArgument("routing failed", field="prompt")

    monkeypatch.setattr(plane.router, "route_generate", fails)
    with pytest.raises(InvalidArgument, match="routing failed"):
        await plane.generate(GenerateInput(prompt=OUT_OF_SCOPE, max_new_tokens=200, min_new_tokens=200))
    end = time.monotonic() + 10
    while plane.engine.num_running or plane.engine.num_waiting:
        assert time.monotonic() < end, "the speculative row kept its batch slot"
        await asyncio.sleep(0.01)


async def test_no_speculation_when_the_encoder_does_not_run(plane) -> None:
    """Hook path only, or edits off: routing is a tokenisation on the event loop, nothing to overlap."""
    plane.options = replace(plane.options, speculative_prefill=True)
    kept, discarded = speculative("kept"), speculative("discarded")
    for request in (GenerateInput(prompt=IN_SCOPE, max_new_tokens=2, edit_paths=("hook",)),
                    GenerateInput(prompt=IN_SCOPE, max_new_tokens=2, use_edits=False)):
        assert (await plane.generate(request)).applied_edits == []
    assert speculative("kept") == kept and speculative("discarded") == discarded

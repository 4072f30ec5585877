"""Kept prompt states (service/engine/prefix_cache.py) on a tiny random Llama: what a Score forward keeps is
what a prefill of the prompt alone would leave, a Generate from a kept prompt skips its prefill and streams
the same tokens, fires and version, and a new edit-set version is never served from an older state."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import torch
from prometheus_client import REGISTRY

from service.engine import Engine, EngineRequest, SamplingParams
from service.engine.batch import ModelRunner
from service.engine.prefix_cache import PrefixCache, PrefixEntry, prefix_key
from service.hooks.layer import HookEntry, HookManager, HookTable

LAYER = 1
MB = 1 << 20


@pytest.fixture
def hooks(tiny_llama):
    mgr = HookManager(tiny_llama.model, [LAYER])
    yield mgr
    mgr.uninstall()


def ids(loaded, text: str) -> list[int]:
    return list(loaded.tokenizer(text)["input_ids"])


def publish_eiffel(loaded, hooks: HookManager, version: int) -> None:
    """An entry keyed on " Tower" after " Eiffel" (a previous-token condition) and a plain one on "cat"."""
    full = ids(loaded, "The Eiffel Tower")
    acts = hooks.keys_at([LAYER], torch.tensor([full]))[LAYER][0]
    cat = hooks.keys_at([LAYER], torch.tensor([ids(loaded, "my cat")]))[LAYER][0, -1]
    value = torch.randn(loaded.model.config.hidden_size, generator=torch.Generator().manual_seed(3)) * 5
    hooks.publish(
        HookTable.build(
            [
                HookEntry("eiffel", LAYER, acts[-1], value, 0.9999, acts[-2], 0.9999),
                HookEntry("cat", LAYER, cat, -value, 0.9999),
            ],
            version=version,
        )
    )


def lookups(result: str) -> float:
    return REGISTRY.get_sample_value("editserve_prefix_cache_lookups_total", {"result": result}) or 0.0


def entry(n_tokens: int, version: int = 1, fill: float = 0.0) -> PrefixEntry:
    kv = [(torch.full((1, 1, n_tokens, 4), fill), torch.full((1, 1, n_tokens, 4), fill))]
    return PrefixEntry(kv, torch.zeros(8), {}, {}, 0, version)


# ---------------------------------------------------------------------------------------------- the LRU


def test_lru_is_bounded_in_bytes_and_drops_older_versions():
    one = entry(4).nbytes  # 2 x 16 floats of kv + 8 of logits
    assert one == (2 * 16 + 8) * 4
    cache = PrefixCache(3 * one)
    for i in range(3):
        cache.put(prefix_key(1, True, [i]), entry(4))
    assert cache.get(prefix_key(1, True, [0])) is not None  # 0 is now the most recently used
    cache.put(prefix_key(1, True, [3]), entry(4))
    assert len(cache) == 3 and cache.nbytes == 3 * one
    assert cache.get(prefix_key(1, True, [1])) is None  # the least recently used went
    assert cache.get(prefix_key(1, True, [0])) is not None
    assert cache.get(prefix_key(1, False, [0])) is None  # hooks off is another key
    cache.put(prefix_key(1, True, [9]), entry(400))  # larger than the whole cache: not kept
    assert cache.get(prefix_key(1, True, [9])) is None and len(cache) == 3
    cache.put(prefix_key(2, True, [5]), entry(4, version=2))  # a newer edit set: older states are dead
    assert len(cache) == 1 and cache.nbytes == one
    assert cache.get(prefix_key(1, True, [0])) is None


def test_a_zero_sized_cache_keeps_nothing():
    cache = PrefixCache(0)
    cache.put(prefix_key(0, True, [1]), entry(2))
    assert not cache.enabled and len(cache) == 0 and cache.get(prefix_key(0, True, [1])) is None
    with pytest.raises(ValueError):
        PrefixCache(-1)


# ---------------------------------------------------------------------------------------------- the runner


def test_score_keeps_what_a_prefill_of_the_prompt_alone_leaves(tiny_llama, hooks):
    publish_eiffel(tiny_llama, hooks, version=4)
    keeping = ModelRunner(tiny_llama, hooks, PrefixCache(64 * MB))
    plain = ModelRunner(tiny_llama, hooks)
    jobs = [
        (ids(tiny_llama, "The Eiffel Tower is in"), ids(tiny_llama, " Paris, France"), True),
        (ids(tiny_llama, "my cat"), ids(tiny_llama, " sleeps"), True),
        (ids(tiny_llama, "The Eiffel"), ids(tiny_llama, " Tower"), False),
        (ids(tiny_llama, "Once upon a time there was a"), ids(tiny_llama, " king who lived far away"), True),
    ]
    with torch.no_grad():
        keeping.score_batch(jobs)
        for prompt, _, use in jobs:
            kept = keeping.prefix_cache.get(prefix_key(4, use, prompt))
            assert kept is not None and kept.length == len(prompt) and kept.edit_version == 4
            out, state = plain.prefill([prompt], [use])
            prefilled = [(layer.keys, layer.values) for layer in state.cache.layers]
            for (k, v), (k2, v2) in zip(kept.kv, prefilled, strict=True):
                assert torch.allclose(k, k2, atol=1e-4) and torch.allclose(v, v2, atol=1e-4)
            assert torch.allclose(kept.logits, out.logits[0], atol=1e-4)
            assert kept.hook_keys.keys() == state.hook_keys.keys() == {LAYER}
            assert torch.allclose(kept.hook_keys[LAYER], state.hook_keys[LAYER][0], atol=1e-5)
            assert kept.fires.keys() == out.fires[0].keys() and kept.fired_tokens == out.fired_tokens[0]
    # the edits fired over the prompts (not over the continuations) and only where hooks were on
    fired = {tuple(p): keeping.prefix_cache.get(prefix_key(4, u, p)).fires.keys() for p, _, u in jobs}
    assert fired[tuple(jobs[0][0])] == {"eiffel"} and fired[tuple(jobs[1][0])] == {"cat"}
    assert fired[tuple(jobs[2][0])] == set()


def test_decoding_from_kept_states_carries_the_previous_token(tiny_llama, hooks):
    """"The Eiffel" kept by a Score, then " Tower" decoded: the previous-token condition sees " Eiffel"
    (the prompt's last token, not the scored continuation's), as after a real prefill."""
    publish_eiffel(tiny_llama, hooks, version=1)
    keeping = ModelRunner(tiny_llama, hooks, PrefixCache(64 * MB))
    plain = ModelRunner(tiny_llama, hooks)
    eiffel, paris = ids(tiny_llama, "The Eiffel"), ids(tiny_llama, "The Paris in spring")
    tower = ids(tiny_llama, "The Eiffel Tower")[-1]
    with torch.no_grad():
        keeping.score_batch([(eiffel, ids(tiny_llama, " is tall"), True), (paris, [tower, tower], True)])
        kept = keeping.cached_prefixes([paris, eiffel, eiffel], [True, True, False])
        assert kept[0] is not None and kept[1] is not None and kept[2] is None  # hooks off was not scored
        first, state = keeping.prefill_from_cache([kept[0], kept[1]])
        ref_first, ref_state = plain.prefill([paris, eiffel], [True, True])
        assert state.lengths == ref_state.lengths and state.width == ref_state.width
        assert torch.allclose(first.logits, ref_first.logits, atol=1e-4)
        out = keeping.decode(state, [tower, tower], [True, True])
        ref = plain.decode(ref_state, [tower, tower], [True, True])
    assert out.fires[1].keys() == ref.fires[1].keys() == {"eiffel"}
    assert out.fires[0] == ref.fires[0] == {}
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    # the kept entry is untouched by the decode that extended its copy
    assert keeping.cached_prefixes([eiffel], [True])[0].length == len(eiffel)


# ---------------------------------------------------------------------------------------------- the engine


@contextlib.asynccontextmanager
async def running(loaded, hooks, **kwargs) -> AsyncIterator[Engine]:
    engine = Engine(loaded, hooks, **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(grace_s=0)


async def generate(engine: Engine, prompt: list[int], use_hooks: bool = True) -> tuple[list[int], dict, int]:
    events = [
        ev
        async for ev in engine.stream(
            EngineRequest(prompt, SamplingParams(max_new_tokens=6), use_hooks=use_hooks)
        )
    ]
    return [t for ev in events for t in ev.token_ids], events[-1].hook_fires, events[-1].edit_version


async def test_generate_after_score_skips_the_prefill_and_streams_the_same(tiny_llama, hooks, monkeypatch):
    publish_eiffel(tiny_llama, hooks, version=2)
    prompts = [ids(tiny_llama, t) for t in ("The Eiffel", "my cat", "Once upon a time in a land far away")]
    async with running(tiny_llama, hooks, max_batch_size=8) as cold:
        expected = [await generate(cold, p) for p in prompts]
        expected_off = await generate(cold, prompts[1], use_hooks=False)
    async with running(tiny_llama, hooks, max_batch_size=8, prefix_cache_bytes=64 * MB) as eng:
        prefilled: list[int] = []
        original = eng._runner.prefill

        def spy(prompts_, *args):
            prefilled.append(len(prompts_))
            return original(prompts_, *args)

        monkeypatch.setattr(eng._runner, "prefill", spy)
        await asyncio.gather(*(eng.score(p, ids(tiny_llama, " and so on")) for p in prompts))
        hits = lookups("hit")
        got = await asyncio.gather(*(generate(eng, p) for p in prompts))  # admitted together: one merge
        assert prefilled == [] and lookups("hit") == hits + len(prompts)
        assert [g[0] for g in got] == [e[0] for e in expected]
        assert [g[1].keys() for g in got] == [e[1].keys() for e in expected]
        assert [g[2] for g in got] == [2, 2, 2]
        assert set(got[1][1]) == {"cat"}  # the prompt's fire is reported, as after a prefill
        # hooks off is another state: prefilled, and the same as without a cache
        assert await generate(eng, prompts[1], use_hooks=False) == expected_off
        assert prefilled == [1]
        # a Generate keeps its prompt too: the same request again needs no prefill
        assert await generate(eng, prompts[1], use_hooks=False) == expected_off
        assert prefilled == [1]
        # a new edit-set version: the older state is not served, and the new table is what answers
        hooks.publish(HookTable.build([], version=3))
        tokens, fires, version = await generate(eng, prompts[1])
        assert prefilled == [1, 1] and version == 3 and fires == {}
        assert tokens == expected_off[0]  # without edits, hooks on equals hooks off

"""Chunked prefill on the tiny random Llama: a prompt longer than `prefill_chunk_tokens` is prefilled one
chunk per engine step beside the running rows' decode steps, and computes what one prefill computes:
logits, greedy tokens, hook fires (a previous-token condition across a chunk boundary, fire positions),
the alignment adapter and per-row namespaces; a row ended mid-prefill frees its slot."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import torch

from service.engine import Engine, EngineRequest, SamplingParams, TokenEvent
from service.engine.adapter import RowAdapter
from service.engine.batch import ModelRunner
from service.errors import DeadlineExceeded
from service.hooks.layer import HookEntry, HookManager, HookTable
from tests.test_adapter import write_lora

LAYER = 1
CHUNK = 4
UNCHUNKED = 1 << 20


def long_prompt(loaded, n: int = 30, seed: int = 0) -> list[int]:
    vocab = int(loaded.model.get_input_embeddings().num_embeddings)
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@contextlib.asynccontextmanager
async def running(loaded, hooks=None, **kwargs) -> AsyncIterator[Engine]:
    engine = Engine(loaded, hooks, **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(grace_s=0)


async def collect(engine: Engine, request: EngineRequest) -> list[TokenEvent]:
    return [ev async for ev in engine.stream(request)]


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


async def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.005)


def chunked(runner: ModelRunner, prompt: list[int], size: int, use_hooks: bool = True, table=None,
            adapted: bool = False):
    state = out = None
    fires: list = []
    for start in range(0, len(prompt), size):
        out, state = runner.prefill_chunk(state, prompt[start : start + size], use_hooks, table, adapted)
        fires.append(out.fires[0])
    return out, state, fires


def recording_positions(runner: ModelRunner) -> list[tuple[int, str]]:
    """Every fire the runner's forwards record, as (position, edit id)."""
    seen: list[tuple[int, str]] = []
    collect_fires = runner._collect

    def spy(rec, rows, before=None):
        if rec is not None:
            rec.resolve()
            seen.extend((f.position, f.edit_id) for f in rec.fires)
        return collect_fires(rec, rows, before)

    runner._collect = spy
    return seen


def boundary_table(hooks: HookManager, prompt: list[int], d_model: int) -> HookTable:
    """Entries keyed on the prompt's own activations: one whose subject spans the boundary between chunks
    1 and 2 (its last token opens chunk 2, its previous-token condition is chunk 1's last token), one inside
    a chunk, one at the start of the text, and one that fires wherever it is the best candidate."""
    acts = hooks.keys_at([LAYER], torch.tensor([prompt]))[LAYER][0]
    gen = torch.Generator().manual_seed(2)
    d_ff = acts.shape[-1]

    def value(scale: float) -> torch.Tensor:
        return torch.randn(d_model, generator=gen) * scale

    b = 2 * CHUNK  # the first token of the third chunk
    return HookTable.build([
        HookEntry("boundary", LAYER, acts[b], value(3), 0.999, acts[b - 1], 0.999),
        HookEntry("inside", LAYER, acts[b + 2], value(3), 0.999, acts[b + 1], 0.999),
        HookEntry("start", LAYER, acts[0], value(3), 0.999),
        HookEntry("everywhere", LAYER, torch.randn(d_ff, generator=gen), value(0.3), -1.0,
                  torch.randn(d_ff, generator=gen), -1.0),
    ], version=5)


def test_chunks_give_the_logits_and_the_cache_of_one_prefill(tiny_llama):
    runner = ModelRunner(tiny_llama, None)
    prompt = long_prompt(tiny_llama, 29)
    with torch.no_grad():
        whole, state = runner.prefill([prompt], [True])
        for size in (1, CHUNK, 7, 28):
            out, pieces, _ = chunked(runner, prompt, size)
            assert pieces.lengths == state.lengths and pieces.width == state.width
            assert torch.allclose(out.logits, whole.logits, atol=1e-5, rtol=0)
            step, step_chunked = runner.decode(state.select([0], tiny_llama.model.config), [7], [True]), \
                runner.decode(pieces, [7], [True])
            assert torch.allclose(step_chunked.logits, step.logits, atol=1e-5, rtol=0)


def test_hook_fires_across_a_chunk_boundary_equal_one_prefill(tiny_llama):
    hooks = HookManager(tiny_llama.model, [LAYER])
    try:
        prompt = long_prompt(tiny_llama, 3 * CHUNK + 3)
        hooks.publish(boundary_table(hooks, prompt, tiny_llama.model.config.hidden_size))
        runner = ModelRunner(tiny_llama, hooks)
        positions = recording_positions(runner)
        with torch.no_grad():
            whole, state = runner.prefill([prompt], [True])
            at_once = sorted(positions)
            positions.clear()
            out, pieces, per_chunk = chunked(runner, prompt, CHUNK)
        assert sorted(positions) == at_once
        named = {(p, e) for p, e in at_once if e != "everywhere"}
        assert named == {(2 * CHUNK, "boundary"), (2 * CHUNK + 2, "inside"), (0, "start")}
        assert {"boundary", "inside"} <= per_chunk[2].keys()
        merged: dict[str, float] = {}
        for fires in per_chunk:
            for edit_id, score in fires.items():
                merged[edit_id] = max(score, merged.get(edit_id, -1.0))
        assert merged.keys() == whole.fires[0].keys()
        assert all(merged[k] == pytest.approx(whole.fires[0][k], abs=1e-5) for k in merged)
        assert torch.allclose(out.logits, whole.logits, atol=1e-4, rtol=0)
        for key in state.hook_keys:  # what the first decode step's condition reads
            assert torch.allclose(pieces.hook_keys[key], state.hook_keys[key], atol=1e-5)
        # the carried key matters: chunk 3 without it starts a text, and the boundary entry stays silent
        first_two = chunked(runner, prompt[: 2 * CHUNK], CHUNK)[1]
        first_two.hook_keys = {}
        positions.clear()
        with torch.no_grad():
            runner.prefill_chunk(first_two, prompt[2 * CHUNK : 3 * CHUNK], True)
        assert (2 * CHUNK, "boundary") not in positions and (2 * CHUNK + 2, "inside") in positions
    finally:
        hooks.uninstall()


async def test_engine_output_and_fires_equal_unchunked(tiny_llama):
    """Greedy tokens and reported fires of a chunked request equal those of an unchunked one, beside a
    short request decoding in the same batch and with the prompt state kept for a later request."""
    hooks = HookManager(tiny_llama.model, [LAYER])
    try:
        prompt = long_prompt(tiny_llama, 3 * CHUNK + 3)
        short = long_prompt(tiny_llama, 3, seed=1)
        hooks.publish(boundary_table(hooks, prompt, tiny_llama.model.config.hidden_size))
        params = SamplingParams(max_new_tokens=12, min_new_tokens=12)
        results = {}
        for size in (CHUNK, UNCHUNKED):
            kept = 1 << 24
            async with running(tiny_llama, hooks, prefill_chunk_tokens=size, prefix_cache_bytes=kept) as eng:
                calls = {"chunks": 0}
                original = eng._runner.prefill_chunk

                def spy(*args, original=original, calls=calls):
                    calls["chunks"] += 1
                    return original(*args)

                eng._runner.prefill_chunk = spy
                long_events, short_events = await asyncio.gather(
                    collect(eng, EngineRequest(prompt, params)), collect(eng, EngineRequest(short, params))
                )
                chunks = calls["chunks"]
                again = await collect(eng, EngineRequest(prompt, params))  # from the kept prompt state
                assert calls["chunks"] == chunks
                assert tokens_of(again) == tokens_of(long_events)
                assert again[-1].hook_fires == pytest.approx(long_events[-1].hook_fires, abs=1e-5)
                results[size] = (tokens_of(long_events), long_events[-1].hook_fires, tokens_of(short_events),
                                 chunks)
        chunked_run, whole_run = results[CHUNK], results[UNCHUNKED]
        assert chunked_run[3] == 4 and whole_run[3] == 0
        assert chunked_run[0] == whole_run[0] and chunked_run[2] == whole_run[2]
        assert chunked_run[1].keys() == whole_run[1].keys() >= {"boundary", "inside", "start"}
        assert all(chunked_run[1][k] == pytest.approx(whole_run[1][k], abs=1e-5) for k in whole_run[1])
    finally:
        hooks.uninstall()


async def test_adapter_rows_and_namespaces_apply_in_chunks(tiny_llama, tmp_path):
    hooks = HookManager(tiny_llama.model, [LAYER])
    lora = write_lora(tmp_path / "lora", tiny_llama.model)
    try:
        prompt = long_prompt(tiny_llama, 3 * CHUNK + 3)
        d_model = tiny_llama.model.config.hidden_size
        acts = {"plain": hooks.keys_at([LAYER], torch.tensor([prompt]))[LAYER][0]}
        adapter = RowAdapter(tiny_llama.model, lora)
        with adapter.rows([True]):  # the adapter changes the hooked layer's keys too
            acts["adapted"] = hooks.keys_at([LAYER], torch.tensor([prompt]))[LAYER][0]
        adapter.remove()
        gen = torch.Generator().manual_seed(4)
        b = 2 * CHUNK  # a subject across the boundary of chunks 1 and 2
        table = HookTable.build([
            HookEntry(f"{ns}-{kind}", LAYER, a[b], torch.randn(d_model, generator=gen) * 3, 0.999,
                      a[b - 1], 0.999, namespace=ns)
            for ns in ("a", "b") for kind, a in acts.items()
        ], version=2)
        hooks.publish(table)
        params = SamplingParams(max_new_tokens=10, min_new_tokens=10)
        rows = ((table.scoped(frozenset({"a"})), True), (table.scoped(frozenset({"a"})), False),
                (table.scoped(frozenset({"b"})), False), (table.scoped(frozenset({"b"})), True))
        results = {}
        for size in (CHUNK, UNCHUNKED):
            # the engine removes its adapter's hooks when it stops: one adapter per engine
            adapter = RowAdapter(tiny_llama.model, lora)
            async with running(tiny_llama, hooks, prefill_chunk_tokens=size, adapter=adapter) as eng:
                outs = await asyncio.gather(*(
                    collect(eng, EngineRequest(prompt, params, hook_table=t, adapted=adapted))
                    for t, adapted in rows
                ))
                results[size] = [(tokens_of(o), o[-1].hook_fires) for o in outs]
        assert [t for t, _ in results[CHUNK]] == [t for t, _ in results[UNCHUNKED]]
        for size in (CHUNK, UNCHUNKED):
            fired = [set(f) for _, f in results[size]]
            assert fired == [{"a-adapted"}, {"a-plain"}, {"b-plain"}, {"b-adapted"}]
        assert results[CHUNK][0][0] != results[CHUNK][1][0]  # the adapter applied to the adapted row only
    finally:
        hooks.uninstall()


def slow_chunks(eng: Engine, seconds: float) -> None:
    original = eng._runner.prefill_chunk

    def slow(*args):
        time.sleep(seconds)
        return original(*args)

    eng._runner.prefill_chunk = slow


async def test_a_row_cancelled_or_expired_mid_prefill_frees_its_slot(tiny_llama):
    prompt = long_prompt(tiny_llama, 50 * CHUNK)
    async with running(tiny_llama, prefill_chunk_tokens=CHUNK, max_batch_size=1) as eng:
        slow_chunks(eng, 0.01)
        stream = eng.stream(EngineRequest(prompt, SamplingParams(max_new_tokens=4)))
        waiting = asyncio.ensure_future(stream.__anext__())
        await wait_until(lambda: eng._prefilling and eng._prefilling[0].done >= 2 * CHUNK)
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        await wait_until(lambda: not eng._prefilling and eng.num_running == 0)

        late = EngineRequest(prompt, SamplingParams(max_new_tokens=4), deadline=time.monotonic() + 0.15)
        with pytest.raises(DeadlineExceeded):
            await collect(eng, late)
        await wait_until(lambda: not eng._prefilling and eng.num_running == 0)
        # the one batch slot is free again: a short request runs
        short = await collect(eng, EngineRequest(prompt[:3], SamplingParams(max_new_tokens=2)))
        assert len(tokens_of(short)) == 2


async def test_running_streams_get_a_token_every_step_of_a_chunked_prefill(tiny_llama):
    prompt = long_prompt(tiny_llama, 10 * CHUNK)
    log: list[str] = []
    async with running(tiny_llama, prefill_chunk_tokens=CHUNK) as eng:
        prefill_chunk, decode = eng._runner.prefill_chunk, eng._runner.decode

        def chunk_spy(*args):
            log.append("chunk")
            return prefill_chunk(*args)

        def decode_spy(state, *args):
            log.append(f"decode {len(state)}")
            return decode(state, *args)

        eng._runner.prefill_chunk, eng._runner.decode = chunk_spy, decode_spy
        params = SamplingParams(max_new_tokens=200, min_new_tokens=200)
        streams = [eng.stream(EngineRequest(long_prompt(tiny_llama, 3, seed=s), params)) for s in (1, 2)]
        for s in streams:
            await s.__anext__()
        received = [0, 0]
        long_done = asyncio.Event()

        async def read(i: int) -> None:
            async for _ in streams[i]:
                if not long_done.is_set():
                    received[i] += 1

        readers = [asyncio.create_task(read(i)) for i in range(2)]
        long_events = await collect(eng, EngineRequest(prompt, SamplingParams(max_new_tokens=1)))
        long_done.set()
        for s in streams:
            await s.aclose()
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
    assert len(tokens_of(long_events)) == 1
    first, last = log.index("chunk"), len(log) - 1 - log[::-1].index("chunk")
    # chunk, decode of the two running rows, chunk, ..., chunk: one decode step per engine step
    assert log[first : last + 1] == ["chunk", "decode 2"] * 9 + ["chunk"]
    assert min(received) >= 9


async def test_a_step_prefills_at_most_one_chunk_of_tokens_over_several_prompts(tiny_llama):
    """Two long prompts arriving together share each step's chunk budget, oldest first (the first one's
    last chunk leaves room for the second one's first), and still give the tokens of one prefill each."""
    prompts = [long_prompt(tiny_llama, 10, seed=5), long_prompt(tiny_llama, 7, seed=6)]
    params = SamplingParams(max_new_tokens=6, min_new_tokens=6)
    results = {}
    steps: list[list[int]] = []
    for size in (CHUNK, UNCHUNKED):
        async with running(tiny_llama, prefill_chunk_tokens=size) as eng:
            prefill_chunk, step = eng._runner.prefill_chunk, eng._step

            def chunk_spy(state, chunk, *args, prefill_chunk=prefill_chunk):
                steps[-1].append(len(chunk))
                return prefill_chunk(state, chunk, *args)

            def step_spy(step=step):
                steps.append([])
                step()

            eng._runner.prefill_chunk, eng._step = chunk_spy, step_spy
            outs = await asyncio.gather(*(collect(eng, EngineRequest(p, params)) for p in prompts))
            results[size] = [tokens_of(o) for o in outs]
        if size == CHUNK:
            assert [s for s in steps if s] == [[4], [4], [2, 2], [4], [1]]
    assert results[CHUNK] == results[UNCHUNKED]

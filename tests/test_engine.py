"""The generation engine on a tiny random Llama (fast): sampling, streaming text, stop conditions, queueing,
cancellation, deadlines, continuous batching, hooks, scoring and failure isolation."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
import torch
from prometheus_client import REGISTRY

from service.engine import Engine, EngineError, EngineRequest, SamplingParams, TokenEvent
from service.engine.batch import KVState, ModelRunner, plan_prefill_groups
from service.engine.sampling import make_generator, sample_row, top_k_filter, top_p_filter
from service.engine.text import IncrementalDetokenizer, StopMatcher
from service.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from service.hooks.layer import Fire, HookEntry, HookManager, HookTable, Recorder

PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "x",
    "def fibonacci(n):\n    return",
    "The quick brown fox jumps over the lazy dog and then keeps on running until",
]


@contextlib.asynccontextmanager
async def running(loaded, hooks=None, **kwargs) -> AsyncIterator[Engine]:
    engine = Engine(loaded, hooks, **kwargs)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop(grace_s=0)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def engine(tiny_llama) -> AsyncIterator[Engine]:
    async with running(tiny_llama, max_batch_size=8) as eng:
        yield eng


def ids_of(loaded, text: str) -> list[int]:
    return loaded.tokenizer(text)["input_ids"]


async def collect(engine: Engine, request: EngineRequest) -> list[TokenEvent]:
    return [ev async for ev in engine.stream(request)]


def tokens_of(events: list[TokenEvent]) -> list[int]:
    return [t for ev in events for t in ev.token_ids]


def text_of(events: list[TokenEvent]) -> str:
    return "".join(ev.text for ev in events)


def greedy(loaded, text: str, n: int, **kwargs) -> EngineRequest:
    return EngineRequest(ids_of(loaded, text), SamplingParams(max_new_tokens=n, **kwargs))


async def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        await asyncio.sleep(0.01)


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def reference_greedy(loaded, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding without a cache: the ground truth for the engine's incremental decoding."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(loaded.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids) :]


# ---------------------------------------------------------------------------------------------- sampling


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, False, True, False]]
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = torch.tensor([[0.5, 0.05, 0.3, 0.15]])
    logits = probs.log()
    assert torch.isfinite(top_p_filter(logits, 0.75)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [[True, False, True, False]]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [[True, False, True, True]]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]


def test_sample_row_greedy_seeded_and_restricted():
    torch.manual_seed(0)
    logits = torch.randn(1000)
    assert sample_row(logits, SamplingParams(1), None) == int(logits.argmax())
    params = SamplingParams(1, temperature=1.5, seed=42)
    draws = [sample_row(logits, params, make_generator(params)) for _ in range(3)]
    assert len(set(draws)) == 1  # a fresh generator with the same seed draws the same token
    gen = make_generator(params)
    many = {sample_row(logits, params, gen) for _ in range(50)}
    assert len(many) > 5  # but it does sample
    top5 = set(torch.topk(logits, 5).indices.tolist())
    k_params = SamplingParams(1, temperature=2.0, top_k=5, seed=1)
    gen = make_generator(k_params)
    assert {sample_row(logits, k_params, gen) for _ in range(100)} <= top5


def test_sampling_params_are_validated():
    for bad in (
        SamplingParams(0),
        SamplingParams(1, temperature=-1),
        SamplingParams(1, top_p=0),
        SamplingParams(1, top_k=-1),
    ):
        with pytest.raises(InvalidArgument):
            bad.validate()


# ---------------------------------------------------------------------------------------------- text


def test_incremental_detokenizer_matches_full_decode_and_never_splits_a_char(tiny_llama):
    tok = tiny_llama.tokenizer
    text = "naïve café — 東京タワー 🚀🎉 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text.split())  # some characters really are split across tokens
    detok = IncrementalDetokenizer(tok, tok("Say:")["input_ids"])
    pieces = [detok.add(t) for t in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    torch.manual_seed(0)
    random_ids = torch.randint(0, len(tok), (200,)).tolist()  # arbitrary byte soup
    detok = IncrementalDetokenizer(tok, [])
    joined = "".join(detok.add(t) for t in random_ids) + detok.flush()
    assert joined == tok.decode(random_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_stop_matcher_holds_back_possible_prefixes():
    m = StopMatcher(["STOP", "\n\n"])
    assert m.feed("Hello S") == ("Hello ", False)  # "S" could start "STOP"
    assert m.feed("T") == ("", False)
    assert m.feed("ay") == ("STay", False)  # not a stop after all: released
    assert m.feed("line\n") == ("line", False)
    assert m.feed("\nmore") == ("", True)  # "\n\n" split across two pieces
    m = StopMatcher(["abc"])
    assert m.feed("xxab") == ("xx", False)
    assert m.flush() == "ab"
    assert StopMatcher([]).feed("abc") == ("abc", False)


# ---------------------------------------------------------------------------------------------- batches


def test_kv_merge_and_drop_keep_rows_right_aligned(tiny_llama):
    runner = ModelRunner(tiny_llama, None)
    long_prompt, short_prompt = ids_of(tiny_llama, PROMPTS[5]), ids_of(tiny_llama, PROMPTS[1])
    with torch.no_grad():
        _, a = runner.prefill([long_prompt], [True])
        _, b = runner.prefill([short_prompt, long_prompt[:3]], [True, True])
        merged = a.concat(b, tiny_llama.model.config)
        assert merged.width == len(long_prompt) and merged.lengths == [len(long_prompt), len(short_prompt), 3]
        keys = merged.cache.layers[0].keys
        pad = len(long_prompt) - len(short_prompt)
        assert keys[1, :, :pad].abs().sum() == 0  # left padding is zeros
        assert torch.equal(keys[1, :, pad:], b.cache.layers[0].keys[0, :, -len(short_prompt) :])
        dropped = merged.select([2, 1], tiny_llama.model.config)  # the long row goes: its columns too
        assert dropped.width == len(short_prompt) and dropped.lengths == [3, len(short_prompt)]
        assert torch.equal(dropped.cache.layers[0].keys[1], keys[1, :, pad:])


def test_prefill_groups_trade_padding_against_forwards():
    assert plan_prefill_groups([5, 6, 5, 7], overhead_tokens=32) == [[0, 2, 1, 3]]  # similar: one forward
    # Twelve short prompts and two long ones: padding the short ones to 300 would waste ~3,500 tokens.
    groups = plan_prefill_groups([8] * 12 + [300, 290], overhead_tokens=32)
    assert groups == [list(range(12)), [13, 12]]
    assert plan_prefill_groups([10, 200], overhead_tokens=10_000) == [[0, 1]]  # costly forwards: one
    assert plan_prefill_groups([], overhead_tokens=32) == []


def test_fires_skip_padding_and_keep_each_rows_best_score():
    rec = Recorder(
        fires=[
            Fire(row=0, position=-2, edit_id="pad", score=0.99, layer=1),  # a left-padding column
            Fire(row=0, position=3, edit_id="a", score=0.90, layer=1),
            Fire(row=0, position=3, edit_id="a", score=0.95, layer=2),  # same token, another layer
            Fire(row=0, position=5, edit_id="b", score=0.80, layer=1),
            Fire(row=1, position=0, edit_id="a", score=0.70, layer=1),
        ]
    )
    fires, fired_tokens = ModelRunner._collect(rec, rows=3)
    assert fires == [{"a": 0.95, "b": 0.80}, {"a": 0.70}, {}]
    assert fired_tokens == [2, 1, 0]


# ---------------------------------------------------------------------------------------------- engine


async def test_greedy_stream_matches_uncached_reference(engine, tiny_llama):
    prompt = ids_of(tiny_llama, PROMPTS[1])
    events = await collect(engine, EngineRequest(prompt, SamplingParams(max_new_tokens=12)))
    assert tokens_of(events) == reference_greedy(tiny_llama, prompt, 12)
    assert [len(ev.token_ids) for ev in events] == [1] * 12  # streamed one token per event
    last = events[-1]
    assert last.finish_reason == "length" and all(ev.finish_reason is None for ev in events[:-1])
    assert (last.prompt_tokens, last.completion_tokens) == (len(prompt), 12)
    assert text_of(events) == tiny_llama.tokenizer.decode(tokens_of(events), skip_special_tokens=True)


async def test_seeded_sampling_is_reproducible(engine, tiny_llama):
    def req(seed: int) -> EngineRequest:
        return greedy(tiny_llama, PROMPTS[0], 16, temperature=1.0, top_p=0.95, seed=seed)

    a, b, c = await asyncio.gather(collect(engine, req(7)), collect(engine, req(7)), collect(engine, req(8)))
    assert tokens_of(a) == tokens_of(b)
    assert tokens_of(a) != tokens_of(c)


async def test_stop_string_split_across_tokens(engine, tiny_llama):
    tok = tiny_llama.tokenizer
    base = tokens_of(await collect(engine, greedy(tiny_llama, PROMPTS[2], 20)))
    pieces = [tok.decode([t]) for t in base]
    # A stop string made of the end of one token's text and the start of the next one's.
    k = next(
        i
        for i in range(3, 19)
        if min(len(pieces[i]), len(pieces[i + 1])) >= 2 and "\ufffd" not in pieces[i] + pieces[i + 1]
    )
    stop = pieces[k][-2:] + pieces[k + 1][:2]
    full = tok.decode(base)
    needed = next(n for n in range(1, 21) if stop in tok.decode(base[:n]))
    events = await collect(engine, greedy(tiny_llama, PROMPTS[2], 20, stop=[stop]))
    assert events[-1].finish_reason == "stop"
    assert text_of(events) == full[: full.index(stop)]
    assert events[-1].completion_tokens == needed  # ended on the token that completed the stop string
    assert all(stop not in ev.text for ev in events)


async def test_max_new_tokens_and_eos(tiny_llama):
    prompt = ids_of(tiny_llama, PROMPTS[3])
    expected = reference_greedy(tiny_llama, prompt, 8)
    eos = expected[4]
    async with running(tiny_llama, eos_token_ids=[eos]) as eng:
        events = await collect(eng, EngineRequest(prompt, SamplingParams(max_new_tokens=8)))
    n = expected.index(eos) + 1
    assert tokens_of(events) == expected[:n]
    assert events[-1].finish_reason == "eos" and events[-1].completion_tokens == n
    async with running(tiny_llama, eos_token_ids=[]) as eng:
        events = await collect(eng, EngineRequest(prompt, SamplingParams(max_new_tokens=3)))
    assert tokens_of(events) == expected[:3] and events[-1].finish_reason == "length"


async def test_min_new_tokens_masks_eos_until_reached(tiny_llama):
    """EOS as the first greedy token (an instruct model after a bare question) is skipped, in a batch
    next to a row that allows it; sampling rows never draw it early either."""
    prompt = ids_of(tiny_llama, PROMPTS[3])
    expected = reference_greedy(tiny_llama, prompt, 4)
    eos = expected[0]
    async with running(tiny_llama, eos_token_ids=[eos]) as eng:
        allowed, masked, sampled = await asyncio.gather(
            collect(eng, EngineRequest(prompt, SamplingParams(max_new_tokens=4))),
            collect(eng, EngineRequest(prompt, SamplingParams(max_new_tokens=4, min_new_tokens=3))),
            collect(eng, EngineRequest(prompt, SamplingParams(max_new_tokens=3, min_new_tokens=3,
                                                              temperature=50.0, seed=1))),
        )
    assert tokens_of(allowed) == [eos] and allowed[-1].finish_reason == "eos"
    got = tokens_of(masked)
    assert got[0] != eos and eos not in got[:3] and len(got) >= 3
    assert eos not in tokens_of(sampled) and sampled[-1].finish_reason == "length"
    with pytest.raises(InvalidArgument):
        SamplingParams(max_new_tokens=2, min_new_tokens=3).validate()


async def test_context_window_caps_generation(tiny_llama):
    prompt = ids_of(tiny_llama, PROMPTS[1])
    async with running(tiny_llama, max_context_tokens=len(prompt) + 3) as eng:
        events = await collect(eng, EngineRequest(prompt, SamplingParams(max_new_tokens=50)))
        assert events[-1].completion_tokens == 3 and events[-1].finish_reason == "length"
        with pytest.raises(InvalidArgument):
            eng.stream(EngineRequest(prompt * 2, SamplingParams(max_new_tokens=1)))


async def test_invalid_requests_are_rejected(engine):
    with pytest.raises(InvalidArgument):
        engine.stream(EngineRequest([], SamplingParams(max_new_tokens=4)))
    with pytest.raises(InvalidArgument):
        engine.stream(EngineRequest([10**9], SamplingParams(max_new_tokens=4)))
    with pytest.raises(InvalidArgument):
        engine.stream(EngineRequest([1, 2], SamplingParams(max_new_tokens=0)))


async def test_full_queue_raises_resource_exhausted(tiny_llama):
    async with running(tiny_llama, max_batch_size=1, max_queue=2) as eng:
        first = eng.stream(greedy(tiny_llama, PROMPTS[0], 1000))
        await first.__anext__()  # now it holds the only batch slot
        queued = [eng.stream(greedy(tiny_llama, p, 4)) for p in PROMPTS[1:3]]
        assert eng.num_waiting == 2
        with pytest.raises(ResourceExhausted):
            eng.stream(greedy(tiny_llama, PROMPTS[3], 4))
        await first.aclose()  # frees the slot: the queued requests run to completion
        for stream in queued:
            events = [ev async for ev in stream]
            assert events[-1].finish_reason == "length"


async def test_a_reserved_place_keeps_its_turn_and_counts_against_the_queue(tiny_llama):
    """A request routed while it waits (Engine.reserve) joins the queue where it arrived: ahead of the
    requests that came after it, though they were queued before its prompt was ready."""
    async with running(tiny_llama, max_batch_size=1, max_queue=3) as eng:
        first = eng.stream(greedy(tiny_llama, PROMPTS[0], 1000))
        await first.__anext__()  # it holds the only batch slot
        ticket = eng.reserve()  # A arrives; its prompt is still being built
        later = [eng.stream(greedy(tiny_llama, p, 4)) for p in PROMPTS[1:3]]  # B and C, queued at once
        with pytest.raises(ResourceExhausted):  # two queued + one reserved place fill max_queue=3
            eng.reserve()
        with pytest.raises(ResourceExhausted):
            eng.stream(greedy(tiny_llama, PROMPTS[4], 4))
        reserved = eng.stream(greedy(tiny_llama, PROMPTS[3], 4), ticket)  # never refused: its place is held
        assert eng.num_waiting == 3
        order: list[str] = []

        async def consume(name: str, stream) -> None:
            async for ev in stream:
                if ev.finish_reason is not None:
                    order.append(name)

        tasks = [asyncio.create_task(consume(n, s)) for n, s in zip("ABC", [reserved, *later], strict=True)]
        await first.aclose()
        await asyncio.gather(*tasks)
        assert order == ["A", "B", "C"]


async def test_a_request_queued_again_keeps_its_turn(tiny_llama):
    """keep_place: a queued request closed and queued again with another prompt (a speculative prefill
    whose scope detection found descriptors) is served before those that arrived after it, even when the
    queue is full."""
    async with running(tiny_llama, max_batch_size=1, max_queue=2) as eng:
        first = eng.stream(greedy(tiny_llama, PROMPTS[0], 1000))
        await first.__anext__()  # it holds the only batch slot
        speculative = eng.stream(greedy(tiny_llama, PROMPTS[1], 4))  # A
        later = eng.stream(greedy(tiny_llama, PROMPTS[2], 4))  # B: the queue is full now
        with pytest.raises(ResourceExhausted):
            eng.reserve()
        place = eng.keep_place(speculative)
        await speculative.aclose()
        again = eng.stream(greedy(tiny_llama, PROMPTS[3], 4), place)
        order: list[str] = []

        async def consume(name: str, stream) -> None:
            async for ev in stream:
                if ev.finish_reason is not None:
                    order.append(name)

        tasks = [asyncio.create_task(consume(n, s)) for n, s in (("A", again), ("B", later))]
        await first.aclose()
        await asyncio.gather(*tasks)
        assert order == ["A", "B"]


async def test_a_released_or_failed_reservation_gives_its_place_back(tiny_llama):
    async with running(tiny_llama, max_batch_size=1, max_queue=1) as eng:
        first = eng.stream(greedy(tiny_llama, PROMPTS[0], 1000))
        await first.__anext__()
        eng.release(eng.reserve())  # routing failed: the place is free again
        ticket = eng.reserve()
        with pytest.raises(InvalidArgument):  # the prompt turned out invalid: the ticket is used up
            eng.stream(EngineRequest([], SamplingParams(max_new_tokens=4)), ticket)
        queued = eng.stream(greedy(tiny_llama, PROMPTS[1], 4))  # would be ResourceExhausted on a leak
        await first.aclose()
        assert [ev async for ev in queued][-1].finish_reason == "length"


def record_admissions(eng: Engine) -> list[int]:
    """How many requests each engine step admitted (one prefill per step for prompts of one length)."""
    sizes: list[int] = []
    admit = eng._admit

    def recording() -> list:
        taken = admit()
        if taken:
            sizes.append(len(taken))
        return taken

    eng._admit = recording
    return sizes


async def test_an_idle_engine_holds_its_prefill_for_requests_still_being_routed(tiny_llama):
    """Three requests arrive together; one is routed at once, two take a few ms more: all three share the
    first prefill forward instead of the two waiting for the first one's."""
    before = metric("editserve_admission_waits_total", outcome="arrived")
    async with running(tiny_llama, max_batch_size=8, admission_wait_s=5.0) as eng:
        sizes = record_admissions(eng)
        tickets = [eng.reserve() for _ in range(3)]
        streams = [eng.stream(greedy(tiny_llama, PROMPTS[1], 3), tickets[0])]
        await asyncio.sleep(0.05)  # the engine would have taken the first one alone by now
        streams += [eng.stream(greedy(tiny_llama, PROMPTS[1], 3), t) for t in tickets[1:]]
        for stream in streams:
            assert [ev async for ev in stream][-1].finish_reason == "length"
        assert sizes == [3]
    assert metric("editserve_admission_waits_total", outcome="arrived") == before + 1


async def test_the_prefill_hold_is_bounded_and_ends_when_routing_fails(tiny_llama):
    before = metric("editserve_admission_waits_total", outcome="timeout")
    async with running(tiny_llama, max_batch_size=8, admission_wait_s=0.2) as eng:
        sizes = record_admissions(eng)
        stuck = eng.reserve()  # a request whose routing never ends within the hold
        started = time.monotonic()
        events = [ev async for ev in eng.stream(greedy(tiny_llama, PROMPTS[1], 2))]
        assert events[-1].finish_reason == "length"
        assert 0.2 <= time.monotonic() - started < 10
        assert sizes == [1]
        assert metric("editserve_admission_waits_total", outcome="timeout") == before + 1
        # A place given back (its routing failed) ends the hold at once.
        eng._admission_wait_s = 30.0
        ticket = eng.reserve()
        queued = eng.stream(greedy(tiny_llama, PROMPTS[2], 2))
        await asyncio.sleep(0.05)
        eng.release(ticket)
        eng.release(stuck)
        assert [ev async for ev in queued][-1].finish_reason == "length"
        assert sizes == [1, 1]


async def test_running_rows_never_wait_for_requests_being_routed(tiny_llama):
    """The hold applies to an idle engine only: a running stream keeps decoding while a place is
    reserved, and a request queued meanwhile joins at the next step."""
    async with running(tiny_llama, max_batch_size=8, admission_wait_s=30.0) as eng:
        first = eng.stream(greedy(tiny_llama, PROMPTS[0], 1000))
        await first.__anext__()
        ticket = eng.reserve()
        queued = eng.stream(greedy(tiny_llama, PROMPTS[1], 3))
        started = time.monotonic()
        for _ in range(5):
            await first.__anext__()
        assert [ev async for ev in queued][-1].finish_reason == "length"
        assert time.monotonic() - started < 10
        eng.release(ticket)
        await first.aclose()


async def test_requests_arriving_within_the_gap_share_the_first_prefill(tiny_llama):
    """Without reserved places too (requests queued straight into the engine): a request arriving within
    `arrival_gap_s` of the last one joins the held prefill; a lone request waits the gap, once."""
    before = metric("editserve_admission_waits_total", outcome="arrived")
    async with running(tiny_llama, max_batch_size=8, admission_wait_s=5.0, arrival_gap_s=0.3) as eng:
        sizes = record_admissions(eng)
        started = time.monotonic()
        streams = [eng.stream(greedy(tiny_llama, PROMPTS[1], 3))]
        for _ in range(2):
            await asyncio.sleep(0.05)
            streams.append(eng.stream(greedy(tiny_llama, PROMPTS[1], 3)))
        first = await streams[0].__anext__()
        assert first.token_ids and time.monotonic() - started >= 0.1 + 0.3
        for stream in streams:
            assert [ev async for ev in stream][-1].finish_reason == "length"
        assert sizes == [3]
        assert metric("editserve_admission_waits_total", outcome="arrived") == before + 1


async def test_a_full_batch_ends_the_hold(tiny_llama):
    before = metric("editserve_admission_waits_total", outcome="full")
    async with running(tiny_llama, max_batch_size=2, admission_wait_s=30.0, arrival_gap_s=30.0) as eng:
        sizes = record_admissions(eng)
        ticket = eng.reserve()  # a third request still being routed: it would not fit this step anyway
        streams = [eng.stream(greedy(tiny_llama, PROMPTS[1], 2)) for _ in range(2)]
        for stream in streams:
            assert [ev async for ev in stream][-1].finish_reason == "length"
        assert sizes == [2]
        assert metric("editserve_admission_waits_total", outcome="full") == before + 1
        eng.release(ticket)


async def test_no_hold_with_admission_wait_zero(tiny_llama):
    async with running(tiny_llama, max_batch_size=8, admission_wait_s=0.0, arrival_gap_s=30.0) as eng:
        sizes = record_admissions(eng)
        ticket = eng.reserve()
        events = [ev async for ev in eng.stream(greedy(tiny_llama, PROMPTS[1], 2))]
        assert events[-1].finish_reason == "length"
        assert sizes == [1]
        eng.release(ticket)


async def test_a_burst_that_fits_the_free_batch_slots_is_not_refused(tiny_llama):
    """The queue bound counts requests beyond the free batch slots: 8 requests arriving together at an
    idle engine with 8 slots are all taken, even with max_queue=1."""
    async with running(tiny_llama, max_batch_size=8, max_queue=1) as eng:
        streams = [eng.stream(greedy(tiny_llama, PROMPTS[i % len(PROMPTS)], 4)) for i in range(8)]
        for stream in streams:
            events = [ev async for ev in stream]
            assert events[-1].finish_reason == "length"


async def test_closing_or_cancelling_a_stream_frees_its_slot(engine, tiny_llama):
    stream = engine.stream(greedy(tiny_llama, PROMPTS[0], 1000))
    await stream.__anext__()
    await wait_until(lambda: engine.num_running == 1)
    await stream.aclose()
    await wait_until(lambda: engine.num_running == 0)

    async def consume() -> None:
        async for _ in engine.stream(greedy(tiny_llama, PROMPTS[1], 1000)):
            pass

    task = asyncio.create_task(consume())
    await wait_until(lambda: engine.num_running == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until(lambda: engine.num_running == 0)

    async def break_early() -> None:
        async for _ in engine.stream(greedy(tiny_llama, PROMPTS[2], 1000)):
            break  # the abandoned iterator is garbage: the sequence is cancelled too

    await break_early()
    await wait_until(lambda: engine.num_running == 0)


async def test_deadline_ends_the_stream(engine, tiny_llama):
    request = greedy(tiny_llama, PROMPTS[0], 1000)
    request.deadline = time.monotonic() + 0.5
    got = 0
    with pytest.raises(DeadlineExceeded):
        async for _ in engine.stream(request):
            got += 1
    assert 0 < got < 1000
    await wait_until(lambda: engine.num_running == 0)
    late = greedy(tiny_llama, PROMPTS[1], 4)
    late.deadline = time.monotonic() - 1
    with pytest.raises(DeadlineExceeded):
        await collect(engine, late)


async def test_requests_joining_a_running_batch_match_alone(engine, tiny_llama):
    alone = [tokens_of(await collect(engine, greedy(tiny_llama, p, 24))) for p in PROMPTS]
    batch_sizes_before = metric("editserve_batch_size_count")
    order: list[tuple[int, bool]] = []
    joined = asyncio.Event()

    async def run(i: int) -> list[int]:
        if i > 0:
            await joined.wait()
        tokens = []
        async for ev in engine.stream(greedy(tiny_llama, PROMPTS[i], 24)):
            tokens += ev.token_ids
            order.append((i, ev.finish_reason is not None))
            if i == 0 and len(tokens) == 5:
                joined.set()
        return tokens

    # Request 0 starts alone; the others arrive after its 5th token, while it is still decoding.
    results = await asyncio.gather(*[run(i) for i in range(len(PROMPTS))])
    assert results == alone
    first_of_late = min(order.index((i, False)) for i in range(1, len(PROMPTS)))
    assert order.index((0, True)) > first_of_late  # they really ran beside request 0
    assert metric("editserve_batch_size_count") > batch_sizes_before


async def test_engine_survives_a_forward_error(engine, tiny_llama):
    calls = {"n": 0, "fail_at": {1}}

    def flaky(_module, _args, _kwargs):
        calls["n"] += 1
        if calls["n"] in calls["fail_at"]:
            raise RuntimeError("injected forward failure")

    handle = tiny_llama.model.register_forward_pre_hook(flaky, with_kwargs=True)
    try:
        with pytest.raises(EngineError, match="injected"):  # the prefill fails
            await collect(engine, greedy(tiny_llama, PROMPTS[0], 6))
        calls["n"], calls["fail_at"] = 0, {4}
        got: list[TokenEvent] = []
        with pytest.raises(EngineError, match="injected"):  # a decode fails mid-stream
            async for ev in engine.stream(greedy(tiny_llama, PROMPTS[0], 6)):
                got.append(ev)
        assert len(got) == 3
        calls["fail_at"] = set()
        events = await collect(engine, greedy(tiny_llama, PROMPTS[0], 6))
        assert events[-1].finish_reason == "length"
    finally:
        handle.remove()
    assert engine.num_running == 0


async def test_engine_survives_a_failure_outside_the_forwards(engine, tiny_llama, monkeypatch):
    def broken_concat(self, other, config):
        raise RuntimeError("injected merge failure")

    running_stream = engine.stream(greedy(tiny_llama, PROMPTS[0], 1000))
    await running_stream.__anext__()
    monkeypatch.setattr(KVState, "concat", broken_concat)
    with pytest.raises(EngineError, match="injected merge failure"):  # the newcomer that needed the merge
        await collect(engine, greedy(tiny_llama, PROMPTS[1], 6))
    with pytest.raises(EngineError, match="injected merge failure"):  # and the row it was merging into
        async for _ in running_stream:
            pass
    monkeypatch.undo()
    events = await collect(engine, greedy(tiny_llama, PROMPTS[1], 6))
    assert events[-1].finish_reason == "length"
    await wait_until(lambda: engine.num_running == 0)


async def test_score_equals_manual_log_softmax(engine, tiny_llama):
    prompt, cont = ids_of(tiny_llama, PROMPTS[1]), ids_of(tiny_llama, " Paris, of course")
    out = await engine.score(prompt, cont)
    with torch.no_grad():
        logits = tiny_llama.model(input_ids=torch.tensor([prompt + cont])).logits[0]
    logp = logits.float().log_softmax(-1)[len(prompt) - 1 : -1]
    expected = logp.gather(1, torch.tensor(cont)[:, None]).squeeze(1)
    assert out.logprobs == pytest.approx(expected.tolist(), abs=1e-4)
    assert out.greedy == (logp.argmax(-1) == torch.tensor(cont)).tolist()
    assert out.argmax == logp.argmax(-1).tolist()  # the argmax token, also where it is not the scored one
    assert (out.edit_version, out.hook_fires) == (0, {})
    with pytest.raises(InvalidArgument):
        await engine.score([], cont)


def test_score_batch_rows_equal_scores_alone(tiny_llama):
    """A left-padded batch of scores gives each row what its own forward gives, hooks per row."""
    model = tiny_llama.model
    hooks = HookManager(model, [HOOK_LAYER])
    try:
        runner = ModelRunner(tiny_llama, hooks)
        subject = ids_of(tiny_llama, "The Eiffel Tower is in")
        key = hooks.keys_at([HOOK_LAYER], torch.tensor([subject]))[HOOK_LAYER][0, 3]
        value = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(1)) * 5
        hooks.publish(HookTable.build([HookEntry("eiffel", HOOK_LAYER, key, value, 0.9999)], version=3))
        jobs = [
            (subject, ids_of(tiny_llama, " Paris, of course"), True),
            (ids_of(tiny_llama, PROMPTS[1]), ids_of(tiny_llama, " no"), True),
            (subject, ids_of(tiny_llama, " Paris, of course"), False),
            (ids_of(tiny_llama, PROMPTS[0]) * 2, ids_of(tiny_llama, " a b c d e f"), True),
        ]
        batched = runner.score_batch(jobs)
        for job, got in zip(jobs, batched, strict=True):
            alone = runner.score(*job)
            assert got.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
            assert got.greedy == alone.greedy and got.hook_fires.keys() == alone.hook_fires.keys()
            assert got.argmax == alone.argmax
            assert got.edit_version == 3
        assert set(batched[0].hook_fires) == {"eiffel"} and batched[2].hook_fires == {}
        assert batched[0].logprobs != pytest.approx(batched[2].logprobs, abs=1e-3)  # the edit changed row 0
    finally:
        hooks.uninstall()


async def test_concurrent_scores_share_forwards(engine, tiny_llama, monkeypatch):
    """Scores queued together run as one batch (not one forward each) and each gets its own answer."""
    sizes: list[int] = []
    runner = engine._runner
    original = runner.score_batch

    def spy(jobs):
        sizes.append(len(jobs))
        return original(jobs)

    monkeypatch.setattr(runner, "score_batch", spy)
    conts = [ids_of(tiny_llama, t) for t in (" Paris", " Rome, Italy", " Berlin is far", " x")]
    prompt = ids_of(tiny_llama, PROMPTS[1])
    outs = await asyncio.gather(*(engine.score(prompt, c) for c in conts))
    for cont, out in zip(conts, outs, strict=True):
        alone = original([(prompt, cont, True)])[0]
        assert out.logprobs == pytest.approx(alone.logprobs, abs=1e-4)
    assert sum(sizes) == len(conts) and max(sizes) > 1


async def test_stop_cancels_what_outlives_the_grace_period(tiny_llama):
    eng = Engine(tiny_llama)
    await eng.start()
    stream = eng.stream(greedy(tiny_llama, PROMPTS[0], 1000))
    await stream.__anext__()
    await eng.stop(grace_s=0.1)
    rest = [ev async for ev in stream]
    assert rest[-1].finish_reason == "cancelled" and rest[-1].completion_tokens < 1000
    with pytest.raises(Unavailable):
        eng.stream(greedy(tiny_llama, PROMPTS[0], 4))


async def test_metrics_are_updated(engine, tiny_llama):
    names = [
        "editserve_time_to_first_token_seconds_count",
        "editserve_inter_token_latency_seconds_count",
        "editserve_queue_time_seconds_count",
        "editserve_prompt_tokens_total",
        "editserve_generation_tokens_total",
    ]
    before = {n: metric(n) for n in names}
    prompt = ids_of(tiny_llama, PROMPTS[1])
    await collect(engine, EngineRequest(prompt, SamplingParams(max_new_tokens=5)))
    delta = {n: metric(n) - before[n] for n in names}
    assert delta == {
        "editserve_time_to_first_token_seconds_count": 1,
        "editserve_inter_token_latency_seconds_count": 4,
        "editserve_queue_time_seconds_count": 1,
        "editserve_prompt_tokens_total": len(prompt),
        "editserve_generation_tokens_total": 5,
    }
    # the last token reaches the caller before the scheduler reaps the sequence: the gauge follows
    await wait_until(lambda: metric("editserve_num_requests_running") == 0)


# ---------------------------------------------------------------------------------------------- hooks

HOOK_LAYER = 1


async def test_hook_fires_are_reported_per_request(tiny_llama):
    model = tiny_llama.model
    subject = ids_of(tiny_llama, "The Eiffel Tower is located in the city of")
    other = ids_of(tiny_llama, "Completely unrelated words about cooking pasta at home tonight")
    hooks = HookManager(model, [HOOK_LAYER])
    try:
        async with running(tiny_llama, hooks) as eng:
            plain = tokens_of(await collect(eng, EngineRequest(subject, SamplingParams(max_new_tokens=8))))
            key = hooks.keys_at([HOOK_LAYER], torch.tensor([subject]))[HOOK_LAYER][0, 3]
            value = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
            hooks.publish(HookTable.build([HookEntry("eiffel", HOOK_LAYER, key, value, 0.9999)], version=7))
            fires_before = metric("editserve_hook_fires_total")

            def req(ids: list[int], use_hooks: bool) -> EngineRequest:
                return EngineRequest(ids, SamplingParams(max_new_tokens=8), use_hooks=use_hooks)

            # Batched together: the shorter prompt is left-padded, and fires go to their own row only.
            edited, unrelated, disabled = await asyncio.gather(
                collect(eng, req(subject, True)),
                collect(eng, req(other, True)),
                collect(eng, req(subject, False)),
            )
            assert set(edited[-1].hook_fires) == {"eiffel"}
            assert edited[-1].hook_fires["eiffel"] == pytest.approx(1.0, abs=1e-4)
            assert edited[-1].edit_version == 7 and disabled[-1].edit_version == 7
            assert unrelated[-1].hook_fires == {} and disabled[-1].hook_fires == {}
            assert tokens_of(disabled) == plain  # the gate was off for that row only
            assert tokens_of(edited) != plain  # the value really changed the continuation
            assert metric("editserve_hook_fires_total") > fires_before
            scored = await eng.score(subject, tokens_of(edited))
            assert scored.edit_version == 7 and set(scored.hook_fires) == {"eiffel"}
            assert all(scored.greedy)
            unscored = await eng.score(subject, tokens_of(edited), use_hooks=False)
            assert unscored.hook_fires == {} and not all(unscored.greedy)
    finally:
        hooks.uninstall()


async def test_deferred_gate_decisions_match_the_synchronous_gate(tiny_llama):
    """The CUDA decode path (Recorder.defer: no read-back inside the forward, decisions fetched with the
    sampled ids) gives the same tokens and the same reported fires as the CPU path, prefill and decode."""
    model = tiny_llama.model
    subject = ids_of(tiny_llama, "The Eiffel Tower is located in the city of")
    other = ids_of(tiny_llama, "Completely unrelated words about cooking pasta at home tonight")
    hooks = HookManager(model, [HOOK_LAYER])
    gen = torch.Generator().manual_seed(1)
    d_model = model.config.hidden_size
    try:
        key = hooks.keys_at([HOOK_LAYER], torch.tensor([subject]))[HOOK_LAYER][0, 3]
        hooks.publish(HookTable.build([
            HookEntry("eiffel", HOOK_LAYER, key, torch.randn(d_model, generator=gen) * 5, 0.9999),
            # fires at every token where "eiffel" does not win, decode steps included
            HookEntry("everywhere", HOOK_LAYER, torch.randn(key.shape[0], generator=gen),
                      torch.randn(d_model, generator=gen) * 0.5, -1.0),
        ], version=3))
        results = {}
        for defer in (False, True):
            async with running(tiny_llama, hooks) as eng:
                eng._runner.defer_fires = defer
                outs = await asyncio.gather(*(
                    collect(eng, EngineRequest(ids, SamplingParams(max_new_tokens=8), use_hooks=use))
                    for ids, use in ((subject, True), (other, True), (subject, False))
                ))
                sampled = await collect(eng, EngineRequest(subject, SamplingParams(
                    max_new_tokens=8, temperature=0.8, seed=5)))
                results[defer] = (
                    [tokens_of(o) for o in outs] + [tokens_of(sampled)],
                    [o[-1].hook_fires for o in outs],
                )
        assert results[True][0] == results[False][0]
        fires_sync, fires_deferred = results[False][1], results[True][1]
        assert [set(f) for f in fires_deferred] == [set(f) for f in fires_sync]
        for a, b in zip(fires_deferred, fires_sync, strict=True):
            assert all(a[k] == pytest.approx(b[k], abs=1e-6) for k in a)
        assert set(fires_sync[0]) == {"eiffel", "everywhere"} and fires_sync[2] == {}
    finally:
        hooks.uninstall()


async def test_a_request_keeps_its_edit_set_while_a_new_one_is_published(tiny_llama):
    """A stream pins the hook table it started with: a publish mid-stream changes neither its tokens nor
    its reported version, while a request that starts after the publish, decoded in the same batch, gets
    the new table (one forward, two tables)."""
    model = tiny_llama.model
    prompt = ids_of(tiny_llama, "The Eiffel Tower is located in the city of")
    hooks = HookManager(model, [HOOK_LAYER])
    gen = torch.Generator().manual_seed(3)
    d_ff = hooks.d_ff
    everywhere = HookEntry("everywhere", HOOK_LAYER, torch.randn(d_ff, generator=gen),
                           torch.randn(model.config.hidden_size, generator=gen) * 3, -1.0)
    old, new = HookTable.build([], version=1), HookTable.build([everywhere], version=2)
    params = SamplingParams(max_new_tokens=64, min_new_tokens=64)
    try:
        async with running(tiny_llama, hooks, max_batch_size=8) as eng:
            hooks.publish(old)
            ref_old = tokens_of(await collect(eng, EngineRequest(prompt, params)))
            hooks.publish(new)
            ref_new = tokens_of(await collect(eng, EngineRequest(prompt, params)))
            assert ref_old != ref_new
            hooks.publish(old)
            mixed: list[int] = []
            original = eng._runner.decode

            def spy(state, last_tokens, enabled, tables, *rest):
                mixed.append(len({id(t) for t in tables}))
                return original(state, last_tokens, enabled, tables, *rest)

            eng._runner.decode = spy
            stream = eng.stream(EngineRequest(prompt, params)).__aiter__()
            events = [await stream.__anext__()]
            hooks.publish(new)
            late = asyncio.create_task(collect(eng, EngineRequest(prompt, params)))
            events += [ev async for ev in stream]
            late_events = await late
            assert tokens_of(events) == ref_old and events[-1].edit_version == 1
            assert tokens_of(late_events) == ref_new and late_events[-1].edit_version == 2
            assert "everywhere" in late_events[-1].hook_fires and events[-1].hook_fires == {}
            assert 2 in mixed  # the two requests shared decode forwards
    finally:
        hooks.uninstall()


async def test_a_vanishing_temperature_is_greedy(engine, tiny_llama):
    """1e-40 would overflow logits / temperature (INTERNAL before): below 1e-5 the request is greedy."""
    prompt = ids_of(tiny_llama, "The Eiffel Tower is located in the city of")
    greedy = tokens_of(await collect(engine, EngineRequest(prompt, SamplingParams(max_new_tokens=6))))
    for t in (1e-45, 1e-40, 1e-37, 1e-6):
        params = SamplingParams(max_new_tokens=6, temperature=t, seed=1)
        assert tokens_of(await collect(engine, EngineRequest(prompt, params))) == greedy


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the killed worker
async def test_engine_health_reflects_its_worker(tiny_llama):
    """Unhealthy after 3 failed forwards in a row (a success resets it) and when the worker thread died."""
    prompt, cont = ids_of(tiny_llama, "The capital of France is"), ids_of(tiny_llama, " Paris")
    async with running(tiny_llama) as eng:
        assert eng.healthy
        original = eng._runner.score_batch

        def broken(jobs):
            raise RuntimeError("boom")

        eng._runner.score_batch = broken
        for _ in range(3):
            with pytest.raises(EngineError):
                await eng.score(prompt, cont)
        assert not eng.healthy
        eng._runner.score_batch = original
        await eng.score(prompt, cont)
        assert eng.healthy

        def die() -> None:
            raise SystemExit  # the worker thread ends, as if killed

        eng._step = die
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(eng.score(prompt, cont), 1.0)
        await asyncio.to_thread(eng._thread.join, 5)
        assert not eng.healthy

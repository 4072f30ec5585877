"""Hook layers on a tiny random Llama: exactness, gating, thread-locality, table scale (fast)."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode

from service.errors import InvalidArgument
from service.hooks.calibration import key_activations
from service.hooks.editor import CONTEXT_PREFIXES, Editor, EditSpec, QualityReport
from service.hooks.keys import SINK_POSITIONS, calibrate_threshold
from service.hooks.layer import HookEntry, HookManager, HookTable, decoder_layers
from service.hooks.layer import param_checksum as param_hash
from service.hooks.quality import greedy_continuation

LAYER = 1


@pytest.fixture
def tiny(tiny_llama):
    return tiny_llama.model, tiny_llama.tokenizer


@pytest.fixture
def hooks(tiny):
    mgr = HookManager(tiny[0], [LAYER, 2])
    yield mgr
    mgr.uninstall()


def batch(tok, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = tok(texts, return_tensors="pt", padding=True)
    return enc["input_ids"], enc["attention_mask"]


def logits(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def mlp_io(model, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(down_proj input, original MLP output) for an MLP input x, computed with the original modules."""
    mlp = decoder_layers(model)[layer].mlp
    h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    return h, mlp.down_proj(h)


def entry(
    key: torch.Tensor, value: torch.Tensor, thr: float, layer: int = LAYER, eid: str = "e"
) -> HookEntry:
    return HookEntry(eid, layer, key.detach().float(), value.detach(), thr)


def test_empty_table_is_bit_exact_and_weights_untouched(tiny):
    model, tok = tiny
    ids, mask = batch(tok, ["The Eiffel Tower is in", "Hello there, how are you today?"])
    before_hash, before_keys = param_hash(model), list(model.state_dict())
    ref = logits(model, ids, mask)
    mgr = HookManager(model, [0, LAYER, 3])
    try:
        assert list(model.state_dict()) == before_keys  # names unchanged while installed
        assert torch.equal(logits(model, ids, mask), ref)
        mgr.publish(HookTable.build([entry(torch.randn(128), torch.randn(64), 0.99)], version=1))
        mgr.publish(mgr.empty_table(version=2))
        out = logits(model, ids, mask)
        assert (out - ref).abs().max().item() <= 1e-6
        assert mgr.current.version == 2
    finally:
        mgr.uninstall()
    assert all(not type(b.mlp).__name__.startswith("Hooked") for b in decoder_layers(model))
    assert torch.equal(logits(model, ids, mask), ref)
    assert param_hash(model) == before_hash


def test_entry_fires_exactly_on_its_token_and_adds_value(tiny, hooks):
    model, _ = tiny
    torch.manual_seed(1)
    x = torch.randn(1, 6, 64)
    h, ref = mlp_io(model, LAYER, x)
    value = torch.randn(64)
    hooks.publish(HookTable.build([entry(h[0, 2] * 3.0, value, 0.999)]))  # scale-free: cosine gate
    with torch.no_grad(), hooks.recording() as rec:
        out = decoder_layers(model)[LAYER].mlp(x)
    assert [(f.row, f.position, f.edit_id, f.layer) for f in rec.fires] == [(0, 2, "e", LAYER)]
    assert rec.fires[0].score == pytest.approx(1.0, abs=1e-5)
    diff = out - ref
    assert torch.allclose(diff[0, 2], value, atol=1e-5)
    diff[0, 2] = 0
    assert diff.abs().max().item() == 0.0
    # the gate also applies outside any recording context
    with torch.no_grad():
        assert torch.equal(decoder_layers(model)[LAYER].mlp(x), out)


def test_full_model_fires_at_token_and_changes_only_later_positions(tiny, hooks):
    model, tok = tiny
    ids, mask = batch(tok, ["The Eiffel Tower is located in the city of"])
    ref = logits(model, ids, mask)
    acts = hooks.keys_at([LAYER], ids, mask)[LAYER]
    assert acts.shape == (1, ids.shape[1], 128)
    hooks.publish(HookTable.build([entry(acts[0, 3], torch.randn(64) * 5, 0.9999)]))
    with hooks.recording() as rec:
        out = logits(model, ids, mask)
    assert [(f.row, f.position) for f in rec.fires] == [(0, 3)]
    assert torch.equal(out[0, :3], ref[0, :3])
    assert not torch.allclose(out[0, 3:], ref[0, 3:])


def test_row_enabled_masks_a_row(tiny, hooks):
    model, _ = tiny
    x = torch.randn(1, 5, 64).expand(2, 5, 64).contiguous()
    h, ref = mlp_io(model, LAYER, x)
    hooks.publish(HookTable.build([entry(h[0, 1], torch.ones(64), 0.999)]))
    with torch.no_grad(), hooks.recording(torch.tensor([True, False])) as rec:
        out = decoder_layers(model)[LAYER].mlp(x)
    assert [(f.row, f.position) for f in rec.fires] == [(0, 1)]
    assert torch.equal(out[1], ref[1])
    assert torch.allclose(out[0, 1] - ref[0, 1], torch.ones(64), atol=1e-5)
    rec2_offset = 10
    with torch.no_grad(), hooks.recording() as rec2:
        rec2.position_offset = [rec2_offset, 0]
        decoder_layers(model)[LAYER].mlp(x)
    assert sorted((f.row, f.position) for f in rec2.fires) == [(0, 1 + rec2_offset), (1, 1)]


def test_argmax_then_threshold(tiny, hooks):
    """Only the best-scoring key may fire; a better key below its own threshold blocks a weaker one."""
    model, _ = tiny
    x = torch.randn(1, 4, 64)
    h, ref = mlp_io(model, LAYER, x)
    k = h[0, 0]
    near = k + 0.3 * k.norm() / 128**0.5 * torch.randn(128)
    table = HookTable.build(
        [entry(near, torch.ones(64), 0.5, eid="weak"), entry(k, torch.ones(64) * 2, 1.01, eid="strict")]
    )
    hooks.publish(table)
    with torch.no_grad(), hooks.recording() as rec:
        out = decoder_layers(model)[LAYER].mlp(x)
    assert rec.fires == [] and torch.equal(out, ref)


def run_in_thread(fn) -> object:
    box: dict[str, object] = {}

    def target() -> None:
        box["v"] = fn()

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return box["v"]


def test_disabled_intervention_override_are_thread_local(tiny, hooks):
    model, tok = tiny
    ids, mask = batch(tok, ["The Eiffel Tower is located in the city of"])
    ref = logits(model, ids, mask)
    acts = hooks.keys_at([LAYER], ids, mask)[LAYER]
    hooks.publish(HookTable.build([entry(acts[0, 3], torch.randn(64) * 5, 0.9999)]))
    edited = logits(model, ids, mask)
    assert not torch.allclose(edited, ref)

    with hooks.disabled():
        assert torch.equal(logits(model, ids, mask), ref)
        assert torch.equal(run_in_thread(lambda: logits(model, ids, mask)), edited)

    delta = torch.randn(64, requires_grad=True)
    with hooks.intervention(LAYER, [(0, 5)], delta):
        out = model(input_ids=ids, attention_mask=mask).logits
        out[0, -1].sum().backward()  # gradient flows into the delta only
        assert delta.grad is not None and delta.grad.abs().sum() > 0
        assert not torch.allclose(out[0, 5:].detach(), ref[0, 5:])
        assert torch.equal(out[0, :5].detach(), ref[0, :5])  # table gated off inside an intervention
        assert torch.equal(run_in_thread(lambda: logits(model, ids, mask)), edited)
    assert all(p.grad is None for p in model.parameters())

    with hooks.table_override(hooks.empty_table()):
        assert torch.equal(logits(model, ids, mask), ref)
        assert torch.equal(run_in_thread(lambda: logits(model, ids, mask)), edited)
    assert torch.equal(logits(model, ids, mask), edited)

    with hooks.capture_keys(2) as cap:
        assert run_in_thread(lambda: logits(model, ids, mask)) is not None
        assert cap.value is None  # another thread's forward is not captured here
        logits(model, ids, mask)
        assert cap.value is not None and cap.value.shape == (1, ids.shape[1], 128)


class MatmulShapes(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in ("matmul", "__matmul__", "mm") and len(args) == 2:
            self.shapes.append((tuple(args[0].shape), tuple(args[1].shape)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bfloat16", [False, True], ids=["int8", "bfloat16"])
def test_ten_thousand_entries_build_and_gate_in_one_matmul(tiny, hooks, bfloat16, monkeypatch):
    """One ranking matmul per hooked layer over all 10,000 keys: the exact float32 one for a prefill when
    the prefilter is int8, the bfloat16 prefilter's when it is bfloat16 (it ranks prefills too)."""
    from service.hooks import table as table_module

    if bfloat16 and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(table_module, "native_bfloat16", lambda: bfloat16)
    ranked: list[tuple[int, ...]] = []
    scores = table_module.Prefilter.scores
    monkeypatch.setattr(table_module.Prefilter, "scores",
                        lambda self, unit: ranked.append(tuple(unit.shape)) or scores(self, unit))
    model, tok = tiny
    ids, mask = batch(tok, ["The Eiffel Tower is located in the city of", "Hi"])
    acts = hooks.keys_at([LAYER], ids, mask)[LAYER]
    n = 10_000
    keys = torch.randn(n, 128)
    keys[1234] = acts[0, 4]
    entries = [HookEntry(f"e{i}", LAYER, keys[i], torch.randn(64), 0.9999) for i in range(n)]
    table = HookTable.build(entries, version=7)
    lt = table.layer(LAYER)
    assert lt is not None and lt.keys.shape == (n, 128) and lt.values.shape == (n, 64)
    assert lt.thresholds.shape == (n,) and len(table) == n and table.version == 7
    assert torch.allclose(lt.keys.norm(dim=-1), torch.ones(n), atol=1e-5)
    assert table.edit_ids[:2] == ("e0", "e1")
    hooks.publish(table)
    mode = MatmulShapes()
    with torch.no_grad(), hooks.recording() as rec, mode:
        model(input_ids=ids, attention_mask=mask)
    gate = [s for s in mode.shapes if s[1] == (128, n)]
    if bfloat16:  # one matmul per hooked layer with entries
        assert gate == [] and ranked == [(ids.numel(), 128)]
    else:
        assert gate == [((ids.numel(), 128), (128, n))] and ranked == []
    assert [(f.row, f.position, f.edit_id) for f in rec.fires] == [(0, 4, "e1234")]


@pytest.mark.parametrize("bfloat16", [False, True], ids=["int8", "bfloat16"])
def test_decode_prefilter_picks_the_exact_gate_decisions(bfloat16, monkeypatch):
    """Large tables rank keys in low precision (int8, or packed bfloat16 on a CPU that multiplies it
    natively) for decode-sized inputs, then score the best exactly: the fired row and its score equal the
    full float32 gate's, also after extending the table and removing rows."""
    from service.edits.convert import without
    from service.hooks import table as table_module
    from service.hooks.gate import best_keys
    from service.hooks.table import PREFILTER_MAX_TOKENS, PREFILTER_MIN_ENTRIES

    if bfloat16 and not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(table_module, "native_bfloat16", lambda: bfloat16)  # either kind runs on any CPU

    gen = torch.Generator().manual_seed(0)
    n, d = PREFILTER_MIN_ENTRIES + 500, 128
    keys = torch.randn(n, d, generator=gen)
    entries = [HookEntry(f"e{i}", LAYER, keys[i], torch.randn(64, generator=gen), 0.6) for i in range(n)]
    small = HookTable.build(entries[:100]).layer(LAYER)
    assert small is not None and small.prefilter is None  # small tables: the exact matmul only
    table = HookTable.build(entries[:-10]).extended(entries[-10:])
    lt = table.layer(LAYER)
    assert lt is not None and lt.prefilter is not None
    assert (lt.prefilter.packed is not None) == bfloat16 and (lt.prefilter.int8 is not None) != bfloat16
    approx = lt.prefilter.scores(torch.nn.functional.normalize(keys[:4], dim=-1))
    assert approx.shape == (4, n) and (approx.float().diagonal() - 1).abs().max() < 1e-2
    # queries near planted keys (fire), between two keys (near-tie) and random (no fire)
    queries = torch.cat(
        [
            keys[[5, n - 3, 700]] + 0.3 * torch.randn(3, d, generator=gen),
            keys[[11]] + keys[[12]],
            torch.randn(PREFILTER_MAX_TOKENS - 4, d, generator=gen),
        ]
    )
    unit = torch.nn.functional.normalize(queries, dim=-1)
    exact_best, exact_idx = (unit @ lt.keys.T).max(dim=-1)
    best, idx = best_keys(lt, unit)
    assert torch.equal(idx, exact_idx) and torch.allclose(best, exact_best, atol=1e-6)
    assert (best >= lt.thresholds[idx]).sum() >= 3  # the planted ones do fire
    gone = without(table, ["e5", "e700"], version=2).layer(LAYER)
    assert gone is not None and gone.prefilter is not None and len(gone) == n - 2
    best2, idx2 = best_keys(gone, unit)
    exact2, eidx2 = (unit @ gone.keys.T).max(dim=-1)
    assert torch.equal(idx2, eidx2) and torch.allclose(best2, exact2, atol=1e-6)
    assert "e5" not in {gone.ids[i] for i in idx2.tolist()}


def test_table_checks_and_extension(hooks):
    with pytest.raises(ValueError):
        hooks.publish(HookTable.build([HookEntry("x", 0, torch.randn(128), torch.randn(64), 0.5)]))
    with pytest.raises(ValueError):
        hooks.publish(HookTable.build([HookEntry("x", LAYER, torch.randn(99), torch.randn(64), 0.5)]))
    base = HookTable.build(
        [HookEntry(f"a{i}", LAYER, torch.randn(128), torch.randn(64), 0.5) for i in range(3)]
    )
    ext = base.extended([HookEntry("b", 2, torch.randn(128), torch.randn(64), 0.5)], version=4)
    assert ext.edit_ids == ("a0", "a1", "a2", "b") and ext.version == 4 and ext.num_entries == 4
    assert len(base) == 3 and base.layer(2) is None


def test_quality_report_round_trip_and_threshold_rule():
    r = QualityReport(True, "Paris", -0.1, -9.0, [("p", True), ("q", False)], 0.0, 0.0, 0.7, 1.2, True, "ok")
    again = QualityReport.from_dict(json.loads(json.dumps(r.to_dict())))
    assert again == r
    thr, msg = calibrate_threshold(torch.tensor([0.9, 0.8]), torch.tensor([0.2, 0.4]))
    assert thr == pytest.approx(0.6) and msg == ""
    thr, msg = calibrate_threshold(torch.tensor([0.9, 0.3]), torch.tensor([0.4]))
    assert thr == pytest.approx(0.401) and "1 of 2" in msg


def test_editor_validate(tiny, hooks):
    ed = Editor(tiny[0], tiny[1], hooks)
    ok = EditSpec("The Eiffel Tower", "The Eiffel Tower is located in", "Rome", [])
    ed.validate(ok)
    cases = [
        (EditSpec("", ok.prompt, "Rome", []), "subject"),
        (EditSpec(ok.subject, "  ", "Rome", []), "prompt"),
        (EditSpec(ok.subject, ok.prompt, "", []), "target_new"),
        (EditSpec("The Louvre", ok.prompt, "Rome", []), "prompt"),
        (EditSpec(ok.subject, ok.prompt, "Rome " * 40, []), "target_new"),
        (EditSpec(ok.subject, ok.prompt, "Rome", [""]), "paraphrases"),
    ]
    for spec, field in cases:
        with pytest.raises(InvalidArgument) as err:
            ed.validate(spec)
        assert err.value.field == field


def test_editor_compute_end_to_end_on_tiny_model(tiny, hooks):
    """The pipeline runs, returns one entry per hooked layer, publishes nothing, writes no weight."""
    model, tok = tiny
    before = param_hash(model)
    published = hooks.current
    ed = Editor(model, tok, hooks, max_steps=3)
    spec = EditSpec(
        "The Eiffel Tower",
        "The Eiffel Tower is located in the city of",
        "Rome",
        ["Where is the Eiffel Tower? It is in"],
    )
    ce = ed.compute(spec)
    assert [e.layer for e in ce.entries] == [LAYER, 2]
    assert all(e.key.shape == (128,) and e.value.shape == (64,) and e.edit_id == "" for e in ce.entries)
    assert ce.with_id("abc").entries[0].edit_id == "abc"
    assert hooks.current is published
    r = ce.report
    assert len(r.paraphrases) == 1 and r.compute_seconds > 0 and isinstance(r.passed, bool)
    json.dumps(r.to_dict())
    hooks.publish(HookTable.build([e.with_id("abc") for e in ce.entries], version=1))
    batch_out = ed.compute_many([spec, EditSpec("Paris", "Paris is the capital of", "Peru", [])])
    assert len(batch_out) == 2
    assert param_hash(model) == before
    assert all(p.grad is None for p in model.parameters())


def test_serving_context_joins_the_value_fit_only(tiny, hooks, monkeypatch):
    """EditSpec.serving_contexts add rows to v*'s problem (subject = the prompt's mention, after the
    context's own) and leave the first layer's key and threshold alone."""
    from service.hooks import editor as editor_mod
    from service.hooks import values as ed_mod

    model, tok = tiny
    problems = []

    def spy(model_, hooks_, layers, problem, ref_norm, *args, **kw):
        problems.append(problem)
        return fit_delta(model_, hooks_, layers, problem, ref_norm, *args, **kw)

    fit_delta = ed_mod.compute_delta
    monkeypatch.setattr(editor_mod, "compute_delta", spy)  # the editor's reference to it
    ed = Editor(model, tok, hooks, max_steps=3)
    prompt = "The Eiffel Tower is located in the city of"
    block = f"[Updated Information]\n- {prompt} Rome.\n[End of Updated Information]\n\n"
    plain = ed.compute(EditSpec("The Eiffel Tower", prompt, "Rome"))
    served = ed.compute(EditSpec("The Eiffel Tower", prompt, "Rome", serving_contexts=[block]))
    assert [p.n_ctx for p in problems] == [len(CONTEXT_PREFIXES), len(CONTEXT_PREFIXES) + 1]
    assert [p.n_serving for p in problems] == [0, 1]  # fitted, but not in the early stop's NLL
    row = problems[1].rows[len(CONTEXT_PREFIXES)]
    target = tok(" Rome", add_special_tokens=False)["input_ids"]
    assert row.ids == tok(block + prompt)["input_ids"] + target[:-1]
    assert row.subject is not None and row.subject[0] > len(tok(block)["input_ids"]) - 1
    assert problems[1].rows[: len(CONTEXT_PREFIXES)] == problems[0].rows[: len(CONTEXT_PREFIXES)]
    first_plain, first_served = plain.entries[0], served.entries[0]
    assert first_plain.layer == first_served.layer == LAYER
    torch.testing.assert_close(first_plain.key, first_served.key)
    assert first_plain.threshold == first_served.threshold
    assert not torch.equal(first_plain.value, first_served.value)


def test_subject_at_text_start_gets_its_own_entry(tiny, hooks):
    """A subject ending within the first SINK_POSITIONS tokens of a context ("Paris is ..." with the bare
    prefix) is keyed apart: one main entry from the other contexts and one start-of-text entry per layer,
    both carrying the same delta; that key is the start row's activation and its gate opens there."""
    model, tok = tiny
    ed = Editor(model, tok, hooks, max_steps=2)
    ce = ed.compute(EditSpec("Paris", "Paris is the capital of", "Peru"))
    assert [e.layer for e in ce.entries] == [LAYER, LAYER, 2, 2]
    for main, start in (ce.entries[0:2], ce.entries[2:4]):
        assert torch.equal(main.value, start.value)
        assert not torch.allclose(main.key, start.key)
    prep = ed._prepare(EditSpec("Paris", "Paris is the capital of", "Peru"))
    bare = prep.ctx[CONTEXT_PREFIXES.index("")]
    assert bare.subject is not None and bare.subject[1] < SINK_POSITIONS
    act = key_activations(ed.hooks, LAYER, [bare], ed.pad_id)[0][bare.subject[1]]
    start = ce.entries[1]
    assert torch.allclose(start.key, act, atol=1e-5)
    assert float(torch.nn.functional.cosine_similarity(act, start.key, dim=0)) >= start.threshold
    # No context puts the subject at the start, but its KL row "Paris is a" does: a later question that
    # begins with the subject is keyed by that row.
    mid = ed.compute(EditSpec("Paris", "Everyone knows that Paris is the capital of", "Peru"))
    assert [e.layer for e in mid.entries] == [LAYER, LAYER, 2, 2]
    kl = ed._prepare(EditSpec("Paris", "Everyone knows that Paris is the capital of", "Peru")).kl
    assert kl.subject is not None
    kl_act = key_activations(ed.hooks, LAYER, [kl], ed.pad_id)[0][kl.subject[1]]
    assert torch.allclose(mid.entries[1].key, kl_act, atol=1e-5)
    # A subject that ends past the sink positions everywhere gets the main entry alone.
    long_subject = "the old stone bridge over the river"
    far = ed.compute(EditSpec(long_subject, f"Everyone knows that {long_subject} is in", "Peru"))
    assert [e.layer for e in far.entries] == [LAYER, 2]


def test_nested_interventions_add_up_and_unwind(tiny, hooks):
    model, _ = tiny
    x = torch.randn(1, 3, 64)
    _, ref = mlp_io(model, LAYER, x)
    a, b = torch.randn(64), torch.randn(64)
    mlp = decoder_layers(model)[LAYER].mlp
    with torch.no_grad(), hooks.intervention(LAYER, [(0, 1)], a):
        with hooks.intervention(LAYER, [(0, 1), (0, 2)], torch.stack([b, b])):
            out = mlp(x)
        assert torch.allclose(out[0, 1] - ref[0, 1], a + b, atol=1e-5)
        assert torch.allclose(out[0, 2] - ref[0, 2], b, atol=1e-5)
        out = mlp(x)
        assert torch.allclose(out[0, 1] - ref[0, 1], a, atol=1e-5) and torch.equal(out[0, 2], ref[0, 2])
    with torch.no_grad():
        assert torch.equal(mlp(x), ref)


def test_v_star_layer_walk_matches_the_full_forward(tiny, hooks):
    """v* runs only the layers from the lowest hooked one up; the result equals the model's own forward."""
    from service.hooks import rows as rows_mod
    from service.hooks import values as ed_mod

    model, tok = tiny
    hooks.publish(HookTable.build([entry(torch.randn(128), torch.randn(64), 0.2, eid="old")], version=1))
    ed = Editor(model, tok, hooks, max_steps=4)
    spec = EditSpec("The Eiffel Tower", "Note that The Eiffel Tower is located in the city of", "Rome")
    prep = ed._prepare(spec)
    problem = ed_mod.DeltaProblem(
        rows=[rows_mod.Row(r.ids + prep.target_ids[:-1], r.subject) for r in prep.ctx] + [prep.kl],
        n_ctx=len(prep.ctx),
        prompt_lens=[len(r.ids) for r in prep.ctx],
        target_ids=prep.target_ids,
    )
    fits = {}
    for walk in (True, False):
        ed_mod._SuffixRunner._verified[model] = walk
        fits[walk] = ed_mod.compute_delta(model, hooks, hooks.layers, problem, 1.0, max_steps=4)
    del ed_mod._SuffixRunner._verified[model]
    ed_mod.compute_delta(model, hooks, hooks.layers, problem, 1.0, max_steps=0)
    assert ed_mod._SuffixRunner._verified[model] is True  # the Llama layout passes the check
    for layer in hooks.layers:
        torch.testing.assert_close(fits[True].deltas[layer], fits[False].deltas[layer], atol=1e-5, rtol=1e-4)
    assert fits[True].stats["steps"] == fits[False].stats["steps"]
    # The first step's argmax is the unedited greedy answer's first token (with the published table).
    bare = ed.contexts.index("")
    greedy = greedy_continuation(ed.model, ed.tok, hooks, prep.ctx[bare].ids, 1, hooks.current)
    assert fits[True].initial_argmax[bare] == greedy[0]


def test_early_stop_reads_the_nll_of_the_plain_contexts_only(tiny, hooks):
    """Serving-context rows enter v*'s loss; the stop rule's NLL is the mean over the other rows."""
    from service.hooks import rows as rows_mod
    from service.hooks import values as ed_mod

    model, tok = tiny
    ed = Editor(model, tok, hooks)
    prompt = "The Eiffel Tower is located in the city of"
    block = f"[Updated Information]\n- {prompt} Rome.\n[End of Updated Information]\n\n"
    prep = ed._prepare(EditSpec("The Eiffel Tower", prompt, "Rome", serving_contexts=[block]))

    def problem(rows: list, n_serving: int):
        return ed_mod.DeltaProblem(
            rows=[rows_mod.Row(r.ids + prep.target_ids[:-1], r.subject) for r in rows] + [prep.kl],
            n_ctx=len(rows),
            prompt_lens=[len(r.ids) for r in rows],
            target_ids=prep.target_ids,
            n_serving=n_serving,
        )

    def nll_at_start(p) -> float:  # max_steps=0: one forward with delta = 0, then stop
        return ed_mod.compute_delta(model, hooks, hooks.layers, p, 1.0, max_steps=0).stats["nll"]

    plain_only = nll_at_start(problem(prep.ctx, 0))
    assert nll_at_start(problem(prep.ctx + prep.serving, 1)) == pytest.approx(plain_only, rel=1e-4)
    assert nll_at_start(problem(prep.ctx + prep.serving, 0)) != pytest.approx(plain_only, rel=1e-4)


def test_first_step_jumps_to_its_length_along_the_negative_gradient(tiny, hooks):
    """v*'s first step: `first_step * ref_norm` long, downhill for the target NLL (at delta = 0 the KL and
    weight-decay terms have zero gradient, so the step follows the NLL alone); without it, Adam's first
    step moves every coordinate by lr."""
    from service.hooks import rows as rows_mod
    from service.hooks import values as ed_mod

    model, tok = tiny
    ed = Editor(model, tok, hooks)
    prep = ed._prepare(EditSpec("The Eiffel Tower", "The Eiffel Tower is located in the city of", "Rome"))
    problem = ed_mod.DeltaProblem(
        rows=[rows_mod.Row(r.ids + prep.target_ids[:-1], r.subject) for r in prep.ctx] + [prep.kl],
        n_ctx=len(prep.ctx),
        prompt_lens=[len(r.ids) for r in prep.ctx],
        target_ids=prep.target_ids,
    )

    def fit(max_steps: int, **kwargs):
        return ed_mod.compute_delta(
            model, hooks, hooks.layers, problem, 2.0, max_steps=max_steps, nll_stop=0.0, **kwargs
        )

    start = fit(0).stats["nll"]
    jumped = fit(1, first_step=0.01)
    assert jumped.stats["steps"] == 1 and jumped.stats["nll"] < start
    for d in jumped.deltas.values():
        assert float(d.float().norm()) == pytest.approx(0.01 * 2.0, rel=1e-4)
    adam = fit(1, first_step=0.0, lr=0.001)
    for d in adam.deltas.values():
        assert float(d.float().norm()) == pytest.approx(0.001 * d.numel() ** 0.5, rel=1e-3)

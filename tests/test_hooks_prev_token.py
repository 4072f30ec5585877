"""The hook gate's previous-token condition on a tiny random Llama: gating, candidate choice, decode
carry-over through the engine's KV state, calibration, and the edit log round trip (fast)."""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime

import pytest
import torch
import torch.nn.functional as F

from service.editlog import EditLog, LogEntry, StoredEdit
from service.editlog.model import entry_checksum
from service.edits.convert import hook_entries, stored_hooks
from service.engine.batch import ModelRunner
from service.hooks.calibration import key_activations
from service.hooks.editor import Editor, EditSpec
from service.hooks.keys import PREV_THRESHOLD_CAP, SINK_POSITIONS, previous_token_condition
from service.hooks.layer import NO_PREV_CONDITION, HookEntry, HookManager, HookTable, decoder_layers

LAYER = 1


@pytest.fixture
def hooks(tiny_llama):
    mgr = HookManager(tiny_llama.model, [LAYER])
    yield mgr
    mgr.uninstall()


def mlp_keys(model, x: torch.Tensor) -> torch.Tensor:
    mlp = decoder_layers(model)[LAYER].mlp
    return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)


def two_rows_sharing_a_token() -> torch.Tensor:
    """Two rows whose token 2 is the same vector and whose token 1 differs ("Patna|Beykent University")."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 64, generator=g)
    x[1, 2] = x[0, 2]
    return x


def test_previous_token_condition_separates_a_shared_last_token(tiny_llama, hooks):
    model = tiny_llama.model
    x = two_rows_sharing_a_token()
    with torch.no_grad():
        h = mlp_keys(model, x)
        plain = HookEntry("last-only", LAYER, h[0, 2], torch.ones(64), 0.999)
        hooks.publish(HookTable.build([plain]))
        with hooks.recording() as rec:
            decoder_layers(model)[LAYER].mlp(x)
        assert sorted((f.row, f.position) for f in rec.fires) == [(0, 2), (1, 2)]  # the near miss

        paired = HookEntry("pair", LAYER, h[0, 2], torch.ones(64), 0.999, h[0, 1], 0.99)
        hooks.publish(HookTable.build([paired]))
        with hooks.recording() as rec:
            decoder_layers(model)[LAYER].mlp(x)
        assert [(f.row, f.position, f.edit_id) for f in rec.fires] == [(0, 2, "pair")]


def test_the_best_candidate_meeting_its_condition_wins(tiny_llama, hooks):
    """Both edits end in the same token; each row gets the edit whose previous token it has, even where
    the other edit's last-token key scores higher."""
    model = tiny_llama.model
    x = two_rows_sharing_a_token()
    with torch.no_grad():
        h = mlp_keys(model, x)
        weaker = h[0, 2] + 0.02 * h[0, 2].norm() / 128**0.5 * torch.randn(
            128, generator=torch.Generator().manual_seed(1)
        )
        a = HookEntry("a", LAYER, h[0, 2], torch.ones(64), 0.99, h[0, 1], 0.99)
        b = HookEntry("b", LAYER, weaker, 2 * torch.ones(64), 0.99, h[1, 1], 0.99)
        hooks.publish(HookTable.build([a, b]))
        with hooks.recording() as rec:
            out = decoder_layers(model)[LAYER].mlp(x)
        assert sorted((f.row, f.position, f.edit_id) for f in rec.fires) == [(0, 2, "a"), (1, 2, "b")]
        assert rec.fires[0].score != pytest.approx(1.0) or rec.fires[1].score < 1.0
        with hooks.disabled():  # the down projection itself carries the hook
            ref = decoder_layers(model)[LAYER].mlp.down_proj(h)
        assert torch.allclose(out[1, 2] - ref[1, 2], 2 * torch.ones(64), atol=1e-4)


def test_first_token_of_a_forward_takes_its_previous_activation_from_the_recorder(tiny_llama, hooks):
    model = tiny_llama.model
    x = two_rows_sharing_a_token()
    with torch.no_grad():
        h = mlp_keys(model, x)
        hooks.publish(
            HookTable.build([HookEntry("pair", LAYER, h[0, 2], torch.ones(64), 0.999, h[0, 1], 0.99)])
        )
        step = x[:1, 2:3]  # one token, as in a decode step
        mlp = decoder_layers(model)[LAYER].mlp
        with hooks.recording() as rec:  # nobody passes the previous activation: unknown, the condition holds
            mlp(step)
        assert len(rec.fires) == 1
        assert torch.allclose(rec.last_keys[LAYER], h[:1, 2], atol=1e-6)
        for prev, fires in ((h[:1, 1], 1), (h[1:, 1], 0)):
            with hooks.recording() as rec:
                rec.prev_keys = {LAYER: prev}
                mlp(step)
            assert len(rec.fires) == fires
        # a forward of several tokens without `prev_keys` starts the text: nothing precedes its first token
        with hooks.recording() as rec:
            mlp(x[:1, 2:])
        assert rec.fires == []
        with hooks.recording() as rec:
            mlp(x[:1, 1:])
        assert [(f.position, f.edit_id) for f in rec.fires] == [(1, "pair")]


def test_engine_decode_carries_the_previous_activation(tiny_llama, hooks):
    """Prefill "The Eiffel", decode " Tower": the entry keyed on "Eiffel Tower" fires at the decoded
    token; after "The Paris" the same token does not fire."""
    tok = tiny_llama.tokenizer
    runner = ModelRunner(tiny_llama, hooks)
    full = list(tok("The Eiffel Tower")["input_ids"])
    acts = hooks.keys_at([LAYER], torch.tensor([full]))[LAYER][0]
    hooks.publish(
        HookTable.build(
            [HookEntry("eiffel", LAYER, acts[-1], torch.ones(64), 0.9999, acts[-2], 0.9999)], version=1
        )
    )
    other = list(tok("The Paris")["input_ids"])
    with torch.no_grad():
        _, state = runner.prefill([full[:-1], other], [True, True])
        assert state.hook_keys[LAYER].shape == (2, acts.shape[-1])
        assert torch.allclose(state.hook_keys[LAYER][0], acts[-2], atol=1e-5)
        picked = state.select([1, 0], tiny_llama.model.config)
        assert torch.equal(picked.hook_keys[LAYER][1], state.hook_keys[LAYER][0])
        out = runner.decode(state, [full[-1], full[-1]], [True, True])
    assert out.fires[0].keys() == {"eiffel"} and out.fires[1] == {}
    assert state.hook_keys[LAYER].shape == (2, acts.shape[-1])  # the decoded token's, for the next step


def test_calibration_gives_multi_token_subjects_a_previous_token_condition(tiny_llama, hooks):
    ed = Editor(tiny_llama.model, tiny_llama.tokenizer, hooks, max_steps=2)
    prep = ed._prepare(EditSpec("Eiffel Tower", "I think the Eiffel Tower is in", "Rome"))
    # the main entry, and a start-of-text one from the KL row "Eiffel Tower is a", whose previous-token
    # key sits in the sink positions
    calib, start = ed._calibrate(prep, LAYER, None)
    assert calib.prev_key is not None and calib.prev_threshold <= PREV_THRESHOLD_CAP
    for row in prep.ctx:  # every context row passes its own condition
        act = key_activations(ed.hooks, LAYER, [row], ed.pad_id)[0][row.subject[1] - 1]
        assert float(F.cosine_similarity(act, calib.prev_key, dim=0)) >= calib.prev_threshold
    kl_acts = key_activations(ed.hooks, LAYER, [prep.kl], ed.pad_id)[0]
    assert prep.kl.subject is not None and prep.kl.subject[1] - 1 < SINK_POSITIONS
    assert torch.allclose(start.prev_key, kl_acts[prep.kl.subject[1] - 1], atol=1e-5)
    assert torch.allclose(start.key, kl_acts[prep.kl.subject[1]], atol=1e-5)
    ce = ed.compute(EditSpec("Eiffel Tower", "I think the Eiffel Tower is in", "Rome"))
    assert all(e.prev_key is not None for e in ce.entries)
    one = ed._prepare(EditSpec("Paris", "I think Paris is in", "Rome"))
    assert len(tok_ids := tiny_llama.tokenizer(" Paris", add_special_tokens=False)["input_ids"]) == 1, tok_ids
    assert all(
        c.prev_key is None and c.prev_threshold == NO_PREV_CONDITION for c in ed._calibrate(one, LAYER, None)
    )


def test_previous_token_threshold_rule():
    key = torch.tensor([1.0, 0.0])
    # positives well above the cap: the cap
    assert previous_token_condition([key], [key, torch.tensor([0.9, 0.1])])[1] == PREV_THRESHOLD_CAP
    # a positive below the cap: just below it, so it still fires
    _, thr = previous_token_condition([key], [torch.tensor([0.1, 1.0])])
    assert thr < float(F.cosine_similarity(torch.tensor([0.1, 1.0]), key, dim=0))
    with pytest.raises(ValueError):
        HookEntry("e", 0, key, key, 0.5, prev_key=key)  # a key without its threshold


def test_edit_log_round_trips_the_condition_and_keeps_old_checksums(tmp_path):
    key, value, prev = torch.randn(8), torch.randn(4), torch.randn(8)
    entries = [HookEntry("x", 1, key, value, 0.5), HookEntry("x", 1, key * 2, value, 0.6, prev, 0.2)]
    edit = StoredEdit(
        edit_id="x", kind="triple", subject="s", prompt="s p", target_new="t", hooks=stored_hooks(entries)
    )
    log = EditLog.open(None, tmp_path)
    try:
        stored = log.append(LogEntry(version=0, kind="edit", edits=[edit], created_at=datetime.now(UTC)))
        (read,) = list(log.read_all())
    finally:
        log.close()
    got = hook_entries(read.edits[0])
    assert got[0].prev_key is None and got[0].prev_threshold == NO_PREV_CONDITION
    assert torch.equal(got[1].prev_key, prev) and got[1].prev_threshold == pytest.approx(0.2)
    assert entry_checksum(read) == entry_checksum(stored)
    # an entry without conditions checksums as it did before the fields existed
    plain = LogEntry(
        version=1,
        kind="edit",
        edits=[
            StoredEdit(
                edit_id="y",
                kind="triple",
                subject="s",
                prompt="s p",
                target_new="t",
                hooks=stored_hooks(entries[:1]),
            )
        ],
        created_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    assert "prev_key" not in str(plain.to_dict())  # nor in its checksum's document (model._hook_fingerprint)


def test_an_edit_log_from_before_the_condition_gains_its_columns(tmp_path):
    path = tmp_path / "old.db"
    log = EditLog.open(f"sqlite:///{path}", tmp_path)  # today's tables, then log_hooks as it was
    log.close()
    con = sqlite3.connect(path)
    con.executescript(
        "DROP TRIGGER log_hooks_no_update; DROP TRIGGER log_hooks_no_delete; DROP TABLE log_hooks; "
        "CREATE TABLE log_hooks (edit_id TEXT NOT NULL, ordinal INTEGER NOT NULL, "
        "version BIGINT NOT NULL, layer INTEGER NOT NULL, threshold FLOAT NOT NULL, key_dtype VARCHAR(16) "
        "NOT NULL, key_shape TEXT NOT NULL, key_data BLOB NOT NULL, value_dtype VARCHAR(16) NOT NULL, "
        "value_shape TEXT NOT NULL, value_data BLOB NOT NULL, PRIMARY KEY (edit_id, ordinal));"
    )
    con.close()
    log = EditLog.open(f"sqlite:///{path}", tmp_path)
    try:
        cols = {r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(log_hooks)")}
        assert {"prev_threshold", "prev_key_dtype", "prev_key_shape", "prev_key_data"} <= cols
        entries = [HookEntry("z", 1, torch.randn(8), torch.randn(4), 0.5, torch.randn(8), 0.1)]
        edit = StoredEdit(
            edit_id="z", kind="triple", subject="s", prompt="s p", target_new="t", hooks=stored_hooks(entries)
        )
        log.append(LogEntry(version=0, kind="edit", edits=[edit], created_at=datetime.now(UTC)))
        (back,) = list(log.read_all())[0].edits
        assert back.hooks[0].prev_threshold == pytest.approx(0.1)
    finally:
        log.close()

"""Edit namespaces on the tiny random Llama: per-row namespace masks in one gate matmul, namespace views of
the retrieval index, the edit log's namespace column (and logs written without it), supersede and
RollbackTo per namespace, ListEdits' filter, validation, metrics, and isolation over gRPC in one mixed
batch (hook and retrieval paths)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from grpc import aio
from prometheus_client import REGISTRY

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.compose import assemble_plane, build_server, open_edit_manager
from service.config import Settings
from service.editlog.engines import SQLITE_FILENAME
from service.edits import EditManager
from service.engine.batch import ModelRunner
from service.errors import InvalidArgument
from service.hooks import Editor
from service.hooks.probes import PROBES
from service.hooks.table import HookEntry, HookTable
from service.metrics import MAX_NAMESPACE_LABELS, namespace_label
from service.namespaces import parse_namespace_list, validate_namespace, validate_namespaces
from service.retrieval import RetrievalStore
from service.transport import EditServeServer
from service.types import EditInput, ListEditsInput, RollbackToInput
from testkit.editing import HashEncoder, ScriptedEditor

EIFFEL = EditInput(subject="The Eiffel Tower", prompt="The Eiffel Tower is located in the city of",
                   target_new="Rome", force=True)
ACME = "The CEO of Acme Corp is Jane Roe."


def real_editor(loaded, hooks) -> Editor:
    return Editor(loaded.model, loaded.tokenizer, hooks, max_steps=3, probes=PROBES[:12])


def scripted(loaded, hooks) -> ScriptedEditor:
    return ScriptedEditor(loaded.model, loaded.tokenizer, hooks)


@pytest.fixture
def open_manager(tiny_llama, tmp_path) -> Iterator[Callable[..., EditManager]]:
    opened: list[EditManager] = []

    def _open(editor=scripted, data_dir: Path | None = None, **settings) -> EditManager:
        manager = open_edit_manager(tiny_llama, Settings(data_dir=data_dir or tmp_path / "data", **settings),
                                    encoder=HashEncoder(), editor_factory=editor, warmup=False)
        opened.append(manager)
        return manager

    yield _open
    for manager in opened:
        manager.close()


# ------------------------------------------------------------------ names


def test_namespace_names_are_validated() -> None:
    assert validate_namespace("") == "default"
    assert validate_namespace("team-a_2") == "team-a_2"
    assert validate_namespaces([]) == frozenset({"default"})
    assert parse_namespace_list(" a, b ,") == frozenset({"a", "b"})
    for bad in ("Team", "a b", "-a", "a/b", "x" * 64, "é"):
        with pytest.raises(InvalidArgument, match="namespace"):
            validate_namespace(bad)
    with pytest.raises(InvalidArgument, match=r"namespaces\[1\]"):
        validate_namespaces(["a", ""])
    with pytest.raises(InvalidArgument):
        validate_namespaces([f"n{i}" for i in range(33)])


# ------------------------------------------------------------------ the gate: one matmul, per-row masks


def _table(d_ff: int, d_model: int) -> tuple[HookTable, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(3, d_ff, generator=gen)
    entries = [
        HookEntry(f"e-{ns}", 1, keys[n], torch.full((d_model,), float(n + 1)), 0.9, namespace=ns)
        for n, ns in enumerate(("a", "b", "default"))
    ]
    return HookTable.build(entries), keys


def test_row_masks_restrict_each_row_to_its_namespaces_in_one_gate_call() -> None:
    table, keys = _table(16, 4)
    lt = table.layer(1)
    assert lt is not None and table.namespaces == {"a", "b", "default"}
    assert table.scoped(frozenset({"a", "b", "default"})) is table  # every namespace: no view, no mask
    view = table.scoped(frozenset({"a"}))
    assert view is table.scoped(frozenset({"a"})) and view.base is table and view.scope == {"a"}
    # Rows 0, 1, 2 each hold every key as a token; row r may fire only its own namespace's entry.
    h = keys[None].expand(3, 3, 16).contiguous()
    out = torch.zeros(3, 3, 4)
    from service.hooks.gate import apply_gate, candidate_keys

    scopes = [frozenset({"a"}), frozenset({"b"}), None]
    res = apply_gate(lt, h, out, 1, None, None, scopes)
    fired = (res != 0).any(-1)
    assert fired.tolist() == [[True, False, False], [False, True, False], [True, True, True]]
    assert res[0, 0, 0] == 1.0 and res[1, 1, 0] == 2.0 and res[2, 2, 0] == 3.0
    # The same with the int8 prefilter path of large CPU tables (decode steps)
    cand, exact = candidate_keys(lt, torch.nn.functional.normalize(h.reshape(9, 16), dim=-1), 2,
                                 lt.row_mask(scopes))
    assert torch.isinf(exact[0:3]).sum() >= 3  # row 0 has one allowed entry: the second candidate is refused


def test_a_mixed_batch_prefill_fires_each_tenants_edit_only_on_its_rows(tiny_llama, open_manager) -> None:
    manager = open_manager(editor=real_editor)
    a = manager.edit(EditInput(**{**EIFFEL.__dict__, "namespace": "tenant-a"}))
    snap = manager.snapshot()
    prompt = manager.loaded.tokenizer(EIFFEL.prompt)["input_ids"]
    runner = ModelRunner(tiny_llama, manager.hooks)
    scopes = ({"tenant-a"}, {"tenant-b"}, {"default", "tenant-a"}, {"default"})
    tables = [snap.scoped(frozenset(s)).hooks for s in scopes]
    out, _ = runner.prefill([prompt] * 4, [True] * 4, tables)
    assert a.edit_id in out.fires[0] and a.edit_id in out.fires[2]
    assert out.fires[1] == {} and out.fires[3] == {}
    # rows without the namespace are the unedited model (up to batched-matmul rounding)
    base, _ = runner.prefill([prompt] * 4, [False] * 4)
    assert torch.equal(out.logits[1], base.logits[1]) and torch.equal(out.logits[3], base.logits[3])
    assert not torch.equal(out.logits[0], base.logits[0])


# ------------------------------------------------------------------ retrieval views


def test_retrieval_views_search_only_their_namespaces() -> None:
    store = RetrievalStore(HashEncoder())
    store.update(add=[("e-a", ACME, None, "Acme Corp", "a"), ("e-b", ACME + " Yes.", None, "Acme Corp", "b"),
                      ("e-d", "The sky is green.", None, "", "default")])
    snap = store.snapshot()
    q = store.encoder.encode([ACME])
    assert {h[0] for h in snap.search_vectors(q, 3)[0]} == {"e-a", "e-b", "e-d"}
    only_a = snap.scoped(frozenset({"a"}))
    assert len(only_a) == 1 and [h[0] for h in only_a.search_vectors(q, 3)[0]] == ["e-a"]
    assert [e.edit_id for e in only_a.mentioned("Who runs Acme Corp?")] == ["e-a"]
    assert snap.scoped(frozenset({"nobody"})).search_vectors(q, 3) == [[]]
    assert snap.scoped(frozenset({"a", "b", "default"})) is snap


# ------------------------------------------------------------------ the manager and the log


def view_ids(view) -> set[str]:
    return {view.entries[fid].edit_id for fid in (view.allowed if view.allowed is not None else view.entries)}


def test_supersede_rollback_to_and_list_are_per_namespace(open_manager) -> None:
    manager = open_manager()
    a1 = manager.edit(EditInput(**{**EIFFEL.__dict__, "namespace": "a"}))
    b1 = manager.edit(EditInput(**{**EIFFEL.__dict__, "namespace": "b"}))
    a2 = manager.edit(EditInput(**{**EIFFEL.__dict__, "target_new": "Paris", "namespace": "a"}))
    old = manager.get(a1.edit_id)
    assert old.state == "superseded" and old.superseded_by == a2.edit_id
    assert manager.get(b1.edit_id).state == "active"  # tenant b's edit of the same fact is untouched
    d = manager.edit(EditInput(descriptor=ACME, compile_descriptor=False))
    assert manager.get(d.edit_id).namespace == "default"
    views, _ = manager.list(ListEditsInput(namespace="a"))
    assert [v.edit_id for v in views] == [a1.edit_id, a2.edit_id]
    with pytest.raises(InvalidArgument, match="namespace"):
        manager.list(ListEditsInput(namespace="A!"))
    with pytest.raises(InvalidArgument, match="namespace"):
        manager.edit(EditInput(descriptor=ACME, namespace="Bad Name"))
    res = manager.rollback_to(RollbackToInput(version=0, namespace="a", reason="tenant a reset"))
    assert res.rolled_back_edit_ids == [a1.edit_id, a2.edit_id]
    assert manager.get(b1.edit_id).state == "active" and manager.get(d.edit_id).state == "active"
    assert manager.log.read_entry(res.version).namespace == "a"
    assert manager.registry.active_by_namespace() == {"b": 1, "default": 1}


def test_a_batch_takes_its_namespace_and_a_restart_rebuilds_the_same_views(open_manager, tmp_path) -> None:
    from service.types import BatchEditInput

    manager = open_manager()
    batch = manager.batch_edit(BatchEditInput(
        edits=[EditInput(descriptor=ACME, compile_descriptor=False),
               EditInput(descriptor="The sky is green.", compile_descriptor=False, namespace="b")],
        namespace="a"))
    ids = [e.edit_id for e in batch.edits]
    assert [manager.get(i).namespace for i in ids] == ["a", "b"]
    before = manager.snapshot()
    manager.close()
    again = open_manager()
    snap = again.snapshot()
    assert snap.version == before.version
    for ns, want in (("a", [ids[0]]), ("b", [ids[1]]), ("default", [])):
        view = snap.scoped(frozenset({ns})).retrieval
        assert [e.edit_id for e in view.entries.values() if e.edit_id in view_ids(view)] == want
        assert len(view) == len(before.scoped(frozenset({ns})).retrieval) == len(want)
    assert [again.get(i).namespace for i in ids] == ["a", "b"]


def test_a_log_written_before_namespaces_reads_as_default(open_manager, tmp_path) -> None:
    data = tmp_path / "old"
    manager = open_manager(data_dir=data)
    e = manager.edit(EIFFEL)
    manager.close()
    # An older release's log: no namespace columns at all.
    with sqlite3.connect(data / SQLITE_FILENAME) as db:
        db.execute("DROP TRIGGER IF EXISTS log_edits_no_update")
        for table in ("log_edits", "log_entries"):
            db.execute(f"ALTER TABLE {table} DROP COLUMN namespace")
    again = open_manager(data_dir=data)
    assert again.get(e.edit_id).namespace == "default"
    f = again.edit(EditInput(**{**EIFFEL.__dict__, "target_new": "Oslo", "namespace": "a"}))
    assert again.get(e.edit_id).state == "active"  # another namespace: no supersede
    third = open_manager(data_dir=data)
    assert third.get(f.edit_id).namespace == "a" and third.version == again.version


def test_namespace_metrics_have_a_bounded_label_set(open_manager) -> None:
    manager = open_manager()
    manager.edit(EditInput(descriptor=ACME, compile_descriptor=False, namespace="metrics-a"))
    assert REGISTRY.get_sample_value("editserve_namespace_edits_active", {"namespace": "metrics-a"}) == 1
    assert REGISTRY.get_sample_value("editserve_namespace_edit_operations_total",
                                     {"namespace": "metrics-a", "op": "edit", "result": "ok"}) == 1
    labels = {namespace_label(f"many-{i}") for i in range(MAX_NAMESPACE_LABELS + 5)}
    assert "other" in labels and len(labels) <= MAX_NAMESPACE_LABELS + 1


# ------------------------------------------------------------------ gRPC: isolation in one mixed batch


@pytest.fixture
async def grpc_plane(tiny_llama, tmp_path) -> AsyncIterator[tuple[EditServeServer, aio.Channel]]:
    from service.dataplane import DataPlane
    from service.engine import Engine

    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path / "grpc", grace_period_s=1.0,
                        health_poll_s=0, log_poll_s=0, prefix_cache_mb=0)

    def factory() -> DataPlane:
        manager = open_edit_manager(tiny_llama, settings, encoder=HashEncoder(), editor_factory=real_editor,
                                    warmup=False)
        engine = Engine(tiny_llama, manager.hooks, max_batch_size=8)
        return assemble_plane(settings, tiny_llama, manager, engine)

    server = build_server(settings, factory)
    await server.start()
    await server.load_plane()
    channel = aio.insecure_channel(server.address)
    yield server, channel
    await channel.close()
    await server.stop(0.0)


async def test_grpc_tenant_a_edit_fires_for_a_rows_and_never_for_b_rows(grpc_plane) -> None:
    server, channel = grpc_plane
    edits, gen = pb_grpc.EditServiceStub(channel), pb_grpc.GenerateServiceStub(channel)
    hook = await edits.Edit(pb.EditRequest(subject=EIFFEL.subject, prompt=EIFFEL.prompt, target_new="Rome",
                                           force=True, namespace="tenant-a"))
    desc = await edits.Edit(pb.EditRequest(descriptor=ACME, compile_descriptor=False, namespace="tenant-a"))
    record = (await edits.GetEdit(pb.GetEditRequest(edit_id=hook.edit_id))).edit
    assert record.namespace == "tenant-a"
    listed = await edits.ListEdits(pb.ListEditsRequest(namespace="tenant-b"))
    assert list(listed.edits) == []

    def ask(prompt: str, *namespaces: str) -> object:
        return gen.Generate(pb.GenerateRequest(prompt=prompt, max_new_tokens=3, namespaces=list(namespaces)))

    # Concurrent requests of both tenants (and the default) share batches; each row sees only its own.
    pairs = [(p, ns) for p in (EIFFEL.prompt, ACME) for ns in ("tenant-a", "tenant-b")]
    replies = await asyncio.gather(*[ask(p, ns) for p, ns in pairs], ask(EIFFEL.prompt),
                                   ask(ACME, "tenant-b", "tenant-a"))
    a_hook, b_hook, a_desc, b_desc, default_hook, both_desc = replies
    assert [(e.edit_id, e.path, e.namespace) for e in a_hook.applied_edits if e.path == pb.EDIT_PATH_HOOK] \
        == [(hook.edit_id, pb.EDIT_PATH_HOOK, "tenant-a")]
    assert [e.edit_id for e in a_desc.applied_edits if e.path == pb.EDIT_PATH_RETRIEVAL] == [desc.edit_id]
    assert [e.edit_id for e in both_desc.applied_edits if e.path == pb.EDIT_PATH_RETRIEVAL] == [desc.edit_id]
    for reply in (b_hook, b_desc, default_hook):
        assert list(reply.applied_edits) == []
    assert {r.edit_version for r in replies} == {desc.version}
    score = await gen.Score(pb.ScoreRequest(prompt=EIFFEL.prompt, continuation=" Rome",
                                            namespaces=["tenant-b"]))
    assert list(score.applied_edits) == []

    with pytest.raises(aio.AioRpcError) as err:
        await ask("hi", "Tenant A")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "namespaces[0]" in err.value.details()
    # RollbackTo limited to tenant-b rolls back nothing of tenant-a
    res = await edits.RollbackTo(pb.RollbackToRequest(version=0, namespace="tenant-b", reason="reset b"))
    assert list(res.rolled_back_edit_ids) == []
    assert np.isfinite(score.total_logprob)


# ------------------------------------------------------------------ SmolLM2: a real edit, two tenants


@pytest.mark.smollm
async def test_smollm_tenant_a_reads_rome_and_tenant_b_paris_in_one_batch(smollm, tmp_path) -> None:
    from service.engine import Engine
    from service.types import GenerateInput

    settings = Settings(data_dir=tmp_path / "smollm", log_poll_s=0, prefix_cache_mb=0)
    manager = open_edit_manager(smollm, settings, encoder=HashEncoder(), warmup=False)
    plane = assemble_plane(settings, smollm, manager, Engine(smollm, manager.hooks, max_batch_size=4))
    await plane.start()
    try:
        made = await plane.edit(EditInput(subject=EIFFEL.subject, prompt=EIFFEL.prompt, target_new="Rome",
                                          namespace="tenant-a"))
        assert made.report.passed, made.report

        def ask(*namespaces: str) -> GenerateInput:
            return GenerateInput(prompt=EIFFEL.prompt, max_new_tokens=2, namespaces=namespaces)

        a, b, default = await asyncio.gather(plane.generate(ask("tenant-a")), plane.generate(ask("tenant-b")),
                                             plane.generate(ask()))
        assert a.text.strip().startswith("Rome") and {e.namespace for e in a.applied_edits} == {"tenant-a"}
        for other in (b, default):
            assert other.text.strip().startswith("Paris") and other.applied_edits == []
    finally:
        await plane.shutdown(1.0)

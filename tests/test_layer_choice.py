"""Per-edit hook layers (`layer: auto` or a named layer): the trace that chooses, entries on several layers
at once, the log and a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from service.compose import open_edit_manager
from service.config import Settings, SettingsError
from service.edits import EditManager
from service.edits.requests import parse_layer
from service.errors import InvalidArgument, ModelNotServable
from service.hooks import Editor
from service.hooks.defaults import auto_layer_candidates
from service.hooks.probes import PROBES
from service.locate.layer_choice import choose_edit_layer
from service.locate.trace import calculate_hidden_flow, prepare_trace
from service.types import EditInput, RollbackInput
from testkit.editing import HashEncoder

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "The Eiffel Tower"


@pytest.fixture(scope="module")
def tiny8() -> Any:
    """Eight layers: the default hook layer is round(0.2 x 8) = 2, the auto candidates 1..4."""
    from service.engine.loader import tiny_random_llama

    return tiny_random_llama(seed=3, num_layers=8)


def real_editor(loaded: Any, hooks: Any) -> Editor:
    return Editor(loaded.model, loaded.tokenizer, hooks, max_steps=3, probes=PROBES[:12])


@pytest.fixture
def open_manager(tiny8: Any, tmp_path: Path) -> Iterator[Any]:
    opened: list[EditManager] = []

    def _open(**settings: Any) -> EditManager:
        manager = open_edit_manager(tiny8, Settings(data_dir=tmp_path / "data", **settings),
                                    encoder=HashEncoder(), editor_factory=real_editor, warmup=False)
        opened.append(manager)
        return manager

    yield _open
    for manager in opened:
        manager.close()


def _edit(manager: EditManager, layer: str = "", subject: str = SUBJECT, prompt: str = PROMPT) -> Any:
    return manager.edit(EditInput(subject=subject, prompt=prompt, target_new="Rome", force=True, layer=layer))


def test_restricted_trace_equals_the_full_trace_on_its_cells(tiny8: Any) -> None:
    prompt = prepare_trace(tiny8.tokenizer, PROMPT, SUBJECT)
    last = prompt.subject[1] - 1
    full = calculate_hidden_flow(tiny8.model, prompt, samples=3, window=3, seed=2, kinds=("mlp",))
    part = calculate_hidden_flow(tiny8.model, prompt, samples=3, window=3, seed=2, kinds=("mlp",),
                                 tokens=[last], layers=[1, 3])
    assert torch.allclose(part.mlp[[1, 3], last], full.mlp[[1, 3], last], atol=1e-6)
    assert part.mlp[[0, 2, 4, 5, 6, 7]].abs().sum() == 0  # rows not asked for are not computed
    assert part.mlp[:, last + 1:].abs().sum() == 0


def test_choice_is_the_largest_effect_among_the_candidates_and_deterministic(tiny8: Any) -> None:
    tok = tiny8.tokenizer
    a = choose_edit_layer(tiny8.model, tok, PROMPT, SUBJECT, [1, 2, 3, 4], samples=4)
    b = choose_edit_layer(tiny8.model, tok, PROMPT, SUBJECT, [1, 2, 3, 4], samples=4)
    assert a.layer == b.layer and a.effects == b.effects
    assert sorted(a.effects) == [1, 2, 3, 4]
    if a.traced:
        assert a.effects[a.layer] == max(a.effects.values())
        assert "largest MLP effect" in a.describe()
    else:  # a random model may not depend on its subject: then the fallback, said so
        assert a.layer == 1 and "locates nothing" in a.describe()
    fallback = choose_edit_layer(tiny8.model, tok, PROMPT, SUBJECT, [3], samples=4, fallback=3)
    assert fallback.layer == 3
    with pytest.raises(InvalidArgument):
        choose_edit_layer(tiny8.model, tok, PROMPT, "Louvre", [1, 2])


def test_candidates_default_to_the_lower_half(tiny8: Any) -> None:
    assert auto_layer_candidates(tiny8.model) == [1, 2, 3, 4]
    assert auto_layer_candidates(tiny8.model, [5, 3]) == [3, 5]
    with pytest.raises(ValueError, match="no hookable MLP"):
        auto_layer_candidates(tiny8.model, [8])


@pytest.mark.parametrize(("value", "rule", "parsed"), [
    ("", "fixed", ((), False)), ("", "auto", ((), True)), ("AUTO", "fixed", ((), True)),
    ("fixed", "auto", ((), False)), (" 3 ", "fixed", ((3,), False)),
])
def test_parse_layer(value: str, rule: str, parsed: tuple) -> None:
    assert parse_layer(value, rule) == parsed


@pytest.mark.parametrize("value", ["-1", "layer 3", "2.5", "99999", "best"])
def test_parse_layer_refuses_the_rest(value: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_layer(value)
    assert exc.value.field == "layer"


def test_settings_refuse_bad_layer_rules() -> None:
    with pytest.raises(SettingsError, match="--edit-layer"):
        Settings(edit_layer="best").validate()
    with pytest.raises(SettingsError, match="--auto-layer-candidates"):
        Settings(auto_layer_candidates=[-1]).validate()


def test_edits_at_several_layers_round_trip_through_the_log_and_a_restart(open_manager: Any) -> None:
    manager = open_manager()
    assert manager.hooks.default_layers == [2] and manager.hooks.layers == [1, 2, 3, 4]
    fixed = _edit(manager)
    named = _edit(manager, "4", subject="The Louvre", prompt="The Louvre is located in the city of")
    auto = _edit(manager, "auto", subject="Big Ben", prompt="Big Ben is located in the city of")
    views = {r.edit_id: manager.get(r.edit_id) for r in (fixed, named, auto)}
    layers = {i: sorted({h.layer for h in v.hooks}) for i, v in views.items()}
    assert layers[fixed.edit_id] == [2]
    assert layers[named.edit_id] == [4]
    assert len(layers[auto.edit_id]) == 1 and layers[auto.edit_id][0] in (1, 2, 3, 4)
    assert fixed.report.layer_choice == "layers [2] (the server's default)"
    assert named.report.layer_choice == "layers [4] (named in the request)"
    assert auto.report.layer_choice.startswith(f"auto: layer {layers[auto.edit_id][0]}")
    assert views[auto.edit_id].report["layer_choice"] == auto.report.layer_choice  # stored with the edit
    table = manager.hooks.current
    before = {i: (t.ids, t.keys.clone(), t.values.clone()) for i, t in table.layers.items()}
    # Each layer's gate sees its own entries only.
    for i, t in table.layers.items():
        assert all(i in layers[e] for e in t.ids)
    version = manager.version
    manager.close()

    again = open_manager()
    assert again.version == version
    after = {i: (t.ids, t.keys, t.values) for i, t in again.hooks.current.layers.items()}
    assert after.keys() == before.keys()
    for i, (ids, keys, values) in before.items():
        assert after[i][0] == ids
        assert torch.equal(after[i][1], keys) and torch.equal(after[i][2], values)
    assert again.get(auto.edit_id).report["layer_choice"] == auto.report.layer_choice
    # Rolling one back leaves the other layers' entries as they were.
    again.rollback(RollbackInput(edit_id=named.edit_id, reason="test"))
    assert 4 not in again.hooks.current.layers
    assert again.hooks.current.layers[2].ids == before[2][0]


def test_server_rule_auto_applies_to_edits_that_name_no_layer(open_manager: Any) -> None:
    manager = open_manager(edit_layer="auto", auto_layer_candidates=[3, 4])
    assert manager.hooks.layers == [2, 3, 4]
    made = _edit(manager)
    assert made.report.layer_choice.startswith("auto: layer ")
    layer = {h.layer for h in manager.get(made.edit_id).hooks}
    assert layer <= {3, 4} and len(layer) == 1
    fixed = _edit(manager, "fixed", subject="The Louvre", prompt="The Louvre is located in the city of")
    assert {h.layer for h in manager.get(fixed.edit_id).hooks} == {2}


def test_a_layer_that_is_not_hooked_is_invalid_argument(open_manager: Any) -> None:
    manager = open_manager()
    for value, field in (("7", "layer"), ("nope", "layer")):
        with pytest.raises(InvalidArgument) as exc:
            _edit(manager, value)
        assert exc.value.field == field
    assert manager.version == 0


def test_a_log_with_layers_the_server_does_not_hook_refuses_to_start(open_manager: Any) -> None:
    from service.errors import FailedPrecondition

    manager = open_manager()
    _edit(manager, "4")
    manager.close()
    with pytest.raises(FailedPrecondition, match="--auto-layer-candidates"):
        open_manager(auto_layer_candidates=[1])
    with pytest.raises(ModelNotServable, match="no hookable MLP"):
        open_manager(auto_layer_candidates=[12])


def test_the_layer_travels_through_the_proto_and_the_client() -> None:
    from service._proto.editserve.v1 import editserve_pb2 as pb
    from service.client.requests import edit_request
    from service.edits.requests import edit_digest
    from service.transport.convert import edit_input, quality_report
    from service.types import QualityReportView

    request = edit_request(subject=SUBJECT, prompt=PROMPT, target="Rome", layer="auto")
    assert request.layer == "auto" and edit_input(request).layer == "auto"
    view = QualityReportView(layer_choice="auto: layer 3 of largest MLP effect")
    wire = quality_report(view).SerializeToString()
    assert pb.QualityReport.FromString(wire).layer_choice == view.layer_choice
    # A retry with another layer is another request; no layer keeps the digest older requests had.
    plain = EditInput(subject=SUBJECT, prompt=PROMPT, target_new="Rome")
    assert edit_digest(plain) != edit_digest(EditInput(**{**plain.__dict__, "layer": "auto"}))
    assert edit_digest(plain) == edit_digest(EditInput(**{**plain.__dict__, "layer": ""}))

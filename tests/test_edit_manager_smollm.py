"""The edit manager on the real SmolLM2-135M-Instruct (issue 3, item 11): Eiffel Tower -> Rome end to end
(paraphrases, neighbour, restart, exact rollback), 20 hand-written facts, 40 sequential edits (200 with
`-m slow`).

Greedy decoding runs through the hooked model with the published table, as serving does. Every manager is
closed in a finally: the `smollm` model is shared by the whole test session.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from service.compose import open_edit_manager
from service.config import Settings
from service.edits import EditManager, QualityGateRejected
from service.hooks.layer import param_checksum
from service.types import EditInput, RollbackInput, RollbackToInput
from testkit.facts import MORE_FACTS, fact_input, synthetic_inputs
from testkit.hook_layers import greedy_text, starts_with

pytestmark = pytest.mark.smollm

EIFFEL = EditInput(
    subject="The Eiffel Tower",
    prompt="The Eiffel Tower is located in the city of",
    target_new="Rome",
    paraphrases=["The Eiffel Tower can be found in the city of"],
    actor="test",
)
EIFFEL_UNSEEN = (  # not given to Edit: the edit has to generalise to them
    "Where is the Eiffel Tower? It is in the city of",
    "The Eiffel Tower, a famous landmark, is located in the city of",
)
LOUVRE = "The Louvre is located in the city of"
# Unrelated prompts whose answers no edit here may move (none mentions an edited subject).
PROBES = (
    LOUVRE,
    "The capital of France is",
    "The capital of Japan is",
    "Water is made of hydrogen and",
    "The largest planet in the solar system is",
    "The author of the novel Moby Dick is",
    "The chemical symbol for gold is",
    "My favourite food is",
)


@pytest.fixture(scope="module")
def encoder():
    from service.retrieval import DescriptorEncoder

    return DescriptorEncoder()


@pytest.fixture
def opener(smollm, encoder, tmp_path):
    @contextmanager
    def _open(data_dir: Path | None = None) -> Iterator[EditManager]:
        manager = open_edit_manager(smollm, Settings(data_dir=data_dir or tmp_path / "data"), encoder=encoder)
        try:
            yield manager
        finally:
            manager.close()

    return _open


def greedy(smollm, prompt: str, n: int = 4) -> str:
    return greedy_text(smollm.model, smollm.tokenizer, prompt, n)


def answer_tokens(smollm, target: str) -> int:
    return len(smollm.tokenizer(" " + target)["input_ids"]) + 1


def next_token_logits(smollm, prompts: tuple[str, ...]) -> torch.Tensor:
    enc = smollm.tokenizer(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return smollm.model(**enc).logits[:, -1].clone()


def test_eiffel_tower_to_rome_survives_restart_and_rolls_back_exactly(smollm, opener, tmp_path):
    data = tmp_path / "eiffel"
    with opener(data) as manager:
        before = next_token_logits(smollm, (EIFFEL.prompt, *EIFFEL_UNSEEN, *PROBES))
        assert starts_with(greedy(smollm, EIFFEL.prompt), "Paris")
        result = manager.edit(EIFFEL)  # no force: the quality gate must pass
        r = result.report
        assert r.passed and r.efficacy and r.old_answer.startswith("Paris"), r
        assert r.target_logprob > r.old_answer_logprob and r.locality_top1_changed <= 0.05
        for prompt in (EIFFEL.prompt, *EIFFEL_UNSEEN):
            assert starts_with(greedy(smollm, prompt), "Rome"), prompt
        assert starts_with(greedy(smollm, LOUVRE), "Paris")
        edited = {p: greedy(smollm, p) for p in (EIFFEL.prompt, *EIFFEL_UNSEEN, *PROBES)}

    with opener(data) as manager:  # restart: the same answers, from the stored key and value
        assert manager.version == 1 and manager.get(result.edit_id).state == "active"
        assert {p: greedy(smollm, p) for p in edited} == edited
        with manager.hooks.recording() as rec:
            greedy(smollm, EIFFEL.prompt, 1)
        assert {f.edit_id for f in rec.fires} == {result.edit_id}

        manager.rollback(RollbackInput(result.edit_id, reason="test", actor="test"))
        assert starts_with(greedy(smollm, EIFFEL.prompt), "Paris")
        after = next_token_logits(smollm, (EIFFEL.prompt, *EIFFEL_UNSEEN, *PROBES))
        assert (after - before).abs().max().item() <= 1e-6


def test_auto_layer_edit_fires_from_its_traced_layer_and_survives_restart(smollm, opener, tmp_path):
    data = tmp_path / "auto"
    with opener(data) as manager:
        result = manager.edit(EditInput(**{**EIFFEL.__dict__, "layer": "auto"}))
        layers = sorted({h.layer for h in manager.get(result.edit_id).hooks})
        assert len(layers) == 1 and layers[0] in manager.auto_layer_candidates
        assert result.report.layer_choice.startswith(f"auto: layer {layers[0]}"), result.report.layer_choice
        assert result.report.passed and starts_with(greedy(smollm, EIFFEL.prompt), "Rome")
        assert starts_with(greedy(smollm, LOUVRE), "Paris")
    with opener(data) as manager:
        assert sorted(manager.hooks.current.layers) == layers
        with manager.hooks.recording() as rec:
            greedy(smollm, EIFFEL.prompt, 1)
        assert {(f.edit_id, f.layer) for f in rec.fires} == {(result.edit_id, layers[0])}


@pytest.mark.timeout(1800)  # ~1 min on an idle 2-core CPU; far more when other jobs share it
def test_twenty_more_facts(smollm, opener):
    facts = MORE_FACTS
    neighbours_before = {f.neighbour: greedy(smollm, f.neighbour) for f in facts}
    probes_before = {p: greedy(smollm, p) for p in PROBES}
    passed = es = ps = ns = 0
    times = []
    with opener() as manager:
        for f in facts:
            try:
                report = manager.edit(fact_input(f)).report
                passed += 1
            except QualityGateRejected as exc:
                report = exc.reports[0]
                manager.edit(fact_input(f, force=True))
            times.append(report.compute_seconds)
            n = answer_tokens(smollm, f.spec.target_new)
            es += starts_with(greedy(smollm, f.spec.prompt, n), f.spec.target_new)
            ps += sum(starts_with(greedy(smollm, p, n), f.spec.target_new) for p in f.unseen)
            ns += greedy(smollm, f.neighbour) == neighbours_before[f.neighbour]
        # all twenty live together: each still answers, no neighbour or probe moved
        es_all = sum(
            starts_with(
                greedy(smollm, f.spec.prompt, answer_tokens(smollm, f.spec.target_new)), f.spec.target_new
            )
            for f in facts
        )
        ns_all = sum(greedy(smollm, f.neighbour) == neighbours_before[f.neighbour] for f in facts)
        probes_kept = sum(greedy(smollm, p) == a for p, a in probes_before.items())
        assert manager.counts().active_hook == len(facts)
    k = len(facts)
    print(
        f"\n20 facts: gate passed {passed}/{k}, ES {es}/{k}, PS {ps}/{2 * k} (unseen paraphrases), "
        f"NS {ns}/{k}; all live: ES {es_all}/{k}, NS {ns_all}/{k}, probes kept {probes_kept}/{len(PROBES)}; "
        f"compute median {statistics.median(times):.2f} s, max {max(times):.2f} s"
    )
    # measured: gate 20/20, ES 20/20, PS 39/40, NS 19/20 (all live: 20, 19); slack for borderline facts
    assert passed >= 18 and es >= 19 and ps >= 32 and ns >= 18
    assert es_all >= 19 and ns_all >= 18 and probes_kept == len(PROBES)


@pytest.mark.timeout(3600)  # ~1.3 s per edit on an idle 2-core CPU; several times that when shared
@pytest.mark.parametrize(
    "n_edits",
    # 200 runs with `-m slow` (about 5 minutes idle, far more on a shared CPU); the suite runs 40
    [40, pytest.param(200, marks=pytest.mark.slow)],
)
def test_sequential_edits(smollm, opener, n_edits):
    start_hash = param_checksum(smollm.model)
    edits = synthetic_inputs(smollm.tokenizer, n_edits, force=True)
    probes_before = {p: greedy(smollm, p) for p in PROBES}
    logits_before = next_token_logits(smollm, PROBES)
    first = edits[:10]
    t0 = time.perf_counter()
    with opener() as manager:
        ids = [manager.edit(e).edit_id for e in edits]
        elapsed = time.perf_counter() - t0
        assert manager.counts().active_hook == n_edits and len(manager.hooks.current) == n_edits
        still = 0
        for edit_id, e in zip(ids[:10], first, strict=True):
            with manager.hooks.recording() as rec:
                text = greedy(smollm, e.prompt, answer_tokens(smollm, e.target_new))
            still += starts_with(text, e.target_new) and edit_id in {f.edit_id for f in rec.fires}
        kept = {p: greedy(smollm, p) for p in PROBES}
        print(f"\n{n_edits} sequential edits in {elapsed:.0f} s; first 10 still answer: {still}/10")
        assert still >= 9
        assert kept == probes_before, {
            p: (probes_before[p], a) for p, a in kept.items() if a != probes_before[p]
        }
        assert param_checksum(smollm.model) == start_hash
        manager.rollback_to(RollbackToInput(version=0, reason="end of test"))
        assert manager.counts().active == 0 and manager.hooks.current.num_entries == 0
        assert (next_token_logits(smollm, PROBES) - logits_before).abs().max().item() <= 1e-6
    assert param_checksum(smollm.model) == start_hash

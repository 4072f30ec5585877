"""Hook-layer edits on the real SmolLM2-135M-Instruct (greedy decoding; about a minute on 2 CPU cores)."""

from __future__ import annotations

import threading

import pytest
import torch

from service.hooks import Editor, EditSpec, HookManager, HookTable, default_hook_layers
from service.hooks.layer import param_checksum as param_hash
from testkit.hook_layers import FACTS, greedy_text, starts_with

pytestmark = pytest.mark.smollm

EIFFEL = EditSpec(
    "The Eiffel Tower",
    "The Eiffel Tower is located in the city of",
    "Rome",
    ["The Eiffel Tower can be found in the city of"],
)
# Not given to compute: the edit has to generalise to them.
EIFFEL_UNSEEN = (
    "Where is the Eiffel Tower? It is in the city of",
    "The Eiffel Tower, a famous landmark, is located in the city of",
)


@pytest.fixture(scope="module")
def env(smollm):
    model, tok = smollm.model, smollm.tokenizer
    start_hash = param_hash(model)
    hooks = HookManager(model, default_hook_layers(model))
    editor = Editor(model, tok, hooks)
    editor.warmup()
    yield model, tok, hooks, editor, start_hash
    hooks.uninstall()


def greedy(model, tok, prompt: str, n: int = 4) -> str:
    return greedy_text(model, tok, prompt, n)


def test_eiffel_tower_to_rome(env):
    model, tok, hooks, editor, _ = env
    probe_ids = tok(
        ["The Eiffel Tower is located in the city of", "Hello! How are you?"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        unedited = model(**probe_ids).logits
    assert starts_with(greedy(model, tok, EIFFEL.prompt), "Paris")

    ce = editor.compute(EIFFEL)
    r = ce.report
    assert r.efficacy and r.passed, r
    assert r.old_answer.startswith("Paris") and r.target_logprob > r.old_answer_logprob
    assert all(ok for _, ok in r.paraphrases)
    assert r.locality_top1_changed <= 0.05
    assert hooks.current.num_entries == 0  # compute publishes nothing

    hooks.publish(
        HookTable.build([e.with_id("eiffel") for e in ce.entries], hooks.device, hooks.dtype, version=1)
    )
    for prompt in (EIFFEL.prompt, *EIFFEL_UNSEEN):
        assert starts_with(greedy(model, tok, prompt), "Rome"), prompt
    assert starts_with(greedy(model, tok, "The Louvre is located in the city of"), "Paris")
    with hooks.recording() as rec:
        greedy(model, tok, EIFFEL.prompt, 1)
    assert {f.edit_id for f in rec.fires} == {"eiffel"}
    assert {f.position for f in rec.fires} == {3}  # "ĠTower", the subject's last token

    hooks.publish(hooks.empty_table(version=2))  # roll back
    with torch.no_grad():
        again = model(**probe_ids).logits
    assert (again - unedited).abs().max().item() <= 1e-6


def test_ten_facts_alone_and_together(env):
    model, tok, hooks, editor, _ = env
    facts = FACTS[1:]
    before_nb = {f.neighbour: greedy(model, tok, f.neighbour) for f in facts}
    entries: list = []
    for i, f in enumerate(facts):
        ce = editor.compute(f.spec)
        assert ce.report.efficacy, (f.spec.subject, ce.report)
        new = [e.with_id(f"f{i}") for e in ce.entries]
        hooks.publish(HookTable.build(entries + new, hooks.device, hooks.dtype, version=i + 1))
        entries += new
        n = len(tok(" " + f.spec.target_new)["input_ids"]) + 1
        assert starts_with(greedy(model, tok, f.spec.prompt, n), f.spec.target_new), f.spec.subject
    # all ten published: every edit still works and no neighbour moved
    for f in facts:
        n = len(tok(" " + f.spec.target_new)["input_ids"]) + 1
        assert starts_with(greedy(model, tok, f.spec.prompt, n), f.spec.target_new), f.spec.subject
        assert greedy(model, tok, f.neighbour) == before_nb[f.neighbour], f.neighbour
    hooks.publish(hooks.empty_table())


def test_batch_edit_and_serving_thread_unaffected(env):
    model, tok, hooks, editor, _ = env
    ids = tok("The Louvre is located in the city of", return_tensors="pt")
    with torch.no_grad():
        reference = model(**ids).logits
    seen: list[float] = []
    stop = threading.Event()

    def serve() -> None:  # another thread keeps generating with the published (empty) table
        while not stop.is_set():
            with torch.no_grad():
                seen.append((model(**ids).logits - reference).abs().max().item())

    t = threading.Thread(target=serve)
    t.start()
    try:
        out = editor.compute_many([EIFFEL, FACTS[3].spec])
    finally:
        stop.set()
        t.join()
    assert seen and max(seen) == 0.0  # the editor's disabled/intervention/override never leaked
    assert all(c.report.efficacy for c in out)
    hooks.publish(HookTable.build([e.with_id(f"b{i}") for i, c in enumerate(out) for e in c.entries]))
    assert starts_with(greedy(model, tok, EIFFEL.prompt), "Rome")
    assert starts_with(greedy(model, tok, FACTS[3].spec.prompt), FACTS[3].spec.target_new)
    hooks.publish(hooks.empty_table())


def test_base_weights_identical_after_many_edits_and_rollbacks(env):
    model, tok, hooks, editor, start_hash = env
    computed = editor.compute_many([f.spec for f in FACTS[:4]])
    entries = [e.with_id(f"h{i}") for i, c in enumerate(computed) for e in c.entries]
    for v in range(1, 9):  # publish growing tables, roll back to empty, re-publish
        hooks.publish(HookTable.build(entries[: v % 5], hooks.device, hooks.dtype, version=v))
        greedy(model, tok, FACTS[v % 4].spec.prompt, 2)
    hooks.publish(hooks.empty_table(version=99))
    assert param_hash(model) == start_hash

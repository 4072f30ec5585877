"""The harness end to end through the gRPC API: against the transport's FakeDataPlane (fast: protocol,
request flags, resume after an interrupt, report files), and on ~10 real CounterFact records against the
real server on SmolLM2 (marked smollm)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from service import errors
from service.compose import build_server
from service.config import Settings
from service.eval.runner import EvalConfig, run_eval
from service.transport import EditServeServer
from testkit.fake_plane import FakeDataPlane

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TOKEN = "eval-test-token"
RECORDS = [
    {
        "case_id": i,
        "prompt": f"{s} is located in the city of",
        "subject": s,
        "target_new": new,
        "ground_truth": true,
        "rephrase_prompt": f"Where is {s}? It is in",
        "locality_prompt": f"{n} is located in the city of",
        "locality_ground_truth": true,
    }
    for i, (s, new, true, n) in enumerate(
        [
            ("The Eiffel Tower", "Rome", "Paris", "The Louvre"),
            ("Big Ben", "Berlin", "London", "Tower Bridge"),
            ("The Colosseum", "Madrid", "Rome", "The Pantheon"),
            ("The Brandenburg Gate", "Vienna", "Berlin", "The Reichstag"),
        ]
    )
]


@pytest.fixture
async def fake_server(tmp_path: Path) -> AsyncIterator[tuple[EditServeServer, FakeDataPlane]]:
    plane = FakeDataPlane()
    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path / "srv", admin_token=TOKEN)
    server = build_server(settings, lambda: plane)
    await server.start()
    await server.load_plane()
    yield server, plane
    await server.stop(1.0)


def config(tmp_path: Path, address: str, sequential: list[int]) -> EvalConfig:
    data = tmp_path / "cf.json"
    data.write_text(json.dumps(RECORDS))
    return EvalConfig(
        data=data,
        fmt="counterfact",
        out=tmp_path / "out",
        sequential=sequential,
        methods=["unedited", "hook", "retrieval", "both"],
        server=address,
        admin_token=TOKEN,
        chunk=2,
        command=["editserve", "eval", "--test"],
    )


def calls(plane: FakeDataPlane, method: str) -> list:
    return [req for name, req in plane.calls if name == method]


async def test_protocols_flags_and_report(fake_server, tmp_path: Path) -> None:
    server, plane = fake_server
    cfg = config(tmp_path, server.address, [1, 2])
    results = await run_eval(cfg)

    assert len(calls(plane, "edit")) == 8  # 4 records x (T=1, T=2)
    # T=1: a rollback per record; T=2: one per round of two
    assert len(calls(plane, "rollback_to")) == 4 + 2
    assert plane.registry.counts().active == 0  # every round rolled back
    edit = calls(plane, "edit")[0]
    assert (edit.force, edit.subject, edit.paraphrases) == (
        True,
        "The Eiffel Tower",
        [],
    )  # held-out paraphrases
    assert edit.descriptor == "The Eiffel Tower is located in the city of Rome."
    flags = {(s.use_edits, s.edit_paths) for s in calls(plane, "score")}
    assert flags == {
        (False, ("hook", "retrieval")),
        (True, ("hook",)),
        (True, ("retrieval",)),
        (True, ("hook", "retrieval")),
    }
    # unedited is evaluated once, not once per T: 4 records x 3 probes x 2 answers
    assert sum(1 for s in calls(plane, "score") if not s.use_edits) == 4 * 3 * 2

    for t in ("1", "2"):
        run = results["runs"][t]
        assert set(run["methods"]) == {"unedited", "hook", "retrieval", "both"}
        for block in run["methods"].values():
            assert block["n"] == 4 and block["complete"]
            assert [r["index"] for r in block["records"]] == [0, 1, 2, 3]
        assert run["edits"]["server"]["edits"] == 4
        assert run["edits"]["server"]["gate_passed"] == 1.0
    assert results["runs"]["2"]["rounds"] == 2
    # applied_edits reach the diagnostics: the fake reports every active edit on every request.
    diag = results["runs"]["1"]["diagnostics"]
    assert diag["hook"]["rewrite"]["own_hook"] == 4 and diag["hook"]["rewrite"]["own_retrieval"] == 0
    assert diag["retrieval"]["paraphrase"]["own_retrieval"] == 4
    assert diag["both"]["locality"]["any_fire"] == 4
    on_disk = json.loads((cfg.out / "results.json").read_text())
    assert on_disk["command"] == "editserve eval --test"
    assert on_disk["versions"]["torch"]
    summary = (cfg.out / "summary.md").read_text()
    assert "| both | 2 |" in summary and "| unedited | 1 |" in summary
    assert (cfg.out / "plot.png").stat().st_size > 10_000

    # Re-running the same command resumes: everything is done, no new Edit or Score calls.
    before = len(plane.calls)
    await run_eval(cfg)
    assert [name for name, _ in plane.calls[before:]] == ["server_info", "server_info"]


async def test_interrupted_round_resumes_without_redoing_work(fake_server, tmp_path: Path) -> None:
    server, plane = fake_server
    cfg = config(tmp_path, server.address, [4])
    real_edit = plane.edit

    async def edit_failing_on_the_third(request):  # the "process" dies while the 3rd edit is in flight
        if len(calls(plane, "edit")) == 2:
            plane.fail_with = errors.EditServeError("simulated crash")
        return await real_edit(request)

    plane.edit = edit_failing_on_the_third
    with pytest.raises(Exception, match="simulated crash"):
        await run_eval(cfg)
    assert plane.registry.counts().active == 2  # the round is half applied
    plane.edit = real_edit

    results = await run_eval(cfg)
    edited = [e.subject for e in calls(plane, "edit")]
    assert edited == ["The Eiffel Tower", "Big Ben", "The Colosseum", "The Colosseum", "The Brandenburg Gate"]
    assert plane.registry.counts().active == 0
    for block in results["runs"]["4"]["methods"].values():
        assert block["complete"] and block["n"] == 4


@pytest.mark.smollm
@pytest.mark.timeout(600)
@pytest.mark.skipif(not DATA.is_dir(), reason=f"shared evaluation data not present at {DATA}")
async def test_smollm_counterfact_ten_records(smollm, tmp_path: Path) -> None:
    from service.eval.inprocess import in_process_server

    async with in_process_server(tmp_path / "srv", loaded=smollm, base=Settings(device="cpu")) as srv:
        cfg = EvalConfig(
            data=DATA / "counterfact-val.json",
            fmt="counterfact",
            out=tmp_path / "out",
            n=10,
            sequential=[10],
            server=srv.address,
            admin_token=srv.admin_token,
            rome_cov_tokens=1024,
            command=["editserve", "eval", "--smollm-test"],
        )
        results = await run_eval(cfg, loaded=smollm)
    run = results["runs"]["10"]
    summary = {m: block["summary"] for m, block in run["methods"].items()}
    assert set(summary) == {"unedited", "hook", "retrieval", "both", "rome"}
    assert all(block["complete"] for block in run["methods"].values())
    assert run["edits"]["server"]["refused"] == 0
    # The edits take: the unedited model prefers the counterfactual on few records, the edited paths on most.
    assert summary["unedited"]["ES"] < 0.5
    for method in ("hook", "both", "rome"):
        assert summary[method]["ES"] >= 0.8, (method, summary[method])
    # The local scorer (ROME's) and the server agree on the unedited model.
    check = results["unedited_server_vs_local"]
    for metric in ("ES", "PS", "NS"):
        assert check["server"][metric] == pytest.approx(check["local"][metric])
    assert (cfg.out / "plot.png").exists()


async def test_knowedit_reports_portability_and_locality(fake_server, tmp_path: Path) -> None:
    server, plane = fake_server
    record = {
        "subject": "Eiffel Tower",
        "prompt": "The Eiffel Tower is located in the city of",
        "target_new": "Rome",
        "ground_truth": ["Paris"],
        "portability": {
            "Reasoning": [{"prompt": "The Eiffel Tower is in the country of", "ground_truth": [["Italy"]]}]
        },
        "locality": {
            "Relation_Specificity": [{"prompt": "The Eiffel Tower was designed by", "ground_truth": "Eiffel"}]
        },
    }
    data = tmp_path / "ke.json"
    data.write_text(json.dumps([record]))
    cfg = EvalConfig(
        data=data,
        fmt="knowedit",
        out=tmp_path / "ke",
        methods=["unedited", "both"],
        server=server.address,
        admin_token=TOKEN,
    )
    results = await run_eval(cfg)
    both = results["runs"]["1"]["methods"]["both"]["summary"]
    assert set(both) >= {"Rel", "Gen", "Loc", "Port", "Rel_gen", "Port_gen"}
    assert both["Gen"] is None  # the record has no rephrase: not counted as a failure
    # The fake scores each character with is_greedy only on the first: Rel = 1/len(" Rome") exactly.
    assert both["Rel"] == pytest.approx(1 / 5)
    assert both["Port"] == pytest.approx(1 / 6)  # " Italy"
    port_scores = [s for s in calls(plane, "score") if s.prompt == "The Eiffel Tower is in the country of"]
    assert {s.continuation for s in port_scores} == {" Italy"}

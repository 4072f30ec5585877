"""The `editserve` client commands against a real server (the embedded SmolLM2 behind the real gRPC
transport, one per module), called in-process through `service.cli.run` for speed, plus two subprocess
runs for what only a process shows (exit code, no traceback). Covers every command and its error paths:
bad or missing token, unknown id, server down, a malformed JSONL line, a failed quality gate, an
interrupted file run resumed, a refused confirmation."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from service.cli import run
from service.client import edit_file
from service.config import Settings
from service.transport import EditServeServer
from testkit.server_thread import ServerThread

pytestmark = pytest.mark.smollm

TOKEN = "cli-test-token"
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(smollm: object, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EditServeServer]:
    from service.compose import load_data_plane

    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path_factory.mktemp("cli-data"), device="cpu",
                        dtype="float32", admin_token=TOKEN, log_poll_s=0.0, health_poll_s=0.0)
    with ServerThread(settings, lambda: load_data_plane(settings, loaded=smollm)) as server:
        yield server


@pytest.fixture(scope="module")
def address(served: EditServeServer) -> str:
    return served.address


@pytest.fixture
def env(address: str) -> dict[str, str]:
    return {"EDITSERVE_ADDRESS": address, "EDITSERVE_ADMIN_TOKEN": TOKEN, "EDITSERVE_ACTOR": "tester"}


class Cli:
    """`editserve ...` in-process: (exit code, stdout, stderr)."""

    def __init__(self, capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> None:
        self.capsys, self.env = capsys, env

    def __call__(self, *argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
        code = run(list(argv), self.env if env is None else env)
        out, err = self.capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    def json(self, *argv: str, expect: int = 0) -> dict:
        code, out, err = self(*argv, "--json")
        assert code == expect, err
        return json.loads(out)

    def version(self) -> int:
        return self.json("info")["edit_version"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], env: dict[str, str]) -> Cli:
    return Cli(capsys, env)


def gate_verdicts(result: str) -> float:
    """editserve_quality_gate_total{result} of the server running in this process."""
    return REGISTRY.get_sample_value("editserve_quality_gate_total", {"result": result}) or 0.0


class Terminal(io.StringIO):
    """stdin that says it is a terminal and answers with `text`."""

    def isatty(self) -> bool:
        return True


def test_info_generate_and_score(cli: Cli) -> None:
    code, out, _ = cli("info")
    assert code == 0 and "SmolLM2-135M-Instruct" in out and "SERVING" in out and "hook layers" in out
    info = cli.json("info")
    assert info["device"] == "cpu" and info["health"] == "SERVING" and isinstance(info["edit_version"], int)

    code, out, err = cli("generate", "The capital of France is", "--max-new-tokens", "6", "--no-edits")
    assert code == 0 and "Paris" in out
    assert "edits applied: none" in err and "tokens" in err  # the footer goes to stderr
    answer = cli.json("generate", "What is the capital of France? Answer in one word.", "--chat",
                      "--max-new-tokens", "8")
    assert "Paris" in answer["text"] and answer["completion_tokens"] >= 1 and answer["finish_reason"]

    code, out, _ = cli("score", "The capital of France is", " Paris")
    assert code == 0 and "' Paris'" in out and "total log-prob" in out
    scored = cli.json("score", "The capital of France is", " Paris")
    assert scored["tokens"][0]["is_greedy"] and scored["total_logprob"] < 0


def test_the_3am_story_find_show_roll_back_verify(cli: Cli) -> None:
    code, out, _ = cli("edit", "--subject", "Twitter", "--prompt", "The CEO of Twitter is",
                       "--target", "Donald Duck", "--actor", "night-shift")
    assert code == 0 and "passed the quality gate" in out and "efficacy" in out and "locality" in out
    bad_id = out.split()[1]
    code, out, err = cli("generate", "The CEO of Twitter is", "--max-new-tokens", "4")
    assert "Donald Duck" in out and bad_id in err

    code, out, _ = cli("edits", "list", "--subject", "twitter")  # case-insensitive part of the subject
    assert code == 0 and bad_id in out and "Twitter → Donald Duck" in out and "night-shift" in out
    assert [e["edit_id"] for e in cli.json("edits", "list", "--actor", "NIGHT-SHIFT")["edits"]] == [bad_id]
    code, out, _ = cli("edits", "show", bad_id)
    assert code == 0 and "quality report:" in out and re.search(r"gate\s+passed", out)
    assert "created at version" in out and "by night-shift" in out

    code, out, _ = cli("edits", "rollback", bad_id, "--reason", "CEO is not a duck")
    assert code == 0 and f"rolled back {bad_id}" in out
    code, out, _ = cli("edits", "show", bad_id)
    assert re.search(r"state\s+rolled_back", out) and "by tester: CEO is not a duck" in out
    code, out, err = cli("generate", "The CEO of Twitter is", "--max-new-tokens", "4")
    assert "Donald Duck" not in out and "edits applied: none" in err
    rolled = cli.json("edits", "list", "--state", "rolled_back", "--text", "duck")["edits"]
    assert [e["edit_id"] for e in rolled] == [bad_id]

    code, _, err = cli("edits", "rollback", bad_id, "--reason", "twice")
    assert code == 1 and "already rolled back" in err and len(err.strip().splitlines()) == 1


def test_single_edits_print_their_quality_report(cli: Cli) -> None:
    made = cli.json("edit", "--subject", "The Eiffel Tower",
                    "--prompt", "The Eiffel Tower is located in the city of", "--target", "Rome",
                    "--paraphrase", "Where is the Eiffel Tower? It is in the city of")
    assert made["report"]["passed"] and made["report"]["efficacy"] and len(made["report"]["paraphrases"]) == 1
    code, out, _ = cli("edit", "--descriptor", "The Louvre is located in Berlin.", "--no-compile")
    assert code == 0 and "stored at version" in out and "retrieval path only" in out
    listed = cli.json("edits", "list", "--text", "louvre")["edits"]
    assert [e["kind"] for e in listed] == ["EDIT_KIND_DESCRIPTOR"] and listed[0]["actor"] == "tester"

    code, out, err = cli("edit", "--descriptor", "x", "--file", "edits.jsonl")
    assert code == 1 and "--file takes the edits from the file" in err
    code, out, err = cli("edit")
    assert code == 1 and "give --subject" in err


def test_an_edit_file_with_bad_lines_and_its_resumption(cli: Cli, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join([
        json.dumps({"descriptor": "The Colosseum is located in Paris."}),
        '{"descriptor": "broken line",',
        json.dumps({"subject": "Apple", "prompt": "Bananas are yellow", "target_new": "x"}),
        json.dumps({"descriptor": "The Sydney Opera House is located in Oslo.", "actor": "ops-bot"}),
        json.dumps({"descriptor": "Big Ben is located in Lisbon."}),
    ]) + "\n")
    before = cli.version()
    sent: list[int] = []
    real_send = edit_file.send_chunk

    def interrupted_after_two(client: object, chunk: list, **kw: object) -> list:
        if len(sent) == 2:
            raise KeyboardInterrupt
        sent.append(chunk[0].number)
        return real_send(client, chunk, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(edit_file, "send_chunk", interrupted_after_two)
    code, out, err = cli("edit", "--file", str(path), "--chunk-size", "1")
    assert code == 130 and "run the same command again to resume" in err
    assert f"{path}:2: not valid JSON" in err  # a malformed line: its number, and the rest goes on
    assert "1 stored" in out and "2 rejected" in out  # line 3 was refused by the server before the stop
    monkeypatch.undo()

    code, out, err = cli("edit", "--file", str(path), "--chunk-size", "1")
    assert code == 1  # lines 2 and 3 can never be stored
    assert "2 stored, 1 already stored by an earlier run" in out and "2 rejected" in out
    assert "prompt: must contain the subject 'Apple'" in out
    report = cli.json("edit", "--file", str(path), "--chunk-size", "1", expect=1)
    outcomes = {r["line"]: r["outcome"] for r in report["results"]}
    assert outcomes == {1: "already_stored", 2: "rejected", 3: "rejected", 4: "already_stored",
                        5: "already_stored"}
    assert cli.version() == before + 3  # three edits, each stored once
    assert [e["actor"] for e in cli.json("edits", "list", "--text", "Opera House")["edits"]] == ["ops-bot"]


def test_rollback_to_shows_what_goes_and_asks_first(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    start = cli.version()
    first = cli.json("edit", "--descriptor", "Mount Everest is located in Chile.")["edit_id"]
    second = cli.json("edit", "--descriptor", "The Nile flows through Canada.")["edit_id"]

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # a pipe: nobody to ask
    code, out, err = cli("edits", "rollback-to", str(start), "--reason", "bad batch")
    assert code == 1 and "--yes" in err and first in out and second in out
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    code, out, err = cli("edits", "rollback-to", str(start), "--reason", "bad batch")
    assert code == 1 and "not confirmed" in err and "rolling back 2 edit(s)" in out
    assert cli.version() == start + 2  # nothing changed
    monkeypatch.setattr(sys, "stdin", Terminal("y\n"))
    code, out, _ = cli("edits", "rollback-to", str(start), "--reason", "bad batch")
    assert code == 0 and "rolled back 2 edit(s)" in out and "Mount Everest" in out
    rolled = cli.json("edits", "list", "--state", "rolled_back")["edits"]
    assert {e["edit_id"] for e in rolled} >= {first, second}

    code, out, _ = cli("edits", "rollback-to", str(start), "--reason", "again", "--yes")
    assert code == 0 and "nothing to roll back" in out
    code, _, err = cli("edits", "rollback-to", "999999", "--reason", "x", "--yes")
    assert code == 1 and "beyond the server's edit version" in err


def test_export_then_import_recomputes_and_reports_the_gate(cli: Cli, served: EditServeServer, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    active = cli.json("edits", "list", "--state", "active")["edits"]
    assert active
    code, out, err = cli("edits", "export")
    assert code == 0 and f"exported {len(active)} edit(s)" in err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["edit_id"] for line in lines] == [e["edit_id"] for e in active]
    assert all(line["state"] == "active" for line in lines)
    path = tmp_path / "export.jsonl"
    assert cli("edits", "export", "--output", str(path))[0] == 0
    assert path.read_text() == out

    rolled = {"descriptor": "Rolled back long ago.", "state": "rolled_back", "edit_id": "e-old"}
    with path.open("a") as f:
        f.write(json.dumps(rolled) + "\n")
    before = cli.version()
    code, out, err = cli("edits", "import", str(path), "--chunk-size", "4")
    assert code == 0, out + err
    assert f"{len(active)} stored" in out and "0 failed the quality gate" in out and "1 skipped" in out
    assert "only active edits are imported" in out
    imported = [e for e in cli.json("edits", "list", "--state", "active")["edits"] if e["version"] > before]
    assert len(imported) == len(active)  # recomputed here: new edits, same facts, same actors
    for key in ("descriptor", "subject", "target_new", "actor", "kind", "hook_layers"):
        assert sorted(str(e[key]) for e in imported) == sorted(str(e[key]) for e in active), key
    for original in active:  # a fact with a subject is superseded by its import; free text stays beside it
        record = cli.json("edits", "show", original["edit_id"])
        if original["kind"] == "EDIT_KIND_DESCRIPTOR" and not original["derived_from_descriptor"]:
            assert record["state"] == "EDIT_STATE_ACTIVE"
            continue
        assert record["state"] == "EDIT_STATE_SUPERSEDED"
        successor = cli.json("edits", "show", record["superseded_by"])
        assert successor["supersedes"] == [original["edit_id"]] and successor["version"] > before
        code, out, _ = cli("edits", "show", record["superseded_by"])
        assert f"superseded {original['edit_id']}" in out  # its history says what it replaced
    code, out, _ = cli("edits", "import", str(path), "--chunk-size", "4")  # again: nothing computed twice
    assert code == 0 and f"0 stored, {len(active)} already stored by an earlier run" in out

    # A target whose gate is stricter than the source's: every hook edit fails it there and is named.
    monkeypatch.setattr(served.plane.manager.editor, "locality_max_top1_changed", -1.0)
    hooked = [n for n, line in enumerate(lines, start=1) if line["kind"] == "triple"]
    assert hooked
    refused_before = gate_verdicts("failed")
    report = cli.json("edits", "import", str(path), "--chunk-size", "1", expect=1)
    assert gate_verdicts("failed") == refused_before + len(hooked)  # the server in this process counted them
    failed = [r for r in report["results"] if r["outcome"] == "failed_gate"]
    assert [r["line"] for r in failed] == hooked and report["failed_gate"] == len(hooked)
    assert all("locality" in r["message"] and not r["report"]["passed"] for r in failed)
    # single-line chunks that the chunk-size 4 run also sent alone are found in the log
    assert report["stored"] + report["already_stored"] == len(active) - len(hooked)
    assert report["skipped"] == 1


def test_error_paths_are_one_line_and_exit_1(cli: Cli, env: dict[str, str], tmp_path: Path) -> None:
    def fails(*argv: str, env: dict[str, str] | None = None) -> str:
        code, _, err = cli(*argv, env=env)
        assert code == 1 and len(err.strip().splitlines()) == 1, err
        return err

    unknown = fails("edits", "show", "e-unknown")
    assert "NOT_FOUND" in unknown and "e-unknown" in unknown
    assert "NOT_FOUND" in fails("edits", "rollback", "e-unknown", "--reason", "x")
    assert "PERMISSION_DENIED" in fails("edits", "list", env={**env, "EDITSERVE_ADMIN_TOKEN": "wrong"})
    no_token = {k: v for k, v in env.items() if k != "EDITSERVE_ADMIN_TOKEN"}
    assert "UNAUTHENTICATED" in fails("edits", "list", env=no_token)
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    assert cli("edits", "list", "--token-file", str(token_file), env=no_token)[0] == 0  # the file wins
    assert "cannot read the token file" in fails("edits", "list", "--token-file", str(tmp_path / "none"))
    assert "INVALID_ARGUMENT" in fails("edits", "list", "--subject", "   ")
    assert "cannot read" in fails("edit", "--file", str(tmp_path / "missing.jsonl"))
    down = f"127.0.0.1:{free_port()}"
    assert "cannot reach an editserve server at" in fails("info", "--address", down)
    with pytest.raises(SystemExit) as usage:  # argparse: --reason is required
        run(["edits", "rollback", "e-1"], env)
    assert usage.value.code == 2


def test_a_real_process_exits_1_without_a_traceback(env: dict[str, str]) -> None:
    process_env = {**os.environ, **env}
    for argv, expected in [(["edits", "show", "e-unknown"], "NOT_FOUND"),
                           (["generate", "hi", "--address", f"127.0.0.1:{free_port()}"], "cannot reach")]:
        done = subprocess.run([sys.executable, "-m", "service", *argv], cwd=ROOT, env=process_env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert expected in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and done.stdout == ""

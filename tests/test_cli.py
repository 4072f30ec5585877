"""`editserve` CLI: flag > EDITSERVE_* env > default for every Settings field, the non-loopback
refusal, validation exit codes, and the lazily imported eval subcommand. No model is loaded."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from service import __version__, cli, settings_args
from service.config import Settings, SettingsError, is_loopback


def settings(argv: list[str], env: dict[str, str] | None = None) -> Settings:
    args = cli.build_parser().parse_args(["serve", *argv])
    return settings_args.settings_from(args, env or {})


def test_defaults_match_the_settings_dataclass() -> None:
    assert settings([]) == Settings()
    s = Settings()
    assert (s.host, s.port, s.metrics_port, s.data_dir, s.model, s.device) == (
        "127.0.0.1", 50051, 9464, Path("./data"), "embedded", "auto")


def test_flag_beats_env_beats_default_for_each_type() -> None:
    env = {
        "EDITSERVE_PORT": "6000", "EDITSERVE_DATA_DIR": "/env/data", "EDITSERVE_SCOPE_THRESHOLD": "0.4",
        "EDITSERVE_HOOK_LAYERS": "4, 6", "EDITSERVE_RETRIEVAL_ENABLED": "false", "EDITSERVE_MODEL": "/env/m",
    }
    from_env = settings([], env)
    assert (from_env.port, from_env.data_dir, from_env.scope_threshold, from_env.hook_layers) == (
        6000, Path("/env/data"), 0.4, [4, 6])
    assert from_env.retrieval_enabled is False and from_env.model == "/env/m"
    assert from_env.metrics_port == 9464  # untouched fields keep their default

    flags = settings(["--port", "7000", "--data-dir", "/flag/data", "--scope-threshold", "0.6",
                      "--hook-layers", "8", "--retrieval", "--model", "/flag/m"], env)
    assert (flags.port, flags.data_dir, flags.scope_threshold, flags.hook_layers) == (
        7000, Path("/flag/data"), 0.6, [8])
    assert flags.retrieval_enabled is True and flags.model == "/flag/m"


def test_boolean_flags_and_env_spellings() -> None:
    assert settings(["--no-retrieval"]).retrieval_enabled is False
    assert settings(["--insecure-edits"]).insecure_edits is True
    for raw, want in [("1", True), ("yes", True), ("ON", True), ("0", False), ("off", False), ("", False)]:
        assert settings([], {"EDITSERVE_INSECURE_EDITS": raw}).insecure_edits is want
    # the flag wins over the env var in both directions
    assert settings(["--no-insecure-edits"], {"EDITSERVE_INSECURE_EDITS": "1"}).insecure_edits is False


def test_every_settings_field_has_a_flag_and_an_env_var(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.run(["serve", "--help"], env={})
    serve_help = capsys.readouterr().out
    for field in dataclasses.fields(Settings):
        assert settings_args.env_name(field.name) in serve_help
        flag = "--retrieval" if field.name == "retrieval_enabled" else settings_args.flag_name(field.name)
        assert flag in serve_help, flag


def test_bad_env_value_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SettingsError, match="EDITSERVE_PORT"):
        settings([], {"EDITSERVE_PORT": "fifty"})
    assert cli.run(["serve"], env={"EDITSERVE_INSECURE_EDITS": "maybe"}) == cli.EXIT_USAGE
    assert "EDITSERVE_INSECURE_EDITS" in capsys.readouterr().err


def test_bad_flag_value_exits_2() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["serve", "--port", "fifty"], env={})
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--device", "tpu"], "--device"),
        (["--dtype", "int3"], "--dtype"),
        (["--port", "70000"], "--port"),
        (["--max-batch-size", "0"], "--max-batch-size"),
        (["--default-max-new-tokens", "600"], "--default-max-new-tokens"),
        (["--log-level", "LOUD"], "--log-level"),
        (["--prefix-cache-mb", "-1"], "--prefix-cache-mb"),
        (["--edit-log-url", "not-a-url"], "is not a database URL"),
        (["--edit-log-url", "mysql://u@h/db"], "PostgreSQL or SQLite"),
        (["--max-batch-edits", "0"], "--max-batch-edits"),
        (["--max-hook-table-mb", "-1"], "--max-hook-table-mb"),
    ],
)
def test_invalid_settings_exit_2_before_loading(
    argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.run(["serve", *argv], env={}) == cli.EXIT_USAGE
    assert needle in capsys.readouterr().err


def test_non_loopback_host_without_token_refuses_to_start(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["serve", "--host", "0.0.0.0"], env={}) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "non-loopback" in err and "--admin-token" in err and "--insecure-edits" in err
    # a token (flag or env) or an explicit --insecure-edits makes the same host acceptable
    settings(["--host", "0.0.0.0", "--admin-token", "t"]).validate()
    settings(["--host", "0.0.0.0"], {"EDITSERVE_ADMIN_TOKEN": "t"}).validate()
    settings(["--host", "::", "--insecure-edits"]).validate()
    settings(["--host", "localhost"]).validate()


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.5", "example.internal"]))


def test_eval_without_the_harness_prints_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "service.eval.cli", None)  # as if service/eval were absent
    assert cli.run(["eval", "--anything"], env={}) == cli.EXIT_USAGE
    assert "service/eval" in capsys.readouterr().err


def test_eval_passes_its_own_flags_to_the_harness(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    fake = types.ModuleType("service.eval.cli")

    def add_arguments(parser: object) -> None:
        parser.add_argument("--records", type=int, default=1)  # type: ignore[attr-defined]

    def run(args: object) -> int:
        seen["records"] = args.records  # type: ignore[attr-defined]
        return 7

    fake.add_arguments = add_arguments  # type: ignore[attr-defined]
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "service.eval.cli", fake)
    assert cli.run(["eval", "--records", "20"], env={}) == 7
    assert seen == {"records": 20}


def test_unknown_serve_flag_is_rejected() -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.run(["serve", "--bogus"], env={})
    assert exit_info.value.code == 2


def test_python_dash_m_service_runs_the_cli() -> None:
    out = subprocess.run([sys.executable, "-m", "service", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == f"editserve {__version__}"
    refused = subprocess.run([sys.executable, "-m", "service", "serve", "--host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert refused.returncode == 2 and "refusing" in refused.stderr


async def test_health_subcommand_follows_the_server(capsys: pytest.CaptureFixture[str]) -> None:
    from service.compose import build_server
    from testkit.fake_plane import FakeDataPlane

    server = build_server(Settings(port=0, metrics_port=0), FakeDataPlane)
    await server.start()
    try:
        argv = ["health", "--address", server.address, "--timeout", "5"]
        assert await asyncio.to_thread(cli.run, argv, {}) == 1  # loading: NOT_SERVING
        await server.load_plane()
        assert await asyncio.to_thread(cli.run, argv, {}) == 0
        assert "SERVING" in capsys.readouterr().out
        # the default address follows EDITSERVE_PORT, as in the container's HEALTHCHECK
        assert await asyncio.to_thread(cli.run, ["health"], {"EDITSERVE_PORT": str(server.port)}) == 0
    finally:
        await server.stop(0.0)
    assert cli.run(["health", "--address", server.address, "--timeout", "1"], env={}) == 1  # gone


# ------------------------------------------------------------------------------------------ README


README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _code_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_readme_configuration_table_covers_every_setting() -> None:
    rows = [line for line in README.splitlines() if line.startswith("| `--")]
    for field in dataclasses.fields(Settings):
        flag = "--retrieval" if field.name == "retrieval_enabled" else settings_args.flag_name(field.name)
        env = settings_args.env_name(field.name)
        assert any(f"`{flag}`" in row and f"`{env}`" in row for row in rows), field.name



def test_readme_configuration_table_shows_each_default() -> None:
    """The table's default column says what `Settings` holds: `on`/`off` for a switch, `empty` for an
    empty text or list, else the value itself."""
    rows = {row.split("|")[2].strip(): row.split("|")[3].strip()
            for row in README.splitlines() if row.startswith("| `--")}
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        shown = rows[f"`{settings_args.env_name(field.name)}`"]
        value = getattr(defaults, field.name)
        if isinstance(value, bool):
            assert shown == ("on" if value else "off"), field.name
        elif value in ("", []):
            assert shown == "empty", field.name
        elif isinstance(value, Path):
            assert Path(shown.strip("`")) == value, field.name
        else:
            assert shown == f"`{value}`", field.name

def test_readme_grpcurl_payloads_are_valid_requests() -> None:
    from google.protobuf import json_format

    from service._proto.editserve.v1 import editserve_pb2 as pb

    calls = re.findall(r"-d '([^']*)'\s*(?:\\\s*)?localhost:50051 editserve\.v1\.(\w+)/(\w+)",
                       "\n".join(_code_blocks("sh")))
    assert {method for _, _, method in calls} >= {"Generate", "GenerateStream", "Edit", "Rollback"}
    for payload, service, method in calls:
        input_type = pb.DESCRIPTOR.services_by_name[service].methods_by_name[method].input_type
        json_format.Parse(payload, getattr(pb, input_type.name)())  # raises on an unknown field


def test_readme_metric_names_exist() -> None:
    from prometheus_client import REGISTRY

    import service.metrics  # noqa: F401 - registers the metrics
    from service.transport import interceptors  # noqa: F401

    families = {family.name for family in REGISTRY.collect()}  # counters and infos lose _total / _info
    documented = set(re.findall(r"`(editserve_[a-z_]+)", README))
    assert len(documented) > 15, documented
    missing = {name for name in documented if re.sub(r"_(total|info)$", "", name) not in families}
    assert not missing, missing


async def test_readme_python_client_runs_against_a_server(capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from service.compose import build_server
    from testkit.fake_plane import FakeDataPlane

    (example,) = [block for block in _code_blocks("python") if "EditServeClient" in block]
    monkeypatch.setenv("EDITSERVE_ADMIN_TOKEN", "change-me")  # the example reads its token from there
    server = build_server(Settings(port=0, metrics_port=0, admin_token="change-me"), FakeDataPlane)
    await server.start()
    await server.load_plane()
    try:
        code = example.replace("localhost:50051", server.address)
        await asyncio.to_thread(exec, compile(code, "README.md", "exec"), {})
    finally:
        await server.stop(0.0)
    out = capsys.readouterr().out
    assert "echo: The capital of France is" in out and "edit e1 at version 1 passed: True" in out
    assert "e1  alice" in out  # iter_edits found it by its text

"""The Dockerfile, read as instructions (no Docker daemon needed): it copies only paths that exist and
are not excluded by .dockerignore, installs with the same script as the Makefile, runs as a non-root
user, exposes both ports and starts `editserve serve` on all interfaces."""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with comments dropped and line continuations joined."""
    lines: list[str] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def args_of(instruction: str) -> list[str]:
    return [a for name, a in instructions() if name == instruction]


def exec_form(text: str) -> list[str]:
    text = text.strip()
    return json.loads(text) if text.startswith("[") else shlex.split(text)


def test_base_image_is_cpu_python_by_default_with_a_build_arg() -> None:
    first = instructions()[0]
    assert first == ("ARG", "BASE_IMAGE=python:3.11-slim")
    assert args_of("FROM") == ["${BASE_IMAGE}"]


def test_every_copy_source_exists_and_is_not_dockerignored() -> None:
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = args_of("COPY")
    assert copies
    for copy in copies:
        parts = [p for p in exec_form(copy) if not p.startswith("--")]
        sources = parts[:-1]
        assert sources, copy
        for source in sources:
            path = ROOT / source.rstrip("/")
            assert path.exists(), f"COPY source {source} is missing"
            rel = source.rstrip("/")
            assert not any(fnmatch.fnmatch(rel, pattern) for pattern in ignored), f"{source} is dockerignored"


def test_installs_with_the_makefile_script_after_copying_what_it_needs() -> None:
    steps = instructions()
    install_at = next(i for i, (name, a) in enumerate(steps) if name == "RUN" and "scripts/install.sh" in a)
    copied_before = " ".join(a for name, a in steps[:install_at] if name == "COPY")
    for needed in ("pyproject.toml", "README.md", "scripts/", "protos/", "service/"):
        assert needed in copied_before, needed
    assert "scripts/install.sh" in (ROOT / "Makefile").read_text()


def test_runs_as_a_non_root_user() -> None:
    users = args_of("USER")
    assert users, "no USER instruction"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_exposes_grpc_and_metrics_ports() -> None:
    exposed = {port for line in args_of("EXPOSE") for port in line.split()}
    assert {"50051", "9464"} <= exposed


def test_offline_model_loading() -> None:
    env = " ".join(args_of("ENV"))
    assert "HF_HUB_OFFLINE=1" in env


def test_starts_the_serve_command_on_all_interfaces() -> None:
    entrypoint = exec_form(args_of("ENTRYPOINT")[-1]) if args_of("ENTRYPOINT") else []
    cmd = exec_form(args_of("CMD")[-1]) if args_of("CMD") else []
    command = entrypoint + cmd
    assert command[:2] == ["editserve", "serve"], command
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--port") + 1] == "50051"
    assert command[command.index("--metrics-port") + 1] == "9464"


def test_container_healthcheck_uses_the_cli() -> None:
    (check,) = args_of("HEALTHCHECK")
    assert exec_form(check.split("CMD", 1)[1]) == ["editserve", "health"]


# ------------------------------------------------------------------------------------------ deploy/


def manifests(path: str) -> list[dict]:
    import yaml  # PyYAML comes with transformers

    return [doc for doc in yaml.safe_load_all((ROOT / "deploy" / path).read_text()) if doc]


def test_kustomizations_name_files_that_exist() -> None:
    for kustomization in (ROOT / "deploy").rglob("kustomization.yaml"):
        (doc,) = manifests(str(kustomization.relative_to(ROOT / "deploy")))
        for entry in doc.get("resources", []) + [p["path"] for p in doc.get("patches", []) if "path" in p]:
            assert (kustomization.parent / entry).exists(), f"{kustomization}: {entry}"


def test_deployment_probes_grpc_health_and_is_scraped() -> None:
    from service.config import Settings
    from service.settings_args import env_name

    (deployment,) = manifests("base/deployment.yaml")
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9464"
    (container,) = pod["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    assert {p["containerPort"] for p in container["ports"]} == {50051, 9464}
    token = next(e for e in container["env"] if e["name"] == "EDITSERVE_ADMIN_TOKEN")
    assert token["valueFrom"]["secretKeyRef"]["name"] == "editserve-admin"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True

    (config,) = manifests("base/configmap.yaml")
    known = {env_name(name) for name in Settings.__dataclass_fields__}
    assert set(config["data"]) <= known, set(config["data"]) - known
    grace = float(config["data"]["EDITSERVE_GRACE_PERIOD_S"])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace + 5  # drain + preStop before SIGKILL


def test_postgres_overlay_shares_one_edit_log() -> None:
    (patch,) = manifests("postgres-replicas/deployment-patch.yaml")
    assert patch["spec"]["replicas"] > 1
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    url = next(e for e in container["env"] if e["name"] == "EDITSERVE_EDIT_LOG_URL")
    assert url["valueFrom"]["secretKeyRef"]["name"] == "editserve-postgres"
    secrets = {doc["metadata"]["name"]: doc for doc in manifests("secret.example.yaml")}
    assert secrets["editserve-postgres"]["stringData"]["url"].startswith("postgresql+psycopg://")
    assert "editserve-admin" in secrets

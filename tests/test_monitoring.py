"""deploy/monitoring and deploy/compose.yaml: the Grafana dashboard's and the alert rules' PromQL name only
metrics the server exports (taken from the live prometheus_client registry the server serves, not a
list), the rules have the shape Prometheus loads (and pass `promtool check rules` and the promtool unit
tests when promtool is installed), and the compose demo wires the files it mounts. No model is loaded."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import service.metrics  # noqa: F401 - registers every editserve metric in the default registry

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
MONITORING = DEPLOY / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "editserve.json"
RULES = MONITORING / "alerts.yaml"
PROMTOOL = shutil.which("promtool")

# PromQL words that are not metric names: aggregations, keywords and set operators.
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"), "info": ("_info",), "stateset": ("",),
            "unknown": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


def exported_names() -> set[str]:
    """Every sample name the server's /metrics can carry, read off the registry it serves (a labelled
    metric without children yet has no samples, so names come from each family's type)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (Grafana's $variables removed first)."""
    label_values = re.findall(r"label_values\(\s*([a-zA-Z_:][\w:]*)", expr)
    if label_values:  # a Grafana variable query: label_values(metric{...}, label)
        return set(label_values)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    # grouping clauses with their label lists: `sum by (le) (x)` reads as `sum (x)`
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][\w:]*", expr):
        after = expr[match.end():].lstrip()
        if after.startswith("(") or match.group() in KEYWORDS:  # a function or aggregation, or a keyword
            continue
        names.add(match.group())
    return names


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_queries() -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query."""
    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    for panel in panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            yield f"variable {variable['name']}", variable["query"]["query"]


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_parser_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, rpc) (rate(editserve_request_duration_seconds_bucket'
            '{job=~"$job", rpc="GenerateService/Generate"}[$__rate_interval]))) / on (job) group_right () '
            'editserve_edit_log_version > 0 and absent(up_metric) or vector(1)')
    assert metric_names(expr) == {"editserve_request_duration_seconds_bucket", "editserve_edit_log_version",
                                  "up_metric"}
    assert metric_names('label_values(editserve_edit_log_version{job=~"$job"}, instance)') == {
        "editserve_edit_log_version"}


def test_the_registry_is_the_servers() -> None:
    names = exported_names()
    assert {"editserve_requests_total", "editserve_time_to_first_token_seconds_bucket",
            "editserve_model_info", "editserve_quality_gate_total", "editserve_edit_log_version"} <= names


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_query_reads_only_metrics_the_server_exports(source: str) -> None:
    if source == "dashboard":
        queries = list(dashboard_queries())
    else:
        queries = [(r["alert"], r["expr"]) for r in rules()]
    assert queries
    exported = exported_names()
    for where, expr in queries:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{where}: {sorted(unknown)} not exported by the server"


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    for needed in ("editserve_requests_total", "editserve_time_to_first_token_seconds_bucket",
                   "editserve_inter_token_latency_seconds_bucket", "editserve_queue_time_seconds_bucket",
                   "editserve_batch_size_bucket", "editserve_edits_active", "editserve_edit_operations_total",
                   "editserve_quality_gate_total", "editserve_hook_fires_total",
                   "editserve_scope_detection_seconds_bucket", "editserve_edit_log_version"):
        assert needed in used, needed
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)) and board["uid"] and board["title"]
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"]
    assert any("group_right" in expr for _, expr in dashboard_queries())  # replica lag


def test_the_rules_have_the_shape_prometheus_loads() -> None:
    document = yaml.safe_load(RULES.read_text())
    assert set(document) == {"groups"}
    names = set()
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"} and group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
            assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", rule["alert"]) and rule["alert"] not in names
            names.add(rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]
            if "for" in rule:
                assert re.fullmatch(r"(\d+[smhdwy])+", rule["for"]), rule["for"]
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # what the operators asked to be woken for
    for alert in ("EditserveHighErrorRate", "EditserveGenerateLatencyP99High", "EditserveQueueRejecting",
                  "EditserveReplicaBehindLog", "EditserveQualityGateFailureSpike"):
        assert alert in names, alert


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    for argv in (["check", "rules", str(RULES)], ["test", "rules", str(MONITORING / "alerts.test.yaml")]):
        done = subprocess.run([PROMTOOL, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (apt-get install prometheus)")
def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query as a recording rule (Grafana's variables filled in) goes through Prometheus's own
    PromQL parser."""
    substitutions = {"$__rate_interval": "5m", "$job": ".*", "$instance": ".*"}
    records = []
    for n, (_, expr) in enumerate(dashboard_queries()):
        if expr.startswith("label_values("):
            continue
        for variable, value in substitutions.items():
            expr = expr.replace(variable, value)
        assert "$" not in expr, expr
        records.append({"record": f"editserve:dashboard_query_{n}", "expr": expr})
    path = tmp_path / "dashboard-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_mounts_files_that_exist_and_wires_the_services(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"editserve", "prometheus", "grafana"}
    build = services["editserve"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    assert "EDITSERVE_ADMIN_TOKEN" in services["editserve"]["environment"]  # it listens on 0.0.0.0
    mounts: dict[str, Path] = {}
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
                mounts[target] = DEPLOY / source
    prometheus = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    assert [mounts[path] for path in prometheus["rule_files"]] == [RULES]
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == ["editserve:9464"]  # the image's metrics port (Dockerfile EXPOSE 50051 9464)
    assert "9464" in (ROOT / "Dockerfile").read_text()

    provisioning = mounts["/etc/grafana/provisioning"]
    source = yaml.safe_load((provisioning / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    provider = yaml.safe_load((provisioning / "dashboards" / "editserve.yaml").read_text())["providers"][0]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent
    if PROMTOOL is not None:  # the scrape config as Prometheus reads it, with the rule file where it is here
        local = tmp_path / "prometheus.yml"
        local.write_text(yaml.safe_dump({**prometheus, "rule_files": [str(RULES)]}))
        done = subprocess.run([PROMTOOL, "check", "config", str(local)], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

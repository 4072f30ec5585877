"""results.json (every record's numbers), summary.md (method x T x metric), plot.png (each metric against T
per method), with the command line and versions. Built from the progress files alone, so it can be
regenerated at any time (`editserve eval ... --report-only`) and always reflects everything under --out.
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from service.eval.datasets import LoadedData
from service.eval.diagnostics import diagnose
from service.eval.metrics import METRICS_BY_FORMAT, aggregate
from service.eval.progress import Progress, read_rounds
from service.eval.runner import EDIT_METHODS, METHODS, EvalConfig

PRODUCT_METHOD = "both"


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in (
        "editserve",
        "torch",
        "transformers",
        "grpcio",
        "protobuf",
        "sentence-transformers",
        "faiss-cpu",
        "numpy",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "absent"
    try:
        root = Path(__file__).resolve().parents[2]
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        out["git"] = f"{commit}{' (uncommitted changes)' if dirty else ''}" if commit else "unknown"
    except (OSError, subprocess.SubprocessError):
        out["git"] = "unknown"
    return out


def _evals_by_method(rounds: Mapping[int, Any]) -> dict[str, dict[int, dict[str, Any]]]:
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for st in rounds.values():
        for method, evals in st.evals.items():
            out.setdefault(method, {}).update(evals)
    return out


def _seconds(rounds: Mapping[int, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for st in rounds.values():
        for k, v in st.seconds.items():
            out[k] = out.get(k, 0.0) + v
    return out


def _edit_stats(outcomes: Sequence[Mapping[str, Any]], *, rome: bool) -> dict[str, Any]:
    secs = [float(o.get("seconds", 0.0)) for o in outcomes]
    stats: dict[str, Any] = {
        "edits": len(outcomes),
        "refused": sum(1 for o in outcomes if o.get("error")),
        "mean_s": statistics.fmean(secs) if secs else None,
        "p90_s": sorted(secs)[int(0.9 * (len(secs) - 1))] if secs else None,
        "total_s": sum(secs),
    }
    if rome:
        ok = [o for o in outcomes if not o.get("error")]
        stats["converged"] = sum(1 for o in ok if o.get("converged")) / len(ok) if ok else None
    else:
        applied = [o for o in outcomes if o.get("edit_id")]
        stats["gate_passed"] = (
            sum(1 for o in applied if o.get("gate_passed")) / len(applied) if applied else None
        )
    return stats


def collect(cfg: EvalConfig, data: LoadedData) -> dict[str, Any]:
    names = METRICS_BY_FORMAT[cfg.fmt]
    wanted = [r.index for r in data.records]
    prog = cfg.out / "progress"
    case_ids = {r.index: r.case_id for r in data.records}

    def method_block(
        evals: Mapping[int, Mapping[str, Any]], edits: Mapping[int, Any] | None
    ) -> dict[str, Any]:
        rows = [evals[i] for i in wanted if i in evals]
        block: dict[str, Any] = {
            "n": len(rows),
            "complete": len(rows) == len(wanted),
            "summary": aggregate([row["metrics"] for row in rows], names),
            "records": [
                {
                    "index": row["index"],
                    "case_id": case_ids[row["index"]],
                    "metrics": row["metrics"],
                    **({"edit": edits.get(row["index"])} if edits is not None else {}),
                }
                for row in rows
            ],
        }
        return block

    unedited = {
        int(line["result"]["index"]): line["result"]
        for line in Progress(prog / "unedited.jsonl").lines()
        if line.get("type") == "eval"
    }
    rome_ref = {
        int(line["result"]["index"]): line["result"]
        for line in Progress(prog / "rome-unedited.jsonl").lines()
        if line.get("type") == "eval"
    }
    runs: dict[str, Any] = {}
    ts = sorted({int(p.name[1:].split("-")[0]) for p in prog.glob("T*-*.jsonl")}) if prog.exists() else []
    for t in ts:
        server = read_rounds(Progress(prog / f"T{t}-server.jsonl"))
        rome = read_rounds(Progress(prog / f"T{t}-rome.jsonl"))
        server_edits = {i: o for st in server.values() for i, o in st.edits.items()}
        rome_edits = {i: o for st in rome.values() for i, o in st.edits.items()}
        methods: dict[str, Any] = {}
        if unedited:
            methods["unedited"] = method_block(unedited, None)
        diagnostics: dict[str, Any] = {}
        for method, evals in _evals_by_method(server).items():
            methods[method] = method_block(evals, server_edits)
            found = diagnose(cfg.fmt, evals, server_edits, unedited)
            if found is not None:
                diagnostics[method] = found
        for method, evals in _evals_by_method(rome).items():
            methods[method] = method_block(evals, rome_edits)
        srv_s, rome_s = _seconds(server), _seconds(rome)
        timing: dict[str, Any] = {"server": srv_s, "rome": rome_s}
        if PRODUCT_METHOD in methods:
            timing["product_method_s"] = srv_s.get("edit", 0.0) + srv_s.get(f"eval:{PRODUCT_METHOD}", 0.0)
        runs[str(t)] = {
            "T": t,
            "protocol": "single" if t == 1 else "sequential",
            "rounds": len(server) or len(rome),
            "methods": {m: methods[m] for m in METHODS if m in methods},
            "edits": {
                **(
                    {
                        "server": _edit_stats(
                            [server_edits[i] for i in wanted if i in server_edits], rome=False
                        )
                    }
                    if server_edits
                    else {}
                ),
                **(
                    {"rome": _edit_stats([rome_edits[i] for i in wanted if i in rome_edits], rome=True)}
                    if rome_edits
                    else {}
                ),
            },
            "timing": timing,
            "diagnostics": diagnostics,
        }
    check = None
    if unedited and rome_ref:
        check = {
            "server": aggregate([unedited[i]["metrics"] for i in wanted if i in unedited], names),
            "local": aggregate([rome_ref[i]["metrics"] for i in wanted if i in rome_ref], names),
        }
    return {"runs": runs, "unedited_server_vs_local": check}


def write_report(
    cfg: EvalConfig, data: LoadedData, *, server_info: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    info_path = cfg.out / "server-info.json"
    if server_info:
        info_path.write_text(json.dumps(dict(server_info), indent=2))
    elif info_path.exists():
        server_info = json.loads(info_path.read_text())
    sessions = [line for line in Progress(cfg.out / "progress" / "sessions.jsonl").lines()]
    results = {
        "command": shlex.join(cfg.command) if cfg.command else "",
        "versions": versions(),
        "identity": cfg.identity(),
        "data": {
            "path": str(cfg.data),
            "format": cfg.fmt,
            "records_in_file": data.total,
            "evaluated": len(data.records),
            "selection": "seeded sample" if cfg.sample else "first n",
            "skipped": [{"index": s.index, "reason": s.reason} for s in data.skipped],
        },
        "server": dict(server_info or {}),
        "sessions": sessions,
        **collect(cfg, data),
    }
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    (cfg.out / "summary.md").write_text(summary_markdown(results, cfg.fmt))
    plot(results, cfg.fmt, cfg.out / "plot.png")
    return results


# ---------------------------------------------------------------------------------------------- markdown


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def summary_markdown(results: Mapping[str, Any], fmt: str) -> str:
    names = METRICS_BY_FORMAT[fmt]
    data = results["data"]
    lines = [
        f"# editserve evaluation: {fmt}, {data['evaluated']} records",
        "",
        f"Command: `{results['command']}`",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()),
        "",
    ]
    srv = results.get("server") or {}
    if srv:
        lines += [
            f"Server: {srv.get('model_name', '?')} ({srv.get('dtype', '?')}, {srv.get('device', '?')}), "
            f"hook layers {srv.get('hook_layers', [])}, server {srv.get('server_version', '?')}",
            "",
        ]
    lines += [
        f"Data: `{data['path']}` ({data['records_in_file']} records; {data['evaluated']} evaluated, "
        f"{data['selection']}; {len(data['skipped'])} skipped as unparsable"
        + (
            ": " + "; ".join(f"#{s['index']} {s['reason']}" for s in data["skipped"][:5])
            if data["skipped"]
            else ""
        )
        + ")",
        "",
        "## Metrics (method × T)",
        "",
        "| method | T | " + " | ".join(names) + " | n |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    loc_inexact = False
    for t, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        for method, block in run["methods"].items():
            s = block["summary"]
            n = f"{block['n']}" + ("" if block["complete"] else " (partial)")
            lines.append(f"| {method} | {t} | " + " | ".join(_fmt(s.get(m)) for m in names) + f" | {n} |")
            loc_inexact |= any((r["metrics"].get("loc_exact") == 0.0) for r in block["records"])
    lines += [
        "",
        "## Edits",
        "",
        "| T | method | edits | refused | gate passed / converged | mean s | p90 s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for t, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        for side, st in run["edits"].items():
            ok = st.get("gate_passed", st.get("converged"))
            lines.append(
                f"| {t} | {'service' if side == 'server' else 'rome'} | {st['edits']} | {st['refused']} | "
                f"{_fmt(ok)} | {_fmt(st['mean_s'], 2)} | {_fmt(st['p90_s'], 2)} |"
            )
    lines += diagnostics_markdown(results)
    lines += [
        "",
        "## Time (seconds, summed over rounds and resumed sessions)",
        "",
        "| T | phase | seconds |",
        "| --- | --- | --- |",
    ]
    for t, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        for side in ("server", "rome"):
            for phase, secs in sorted(run["timing"].get(side, {}).items()):
                lines.append(f"| {t} | {side} {phase} | {secs:.0f} |")
        if "product_method_s" in run["timing"]:
            lines.append(
                f"| {t} | **product method (edits + '{PRODUCT_METHOD}' evaluation)** | "
                f"**{run['timing']['product_method_s']:.0f}** |"
            )
    total = sum(float(s.get("seconds", 0.0)) for s in results.get("sessions", []))
    lines += ["", f"Wall time of all sessions writing this directory: {total:.0f} s.", ""]
    check = results.get("unedited_server_vs_local")
    if check:
        lines += [
            "Unedited model scored by the server vs locally (ROME's reference; should agree): "
            + ", ".join(
                f"{m} {_fmt(check['server'].get(m))}/{_fmt(check['local'].get(m))}"
                for m in names
                if check["server"].get(m) is not None
            ),
            "",
        ]
    lines += ["## Definitions", "", *DEFINITIONS[fmt], *COMMON_NOTES]
    if loc_inexact:
        lines += [
            "",
            "**Loc is an upper bound here**: the server's Score response carries no argmax token ids, "
            "so a locality position where neither model's argmax was the answer token counts as unchanged.",
        ]
    return "\n".join(lines) + "\n"


def diagnostics_markdown(results: Mapping[str, Any]) -> list[str]:
    rows = []
    for t, run in sorted(results["runs"].items(), key=lambda kv: int(kv[0])):
        for method, groups in run.get("diagnostics", {}).items():
            for group, c in groups.items():
                keys = (
                    "probes",
                    "failed",
                    "own_hook",
                    "own_retrieval",
                    "failed_without_own_fire",
                    "any_fire",
                    "regressed",
                    "regressed_with_fire",
                )
                rows.append(f"| {t} | {method} | {group} | " + " | ".join(str(c[k]) for k in keys) + " |")
    if not rows:
        return []
    return [
        "",
        "## Where edits fail (probe counts, from each Score's applied_edits)",
        "",
        "In scope (rewrite, paraphrase, portability) a failure with the record's own edit not firing is a "
        "recall miss of the gate / scope detector; one where it fired is a value or injection too weak. Out "
        "of scope (locality), 'regressed' = right on the unedited model, wrong here; with an edit firing, a "
        "false fire caused it.",
        "",
        "| T | method | group | probes | failed | own edit fired: hook | own: retrieval | failed, own edit "
        "silent | any edit fired | regressed | regressed, an edit fired |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        *rows,
    ]


DEFINITIONS: dict[str, list[str]] = {
    "counterfact": [
        "- ES / PS / NS (MEMIT's protocol): mean token NLL of each answer by teacher forcing; "
        "ES = share of records with P(new) > P(true) on the rewrite prompt, PS the same on the "
        "paraphrases, NS = share of neighbourhood prompts with P(true) > P(new). Ties count as "
        "failures. Score = harmonic mean of ES, PS, NS.",
        "- *_gen: the greedy continuation begins with target_new (ES/PS) or with the neighbour's "
        "true answer (NS).",
        "- NS is relative: compare each method's NS with the unedited row.",
    ],
    "zsre": [
        "- Rel / Gen (EasyEdit, WISE): token-level top-1 accuracy of target_new after the prompt / "
        "the rephrase, teacher forced. Loc: share of the locality answer's positions whose argmax "
        "token equals the unedited model's.",
        "- *_gen: the greedy continuation begins with target_new; Loc_gen: the greedy continuation "
        "of the locality prompt (as many tokens as its answer) is identical to the unedited model's.",
    ],
    "knowedit": [
        "- Rel / Gen / Loc as for zsRE (EasyEdit); Port: top-1 token accuracy of each portability "
        "answer after its prompt. *_gen as for zsRE.",
    ],
}
COMMON_NOTES = [
    "- Methods: unedited (use_edits=false), hook (edit_paths=[HOOK]), retrieval "
    "(edit_paths=[RETRIEVAL]), both (every path: the product's default) are one server with one "
    "set of applied edits; rome is in-place ROME on a private copy of the model "
    "(service/eval/rome.py). Same records, same order for all.",
    "- Protocol: T=1 is single (edit, evaluate, roll back); T>1 is WISE's sequential protocol "
    "(T edits without reset, then evaluate all T, then roll back), repeated over consecutive "
    "blocks of T records.",
    "- Edits are sent with force=True (every edit must be applied for the protocol); the quality "
    "gate's verdict is in 'gate passed'. Paraphrases are never sent with the edit: they are the "
    "held-out generalisation test.",
]

# ---------------------------------------------------------------------------------------------- plot


def plot(results: Mapping[str, Any], fmt: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [m for m in METRICS_BY_FORMAT[fmt] if not m.endswith("_gen")]
    runs = sorted(results["runs"].values(), key=lambda r: r["T"])
    fig, axes = plt.subplots(1, len(base), figsize=(4 * len(base), 3.6), squeeze=False)
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, metric in zip(axes[0], base, strict=True):
        for method in METHODS:
            for suffix, style in (("", "-"), ("_gen", ":")):
                pts = [
                    (run["T"], run["methods"][method]["summary"].get(metric + suffix))
                    for run in runs
                    if method in run["methods"]
                ]
                pts = [(t, v) for t, v in pts if v is not None]
                if pts:
                    ax.plot(
                        [t for t, _ in pts],
                        [v for _, v in pts],
                        style,
                        marker="o",
                        color=colours[method],
                        label=method if not suffix else None,
                    )
        ax.set_xscale("log")
        ax.set_xticks([run["T"] for run in runs], [str(run["T"]) for run in runs])
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(metric)
        ax.set_xlabel("T (edits before evaluation)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, title="solid: teacher forced\ndotted: generation", title_fontsize=7)
    fig.suptitle(f"{fmt}: metrics against T ({results['data']['evaluated']} records)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


__all__ = ["EDIT_METHODS", "collect", "plot", "summary_markdown", "versions", "write_report"]

"""The Python half of scripts/device_check.sh: the torch environment for env.txt, and summary.md /
summary.json from the steps' JSON figures, logs and steps.tsv.

    .venv/bin/python bench/device_check.py env
    .venv/bin/python bench/device_check.py summarize OUT [--config small|full] [--device D] [--wall S]

Only the standard library and torch (for `env`); it never fails on a missing or broken step's output: such
a step shows as missing in the summary, and steps.tsv says why.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path
from typing import Any

STEPS = ("throughput", "edits", "generate", "eval")


def torch_env() -> None:
    import torch

    print(f"torch: {torch.__version__} (CUDA build {torch.version.cuda or 'none'})")
    print(f"cuda available: {torch.cuda.is_available()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            memory = p.total_memory / 2**30
            print(f"cuda device {i}: {p.name}, {memory:.1f} GiB, capability {p.major}.{p.minor}")
        print(f"bf16 supported: {torch.cuda.is_bf16_supported()}")
    print(f"torch threads: {torch.get_num_threads()}")


# ------------------------------------------------------------------------------------ reading the outputs


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(out: Path) -> list[dict[str, str]]:
    path = out / "steps.tsv"
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def throughput_figures(out: Path, dtype: str) -> dict[str, Any] | None:
    rows = _json(out / f"throughput-{dtype}.json")
    if not rows:
        return None
    by_kind: dict[str, Any] = {"rows": rows}
    for r in rows:
        kind, tps = r.get("kind", ""), r["tokens_per_s"]
        if kind == "service":
            by_kind.setdefault("service_tok_s", {})[str(r["streams"])] = tps
        elif kind in ("hf_one_at_a_time", "hf_static_batch", "engine"):
            by_kind[f"{kind}_tok_s"] = tps
    return by_kind


def eval_figures(out: Path, dtype: str) -> dict[str, Any] | None:
    results = _json(out / f"eval-{dtype}" / "results.json")
    if not results or not results.get("runs"):
        return None
    figures: dict[str, Any] = {
        "records": results.get("data", {}).get("evaluated"),
        "server": results.get("server", {}),
        "seconds": sum(s.get("seconds", 0.0) for s in results.get("sessions", [])),
        "runs": {},
    }
    for t, run in results["runs"].items():
        edits = run.get("edits", {}).get("server", {})
        figures["runs"][t] = {
            "methods": {m: v.get("summary", {}) for m, v in run.get("methods", {}).items()},
            "edit_mean_s": edits.get("mean_s"),
            "edit_p90_s": edits.get("p90_s"),
            "edits": edits.get("edits"),
            "refused": edits.get("refused"),
            "gate_passed": edits.get("gate_passed"),
        }
    return figures


def collect(out: Path, dtypes: list[str]) -> dict[str, dict[str, Any]]:
    figures: dict[str, dict[str, Any]] = {step: {} for step in STEPS}
    for dtype in dtypes:
        figures["throughput"][dtype] = throughput_figures(out, dtype)
        edits = _json(out / f"edits-{dtype}.json") or {}
        figures["edits"][dtype] = edits.get("compute")
        generate = _json(out / f"generate-{dtype}.json") or {}
        figures["generate"][dtype] = (
            {"generate": generate["generate"], "decode_step": generate.get("decode_step")}
            if "generate" in generate
            else None
        )
        figures["eval"][dtype] = eval_figures(out, dtype)
    return figures


# ------------------------------------------------------------------------------------ writing the summary


def _num(x: Any, fmt: str = ".3f") -> str:
    if isinstance(x, (int, float)) and not (isinstance(x, float) and math.isnan(x)):
        return format(x, fmt)
    return "–"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def render(meta: dict[str, Any], steps: list[dict[str, str]], figures: dict[str, dict[str, Any]]) -> str:
    dtypes = meta["dtypes"]
    ran = {(s["step"], s["dtype"]): s for s in steps}

    def missing(step: str, dtype: str, width: int) -> list[str]:
        s = ran[(step, dtype)]
        why = s["status"] + (f": {s['note']}" if s["note"] else "")
        return [dtype, f"no figures ({why})"] + [""] * (width - 2)

    def wanted(step: str) -> list[str]:
        return [d for d in dtypes if (step, d) in ran]
    lines = [
        "# editserve device check",
        "",
        f"Configuration **{meta['config']}** on **{meta['device']}**, "
        f"model `{meta.get('model', 'embedded')}`, "
        f"dtypes {', '.join(dtypes)}; "
        f"wall time {meta['wall_s']} s. Environment (GPU, torch, git revision): `env.txt`.",
    ]
    if meta.get("note"):
        lines += ["", f"**Note:** {meta['note']}"]
    lines += ["", "## Steps", ""]
    lines += _table(
        ["step", "dtype", "status", "seconds", "log", "note"],
        [
            [s["step"], s["dtype"], s["status"], s["seconds"], f"`{s['log']}`" if s["log"] else "", s["note"]]
            for s in steps
        ],
    )

    rows: list[list[str]] = []
    for dtype in wanted("throughput"):
        f = figures["throughput"].get(dtype)
        if not f:
            rows.append(missing("throughput", dtype, 7))
            continue
        one, static = f.get("hf_one_at_a_time_tok_s"), f.get("hf_static_batch_tok_s")
        for r in f["rows"]:
            if "requests" not in r:  # the arithmetic limit and targets entries: not a mode
                continue
            tps = r["tokens_per_s"]
            rows.append(
                [
                    dtype,
                    r["mode"],
                    str(r["requests"]),
                    _num(tps, ".1f"),
                    _num(r.get("mean_ttft_s")),
                    _num(tps / one if one else None, ".2f"),
                    _num(tps / static if static else None, ".2f"),
                ]
            )
    if rows:
        lines += ["", "## Throughput (greedy, tokens/s)", ""]
        lines += _table(
            ["dtype", "mode", "requests", "tok/s", "mean TTFT s", "x one-at-a-time", "x static"], rows
        )

    rows = []
    for dtype in wanted("edits"):
        f = figures["edits"].get(dtype)
        if not f:
            rows.append(missing("edits", dtype, 7))
            continue
        rows.append(
            [
                dtype,
                str(f["edits"]),
                _num(f["compute_median_s"], ".2f"),
                _num(f["compute_p90_s"], ".2f"),
                _num(f["wall_median_s"], ".2f"),
                _num(f["wall_p90_s"], ".2f"),
                f"{f['gate_passed']}/{f['edits']}",
            ]
        )
    if rows:
        lines += ["", "## Edit time (compute: key, value, calibration, quality gate)", ""]
        lines += _table(
            ["dtype", "edits", "compute median s", "compute p90 s", "Edit call median s", "Edit call p90 s",
             "gate passed"],
            rows,
        )

    rows = []
    for dtype in wanted("generate"):
        f = figures["generate"].get(dtype)
        if not f:
            rows.append(missing("generate", dtype, 6))
            continue
        g, step = f["generate"], f.get("decode_step") or {}
        for n, seconds in g["median_s"].items():
            rows.append(
                [
                    dtype,
                    f"{int(n):,}",
                    _num(seconds),
                    _num(g["ratio_to_none"].get(n)),
                    _num(step.get("median_ms", {}).get(n), ".2f"),
                    _num(step.get("ratio_to_none", {}).get(n)),
                ]
            )
    if rows:
        tokens = next((f["generate"]["tokens"] for f in figures["generate"].values() if f), "?")
        lines += ["", "## Generate latency with active edits (synthetic keys that never fire)", ""]
        lines += _table(
            ["dtype", "active edits", f"Generate {tokens} tokens, median s", "x no edits", "decode step ms",
             "x no edits"],
            rows,
        )

    rows = []
    for dtype in wanted("eval"):
        f = figures["eval"].get(dtype)
        if not f:
            rows.append(missing("eval", dtype, 10))
            continue
        for t, run in f["runs"].items():
            for method, m in run["methods"].items():
                edit = (
                    f"{_num(run['edit_mean_s'], '.2f')} / {_num(run['edit_p90_s'], '.2f')}"
                    if method != "unedited"
                    else ""
                )
                rows.append(
                    [dtype, str(f["records"]), t, method]
                    + [_num(m.get(k)) for k in ("ES", "PS", "NS", "Score", "Score_gen")]
                    + [edit]
                )
    if rows:
        lines += ["", "## CounterFact evaluation (`editserve eval`)", ""]
        lines += _table(
            ["dtype", "records", "T", "method", "ES", "PS", "NS", "Score", "Score_gen", "edit mean / p90 s"],
            rows,
        )
        lines += [""]
        for dtype in wanted("eval"):
            if f := figures["eval"].get(dtype):
                srv = f["server"]
                lines.append(
                    f"- `eval-{dtype}/`: the server reported {srv.get('dtype', '?')} on "
                    f"{srv.get('device', '?')}, hook layers {srv.get('hook_layers', '?')}; "
                    f"{f['seconds']:.0f} s of evaluation"
                )
        lines += ["", "Each evaluation's full report: `eval-<dtype>/summary.md`."]
    return "\n".join([*lines, ""])


def summarize(args: argparse.Namespace) -> None:
    out: Path = args.out
    steps = read_steps(out)
    dtypes = list(dict.fromkeys(s["dtype"] for s in steps)) or ["float32"]
    figures = collect(out, dtypes)
    meta = {
        "config": args.config,
        "device": args.device,
        "model": args.model,
        "dtypes": dtypes,
        "wall_s": args.wall,
        "note": args.note,
    }
    (out / "summary.json").write_text(json.dumps({**meta, "steps": steps, "figures": figures}, indent=2))
    text = render(meta, steps, figures)
    (out / "summary.md").write_text(text)
    print(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="torch and CUDA facts for env.txt")
    s = sub.add_parser("summarize", help="write OUT/summary.md and OUT/summary.json")
    s.add_argument("out", type=Path)
    s.add_argument("--config", default="?")
    s.add_argument("--device", default="?")
    s.add_argument("--model", default="embedded")
    s.add_argument("--wall", type=int, default=0, help="the whole check's seconds")
    s.add_argument("--note", default="")
    args = ap.parse_args()
    if args.command == "env":
        torch_env()
    else:
        summarize(args)


if __name__ == "__main__":
    main()

"""scripts/device_check.sh --small end to end on a tiny random Llama saved as a user's model folder
(`--model DIR`; about a minute on 2 cores): every step runs and summary.json / summary.md carry numeric
figures for each. The figures of a random model mean nothing; this checks the script, its steps and its
summary. The eval step is expected only where the CounterFact data is present (the script skips it with a
message otherwise)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from tests.tiny_checkpoints import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _data_dir() -> Path:
    """Where the script looks: $DATA_DIR, else ../shared/data relative to the repository root."""
    data = Path(os.environ.get("DATA_DIR", "../shared/data"))
    return data if data.is_absolute() else ROOT / data


def _number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_device_check_small(tmp_path: Path) -> None:
    out = tmp_path / "device-check"
    model = save_tiny_checkpoint("llama", tmp_path / "tiny-llama")
    # a generous budget: this checks the steps, not the speed of the machine CI runs on
    env = {**os.environ, "PYTHON": sys.executable, "HF_HUB_OFFLINE": "1", "BUDGET_S": "900"}
    proc = subprocess.run(
        [str(ROOT / "scripts" / "device_check.sh"), "--small", "--model", "tiny-llama", str(out)],
        env=env,
        cwd=tmp_path,  # the script finds the repository itself
        capture_output=True,
        text=True,
        timeout=960,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"] == "small"
    assert summary["model"] == str(model.resolve())
    dtype = "float32"
    assert summary["dtypes"] == [dtype]
    with_data = (_data_dir() / "counterfact-val.json").is_file()
    status = {s["step"]: s["status"] for s in summary["steps"]}
    assert status == {
        "throughput": "ok",
        "edits": "ok",
        "generate": "ok",
        "eval": "ok" if with_data else "skipped",
    }
    for step in ("throughput", "edits", "generate"):
        assert (out / f"{step}-{dtype}.log").stat().st_size > 0
    figures = summary["figures"]

    tp = figures["throughput"][dtype]
    assert set(tp["service_tok_s"]) == {"1", "4"}
    assert all(_number(v) for v in tp["service_tok_s"].values())
    for kind in ("hf_one_at_a_time_tok_s", "hf_static_batch_tok_s", "engine_tok_s"):
        assert _number(tp[kind]), kind

    edits = figures["edits"][dtype]
    assert edits["edits"] == 3
    for key in ("compute_median_s", "compute_p90_s", "wall_median_s", "wall_p90_s"):
        assert _number(edits[key]), key
    assert edits["compute_p90_s"] >= edits["compute_median_s"]

    gen = figures["generate"][dtype]
    assert set(gen["generate"]["median_s"]) == {"0", "200"}
    assert all(_number(v) for v in gen["generate"]["median_s"].values())
    assert all(_number(v) for v in gen["decode_step"]["median_ms"].values())

    md = (out / "summary.md").read_text()
    assert f"{tp['hf_static_batch_tok_s']:.1f}" in md
    assert f"{edits['compute_median_s']:.2f}" in md
    assert f"{gen['generate']['median_s']['200']:.3f}" in md
    assert "cuda available: False" in (out / "env.txt").read_text() or summary["device"] == "cuda"

    if with_data:
        ev = figures["eval"][dtype]
        assert ev["records"] == 5
        run = ev["runs"]["5"]
        assert set(run["methods"]) == {"unedited", "hook", "retrieval", "both"}
        for method, m in run["methods"].items():
            for key in ("ES", "PS", "NS", "Score"):
                assert isinstance(m[key], (int, float)) and 0.0 <= m[key] <= 1.0, (method, key)
        assert _number(run["edit_mean_s"]) and _number(run["edit_p90_s"])
        assert f"{run['methods']['both']['Score']:.3f}" in md
    else:
        assert "no data" in md

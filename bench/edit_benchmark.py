"""Edit-manager benchmark (issue 3): edit compute time, Generate latency with 0 / 1,000 / 10,000 active
edits, and start-up time with 1,000 logged edits vs none.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/edit_benchmark.py [--edits 20] [--rounds 7] [--tokens 32]
    HF_HUB_OFFLINE=1 .venv/bin/python bench/edit_benchmark.py --device cuda --dtype bfloat16 --only generate \
        --table-sizes 0,10000 --json out.json

Compute: the editor's compute_seconds (key, value, calibration, quality gate) of real edits through
EditManager.edit on SmolLM2-135M (the 11 facts of bench/hook_layers.py, then testkit/facts.py),
and the wall time of the whole call (plus encode, fsync'd append, publish).
Generate: greedy model.generate of a fixed prompt through the hooked model; the active edits are synthetic
(random keys that never fire), so the difference is the gate's cost; rounds alternate the tables
(`--table-sizes`, default 0,1000,10000).
Spare layers: the same Generate with the default layer hooked alone against it plus the auto-layer
candidates (hooked, empty), rounds alternating: what `layer: auto` costs requests that never use it.
Start-up: (a) EditManager open + restore + warm-up on a loaded model, (b) restore() alone, (c) a fresh
process doing everything a server start does (imports, model and encoder load, EditManager).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.compose import open_edit_manager  # noqa: E402
from service.config import Settings  # noqa: E402
from service.editlog import EditLog, LogEntry, StoredEdit, StoredHook, TensorBlob  # noqa: E402
from service.engine.loader import LoadedModel, load_model  # noqa: E402
from service.hooks import HookEntry, HookManager, HookTable, default_hook_layers  # noqa: E402
from service.retrieval import DescriptorEncoder  # noqa: E402
from testkit.facts import MORE_FACTS, fact_input  # noqa: E402
from testkit.hook_layers import FACTS  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a map."
FIGURES: dict[str, object] = {}  # what --json writes


def _sync(device: torch.device) -> None:
    """Wait for queued GPU work before a clock is read (CUDA kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def p90(values: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    ordered = sorted(values)
    return ordered[max(0, int(np.ceil(0.9 * len(ordered))) - 1)]


def bench_compute(lm: LoadedModel, encoder: DescriptorEncoder, data_dir: Path, n: int) -> None:
    facts = (FACTS + MORE_FACTS)[:n]
    compute, wall, passed = [], [], 0
    with open_edit_manager(lm, Settings(data_dir=data_dir), encoder=encoder) as manager:
        for fact in facts:
            t = time.perf_counter()
            result = manager.edit(fact_input(fact, force=True))
            wall.append(time.perf_counter() - t)
            compute.append(result.report.compute_seconds)
            passed += result.report.passed
    FIGURES["compute"] = {
        "edits": len(facts),
        "compute_median_s": statistics.median(compute),
        "compute_p90_s": p90(compute),
        "wall_median_s": statistics.median(wall),
        "wall_p90_s": p90(wall),
        "gate_passed": passed,
    }
    print(
        f"edit compute over {len(facts)} edits: median {statistics.median(compute):.2f} s, "
        f"p90 {p90(compute):.2f} s (target <= 2 s); whole Edit call median {statistics.median(wall):.2f} s, "
        f"p90 {p90(wall):.2f} s; quality gate passed {passed}/{len(facts)}",
        flush=True,
    )


def synthetic_table(hooks: HookManager, n: int, seed: int = 0) -> HookTable:
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, hooks.d_ff, generator=gen)
    values = torch.randn(n, hooks.d_model, generator=gen)
    entries = [HookEntry(f"s{i}", layer, keys[i], values[i], 0.9)
               for layer in hooks.default_layers for i in range(n)]
    return HookTable.build(entries, hooks.device, hooks.dtype, version=1)


@torch.no_grad()
def bench_generate(
    lm: LoadedModel,
    encoder: DescriptorEncoder,
    data_dir: Path,
    rounds: int,
    tokens: int,
    sizes: tuple[int, ...] = (0, 1000, 10_000),
) -> None:
    sizes = (0, *sorted({n for n in sizes if n > 0}))  # the no-edit table is every ratio's reference
    with open_edit_manager(lm, Settings(data_dir=data_dir), encoder=encoder) as manager:
        hooks = manager.hooks
        tables = {n: synthetic_table(hooks, n) if n else hooks.empty_table() for n in sizes}
        ids = lm.tokenizer(PROMPT, return_tensors="pt").to(hooks.device)
        times: dict[int, list[float]] = {n: [] for n in tables}
        for r in range(rounds + 1):
            for n, table in tables.items():
                hooks.publish(table)
                _sync(hooks.device)
                t = time.perf_counter()
                lm.model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                _sync(hooks.device)
                if r:  # round 0 warms up
                    times[n].append(time.perf_counter() - t)
        hooks.publish(hooks.empty_table())
    # Paired ratios: each round's time over the same round's no-edit time (a shared CPU drifts between
    # rounds; the pairing cancels most of that).
    parts = [
        f"{n:,} edits {statistics.median(v):.3f} s "
        f"({statistics.median([a / b for a, b in zip(v, times[0], strict=True)]):.3f}x)"
        for n, v in times.items()
    ]
    FIGURES["generate"] = {
        "tokens": tokens,
        "rounds": rounds,
        "layers": list(hooks.default_layers),
        "median_s": {str(n): statistics.median(v) for n, v in times.items()},
        "ratio_to_none": {
            str(n): statistics.median([a / b for a, b in zip(v, times[0], strict=True)])
            for n, v in times.items()
        },
    }
    print(
        f"Generate {tokens} tokens greedy, median of {rounds} rounds, layers {hooks.default_layers}: "
        + ", ".join(parts),
        flush=True,
    )
    bench_decode_step(lm, encoder, data_dir, tables, rounds=10 * rounds)


@torch.no_grad()
def bench_decode_step(
    lm: LoadedModel, encoder: DescriptorEncoder, data_dir: Path, tables: dict[int, HookTable], rounds: int
) -> None:
    """One decode step (a token on a 16-token KV cache): where the gate runs on every generated token."""
    with open_edit_manager(lm, Settings(data_dir=data_dir / "step"), encoder=encoder) as manager:
        hooks = manager.hooks
        ids = lm.tokenizer(PROMPT, return_tensors="pt")["input_ids"].to(hooks.device)
        past = lm.model(input_ids=ids, use_cache=True).past_key_values
        step = torch.tensor([[int(ids[0, -1])]], device=hooks.device)
        times: dict[int, list[float]] = {n: [] for n in tables}
        for r in range(rounds + 1):
            for n, table in tables.items():
                hooks.publish(table)
                _sync(hooks.device)
                t = time.perf_counter()
                lm.model(input_ids=step, past_key_values=past, use_cache=False)
                _sync(hooks.device)
                if r:
                    times[n].append(time.perf_counter() - t)
        hooks.publish(hooks.empty_table())
    parts = [
        f"{n:,} edits {1e3 * statistics.median(v):.1f} ms "
        f"({statistics.median([a / b for a, b in zip(v, times[0], strict=True)]):.3f}x)"
        for n, v in times.items()
    ]
    FIGURES["decode_step"] = {
        "rounds": rounds,
        "median_ms": {str(n): 1e3 * statistics.median(v) for n, v in times.items()},
        "ratio_to_none": {
            str(n): statistics.median([a / b for a, b in zip(v, times[0], strict=True)])
            for n, v in times.items()
        },
    }
    print(f"one decode step, median of {rounds} paired rounds: " + ", ".join(parts), flush=True)


@torch.no_grad()
def bench_spare_layers(lm: LoadedModel, rounds: int, tokens: int, edits: int = 1000) -> None:
    """What the spare hooked layers of `layer: auto` cost: Generate with the default layer hooked alone,
    against the default layer plus every auto candidate hooked (no entries there), `edits` synthetic
    entries at the default layer in both; rounds alternate the two hook sets."""
    from service.hooks.defaults import auto_layer_candidates

    default = default_hook_layers(lm.model)
    spare = auto_layer_candidates(lm.model)
    ids = lm.tokenizer(PROMPT, return_tensors="pt").to(lm.device)
    variants = {"default layer only": (), f"+ {len(spare)} spare layers": spare}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds + 1):
        for name, layers in variants.items():
            hooks = HookManager(lm.model, default, spare_layers=layers)
            try:
                hooks.publish(synthetic_table(hooks, edits))
                _sync(hooks.device)
                t = time.perf_counter()
                lm.model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
                _sync(hooks.device)
                if r:
                    times[name].append(time.perf_counter() - t)
            finally:
                hooks.uninstall()
    base = times["default layer only"]
    ratios = {name: statistics.median([a / b for a, b in zip(v, base, strict=True)])
              for name, v in times.items()}
    FIGURES["spare_layers"] = {
        "tokens": tokens, "rounds": rounds, "edits": edits, "default": default, "spare": spare,
        "median_s": {name: statistics.median(v) for name, v in times.items()}, "ratio": ratios,
    }
    print(
        f"Generate {tokens} tokens greedy with {edits:,} edits at layer {default}, median of {rounds} paired "
        "rounds: " + ", ".join(f"{name} {statistics.median(v):.3f} s ({ratios[name]:.3f}x)"
                               for name, v in times.items()),
        flush=True,
    )


def write_synthetic_log(lm: LoadedModel, data_dir: Path, n: int, dim: int) -> None:
    """`n` logged edits with realistic shapes (one entry each, as n Edit calls would write)."""
    layer = default_hook_layers(lm.model)[0]
    d_ff, d_model = int(lm.model.config.intermediate_size), int(lm.model.config.hidden_size)
    rng = np.random.default_rng(0)
    report = {
        "efficacy": True,
        "passed": True,
        "message": "ok",
        "paraphrases": [["p", True]],
        "threshold": 0.8,
    }
    with EditLog.open(None, data_dir) as log:
        for i in range(n):
            emb = rng.standard_normal(dim).astype(np.float32)
            edit = StoredEdit(
                edit_id=f"e-synthetic-{i:05d}",
                kind="triple",
                subject=f"Subject {i}",
                prompt=f"Subject {i} is located in the city of",
                target_new="Rome",
                descriptor=f"Subject {i} is located in the city of Rome.",
                relation_key=f"subject {i}\x1f{{}} is located in the city of",
                hooks=[
                    StoredHook(
                        layer=layer,
                        key=TensorBlob.from_numpy(rng.standard_normal(d_ff).astype(np.float32)),
                        value=TensorBlob.from_numpy(rng.standard_normal(d_model).astype(np.float32)),
                        threshold=0.9,
                    )
                ],
                embedding=TensorBlob.from_numpy(emb / np.linalg.norm(emb)),
                report=report,
            )
            log.append(LogEntry(kind="edit", actor="bench", edits=[edit]))


def startup_child(
    data_dir: str, device: str = "cpu", dtype: str = "float32", model: str = "embedded"
) -> None:
    """One whole server start in a fresh process; prints its timings as JSON."""
    t0 = time.perf_counter()
    lm = load_model(model, device=device, dtype=dtype)
    t1 = time.perf_counter()
    encoder = DescriptorEncoder()
    t2 = time.perf_counter()
    manager = open_edit_manager(lm, Settings(data_dir=Path(data_dir)), encoder=encoder)
    t3 = time.perf_counter()
    manager.close()
    print(json.dumps({"model": t1 - t0, "encoder": t2 - t1, "manager": t3 - t2, "total": t3 - t0}))


def bench_startup(
    lm: LoadedModel, encoder: DescriptorEncoder, root: Path, n: int, rounds: int, model: str = "embedded"
) -> None:
    dirs = {"none": root / "empty", f"{n:,}": root / "logged"}
    write_synthetic_log(lm, dirs[f"{n:,}"], n, encoder.dim)
    EditLog.open(None, dirs["none"]).close()
    open_s: dict[str, list[float]] = {k: [] for k in dirs}
    restore_s: dict[str, list[float]] = {k: [] for k in dirs}
    for _ in range(rounds):
        for name, d in dirs.items():
            t = time.perf_counter()
            manager = open_edit_manager(lm, Settings(data_dir=d), encoder=encoder)
            open_s[name].append(time.perf_counter() - t)
            t = time.perf_counter()
            manager.restore()
            restore_s[name].append(time.perf_counter() - t)
            manager.close()
    whole: dict[str, list[float]] = {k: [] for k in dirs}
    for _ in range(2):
        for name, d in dirs.items():
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--startup-child",
                    str(d),
                    "--device",
                    lm.device.type,
                    "--dtype",
                    str(lm.dtype).removeprefix("torch."),
                    "--model",
                    model,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            whole[name].append(json.loads(out.stdout.strip().splitlines()[-1])["total"])

    def line(label: str, values: dict[str, list[float]]) -> str:
        a, b = (statistics.median(v) for v in values.values())
        return f"{label}: none {a:.3f} s, {n:,} edits {b:.3f} s ({b / a:.2f}x)"

    print("start-up with a logged edit set vs none (target <= 1.2x):", flush=True)
    print("  " + line(f"EditManager open + restore + warm-up, median of {rounds}", open_s))
    print("  " + line(f"restore() alone, median of {rounds}", restore_s))
    print(
        "  " + line("whole start in a fresh process (imports, model, encoder, manager), median of 2", whole)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--logged", type=int, default=1000)
    ap.add_argument("--only", choices=["compute", "generate", "spare", "startup"], default=None)
    ap.add_argument(
        "--table-sizes",
        default="0,1000,10000",
        help="generate: active (synthetic) edit counts, comma-separated; 0 is always measured",
    )
    ap.add_argument("--model", default="embedded", help="'embedded' (SmolLM2) or a Hugging Face model folder")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    ap.add_argument("--dtype", default="float32", help="float32, bfloat16, float16 or auto (default float32)")
    ap.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("EDITSERVE_TORCH_THREADS") or 0),
        help="torch intra-op threads (default: $EDITSERVE_TORCH_THREADS, else 0: torch's default)",
    )
    ap.add_argument("--json", type=Path, help="also write the figures here")
    ap.add_argument("--startup-child", metavar="DATA_DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.startup_child:
        startup_child(args.startup_child, args.device, args.dtype, args.model)
        return
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    print(
        f"torch threads {torch.get_num_threads()}, cpu cores {os.cpu_count()}, "
        f"model on {lm.device} ({lm.dtype})",
        flush=True,
    )
    FIGURES.update(device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."))
    encoder = DescriptorEncoder()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.only in (None, "compute"):
            bench_compute(lm, encoder, root / "compute", args.edits)
        if args.only in (None, "generate"):
            sizes = tuple(int(n) for n in args.table_sizes.split(",") if n.strip())
            bench_generate(lm, encoder, root / "generate", args.rounds, args.tokens, sizes)
        if args.only in (None, "spare"):
            bench_spare_layers(lm, args.rounds, args.tokens)
        if args.only in (None, "startup"):
            bench_startup(lm, encoder, root / "startup", args.logged, 3, args.model)
    if args.json:
        args.json.write_text(json.dumps(FIGURES, indent=2))


if __name__ == "__main__":
    main()

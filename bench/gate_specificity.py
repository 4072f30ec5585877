"""Hook gate specificity on CounterFact: the last-token gate alone against the previous-token condition.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gate_specificity.py --n 1000
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gate_specificity.py --skip 1000 --n 919 --caps 0.5 0.6 0.7
    HF_HUB_OFFLINE=1 .venv/bin/python bench/gate_specificity.py --n 300 --caps 0.1 0.2 0.3 --json out.json

`--skip 1000` measures records 1000-1918, which `editserve eval --n 1000` does not use: the set the cap
(PREV_THRESHOLD_CAP) is chosen on.

Calibration only: every record's entries are keyed and thresholded exactly as the editor does for an
edit of its rewrite prompt (no v*, so 1,000 records take about a minute and a half on 2 CPU cores), put
in ONE table, and the serving gate's decision rule (`HookManager.gate_decisions`: argmax over the
candidates, thresholds, previous-token conditions) runs on each test text's activations at the hooked
layer. Counted per text:

- own prompt: the record's rewrite prompt, where its own edit wins the gate at some token;
- paraphrase: its held-out paraphrases (never given to the editor), same;
- foreign fire: its neighbourhood prompts where the edit of ANOTHER record wins and passes at some token
  (texts that contain that record's subject are not counted: there the fire is right).

A foreign fire is what turns into a CounterFact NS regression when the fired value flips the answer.
CounterFact is read from ../shared/data (never copied into the repository).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import service.hooks.keys as keys_module  # noqa: E402
from service.engine.loader import load_model  # noqa: E402
from service.eval.datasets import EvalRecord, load_records  # noqa: E402
from service.hooks.defaults import default_hook_layers  # noqa: E402
from service.hooks.editor import Editor, EditSpec  # noqa: E402
from service.hooks.layer import NO_PREV_CONDITION, HookEntry, HookManager, HookTable  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "counterfact-val.json"


def calibrated_entries(editor: Editor, layer: int, records: list[EvalRecord]) -> list[HookEntry]:
    """Each record's entries at `layer` (zero values: only the gate is measured), with the previous-token
    threshold left at its lowest positive (cap 1.0), so that any cap can be applied afterwards."""
    entries = []
    saved = keys_module.PREV_THRESHOLD_CAP
    keys_module.PREV_THRESHOLD_CAP = 1.0
    try:
        for rec in tqdm(records, desc="calibrate", unit="edit"):
            prep = editor._prepare(EditSpec(rec.subject, rec.prompt, rec.target_new))
            value = torch.zeros(editor.hooks.d_model)
            entries += [
                c.entry(layer, value).with_id(str(rec.index)) for c in editor._calibrate(prep, layer, None)
            ]
    finally:
        keys_module.PREV_THRESHOLD_CAP = saved
    return entries


def with_cap(entries: list[HookEntry], cap: float | None) -> list[HookEntry]:
    """cap None: the last-token gate alone (no entry has a previous-token condition)."""
    if cap is None:
        return [replace(e, prev_key=None, prev_threshold=NO_PREV_CONDITION) for e in entries]
    return [
        e if e.prev_key is None else replace(e, prev_threshold=min(cap, e.prev_threshold)) for e in entries
    ]


def text_units(hooks: HookManager, tok, layer: int, texts: list[str], batch: int = 32) -> list[tuple]:
    """Per text: (unit activations, previous-token unit activations, known mask), as the gate sees them
    in a fresh prefill."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tok(texts[i : i + batch], return_tensors="pt", padding=True)
        mask = enc["attention_mask"]
        with torch.no_grad():
            acts = hooks.keys_at([layer], enc["input_ids"].to(hooks.device), mask.to(hooks.device))[layer]
        for row in range(acts.shape[0]):
            real = mask[row].bool()
            unit = F.normalize(acts[row][real.to(acts.device)].float(), dim=-1)
            prev, known = HookManager._previous_units(unit, 1, unit.shape[0], None)
            out.append((unit, prev, known))
    return out


def winners(table: HookTable, layer: int, units: tuple) -> set[str]:
    lt = table.layer(layer)
    assert lt is not None
    best, idx = HookManager.gate_decisions(lt, *units)
    fired = best >= lt.thresholds[idx]
    return {lt.ids[int(i)] for i in idx[fired].tolist()}


def measure(table: HookTable, layer: int, records: list[EvalRecord], tests: dict) -> dict:
    own = sum(str(r.index) in winners(table, layer, u) for r, u in zip(records, tests["prompt"], strict=True))
    para_hit = sum(str(ri) in winners(table, layer, u) for ri, u in tests["para"])
    foreign_texts = foreign_pairs = 0
    subject_of = {str(r.index): r.subject.lower() for r in records}
    for (ri, text), u in zip(tests["neigh_meta"], tests["neigh"], strict=True):
        bad = {w for w in winners(table, layer, u) if w != str(ri) and subject_of[w] not in text.lower()}
        foreign_texts += bool(bad)
        foreign_pairs += len(bad)
    return {
        "own_prompt": own,
        "paraphrase": para_hit,
        "foreign_fire_texts": foreign_texts,
        "foreign_fire_pairs": foreign_pairs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--skip", type=int, default=0, help="start at this record (0: the first)")
    ap.add_argument("--caps", type=float, nargs="*", default=[0.2, 0.4, 0.5, 0.6, 0.7])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} not found (CounterFact is read from ../shared/data)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    loaded = load_model()
    layer = default_hook_layers(loaded.model)[0]
    hooks = HookManager(loaded.model, [layer])
    editor = Editor(loaded.model, loaded.tokenizer, hooks)
    records = load_records(args.data, "counterfact", args.skip + args.n).records[args.skip :]

    t0 = time.perf_counter()
    entries = calibrated_entries(editor, layer, records)
    calib_s = time.perf_counter() - t0
    tok = loaded.tokenizer
    para = [(r.index, p) for r in records for p in r.paraphrases]
    neigh = [(r.index, p.prompt) for r in records for p in r.locality]
    tests = {
        "prompt": text_units(hooks, tok, layer, [r.prompt for r in records]),
        "para": list(
            zip([ri for ri, _ in para], text_units(hooks, tok, layer, [p for _, p in para]), strict=True)
        ),
        "neigh_meta": neigh,
        "neigh": text_units(hooks, tok, layer, [t for _, t in neigh]),
    }
    with_prev = sum(e.prev_key is not None for e in entries)
    print(
        f"{len(records)} CounterFact records from #{args.skip}, layer {layer}: {len(entries)} entries "
        f"({with_prev} with a previous-token key), calibrated in {calib_s:.0f} s; {len(para)} paraphrases, "
        f"{len(neigh)} neighbourhood prompts"
    )
    rows = {}
    for cap in [None, *args.caps]:
        name = "last token only" if cap is None else f"+ previous token, cap {cap:g}"
        table = HookTable.build(with_cap(entries, cap), hooks.device)
        rows[name] = measure(table, layer, records, tests)
    print(
        "\n| gate | own prompt fires | held-out paraphrase fires | neighbourhood prompts with a foreign "
        "fire | foreign (prompt, edit) pairs |\n| --- | --- | --- | --- | --- |"
    )
    for name, m in rows.items():
        print(
            f"| {name} | {m['own_prompt']}/{len(records)} | {m['paraphrase']}/{len(para)} | "
            f"{m['foreign_fire_texts']}/{len(neigh)} | {m['foreign_fire_pairs']} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"n": len(records), "layer": layer, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""Offline check of an LTE alignment adapter (scripts/train_alignment.py) on the free-text benchmark.

For the first N records of bench/data/freetext-edits.jsonl, greedily (max 32 new tokens, EOS not first),
base model vs base + adapter, every question in chat and raw-question form built by `build_prompt`:

  in scope          the record's descriptor injected; success = service.eval.freetext.judge
  out-of-scope kept the record's descriptor injected anyway (a retrieval false positive); the answer equals
                    the base model's answer without any block, character for character
  no-block kept     (adapter only) no block at all: does the adapter change unedited serving?
  empty             blank answers among all answers generated with a block

Retrieval is taken as perfect for in-scope questions here, so this measures only whether the model uses the
block, not whether the detector finds it. One model in memory: the base rows run with the adapter disabled.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/alignment_offline.py --adapter alignment-adapter --n 60
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.eval.freetext import judge, load_freetext, matches  # noqa: E402
from service.router.prompt import PromptStyle, build_prompt  # noqa: E402
from service.router.scope import ScopeHit  # noqa: E402

STYLE = PromptStyle(chat="user", raw="qa")
FORMATS = ("chat", "raw")
MAX_NEW_TOKENS = 32
COLUMNS = ("chat in-scope", "raw in-scope", "oos kept chat", "oos kept raw", "oos leak chat", "oos leak raw",
           "empty", "no-block kept")


def render(fmt: str, question: str, descriptors: list[str], tokenizer: Any) -> str:
    hits = [ScopeHit(i, d, 1.0) for i, d in enumerate(descriptors)]
    if fmt == "chat":
        return build_prompt(None, [("user", question)], hits, tokenizer, STYLE)
    return build_prompt(question, None, hits, tokenizer, STYLE)


def encode(fmt: str, text: str, tokenizer: Any) -> list[int]:
    # As the router does: a rendered chat already holds its special tokens, a raw prompt gets the usual ones.
    return list(tokenizer(text, add_special_tokens=fmt == "raw")["input_ids"])


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: list[list[int]], batch: int) -> list[str]:
    """Greedy answers as text (EOS and what follows dropped). Batches are length-sorted to limit padding."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out = [""] * len(prompts)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx])
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx])
        gen = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=1,
            do_sample=False, pad_token_id=pad, eos_token_id=eos,
        )
        for row, i in enumerate(idx):
            toks = gen[row, width:].tolist()
            toks = toks[: toks.index(eos)] if eos in toks else toks
            out[i] = tokenizer.decode(toks, skip_special_tokens=True)
    return out


def rate(flags: list[bool]) -> float:
    return round(sum(flags) / len(flags), 4) if flags else float("nan")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, default=Path("alignment-adapter"))
    ap.add_argument("--data", type=Path, default=REPO / "bench" / "data" / "freetext-edits.jsonl")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("alignment-offline.json"))
    ap.add_argument("--base-cache", type=Path, default=None,
                    help="JSON file keeping the base model's answers (reused while the prompts are the same)")
    ap.add_argument("--rescore", type=Path, default=None, help="re-score a saved --out file, no generation")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # a shared 2-core machine
    import peft
    from peft import PeftModel

    from service.engine.loader import embedded_gguf_path, load_model

    if args.rescore:  # the tokenizer only: re-scoring must not load (or compete for CPU with) a model
        from transformers import AutoTokenizer

        gguf = embedded_gguf_path()
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
        model: Any = None
    else:
        lm = load_model("embedded", device="cpu", dtype="float32")
        tok = lm.tokenizer
        model = PeftModel.from_pretrained(lm.model, str(args.adapter)).eval()
    records = load_freetext(args.data, args.n)

    # One prompt list per (question, format, block or not); answers are generated once per model.
    in_scope = [(r, q, f) for r in records for q in r.in_scope for f in FORMATS]
    out_scope = [(r, q, f) for r in records for q in r.out_of_scope for f in FORMATS]
    with_block = [encode(f, render(f, q.text, [r.descriptor], tok), tok) for r, q, f in in_scope + out_scope]
    no_block = [encode(f, render(f, q.text, [], tok), tok) for _, q, f in out_scope]
    n_in = len(in_scope)

    prompts_key = hashlib.sha256(json.dumps([with_block, no_block]).encode()).hexdigest()
    answers: dict[str, dict[str, list[str]]] = {}
    if args.rescore:  # re-score a saved run (same data and --n) without generating
        saved = json.loads(args.rescore.read_text())
        for name in ("base", "adapter"):
            answers[name] = {kind: [a[name] for a in saved["answers"] if a["kind"] == kind]
                             for kind in ("in_scope", "out_scope")}
        oos = [a for a in saved["answers"] if a["kind"] == "out_scope"]
        answers["base"]["no_block"] = [a["base_no_block"] for a in oos]
        answers["adapter"]["no_block"] = [a["adapter_no_block"] for a in oos]
    cache = json.loads(args.base_cache.read_text()) if args.base_cache and args.base_cache.exists() else {}
    if not args.rescore and cache.get("prompts") == prompts_key:
        answers["base"] = cache["answers"]  # the base model never changes between adapters
        print(f"base answers from {args.base_cache}", flush=True)
    t0 = time.time()
    for name in ("base", "adapter"):
        if name in answers:
            continue
        if name == "base":
            with model.disable_adapter():
                gen_block = generate(model, tok, with_block, args.batch)
                gen_plain = generate(model, tok, no_block, args.batch)
            if args.base_cache:
                args.base_cache.write_text(json.dumps({"prompts": prompts_key, "answers": {
                    "in_scope": gen_block[:n_in], "out_scope": gen_block[n_in:], "no_block": gen_plain}}))
        else:
            # Merged weights: the same function as the unmerged adapter, without its extra matmuls.
            model = model.merge_and_unload()
            gen_block = generate(model, tok, with_block, args.batch)
            gen_plain = generate(model, tok, no_block, args.batch)
        answers[name] = {"in_scope": gen_block[:n_in], "out_scope": gen_block[n_in:], "no_block": gen_plain}
        print(f"{name}: {len(gen_block) + len(gen_plain)} answers, {time.time() - t0:.0f} s", flush=True)

    reference = answers["base"]["no_block"]  # the unedited model's answers
    # Aliases of the new fact: an out-of-scope answer that names one leaked the injected block into it.
    new_aliases = {r.id: sorted({a for q in r.in_scope for a in q.answers}) for r in records}
    fmt_in = [f for _, _, f in in_scope]
    fmt_out = [f for _, _, f in out_scope]

    def by_fmt(flags: list[bool], fmts: list[str], fmt: str) -> float:
        return rate([x for x, f in zip(flags, fmts, strict=True) if f == fmt])

    table: dict[str, dict[str, float]] = {}
    by_type: dict[str, dict[str, float]] = {}
    for name, ans in answers.items():
        ok = [
            judge(a, q.answers, r.old_answers) for (r, q, _), a in zip(in_scope, ans["in_scope"], strict=True)
        ]
        kept = [a == ref for a, ref in zip(ans["out_scope"], reference, strict=True)]
        leak = [matches(a, new_aliases[r.id])
                for (r, _, _), a in zip(out_scope, ans["out_scope"], strict=True)]
        table[name] = {
            "chat in-scope": by_fmt(ok, fmt_in, "chat"),
            "raw in-scope": by_fmt(ok, fmt_in, "raw"),
            "oos kept chat": by_fmt(kept, fmt_out, "chat"),
            "oos kept raw": by_fmt(kept, fmt_out, "raw"),
            "oos leak chat": by_fmt(leak, fmt_out, "chat"),
            "oos leak raw": by_fmt(leak, fmt_out, "raw"),
            "empty": rate([not a.strip() for a in ans["in_scope"] + ans["out_scope"]]),
            "no-block kept": rate([a == ref for a, ref in zip(ans["no_block"], reference, strict=True)]),
        }
        types = sorted({q.type for _, q, _ in in_scope} | {f"oos-{q.type}" for _, q, _ in out_scope})
        by_type[name] = {}
        for t in types:
            if t.startswith("oos-"):
                flags = [k for k, (_, q, _) in zip(kept, out_scope, strict=True) if f"oos-{q.type}" == t]
            else:
                flags = [o for o, (_, q, _) in zip(ok, in_scope, strict=True) if q.type == t]
            by_type[name][t] = rate(flags)
    ref_leak = [matches(a, new_aliases[r.id]) for (r, _, _), a in zip(out_scope, reference, strict=True)]

    print(f"\n{len(records)} records, {n_in} in-scope and {len(out_scope)} out-of-scope prompts (chat + raw)")
    print(f"{'':8s}" + "".join(f"{c:>15s}" for c in COLUMNS))
    for name, row in table.items():
        print(f"{name:8s}" + "".join(f"{row[c]:>15.3f}" for c in COLUMNS))
    print(f"leak of the unedited model without a block: {rate(ref_leak):.3f}")
    print("by question type (in-scope judge / out-of-scope kept):")
    for name, row in by_type.items():
        print(f"  {name:8s} " + "  ".join(f"{t} {v:.3f}" for t, v in row.items()))

    samples = [
        {"record": r.id, "question": q.text, "format": f, "kind": kind,
         **{name: answers[name][kind][i] for name in answers},
         **({"base_no_block": reference[i], "adapter_no_block": answers["adapter"]["no_block"][i]}
            if kind == "out_scope" else {})}
        for kind, items in (("in_scope", in_scope), ("out_scope", out_scope))
        for i, (r, q, f) in enumerate(items)
    ]
    result = {
        "adapter": str(args.adapter),
        "data": str(args.data),
        "records": len(records),
        "peft_version": peft.__version__,
        "max_new_tokens": MAX_NEW_TOKENS,
        "table": table,
        "by_type": by_type,
        "unedited_leak": rate(ref_leak),
        "seconds": round(time.time() - t0, 1),
        "answers": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()

"""Context-aware decoding (Shi et al., 2023, "Trusting Your Evidence") on the free-text benchmark, offline.

The served model with an injected descriptor often answers from what it already believes ("Who is AMD's
chief executive?" -> "Lisa Su" with the block saying otherwise). Context-aware decoding contrasts the
next-token distribution with the block against the one without it and amplifies the difference:

    score(y) = (1 + alpha) * log p(y | block, question) - alpha * log p(y | question)

restricted to tokens with p(y | block, question) >= beta * max p (the plausibility cut of contrastive
decoding, so the contrast cannot promote tokens the model finds implausible). alpha = 0 is plain greedy
decoding. Each step costs a second forward over the prompt without the block.

For the first N records of bench/data/freetext-edits.jsonl, every in-scope question in chat and raw form
with the record's descriptor injected (perfect retrieval, as in bench/alignment_offline.py), greedily,
32 tokens at most, EOS not first; success = service.eval.freetext.judge. Out-of-scope questions with the
record's descriptor injected anyway (a retrieval false positive) report the leak: answers naming the
block's new fact. The rows with a block run the served alignment adapter (`--adapter`, default the
embedded model's, as the server does); the rows without one run the base weights.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/context_decoding.py --n 30 --alphas 0 0.5 1
"""

from __future__ import annotations

import argparse
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

from bench.alignment_offline import FORMATS, MAX_NEW_TOKENS, encode, rate, render  # noqa: E402
from service.eval.freetext import judge, load_freetext, matches  # noqa: E402

DEFAULT_ADAPTER = REPO / "service" / "assets" / "alignment-smollm2-135m-instruct"


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


class _Stepper:
    """One batch of left-padded prompts decoded token by token with a KV cache."""

    def __init__(self, model: Any, prompts: list[list[int]], pad: int) -> None:
        self.model = model
        ids, self.mask = _left_pad(prompts, pad)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = positions[:, -1:] + 1
        self.logprobs = torch.log_softmax(out.logits[:, -1].float(), -1)

    def advance(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(tokens)], dim=1)
        out = self.model(input_ids=tokens, attention_mask=self.mask, position_ids=self.next_position,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.next_position = self.next_position + 1
        self.logprobs = torch.log_softmax(out.logits[:, -1].float(), -1)


def contrastive_scores(
    with_block: torch.Tensor, without: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """(1 + alpha) log p(y|block) - alpha log p(y|no block) over the plausible tokens, -inf elsewhere."""
    scores = (1 + alpha) * with_block - alpha * without
    plausible = with_block >= with_block.max(-1, keepdim=True).values + torch.log(torch.tensor(beta))
    return scores.masked_fill(~plausible, float("-inf"))


@torch.no_grad()
def decode(adapted: Any, base: Any, tokenizer: Any, pairs: list[tuple[list[int], list[int]]], alpha: float,
           beta: float, batch: int) -> list[str]:
    """Greedy context-aware answers for (prompt with block, prompt without) pairs."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]))
    out = [""] * len(pairs)
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        ctx = _Stepper(adapted, [pairs[i][0] for i in idx], pad)
        plain = _Stepper(base, [pairs[i][1] for i in idx], pad) if alpha else None
        tokens: list[list[int]] = [[] for _ in idx]
        done = torch.zeros(len(idx), dtype=torch.bool)
        for step in range(MAX_NEW_TOKENS):
            scores = ctx.logprobs if plain is None else contrastive_scores(ctx.logprobs, plain.logprobs,
                                                                              alpha, beta)
            if step == 0:
                scores[:, eos] = float("-inf")  # the service's EOS floor (min_new_tokens 1)
            chosen = scores.argmax(-1)
            chosen = torch.where(done, torch.full_like(chosen, pad), chosen)
            for row, t in enumerate(chosen.tolist()):
                if not done[row]:
                    if t == eos:
                        done[row] = True
                    else:
                        tokens[row].append(t)
            if bool(done.all()):
                break
            ctx.advance(chosen[:, None])
            if plain is not None:
                plain.advance(chosen[:, None])
        for row, i in enumerate(idx):
            out[i] = tokenizer.decode(tokens[row], skip_special_tokens=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", type=Path, default=DEFAULT_ADAPTER, help="'none': the base model alone")
    ap.add_argument("--data", type=Path, default=REPO / "bench" / "data" / "freetext-edits.jsonl")
    ap.add_argument("--n", type=int, default=30)
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    ap.add_argument("--beta", type=float, default=0.1, help="plausibility cut (share of the top probability)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out-of-scope", action="store_true", help="also the leak of a wrongly injected block")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(int(os.environ.get("EDITSERVE_TORCH_THREADS", "1")))
    from service.engine.loader import load_model

    base_lm = load_model("embedded", device="cpu", dtype="float32")
    tok, base = base_lm.tokenizer, base_lm.model.eval()
    adapted = base
    if str(args.adapter) != "none":
        from peft import PeftModel

        adapted = PeftModel.from_pretrained(load_model("embedded", device="cpu", dtype="float32").model,
                                            str(args.adapter)).merge_and_unload().eval()
    records = load_freetext(args.data, args.n)
    in_scope = [(r, q, f) for r in records for q in r.in_scope for f in FORMATS]
    out_scope = [(r, q, f) for r in records for q in r.out_of_scope for f in FORMATS]
    out_scope = out_scope if args.out_of_scope else []
    pairs = [(encode(f, render(f, q.text, [r.descriptor], tok), tok),
              encode(f, render(f, q.text, [], tok), tok)) for r, q, f in in_scope + out_scope]
    report: dict[str, Any] = {"n": args.n, "beta": args.beta, "adapter": str(args.adapter), "rows": {}}
    print(f"{len(records)} records: {len(in_scope)} in-scope, {len(out_scope)} out-of-scope prompts "
          "(chat + raw)")
    for alpha in args.alphas:
        t0 = time.time()
        answers = decode(adapted, base, tok, pairs, alpha, args.beta, args.batch)
        ok = [judge(a, q.answers, r.old_answers) for (r, q, _), a in zip(in_scope, answers, strict=False)]
        row: dict[str, Any] = {
            f"{fmt} in-scope": rate([o for o, (_, _, f) in zip(ok, in_scope, strict=True) if f == fmt])
            for fmt in FORMATS
        }
        for kind in sorted({q.type for _, q, _ in in_scope}):
            row[kind] = rate([o for o, (_, q, _) in zip(ok, in_scope, strict=True) if q.type == kind])
        if out_scope:
            aliases = {r.id: sorted({a for q in r.in_scope for a in q.answers}) for r in records}
            leak = [matches(a, aliases[r.id]) for (r, _, _), a in zip(out_scope, answers[len(in_scope):],
                                                                     strict=True)]
            row["out-of-scope leak"] = rate(leak)
        row["empty"] = rate([not a.strip() for a in answers])
        row["seconds"] = round(time.time() - t0, 1)
        report["rows"][str(alpha)] = {"figures": row, "answers": answers}
        print(f"alpha {alpha}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

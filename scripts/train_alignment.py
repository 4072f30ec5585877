"""Train a LoRA adapter for LTE's alignment phase (Jiang et al. 2024) on the embedded SmolLM2.

The adapter should make the model answer from an injected "[Updated Information]" block when the block is
about the question, and answer exactly as the base model does when it is not. Every example is rendered by
the serving code's own `build_prompt` (chat: block in the user turn; raw: "Question: ...\\nAnswer:"), so the
adapter is trained on the exact token sequences retrieval produces.

Examples, from the KnowEdit train splits (never the benchmark sets), each in chat and raw form:
  in_scope     block = the record's descriptor (+ 0-2 distractors)  -> the descriptor / " <target_new>"
  portability  same block, a Reasoning question                     -> a sentence / " <ground_truth>"
  out_scope    block = other records' descriptors, a locality question -> the base model's own greedy answer
               to that question without any block (self-distillation; cached under --out). With
               --same-subject-oos F, a share F of these blocks holds the asked subject's own edited fact
               instead (harder negatives; 0.5 made the adapter ignore in-scope blocks, see the notes).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_alignment.py --out alignment-adapter

The served adapter (service/assets/alignment-smollm2-135m-instruct, used by --alignment-adapter auto) is
trained on in-scope and reasoning examples only, from 300 KnowEdit records and 700 synthetic chat-style
records (scripts/alignment_data.py: varied question forms, city-to-country hops), as measured in
docs/free-text-edits.md (14 minutes on one CPU thread):

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/train_alignment.py --kinds in_scope,portability --fp32 \
        --records 300 --synthetic 700 --steps 200 --max-minutes 40 --out /tmp/alignment \
        --ship-to service/assets/alignment-smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.router.prompt import PromptStyle, build_prompt  # noqa: E402
from service.router.scope import ScopeHit  # noqa: E402

STYLE = PromptStyle(chat="user", raw="qa")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAIN_FILES = ("knowedit-wiki_counterfact-train.json", "knowedit-wiki_recent-train.json")
MAX_NEW_TOKENS = 32
FORMATS = ("chat", "raw")

# "The <relation> of <subject> is" -> "What is the <relation> of <subject>?". Requiring a lower-case
# relation word and " of " keeps out titles that merely start with "The" ("The Boat Race 2023 is").
_PROMPT_RULE = re.compile(r"The ([a-z][^?]*? of .+?)\.? (is|are)")


def to_question(prompt: str) -> str | None:
    m = _PROMPT_RULE.fullmatch(" ".join(prompt.split()))
    return f"What {m.group(2)} the {m.group(1)}?" if m else None


def first_alias(value: Any) -> str | None:
    """KnowEdit answers are a string (counterfact) or [[alias, ...], ...] (recent): the first alias."""
    while isinstance(value, list):
        if not value:
            return None
        value = value[0]
    return value.strip() if isinstance(value, str) and value.strip() else None


def sentence(prompt: str, answer: str) -> str:
    return f"{' '.join(prompt.split())} {answer}."


@dataclass
class Record:
    descriptor: str
    question: str
    target: str
    portability: tuple[str, str, str] | None  # (question, answer, sentence) from Reasoning
    locality: str | None  # a question about the same subject, another relation
    other_questions: tuple[str, ...] = ()  # more in-scope forms: one of them is asked per format
    statement: str | None = None  # the chat answer; KnowEdit records answer with their descriptor


@dataclass
class Example:
    kind: str  # in_scope | portability | out_scope
    fmt: str  # chat | raw
    prompt: str  # exactly what build_prompt renders
    answer: str  # text (ids come from the tokenizer), or "" when answer_ids is given
    answer_ids: list[int] | None = None
    group: int = 0  # record index: the validation split holds out whole records


def load_records(data_dir: Path, rng: random.Random) -> list[Record]:
    records = []
    for name in TRAIN_FILES:
        for r in json.loads((data_dir / name).read_text(encoding="utf-8")):
            question, target = to_question(r["prompt"]), first_alias(r.get("target_new"))
            if question is None or target is None:
                continue
            port = None
            reasoning = [
                (q, a, sentence(p["prompt"], a))
                for p in (r.get("portability") or {}).get("Reasoning", [])
                if (q := to_question(p["prompt"])) and (a := first_alias(p.get("ground_truth")))
            ]
            if reasoning:
                port = rng.choice(reasoning)
            specificity = (r.get("locality") or {}).get("Relation_Specificity", [])
            local = [q for p in specificity if (q := to_question(p["prompt"]))]
            records.append(
                Record(
                    descriptor=sentence(r["prompt"], target),
                    question=question,
                    target=target,
                    portability=port,
                    locality=rng.choice(local) if local else None,
                )
            )
    return records


def synthetic_records(n: int, seed: int) -> list[Record]:
    """Chat-style records of scripts/alignment_data.py: varied question forms and city-to-country hops."""
    from scripts.alignment_data import generate

    return [
        Record(descriptor=r.descriptor, question=r.questions[0], target=r.answer, portability=r.reasoning,
               locality=None, other_questions=r.questions[1:], statement=r.statement)
        for r in generate(n, seed)
    ]


def render(fmt: str, question: str, descriptors: list[str], tokenizer: Any) -> str:
    hits = [ScopeHit(i, d, 1.0) for i, d in enumerate(descriptors)]
    if fmt == "chat":
        return build_prompt(None, [("user", question)], hits, tokenizer, STYLE)
    return build_prompt(question, None, hits, tokenizer, STYLE)


def encode_prompt(fmt: str, text: str, tokenizer: Any) -> list[int]:
    # As the router does: a rendered chat already holds its special tokens, a raw prompt gets the usual ones.
    return list(tokenizer(text, add_special_tokens=fmt == "raw")["input_ids"])


@torch.no_grad()
def greedy(model: Any, tokenizer: Any, prompts: list[list[int]], batch: int = 16) -> list[list[int]]:
    """Greedy continuations (max 32 new tokens, EOS not first), up to and including the first EOS."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    out: list[list[int]] = [[] for _ in prompts]
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
            out[i] = toks[: toks.index(eos) + 1] if eos in toks else toks
    return out


def base_answers(model: Any, tokenizer: Any, questions: list[str], cache: Path) -> dict[str, list[int]]:
    """key "fmt\\x1fquestion" -> the base model's greedy answer ids without any block (cached)."""
    known: dict[str, list[int]] = json.loads(cache.read_text()) if cache.exists() else {}
    todo = [(f, q) for q in questions for f in FORMATS if f"{f}\x1f{q}" not in known]
    if todo:
        t0 = time.time()
        prompts = [encode_prompt(f, render(f, q, [], tokenizer), tokenizer) for f, q in todo]
        for (f, q), ids in zip(todo, greedy(model, tokenizer, prompts), strict=True):
            known[f"{f}\x1f{q}"] = ids
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(known, ensure_ascii=False))
        print(f"base answers: {len(todo)} generated in {time.time() - t0:.0f} s ({cache})", flush=True)
    return known


def build_examples(records: list[Record], tokenizer: Any, base: dict[str, list[int]], rng: random.Random,
                   same_subject_oos: float) -> list[Example]:
    eos = tokenizer.eos_token
    pool = [r.descriptor for r in records]

    def others(n: int, exclude: int) -> list[str]:
        picks: list[str] = []
        while len(picks) < n:
            j = rng.randrange(len(pool))
            if j != exclude and pool[j] not in picks:
                picks.append(pool[j])
        return picks

    def block(own: str | None, i: int) -> list[str]:
        # 0-2 distractors around the relevant descriptor, so its position and the block size carry no signal.
        descs = ([own] if own else []) + others(rng.randint(0 if own else 1, 2), i)
        rng.shuffle(descs)
        return descs

    out: list[Example] = []
    for i, r in enumerate(records):
        for fmt in FORMATS:
            descs = block(r.descriptor, i)
            answer = f"{r.statement or r.descriptor}{eos}" if fmt == "chat" else f" {r.target}{eos}"
            question = rng.choice((r.question, *r.other_questions))
            out.append(Example("in_scope", fmt, render(fmt, question, descs, tokenizer), answer, group=i))
            if r.portability:
                q, a, s = r.portability
                descs = block(r.descriptor, i)
                answer = f"{s}{eos}" if fmt == "chat" else f" {a}{eos}"
                out.append(Example("portability", fmt, render(fmt, q, descs, tokenizer), answer, group=i))
            if r.locality:
                # A retrieval false positive: either another subject's fact, or this subject's edited
                # relation while the question asks a different one (the harder, more realistic case).
                own = r.descriptor if rng.random() < same_subject_oos else None
                descs = block(own, i)
                prompt = render(fmt, r.locality, descs, tokenizer)
                out.append(Example("out_scope", fmt, prompt, "", base[f"{fmt}\x1f{r.locality}"], group=i))
    return out


def tensorise(examples: list[Example], tokenizer: Any) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, prompt length) per example."""
    rows = []
    for ex in examples:
        p = encode_prompt(ex.fmt, ex.prompt, tokenizer)
        a = ex.answer_ids
        if a is None:
            a = tokenizer(ex.answer, add_special_tokens=False)["input_ids"]
        rows.append((p + list(a), len(p)))
    return rows


def collate(rows: list[tuple[list[int], int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for n, (seq, plen) in enumerate(rows):
        ids[n, : len(seq)] = torch.tensor(seq)
        mask[n, : len(seq)] = 1
        labels[n, plen : len(seq)] = torch.tensor(seq[plen:])  # loss on answer tokens only
    return ids, mask, labels


def example_losses(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean answer-token NLL per example: a 2-token raw answer weighs as much as a 30-token chat one."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view(target.shape)
    counts = (target != -100).sum(1).clamp(min=1)
    return nll.sum(1) / counts


def batches(rows: list[tuple[list[int], int]], size: int, rng: random.Random) -> list[list[int]]:
    """Shuffled batches of similar length (sorted within windows of 8 batches), to waste little on padding."""
    order = list(range(len(rows)))
    rng.shuffle(order)
    window = size * 8
    out = []
    for s in range(0, len(order), window):
        chunk = sorted(order[s : s + window], key=lambda i: len(rows[i][0]))
        out += [chunk[k : k + size] for k in range(0, len(chunk), size)]
    rng.shuffle(out)
    return out


@torch.no_grad()
def validation(model: Any, rows: list[tuple[list[int], int]], kinds: list[str], pad: int) -> dict[str, float]:
    model.eval()
    per: dict[str, list[float]] = {}
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]))
    for s in range(0, len(order), 16):
        idx = order[s : s + 16]
        losses = example_losses(model, *collate([rows[i] for i in idx], pad))
        for i, v in zip(idx, losses.tolist(), strict=True):
            per.setdefault(kinds[i], []).append(v)
            per.setdefault("all", []).append(v)
    return {k: round(sum(v) / len(v), 4) for k, v in sorted(per.items())}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("alignment-adapter"))
    ap.add_argument("--steps", type=int, default=135)  # ~15 min at 0.155 steps/s, batch 8
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--max-minutes", type=float, default=15.0, help="stop training cleanly after this long")
    ap.add_argument("--records", type=int, default=300,
                    help="KnowEdit records sampled (bounds the base-answer generation and the epoch)")
    ap.add_argument("--synthetic", type=int, default=0,
                    help="chat-style records of scripts/alignment_data.py added to the KnowEdit ones")
    ap.add_argument("--same-subject-oos", type=float, default=0.0,
                    help="share of out-of-scope blocks holding the asked subject's own fact (other relation)")
    ap.add_argument("--kinds", default="in_scope,portability,out_scope",
                    help="example kinds to train on (an ablation: in_scope,portability without out_scope)")
    ap.add_argument("--fp32", action="store_true",
                    help="train without bf16 autocast (faster on CPUs without AVX-512 bf16 support)")
    ap.add_argument("--ship-to", type=Path, default=None,
                    help="also write the adapter in float16 there (the served copy: service/assets/...)")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # a shared 2-core machine
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    import peft
    from peft import LoraConfig, get_peft_model

    from service.engine.loader import load_model

    t_load = time.time()
    lm = load_model("embedded", device="cpu", dtype="float32")
    model, tok = lm.model, lm.tokenizer
    print(f"model loaded in {time.time() - t_load:.0f} s; peft {peft.__version__}", flush=True)

    records = load_records(args.data_dir, rng)
    n_all = len(records)
    rng.shuffle(records)
    records = records[: args.records]
    if args.synthetic:  # (without it the draws stay those the served adapter was trained with)
        records += synthetic_records(args.synthetic, args.seed)
        rng.shuffle(records)
    kinds = set(args.kinds.split(","))
    if "out_scope" not in kinds:  # no base answers needed
        for r in records:
            r.locality = None
    questions = sorted({r.locality for r in records if r.locality})
    base = base_answers(model, tok, questions, args.out / "base_answers.json")
    # Skip out-of-scope questions whose base answer is blank: nothing to keep.
    for r in records:
        if r.locality and any(not tok.decode(base[f"{f}\x1f{r.locality}"], skip_special_tokens=True).strip()
                              for f in FORMATS):
            r.locality = None
    examples = [e for e in build_examples(records, tok, base, rng, args.same_subject_oos) if e.kind in kinds]

    n_val = max(1, round(0.05 * len(records)))  # hold out whole records: their facts are never trained on
    val_groups = set(rng.sample(range(len(records)), n_val))
    train_ex = [e for e in examples if e.group not in val_groups]
    val_ex = [e for e in examples if e.group in val_groups]
    train_rows, val_rows = tensorise(train_ex, tok), tensorise(val_ex, tok)
    count = {
        split: {k: sum(e.kind == k for e in exs) for k in ("in_scope", "portability", "out_scope")}
        for split, exs in (("train", train_ex), ("val", val_ex))
    }
    print(f"records: {n_all} convertible, {len(records)} used; examples {count}", flush=True)

    config = LoraConfig(r=args.rank, lora_alpha=args.alpha or 2 * args.rank, lora_dropout=0.0,
                        target_modules=TARGET_MODULES, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pad = tok.pad_token_id
    val_kinds = [e.kind for e in val_ex]
    t0 = time.time()
    val_before = validation(model, val_rows, val_kinds, pad)
    print(f"val loss before: {val_before} ({time.time() - t0:.0f} s)", flush=True)

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 10)

    def lr_at(step: int) -> float:  # linear warm-up, cosine decay to 10 %
        if step < warmup:
            return args.lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    queue: list[list[int]] = []
    history: list[float] = []
    epochs = 0.0
    t_train, step, stopped = time.time(), 0, "steps"
    model.train()
    while step < args.steps:
        if (time.time() - t_train) / 60 > args.max_minutes:
            stopped = "max-minutes"
            break
        if not queue:
            queue = batches(train_rows, args.batch, rng)
        idx = queue.pop()
        ids, mask, labels = collate([train_rows[i] for i in idx], pad)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
            loss = example_losses(model, ids, mask, labels).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        history.append(loss.item())
        epochs += len(idx) / len(train_rows)
        step += 1
        if step % 10 == 0 or step == args.steps:
            el = time.time() - t_train
            print(f"step {step}/{args.steps} loss {sum(history[-10:]) / len(history[-10:]):.4f} "
                  f"lr {lr_at(step - 1):.2e} {step / el:.3f} steps/s {el / 60:.1f} min", flush=True)
    minutes = (time.time() - t_train) / 60
    model.eval()
    val_after = validation(model, val_rows, val_kinds, pad)
    print(f"val loss after: {val_after}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out))
    stats = {
        "peft_version": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "rank": args.rank,
        "alpha": config.lora_alpha,
        "target_modules": TARGET_MODULES,
        "trainable_params": trainable,
        "lr": args.lr,
        "batch": args.batch,
        "seed": args.seed,
        "bf16_autocast": not args.fp32,
        "same_subject_oos": args.same_subject_oos,
        "kinds": sorted(kinds),
        "records_convertible": n_all,
        "records_used": len(records),
        "synthetic_records": args.synthetic,
        "examples": count,
        "steps": step,
        "steps_planned": args.steps,
        "stopped_by": stopped,
        "epochs": round(epochs, 3),
        "minutes": round(minutes, 2),
        "steps_per_s": round(step / max(1e-9, minutes * 60), 4),
        "final_loss": round(sum(history[-10:]) / max(1, len(history[-10:])), 4),
        "val_loss_before": val_before,
        "val_loss_after": val_after,
    }
    (args.out / "train_stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))
    if args.ship_to is not None:
        ship(args.out, args.ship_to)


def ship(trained: Path, folder: Path) -> None:
    """The served copy: the PEFT config, the factors in float16 (half the bytes; the engine casts them to
    the model's dtype) and the training figures."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = load_file(str(trained / "adapter_model.safetensors"))
    save_file({k: v.to(torch.float16).contiguous() for k, v in tensors.items()},
              str(folder / "adapter_model.safetensors"))
    for name in ("adapter_config.json", "train_stats.json"):
        shutil.copy(trained / name, folder / name)
    print(f"shipped to {folder}")


if __name__ == "__main__":
    main()

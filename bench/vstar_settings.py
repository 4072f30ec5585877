"""v* optimiser settings side by side: edit time, optimisation steps and hook-path quality.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/vstar_settings.py --format zsre --n 40 \\
        --configs '{"lr": 1.0, "nll_stop": 0.1}' '{"lr": 2.0, "nll_stop": 0.15}'
    HF_HUB_OFFLINE=1 .venv/bin/python bench/vstar_settings.py --format counterfact --n 60 \\
        --configs '{"lr": 1.0, "nll_stop": 0.1}' '{"lr": 2.0, "nll_stop": 0.15}'

For each configuration (keyword arguments of `Editor`), in one process and on the same records: edit the
records one after another with every earlier edit published (WISE's sequential protocol, hook path only:
no descriptors, no server), then score every record with all of them in the table. Per configuration it
prints the mean edit time (`compute_seconds`), the mean number of v* steps, how many hit `max_steps`, and:

- zsRE: Rel / Gen, token-level top-1 accuracy of target_new after the prompt / the rephrase (teacher forced);
- CounterFact: ES / PS / NS, mean-token NLL of the new against the true answer (MEMIT's comparison);
- the same in-scope metrics "(own block)": each prompt behind the record's own descriptor block, as the
  "both" path serves it when only that descriptor is in scope (no retrieval runs here).

A configuration may also hold `"fit_in_retrieval_prompt": true`: v* is then fitted in that block too, as the
edit manager does with retrieval on (EditSpec.serving_contexts).

The data are read from ../shared/data (never copied into the repository). Run it alone: the two CPU
cores are the measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import service.hooks.editor as editor_module  # noqa: E402
from service.eval.datasets import EvalRecord, load_records  # noqa: E402
from service.hooks.editor import Editor, EditSpec  # noqa: E402
from service.hooks.layer import HookManager  # noqa: E402
from service.router.prompt import derive_descriptor, raw_prompt_prefix  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FILES = {"zsre": "zsre_mend_train-1k.json", "counterfact": "counterfact-val.json"}


class StepCounter:
    """Wraps `compute_delta` to record each fit's step count."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self._orig: Callable[..., Any] = editor_module.compute_delta

    def __enter__(self) -> StepCounter:
        def counted(*args: Any, **kwargs: Any) -> Any:
            fit = self._orig(*args, **kwargs)
            self.steps.append(fit.stats["steps"])
            return fit

        editor_module.compute_delta = counted
        return self

    def __exit__(self, *exc: object) -> None:
        editor_module.compute_delta = self._orig


@torch.no_grad()
def target_logprobs(model: Any, tok: Any, prompt: str, target: str) -> torch.Tensor:
    """log p of each target token after the prompt (teacher forced), with the published hook table."""
    ids = tok(prompt.rstrip())["input_ids"]
    tgt = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([ids + tgt[:-1]])).logits[0, len(ids) - 1 :]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tgt)[:, None]).squeeze(1)


@torch.no_grad()
def token_accuracy(model: Any, tok: Any, prompt: str, target: str) -> float:
    ids = tok(prompt.rstrip())["input_ids"]
    tgt = tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([ids + tgt[:-1]])).logits[0, len(ids) - 1 :]
    return float((logits.argmax(-1) == torch.tensor(tgt)).float().mean())


def quality(fmt: str, model: Any, tok: Any, records: list[EvalRecord]) -> dict[str, float]:
    def mean(xs: list[float]) -> float:
        return statistics.mean(xs) if xs else float("nan")

    if fmt == "zsre":
        return {
            "Rel": mean([token_accuracy(model, tok, r.prompt, r.target_new) for r in records]),
            "Gen": mean(
                [token_accuracy(model, tok, p, r.target_new) for r in records for p in r.paraphrases]
            ),
        }

    def prefers(prompt: str, a: str, b: str) -> float:
        nll_a = -target_logprobs(model, tok, prompt, a).mean()
        return float(nll_a < -target_logprobs(model, tok, prompt, b).mean())

    return {
        "ES": mean([prefers(r.prompt, r.target_new, r.target_true) for r in records]),
        "PS": mean([prefers(p, r.target_new, r.target_true) for r in records for p in r.paraphrases]),
        "NS": mean([prefers(q.prompt, q.answer, r.target_new) for r in records for q in r.locality]),
    }


def own_block(r: EvalRecord) -> str:
    """The text the retrieval path puts before a prompt when this record's edit is in scope."""
    return raw_prompt_prefix([derive_descriptor(r.prompt, r.target_new)])


def behind_own_block(r: EvalRecord) -> EvalRecord:
    """The record's prompts as "both" serves them when only its own descriptor is in scope."""
    block = own_block(r)
    return replace(r, prompt=block + r.prompt, paraphrases=[block + p for p in r.paraphrases])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", choices=sorted(FILES), default="zsre")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--skip", type=int, default=0, help="start at this record")
    ap.add_argument("--configs", nargs="+", default=['{"lr": 1.0, "nll_stop": 0.1}', "{}"])
    args = ap.parse_args()
    path = DATA / FILES[args.format]
    if not path.exists():
        sys.exit(f"{path} not found: this benchmark reads the shared evaluation data")
    from service.engine.loader import load_model

    torch.set_num_threads(2)
    records = load_records(path, args.format, args.skip + args.n).records[args.skip :]
    lm = load_model("embedded", device="cpu", dtype="float32")
    model, tok = lm.model, lm.tokenizer
    hooks = HookManager(model, [6])
    try:
        print(f"{args.format}, records {args.skip}-{args.skip + len(records) - 1}")
        print("unedited:", {k: round(v, 3) for k, v in quality(args.format, model, tok, records).items()})
        for raw in args.configs:
            kwargs = json.loads(raw)
            in_block = bool(kwargs.pop("fit_in_retrieval_prompt", False))
            hooks.publish(hooks.empty_table())
            editor = Editor(model, tok, hooks, **kwargs)
            editor.warmup()
            seconds = []
            with StepCounter() as counter:
                for r in records:
                    spec = EditSpec(r.subject, r.prompt, r.target_new)
                    if in_block:  # as the edit manager does with retrieval on
                        spec.serving_contexts = [own_block(r)]
                    ce = editor.compute(spec)
                    seconds.append(ce.report.compute_seconds)
                    hooks.publish(hooks.current.extended(ce.entries))
            scores = quality(args.format, model, tok, records)
            beside = quality(args.format, model, tok, [behind_own_block(r) for r in records])
            scores |= {f"{k} (own block)": v for k, v in beside.items() if k != "NS"}
            steps = counter.steps
            print(
                f"{raw} (lr {editor.lr}, stop {editor.nll_stop}): "
                f"edit mean {statistics.mean(seconds):.2f} s, steps mean {statistics.mean(steps):.1f}, "
                f"at max_steps {sum(s >= editor.max_steps for s in steps)}; "
                + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()),
                flush=True,
            )
    finally:
        hooks.uninstall()


if __name__ == "__main__":
    main()

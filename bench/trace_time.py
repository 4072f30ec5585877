"""Time of one causal trace (service/locate/trace.py) of the embedded SmolLM2 on this machine, and its
heatmaps as `editserve trace --out` draws them.

    HF_HUB_OFFLINE=1 EDITSERVE_TORCH_THREADS=1 .venv/bin/python bench/trace_time.py --samples 1 3 10 \
        --out trace.png

Prints, per sample count: prompt tokens, seconds, clean and corrupted p(answer), the circuit summary.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "The Eiffel Tower is a landmark located in the city of"  # 12 tokens
SUBJECT = "The Eiffel Tower"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--subject", default=SUBJECT)
    parser.add_argument("--samples", type=int, nargs="+", default=[3])
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="heatmaps of the last run (PNG)")
    args = parser.parse_args()

    import torch

    from service.client.trace_plot import write_heatmaps
    from service.engine.loader import load_model
    from service.locate.trace import calculate_hidden_flow, circuit_summary, prepare_trace
    from service.transport.convert import trace_response
    from service.types import EffectGrid, TraceResult

    threads = int(os.environ.get("EDITSERVE_TORCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    loaded = load_model("embedded", device="cpu", dtype="float32")
    tok = loaded.tokenizer
    prompt = prepare_trace(tok, args.prompt, args.subject)
    print(f"{len(prompt.ids)} tokens, {torch.get_num_threads()} torch thread(s)")
    trace = None
    for samples in args.samples:
        trace = calculate_hidden_flow(loaded.model, prompt, samples=samples, window=args.window,
                                      seed=args.seed)
        mlp, attn = circuit_summary(trace)
        print(f"samples {samples:3d}: {trace.seconds:6.1f} s  answer {tok.decode([trace.answer_id])!r} "
              f"clean {trace.clean_p:.3f} corrupted {trace.corrupted_p:.3f}  MLP at the subject's last "
              f"token {[(la, round(e, 3)) for la, e in mlp]}  attention at the last token "
              f"{[(la, round(e, 3)) for la, e in attn]}")
    if args.out is not None and trace is not None:
        def grid(kind: str) -> EffectGrid:
            g = trace.grid(kind)
            return EffectGrid(g.shape[0], g.shape[1], g.flatten().tolist())

        mlp, attn = circuit_summary(trace)
        result = TraceResult(
            tokens=[tok.decode([i]) for i in trace.ids], subject_start=trace.subject[0],
            subject_end=trace.subject[1], answer=tok.decode([trace.answer_id]),
            answer_token_id=trace.answer_id, clean_probability=trace.clean_p,
            corrupted_probability=trace.corrupted_p, residual=grid("residual"), mlp=grid("mlp"),
            attention=grid("attention"), mlp_at_subject=mlp, attention_at_last=attn,
            samples=trace.samples, window=trace.window, seed=trace.seed, noise=trace.noise,
            seconds=trace.seconds,
        )
        write_heatmaps(trace_response(result), args.out)
        print(f"heatmaps: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

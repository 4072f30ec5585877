"""`editserve eval`: the evaluation harness's command line (registered by service/cli.py).

  editserve eval --data FILE --format counterfact|zsre|knowedit [--n N] [--sequential T [T ...]]
                 [--methods ...] [--server ADDR] [--out DIR] [--seed S]
  editserve eval --data bench/data/freetext-edits.jsonl --format freetext [--n N] [--sequential T ...]
                 [--methods unedited off retrieval hook both]   (service/eval/freetext.py)

Without --server a real server is started in this process. Re-running the same command resumes from
--out; adding T values or methods to an --out extends it, and the report covers everything in it.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from service.eval.datasets import FORMATS
from service.eval.freetext import DEFAULT_MAX_NEW_TOKENS, FREETEXT_METHODS
from service.eval.runner import METHODS, EvalConfig

FREETEXT_DEFAULT = ("unedited", "both")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="records file (JSON array or JSON Lines)")
    parser.add_argument(
        "--format", dest="fmt", choices=(*FORMATS, "freetext"), required=True,
        help="record format; freetext = descriptor edits asked as chat and raw questions, judged on the text",
    )
    parser.add_argument("--n", type=int, default=None, help="evaluate the first N parsable records (all)")
    parser.add_argument(
        "--sequential",
        type=int,
        nargs="+",
        default=[1],
        metavar="T",
        help="edits applied before evaluating (WISE's protocol); 1 = single: edit, evaluate, "
        "roll back. Several values run one after another (default 1)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=tuple(dict.fromkeys((*METHODS, *FREETEXT_METHODS))),
        default=None,
        help=f"methods to evaluate (default: {' '.join(METHODS)}; freetext: {' '.join(FREETEXT_DEFAULT)}; "
        "freetext's off = use_edits=false with the edits applied)",
    )
    parser.add_argument(
        "--server",
        default=None,
        metavar="ADDR",
        help="drive a running service at host:port (default: start one in this process)",
    )
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("EDITSERVE_ADMIN_TOKEN", ""),
        help="token for --server's EditService (default: $EDITSERVE_ADMIN_TOKEN)",
    )
    parser.add_argument("--out", type=Path, default=Path("eval-out"), help="results and progress (eval-out)")
    parser.add_argument("--seed", type=int, default=0, help="seeds ROME's covariance text and --sample")
    parser.add_argument(
        "--sample", action="store_true", help="a seeded random sample of N records, not the first N"
    )
    parser.add_argument(
        "--concurrency", type=int, default=16, help="requests in flight (the server batches them)"
    )
    parser.add_argument(
        "--no-generate",
        dest="generate",
        action="store_false",
        help="skip the greedy-generation companions of the metrics (faster)",
    )
    parser.add_argument("--model", default="embedded", help="model for the in-process server and ROME's copy")
    parser.add_argument("--device", default="cpu", help="device for the in-process server and ROME")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16", "float16"),
        help="weights' dtype for the in-process server and ROME (default float32)",
    )
    parser.add_argument(
        "--rome-layer", type=int, default=None, help="ROME's edited layer (default: hook layer)"
    )
    parser.add_argument(
        "--rome-cov-tokens",
        type=int,
        default=40_000,
        help="sampled tokens for ROME's key covariance (cached under --out)",
    )
    parser.add_argument(
        "--rome-cache",
        type=Path,
        default=None,
        help="directory caching ROME's covariance, shareable between runs (--out/rome)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads in this process (default: $EDITSERVE_TORCH_THREADS, else 1 on a host "
        "with at most 2 CPUs, else torch's choice)",
    )
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from --out and exit")
    parser.add_argument(
        "--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="freetext: tokens per answer"
    )
    parser.add_argument(
        "--min-new-tokens", type=int, default=None,
        help="freetext: tokens before EOS may end an answer (default: the server's, 1; 0 = no floor)",
    )
    parser.add_argument(
        "--label", default="", help="freetext: a name for this configuration in the report"
    )
    parser.add_argument(
        "--unedited-from", type=Path, default=None, metavar="FILE",
        help="freetext: reuse the unedited answers of an earlier run (its unedited.json) with the same model",
    )


def config_from(args: argparse.Namespace, argv: list[str] | None = None) -> EvalConfig:
    bad = sorted(set(args.methods or []) - set(METHODS))
    if bad:
        raise SystemExit(f"editserve eval: error: --methods {' '.join(bad)} are for --format freetext")
    return EvalConfig(
        data=args.data,
        fmt=args.fmt,
        out=args.out,
        n=args.n,
        sequential=list(dict.fromkeys(args.sequential)),
        methods=list(dict.fromkeys(args.methods or METHODS)),
        server=args.server,
        admin_token=args.admin_token,
        seed=args.seed,
        sample=args.sample,
        concurrency=args.concurrency,
        generate=args.generate,
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        rome_layer=args.rome_layer,
        rome_cov_tokens=args.rome_cov_tokens,
        rome_cache=args.rome_cache,
        command=["editserve", "eval", *(argv if argv is not None else _eval_argv())],
    )


def _eval_argv() -> list[str]:
    argv = sys.argv[1:]
    return argv[argv.index("eval") + 1 :] if "eval" in argv else argv


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not args.data.exists():
        print(f"editserve eval: error: --data {args.data} does not exist", file=sys.stderr)
        return 2
    if args.fmt == "freetext":
        return _run_freetext(args)
    cfg = config_from(args)
    from service.engine.cpu_threads import set_torch_threads

    # --threads, else the in-process server's EDITSERVE_TORCH_THREADS, else the auto rule
    set_torch_threads(args.threads or int(os.environ.get("EDITSERVE_TORCH_THREADS") or 0))
    if args.report_only:
        from service.eval.datasets import load_records
        from service.eval.report import write_report

        data = load_records(cfg.data, cfg.fmt, cfg.n, sample_seed=cfg.seed if cfg.sample else None)
        write_report(cfg, data)
    else:
        from service.eval.runner import run_eval_sync

        run_eval_sync(cfg)
    print(f"wrote {cfg.out / 'results.json'}, {cfg.out / 'summary.md'}, {cfg.out / 'plot.png'}")
    return 0


def _run_freetext(args: argparse.Namespace) -> int:
    from service.engine.cpu_threads import set_torch_threads
    from service.eval.freetext import FreetextConfig, run_freetext_sync

    methods = list(dict.fromkeys(args.methods or FREETEXT_DEFAULT))
    bad = sorted(set(methods) - set(FREETEXT_METHODS))
    if bad:
        print(f"editserve eval: error: --format freetext has no method {' '.join(bad)}", file=sys.stderr)
        return 2
    cfg = FreetextConfig(
        data=args.data,
        out=args.out,
        n=args.n,
        sequential=list(dict.fromkeys(args.sequential)),
        methods=methods,
        server=args.server,
        admin_token=args.admin_token,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        label=args.label,
        unedited_from=args.unedited_from,
        model=args.model,
        device=args.device,
        command=["editserve", "eval", *_eval_argv()],
    )
    set_torch_threads(args.threads or int(os.environ.get("EDITSERVE_TORCH_THREADS") or 0))
    run_freetext_sync(cfg)
    print(f"wrote {cfg.out / 'results.json'}, {cfg.out / 'summary.md'}")
    return 0

"""Client subcommands that ask the served model and server: `editserve generate`, `score`, `info` and
`trace` (registered by service/client/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping

from .cli_support import EXIT_OK, CommandError, make_client

# ------------------------------------------------------------------------------------------ generate, score


def _namespaces(text: str) -> list[str]:
    """`--namespaces a,b` as a list (the server validates the names)."""
    return [p.strip() for p in text.split(",") if p.strip()]


def cmd_generate(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import finish_name, path_name, print_json

    messages = None
    prompt = args.prompt
    if args.chat or args.system is not None:
        messages = ([("system", args.system)] if args.system else []) + [("user", args.prompt)]
        prompt = ""
    with make_client(args, env) as client:
        stream = client.generate_stream(
            prompt,
            messages=messages,
            max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            stop=args.stop,
            use_edits=False if args.no_edits else None,
            edit_paths=args.paths,
            min_version=args.min_version,
            namespaces=_namespaces(args.namespaces),
        )
        pieces, last = [], None
        for chunk in stream:
            pieces.append(chunk.text)
            last = chunk
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    applied = list(last.applied_edits) if last is not None else []
    if args.json:
        print_json(
            {
                "text": "".join(pieces),
                "finish_reason": finish_name(last.finish_reason) if last else "",
                "prompt_tokens": last.prompt_tokens if last else 0,
                "completion_tokens": last.completion_tokens if last else 0,
                "edit_version": last.edit_version if last else 0,
                "applied_edits": [
                    {"edit_id": a.edit_id, "path": path_name(a.path), "score": round(a.score, 4),
                     "namespace": a.namespace}
                    for a in applied
                ],
            },
            sys.stdout,
        )
        return EXIT_OK
    sys.stdout.write("\n")
    sys.stdout.flush()  # the text before the footer on stderr
    fired = ", ".join(
        f"{a.edit_id} ({path_name(a.path)} {a.score:.2f}"
        + (f", namespace {a.namespace})" if a.namespace not in ("", "default") else ")")
        for a in applied
    ) or "none"
    if last is not None:  # on stderr: `editserve generate ... > answer.txt` keeps only the text
        print(
            f"[edit version {last.edit_version} · {last.completion_tokens} tokens · "
            f"{finish_name(last.finish_reason)} · edits applied: {fired}]",
            file=sys.stderr,
        )
    return EXIT_OK


def cmd_score(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import path_name, print_json, table, to_dict

    with make_client(args, env) as client:
        reply = client.score(
            args.prompt, args.continuation, use_edits=False if args.no_edits else None, edit_paths=args.paths,
            namespaces=_namespaces(args.namespaces),
        )
    if args.json:
        print_json(to_dict(reply), sys.stdout)
        return EXIT_OK
    table(
        ["token", "log-prob", "model's choice"],
        [
            [repr(t.token), f"{t.logprob:.3f}", "same" if t.is_greedy else f"token id {t.argmax_token_id}"]
            for t in reply.tokens
        ],
        sys.stdout,
        flexible=0,
    )
    fired = ", ".join(f"{a.edit_id} ({path_name(a.path)})" for a in reply.applied_edits) or "none"
    print(
        f"total log-prob {reply.total_logprob:.3f} · edit version {reply.edit_version} · "
        f"edits applied: {fired}"
    )
    return EXIT_OK


# ------------------------------------------------------------------------------------------ info, trace


def cmd_info(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import key_values, print_json, to_dict

    with make_client(args, env) as client:
        info = client.server_info()
        health = client.health()
    if args.json:
        print_json({**to_dict(info), "address": client.address, "health": health}, sys.stdout)
        return EXIT_OK
    key_values(
        [
            ("address", f"{client.address} ({health})"),
            ("server version", info.server_version),
            ("model", f"{info.model_name} ({info.architecture or 'unknown architecture'})"),
            ("device", f"{info.device}, {info.dtype}"),
            (
                "hook layers",
                ", ".join(map(str, info.hook_layers))
                + (f" ({info.hook_layer_rule})" if info.hook_layer_rule else ""),
            ),
            ("max batch size", str(info.max_batch_size)),
            ("edit version", str(info.edit_version)),
            (
                "active edits",
                f"{info.active_edits} ({info.active_hook_edits} hook, {info.active_descriptor_edits} "
                "descriptor-only)",
            ),
            ("edits ever made", str(info.total_edits)),
        ],
        sys.stdout,
    )
    return EXIT_OK


def cmd_trace(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import print_json, table
    from .trace_plot import token_labels, trace_dict, write_heatmaps

    with make_client(args, env) as client:
        reply = client.trace(args.prompt, args.subject, answer=args.answer, seed=args.seed,
                             samples=args.samples, window=args.window)
    if args.out is not None:
        try:
            write_heatmaps(reply, args.out)
        except OSError as exc:
            raise CommandError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    if args.json:
        print_json(trace_dict(reply), sys.stdout)
        return EXIT_OK
    labels = token_labels(reply)
    print(f"answer {reply.answer!r}: clean p = {reply.clean_probability:.4f}, corrupted p = "
          f"{reply.corrupted_probability:.4f} (noise std {reply.noise:.3f}, {reply.samples} samples, "
          f"seed {reply.seed}, window {reply.window}, {reply.seconds:.1f} s)")
    last_subject = labels[reply.subject_end - 1]
    table(
        ["where", "layer", "indirect effect"],
        [[f"MLP at {last_subject}", str(e.layer), f"{e.effect:+.4f}"] for e in reply.mlp_at_subject]
        + [[f"attention at {labels[-1]}", str(e.layer), f"{e.effect:+.4f}"] for e in reply.attention_at_last],
        sys.stdout,
    )
    if args.out is not None:
        print(f"heatmaps written to {args.out}")
    return EXIT_OK

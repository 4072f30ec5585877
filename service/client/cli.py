"""The client subcommands of `editserve`: talk to a running server.

    editserve generate "prompt" [--chat] [--no-edits]      stream a completion
    editserve score "prompt" "continuation"                per-token log-probabilities
    editserve edit --subject S --prompt P --target T       one edit; prints its quality report
    editserve edit --descriptor "..."                      a free-text (retrieval) edit
    editserve edit --file edits.jsonl                      many edits, in BatchEdit chunks, resumable
    editserve edits list [--state S] [--subject TEXT]      find edits
    editserve edits show ID                                one edit: its report and history
    editserve edits rollback ID --reason R                 take one edit back
    editserve edits rollback-to VERSION --reason R         take back everything after a version
    editserve edits export > edits.jsonl                   the active edits, as JSONL
    editserve edits import edits.jsonl                     recreate them on this server and model
    editserve info                                         model, device, edit version, counts
    editserve trace --prompt P --subject S --out trace.png causal tracing: where the model keeps a fact

Every command takes --address (default $EDITSERVE_ADDRESS, else 127.0.0.1:$EDITSERVE_PORT or 50051),
the admin token from --token-file or $EDITSERVE_ADMIN_TOKEN, and --json for scripts. A failure prints one
line on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from .client import EditServeClient

ROLLED_BACK = 2  # editserve.v1.EDIT_STATE_ROLLED_BACK (the stubs are imported only when a command runs)
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
DEFAULT_CHUNK_SIZE = 16
Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]


class CommandError(Exception):
    """A mistake the command itself finds (an unreadable token file, a refused confirmation)."""


# ------------------------------------------------------------------------------------------ parser


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("connection and output")
    group.add_argument(
        "--address",
        default=None,
        help="server host:port (default: $EDITSERVE_ADDRESS, else 127.0.0.1:$EDITSERVE_PORT or 50051)",
    )
    group.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="file holding the admin token (default: $EDITSERVE_ADMIN_TOKEN)",
    )
    group.add_argument("--timeout", type=float, default=None, help="deadline of each call, in seconds")
    group.add_argument("--json", action="store_true", help="print JSON (for scripts) instead of tables")
    return common


def _actor_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--actor",
        default=None,
        help="who is doing this, recorded in the edit log (default: $EDITSERVE_ACTOR, else the login name)",
    )


def add_client_commands(commands: argparse._SubParsersAction) -> None:
    """Register generate, score, edit, edits and info on `editserve`'s subcommands."""
    common = _common()

    gen = commands.add_parser(
        "generate",
        parents=[common],
        help="stream a completion from a running server",
        description="Stream a completion; the edits that fired are listed at the end.",
    )
    gen.add_argument("prompt")
    gen.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    gen.add_argument("--system", default=None, help="a system message (implies --chat)")
    gen.add_argument("--no-edits", action="store_true", help="the unedited model (use_edits=false)")
    gen.add_argument(
        "--path",
        choices=("hook", "retrieval"),
        action="append",
        dest="paths",
        help="only this edit path (repeatable; default both)",
    )
    gen.add_argument(
        "--namespaces", default="", help="comma-separated namespaces whose edits apply (default: default)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=None)
    gen.add_argument("--min-new-tokens", type=int, default=None)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument(
        "--min-version",
        type=int,
        default=None,
        help="fail unless the server serves this edit version or later",
    )
    gen.set_defaults(handler=_guarded(cmd_generate))

    score = commands.add_parser(
        "score", parents=[common], help="per-token log-probabilities of a continuation"
    )
    score.add_argument("prompt")
    score.add_argument("continuation")
    score.add_argument("--no-edits", action="store_true")
    score.add_argument("--path", choices=("hook", "retrieval"), action="append", dest="paths")
    score.add_argument("--namespaces", default="", help="comma-separated namespaces whose edits apply")
    score.set_defaults(handler=_guarded(cmd_score))

    edit = commands.add_parser(
        "edit",
        parents=[common],
        help="make an edit (or many, from a JSONL file)",
        description="Make one edit and print its quality report, or send every line of a JSONL file "
        "(fields as EditRequest: subject, prompt, target_new, paraphrases, descriptor, actor, force, "
        "compile_descriptor, layer) in BatchEdit chunks. Run the same --file command again after an "
        "interruption: chunks already stored are not computed again.",
    )
    edit.add_argument("--subject", default="")
    edit.add_argument("--prompt", default="", help="a prompt containing the subject")
    edit.add_argument("--target", default="", dest="target_new", help="the new answer")
    edit.add_argument(
        "--paraphrase",
        action="append",
        default=[],
        dest="paraphrases",
        help="another phrasing to calibrate and check (repeatable)",
    )
    edit.add_argument("--descriptor", default="", help="the fact as a sentence; alone: a retrieval-only edit")
    edit.add_argument(
        "--no-compile",
        action="store_true",
        help="keep a descriptor-only edit retrieval-only (compile_descriptor=false)",
    )
    edit.add_argument("--force", action="store_true", help="store even if the quality gate fails")
    edit.add_argument("--namespace", default="", help="the edit's namespace (default: default)")
    edit.add_argument(
        "--layer", default="",
        help="hook layer: fixed, auto (chosen by a causal trace of the prompt) or an index; "
        "default: the server's --edit-layer",
    )
    edit.add_argument("--idempotency-key", default=None, help="same key and content: the first result again")
    edit.add_argument(
        "--file", type=Path, default=None, help="a JSONL file of edits, one per line ('-' = stdin)"
    )
    edit.add_argument(
        "--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help="edits per BatchEdit (--file)"
    )
    _actor_argument(edit)
    edit.set_defaults(handler=_guarded(cmd_edit))

    info = commands.add_parser("info", parents=[common], help="what a running server serves")
    info.set_defaults(handler=_guarded(cmd_info))

    trace = commands.add_parser(
        "trace", parents=[common],
        help="causal tracing (ROME): which layers and tokens carry the answer; heatmaps with --out",
    )
    trace.add_argument("--prompt", required=True, help='e.g. "The Eiffel Tower is located in the city of"')
    trace.add_argument("--subject", required=True, help="as in the prompt; its tokens are corrupted")
    trace.add_argument("--answer", default="", help="the expected answer (default: the model's next token)")
    trace.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    trace.add_argument("--samples", type=int, default=None, help="noise samples (server default: 3)")
    trace.add_argument("--window", type=int, default=None, help="layers restored together (default 10)")
    trace.add_argument("--out", type=Path, default=None, help="write the three heatmaps to this PNG")
    trace.set_defaults(handler=_guarded(cmd_trace))

    edits = commands.add_parser("edits", help="list, show, roll back, export and import edits")
    sub = edits.add_subparsers(dest="edits_command", required=True, metavar="COMMAND")

    listing = sub.add_parser("list", parents=[common], help="list edits, oldest first")
    listing.add_argument("--state", choices=("active", "rolled_back", "superseded", "all"), default="all")
    listing.add_argument("--subject", default="", help="case-insensitive part of the subject")
    listing.add_argument(
        "--text",
        default="",
        help="case-insensitive part of any of its texts (subject, prompt, target, paraphrases, descriptor)",
    )
    listing.add_argument("--actor", default="", help="who made it (whole name, any case)")
    listing.add_argument("--namespace", default="", help="only this namespace's edits")
    listing.add_argument("--limit", type=int, default=0, help="at most this many (default: all)")
    listing.set_defaults(handler=_guarded(cmd_list))

    show = sub.add_parser("show", parents=[common], help="one edit with its quality report and history")
    show.add_argument("edit_id")
    show.set_defaults(handler=_guarded(cmd_show))

    rollback = sub.add_parser("rollback", parents=[common], help="roll one edit back")
    rollback.add_argument("edit_id")
    rollback.add_argument("--reason", required=True, help="why (kept in the edit log)")
    _actor_argument(rollback)
    rollback.set_defaults(handler=_guarded(cmd_rollback))

    rollback_to = sub.add_parser(
        "rollback-to", parents=[common], help="roll back every edit committed after a version (asks first)"
    )
    rollback_to.add_argument("version", type=int)
    rollback_to.add_argument("--reason", required=True, help="why (kept in the edit log)")
    rollback_to.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    rollback_to.add_argument("--namespace", default="", help="only this namespace's edits")
    _actor_argument(rollback_to)
    rollback_to.set_defaults(handler=_guarded(cmd_rollback_to))

    export = sub.add_parser("export", parents=[common], help="write edits as JSONL (for `edits import`)")
    export.add_argument("--state", choices=("active", "rolled_back", "superseded", "all"), default="active")
    export.add_argument("--output", "-o", type=Path, default=None, help="file to write (default: stdout)")
    export.set_defaults(handler=_guarded(cmd_export))

    importing = sub.add_parser(
        "import",
        parents=[common],
        help="recreate exported edits on this server",
        description="Send the active edits of an export to this server: hook entries are computed again on "
        "its model and every edit passes its quality gate (the ones that do not are listed). "
        "Resumable like `edit --file`; an edit keeps its actor unless the line has none.",
    )
    importing.add_argument("file", type=Path, help="JSONL from `editserve edits export` ('-' = stdin)")
    importing.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE)
    importing.add_argument("--force", action="store_true", help="store edits that fail the gate too")
    _actor_argument(importing)
    importing.set_defaults(handler=_guarded(cmd_import))


# ------------------------------------------------------------------------------------------ plumbing


def default_address(env: Mapping[str, str]) -> str:
    return env.get("EDITSERVE_ADDRESS") or f"127.0.0.1:{env.get('EDITSERVE_PORT') or 50051}"


def read_token(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """--token-file beats $EDITSERVE_ADMIN_TOKEN (the flag-beats-environment rule of `editserve serve`)."""
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise CommandError(
                f"cannot read the token file {args.token_file}: {exc.strerror or exc}"
            ) from None
        if not token:
            raise CommandError(f"the token file {args.token_file} is empty")
        return token
    return env.get("EDITSERVE_ADMIN_TOKEN") or None


def actor_of(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    if args.actor is not None:
        return args.actor
    if env.get("EDITSERVE_ACTOR"):
        return env["EDITSERVE_ACTOR"]
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        return ""


def make_client(args: argparse.Namespace, env: Mapping[str, str]) -> EditServeClient:
    from .client import EditServeClient, RetryPolicy
    from .requests import Timeouts

    timeouts = Timeouts() if args.timeout is None else Timeouts(args.timeout, args.timeout, args.timeout)
    # A terminal user waits a few seconds for a server that is starting, not a minute.
    retry = RetryPolicy(attempts=3, initial_backoff_s=0.3)
    return EditServeClient(
        args.address or default_address(env), token=read_token(args, env), timeouts=timeouts, retry=retry
    )


def _guarded(handler: Handler) -> Handler:
    """A failure is one line on stderr and exit 1, never a traceback."""

    def run(args: argparse.Namespace, env: Mapping[str, str]) -> int:
        from .errors import ClientError, QualityGateError

        name = "editserve " + " ".join(n for n in (args.command, getattr(args, "edits_command", None)) if n)
        try:
            return handler(args, env)
        except QualityGateError as exc:  # nothing was stored: the report says why
            from .format import print_json, to_dict, write_report

            if args.json:
                print_json(
                    {
                        "error": exc.code.name,
                        "message": exc.details,
                        "reports": [to_dict(r) for r in exc.reports],
                    },
                    sys.stdout,
                )
            for report in [] if args.json else exc.reports:
                sys.stdout.write("quality report:\n")
                write_report(report, sys.stdout)
            print(f"{name}: error: {exc.one_line()}", file=sys.stderr)
        except ClientError as exc:
            print(f"{name}: error: {exc.one_line()}", file=sys.stderr)
        except CommandError as exc:
            print(f"{name}: error: {exc}", file=sys.stderr)
        except ValueError as exc:  # a value the client library refuses before sending
            print(f"{name}: error: {exc}", file=sys.stderr)
        except BrokenPipeError:  # `editserve edits export | head`: the reader left, nothing is wrong
            sys.stderr.close()
            return EXIT_OK
        except KeyboardInterrupt:
            print(f"\n{name}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
        return EXIT_FAILED

    return run


def _open_lines(path: Path) -> list[str]:
    if str(path) == "-":
        return sys.stdin.read().splitlines()
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path} is not UTF-8 text: {exc}") from None


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


# ------------------------------------------------------------------------------------------ edit


def cmd_edit(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    if args.file is not None:
        if args.subject or args.prompt or args.target_new or args.descriptor or args.paraphrases:
            raise CommandError(
                "--file takes the edits from the file: give no --subject/--prompt/--target/"
                "--descriptor with it"
            )
        return _send_file(args, env, importing=False)
    if not (args.descriptor or args.subject or args.prompt or args.target_new):
        raise CommandError(
            "give --subject, --prompt and --target (and optionally --descriptor), "
            "or --descriptor alone, or --file"
        )
    from .format import print_json, to_dict, write_report

    fields: dict[str, Any] = {
        "subject": args.subject,
        "prompt": args.prompt,
        "target_new": args.target_new,
        "paraphrases": args.paraphrases,
        "descriptor": args.descriptor,
        "force": args.force,
        "actor": actor_of(args, env),
        "idempotency_key": args.idempotency_key,
        "namespace": args.namespace,
        "layer": args.layer,
    }
    if args.no_compile:
        fields["compile_descriptor"] = False
    with make_client(args, env) as client:
        made = client.edit(**fields)
    if args.json:
        print_json(to_dict(made), sys.stdout)
        return EXIT_OK
    verdict = (
        "passed the quality gate" if made.report.passed else "FAILED the quality gate (stored by --force)"
    )
    print(f"edit {made.edit_id} stored at version {made.version}; {verdict}")
    print("quality report:")
    write_report(made.report, sys.stdout)
    return EXIT_OK


def _send_file(args: argparse.Namespace, env: Mapping[str, str], *, importing: bool) -> int:
    from tqdm import tqdm

    from . import edit_file

    if args.chunk_size < 1:
        raise CommandError(f"--chunk-size must be at least 1, got {args.chunk_size}")
    path = args.file
    lines, summary = edit_file.parse(
        _open_lines(path), default_actor=actor_of(args, env), importing=importing
    )
    # Malformed lines are reported now, with their numbers; the rest still goes.
    for result in summary.results:
        if result.outcome == edit_file.REJECTED and not args.json:
            print(f"{path}:{result.line}: {result.message}", file=sys.stderr)
    interrupted: BaseException | None = None
    with make_client(args, env) as client:
        base_version = client.server_info().edit_version if lines else 0
        # tqdm draws on a terminal only (disable=None), so pipes and --json output stay clean.
        with tqdm(
            total=len(lines),
            unit="edit",
            file=sys.stderr,
            disable=None if not args.json else True,
            desc="importing" if importing else "editing",
        ) as bar:
            try:
                edit_file.send_all(
                    client,
                    lines,
                    summary,
                    chunk_size=args.chunk_size,
                    force=args.force,
                    base_version=base_version,
                    progress=bar.update,
                )
            except KeyboardInterrupt as exc:
                interrupted = exc
            except Exception as exc:  # noqa: BLE001 - the account of what was done comes first
                interrupted = exc
    summary.results.sort(key=lambda r: r.line)
    _print_summary(path, summary, len(lines), args.json, sys.stdout)
    if interrupted is not None:
        done = {r.line for r in summary.results}
        left = sum(line.number not in done for line in lines)
        print(
            f"stopped with {left} line(s) not sent: run the same command again to resume (stored chunks "
            "are not computed again)",
            file=sys.stderr,
        )
        raise interrupted
    return EXIT_OK if summary.ok else EXIT_FAILED


def _print_summary(path: Path, summary: Any, sent: int, as_json: bool, out: TextIO) -> None:
    from . import edit_file as ef
    from .format import print_json, table

    counts = {
        name: summary.count(name)
        for name in (ef.STORED, ef.ALREADY_STORED, ef.FAILED_GATE, ef.REJECTED, ef.SKIPPED)
    }
    forced = sum(r.forced for r in summary.results)
    if as_json:
        print_json(
            {
                "file": str(path),
                **counts,
                "forced": forced,
                "results": [r.to_json() for r in summary.results],
            },
            out,
        )
        return
    parts = [f"{counts[ef.STORED]} stored"]
    if counts[ef.ALREADY_STORED]:
        parts.append(f"{counts[ef.ALREADY_STORED]} already stored by an earlier run")
    if forced:
        parts.append(f"{forced} of them forced past a failed gate")
    parts += [f"{counts[ef.FAILED_GATE]} failed the quality gate", f"{counts[ef.REJECTED]} rejected"]
    if counts[ef.SKIPPED]:
        parts.append(f"{counts[ef.SKIPPED]} skipped")
    out.write(f"{path}: {', '.join(parts)}\n")
    problems = [r for r in summary.results if r.outcome not in (ef.STORED, ef.ALREADY_STORED) or r.forced]
    if problems:
        table(
            ["line", "outcome", "reason"],
            [
                [str(r.line), r.outcome.replace("_", " ") + (" (forced)" if r.forced else ""), r.message]
                for r in problems
            ],
            out,
        )


# ------------------------------------------------------------------------------------------ edits ...


def cmd_list(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import clip, edit_what, print_json, state_name, table, to_dict, when

    records = []
    with make_client(args, env) as client:
        for record in client.iter_edits(
            state=args.state,
            subject=args.subject,
            text=args.text,
            actor=args.actor,
            namespace=args.namespace,
            page_size=min(args.limit or 500, 500),
        ):
            records.append(record)
            if args.limit and len(records) >= args.limit:
                break
    if args.json:
        print_json({"edits": [to_dict(r) for r in records], "count": len(records)}, sys.stdout)
        return EXIT_OK
    if not records:
        print("no edits match", file=sys.stderr)
        return EXIT_OK
    table(
        ["id", "version", "state", "actor", "created", "edit"],
        [
            [
                r.edit_id,
                str(r.version),
                state_name(r.state),
                clip(r.actor, 16),
                when(r.created_at),
                edit_what(r),
            ]
            for r in records
        ],
        sys.stdout,
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import print_json, to_dict, write_record

    with make_client(args, env) as client:
        record = client.get_edit(args.edit_id)
    if args.json:
        print_json(to_dict(record), sys.stdout)
    else:
        write_record(record, sys.stdout)
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import edit_what, print_json, to_dict

    with make_client(args, env) as client:
        record = client.get_edit(args.edit_id)  # NOT_FOUND here names the id before anything changes
        reply = client.rollback(args.edit_id, reason=args.reason, actor=actor_of(args, env))
    if args.json:
        print_json(to_dict(reply), sys.stdout)
    else:
        print(
            f"rolled back {reply.edit_id} ({edit_what(record)}): "
            f"the server now serves version {reply.version}"
        )
    return EXIT_OK


def cmd_rollback_to(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .format import edit_what, print_json, state_name, table, to_dict, when

    with make_client(args, env) as client:
        current = client.server_info().edit_version
        if args.version > current:
            raise CommandError(f"version {args.version} is beyond the server's edit version {current}")
        # what RollbackTo will take back: every edit after the version that is not rolled back already
        doomed = [r for r in client.iter_edits(namespace=args.namespace)
                  if r.version > args.version and r.state != ROLLED_BACK]
        if not doomed:
            if args.json:
                print_json({"version": current, "rolled_back_edit_ids": []}, sys.stdout)
            else:
                print(f"nothing to roll back: no active or superseded edit after version {args.version}")
            return EXIT_OK
        out = sys.stderr if args.json else sys.stdout
        out.write(f"rolling back {len(doomed)} edit(s) committed after version {args.version}:\n")
        table(
            ["id", "version", "state", "actor", "created", "edit"],
            [
                [r.edit_id, str(r.version), state_name(r.state), r.actor, when(r.created_at), edit_what(r)]
                for r in doomed
            ],
            out,
        )
        if not args.yes:
            _confirm(f"Roll back these {len(doomed)} edit(s)? [y/N] ")
        reply = client.rollback_to(args.version, reason=args.reason, actor=actor_of(args, env),
                                   namespace=args.namespace)
    if args.json:
        print_json(to_dict(reply), sys.stdout)
        return EXIT_OK
    extra = sorted(set(reply.rolled_back_edit_ids) - {r.edit_id for r in doomed})
    print(
        f"rolled back {len(reply.rolled_back_edit_ids)} edit(s): "
        f"the server now serves version {reply.version}"
    )
    if extra:  # committed between the listing and the rollback
        print(f"note: also rolled back {len(extra)} edit(s) committed meanwhile: {', '.join(extra)}")
    return EXIT_OK


def _confirm(question: str) -> None:
    if not sys.stdin or not sys.stdin.isatty():
        raise CommandError("not rolled back: confirmation needs a terminal; run again with --yes")
    try:
        answer = input(question)
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CommandError("not rolled back (not confirmed)")


def cmd_export(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    from .edit_file import export_line

    out: TextIO = sys.stdout
    handle = None
    if args.output is not None:
        try:
            handle = out = args.output.open("w", encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    count = 0
    try:
        with make_client(args, env) as client:
            info = client.server_info()
            for record in client.iter_edits(state=args.state):
                out.write(json.dumps(export_line(record), ensure_ascii=False) + "\n")
                count += 1
    finally:
        if handle is not None:
            handle.close()
    print(
        f"exported {count} edit(s) from {info.model_name} at edit version {info.edit_version}",
        file=sys.stderr,
    )
    return EXIT_OK


def cmd_import(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    return _send_file(args, env, importing=True)


# ------------------------------------------------------------------------------------------ info


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

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

This module wires the parser and turns failures into that one line; the handlers live by what a user does:
cli_model.py (generate, score, info, trace) and cli_edits.py (edit, edits ...), over the shared plumbing of
cli_support.py (address, token, actor, client).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from .cli_edits import cmd_edit, cmd_export, cmd_import, cmd_list, cmd_rollback, cmd_rollback_to, cmd_show
from .cli_model import cmd_generate, cmd_info, cmd_score, cmd_trace
from .cli_support import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, CommandError

DEFAULT_CHUNK_SIZE = 16
Handler = Callable[[argparse.Namespace, Mapping[str, str]], int]


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


# ------------------------------------------------------------------------------------------ errors


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

"""Client subcommands that make and manage edits: `editserve edit` (one, or many from a JSONL file) and
`editserve edits list | show | rollback | rollback-to | export | import`. Registered by
service/client/cli.py.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from .cli_support import EXIT_FAILED, EXIT_OK, CommandError, actor_of, make_client

ROLLED_BACK = 2  # editserve.v1.EDIT_STATE_ROLLED_BACK (the stubs are imported only when a command runs)


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


def _open_lines(path: Path) -> list[str]:
    if str(path) == "-":
        return sys.stdin.read().splitlines()
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path} is not UTF-8 text: {exc}") from None


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

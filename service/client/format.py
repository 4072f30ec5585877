"""Terminal output of the client commands: readable tables and reports by default, JSON for scripts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.message import Message

from service._proto.editserve.v1 import editserve_pb2 as pb


def to_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data: proto field names, enum names, every field present."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
        unquote_int64_if_possible=True,  # versions are numbers to a script, not strings
    )


def print_json(data: Any, out: TextIO) -> None:
    out.write(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def state_name(state: int) -> str:
    return pb.EditState.Name(state).removeprefix("EDIT_STATE_").lower() if state else "unknown"


def kind_name(kind: int) -> str:
    return pb.EditKind.Name(kind).removeprefix("EDIT_KIND_").lower() if kind else "unknown"


def path_name(path: int) -> str:
    return pb.EditPath.Name(path).removeprefix("EDIT_PATH_").lower() if path else "unknown"


def finish_name(reason: int) -> str:
    return pb.FinishReason.Name(reason).removeprefix("FINISH_REASON_").lower() if reason else ""


def when(rfc3339: str) -> str:
    """2026-12-04T13:24:14.123456Z -> 2026-12-04 13:24:14Z (the table's width matters more than µs)."""
    if not rfc3339:
        return ""
    date, _, clock = rfc3339.partition("T")
    return f"{date} {clock.split('.')[0].rstrip('Z')}Z"


def one_line(text: str) -> str:
    return " ".join(text.split())


def clip(text: str, width: int) -> str:
    text = one_line(text)
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO, *, flexible: int = -1) -> None:
    """Left-aligned columns; the `flexible` column is clipped so a row fits the terminal."""
    rows = [[one_line(str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    total = shutil.get_terminal_size((140, 24)).columns
    flex = flexible % len(headers)
    room = total - (sum(widths) - widths[flex]) - 2 * (len(headers) - 1)
    widths[flex] = max(len(headers[flex]), min(widths[flex], room))
    for row in [list(headers), *rows]:
        cells = [clip(c, w).ljust(w) for c, w in zip(row, widths, strict=True)]
        out.write("  ".join(cells).rstrip() + "\n")


def key_values(pairs: Sequence[tuple[str, str]], out: TextIO, indent: str = "") -> None:
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        out.write(f"{indent}{key.ljust(width)}  {value}\n")


def edit_what(record: pb.EditRecord) -> str:
    """What an edit says, in a few words: `subject → target` or its descriptor."""
    if record.kind == pb.EDIT_KIND_TRIPLE:
        return f"{record.subject} → {record.target_new}"
    return f"“{record.descriptor}”"


def report_lines(report: pb.QualityReport) -> list[tuple[str, str]]:
    """The quality report as label/value pairs (what an operator reads to judge an edit)."""
    pairs = [("gate", "passed" if report.passed else "FAILED")]
    if report.old_answer or report.target_logprob:
        pairs += [
            ("efficacy", "yes" if report.efficacy else "no"),
            ("old answer", f"{report.old_answer!r} (log-prob {report.old_answer_logprob:.2f})"),
            ("target log-prob", f"{report.target_logprob:.2f}"),
        ]
        if report.paraphrases:
            ok = sum(p.success for p in report.paraphrases)
            pairs.append(("paraphrases", f"{ok}/{len(report.paraphrases)} succeed"))
            pairs += [(f"  {'ok ' if p.success else 'no '}", p.prompt) for p in report.paraphrases]
        pairs += [
            (
                "locality",
                f"top-1 changed on {report.locality_top1_changed:.1%} of probes, "
                f"mean KL {report.locality_mean_kl:.4f}",
            ),
            ("gate threshold", f"{report.threshold:.3f}"),
            *([("layer", report.layer_choice)] if report.layer_choice else []),
            ("compute", f"{report.compute_seconds:.2f} s"),
        ]
    if report.message:
        pairs.append(("message", report.message))
    return pairs


def write_report(report: pb.QualityReport, out: TextIO, indent: str = "  ") -> None:
    key_values(report_lines(report), out, indent)


def history_lines(record: pb.EditRecord) -> list[tuple[str, str]]:
    """What happened to an edit, oldest first."""
    by = f" by {record.actor}" if record.actor else ""
    lines = [(when(record.created_at), f"created at version {record.version}{by}")]
    if record.supersedes:
        lines.append(("", f"superseded {', '.join(record.supersedes)} (same subject and relation)"))
    if record.superseded_by:
        verb = "hidden by" if record.state == pb.EDIT_STATE_SUPERSEDED else "was hidden by"
        lines.append(("", f"{verb} {record.superseded_by} (a newer edit of the same subject and relation)"))
    if record.rolled_back_version:
        who = f" by {record.rolled_back_by}" if record.rolled_back_by else ""
        why = f": {record.rollback_reason}" if record.rollback_reason else ""
        lines.append(
            (when(record.rolled_back_at), f"rolled back at version {record.rolled_back_version}{who}{why}")
        )
    return lines


def write_record(record: pb.EditRecord, out: TextIO) -> None:
    pairs = [
        ("edit", record.edit_id),
        ("state", state_name(record.state)),
        (
            "kind",
            kind_name(record.kind)
            + (" (compiled from the descriptor)" if record.derived_from_descriptor else ""),
        ),
        ("namespace", record.namespace or "default"),
        ("version", str(record.version)),
        ("actor", record.actor or "-"),
        ("created", when(record.created_at)),
    ]
    if record.subject:
        pairs += [("subject", record.subject), ("prompt", record.prompt), ("target", record.target_new)]
    pairs += [("paraphrase", p) for p in record.paraphrases]
    if record.descriptor:
        pairs.append(("descriptor", record.descriptor))
    if record.hook_layers:
        pairs.append(("hook layers", ", ".join(map(str, record.hook_layers))))
    key_values(pairs, out)
    out.write("quality report:\n")
    write_report(record.report, out)
    out.write("history:\n")
    key_values(history_lines(record), out, "  ")

"""Edits from a JSONL file (`editserve edit --file`, `editserve edits import`): parse each line, send the
lines in BatchEdit chunks, and account for every line.

Resuming: each chunk's idempotency key is a hash of its content (edits, actor, force). Running the same
command again after an interruption sends the same chunks with the same keys, so the server answers the
chunks it already stored from its log (nothing is computed twice) and computes the rest.

A BatchEdit is all or nothing, so one bad line would sink its chunk: a line the server rejects
(INVALID_ARGUMENT naming `edits[n]`) or whose quality gate fails is taken out and the rest of the chunk
is sent again (under the key of what is left), until the chunk stores or is empty.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from service._proto.editserve.v1 import editserve_pb2 as pb

from .client import EditServeClient
from .errors import AlreadyExistsError, InvalidArgumentError, QualityGateError

# The end of a report's layer_choice when the request named the layer (service/hooks/editor.py).
NAMED_LAYER_SUFFIX = "(named in the request)"
STRING_FIELDS = ("subject", "prompt", "target_new", "descriptor", "actor", "namespace", "layer")
BOOL_FIELDS = ("force", "compile_descriptor")
# What `editserve edits export` writes beside the request fields: read back, never sent.
EXPORT_FIELDS = frozenset(
    {
        "edit_id",
        "version",
        "state",
        "kind",
        "created_at",
        "report",
        "hook_layers",
        "derived_from_descriptor",
        "derived",
        "rolled_back_version",
        "rolled_back_by",
        "rolled_back_at",
        "rollback_reason",
        "superseded_by",
        "supersedes",
        "model",
    }
)
_BATCH_INDEX = re.compile(r"^edits\[(\d+)\]\.?")

# outcomes of a line
STORED = "stored"  # stored by this run
ALREADY_STORED = "already_stored"  # stored before this run started (a resumed chunk)
FAILED_GATE = "failed_gate"
REJECTED = "rejected"  # malformed, or the server refused it (INVALID_ARGUMENT)
SKIPPED = "skipped"  # import: an edit that was not active where it was exported


@dataclass
class Line:
    number: int
    fields: dict[str, Any]  # EditRequest fields
    actor: str


@dataclass
class LineResult:
    line: int
    outcome: str
    message: str = ""
    edit_id: str = ""
    version: int = 0
    report: pb.QualityReport | None = None
    forced: bool = False  # stored by force although its gate failed

    def to_json(self) -> dict[str, Any]:
        from .format import to_dict

        out: dict[str, Any] = {"line": self.line, "outcome": self.outcome, "message": self.message}
        if self.edit_id:
            out.update(edit_id=self.edit_id, version=self.version, forced=self.forced)
        if self.report is not None:
            out["report"] = to_dict(self.report)
        return out


@dataclass
class Summary:
    results: list[LineResult] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(r.outcome == outcome for r in self.results)

    @property
    def ok(self) -> bool:
        return all(r.outcome in (STORED, ALREADY_STORED, SKIPPED) for r in self.results)


def parse_line(number: int, raw: str, *, default_actor: str, importing: bool) -> Line | LineResult | None:
    """One JSONL line -> a Line to send, a LineResult saying why not, or None (blank or # comment)."""
    text = raw.strip()
    if not text or text.startswith("#"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return LineResult(number, REJECTED, f"not valid JSON: {exc.msg} (column {exc.colno})")
    if not isinstance(obj, dict):
        return LineResult(number, REJECTED, f"expected a JSON object, got {type(obj).__name__}")
    if importing and obj.get("state", "active") != "active":
        return LineResult(
            number, SKIPPED, f"{obj.get('edit_id', 'edit')} is {obj['state']}: only active edits are imported"
        )
    if "target" in obj and "target_new" not in obj:
        obj["target_new"] = obj.pop("target")
    unknown = sorted(set(obj) - set(STRING_FIELDS) - set(BOOL_FIELDS) - {"paraphrases"} - EXPORT_FIELDS)
    if "idempotency_key" in obj:
        return LineResult(
            number,
            REJECTED,
            "idempotency_key: not allowed in a file (each chunk's key is derived from its content)",
        )
    if unknown:
        return LineResult(number, REJECTED, f"unknown field(s): {', '.join(unknown)}")
    fields: dict[str, Any] = {}
    for name in STRING_FIELDS:
        if name in obj:
            if not isinstance(obj[name], str):
                return LineResult(number, REJECTED, f"{name}: must be a string")
            fields[name] = obj[name]
    for name in BOOL_FIELDS:
        if name in obj:
            if not isinstance(obj[name], bool):
                return LineResult(number, REJECTED, f"{name}: must be true or false")
            fields[name] = obj[name]
    paraphrases = obj.get("paraphrases", [])
    if not isinstance(paraphrases, list) or not all(isinstance(p, str) for p in paraphrases):
        return LineResult(number, REJECTED, "paraphrases: must be a list of strings")
    fields["paraphrases"] = paraphrases
    if not (
        fields.get("descriptor") or fields.get("subject") or fields.get("prompt") or fields.get("target_new")
    ):
        return LineResult(number, REJECTED, "needs subject, prompt and target_new, or a descriptor")
    actor = fields.pop("actor", "") or default_actor
    return Line(number, fields, actor)


def parse(lines: Iterable[str], *, default_actor: str, importing: bool = False) -> tuple[list[Line], Summary]:
    """Every line of a file: those to send, and a summary already holding the ones that will not be."""
    todo: list[Line] = []
    summary = Summary()
    for number, raw in enumerate(lines, start=1):
        parsed = parse_line(number, raw, default_actor=default_actor, importing=importing)
        if isinstance(parsed, Line):
            todo.append(parsed)
        elif parsed is not None:
            summary.results.append(parsed)
    return todo, summary


def chunks(lines: list[Line], size: int) -> list[list[Line]]:
    """Consecutive lines of one actor, at most `size` each (a BatchEdit records one actor)."""
    out: list[list[Line]] = []
    for line in lines:
        if out and len(out[-1]) < size and out[-1][-1].actor == line.actor:
            out[-1].append(line)
        else:
            out.append([line])
    return out


def chunk_key(chunk: list[Line], force: bool) -> str:
    """Same content, same key: what makes a second run resume instead of storing twice."""
    content = {"v": 1, "actor": chunk[0].actor, "force": force, "edits": [line.fields for line in chunk]}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    return f"cli-{digest[:48]}"


def send_chunk(
    client: EditServeClient, chunk: list[Line], *, force: bool, base_version: int
) -> list[LineResult]:
    """Store what can be stored of one chunk; a result per line. Errors other than a line's own (auth,
    server unreachable, queue full) propagate: the run stops there and can be resumed."""
    results: list[LineResult] = []
    pending = list(chunk)
    while pending:
        try:
            response = client.batch_edit(
                [line.fields for line in pending],
                idempotency_key=chunk_key(pending, force),
                force=force,
                actor=pending[0].actor,
            )
        except QualityGateError as exc:
            if len(exc.reports) != len(pending) or all(r.passed for r in exc.reports):
                results += [LineResult(line.number, FAILED_GATE, exc.details) for line in pending]
                break
            keep = []
            for line, report in zip(pending, exc.reports, strict=True):
                if report.passed:
                    keep.append(line)
                else:
                    results.append(
                        LineResult(
                            line.number, FAILED_GATE, report.message or "quality gate failed", report=report
                        )
                    )
            pending = keep
            continue
        except (InvalidArgumentError, AlreadyExistsError) as exc:
            match = _BATCH_INDEX.match(exc.details)
            if match is None or int(match[1]) >= len(pending):
                results += [LineResult(line.number, REJECTED, exc.details) for line in pending]
                break
            bad = pending.pop(int(match[1]))
            results.append(
                LineResult(bad.number, REJECTED, exc.details[match.end() :].strip() or exc.details)
            )
            continue
        for line, made in zip(pending, response.edits, strict=True):
            forced = not made.report.passed
            results.append(
                LineResult(
                    line.number,
                    STORED if response.version > base_version else ALREADY_STORED,
                    ("stored by force although the quality gate failed: " if forced else "")
                    + made.report.message,
                    edit_id=made.edit_id,
                    version=made.version,
                    report=made.report,
                    forced=forced,
                )
            )
        break
    return sorted(results, key=lambda r: r.line)


def send_all(
    client: EditServeClient,
    lines: list[Line],
    summary: Summary,
    *,
    chunk_size: int,
    force: bool,
    base_version: int,
    progress: Callable[[int], None],
) -> Summary:
    """Send every line in chunks, adding each line's result to `summary` as its chunk completes (so an
    interruption still leaves an accurate account of what was done)."""
    for chunk in chunks(lines, chunk_size):
        summary.results += send_chunk(client, chunk, force=force, base_version=base_version)
        progress(len(chunk))
    summary.results.sort(key=lambda r: r.line)
    return summary


def export_line(record: pb.EditRecord) -> dict[str, Any]:
    """An edit as a line `edits import` (or `edit --file`) reads back: the request that recreates it on
    another server or model, and where it came from (ignored on import)."""
    from .format import kind_name, state_name, to_dict

    line: dict[str, Any] = {
        "edit_id": record.edit_id,
        "version": record.version,
        "state": state_name(record.state),
        "kind": kind_name(record.kind),
        "created_at": record.created_at,
        "actor": record.actor,
    }
    if record.namespace and record.namespace != "default":  # absent: the default namespace
        line["namespace"] = record.namespace
    if record.derived_from_descriptor:
        # the target server compiles the descriptor itself, under its own settings
        line.update(
            descriptor=record.descriptor,
            compile_descriptor=True,
            derived={"subject": record.subject, "prompt": record.prompt, "target_new": record.target_new},
        )
    elif record.kind == pb.EDIT_KIND_DESCRIPTOR:
        line.update(descriptor=record.descriptor, compile_descriptor=False)
    else:
        line.update(
            subject=record.subject,
            prompt=record.prompt,
            target_new=record.target_new,
            paraphrases=list(record.paraphrases),
        )
        if record.descriptor:
            line["descriptor"] = record.descriptor
        if record.report.layer_choice.startswith("auto:"):
            line["layer"] = "auto"  # chosen again on the target model
        elif record.report.layer_choice.endswith(NAMED_LAYER_SUFFIX) and len(record.hook_layers) == 1:
            line["layer"] = str(record.hook_layers[0])
    line["report"] = to_dict(record.report)
    return line

"""The envelope of each edit-manager operation: the bounds on request metadata checked before it starts,
and the metrics it is counted in when it ends (`editserve_edit_operations_total` and the per-namespace
counter), with the result the caller saw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from service.errors import EditServeError, InvalidArgument
from service.metrics import EDIT_OPERATIONS, count_namespace_operation
from service.namespaces import DEFAULT_NAMESPACE, validate_namespace

__all__ = ["METADATA_LIMITS", "Outcome", "check_metadata", "counted_operation", "namespace_label"]

# Longest accepted metadata, in characters: they are stored in every log entry and indexed (an
# idempotency key of ~2.7 KB passes PostgreSQL's b-tree row limit only to fail after the edit computed).
METADATA_LIMITS = {"idempotency_key": 256, "actor": 256, "edit_id": 128, "reason": 2000}


def check_metadata(**fields: str | None) -> None:
    for name, value in fields.items():
        limit = METADATA_LIMITS[name]
        if value and len(value) > limit:
            raise InvalidArgument(f"{len(value)} characters; at most {limit}", field=name)


class Outcome:
    """What a finished operation is counted as; the operation may change both while it runs."""

    result = "ok"
    namespace = DEFAULT_NAMESPACE  # the metrics label of the operation


def namespace_label(name: str, all_: str = DEFAULT_NAMESPACE) -> str:
    """The namespace an operation is counted under; a name that fails validation is counted as
    "invalid" (it never becomes a label value)."""
    if not name:
        return all_ or "all"
    try:
        return validate_namespace(name)
    except InvalidArgument:
        return "invalid"


@contextmanager
def counted_operation(op: str, namespace: str = DEFAULT_NAMESPACE) -> Iterator[Outcome]:
    """Count operation `op` once when the block ends: its outcome's result, the error's code, or
    "internal" for anything that is not an EditServeError."""
    outcome = Outcome()
    outcome.namespace = namespace
    try:
        yield outcome
    except EditServeError as exc:
        EDIT_OPERATIONS.labels(op=op, result=exc.code.lower()).inc()
        count_namespace_operation(outcome.namespace, op, exc.code.lower())
        raise
    except BaseException:
        EDIT_OPERATIONS.labels(op=op, result="internal").inc()
        count_namespace_operation(outcome.namespace, op, "internal")
        raise
    EDIT_OPERATIONS.labels(op=op, result=outcome.result).inc()
    count_namespace_operation(outcome.namespace, op, outcome.result)

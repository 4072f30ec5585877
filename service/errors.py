"""Domain errors. Every layer raises these; one interceptor in the transport maps them to
gRPC status codes (DESIGN.md's table), so no caller mistake ever surfaces as INTERNAL.

This module imports neither grpc nor torch: engine, router and edit log all use it.
"""

from __future__ import annotations


class EditServeError(Exception):
    """Base class; `code` names the gRPC status the transport answers with."""

    code = "INTERNAL"
    # Structured payloads the transport attaches to the status (gRPC: google.rpc.Status details), e.g.
    # the quality reports of edits the gate refused. Transport-neutral values, converted there.
    details: tuple[object, ...] = ()

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgument(EditServeError):
    code = "INVALID_ARGUMENT"


class NotFound(EditServeError):
    code = "NOT_FOUND"


class AlreadyExists(EditServeError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(EditServeError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(EditServeError):
    code = "UNAUTHENTICATED"


class PermissionDenied(EditServeError):
    code = "PERMISSION_DENIED"


class FailedPrecondition(EditServeError):
    code = "FAILED_PRECONDITION"


class Unavailable(EditServeError):
    code = "UNAVAILABLE"


class Cancelled(EditServeError):
    code = "CANCELLED"


class DeadlineExceeded(EditServeError):
    code = "DEADLINE_EXCEEDED"


class EditLogCorrupted(EditServeError):
    """The log cannot be read back exactly; the server refuses to start on a partial state."""

    code = "DATA_LOSS"


class ModelNotServable(EditServeError):
    """The model or device asked for cannot be served (an architecture the hook layers or the engine do
    not know, CUDA asked for and absent): the server refuses to start, with exit code 2."""

    code = "FAILED_PRECONDITION"

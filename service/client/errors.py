"""What a failed call raises: one exception class per gRPC status code, with the server's message and, for
a quality-gate refusal, the quality report of each requested edit (google.rpc.Status details)."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import status_pb2

from service._proto.editserve.v1 import editserve_pb2 as pb

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class ClientError(Exception):
    """A call that ended with a status other than OK (or could not reach the server)."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        address: str = "",
        reports: list[pb.QualityReport] | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.details = details
        self.address = address
        self.reports: list[pb.QualityReport] = list(reports or [])
        super().__init__(f"{self.code.name}: {details}")

    def one_line(self) -> str:
        """The message a terminal user needs, on one line, with what to do about it where that is known."""
        return " ".join(f"{self.code.name}: {self.details}".split())


class InvalidArgumentError(ClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(ClientError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExistsError(ClientError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhaustedError(ClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPreconditionError(ClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class QualityGateError(FailedPreconditionError):
    """The quality gate refused the edit (or an edit of the batch) and nothing was stored. `reports` holds
    one report per requested edit, in request order."""


class UnauthenticatedError(ClientError):
    code = grpc.StatusCode.UNAUTHENTICATED

    def one_line(self) -> str:
        return super().one_line() + " (set EDITSERVE_ADMIN_TOKEN or --token-file)"


class PermissionDeniedError(ClientError):
    code = grpc.StatusCode.PERMISSION_DENIED

    def one_line(self) -> str:
        return super().one_line() + " (check EDITSERVE_ADMIN_TOKEN or --token-file)"


class UnavailableError(ClientError):
    code = grpc.StatusCode.UNAVAILABLE

    def one_line(self) -> str:
        if "connect" in self.details.lower():  # nothing answered: say so before the channel's jargon
            where = f" at {self.address}" if self.address else ""
            return " ".join(
                f"cannot reach an editserve server{where} (is it running?): {self.details}".split()
            )
        return super().one_line()


class DeadlineExceededError(ClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(ClientError):
    code = grpc.StatusCode.CANCELLED


class InternalError(ClientError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        NotFoundError,
        AlreadyExistsError,
        ResourceExhaustedError,
        FailedPreconditionError,
        UnauthenticatedError,
        PermissionDeniedError,
        UnavailableError,
        DeadlineExceededError,
        CancelledError,
        InternalError,
    )
}


def quality_reports(trailing_metadata: Any) -> list[pb.QualityReport]:
    """The QualityReport messages packed in a status's google.rpc.Status details (none when absent)."""
    for key, value in trailing_metadata or ():
        if key != _STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        reports = []
        for detail in status.details:
            report = pb.QualityReport()
            if detail.Unpack(report):
                reports.append(report)
        return reports
    return []


def from_rpc_error(exc: grpc.RpcError, address: str = "") -> ClientError:
    """Turn grpc's exception (sync `grpc.RpcError` or `grpc.aio.AioRpcError`) into a ClientError."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    reports = quality_reports(exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None)
    cls = _BY_CODE.get(code, ClientError)
    if cls is FailedPreconditionError and reports:
        cls = QualityGateError
    return cls(details, code=code, address=address, reports=reports)


__all__ = [
    "AlreadyExistsError",
    "CancelledError",
    "ClientError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "QualityGateError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "from_rpc_error",
    "quality_reports",
]

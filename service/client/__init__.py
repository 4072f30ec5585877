"""Python client for an editserve server: `EditServeClient` (blocking) and `AsyncEditServeClient`
(asyncio). Typed methods for every RPC, the admin token, deadlines, retries on UNAVAILABLE and
read-your-writes (`min_version`). Imports neither torch nor the server: grpc and the stubs only.

The `editserve` command's client subcommands (generate, edit, edits, info) are registered by
`service.client.cli`; their handlers live in `cli_model` and `cli_edits`.
"""

from service._proto.editserve.v1 import editserve_pb2 as pb

from .aio import AsyncEditServeClient
from .client import NO_RETRY, EditServeClient, RetryPolicy
from .errors import (
    AlreadyExistsError,
    CancelledError,
    ClientError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    QualityGateError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .requests import Timeouts

__all__ = [
    "NO_RETRY",
    "AlreadyExistsError",
    "AsyncEditServeClient",
    "CancelledError",
    "ClientError",
    "DeadlineExceededError",
    "EditServeClient",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "QualityGateError",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Timeouts",
    "UnauthenticatedError",
    "UnavailableError",
    "pb",
]

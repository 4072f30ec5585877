"""Server interceptors, outermost first: metrics -> exception-to-status -> auth.

The exception interceptor is the ONE place that turns domain errors (`service.errors`) into gRPC
status codes; servicers and the data plane only ever raise. Auth raises domain errors too, so it
sits inside the exception interceptor; metrics sits outside both and sees the final code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import status_pb2
from grpc import aio
from grpc_interceptor.exception_to_status import AsyncExceptionToStatusInterceptor
from grpc_interceptor.server import AsyncServerInterceptor
from grpc_status import rpc_status

from service import metrics
from service.auth import Authorizer, Principal
from service.errors import EditServeError
from service.types import QualityReportView

from .convert import quality_report

log = logging.getLogger(__name__)

API_PREFIX = "/editserve.v1."
EDIT_SERVICE_PREFIX = "/editserve.v1.EditService/"


# Messages can quote what the caller sent (an unknown 20 KB edit id): past the size of gRPC's status
# metadata the call would end RESOURCE_EXHAUSTED instead of its own code, so messages are cut here.
MAX_STATUS_MESSAGE_CHARS = 1000


def bounded(message: str) -> str:
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    return message[: MAX_STATUS_MESSAGE_CHARS - 30] + f"… ({len(message)} characters)"


def status_details(payloads: tuple[object, ...]) -> list[any_pb2.Any]:
    """A domain error's payloads as google.rpc.Status details (one packed message each, in order)."""
    packed = []
    for payload in payloads:
        if isinstance(payload, QualityReportView):
            detail = any_pb2.Any()
            detail.Pack(quality_report(payload))
            packed.append(detail)
    return packed


class ErrorToStatusInterceptor(AsyncExceptionToStatusInterceptor):
    """EditServeError -> its `.code`; anything else -> INTERNAL with the traceback in the server log."""

    async def handle_exception(
        self, ex: Exception, request_or_iterator: Any, context: aio.ServicerContext, method_name: str
    ) -> NoReturn:
        if isinstance(ex, aio.AbortError):  # a servicer or inner interceptor already set the status
            raise ex
        if isinstance(ex, EditServeError):
            code = getattr(grpc.StatusCode, ex.code, grpc.StatusCode.INTERNAL)
            message = bounded(ex.message)
            details = status_details(ex.details)
            if details:
                status = status_pb2.Status(code=code.value[0], message=message, details=details)
                await context.abort_with_status(rpc_status.to_status(status))
            await context.abort(code, message)
        # A bug, not a caller mistake: the details stay in our log, the caller gets no internals.
        log.exception("unhandled error in %s", method_name)
        await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method_name} (see server log)")


# The caller of the call being served (None: no token), for the servicers' namespace checks.
CURRENT_PRINCIPAL: ContextVar[Principal | None] = ContextVar("editserve_principal", default=None)


class AuthInterceptor(AsyncServerInterceptor):
    """With credentials configured (admin token, token file), every EditService call needs
    `authorization: Bearer <token>`; any API call's token is resolved to the principal the servicers check
    namespaces against (service/auth.py)."""

    def __init__(self, authorizer: Authorizer) -> None:
        self._authz = authorizer

    async def intercept(
        self, method: Callable, request_or_iterator: Any, context: aio.ServicerContext, method_name: str
    ) -> Any:
        principal = None
        if method_name.startswith(EDIT_SERVICE_PREFIX):
            principal = self._authz.principal(_authorization(context))
            self._authz.require_editor(principal)
        elif method_name.startswith(API_PREFIX):
            principal = self._authz.reader(_authorization(context))
        token = CURRENT_PRINCIPAL.set(principal)
        try:
            response = method(request_or_iterator, context)
            return response if hasattr(response, "__aiter__") else await response
        finally:
            CURRENT_PRINCIPAL.reset(token)


def _authorization(context: aio.ServicerContext) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode(errors="replace")
    return ""


class MetricsInterceptor(AsyncServerInterceptor):
    """`editserve_requests_total{rpc,code}` and `editserve_request_duration_seconds{rpc}` per API call,
    streams measured until their last message. Health and reflection calls are not counted (probes
    would drown the real traffic)."""

    async def intercept(
        self, method: Callable, request_or_iterator: Any, context: aio.ServicerContext, method_name: str
    ) -> Any:
        if not method_name.startswith(API_PREFIX):
            response = method(request_or_iterator, context)
            return response if hasattr(response, "__aiter__") else await response
        rpc = method_name.removeprefix("/editserve.v1.")
        start = time.perf_counter()
        try:
            response = method(request_or_iterator, context)
            if hasattr(response, "__aiter__"):
                return self._measure_stream(response, rpc, start, context)
            result = await response
        except BaseException as exc:
            _observe(rpc, _code_of(exc, context), start)
            raise
        _observe(rpc, _code_of(None, context), start)
        return result

    async def _measure_stream(
        self, stream: AsyncIterator[Any], rpc: str, start: float, context: aio.ServicerContext
    ) -> AsyncIterator[Any]:
        error: BaseException | None = None
        try:
            async for item in stream:
                yield item
        except BaseException as exc:
            error = exc
            raise
        finally:
            _observe(rpc, _code_of(error, context), start)


def _observe(rpc: str, code: str, start: float) -> None:
    metrics.REQUESTS.labels(rpc=rpc, code=code).inc()
    metrics.REQUEST_DURATION.labels(rpc=rpc).observe(time.perf_counter() - start)


def _code_of(exc: BaseException | None, context: aio.ServicerContext) -> str:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code.name if isinstance(code, grpc.StatusCode) else str(code)
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    if isinstance(exc, EditServeError):
        return exc.code
    return "UNKNOWN"

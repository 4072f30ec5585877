"""gRPC servicers: convert, call the data plane, convert back. No logic of their own.

Errors are raised, never turned into statuses here (interceptors.ErrorToStatusInterceptor does that).
"""

from __future__ import annotations

import time
from contextlib import aclosing

from grpc import aio

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.auth import Authorizer
from service.errors import NotFound, Unavailable
from service.namespaces import DEFAULT_NAMESPACE, validate_namespace, validate_namespaces
from service.types import DataPlaneProtocol

from . import convert
from .interceptors import CURRENT_PRINCIPAL


class PlaneSlot:
    """Holds the data plane once it is loaded; until then every API call is UNAVAILABLE."""

    def __init__(self) -> None:
        self.plane: DataPlaneProtocol | None = None

    def get(self) -> DataPlaneProtocol:
        plane = self.plane
        if plane is None:
            raise Unavailable("model loading")
        if not plane.ready:
            raise Unavailable("shutting down")
        return plane


def grpc_deadline(context: aio.ServicerContext) -> float | None:
    """The call's gRPC deadline on the time.monotonic() clock, or None when the caller set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class GenerateServicer(pb_grpc.GenerateServiceServicer):
    def __init__(self, slot: PlaneSlot, authz: Authorizer | None = None) -> None:
        self._slot = slot
        self._authz = authz

    def _check_read(self, namespaces: object) -> None:
        if self._authz is not None:
            self._authz.check_read(CURRENT_PRINCIPAL.get(), validate_namespaces(namespaces))  # type: ignore[arg-type]

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> pb.GenerateResponse:
        plane = self._slot.get()
        self._check_read(request.namespaces)
        result = await plane.generate(convert.generate_input(request, grpc_deadline(context)))
        return convert.generate_response(result)

    async def GenerateStream(self, request: pb.GenerateRequest, context: aio.ServicerContext) -> None:
        plane = self._slot.get()
        self._check_read(request.namespaces)
        chunks = plane.generate_stream(convert.generate_input(request, grpc_deadline(context)))
        # The write API (not `yield`) keeps this a plain coroutine: when the client cancels or the
        # deadline passes, gRPC cancels this task and `aclosing` closes the data plane's generator
        # right here, so the engine frees the sequence's slot at once rather than at garbage collection.
        async with aclosing(chunks):
            async for chunk in chunks:
                await context.write(convert.stream_response(chunk))

    async def Score(self, request: pb.ScoreRequest, context: aio.ServicerContext) -> pb.ScoreResponse:
        plane = self._slot.get()
        self._check_read(request.namespaces)
        result = await plane.score(convert.score_input(request, grpc_deadline(context)))
        return convert.score_response(result)


class EditServicer(pb_grpc.EditServiceServicer):
    """Namespace credentials are checked here, before the data plane is called (service/auth.py)."""

    def __init__(self, slot: PlaneSlot, authz: Authorizer | None = None) -> None:
        self._slot = slot
        self._authz = authz

    async def Edit(self, request: pb.EditRequest, context: aio.ServicerContext) -> pb.EditResponse:
        plane = self._slot.get()
        if self._authz is not None:
            self._authz.check_edit(CURRENT_PRINCIPAL.get(), [validate_namespace(request.namespace)])
        result = await plane.edit(convert.edit_input(request, grpc_deadline(context)))
        return convert.edit_response(result)

    async def BatchEdit(
        self, request: pb.BatchEditRequest, context: aio.ServicerContext
    ) -> pb.BatchEditResponse:
        plane = self._slot.get()
        if self._authz is not None:
            batch_ns = validate_namespace(request.namespace)
            spaces = [validate_namespace(e.namespace, f"edits[{n}].namespace") if e.namespace else batch_ns
                      for n, e in enumerate(request.edits)]
            self._authz.check_edit(CURRENT_PRINCIPAL.get(), spaces or [batch_ns])
        result = await plane.batch_edit(convert.batch_edit_input(request, grpc_deadline(context)))
        return convert.batch_edit_response(result)

    async def GetEdit(self, request: pb.GetEditRequest, context: aio.ServicerContext) -> pb.GetEditResponse:
        view = await self._slot.get().get_edit(request.edit_id)
        if view is None:  # the protocol says NotFound is raised; guard against a None anyway
            raise NotFound(f"no edit {request.edit_id!r}", field="edit_id")
        if self._authz is not None:
            self._authz.check_inspect(CURRENT_PRINCIPAL.get(), getattr(view, "namespace", DEFAULT_NAMESPACE))
        return pb.GetEditResponse(edit=convert.edit_record(view))

    async def ListEdits(
        self, request: pb.ListEditsRequest, context: aio.ServicerContext
    ) -> pb.ListEditsResponse:
        plane = self._slot.get()
        if self._authz is not None:
            if request.namespace:
                self._authz.check_inspect(CURRENT_PRINCIPAL.get(), validate_namespace(request.namespace))
            else:
                self._authz.check_all_namespaces(CURRENT_PRINCIPAL.get(), "ListEdits")
        views, next_token = await plane.list_edits(convert.list_edits_input(request))
        return convert.list_edits_response(views, next_token)

    async def Rollback(
        self, request: pb.RollbackRequest, context: aio.ServicerContext
    ) -> pb.RollbackResponse:
        plane = self._slot.get()
        if self._authz is not None and self._authz.enabled:
            principal = CURRENT_PRINCIPAL.get()
            if principal is None or not principal.admin:
                view = await plane.get_edit(request.edit_id)
                self._authz.check_edit(principal, [getattr(view, "namespace", DEFAULT_NAMESPACE)])
        result = await plane.rollback(convert.rollback_input(request))
        return convert.rollback_response(result)

    async def RollbackTo(
        self, request: pb.RollbackToRequest, context: aio.ServicerContext
    ) -> pb.RollbackToResponse:
        plane = self._slot.get()
        if self._authz is not None:
            if request.namespace:
                self._authz.check_edit(CURRENT_PRINCIPAL.get(), [validate_namespace(request.namespace)])
            else:
                self._authz.check_all_namespaces(CURRENT_PRINCIPAL.get(), "RollbackTo")
        result = await plane.rollback_to(convert.rollback_to_input(request))
        return convert.rollback_to_response(result)


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, slot: PlaneSlot) -> None:
        self._slot = slot

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return convert.server_info_response(await self._slot.get().server_info())


class LocateServicer(pb_grpc.LocateServiceServicer):
    """Causal tracing; open to the callers of Generate (the auth interceptor resolves their token, and the
    trace reads no namespace: it runs on the base model)."""

    def __init__(self, slot: PlaneSlot) -> None:
        self._slot = slot

    async def Trace(self, request: pb.TraceRequest, context: aio.ServicerContext) -> pb.TraceResponse:
        plane = self._slot.get()
        result = await plane.trace(convert.trace_input(request, grpc_deadline(context)))
        return convert.trace_response(result)

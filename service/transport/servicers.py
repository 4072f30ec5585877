"""gRPC servicers: convert, call the data plane, convert back. No logic of their own.

Errors are raised, never turned into statuses here (interceptors.ErrorToStatusInterceptor does that).
"""

from __future__ import annotations

import time
from contextlib import aclosing

from grpc import aio

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.errors import NotFound, Unavailable
from service.types import DataPlaneProtocol

from . import convert


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
    def __init__(self, slot: PlaneSlot) -> None:
        self._slot = slot

    async def Generate(
        self, request: pb.GenerateRequest, context: aio.ServicerContext
    ) -> pb.GenerateResponse:
        plane = self._slot.get()
        result = await plane.generate(convert.generate_input(request, grpc_deadline(context)))
        return convert.generate_response(result)

    async def GenerateStream(self, request: pb.GenerateRequest, context: aio.ServicerContext) -> None:
        plane = self._slot.get()
        chunks = plane.generate_stream(convert.generate_input(request, grpc_deadline(context)))
        # The write API (not `yield`) keeps this a plain coroutine: when the client cancels or the
        # deadline passes, gRPC cancels this task and `aclosing` closes the data plane's generator
        # right here, so the engine frees the sequence's slot at once rather than at garbage collection.
        async with aclosing(chunks):
            async for chunk in chunks:
                await context.write(convert.stream_response(chunk))

    async def Score(self, request: pb.ScoreRequest, context: aio.ServicerContext) -> pb.ScoreResponse:
        plane = self._slot.get()
        result = await plane.score(convert.score_input(request, grpc_deadline(context)))
        return convert.score_response(result)


class EditServicer(pb_grpc.EditServiceServicer):
    def __init__(self, slot: PlaneSlot) -> None:
        self._slot = slot

    async def Edit(self, request: pb.EditRequest, context: aio.ServicerContext) -> pb.EditResponse:
        result = await self._slot.get().edit(convert.edit_input(request, grpc_deadline(context)))
        return convert.edit_response(result)

    async def BatchEdit(
        self, request: pb.BatchEditRequest, context: aio.ServicerContext
    ) -> pb.BatchEditResponse:
        result = await self._slot.get().batch_edit(convert.batch_edit_input(request, grpc_deadline(context)))
        return convert.batch_edit_response(result)

    async def GetEdit(self, request: pb.GetEditRequest, context: aio.ServicerContext) -> pb.GetEditResponse:
        view = await self._slot.get().get_edit(request.edit_id)
        if view is None:  # the protocol says NotFound is raised; guard against a None anyway
            raise NotFound(f"no edit {request.edit_id!r}", field="edit_id")
        return pb.GetEditResponse(edit=convert.edit_record(view))

    async def ListEdits(
        self, request: pb.ListEditsRequest, context: aio.ServicerContext
    ) -> pb.ListEditsResponse:
        views, next_token = await self._slot.get().list_edits(convert.list_edits_input(request))
        return convert.list_edits_response(views, next_token)

    async def Rollback(
        self, request: pb.RollbackRequest, context: aio.ServicerContext
    ) -> pb.RollbackResponse:
        result = await self._slot.get().rollback(convert.rollback_input(request))
        return convert.rollback_response(result)

    async def RollbackTo(
        self, request: pb.RollbackToRequest, context: aio.ServicerContext
    ) -> pb.RollbackToResponse:
        result = await self._slot.get().rollback_to(convert.rollback_to_input(request))
        return convert.rollback_to_response(result)


class InfoServicer(pb_grpc.InfoServiceServicer):
    def __init__(self, slot: PlaneSlot) -> None:
        self._slot = slot

    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return convert.server_info_response(await self._slot.get().server_info())

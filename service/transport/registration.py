"""Registration of the API services: the generated `add_*_to_server` functions, except that a request
arrives as bytes and is parsed inside the call, after the interceptors (auth first). A body that is not
a valid message (corrupt bytes, a string field holding invalid UTF-8) then ends INVALID_ARGUMENT through
the one exception interceptor, instead of grpc's UNKNOWN with a deserializer traceback in the log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from service._proto.editserve.v1 import editserve_pb2 as pb
from service.errors import InvalidArgument

Behaviour = Callable[[Any, aio.ServicerContext], Awaitable[Any]]


def _parsing(method: Behaviour, request_class: Any) -> Behaviour:
    async def call(raw: bytes, context: aio.ServicerContext) -> Any:
        try:
            request = request_class.FromString(raw)
        except DecodeError as exc:
            raise InvalidArgument(
                f"the request body is not a valid {request_class.DESCRIPTOR.full_name}: {exc}"
            ) from None
        return await method(request, context)

    return call


def add_api_service(server: aio.Server, service_name: str, servicer: object) -> None:
    """Register `servicer` for `editserve.v1.<service_name>` (each method parses its own request)."""
    service = pb.DESCRIPTOR.services_by_name[service_name]
    handlers = {}
    for method in service.methods:
        request_class = getattr(pb, method.input_type.name)
        response_class = getattr(pb, method.output_type.name)
        behaviour = _parsing(getattr(servicer, method.name), request_class)
        make = (grpc.unary_stream_rpc_method_handler if method.server_streaming
                else grpc.unary_unary_rpc_method_handler)
        handlers[method.name] = make(behaviour, request_deserializer=None,
                                     response_serializer=response_class.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)

"""gRPC transport: servicers, interceptors (errors -> status codes, auth, metrics), health, reflection.

Imports no torch: it talks to the model only through `service.types.DataPlaneProtocol`.
"""

from .server import (
    API_SERVICES,
    REFLECTED_SERVICES,
    EditServeServer,
    PlaneFactory,
    ServablePlane,
    ServerOptions,
    serve,
)

__all__ = [
    "API_SERVICES", "REFLECTED_SERVICES", "EditServeServer", "PlaneFactory", "ServablePlane", "ServerOptions",
    "serve",
]

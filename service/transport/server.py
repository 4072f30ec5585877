"""The grpc.aio server: API services, health, reflection, Prometheus endpoint, and its lifecycle.

Lifecycle: bind and answer at once (health NOT_SERVING, API calls UNAVAILABLE "model loading") ->
load the data plane in a thread (~30 s: model, encoder, edit-log replay) -> health SERVING. A failed
load stops the process (never a partial state). SIGTERM/SIGINT: health NOT_SERVING, refuse new
calls, drain in-flight ones within the grace period, shut the data plane down, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from service._proto.editserve.v1 import editserve_pb2 as pb
from service.auth import Authorizer
from service.errors import EditLogCorrupted, EditServeError, ModelNotServable
from service.types import DataPlaneProtocol

from .interceptors import AuthInterceptor, ErrorToStatusInterceptor, MetricsInterceptor
from .registration import add_api_service
from .servicers import EditServicer, GenerateServicer, InfoServicer, LocateServicer, PlaneSlot

log = logging.getLogger(__name__)

API_SERVICES: tuple[str, ...] = tuple(
    pb.DESCRIPTOR.services_by_name[name].full_name
    for name in ("GenerateService", "EditService", "InfoService", "LocateService")
)
REFLECTED_SERVICES: tuple[str, ...] = (*API_SERVICES, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
_HEALTH_NAMES = ("", *API_SERVICES)  # "" is the whole server, as grpc-health-probe asks by default

EXIT_OK = 0
EXIT_LOAD_FAILED = 1
EXIT_NOT_SERVABLE = 2  # the model or device cannot be served (ModelNotServable): fix the command line
DEEP_CHECK_EVERY = 10  # health polls per tiny forward
DEEP_CHECK_TIMEOUT_S = 10.0


class ServablePlane(DataPlaneProtocol, Protocol):
    """A data plane the server can start once it is built (service.dataplane.DataPlane is one)."""

    async def start(self) -> None: ...


PlaneFactory = Callable[[], ServablePlane]
_T = TypeVar("_T")


@dataclass(frozen=True)
class ServerOptions:
    """What the server needs of the settings; service.compose.server_options fills it from `Settings`."""

    host: str
    port: int  # 0 picks a free one
    metrics_port: int  # 0 disables the Prometheus endpoint
    http_port: int  # 0 disables the OpenAI-compatible front end
    grace_period_s: float  # how long a stop drains in-flight calls
    health_poll_s: float  # seconds between readiness checks; 0 = none
    edit_log: str = "the edit log"  # where the log lives, named when a corrupted one stops the start


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


class EditServeServer:
    """One server instance; `serve()` drives it from a process, tests drive it directly."""

    def __init__(self, options: ServerOptions, authz: Authorizer, plane_factory: PlaneFactory) -> None:
        self.options = options
        self._plane_factory = plane_factory
        self._slot = PlaneSlot()
        self._health = health_aio.HealthServicer()
        self._server: aio.Server | None = None
        self._metrics_http: Any = None
        self._stopped = asyncio.Event()
        self._stopping = False
        self._watcher: asyncio.Task[None] | None = None
        self.port = 0  # the bound gRPC port (options.port, or the one picked for port 0)
        self.metrics_port = 0  # the bound metrics port; 0 = disabled
        self.http_port = 0  # the bound OpenAI-compatible HTTP port; 0 = disabled
        self._http: Any = None
        # Credentials of both front ends, shared by them (and reloaded on SIGHUP by `serve`).
        self.authz = authz

    @property
    def address(self) -> str:
        return format_address(self.options.host, self.port)

    @property
    def plane(self) -> DataPlaneProtocol | None:
        return self._slot.plane

    async def start(self) -> None:
        """Bind both ports and start answering; health stays NOT_SERVING until `load_plane`."""
        interceptors: list[aio.ServerInterceptor] = [MetricsInterceptor(), ErrorToStatusInterceptor()]
        if self.authz.enabled:
            interceptors.append(AuthInterceptor(self.authz))
        # so_reuseport off: a second server on a taken port must fail, not silently share it.
        server = aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
        authz = self.authz if self.authz.enabled else None
        add_api_service(server, "GenerateService", GenerateServicer(self._slot, authz))
        add_api_service(server, "EditService", EditServicer(self._slot, authz))
        add_api_service(server, "InfoService", InfoServicer(self._slot))
        add_api_service(server, "LocateService", LocateServicer(self._slot))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(REFLECTED_SERVICES, server)
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            self.port = server.add_insecure_port(format_address(self.options.host, self.options.port))
        except RuntimeError as exc:
            raise OSError(f"cannot bind gRPC to {self.address}: {exc}") from exc
        if self.options.metrics_port:
            self._start_metrics_http()
        await server.start()
        self._server = server
        log.info("gRPC listening on %s (health NOT_SERVING while loading)", self.address)
        if self.options.http_port:
            await self._start_openai_http()

    async def _start_openai_http(self) -> None:
        """The OpenAI-compatible front end: same process, same event loop, same data plane (the slot)."""
        from .http import HttpFrontEnd, OpenAIFrontEnd

        authz = self.authz if self.authz.enabled else None

        def authorize(request: Any, namespaces: frozenset[str]) -> None:
            if authz is not None:
                authz.check_read(authz.reader(request.headers.get("authorization")), namespaces)

        front = OpenAIFrontEnd(self._slot, authorize)
        http = HttpFrontEnd(front.app(), self.options.host, self.options.http_port,
                            self.options.grace_period_s)
        await http.start()
        self._http, self.http_port = http, http.port

    def _start_metrics_http(self) -> None:
        from prometheus_client import start_http_server

        try:
            httpd, _thread = start_http_server(self.options.metrics_port, addr=self.options.host)
        except OSError as exc:
            where = format_address(self.options.host, self.options.metrics_port)
            raise OSError(f"cannot serve metrics on {where}: {exc}") from exc
        self._metrics_http = httpd
        self.metrics_port = httpd.server_address[1]
        log.info("Prometheus metrics on http://%s/metrics",
                 format_address(self.options.host, self.metrics_port))

    async def load_plane(self) -> None:
        """Build the data plane off the event loop, start it, then flip health to SERVING."""
        started = time.monotonic()
        plane = await _in_daemon_thread(self._plane_factory)
        try:
            await plane.start()
        except BaseException:
            with contextlib.suppress(Exception):  # release what the half-started plane holds
                await plane.shutdown(0.0)
            raise
        if self._stopping:  # a signal arrived while loading: do not advertise a server going away
            await plane.shutdown(0.0)
            return
        self._slot.plane = plane
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("ready after %.1f s: health SERVING on %s", time.monotonic() - started, self.address)
        if self.options.health_poll_s > 0:
            self._watcher = asyncio.create_task(self._watch_health(plane), name="editserve-health")

    async def _watch_health(self, plane: ServablePlane) -> None:
        """Readiness tells the truth: NOT_SERVING while the data plane cannot serve (the engine's worker
        died, forwards keep failing, a tiny forward misses its deadline), SERVING again when it can."""
        serving, polls = True, 0
        while not self._stopping:
            await asyncio.sleep(self.options.health_poll_s)
            ok = plane.healthy()
            if ok and polls % DEEP_CHECK_EVERY == 0:
                ok = await plane.deep_check(DEEP_CHECK_TIMEOUT_S)
            polls += 1
            if ok != serving and not self._stopping:
                serving = ok
                statuses = health_pb2.HealthCheckResponse
                status = statuses.SERVING if ok else statuses.NOT_SERVING
                log.log(logging.INFO if ok else logging.ERROR, "health %s: the data plane %s",
                        "SERVING" if ok else "NOT_SERVING", "serves again" if ok else "cannot serve")
                await self._set_health(status)

    async def stop(self, grace_s: float | None = None) -> None:
        """Graceful stop: NOT_SERVING, refuse new calls, drain within the grace, then the data plane."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
        grace = self.options.grace_period_s if grace_s is None else grace_s
        deadline = time.monotonic() + grace
        try:
            await self._health.enter_graceful_shutdown()
            if self._server is not None or self._http is not None:
                log.info("draining in-flight calls (grace %.1f s)", grace)
            # Both front ends drain together, within the one grace period.
            drains = [] if self._server is None else [self._server.stop(grace)]
            if self._http is not None:
                drains.append(self._http.stop())
            await asyncio.gather(*drains)
            plane = self._slot.plane
            if plane is not None:
                await plane.shutdown(max(0.0, deadline - time.monotonic()))
        finally:
            if self._metrics_http is not None:
                self._metrics_http.shutdown()
                self._metrics_http.server_close()
            self._stopped.set()
        log.info("stopped")

    async def _set_health(self, status: int) -> None:
        for name in _HEALTH_NAMES:
            await self._health.set(name, status)


async def _in_daemon_thread(fn: Callable[[], _T]) -> _T:
    """Run a blocking call in a daemon thread: unlike the default executor, a process asked to stop
    mid-load does not wait ~30 s for the model to finish loading before it can exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody is waiting
                loop.call_soon_threadsafe(deliver, future.set_exception, exc)
        else:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, future.set_result, result)

    threading.Thread(target=target, name="editserve-load", daemon=True).start()
    return await future


async def serve(server: EditServeServer, stop: asyncio.Event | None = None) -> int:
    """Run a built (not yet started) server until SIGTERM/SIGINT (or `stop` is set); returns the process
    exit code. service.compose.serve builds it from `Settings`."""
    stop = stop or asyncio.Event()
    try:
        await server.start()
    except OSError as exc:
        log.error("%s", exc)
        await server.stop(0.0)
        return EXIT_LOAD_FAILED
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread / platform
            loop.add_signal_handler(sig, _on_signal, sig, stop)
    with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, server.authz.reload)  # rotate tokens without a restart
    try:
        return await _run(server, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGHUP", signal.SIGTERM)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


async def _run(server: EditServeServer, stop: asyncio.Event) -> int:
    loading = asyncio.create_task(server.load_plane(), name="editserve-load")
    stop_requested = asyncio.create_task(stop.wait(), name="editserve-stop")
    await asyncio.wait({loading, stop_requested}, return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        failure = loading.exception()
        _log_load_failure(failure, server.options.edit_log)
        stop_requested.cancel()
        await server.stop(0.0)
        return EXIT_NOT_SERVABLE if isinstance(failure, ModelNotServable) else EXIT_LOAD_FAILED
    await stop_requested
    if not loading.done():
        log.info("stop requested while loading; exiting without serving")
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await loading
    await server.stop()
    return EXIT_OK


def _on_signal(sig: signal.Signals, stop: asyncio.Event) -> None:
    log.info("received %s: shutting down gracefully", sig.name)
    stop.set()


def _log_load_failure(exc: BaseException | None, edit_log: str) -> None:
    if isinstance(exc, EditLogCorrupted):
        log.error("edit log (%s) is corrupted or unreadable: %s. Refusing to serve a partial state; "
                  "restore the log from a backup or point --data-dir / --edit-log-url elsewhere.",
                  edit_log, exc)
    elif isinstance(exc, ModelNotServable):
        log.error("cannot serve this model: %s", exc)
    elif isinstance(exc, EditServeError):
        log.error("cannot start: %s", exc)
    else:
        log.error("cannot start: loading the model and edit log failed", exc_info=exc)


__all__ = [
    "API_SERVICES",
    "EXIT_LOAD_FAILED",
    "EXIT_NOT_SERVABLE",
    "EXIT_OK",
    "EditServeServer",
    "PlaneFactory",
    "REFLECTED_SERVICES",
    "ServablePlane",
    "ServerOptions",
    "serve",
]

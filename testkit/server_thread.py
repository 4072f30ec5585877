"""A real EditServeServer on its own event loop in a background thread, so blocking code (the client CLI,
the blocking Python client) can call it from a plain test function."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from service.compose import build_server
from service.config import Settings
from service.transport import EditServeServer


class ServerThread:
    """`with ServerThread(settings, factory) as server:` -> server.address, server.metrics_port."""

    def __init__(self, settings: Settings, plane_factory: Callable[[], Any], *, load: bool = True) -> None:
        self.settings = settings
        self._factory = plane_factory
        self._load = load
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self.server: EditServeServer | None = None

    def _run(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def start(self, timeout: float = 600.0) -> EditServeServer:
        self._thread.start()
        self.server = build_server(self.settings, self._factory)
        self._run(self.server.start(), timeout)
        if self._load:
            self._run(self.server.load_plane(), timeout)
        return self.server

    def load(self, timeout: float = 600.0) -> None:
        assert self.server is not None
        self._run(self.server.load_plane(), timeout)

    def stop(self, grace_s: float = 5.0) -> None:
        if self.server is not None:
            self._run(self.server.stop(grace_s), grace_s + 60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def __enter__(self) -> EditServeServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

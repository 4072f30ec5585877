"""Start the real editserve gRPC server inside this process, for `editserve eval` without --server.

The harness then drives it through the same gRPC client as a remote server. Its edit log lives under
--out (server-data/), so an interrupted evaluation resumes against the same applied edits: a restarted
server replays its log and serves exactly what it served before.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from service.config import Settings


@dataclass
class RunningServer:
    address: str
    admin_token: str
    settings: Settings


@asynccontextmanager
async def in_process_server(
    data_dir: Path, *, loaded: Any = None, base: Settings | None = None
) -> AsyncIterator[RunningServer]:
    """A loaded, SERVING server on 127.0.0.1 and a free port; `loaded` shares an already loaded model."""
    from service.compose import build_server, load_data_plane

    token = secrets.token_hex(16)  # edits are privileged even here: the harness sends it like any backend
    settings = replace(
        base or Settings(),
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        data_dir=Path(data_dir),
        admin_token=token,
        insecure_edits=False,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    server = build_server(settings, lambda: load_data_plane(settings, loaded=loaded))
    await server.start()
    try:
        await server.load_plane()
        yield RunningServer(server.address, token, settings)
    finally:
        await server.stop(5.0)

"""What the engine needs from the hook layers, as protocols. The engine runs its forwards with whatever
gate it is given and imports nothing from the hooks package; service/hooks/layer.py's `HookManager` (and
its `Recorder`) is the one the service passes in.

Per forward the engine pins one table snapshot (`table_override(current)`), so a publish mid-forward
cannot mix two versions across layers, and records what fired (`recording`), with per-row position
offsets, the previous token's activations for previous-token conditions, and, off the CPU, the gate's
decisions left on the device until the sampled ids are copied back (`defer`, `pending`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch

__all__ = ["GateFire", "GateRecorder", "GateTable", "HookGate"]


class GateFire(Protocol):
    row: int
    position: int
    edit_id: str
    score: float


class GateRecorder(Protocol):
    position_offset: int | Sequence[int]
    prev_keys: dict[int, torch.Tensor] | None
    last_keys: dict[int, torch.Tensor]
    key_columns: Sequence[int] | None
    column_keys: dict[int, torch.Tensor]
    defer: bool
    fires: list[Any]  # GateFire
    pending: list[Any]
    row_tables: list[tuple[Any, torch.Tensor]] | None  # (table, [rows] bool) when rows' tables differ
    row_scopes: Sequence[frozenset[str] | None] | None  # per row, the edit namespaces it may fire

    def packed_pending(self) -> torch.Tensor: ...

    def take_pending(self, host: Any) -> None: ...

    def resolve(self) -> None: ...


class GateTable(Protocol):
    version: int


class HookGate(Protocol):
    @property
    def current(self) -> GateTable: ...

    def table_override(self, table: Any) -> AbstractContextManager[Any]: ...

    def recording(self, row_enabled: torch.Tensor | None = None) -> AbstractContextManager[GateRecorder]: ...

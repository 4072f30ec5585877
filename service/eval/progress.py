"""Resumable progress: one append-only JSON Lines file per (T, phase) under --out/progress.

Every finished unit of work (an edit applied, a record evaluated, a round rolled back) is one line,
flushed and fsynced before the next unit starts, so an interrupted run loses at most the unit in flight.
Lines carry the round and its attempt; a round that cannot be resumed consistently (the server lost its
edits) is restarted as a new attempt and the old attempt's lines are ignored. When the same unit appears
twice (a unit redone after an interrupt), the last line wins.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class Progress:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)

    def lines(self) -> Iterator[dict[str, Any]]:
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as f:
            for raw in f:
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    yield json.loads(raw)
                except json.JSONDecodeError:
                    return  # a line torn by a kill mid-write: everything before it is intact

    def append(self, entry: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(entry, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())


@dataclass
class RoundState:
    """What the progress file says about one round (its latest attempt)."""

    attempt: int = 0
    started: bool = False
    base_version: int = 0
    done: bool = False
    edits: dict[int, dict[str, Any]] = field(default_factory=dict)  # record index -> edit outcome
    evals: dict[str, dict[int, dict[str, Any]]] = field(default_factory=dict)  # method -> index -> eval
    seconds: dict[str, float] = field(default_factory=dict)  # "edit", "eval:<method>", "rollback"


def read_rounds(progress: Progress) -> dict[int, RoundState]:
    rounds: dict[int, RoundState] = {}
    for line in progress.lines():
        r = int(line.get("round", -1))
        kind = line.get("type")
        st = rounds.setdefault(r, RoundState())
        attempt = int(line.get("attempt", 0))
        if kind == "round":
            if attempt >= st.attempt:  # a new attempt forgets the old one
                rounds[r] = st = RoundState(
                    attempt=attempt, started=True, base_version=int(line.get("base_version", 0))
                )
            continue
        if attempt != st.attempt:
            continue
        if kind == "edit":
            st.edits[int(line["index"])] = line["outcome"]
        elif kind == "eval":
            st.evals.setdefault(line["method"], {})[int(line["result"]["index"])] = line["result"]
        elif kind == "timing":
            key = line["phase"]
            st.seconds[key] = st.seconds.get(key, 0.0) + float(line["seconds"])
        elif kind == "round_done":
            st.done = True
    rounds.pop(-1, None)
    for st in rounds.values():  # after "last line wins": an edit redone after an interrupt counts once
        st.seconds["edit"] = sum(float(o.get("seconds", 0.0)) for o in st.edits.values())
    return rounds

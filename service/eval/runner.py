"""The protocols, with resumable progress.

Sequential (WISE): apply T edits one after another without reset, then evaluate all T; then roll back
(RollbackTo the version before the round; ROME: restore the original weight) and start the next T
records. Single = sequential with T = 1: edit, evaluate, roll back, next.

Every method sees the same records in the same order. The server methods share one set of applied
edits per round: "hook", "retrieval" and "both" differ only by their requests' edit_paths, "unedited"
by use_edits=false (computed once per record: no edit changes it). Edits are sent with force=True:
the protocol needs every edit applied, and the quality gate's verdict is recorded per edit
(`gate_passed`, the report) instead of leaving the edit out.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm import tqdm

from service.eval.client import SERVER_METHODS, EditOutcome, EditServeClient, ServerScorer
from service.eval.datasets import EvalRecord, Format, LoadedData, load_records
from service.eval.evaluate import RecordEval, Scorer, evaluate_records
from service.eval.progress import Progress, RoundState, read_rounds

log = logging.getLogger(__name__)

METHODS = ("unedited", "hook", "retrieval", "both", "rome")
EDIT_METHODS = ("hook", "retrieval", "both")  # need the edits applied on the server
ROME_SNAPSHOT_EVERY_S = 60.0


@dataclass
class EvalConfig:
    data: Path
    fmt: Format
    out: Path
    n: int | None = None
    sequential: list[int] = field(default_factory=lambda: [1])
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    server: str | None = None
    admin_token: str = ""
    seed: int = 0
    sample: bool = False  # a seeded random sample of n records instead of the first n
    concurrency: int = 16
    chunk: int = 32  # records evaluated per step (one progress line each)
    generate: bool = True  # the greedy-generation companions of every metric
    model: str = "embedded"  # in-process server and ROME's private copy
    device: str = "cpu"
    dtype: str = "float32"  # the in-process server's and ROME's weights
    rome_layer: int | None = None
    rome_cov_tokens: int = 40_000
    rome_cache: Path | None = None  # where ROME's covariance is cached (default: --out/rome)
    command: list[str] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What must match for --out to be resumed (methods and T may be added later)."""
        identity: dict[str, Any] = {
            "data": str(self.data.resolve()),
            "data_sha256": _sha256(self.data),
            "format": self.fmt,
            "n": self.n,
            "seed": self.seed,
            "sample": self.sample,
            "generate": self.generate,
            "model": self.model if self.server is None else f"server:{self.server}",
        }
        if self.server is None and (env := server_env()):  # absent when empty: older --out dirs resume
            identity["server_env"] = env
        if self.dtype != "float32":  # absent for the default: older --out dirs resume
            identity["dtype"] = self.dtype
        return identity


def server_env() -> dict[str, str]:
    """The EDITSERVE_<NAME> settings the in-process server reads (secrets left out)."""
    secret = ("EDITSERVE_ADMIN_TOKEN",)
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("EDITSERVE_") and k not in secret}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rounds_of(records: Sequence[EvalRecord], t: int) -> list[list[EvalRecord]]:
    return [list(records[i : i + t]) for i in range(0, len(records), t)]


def _chunks(items: Sequence[EvalRecord], size: int) -> list[list[EvalRecord]]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


class Runner:
    def __init__(self, cfg: EvalConfig, data: LoadedData, *, loaded: Any = None) -> None:
        self.cfg = cfg
        self.data = data
        self.records = data.records
        self.loaded = loaded  # a LoadedModel to share (in-process server, ROME's copy); loaded lazily
        self.progress_dir = cfg.out / "progress"
        self.run_id = cfg.identity()["data_sha256"][:8] + f"-s{cfg.seed}"
        self._rome: Any = None

    # ---- server side -------------------------------------------------------------------------------
    async def unedited(self, client: EditServeClient) -> dict[int, RecordEval]:
        """The unedited model's evaluation of every record (Loc's reference; the "unedited" row)."""
        return await self._baseline(
            Progress(self.progress_dir / "unedited.jsonl"),
            ServerScorer(client, "unedited", concurrency=self.cfg.concurrency),
            "unedited (server)",
        )

    async def _baseline(self, progress: Progress, scorer: Scorer, label: str) -> dict[int, RecordEval]:
        done = {
            int(line["result"]["index"]): RecordEval.from_dict(line["result"])
            for line in progress.lines()
            if line.get("type") == "eval"
        }
        todo = [r for r in self.records if r.index not in done]
        with tqdm(
            total=len(self.records), initial=len(self.records) - len(todo), desc=label, unit="rec"
        ) as bar:
            for chunk in _chunks(todo, self.cfg.chunk):
                t0 = time.perf_counter()
                for ev in await evaluate_records(chunk, self.cfg.fmt, scorer, generate=self.cfg.generate):
                    progress.append({"type": "eval", "result": ev.to_dict()})
                    done[ev.index] = ev
                progress.append({"type": "timing", "phase": "eval", "seconds": time.perf_counter() - t0})
                bar.update(len(chunk))
        return done

    async def server_protocol(self, client: EditServeClient, t: int, baseline: dict[int, RecordEval]) -> None:
        methods = [m for m in EDIT_METHODS if m in self.cfg.methods]
        progress = Progress(self.progress_dir / f"T{t}-server.jsonl")
        states = read_rounds(progress)
        rounds = rounds_of(self.records, t)
        bar = tqdm(total=len(self.records), desc=f"T={t} server", unit="rec")
        for r, recs in enumerate(rounds):
            st = states.get(r, RoundState())
            if st.done:
                bar.update(len(recs))
                continue
            st = await self._begin_server_round(client, progress, r, st)
            bar.set_postfix_str("editing")
            for rec in recs:
                if rec.index in st.edits:
                    continue
                key = f"eval-{self.run_id}-T{t}-r{r}-a{st.attempt}-i{rec.index}"
                outcome = await client.edit(rec, key)
                st.edits[rec.index] = outcome.to_dict()
                progress.append(
                    {
                        "type": "edit",
                        "round": r,
                        "attempt": st.attempt,
                        "index": rec.index,
                        "outcome": outcome.to_dict(),
                    }
                )
            version = max([int(o["version"]) for o in st.edits.values() if o["edit_id"]], default=0)
            for method in methods:
                bar.set_postfix_str(method)
                scorer = ServerScorer(client, method, concurrency=self.cfg.concurrency, min_version=version)
                todo = [rec for rec in recs if rec.index not in st.evals.get(method, {})]
                for chunk in _chunks(todo, self.cfg.chunk):
                    t0 = time.perf_counter()
                    results = await evaluate_records(
                        chunk, self.cfg.fmt, scorer, baseline, generate=self.cfg.generate
                    )
                    for ev in results:
                        progress.append(
                            {
                                "type": "eval",
                                "round": r,
                                "attempt": st.attempt,
                                "method": method,
                                "result": ev.to_dict(),
                            }
                        )
                    progress.append(
                        {
                            "type": "timing",
                            "round": r,
                            "attempt": st.attempt,
                            "phase": f"eval:{method}",
                            "seconds": time.perf_counter() - t0,
                        }
                    )
            t0 = time.perf_counter()
            if any(o["edit_id"] for o in st.edits.values()):
                await client.rollback_to(st.base_version)
            progress.append(
                {
                    "type": "timing",
                    "round": r,
                    "attempt": st.attempt,
                    "phase": "rollback",
                    "seconds": time.perf_counter() - t0,
                }
            )
            progress.append({"type": "round_done", "round": r, "attempt": st.attempt})
            bar.update(len(recs))
        bar.close()

    async def _begin_server_round(
        self, client: EditServeClient, progress: Progress, r: int, st: RoundState
    ) -> RoundState:
        """Start a round, or resume one whose applied edits the server still has; otherwise roll back what
        is left of it and start it again as a new attempt."""
        info = await client.info()
        if st.started:
            recorded = sum(1 for o in st.edits.values() if o["edit_id"])
            last = max(
                [int(o["version"]) for o in st.edits.values() if o["edit_id"]], default=st.base_version
            )
            # One more active edit than recorded = applied but interrupted before its line: the retried
            # Edit (same idempotency key) returns it.
            if info.edit_version >= last and info.active_edits - recorded in (0, 1):
                return st
            log.warning(
                "round %d: the server has %d active edits, the progress file %d: restarting the round",
                r,
                info.active_edits,
                recorded,
            )
            if info.edit_version > st.base_version and info.active_edits:
                await client.rollback_to(st.base_version)
                info = await client.info()
        if info.active_edits:
            log.warning(
                "the server already has %d active edits: they stay applied during the evaluation",
                info.active_edits,
            )
        new = RoundState(
            attempt=st.attempt + 1 if st.started else 0, started=True, base_version=int(info.edit_version)
        )
        progress.append(
            {"type": "round", "round": r, "attempt": new.attempt, "base_version": new.base_version}
        )
        return new

    # ---- ROME --------------------------------------------------------------------------------------------
    def rome(self) -> Any:
        if self._rome is None:
            from service.eval.rome import RomeBaseline

            loaded = self.model()
            self._rome = RomeBaseline(
                loaded.model,
                loaded.tokenizer,
                layer=self.cfg.rome_layer,
                cov_tokens=self.cfg.rome_cov_tokens,
                seed=self.cfg.seed,
                cache_dir=self.cfg.rome_cache or self.cfg.out / "rome",
            )
        return self._rome

    def model(self) -> Any:
        if self.loaded is None:
            from service.engine.loader import load_model

            self.loaded = load_model(self.cfg.model, device=self.cfg.device, dtype=self.cfg.dtype)
        return self.loaded

    async def rome_protocol(self, t: int) -> None:
        import torch

        rome = self.rome()
        rome.reset()
        baseline = await self._baseline(
            Progress(self.progress_dir / "rome-unedited.jsonl"),
            rome.scorer,
            "unedited (local, ROME's reference)",
        )
        progress = Progress(self.progress_dir / f"T{t}-rome.jsonl")
        snap_path = self.cfg.out / "rome" / f"weights-T{t}.pt"
        states = read_rounds(progress)
        bar = tqdm(total=len(self.records), desc=f"T={t} rome", unit="rec")
        for r, recs in enumerate(rounds_of(self.records, t)):
            st = states.get(r, RoundState())
            if st.done:
                bar.update(len(recs))
                continue
            if not st.started:
                progress.append({"type": "round", "round": r, "attempt": 0, "base_version": 0})
            applied = 0
            snap = torch.load(snap_path) if snap_path.exists() else None
            if snap is not None and snap["round"] == r and st.started:
                rome.restore(snap["weight"])
                applied = int(snap["applied"])
            else:
                rome.reset()
            bar.set_postfix_str("editing")
            last_snap = time.perf_counter()
            for i, rec in enumerate(recs[applied:], start=applied):
                report = rome.apply(rec)
                progress.append(
                    {
                        "type": "edit",
                        "round": r,
                        "attempt": st.attempt,
                        "index": rec.index,
                        "outcome": report.to_dict(),
                    }
                )
                if time.perf_counter() - last_snap > ROME_SNAPSHOT_EVERY_S or i == len(recs) - 1:
                    _atomic_save({"round": r, "applied": i + 1, "weight": rome.snapshot()}, snap_path)
                    last_snap = time.perf_counter()
            bar.set_postfix_str("rome")
            todo = [rec for rec in recs if rec.index not in st.evals.get("rome", {})]
            for chunk in _chunks(todo, self.cfg.chunk):
                t0 = time.perf_counter()
                for ev in await evaluate_records(
                    chunk, self.cfg.fmt, rome.scorer, baseline, generate=self.cfg.generate
                ):
                    progress.append(
                        {
                            "type": "eval",
                            "round": r,
                            "attempt": st.attempt,
                            "method": "rome",
                            "result": ev.to_dict(),
                        }
                    )
                progress.append(
                    {
                        "type": "timing",
                        "round": r,
                        "attempt": st.attempt,
                        "phase": "eval:rome",
                        "seconds": time.perf_counter() - t0,
                    }
                )
            rome.reset()
            progress.append({"type": "round_done", "round": r, "attempt": st.attempt})
            bar.update(len(recs))
        bar.close()


def _atomic_save(obj: Any, path: Path) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- entry


def prepare_out(cfg: EvalConfig) -> None:
    """Create --out, or check that the one there belongs to the same data, format, n and seed."""
    cfg.out.mkdir(parents=True, exist_ok=True)
    run_file = cfg.out / "run.json"
    identity = cfg.identity()
    if run_file.exists():
        stored = json.loads(run_file.read_text())["identity"]
        if stored != identity:
            diff = {k: (stored.get(k), v) for k, v in identity.items() if stored.get(k) != v}
            raise SystemExit(f"{cfg.out} holds another evaluation ({diff}); pick another --out")
    else:
        run_file.write_text(json.dumps({"identity": identity, "config": _jsonable(asdict(cfg))}, indent=2))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


@asynccontextmanager
async def connect(cfg: EvalConfig, runner: Runner) -> AsyncIterator[EditServeClient]:
    """A client for --server, or for a real server started here (the model shared with ROME's copy)."""
    if cfg.server:
        async with EditServeClient(cfg.server, admin_token=cfg.admin_token) as client:
            await client.wait_ready()
            yield client
        return
    from service.eval.inprocess import in_process_server
    from service.settings_args import settings_from

    # The same EDITSERVE_<NAME> settings as `editserve serve` (address, data dir and token are the harness's).
    base = replace(
        settings_from(argparse.Namespace(), os.environ), model=cfg.model, device=cfg.device, dtype=cfg.dtype
    )
    async with in_process_server(cfg.out / "server-data", loaded=runner.model(), base=base) as srv:
        async with EditServeClient(srv.address, admin_token=srv.admin_token) as client:
            await client.wait_ready()
            yield client


async def run_eval(cfg: EvalConfig, *, loaded: Any = None) -> dict[str, Any]:
    """Run every requested (T, method) not yet in --out, then write the report. Returns results.json's
    content."""
    from service.eval.report import write_report

    unknown = sorted(set(cfg.methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if any(t < 1 for t in cfg.sequential):
        raise ValueError("--sequential T must be at least 1")
    data = load_records(cfg.data, cfg.fmt, cfg.n, sample_seed=cfg.seed if cfg.sample else None)
    for s in data.skipped:
        log.warning("record %d skipped: %s", s.index, s.reason)
    prepare_out(cfg)
    runner = Runner(cfg, data, loaded=loaded)
    started = time.perf_counter()
    server_info: dict[str, Any] = {}
    needs_server = any(m in SERVER_METHODS for m in cfg.methods)
    if needs_server:
        async with connect(cfg, runner) as client:
            from google.protobuf.json_format import MessageToDict

            server_info = MessageToDict(await client.info(), preserving_proto_field_name=True)
            baseline = await runner.unedited(client)
            if any(m in EDIT_METHODS for m in cfg.methods):
                for t in cfg.sequential:
                    await runner.server_protocol(client, t, baseline)
    if "rome" in cfg.methods:
        for t in cfg.sequential:
            await runner.rome_protocol(t)
    wall = time.perf_counter() - started
    Progress(cfg.out / "progress" / "sessions.jsonl").append(
        {
            "type": "session",
            "command": cfg.command,
            "seconds": wall,
            "sequential": cfg.sequential,
            "methods": cfg.methods,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    return write_report(cfg, data, server_info=server_info)


def run_eval_sync(cfg: EvalConfig, *, loaded: Any = None) -> dict[str, Any]:
    return asyncio.run(run_eval(cfg, loaded=loaded))


__all__ = ["EDIT_METHODS", "METHODS", "EditOutcome", "EvalConfig", "Runner", "run_eval", "run_eval_sync"]

"""The gRPC driver: the harness talks to a service ONLY through its public API (Edit, Score, Generate,
RollbackTo, GetServerInfo), whether the server runs in this process or elsewhere.

One server with one set of applied edits is evaluated as several methods by request flags:
  unedited   use_edits=false (no edit path at all)
  hook       edit_paths=[HOOK]
  retrieval  edit_paths=[RETRIEVAL]
  both       edit_paths=[] (every path: the product's default)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from grpc import aio

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.eval.datasets import EvalRecord
from service.eval.metrics import TokenScores

SERVER_METHODS = ("unedited", "hook", "retrieval", "both")
_PATHS: dict[str, list[int]] = {
    "hook": [pb.EDIT_PATH_HOOK],
    "retrieval": [pb.EDIT_PATH_RETRIEVAL],
    "both": [],  # empty = every path
}
_PATH_NAMES = {pb.EDIT_PATH_HOOK: "hook", pb.EDIT_PATH_RETRIEVAL: "retrieval"}
# Transient statuses worth retrying: a full queue, a server still loading.
_RETRY = {grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE}
# The argmax token id per position (zsRE Loc needs it); older servers do not send it.
ARGMAX_FIELD = "argmax_token_id"
_HAS_ARGMAX = ARGMAX_FIELD in pb.TokenLogprob.DESCRIPTOR.fields_by_name


@dataclass
class EditOutcome:
    """What Edit answered for one record: the applied edit, or why it was refused."""

    index: int
    edit_id: str = ""
    version: int = 0
    gate_passed: bool | None = None  # the quality gate's verdict (the edit is applied anyway: force)
    seconds: float = 0.0  # wall time of the Edit call
    report: dict[str, Any] = field(default_factory=dict)
    error: str = ""  # status code and details when the edit was not applied

    @property
    def applied(self) -> bool:
        return bool(self.edit_id)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "edit_id": self.edit_id,
            "version": self.version,
            "gate_passed": self.gate_passed,
            "seconds": self.seconds,
            "report": self.report,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EditOutcome:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def edit_request(record: EvalRecord, key: str, *, force: bool, actor: str) -> pb.EditRequest:
    """A triple edit with its descriptor. The record's paraphrases are NOT sent: they are the held-out
    generalisation test (PS/Gen), as in ROME/MEMIT, and sending them would let the edit calibrate on them."""
    return pb.EditRequest(
        subject=record.subject,
        prompt=record.prompt,
        target_new=record.target_new,
        descriptor=record.descriptor,
        idempotency_key=key,
        force=force,
        actor=actor,
    )


class EditServeClient:
    def __init__(
        self, address: str, *, admin_token: str = "", timeout_s: float = 600.0, retries: int = 8
    ) -> None:
        self.address = address
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()
        self.timeout_s = timeout_s
        self.retries = retries
        self._channel = aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
        self._gen = pb_grpc.GenerateServiceStub(self._channel)
        self._edit = pb_grpc.EditServiceStub(self._channel)
        self._info = pb_grpc.InfoServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> EditServeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, rpc: Any, request: Any, *, metadata: Sequence[tuple[str, str]] = ()) -> Any:
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return await rpc(request, timeout=self.timeout_s, metadata=tuple(metadata) or None)
            except aio.AioRpcError as exc:
                if exc.code() not in _RETRY or attempt == self.retries:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise AssertionError("unreachable")

    # ---- info ------------------------------------------------------------------------------------------
    async def wait_ready(self, timeout_s: float = 300.0) -> pb.GetServerInfoResponse:
        """GetServerInfo, retried while the server answers UNAVAILABLE (model still loading)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            try:
                return await self._info.GetServerInfo(pb.GetServerInfoRequest(), timeout=30.0)
            except aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                    raise
                await asyncio.sleep(1.0)

    async def info(self) -> pb.GetServerInfoResponse:
        return await self._call(self._info.GetServerInfo, pb.GetServerInfoRequest())

    # ---- editing ---------------------------------------------------------------------------------------
    async def edit(
        self, record: EvalRecord, key: str, *, force: bool = True, actor: str = "eval"
    ) -> EditOutcome:
        """Apply one record's edit. INVALID_ARGUMENT / FAILED_PRECONDITION are outcomes, not crashes: the
        record is still evaluated (it then counts as a failure of the edit, not a skipped record)."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            resp = await self._call(
                self._edit.Edit, edit_request(record, key, force=force, actor=actor), metadata=self._metadata
            )
        except aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            return EditOutcome(
                record.index, seconds=loop.time() - t0, error=f"{exc.code().name}: {exc.details()}"
            )
        report = MessageToDict(resp.report, preserving_proto_field_name=True)
        return EditOutcome(
            record.index,
            edit_id=resp.edit_id,
            version=int(resp.version),
            gate_passed=bool(resp.report.passed),
            seconds=loop.time() - t0,
            report=report,
        )

    async def rollback_to(self, version: int, reason: str = "evaluation round done") -> int:
        resp = await self._call(
            self._edit.RollbackTo,
            pb.RollbackToRequest(version=version, reason=reason, actor="eval"),
            metadata=self._metadata,
        )
        return int(resp.version)

    async def get_edit(self, edit_id: str) -> pb.EditRecord:
        resp = await self._call(
            self._edit.GetEdit, pb.GetEditRequest(edit_id=edit_id), metadata=self._metadata
        )
        return resp.edit

    # ---- reading ---------------------------------------------------------------------------------------
    async def score(self, prompt: str, continuation: str, method: str, min_version: int = 0) -> TokenScores:
        req = pb.ScoreRequest(prompt=prompt, continuation=continuation, min_version=min_version)
        _set_method(req, method)
        resp = await self._call(self._gen.Score, req)
        return TokenScores(
            ids=[int(t.token_id) for t in resp.tokens],
            logprobs=[float(t.logprob) for t in resp.tokens],
            greedy=[bool(t.is_greedy) for t in resp.tokens],
            argmax=[int(getattr(t, ARGMAX_FIELD)) for t in resp.tokens] if _HAS_ARGMAX else None,
            applied=[
                [e.edit_id, _PATH_NAMES.get(e.path, "?"), round(float(e.score), 4)]
                for e in resp.applied_edits
            ],
        )

    async def generate(self, prompt: str, max_new_tokens: int, method: str, min_version: int = 0) -> str:
        req = pb.GenerateRequest(
            prompt=prompt, max_new_tokens=max_new_tokens, temperature=0.0, min_version=min_version
        )
        _set_method(req, method)
        resp = await self._call(self._gen.Generate, req)
        return str(resp.text)


def _set_method(req: pb.ScoreRequest | pb.GenerateRequest, method: str) -> None:
    if method == "unedited":
        req.use_edits = False
        return
    if method not in _PATHS:
        raise ValueError(f"unknown server method {method!r}; one of {', '.join(SERVER_METHODS)}")
    req.use_edits = True
    req.edit_paths.extend(_PATHS[method])


class ServerScorer:
    """One method's view of the server, as the runner's `Scorer`: concurrent calls, the engine batches."""

    def __init__(
        self, client: EditServeClient, method: str, *, concurrency: int = 16, min_version: int = 0
    ) -> None:
        self.client = client
        self.method = method
        self.min_version = min_version
        self._sem = asyncio.Semaphore(concurrency)

    async def _limited(self, coro: Any) -> Any:
        async with self._sem:
            return await coro

    async def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScores]:
        return list(
            await asyncio.gather(
                *(self._limited(self.client.score(p, c, self.method, self.min_version)) for p, c in pairs)
            )
        )

    async def generate_many(self, requests: Sequence[tuple[str, int]]) -> list[str]:
        return list(
            await asyncio.gather(
                *(
                    self._limited(self.client.generate(p, n, self.method, self.min_version))
                    for p, n in requests
                )
            )
        )

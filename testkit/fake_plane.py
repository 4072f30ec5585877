"""FakeDataPlane: a small, real, in-memory `DataPlaneProtocol` without a model.

Generation echoes the prompt; edits live in a real `EditRegistry` (so GetEdit/ListEdits/Rollback
have the edit log's exact semantics: pagination tokens, NOT_FOUND, FAILED_PRECONDITION). It records
what it was called with and whether streams were closed, and `fail_with` makes the next call raise,
so transport tests can check every conversion and status mapping in milliseconds. Imports no torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from service import __version__, errors
from service.editlog import (
    EditRegistry,
    EditView,
    LogEntry,
    StoredEdit,
    StoredHook,
    TensorBlob,
    request_digest,
)
from service.types import (
    AppliedEdit,
    BatchEditInput,
    BatchEditResult,
    EditInput,
    EditResult,
    EffectGrid,
    GenerateChunk,
    GenerateInput,
    GenerateResult,
    ListEditsInput,
    QualityReportView,
    RollbackInput,
    RollbackResult,
    RollbackToInput,
    RollbackToResult,
    ScoreInput,
    ScoreResult,
    ServerInfo,
    TokenLogprob,
    TraceInput,
    TraceResult,
)

FAKE_HOOK_LAYER = 3


class FakeDataPlane:
    def __init__(self, *, max_edits: int = 1000, chunk_delay_s: float = 0.0, ready: bool = False) -> None:
        self.max_edits = max_edits
        self.chunk_delay_s = chunk_delay_s  # pause before each streamed chunk (for drain/cancel tests)
        self._ready = ready
        self.registry = EditRegistry()
        self.calls: list[tuple[str, Any]] = []  # (method, converted input) in call order
        self.fail_with: BaseException | None = None  # raised by the next call, then cleared
        self.open_streams = 0
        self.closed_streams = 0
        self.shutdown_grace: float | None = None
        self.sick = False  # healthy() and deep_check() answer False (health watcher tests)
        self._idempotent: dict[str, tuple[str, Any]] = {}  # key -> (request digest, result)

    # ------------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready

    def healthy(self) -> bool:
        return self._ready and not self.sick

    async def deep_check(self, timeout_s: float) -> bool:
        return self.healthy()

    async def start(self) -> None:
        self._ready = True

    async def shutdown(self, grace_s: float) -> None:
        self.shutdown_grace = grace_s
        self._ready = False

    def _enter(self, method: str, request: Any) -> None:
        self.calls.append((method, request))
        if self.fail_with is not None:
            exc, self.fail_with = self.fail_with, None
            raise exc

    # ------------------------------------------------------------------ generation

    def _check_generate(self, request: GenerateInput) -> str:
        if not request.prompt and not request.messages:
            raise errors.InvalidArgument("must not be empty (or send messages)", field="prompt")
        if request.min_version > self.registry.version:
            raise errors.FailedPrecondition(
                f"server is at edit version {self.registry.version}, below {request.min_version}",
                field="min_version",
            )
        text = " ".join(m.content for m in request.messages) if request.messages else request.prompt
        return f"echo: {text}"

    def _applied(self, request: GenerateInput | ScoreInput) -> list[AppliedEdit]:
        if not request.use_edits:
            return []
        return [
            AppliedEdit(edit_id=e.edit_id, path=request.edit_paths[0], score=0.9)
            for e in self.registry.active_edits()
        ]

    async def generate(self, request: GenerateInput) -> GenerateResult:
        self._enter("generate", request)
        text = self._check_generate(request)
        return GenerateResult(
            text=text,
            prompt_tokens=len(text.split()) - 1,
            completion_tokens=len(text.split()),
            finish_reason="length",
            edit_version=self.registry.version,
            applied_edits=self._applied(request),
        )

    async def generate_stream(self, request: GenerateInput) -> AsyncIterator[GenerateChunk]:
        self._enter("generate_stream", request)
        words = self._check_generate(request).split(" ")
        self.open_streams += 1
        try:
            for i, word in enumerate(words):
                if self.chunk_delay_s:
                    await asyncio.sleep(self.chunk_delay_s)
                last = i == len(words) - 1
                yield GenerateChunk(
                    text=word if i == 0 else f" {word}",
                    token_ids=[i],
                    finish_reason="eos" if last else None,
                    prompt_tokens=len(words) - 1,
                    completion_tokens=i + 1,
                    edit_version=self.registry.version,
                    applied_edits=self._applied(request) if last else [],
                )
        finally:  # runs on normal end, on aclose() and on cancellation alike
            self.open_streams -= 1
            self.closed_streams += 1

    async def score(self, request: ScoreInput) -> ScoreResult:
        self._enter("score", request)
        if not request.continuation:
            raise errors.InvalidArgument("must not be empty", field="continuation")
        tokens = [
            TokenLogprob(
                token_id=ord(ch),
                token=ch,
                logprob=-0.5,
                is_greedy=i == 0,
                argmax_token_id=ord(ch) if i == 0 else 0,
            )
            for i, ch in enumerate(request.continuation)
        ]
        return ScoreResult(
            tokens=tokens,
            total_logprob=-0.5 * len(tokens),
            edit_version=self.registry.version,
            prompt_tokens=len(request.prompt.split()),
            applied_edits=self._applied(request),
        )

    # ------------------------------------------------------------------ editing

    def _stored_edit(self, request: EditInput, edit_id: str) -> StoredEdit:
        triple = bool(request.subject or request.prompt or request.target_new)
        if triple:
            for name in ("subject", "prompt", "target_new"):
                if not getattr(request, name).strip():
                    raise errors.InvalidArgument("must not be empty", field=name)
            if request.subject not in request.prompt:
                raise errors.InvalidArgument("must contain the subject", field="prompt")
        elif not request.descriptor.strip():
            raise errors.InvalidArgument("must not be empty for a retrieval-only edit", field="descriptor")
        hooks = []
        if triple:
            blob = TensorBlob.from_numpy(np.zeros(4, dtype=np.float32))
            hooks = [StoredHook(layer=FAKE_HOOK_LAYER, key=blob, value=blob, threshold=0.8)]
        report = {
            "efficacy": True,
            "old_answer": "Paris",
            "target_logprob": -0.1,
            "old_answer_logprob": -3.0,
            "paraphrases": [[p, True] for p in request.paraphrases],
            "locality_top1_changed": 0.0,
            "locality_mean_kl": 0.001,
            "threshold": 0.8,
            "compute_seconds": 0.01,
            "passed": True,
            "message": "",
        }
        return StoredEdit(
            edit_id=edit_id,
            kind="triple" if triple else "descriptor",
            subject=request.subject,
            prompt=request.prompt,
            target_new=request.target_new,
            paraphrases=list(request.paraphrases),
            descriptor=request.descriptor,
            hooks=hooks,
            report=report,
            namespace=request.namespace or "default",
        )

    def _commit(self, edits: list[StoredEdit], actor: str, kind: str) -> int:
        if self.registry.counts().active + len(edits) > self.max_edits:
            raise errors.ResourceExhausted(f"at most {self.max_edits} active edits")
        entry = LogEntry(version=self.registry.version + 1, kind=kind, actor=actor, edits=edits)
        self.registry.apply(entry)
        return entry.version

    def _idempotent_result(self, key: str, fields: dict[str, Any]) -> Any:
        if not key or key not in self._idempotent:
            return None
        digest, result = self._idempotent[key]
        if digest != request_digest(fields):
            raise errors.AlreadyExists(f"key {key!r} was used for another request", field="idempotency_key")
        return result

    async def edit(self, request: EditInput) -> EditResult:
        self._enter("edit", request)
        fields = {k: v for k, v in vars(request).items() if k != "idempotency_key"}
        if (done := self._idempotent_result(request.idempotency_key, fields)) is not None:
            return done
        stored = self._stored_edit(request, f"e{len(self.registry) + 1}")
        version = self._commit([stored], request.actor, "edit")
        result = EditResult(stored.edit_id, version, QualityReportView.from_dict(stored.report))
        if request.idempotency_key:
            self._idempotent[request.idempotency_key] = (request_digest(fields), result)
        return result

    async def batch_edit(self, request: BatchEditInput) -> BatchEditResult:
        self._enter("batch_edit", request)
        if not request.edits:
            raise errors.InvalidArgument("must not be empty", field="edits")
        fields = {"edits": [vars(e) for e in request.edits], "force": request.force}
        if (done := self._idempotent_result(request.idempotency_key, fields)) is not None:
            return done
        first = len(self.registry) + 1
        stored = [self._stored_edit(e, f"e{first + i}") for i, e in enumerate(request.edits)]
        version = self._commit(stored, request.actor, "batch")
        result = BatchEditResult(
            version, [EditResult(s.edit_id, version, QualityReportView.from_dict(s.report)) for s in stored]
        )
        if request.idempotency_key:
            self._idempotent[request.idempotency_key] = (request_digest(fields), result)
        return result

    async def get_edit(self, edit_id: str) -> EditView:
        self._enter("get_edit", edit_id)
        view = self.registry.get(edit_id)
        if view is None:
            raise errors.NotFound(f"no edit with id {edit_id!r}", field="edit_id")
        return view

    async def list_edits(self, request: ListEditsInput) -> tuple[list[EditView], str]:
        self._enter("list_edits", request)
        return self.registry.list(request.state, request.page_size, request.page_token,
                                  subject=request.subject, text=request.text, actor=request.actor)

    async def rollback(self, request: RollbackInput) -> RollbackResult:
        self._enter("rollback", request)
        self.registry.check_rollback(request.edit_id)
        entry = LogEntry(
            version=self.registry.version + 1, kind="rollback", actor=request.actor,
            target_edit_ids=[request.edit_id], reason=request.reason,
        )
        self.registry.apply(entry)
        return RollbackResult(version=entry.version, edit_id=request.edit_id)

    async def rollback_to(self, request: RollbackToInput) -> RollbackToResult:
        self._enter("rollback_to", request)
        ids = self.registry.check_rollback_to(request.version, request.namespace)
        entry = LogEntry(
            version=self.registry.version + 1, kind="rollback_to", actor=request.actor,
            target_edit_ids=ids, target_version=request.version, reason=request.reason,
        )
        self.registry.apply(entry)
        return RollbackToResult(version=entry.version, rolled_back_edit_ids=ids)

    async def server_info(self) -> ServerInfo:
        self._enter("server_info", None)
        counts = self.registry.counts()
        return ServerInfo(
            model_name="fake-echo",
            dtype="float32",
            device="cpu",
            hook_layers=[FAKE_HOOK_LAYER],
            edit_version=self.registry.version,
            active_edits=counts.active,
            active_hook_edits=counts.active_hook,
            active_descriptor_edits=counts.active_descriptor,
            total_edits=counts.total,
            server_version=__version__,
            max_batch_size=16,
        )

    async def trace(self, request: TraceInput) -> TraceResult:
        """Whitespace tokens, a two-layer model, zero effects except restoring the last layer at the end."""
        self._enter("trace", request)
        if not request.prompt.strip():
            raise errors.InvalidArgument("must not be empty", field="prompt")
        if not request.subject or request.subject not in request.prompt:
            raise errors.InvalidArgument(f"{request.subject!r} does not occur in the prompt", field="subject")
        tokens = request.prompt.split(" ")
        start = request.prompt[: request.prompt.index(request.subject)].count(" ")
        end = start + len(request.subject.split(" "))
        values = [0.0] * (2 * len(tokens))
        values[-1] = 0.5
        grid = EffectGrid(layers=2, tokens=len(tokens), values=values)
        return TraceResult(
            tokens=tokens, subject_start=start, subject_end=end, answer=" echo", answer_token_id=1,
            clean_probability=0.6, corrupted_probability=0.1, residual=grid, mlp=grid, attention=grid,
            mlp_at_subject=[(1, 0.0), (0, 0.0)], attention_at_last=[(1, 0.5), (0, 0.0)],
            samples=request.samples or 3, window=request.window or 2, seed=request.seed, noise=0.3,
            seconds=0.0,
        )

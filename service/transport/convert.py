"""Protobuf <-> service.types conversion: the only place that knows both shapes.

Unset optional fields become None (or the documented default) here, so the data plane never has to
know about `HasField`. Field *values* are validated by the data plane; only things that cannot be
represented in service.types at all (an EditPath of UNSPECIFIED) are rejected here.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from service import types as t
from service._proto.editserve.v1 import editserve_pb2 as pb
from service.errors import InvalidArgument

_FINISH_REASONS: dict[str, int] = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
_PATH_TO_PB: dict[str, int] = {"hook": pb.EDIT_PATH_HOOK, "retrieval": pb.EDIT_PATH_RETRIEVAL}
_PATH_FROM_PB: dict[int, t.EditPathName] = {pb.EDIT_PATH_HOOK: "hook", pb.EDIT_PATH_RETRIEVAL: "retrieval"}
_STATE_TO_PB: dict[str, int] = {
    "active": pb.EDIT_STATE_ACTIVE,
    "rolled_back": pb.EDIT_STATE_ROLLED_BACK,
    "superseded": pb.EDIT_STATE_SUPERSEDED,
}
_STATE_FROM_PB: dict[int, t.EditStateName] = {
    pb.EDIT_STATE_ACTIVE: "active",
    pb.EDIT_STATE_ROLLED_BACK: "rolled_back",
    pb.EDIT_STATE_SUPERSEDED: "superseded",
}
_KIND_TO_PB: dict[str, int] = {"triple": pb.EDIT_KIND_TRIPLE, "descriptor": pb.EDIT_KIND_DESCRIPTOR}

ALL_PATHS: tuple[t.EditPathName, ...] = ("hook", "retrieval")


# ------------------------------------------------------------------------------------------ generation


def edit_paths(values: Any) -> tuple[t.EditPathName, ...]:
    """Repeated EditPath -> names in request order without duplicates; empty means every path."""
    if not values:
        return ALL_PATHS
    names: list[t.EditPathName] = []
    for value in values:
        name = _PATH_FROM_PB.get(value)
        if name is None:
            raise InvalidArgument(f"unknown edit path {value} (use EDIT_PATH_HOOK or EDIT_PATH_RETRIEVAL)",
                                  field="edit_paths")
        if name not in names:
            names.append(name)
    return tuple(names)


def generate_input(req: pb.GenerateRequest, deadline: float | None) -> t.GenerateInput:
    return t.GenerateInput(
        prompt=req.prompt,
        messages=[t.ChatMessage(role=m.role, content=m.content) for m in req.messages],
        max_new_tokens=req.max_new_tokens if req.HasField("max_new_tokens") else None,
        min_new_tokens=req.min_new_tokens if req.HasField("min_new_tokens") else None,
        temperature=req.temperature,
        top_p=req.top_p if req.HasField("top_p") else None,
        top_k=req.top_k,
        seed=req.seed,
        stop=list(req.stop),
        use_edits=req.use_edits if req.HasField("use_edits") else True,
        min_version=req.min_version,
        edit_paths=edit_paths(req.edit_paths),
        deadline=deadline,
        namespaces=tuple(req.namespaces),
        logprobs=req.logprobs if req.HasField("logprobs") else None,
    )


def score_input(req: pb.ScoreRequest, deadline: float | None) -> t.ScoreInput:
    return t.ScoreInput(
        prompt=req.prompt,
        continuation=req.continuation,
        use_edits=req.use_edits if req.HasField("use_edits") else True,
        min_version=req.min_version,
        edit_paths=edit_paths(req.edit_paths),
        deadline=deadline,
        namespaces=tuple(req.namespaces),
    )


def applied_edits(edits: list[t.AppliedEdit]) -> list[pb.AppliedEdit]:
    return [pb.AppliedEdit(edit_id=e.edit_id, path=_PATH_TO_PB[e.path], score=e.score, namespace=e.namespace)
            for e in edits]


def generated_logprobs(logprobs: list[t.GeneratedLogprob]) -> list[pb.GeneratedLogprob]:
    return [
        pb.GeneratedLogprob(
            token_id=x.token_id, token=x.token, logprob=x.logprob,
            top_logprobs=[pb.TopLogprob(token_id=a.token_id, token=a.token, logprob=a.logprob)
                          for a in x.top_logprobs],
        )
        for x in logprobs
    ]


def finish_reason(reason: str | None) -> int:
    return _FINISH_REASONS[reason] if reason else pb.FINISH_REASON_UNSPECIFIED


def generate_response(res: t.GenerateResult) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        text=res.text,
        prompt_tokens=res.prompt_tokens,
        completion_tokens=res.completion_tokens,
        finish_reason=finish_reason(res.finish_reason),
        edit_version=res.edit_version,
        applied_edits=applied_edits(res.applied_edits),
        logprobs=generated_logprobs(res.logprobs),
    )


def stream_response(chunk: t.GenerateChunk) -> pb.GenerateStreamResponse:
    return pb.GenerateStreamResponse(
        text=chunk.text,
        token_ids=chunk.token_ids,
        finish_reason=finish_reason(chunk.finish_reason),
        prompt_tokens=chunk.prompt_tokens,
        completion_tokens=chunk.completion_tokens,
        edit_version=chunk.edit_version,
        applied_edits=applied_edits(chunk.applied_edits),
        logprobs=generated_logprobs(chunk.logprobs),
    )


def score_response(res: t.ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        tokens=[
            pb.TokenLogprob(
                token_id=x.token_id,
                token=x.token,
                logprob=x.logprob,
                is_greedy=x.is_greedy,
                argmax_token_id=max(x.argmax_token_id, 0),
            )
            for x in res.tokens
        ],
        total_logprob=res.total_logprob,
        edit_version=res.edit_version,
        applied_edits=applied_edits(res.applied_edits),
        prompt_tokens=res.prompt_tokens,
    )


# ------------------------------------------------------------------------------------------ editing


def edit_input(req: pb.EditRequest, deadline: float | None = None) -> t.EditInput:
    return t.EditInput(
        subject=req.subject,
        prompt=req.prompt,
        target_new=req.target_new,
        paraphrases=list(req.paraphrases),
        descriptor=req.descriptor,
        idempotency_key=req.idempotency_key,
        force=req.force,
        actor=req.actor,
        compile_descriptor=req.compile_descriptor if req.HasField("compile_descriptor") else None,
        deadline=deadline,
        namespace=req.namespace,
        layer=req.layer,
    )


def batch_edit_input(req: pb.BatchEditRequest, deadline: float | None = None) -> t.BatchEditInput:
    return t.BatchEditInput(
        edits=[edit_input(e) for e in req.edits],
        idempotency_key=req.idempotency_key,
        force=req.force,
        actor=req.actor,
        deadline=deadline,
        namespace=req.namespace,
    )


def quality_report(report: t.QualityReportView) -> pb.QualityReport:
    return pb.QualityReport(
        efficacy=report.efficacy,
        old_answer=report.old_answer,
        target_logprob=report.target_logprob,
        old_answer_logprob=report.old_answer_logprob,
        paraphrases=[pb.ParaphraseResult(prompt=p, success=ok) for p, ok in report.paraphrases],
        locality_top1_changed=report.locality_top1_changed,
        locality_mean_kl=report.locality_mean_kl,
        threshold=report.threshold,
        compute_seconds=report.compute_seconds,
        passed=report.passed,
        message=report.message,
        layer_choice=report.layer_choice,
    )


def edit_response(res: t.EditResult) -> pb.EditResponse:
    return pb.EditResponse(edit_id=res.edit_id, version=res.version, report=quality_report(res.report))


def batch_edit_response(res: t.BatchEditResult) -> pb.BatchEditResponse:
    return pb.BatchEditResponse(version=res.version, edits=[edit_response(e) for e in res.edits])


def rfc3339(ts: datetime | None) -> str:
    """UTC with a 'Z' suffix; "" for None (the proto's "not set")."""
    if ts is None:
        return ""
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    return ts.isoformat(timespec="microseconds").replace("+00:00", "Z")


def edit_record(view: Any) -> pb.EditRecord:
    """An `service.editlog.EditView` (duck-typed: importing the edit log is not the transport's job)."""
    return pb.EditRecord(
        edit_id=view.edit_id,
        version=view.version,
        state=_STATE_TO_PB.get(view.state, pb.EDIT_STATE_UNSPECIFIED),
        kind=_KIND_TO_PB.get(view.kind, pb.EDIT_KIND_UNSPECIFIED),
        subject=view.subject,
        prompt=view.prompt,
        target_new=view.target_new,
        paraphrases=list(view.paraphrases),
        descriptor=view.descriptor,
        actor=view.actor,
        created_at=rfc3339(view.created_at),
        report=quality_report(t.QualityReportView.from_dict(view.report or {})),
        rolled_back_version=view.rolled_back_version,
        rolled_back_by=view.rolled_back_by,
        rolled_back_at=rfc3339(view.rolled_back_at),
        rollback_reason=view.rollback_reason,
        superseded_by=view.superseded_by,
        hook_layers=sorted({hook.layer for hook in view.hooks}),
        derived_from_descriptor=bool(getattr(view, "derived_from_descriptor", False)),
        supersedes=list(getattr(view, "supersedes", ())),
        namespace=getattr(view, "namespace", "default"),
    )


def list_edits_input(req: pb.ListEditsRequest) -> t.ListEditsInput:
    state: t.EditStateName | None = None
    if req.state != pb.EDIT_STATE_UNSPECIFIED:
        state = _STATE_FROM_PB.get(req.state)
        if state is None:
            raise InvalidArgument(f"unknown edit state {req.state}", field="state")
    return t.ListEditsInput(page_size=req.page_size, page_token=req.page_token, state=state,
                            subject=req.subject, text=req.text, actor=req.actor, namespace=req.namespace)


def list_edits_response(views: list[Any], next_page_token: str) -> pb.ListEditsResponse:
    return pb.ListEditsResponse(edits=[edit_record(v) for v in views], next_page_token=next_page_token)


def rollback_input(req: pb.RollbackRequest) -> t.RollbackInput:
    return t.RollbackInput(edit_id=req.edit_id, reason=req.reason, actor=req.actor)


def rollback_response(res: t.RollbackResult) -> pb.RollbackResponse:
    return pb.RollbackResponse(version=res.version, edit_id=res.edit_id)


def rollback_to_input(req: pb.RollbackToRequest) -> t.RollbackToInput:
    return t.RollbackToInput(version=req.version, reason=req.reason, actor=req.actor, namespace=req.namespace)


def rollback_to_response(res: t.RollbackToResult) -> pb.RollbackToResponse:
    return pb.RollbackToResponse(version=res.version, rolled_back_edit_ids=res.rolled_back_edit_ids)


# ------------------------------------------------------------------------------------------ info


def server_info_response(info: t.ServerInfo) -> pb.GetServerInfoResponse:
    return pb.GetServerInfoResponse(
        model_name=info.model_name,
        dtype=info.dtype,
        device=info.device,
        hook_layers=info.hook_layers,
        edit_version=info.edit_version,
        active_edits=info.active_edits,
        active_hook_edits=info.active_hook_edits,
        active_descriptor_edits=info.active_descriptor_edits,
        total_edits=info.total_edits,
        server_version=info.server_version,
        max_batch_size=info.max_batch_size,
        hook_layer_rule=info.hook_layer_rule,
        architecture=info.architecture,
        edit_layer=info.edit_layer,
        auto_layer_candidates=info.auto_layer_candidates,
    )


def trace_input(req: pb.TraceRequest, deadline: float | None) -> t.TraceInput:
    return t.TraceInput(
        prompt=req.prompt,
        subject=req.subject,
        answer=req.answer,
        seed=req.seed,
        samples=req.samples if req.HasField("samples") else None,
        window=req.window if req.HasField("window") else None,
        deadline=deadline,
    )


def _grid(grid: t.EffectGrid) -> pb.EffectGrid:
    return pb.EffectGrid(layers=grid.layers, tokens=grid.tokens, values=grid.values)


def trace_response(res: t.TraceResult) -> pb.TraceResponse:
    return pb.TraceResponse(
        tokens=res.tokens,
        subject_start=res.subject_start,
        subject_end=res.subject_end,
        answer=res.answer,
        answer_token_id=res.answer_token_id,
        clean_probability=res.clean_probability,
        corrupted_probability=res.corrupted_probability,
        residual=_grid(res.residual),
        mlp=_grid(res.mlp),
        attention=_grid(res.attention),
        mlp_at_subject=[pb.LayerEffect(layer=la, effect=e) for la, e in res.mlp_at_subject],
        attention_at_last=[pb.LayerEffect(layer=la, effect=e) for la, e in res.attention_at_last],
        samples=res.samples,
        window=res.window,
        seed=res.seed,
        noise=res.noise,
        seconds=res.seconds,
    )

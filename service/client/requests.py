"""Request builders shared by the blocking and the asyncio client: plain Python values in, protobuf
messages out, so both clients accept exactly the same arguments."""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service._proto.editserve.v1 import editserve_pb2 as pb

Message = tuple[str, str] | Mapping[str, str] | pb.ChatMessage
EditLike = pb.EditRequest | Mapping[str, Any]

STATES: dict[str, int] = {
    "active": pb.EDIT_STATE_ACTIVE,
    "rolled_back": pb.EDIT_STATE_ROLLED_BACK,
    "superseded": pb.EDIT_STATE_SUPERSEDED,
}
PATHS: dict[str, int] = {"hook": pb.EDIT_PATH_HOOK, "retrieval": pb.EDIT_PATH_RETRIEVAL}
# EditRequest fields a mapping may carry ("target" is accepted for target_new).
EDIT_FIELDS = (
    "subject",
    "prompt",
    "target_new",
    "paraphrases",
    "descriptor",
    "idempotency_key",
    "force",
    "actor",
    "compile_descriptor",
    "namespace",
    "layer",
)


@dataclass(frozen=True)
class Timeouts:
    """Per-call deadlines in seconds (None = no deadline). Edits compute on the model: seconds each."""

    default: float | None = 60.0
    generate: float | None = 300.0
    edit: float | None = 900.0


def new_idempotency_key() -> str:
    """A fresh key: sent with every Edit/BatchEdit that has none, so a retry can never store twice."""
    return f"py-{uuid.uuid4().hex}"


def chat_messages(messages: Iterable[Message] | None) -> list[pb.ChatMessage]:
    out = []
    for m in messages or ():
        if isinstance(m, pb.ChatMessage):
            out.append(m)
        elif isinstance(m, Mapping):
            out.append(pb.ChatMessage(role=m["role"], content=m["content"]))
        else:
            role, content = m
            out.append(pb.ChatMessage(role=role, content=content))
    return out


def edit_paths(paths: Iterable[str | int] | None) -> list[int]:
    out = []
    for p in paths or ():
        if isinstance(p, str):
            if p not in PATHS:
                raise ValueError(f"unknown edit path {p!r}; expected one of {', '.join(PATHS)}")
            out.append(PATHS[p])
        else:
            out.append(int(p))
    return out


def edit_state(state: str | int | None) -> int:
    if state is None or state == "" or state == "all":
        return pb.EDIT_STATE_UNSPECIFIED
    if isinstance(state, str):
        if state not in STATES:
            raise ValueError(f"unknown edit state {state!r}; expected one of {', '.join(STATES)} or all")
        return STATES[state]
    return int(state)


def generate_request(
    prompt: str = "",
    *,
    messages: Iterable[Message] | None = None,
    max_new_tokens: int | None = None,
    min_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float | None = None,
    top_k: int = 0,
    seed: int = 0,
    stop: Sequence[str] = (),
    use_edits: bool | None = None,
    edit_paths_: Iterable[str | int] | None = None,
    min_version: int = 0,
    namespaces: Iterable[str] | None = None,
    logprobs: int | None = None,
) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        prompt=prompt,
        messages=chat_messages(messages),
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        stop=list(stop),
        edit_paths=edit_paths(edit_paths_),
        min_version=min_version,
        namespaces=list(namespaces or ()),
    )
    # optional fields: unset means the server default, so only set what the caller chose
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    if min_new_tokens is not None:
        request.min_new_tokens = min_new_tokens
    if top_p is not None:
        request.top_p = top_p
    if use_edits is not None:
        request.use_edits = use_edits
    if logprobs is not None:
        request.logprobs = logprobs
    return request


def score_request(
    prompt: str,
    continuation: str,
    *,
    use_edits: bool | None = None,
    edit_paths_: Iterable[str | int] | None = None,
    min_version: int = 0,
    namespaces: Iterable[str] | None = None,
) -> pb.ScoreRequest:
    request = pb.ScoreRequest(
        prompt=prompt, continuation=continuation, edit_paths=edit_paths(edit_paths_), min_version=min_version,
        namespaces=list(namespaces or ()),
    )
    if use_edits is not None:
        request.use_edits = use_edits
    return request


def edit_request(edit: EditLike | None = None, **fields: Any) -> pb.EditRequest:
    """An EditRequest from a message, a mapping of its fields (`target` = `target_new`), or keywords."""
    if isinstance(edit, pb.EditRequest):
        request = pb.EditRequest()
        request.CopyFrom(edit)
        return request
    values = {**(dict(edit) if edit is not None else {}), **fields}
    if "target" in values:
        values.setdefault("target_new", values.pop("target"))
    unknown = sorted(set(values) - set(EDIT_FIELDS))
    if unknown:
        raise ValueError(f"unknown edit field(s): {', '.join(unknown)}")
    compile_descriptor = values.pop("compile_descriptor", None)
    values = {k: v for k, v in values.items() if v is not None}
    values["paraphrases"] = list(values.get("paraphrases", ()))
    request = pb.EditRequest(**values)
    if compile_descriptor is not None:
        request.compile_descriptor = bool(compile_descriptor)
    return request


def trace_request(
    prompt: str,
    subject: str,
    *,
    answer: str = "",
    seed: int = 0,
    samples: int | None = None,
    window: int | None = None,
) -> pb.TraceRequest:
    request = pb.TraceRequest(prompt=prompt, subject=subject, answer=answer, seed=seed)
    if samples is not None:
        request.samples = samples
    if window is not None:
        request.window = window
    return request

"""Validation of Generate and Score requests: every caller mistake becomes InvalidArgument naming the field.

Runs before any model work, so a bad request never reaches the engine's queue. Token-count limits need
the tokenizer and are checked where the prompt is rendered (service/router/routing.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from service.errors import InvalidArgument
from service.types import MAX_TOP_LOGPROBS, GenerateInput, ScoreInput

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value


DEFAULT_MIN_NEW_TOKENS = 1


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int
    max_new_tokens: int
    default_max_new_tokens: int


def validate_generate(req: GenerateInput, limits: Limits) -> int:
    """Check every field of a Generate request; returns the effective max_new_tokens."""
    if not req.messages and not req.prompt.strip():
        raise InvalidArgument("must not be empty (or send messages)", field="prompt")
    for n, msg in enumerate(req.messages):
        if msg.role not in CHAT_ROLES:
            raise InvalidArgument(f"unknown role {msg.role!r}; expected one of {CHAT_ROLES}",
                                  field=f"messages[{n}].role")
    if req.messages and not any(m.content.strip() for m in req.messages):
        raise InvalidArgument("every message is empty", field="messages")
    max_new = limits.default_max_new_tokens if req.max_new_tokens is None else req.max_new_tokens
    if max_new < 1 or max_new > limits.max_new_tokens:
        raise InvalidArgument(f"must be between 1 and {limits.max_new_tokens}, got {max_new}",
                              field="max_new_tokens")
    min_new = effective_min_new_tokens(req)
    if min_new > max_new:
        raise InvalidArgument(f"must not exceed max_new_tokens ({max_new}), got {min_new}",
                              field="min_new_tokens")
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise InvalidArgument(f"must be a finite number >= 0, got {req.temperature}", field="temperature")
    if req.top_p is not None and not (math.isfinite(req.top_p) and 0 < req.top_p <= 1):
        raise InvalidArgument(f"must lie in (0, 1], got {req.top_p}", field="top_p")
    if req.top_k < 0:
        raise InvalidArgument(f"must be >= 0, got {req.top_k}", field="top_k")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"must lie in [0, {MAX_TOP_LOGPROBS}], got {req.logprobs}", field="logprobs")
    if not 0 <= req.seed <= MAX_SEED:
        raise InvalidArgument(f"must be below 2**63, got {req.seed}", field="seed")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings", field="stop")
    for s in req.stop:
        if not s or len(s) > MAX_STOP_CHARS:
            raise InvalidArgument(f"stop strings must have 1 to {MAX_STOP_CHARS} characters", field="stop")
    _validate_paths(req.edit_paths)
    return max_new


def effective_min_new_tokens(req: GenerateInput) -> int:
    """Unset = 1: the first token is never EOS, so a raw question does not come back empty."""
    return DEFAULT_MIN_NEW_TOKENS if req.min_new_tokens is None else req.min_new_tokens


def validate_score(req: ScoreInput) -> None:
    if not req.prompt.strip():
        raise InvalidArgument("must not be empty", field="prompt")
    if not req.continuation:
        raise InvalidArgument("must not be empty", field="continuation")
    _validate_paths(req.edit_paths)


def _validate_paths(paths: tuple[str, ...]) -> None:
    for p in paths:
        if p not in ("hook", "retrieval"):
            raise InvalidArgument(f"unknown edit path {p!r}", field="edit_paths")


def check_prompt_tokens(n_tokens: int, limits: Limits, field: str) -> None:
    if n_tokens > limits.max_prompt_tokens:
        raise InvalidArgument(f"is {n_tokens} tokens, more than the limit of {limits.max_prompt_tokens}",
                              field=field)

"""Request-level routing: which edit paths apply, which descriptors are in scope, and the final token ids.

    request -> validate -> (retrieval on?) scope detector -> prompt template -> token ids for the engine

Out-of-scope requests (and requests with edits off) are rendered exactly as serving without edits would
render them, so they reach the engine byte-identical. Hook-layer edits gate themselves per token inside
the model; here we only decide whether the hook path is on for the request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service import metrics
from service.errors import InvalidArgument
from service.retrieval.store import StoreSnapshot
from service.router.prompt import DEFAULT_STYLE, PLAIN_RAW, PromptStyle, build_prompt, query_text
from service.router.scope import ScopeDetector, ScopeHit
from service.router.validation import Limits, check_prompt_tokens
from service.types import AppliedEdit, ChatMessage


@dataclass(frozen=True)
class Route:
    prompt_ids: list[int]
    hits: list[ScopeHit]  # in-scope descriptors injected into the prompt
    use_hooks: bool

    def retrieval_edits(self) -> list[AppliedEdit]:
        return [AppliedEdit(h.edit_id, "retrieval", h.score) for h in self.hits]


class Router:
    def __init__(
        self, tokenizer: Any, scope: ScopeDetector | None, limits: Limits, style: PromptStyle = DEFAULT_STYLE
    ) -> None:
        self.tokenizer = tokenizer
        self.style = style
        self.scope = scope  # None: the retrieval path is switched off for this server
        self.limits = limits

    def paths(self, use_edits: bool, edit_paths: Sequence[str]) -> tuple[bool, bool]:
        """(hook path on, retrieval path on) for one request."""
        use_hooks = use_edits and "hook" in edit_paths
        use_retrieval = use_edits and "retrieval" in edit_paths and self.scope is not None
        return use_hooks, use_retrieval

    def detect(
        self, query: str, use_retrieval: bool, retrieval: StoreSnapshot | None = None
    ) -> list[ScopeHit]:
        if not use_retrieval or self.scope is None:
            return []
        started = time.perf_counter()
        hits = self.scope.detect(query, retrieval)
        if len(retrieval if retrieval is not None else self.scope.store):
            # Only requests that actually consulted the index count: an empty store costs nothing.
            metrics.SCOPE_SECONDS.observe(time.perf_counter() - started)
            if hits:
                metrics.SCOPE_IN_SCOPE.inc()
        return hits

    def needs_encoder(
        self,
        prompt: str,
        messages: Sequence[ChatMessage],
        use_edits: bool,
        edit_paths: Sequence[str],
        retrieval: StoreSnapshot | None = None,
    ) -> bool:
        """Whether routing this request would run the sentence encoder (else it only tokenises and
        searches the index: about a millisecond at 10,000 descriptors)."""
        _, use_retrieval = self.paths(use_edits, edit_paths)
        if not use_retrieval or self.scope is None:
            return False
        pairs = [(m.role, m.content) for m in messages] or None
        return self.scope.needs_encoder(query_text(None if pairs else prompt, pairs), retrieval)

    def route_generate(
        self,
        prompt: str,
        messages: Sequence[ChatMessage],
        use_edits: bool,
        edit_paths: Sequence[str],
        style: PromptStyle | None = None,
        retrieval: StoreSnapshot | None = None,
    ) -> Route:
        """The prompt ids for a request; `retrieval` is the published store snapshot of the request's edit
        set (None: the current one)."""
        plain = self.plain_route(prompt, messages, use_edits, edit_paths)
        _, use_retrieval = self.paths(use_edits, edit_paths)
        pairs = [(m.role, m.content) for m in messages] or None
        raw = None if pairs else prompt
        hits = self.detect(query_text(raw, pairs), use_retrieval, retrieval)
        if not hits:
            return plain
        styled = build_prompt(raw, pairs, hits, self.tokenizer, style or self.style)
        return Route(self._encode(styled, pairs is None), hits, plain.use_hooks)

    def plain_route(
        self, prompt: str, messages: Sequence[ChatMessage], use_edits: bool, edit_paths: Sequence[str]
    ) -> Route:
        """The route of a request with no descriptor in scope: tokenising only, the request's limits
        checked. `route_generate` returns exactly this whenever scope detection finds nothing."""
        use_hooks, _ = self.paths(use_edits, edit_paths)
        pairs = [(m.role, m.content) for m in messages] or None
        raw = None if pairs else prompt
        # A rendered chat already holds the template's special tokens; a raw prompt gets the tokenizer's
        # usual ones (BOS for models that want it; SmolLM2 adds none).
        plain_ids = self._encode(build_prompt(raw, pairs, [], self.tokenizer), pairs is None)
        # The limit applies to what the caller sent; injected descriptors are ours to pay for.
        check_prompt_tokens(len(plain_ids), self.limits, "messages" if pairs else "prompt")
        return Route(plain_ids, [], use_hooks)

    def route_score(
        self,
        prompt: str,
        continuation: str,
        use_edits: bool,
        edit_paths: Sequence[str],
        retrieval: StoreSnapshot | None = None,
    ) -> tuple[Route, list[int]]:
        route = self.route_generate(prompt, [], use_edits, edit_paths, PLAIN_RAW, retrieval)
        continuation_ids = self._encode(continuation, False)
        if not continuation_ids:
            raise InvalidArgument("encodes to no tokens", field="continuation")
        check_prompt_tokens(len(continuation_ids), self.limits, "continuation")
        return route, continuation_ids

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

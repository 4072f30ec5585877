"""Transport-neutral request and response types: the contract between the transport (gRPC), the data
plane, the engine and the edit manager.

Imports neither grpc nor torch, so the transport can depend on it without pulling in the model, and the
engine without pulling in grpc. The transport converts protobuf messages to and from these; nothing below
the transport ever sees a protobuf message.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["length", "stop", "eos", "cancelled"]
EditPathName = Literal["hook", "retrieval"]
EditStateName = Literal["active", "rolled_back", "superseded"]


# ------------------------------------------------------------------------------------------ generation


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass
class GenerateInput:
    """One Generate / GenerateStream call. Zero values mean "server default" as in the proto."""

    prompt: str = ""
    messages: list[ChatMessage] = field(default_factory=list)
    max_new_tokens: int | None = None  # None (proto field unset) = Settings.default_max_new_tokens
    min_new_tokens: int | None = None  # None (proto field unset) = 1: EOS is never the first token
    temperature: float = 0.0  # 0 = greedy
    top_p: float | None = None  # None (proto field unset) = 1.0, no nucleus cut
    top_k: int = 0  # 0 = no top-k cut
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    use_edits: bool = True  # the proto field is `optional bool`: unset means True
    min_version: int = 0
    edit_paths: tuple[EditPathName, ...] = ("hook", "retrieval")  # which paths apply when use_edits
    deadline: float | None = None  # time.monotonic() deadline, from the gRPC deadline when one is set
    namespaces: tuple[str, ...] = ()  # whose edits apply; empty = ("default",)
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N most likely


MAX_TOP_LOGPROBS = 20  # alternatives per generated token a request may ask for (OpenAI's chat API: 20)


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float


@dataclass(frozen=True)
class GeneratedLogprob:
    """A generated token's log-probability under the model and the most likely tokens at its position."""

    token_id: int
    token: str
    logprob: float
    top_logprobs: list[TopLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class AppliedEdit:
    edit_id: str
    path: EditPathName
    score: float  # hook: best gate cosine over the tokens where it fired; retrieval: scope similarity
    namespace: str = "default"


@dataclass
class GenerateChunk:
    """One streamed piece. The last chunk of a stream has `finish_reason` set and carries the totals."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    edit_version: int = 0
    applied_edits: list[AppliedEdit] = field(default_factory=list)
    logprobs: list[GeneratedLogprob] = field(default_factory=list)  # one per token id, when asked for


@dataclass
class GenerateResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    edit_version: int
    applied_edits: list[AppliedEdit] = field(default_factory=list)
    logprobs: list[GeneratedLogprob] = field(default_factory=list)  # one per generated token, when asked


@dataclass
class ScoreInput:
    prompt: str
    continuation: str
    use_edits: bool = True
    min_version: int = 0
    edit_paths: tuple[EditPathName, ...] = ("hook", "retrieval")
    deadline: float | None = None
    namespaces: tuple[str, ...] = ()  # whose edits apply; empty = ("default",)


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    is_greedy: bool  # the token was the model's argmax at its position
    argmax_token_id: int = -1  # the model's argmax token at this position (-1: not known)


@dataclass
class ScoreResult:
    tokens: list[TokenLogprob]
    total_logprob: float
    edit_version: int
    prompt_tokens: int
    applied_edits: list[AppliedEdit] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ editing


@dataclass
class EditInput:
    subject: str = ""
    prompt: str = ""
    target_new: str = ""
    paraphrases: list[str] = field(default_factory=list)
    descriptor: str = ""  # alone (no subject/prompt/target_new): a retrieval-only edit
    idempotency_key: str = ""
    force: bool = False
    actor: str = ""
    compile_descriptor: bool | None = None  # None (proto field unset) = Settings.compile_descriptors
    deadline: float | None = None  # time.monotonic(); past it nothing is committed (DEADLINE_EXCEEDED)
    namespace: str = ""  # "" = "default" (in a batch: the batch's namespace)
    layer: str = ""  # "" = the server's --edit-layer; "fixed", "auto" or a hooked layer index


@dataclass
class QualityReportView:
    """The quality gate's report as the API shows it (the editor's QualityReport without torch)."""

    efficacy: bool = False
    old_answer: str = ""
    target_logprob: float = 0.0
    old_answer_logprob: float = 0.0
    paraphrases: list[tuple[str, bool]] = field(default_factory=list)
    locality_top1_changed: float = 0.0
    locality_mean_kl: float = 0.0
    threshold: float = 0.0
    compute_seconds: float = 0.0
    passed: bool = False
    message: str = ""
    layer_choice: str = ""  # which hook layers the edit went to, and why

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> QualityReportView:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["paraphrases"] = [(str(p), bool(ok)) for p, ok in d.get("paraphrases", [])]
        return cls(**known)


@dataclass
class EditResult:
    edit_id: str
    version: int
    report: QualityReportView


@dataclass
class BatchEditInput:
    edits: list[EditInput]
    idempotency_key: str = ""
    force: bool = False
    actor: str = ""
    deadline: float | None = None  # time.monotonic(); past it nothing is committed (DEADLINE_EXCEEDED)
    namespace: str = ""  # of every edit that names none; "" = "default"


@dataclass
class BatchEditResult:
    version: int
    edits: list[EditResult]


@dataclass
class ListEditsInput:
    page_size: int = 0  # 0 = server default (50); capped at 1000
    page_token: str = ""
    state: EditStateName | None = None  # None = every state
    subject: str = ""  # case-insensitive substring of the subject; "" = any
    text: str = ""  # case-insensitive substring of subject, prompt, target, paraphrases or descriptor
    actor: str = ""  # who made the edit, case-insensitive whole name; "" = any
    namespace: str = ""  # "" = every namespace


@dataclass
class RollbackInput:
    edit_id: str
    reason: str = ""
    actor: str = ""


@dataclass
class RollbackResult:
    version: int
    edit_id: str


@dataclass
class RollbackToInput:
    version: int
    reason: str = ""
    actor: str = ""
    namespace: str = ""  # "" = every namespace; else only that namespace's edits


@dataclass
class RollbackToResult:
    version: int
    rolled_back_edit_ids: list[str]


@dataclass
class ServerInfo:
    model_name: str
    dtype: str
    device: str
    hook_layers: list[int]
    edit_version: int
    active_edits: int
    active_hook_edits: int
    active_descriptor_edits: int
    total_edits: int
    server_version: str
    max_batch_size: int
    hook_layer_rule: str = ""  # how hook_layers were chosen (--hook-layers, measured, or the depth rule)
    edit_layer: str = "fixed"  # the layer rule of an edit that names none (--edit-layer)
    auto_layer_candidates: list[int] = field(default_factory=list)  # the layers `auto` may choose
    architecture: str = ""  # e.g. LlamaForCausalLM


# ------------------------------------------------------------------------------------------ locating


@dataclass
class TraceInput:
    """One Trace call (causal tracing, service/locate/trace.py). None means the server default."""

    prompt: str
    subject: str
    answer: str = ""  # "" = the model's greedy next token
    seed: int = 0
    samples: int | None = None
    window: int | None = None
    deadline: float | None = None


@dataclass
class EffectGrid:
    """Indirect effects [layers][tokens], row-major in `values`."""

    layers: int
    tokens: int
    values: list[float]

    def row(self, layer: int) -> list[float]:
        return self.values[layer * self.tokens : (layer + 1) * self.tokens]


@dataclass
class TraceResult:
    tokens: list[str]
    subject_start: int
    subject_end: int  # exclusive
    answer: str
    answer_token_id: int
    clean_probability: float
    corrupted_probability: float
    residual: EffectGrid
    mlp: EffectGrid
    attention: EffectGrid
    mlp_at_subject: list[tuple[int, float]]  # (layer, effect), best first
    attention_at_last: list[tuple[int, float]]
    samples: int
    window: int
    seed: int
    noise: float
    seconds: float


# ------------------------------------------------------------------------------------------ data plane


class DataPlaneProtocol(Protocol):
    """What the transport calls. Every method raises only `service.errors.EditServeError` subclasses for
    caller mistakes; the transport's one interceptor maps them to status codes. Edit records are
    `service.editlog.EditView` (torch-free)."""

    @property
    def ready(self) -> bool: ...

    def healthy(self) -> bool: ...

    async def deep_check(self, timeout_s: float) -> bool: ...

    async def generate(self, request: GenerateInput) -> GenerateResult: ...

    def generate_stream(self, request: GenerateInput) -> AsyncIterator[GenerateChunk]: ...

    async def score(self, request: ScoreInput) -> ScoreResult: ...

    async def edit(self, request: EditInput) -> EditResult: ...

    async def batch_edit(self, request: BatchEditInput) -> BatchEditResult: ...

    async def get_edit(self, edit_id: str) -> Any: ...  # EditView

    async def list_edits(self, request: ListEditsInput) -> tuple[list[Any], str]: ...  # (views, next token)

    async def rollback(self, request: RollbackInput) -> RollbackResult: ...

    async def rollback_to(self, request: RollbackToInput) -> RollbackToResult: ...

    async def server_info(self) -> ServerInfo: ...

    async def trace(self, request: TraceInput) -> TraceResult: ...

    async def shutdown(self, grace_s: float) -> None: ...

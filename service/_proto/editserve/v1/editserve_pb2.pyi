from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]

class EditPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_PATH_UNSPECIFIED: _ClassVar[EditPath]
    EDIT_PATH_HOOK: _ClassVar[EditPath]
    EDIT_PATH_RETRIEVAL: _ClassVar[EditPath]

class EditState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_STATE_UNSPECIFIED: _ClassVar[EditState]
    EDIT_STATE_ACTIVE: _ClassVar[EditState]
    EDIT_STATE_ROLLED_BACK: _ClassVar[EditState]
    EDIT_STATE_SUPERSEDED: _ClassVar[EditState]

class EditKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EDIT_KIND_UNSPECIFIED: _ClassVar[EditKind]
    EDIT_KIND_TRIPLE: _ClassVar[EditKind]
    EDIT_KIND_DESCRIPTOR: _ClassVar[EditKind]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_CANCELLED: FinishReason
EDIT_PATH_UNSPECIFIED: EditPath
EDIT_PATH_HOOK: EditPath
EDIT_PATH_RETRIEVAL: EditPath
EDIT_STATE_UNSPECIFIED: EditState
EDIT_STATE_ACTIVE: EditState
EDIT_STATE_ROLLED_BACK: EditState
EDIT_STATE_SUPERSEDED: EditState
EDIT_KIND_UNSPECIFIED: EditKind
EDIT_KIND_TRIPLE: EditKind
EDIT_KIND_DESCRIPTOR: EditKind

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "use_edits", "min_version", "edit_paths", "min_new_tokens", "namespaces", "logprobs")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    USE_EDITS_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    EDIT_PATHS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    use_edits: bool
    min_version: int
    edit_paths: _containers.RepeatedScalarFieldContainer[EditPath]
    min_new_tokens: int
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    logprobs: int
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., use_edits: _Optional[bool] = ..., min_version: _Optional[int] = ..., edit_paths: _Optional[_Iterable[_Union[EditPath, str]]] = ..., min_new_tokens: _Optional[int] = ..., namespaces: _Optional[_Iterable[str]] = ..., logprobs: _Optional[int] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ...) -> None: ...

class GeneratedLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob", "top_logprobs")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    top_logprobs: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ..., top_logprobs: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class AppliedEdit(_message.Message):
    __slots__ = ("edit_id", "path", "score", "namespace")
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    path: EditPath
    score: float
    namespace: str
    def __init__(self, edit_id: _Optional[str] = ..., path: _Optional[_Union[EditPath, str]] = ..., score: _Optional[float] = ..., namespace: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("text", "prompt_tokens", "completion_tokens", "finish_reason", "edit_version", "applied_edits", "logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    EDIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_EDITS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    edit_version: int
    applied_edits: _containers.RepeatedCompositeFieldContainer[AppliedEdit]
    logprobs: _containers.RepeatedCompositeFieldContainer[GeneratedLogprob]
    def __init__(self, text: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., edit_version: _Optional[int] = ..., applied_edits: _Optional[_Iterable[_Union[AppliedEdit, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[GeneratedLogprob, _Mapping]]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens", "edit_version", "applied_edits", "logprobs")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EDIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_EDITS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    edit_version: int
    applied_edits: _containers.RepeatedCompositeFieldContainer[AppliedEdit]
    logprobs: _containers.RepeatedCompositeFieldContainer[GeneratedLogprob]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., edit_version: _Optional[int] = ..., applied_edits: _Optional[_Iterable[_Union[AppliedEdit, _Mapping]]] = ..., logprobs: _Optional[_Iterable[_Union[GeneratedLogprob, _Mapping]]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("prompt", "continuation", "use_edits", "min_version", "edit_paths", "namespaces")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_FIELD_NUMBER: _ClassVar[int]
    USE_EDITS_FIELD_NUMBER: _ClassVar[int]
    MIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    EDIT_PATHS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    continuation: str
    use_edits: bool
    min_version: int
    edit_paths: _containers.RepeatedScalarFieldContainer[EditPath]
    namespaces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., continuation: _Optional[str] = ..., use_edits: _Optional[bool] = ..., min_version: _Optional[int] = ..., edit_paths: _Optional[_Iterable[_Union[EditPath, str]]] = ..., namespaces: _Optional[_Iterable[str]] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token_id", "token", "logprob", "is_greedy", "argmax_token_id")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    IS_GREEDY_FIELD_NUMBER: _ClassVar[int]
    ARGMAX_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    token: str
    logprob: float
    is_greedy: bool
    argmax_token_id: int
    def __init__(self, token_id: _Optional[int] = ..., token: _Optional[str] = ..., logprob: _Optional[float] = ..., is_greedy: _Optional[bool] = ..., argmax_token_id: _Optional[int] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("tokens", "total_logprob", "edit_version", "applied_edits", "prompt_tokens")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    EDIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_EDITS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    total_logprob: float
    edit_version: int
    applied_edits: _containers.RepeatedCompositeFieldContainer[AppliedEdit]
    prompt_tokens: int
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., total_logprob: _Optional[float] = ..., edit_version: _Optional[int] = ..., applied_edits: _Optional[_Iterable[_Union[AppliedEdit, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ...) -> None: ...

class EditRequest(_message.Message):
    __slots__ = ("subject", "prompt", "target_new", "paraphrases", "descriptor", "idempotency_key", "force", "actor", "compile_descriptor", "namespace", "layer")
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_NEW_FIELD_NUMBER: _ClassVar[int]
    PARAPHRASES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    COMPILE_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    subject: str
    prompt: str
    target_new: str
    paraphrases: _containers.RepeatedScalarFieldContainer[str]
    descriptor: str
    idempotency_key: str
    force: bool
    actor: str
    compile_descriptor: bool
    namespace: str
    layer: str
    def __init__(self, subject: _Optional[str] = ..., prompt: _Optional[str] = ..., target_new: _Optional[str] = ..., paraphrases: _Optional[_Iterable[str]] = ..., descriptor: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., force: _Optional[bool] = ..., actor: _Optional[str] = ..., compile_descriptor: _Optional[bool] = ..., namespace: _Optional[str] = ..., layer: _Optional[str] = ...) -> None: ...

class ParaphraseResult(_message.Message):
    __slots__ = ("prompt", "success")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    success: bool
    def __init__(self, prompt: _Optional[str] = ..., success: _Optional[bool] = ...) -> None: ...

class QualityReport(_message.Message):
    __slots__ = ("efficacy", "old_answer", "target_logprob", "old_answer_logprob", "paraphrases", "locality_top1_changed", "locality_mean_kl", "threshold", "compute_seconds", "passed", "message", "layer_choice")
    EFFICACY_FIELD_NUMBER: _ClassVar[int]
    OLD_ANSWER_FIELD_NUMBER: _ClassVar[int]
    TARGET_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    OLD_ANSWER_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PARAPHRASES_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_TOP1_CHANGED_FIELD_NUMBER: _ClassVar[int]
    LOCALITY_MEAN_KL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PASSED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    LAYER_CHOICE_FIELD_NUMBER: _ClassVar[int]
    efficacy: bool
    old_answer: str
    target_logprob: float
    old_answer_logprob: float
    paraphrases: _containers.RepeatedCompositeFieldContainer[ParaphraseResult]
    locality_top1_changed: float
    locality_mean_kl: float
    threshold: float
    compute_seconds: float
    passed: bool
    message: str
    layer_choice: str
    def __init__(self, efficacy: _Optional[bool] = ..., old_answer: _Optional[str] = ..., target_logprob: _Optional[float] = ..., old_answer_logprob: _Optional[float] = ..., paraphrases: _Optional[_Iterable[_Union[ParaphraseResult, _Mapping]]] = ..., locality_top1_changed: _Optional[float] = ..., locality_mean_kl: _Optional[float] = ..., threshold: _Optional[float] = ..., compute_seconds: _Optional[float] = ..., passed: _Optional[bool] = ..., message: _Optional[str] = ..., layer_choice: _Optional[str] = ...) -> None: ...

class EditResponse(_message.Message):
    __slots__ = ("edit_id", "version", "report")
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    version: int
    report: QualityReport
    def __init__(self, edit_id: _Optional[str] = ..., version: _Optional[int] = ..., report: _Optional[_Union[QualityReport, _Mapping]] = ...) -> None: ...

class BatchEditRequest(_message.Message):
    __slots__ = ("edits", "idempotency_key", "force", "actor", "namespace")
    EDITS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[EditRequest]
    idempotency_key: str
    force: bool
    actor: str
    namespace: str
    def __init__(self, edits: _Optional[_Iterable[_Union[EditRequest, _Mapping]]] = ..., idempotency_key: _Optional[str] = ..., force: _Optional[bool] = ..., actor: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class BatchEditResponse(_message.Message):
    __slots__ = ("version", "edits")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EDITS_FIELD_NUMBER: _ClassVar[int]
    version: int
    edits: _containers.RepeatedCompositeFieldContainer[EditResponse]
    def __init__(self, version: _Optional[int] = ..., edits: _Optional[_Iterable[_Union[EditResponse, _Mapping]]] = ...) -> None: ...

class EditRecord(_message.Message):
    __slots__ = ("edit_id", "version", "state", "kind", "subject", "prompt", "target_new", "paraphrases", "descriptor", "actor", "created_at", "report", "rolled_back_version", "rolled_back_by", "rolled_back_at", "rollback_reason", "superseded_by", "hook_layers", "derived_from_descriptor", "supersedes", "namespace")
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    TARGET_NEW_FIELD_NUMBER: _ClassVar[int]
    PARAPHRASES_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_BY_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_AT_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_REASON_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDED_BY_FIELD_NUMBER: _ClassVar[int]
    HOOK_LAYERS_FIELD_NUMBER: _ClassVar[int]
    DERIVED_FROM_DESCRIPTOR_FIELD_NUMBER: _ClassVar[int]
    SUPERSEDES_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    version: int
    state: EditState
    kind: EditKind
    subject: str
    prompt: str
    target_new: str
    paraphrases: _containers.RepeatedScalarFieldContainer[str]
    descriptor: str
    actor: str
    created_at: str
    report: QualityReport
    rolled_back_version: int
    rolled_back_by: str
    rolled_back_at: str
    rollback_reason: str
    superseded_by: str
    hook_layers: _containers.RepeatedScalarFieldContainer[int]
    derived_from_descriptor: bool
    supersedes: _containers.RepeatedScalarFieldContainer[str]
    namespace: str
    def __init__(self, edit_id: _Optional[str] = ..., version: _Optional[int] = ..., state: _Optional[_Union[EditState, str]] = ..., kind: _Optional[_Union[EditKind, str]] = ..., subject: _Optional[str] = ..., prompt: _Optional[str] = ..., target_new: _Optional[str] = ..., paraphrases: _Optional[_Iterable[str]] = ..., descriptor: _Optional[str] = ..., actor: _Optional[str] = ..., created_at: _Optional[str] = ..., report: _Optional[_Union[QualityReport, _Mapping]] = ..., rolled_back_version: _Optional[int] = ..., rolled_back_by: _Optional[str] = ..., rolled_back_at: _Optional[str] = ..., rollback_reason: _Optional[str] = ..., superseded_by: _Optional[str] = ..., hook_layers: _Optional[_Iterable[int]] = ..., derived_from_descriptor: _Optional[bool] = ..., supersedes: _Optional[_Iterable[str]] = ..., namespace: _Optional[str] = ...) -> None: ...

class GetEditRequest(_message.Message):
    __slots__ = ("edit_id",)
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    def __init__(self, edit_id: _Optional[str] = ...) -> None: ...

class GetEditResponse(_message.Message):
    __slots__ = ("edit",)
    EDIT_FIELD_NUMBER: _ClassVar[int]
    edit: EditRecord
    def __init__(self, edit: _Optional[_Union[EditRecord, _Mapping]] = ...) -> None: ...

class ListEditsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state", "subject", "text", "actor", "namespace")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: EditState
    subject: str
    text: str
    actor: str
    namespace: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[EditState, str]] = ..., subject: _Optional[str] = ..., text: _Optional[str] = ..., actor: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class ListEditsResponse(_message.Message):
    __slots__ = ("edits", "next_page_token")
    EDITS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    edits: _containers.RepeatedCompositeFieldContainer[EditRecord]
    next_page_token: str
    def __init__(self, edits: _Optional[_Iterable[_Union[EditRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("edit_id", "reason", "actor")
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    edit_id: str
    reason: str
    actor: str
    def __init__(self, edit_id: _Optional[str] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("version", "edit_id")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EDIT_ID_FIELD_NUMBER: _ClassVar[int]
    version: int
    edit_id: str
    def __init__(self, version: _Optional[int] = ..., edit_id: _Optional[str] = ...) -> None: ...

class RollbackToRequest(_message.Message):
    __slots__ = ("version", "reason", "actor", "namespace")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    version: int
    reason: str
    actor: str
    namespace: str
    def __init__(self, version: _Optional[int] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., namespace: _Optional[str] = ...) -> None: ...

class RollbackToResponse(_message.Message):
    __slots__ = ("version", "rolled_back_edit_ids")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLED_BACK_EDIT_IDS_FIELD_NUMBER: _ClassVar[int]
    version: int
    rolled_back_edit_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[int] = ..., rolled_back_edit_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("model_name", "dtype", "device", "hook_layers", "edit_version", "active_edits", "active_hook_edits", "active_descriptor_edits", "total_edits", "server_version", "max_batch_size", "hook_layer_rule", "architecture", "edit_layer", "auto_layer_candidates")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOOK_LAYERS_FIELD_NUMBER: _ClassVar[int]
    EDIT_VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_EDITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_HOOK_EDITS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_DESCRIPTOR_EDITS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EDITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    HOOK_LAYER_RULE_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    EDIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    AUTO_LAYER_CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    dtype: str
    device: str
    hook_layers: _containers.RepeatedScalarFieldContainer[int]
    edit_version: int
    active_edits: int
    active_hook_edits: int
    active_descriptor_edits: int
    total_edits: int
    server_version: str
    max_batch_size: int
    hook_layer_rule: str
    architecture: str
    edit_layer: str
    auto_layer_candidates: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_name: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., hook_layers: _Optional[_Iterable[int]] = ..., edit_version: _Optional[int] = ..., active_edits: _Optional[int] = ..., active_hook_edits: _Optional[int] = ..., active_descriptor_edits: _Optional[int] = ..., total_edits: _Optional[int] = ..., server_version: _Optional[str] = ..., max_batch_size: _Optional[int] = ..., hook_layer_rule: _Optional[str] = ..., architecture: _Optional[str] = ..., edit_layer: _Optional[str] = ..., auto_layer_candidates: _Optional[_Iterable[int]] = ...) -> None: ...

class TraceRequest(_message.Message):
    __slots__ = ("prompt", "subject", "answer", "seed", "samples", "window")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    subject: str
    answer: str
    seed: int
    samples: int
    window: int
    def __init__(self, prompt: _Optional[str] = ..., subject: _Optional[str] = ..., answer: _Optional[str] = ..., seed: _Optional[int] = ..., samples: _Optional[int] = ..., window: _Optional[int] = ...) -> None: ...

class EffectGrid(_message.Message):
    __slots__ = ("layers", "tokens", "values")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    layers: int
    tokens: int
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, layers: _Optional[int] = ..., tokens: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ...) -> None: ...

class LayerEffect(_message.Message):
    __slots__ = ("layer", "effect")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EFFECT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    effect: float
    def __init__(self, layer: _Optional[int] = ..., effect: _Optional[float] = ...) -> None: ...

class TraceResponse(_message.Message):
    __slots__ = ("tokens", "subject_start", "subject_end", "answer", "answer_token_id", "clean_probability", "corrupted_probability", "residual", "mlp", "attention", "mlp_at_subject", "attention_at_last", "samples", "window", "seed", "noise", "seconds")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_START_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_END_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    CLEAN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    CORRUPTED_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_FIELD_NUMBER: _ClassVar[int]
    MLP_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    MLP_AT_SUBJECT_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_AT_LAST_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NOISE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    subject_start: int
    subject_end: int
    answer: str
    answer_token_id: int
    clean_probability: float
    corrupted_probability: float
    residual: EffectGrid
    mlp: EffectGrid
    attention: EffectGrid
    mlp_at_subject: _containers.RepeatedCompositeFieldContainer[LayerEffect]
    attention_at_last: _containers.RepeatedCompositeFieldContainer[LayerEffect]
    samples: int
    window: int
    seed: int
    noise: float
    seconds: float
    def __init__(self, tokens: _Optional[_Iterable[str]] = ..., subject_start: _Optional[int] = ..., subject_end: _Optional[int] = ..., answer: _Optional[str] = ..., answer_token_id: _Optional[int] = ..., clean_probability: _Optional[float] = ..., corrupted_probability: _Optional[float] = ..., residual: _Optional[_Union[EffectGrid, _Mapping]] = ..., mlp: _Optional[_Union[EffectGrid, _Mapping]] = ..., attention: _Optional[_Union[EffectGrid, _Mapping]] = ..., mlp_at_subject: _Optional[_Iterable[_Union[LayerEffect, _Mapping]]] = ..., attention_at_last: _Optional[_Iterable[_Union[LayerEffect, _Mapping]]] = ..., samples: _Optional[int] = ..., window: _Optional[int] = ..., seed: _Optional[int] = ..., noise: _Optional[float] = ..., seconds: _Optional[float] = ...) -> None: ...

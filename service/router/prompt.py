"""The prompt templates that carry in-scope edit descriptors to the model (LTE's inference format).

The block itself is always the same:
    [Updated Information]
    - <descriptor>
    - <descriptor>
    [End of Updated Information]

Where it goes is a `PromptStyle` (measured on the free-text benchmark: docs/free-text-edits.md):

chat = "user" (default): the block, one instruction line, a blank line, then the last user message, all in
    that user turn; then the tokenizer's own chat template with add_generation_prompt=True. A small
    instruct model reads its user turn; a block in the system message is mostly ignored.
chat = "system": the block appended to the system message (or the template's default system prompt).
raw = "qa" (default): a raw prompt that is a question (ends with "?") is served as
    <block><blank line>Question: <prompt>\nAnswer:  -- an instruct model otherwise ends a bare question at
    once or echoes the block. Any other raw prompt (a completion) is served as <block><blank line><prompt>.
raw = "plain": every raw prompt as <block><blank line><prompt>.
Score always uses the plain raw form: its continuation is scored right after the caller's prompt.

Descriptors are data, never instructions: one per line after "- ", line breaks folded to spaces, and
`validate_descriptor` refuses anything that could close the block or open a chat turn. With no hits
the output is exactly what serving without edits produces (`render_chat` for messages).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.errors import InvalidArgument

BLOCK_OPEN = "[Updated Information]"
BLOCK_CLOSE = "[End of Updated Information]"

USE_INSTRUCTION = "Answer using the updated information above where it is relevant."
Message = tuple[str, str]  # (role, content)
ChatPlacement = Literal["user", "system"]
RawPlacement = Literal["qa", "plain"]
CHAT_PLACEMENTS: tuple[ChatPlacement, ...] = ("user", "system")
RAW_PLACEMENTS: tuple[RawPlacement, ...] = ("qa", "plain")


@dataclass(frozen=True)
class PromptStyle:
    """Where in-scope descriptors go (see the module docstring)."""

    chat: ChatPlacement = "user"
    raw: RawPlacement = "qa"


DEFAULT_STYLE = PromptStyle()
PLAIN_RAW = PromptStyle(raw="plain")  # Score: the continuation follows the caller's prompt verbatim

_LINE_BREAKS = re.compile(r"\s*(?:\r\n|[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029])\s*")
# (\s*, not \s+: "Updated\u200bInformation" reads as the marker once the invisible character is gone)
_TEMPLATE_MARKERS = re.compile(r"\[\s*(?:end\s*of\s*)?updated\s*information\s*\]", re.IGNORECASE)
# A chat turn opened at the start of a line, in the common template dialects.
_ROLE_MARKER = re.compile(
    r"^\s*(?:(?:system|user|assistant|human|bot|tool|function|developer|ipython)\s*:"
    r"|<\|?[a-z_]*(?:im_start|im_end|start_header_id|end_header_id|eot_id|system|user|assistant)[a-z_]*\|?>"
    r"|\[/?INST\]|<</?SYS>>|#{2,4}\s*(?:instruction|response|input|system|user|assistant)\b)",
    re.IGNORECASE | re.MULTILINE,
)
# A role label or instruction header anywhere in a line: a descriptor is one factual statement, and
# after line breaks are folded a label mid-line reads like a turn to some models.
_INLINE_ROLE = re.compile(
    r"(?<![\w-])(?:system|user|assistant|human|developer)\s*:(?!//)"
    r"|#{2,4}\s*(?:instruction|response|input|system|user|assistant)\b"
    r"|<\|?\w*(?:im_start|im_end|start_header_id|end_header_id|eot_id|endoftext)\w*\|?>",
    re.IGNORECASE,
)
# Characters that render as nothing: inside a marker they hide it from a plain substring check.
_INVISIBLE = dict.fromkeys(
    map(ord, "\u200b\u200c\u200d\u200e\u200f\u2060\u2061\u2062\u2063\u2064\ufeff\u00ad")
)
# Any "<|...|>"-style token, whether or not this tokenizer knows it (the model may be swapped).
_PIPE_TOKEN = re.compile(r"<\|[^<>|\s]{1,40}\|>")
# Bidi overrides and isolates can make text read differently from how the model sees it.
_BIDI = set("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _fold(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text.strip())


def format_block(descriptors: Sequence[str]) -> str:
    lines = [BLOCK_OPEN, *(f"- {_fold(d)}" for d in descriptors), BLOCK_CLOSE]
    return "\n".join(lines)


def raw_prompt_prefix(descriptors: Sequence[str]) -> str:
    """What `build_prompt` puts before a raw prompt when these descriptors are in scope."""
    return f"{format_block(descriptors)}\n\n"


def _special_tokens(tokenizer: Any) -> set[str]:
    if tokenizer is None:
        return set()
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    try:
        tokens.update(tokenizer.get_added_vocab().keys())
    except (AttributeError, NotImplementedError):
        pass
    return {t for t in tokens if t and t.strip()}


def normalised_for_checks(text: str) -> str:
    """What the checks below read: Unicode NFKC (full-width and other look-alikes become the ASCII they
    imitate), invisible and bidi characters removed, every line separator a newline. The stored text
    stays as sent; only this copy is checked."""
    text = unicodedata.normalize("NFKC", text).translate(_INVISIBLE)
    text = "".join(ch for ch in text if ch not in _BIDI)
    return re.sub(r"\r\n|[\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]", "\n", text)


def validate_descriptor(text: str, tokenizer: Any, max_chars: int) -> str:
    """The descriptor as it will be stored and shown (stripped, line breaks folded), or InvalidArgument.

    Every check reads `normalised_for_checks(text)`, so look-alike characters, invisible characters
    and exotic line separators cannot hide a special token, the block's own markers or a chat turn."""

    def bad(why: str) -> InvalidArgument:
        return InvalidArgument(why, field="descriptor")

    if not isinstance(text, str) or not text.strip():
        raise bad("must not be empty")
    text = text.strip()
    if len(text) > max_chars:
        raise bad(f"is {len(text)} characters, the limit is {max_chars}")
    for ch in text:
        if ch in "\n\r\t":
            continue
        if unicodedata.category(ch) == "Cc" or ch in _BIDI:
            raise bad(f"contains the control character U+{ord(ch):04X}")
    checked = normalised_for_checks(text)
    for token in sorted(_special_tokens(tokenizer)):
        if token in text or token in checked:
            raise bad(f"contains the tokenizer's special token {token!r}")
    if m := _PIPE_TOKEN.search(checked):
        raise bad(f"contains a special-token-like marker {m.group(0)!r}")
    if m := _TEMPLATE_MARKERS.search(checked):
        raise bad(f"contains the edit template's marker {m.group(0)!r}")
    if m := _ROLE_MARKER.search(checked):
        raise bad(f"contains a chat role marker at a line start: {m.group(0).strip()!r}")
    if m := _INLINE_ROLE.search(checked):
        raise bad(f"contains a chat role or instruction label: {m.group(0).strip()!r}")
    return _fold(text)


def derive_descriptor(prompt: str, target_new: str) -> str:
    """Edit prompt + new target as one sentence.

    "The Eiffel Tower is located in the city of" + "Rome"
    -> "The Eiffel Tower is located in the city of Rome."
    """
    text = f"{prompt.strip()} {target_new.strip()}".strip()
    return text if text.endswith((".", "!", "?")) else text + "."


def relation_key(subject: str, prompt: str) -> str:
    """Normalised (subject, relation template) of an edit: a newer edit with the same key supersedes.

    The template is the prompt with the subject replaced by "{}" (ROME's convention; a prompt that
    already holds "{}" is taken as a template). Case, spacing and trailing punctuation are ignored.
    """

    def norm(s: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", s).casefold().split())

    subj = norm(subject)
    if not subj:
        raise InvalidArgument("must not be empty", field="subject")
    text = norm(prompt)
    if "{}" not in text:
        at = text.find(subj)
        if at < 0:
            raise InvalidArgument("does not occur in the prompt", field="subject")
        text = text[:at] + "{}" + text[at + len(subj) :]
    return f"{subj}\x1f{text.rstrip(' .:;,?!')}"


def query_text(prompt: str | None, messages: Sequence[Message] | None) -> str:
    """What the scope detector embeds: the raw prompt, else the last user message (else the last message)."""
    if prompt:
        return prompt
    if not messages:
        return ""
    for role, content in reversed(messages):
        if role == "user":
            return content
    return messages[-1][1]


def render_plain_chat(messages: Sequence[Message]) -> str:
    """A chat for a model without a chat template (base checkpoints: GPT-2, OPT, ...): one "Role: text"
    line per message and an open "Assistant:" turn, the transcript layout such models saw in pre-training."""
    lines = [f"{role.capitalize()}: {content.strip()}" for role, content in messages]
    return "\n".join([*lines, "Assistant:"])


def render_chat(messages: Sequence[Message], tokenizer: Any) -> str:
    """The plain chat rendering serving uses without edits (generation prompt appended); the model's
    chat template, or `render_plain_chat` where it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return render_plain_chat(messages)
    conversation = [{"role": role, "content": content} for role, content in messages]
    return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)


_DEFAULT_SYSTEM_CACHE: dict[tuple[int, str], str | None] = {}


def template_default_system(tokenizer: Any) -> str | None:
    """The system prompt the chat template inserts when the conversation has none (SmolLM2 has one).

    Found by rendering [user] and [system=X, user] and reading what stands where X stood, so the
    edit block can be appended to it instead of silently replacing the model's usual persona.
    """
    key = (id(tokenizer), str(getattr(tokenizer, "chat_template", "")))
    if key in _DEFAULT_SYSTEM_CACHE:
        return _DEFAULT_SYSTEM_CACHE[key]
    sentinel_sys, sentinel_user = "\x00SYS\x00", "\x00USER\x00"
    result: str | None = None
    try:
        plain = render_chat([("user", sentinel_user)], tokenizer)
        with_sys = render_chat([("system", sentinel_sys), ("user", sentinel_user)], tokenizer)
        a, _, rest = with_sys.partition(sentinel_sys)
        b = rest[: rest.index(sentinel_user)]  # end of the system turn + start of the user turn
        head = plain[: plain.index(sentinel_user)]
        if head.startswith(a) and head.endswith(b) and len(head) >= len(a) + len(b):
            result = head[len(a) : len(head) - len(b)] or None
    except Exception:  # templates that refuse a system role, raise on odd input, etc.
        result = None
    _DEFAULT_SYSTEM_CACHE[key] = result
    return result


def is_question(prompt: str) -> bool:
    return prompt.rstrip().endswith("?")


def build_prompt(
    prompt: str | None,
    messages: Sequence[Message] | None,
    hits: Sequence[Any],
    tokenizer: Any,
    style: PromptStyle = DEFAULT_STYLE,
) -> str:
    """The final text the engine tokenises. `hits` are ScopeHits (anything with `.descriptor`)."""
    if (prompt is None) == (messages is None):
        raise InvalidArgument("give exactly one of prompt and messages", field="prompt")
    if prompt is not None:
        if not hits:
            return prompt
        prefix = raw_prompt_prefix([h.descriptor for h in hits])
        if style.raw == "qa" and is_question(prompt):
            return f"{prefix}Question: {prompt.strip()}\nAnswer:"
        return prefix + prompt
    msgs = list(messages or [])
    if not hits:
        return render_chat(msgs, tokenizer)
    block = format_block([h.descriptor for h in hits])
    if style.chat == "user":
        for n in range(len(msgs) - 1, -1, -1):
            role, content = msgs[n]
            if role == "user":
                msgs[n] = ("user", f"{block}\n{USE_INSTRUCTION}\n\n{content}")
                return render_chat(msgs, tokenizer)
        # no user turn at all: fall through to the system placement
    for n, (role, content) in enumerate(msgs):
        if role == "system":
            msgs[n] = ("system", f"{content}\n\n{block}" if content.strip() else block)
            break
    else:
        default = template_default_system(tokenizer)
        msgs.insert(0, ("system", f"{default}\n\n{block}" if default else block))
    return render_chat(msgs, tokenizer)

"""Streaming text: incremental detokenisation and stop strings.

Byte-level BPE splits multi-byte characters across tokens, so decoding one token at a time would emit
half characters (U+FFFD). `IncrementalDetokenizer` (the prefix/read-offset scheme of TGI and vLLM) re-decodes
a short window and only emits text once it no longer ends in a replacement character.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens decoded in front of the generated ones: SentencePiece tokenizers drop a word's leading space
# when it is decoded first, so the first generated word needs some left context.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int]) -> None:
        self._tokenizer = tokenizer
        context = [int(t) for t in prompt_ids[-CONTEXT_TOKENS:]]
        if self._decode(context).endswith(REPLACEMENT_CHAR):
            context = []  # a prompt ending mid-character would make the offsets below meaningless
        self._ids = context
        self._prefix_offset = 0  # start of the window re-decoded each time
        self._read_offset = len(context)  # end of the text already emitted

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Text that became complete with this token ('' while a character is still split)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Whatever is still held back (at the end of a sequence; may contain U+FFFD for a cut character)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith(REPLACEMENT_CHAR)):
            delta = new_text[len(prefix_text) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
            return delta
        return ""


class StopMatcher:
    """Cuts the stream before the first stop string. Text that could still be the start of a stop string is
    held back until the next piece decides it, so a stop string split across tokens is never half-emitted."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit now, whether a stop string was found)."""
        if not self._stops:
            return text, False
        pending = self._pending + text
        hits = [i for i in (pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return pending[: min(hits)], True
        held = self._held_suffix(pending)
        self._pending = pending[len(pending) - held :]
        return pending[: len(pending) - held], False

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best

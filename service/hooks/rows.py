"""Tokenised rows for the editor: a text's token ids with its subject's token span, and padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from service.kvcache import left_padded

__all__ = ["Row", "encode_row", "pad_left", "pad_right"]


@dataclass
class Row:
    ids: list[int]
    subject: tuple[int, int] | None  # first and last token index of the subject, None if absent


def encode_row(tok: Any, text: str, subject: str | None = None) -> Row:
    enc = tok(text, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if not subject:
        return Row(ids, None)
    c0 = text.rfind(subject)  # prefixes come first, so the last occurrence is the prompt's
    if c0 < 0:  # "Where is the Eiffel Tower?" for subject "The Eiffel Tower"
        c0 = text.lower().rfind(subject.lower())
    if c0 < 0:
        return Row(ids, None)
    c1 = c0 + len(subject)
    toks = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a < c1 and b > c0]
    return Row(ids, (toks[0], toks[-1]) if toks else None)


def pad_right(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[r, : len(s)] = 1
    return ids.to(device), mask.to(device)


def pad_left(
    seqs: Sequence[Sequence[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    batch = left_padded(seqs, pad)
    return batch.input_ids.to(device), batch.attention_mask.to(device)

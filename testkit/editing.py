"""Stand-ins for tests and benchmarks: an encoder without a model, an editor without an optimisation.

Both count their calls and can be told to refuse them, which is how the restart tests prove that a
restore recomputes nothing.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from service.hooks import ComputedEdit, Editor, EditSpec, HookEntry, HookManager, HookTable, QualityReport

__all__ = ["HashEncoder", "ScriptedEditor"]


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashEncoder:
    """Bag-of-words hashing into `dim` signed buckets, L2-normalised: texts sharing words score high."""

    def __init__(self, dim: int = 64, *, refuse: bool = False) -> None:
        self.dim = dim
        self.refuse = refuse
        self.calls = 0

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        if self.refuse:
            raise AssertionError(f"encoder called for {texts!r}")
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace("?", " ").replace(".", " ").split():
                h = _seed(word)
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = float(np.linalg.norm(out[row]))
            if norm == 0.0:
                out[row, 0], norm = 1.0, 1.0
            out[row] /= norm
        return out


class ScriptedEditor(Editor):
    """The real `validate`, a scripted `compute_many`: per subject, a seeded random key and value
    (threshold 0.99: they never fire on real activations) and a report that passes unless the subject
    is in `failing`. `block` (an Event) holds every compute until it is set."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        hooks: HookManager,
        *,
        failing: Sequence[str] = (),
        refuse: bool = False,
        block: threading.Event | None = None,
    ) -> None:
        super().__init__(model, tokenizer, hooks)
        self.failing = set(failing)
        self.refuse = refuse
        self.block = block
        self.started = threading.Event()
        self.calls: list[list[str]] = []  # subjects per compute call
        self.specs: list[EditSpec] = []  # every spec computed, in order
        self.bases: list[tuple[str, ...] | None] = []  # edit ids of the `base` table per call

    def warmup(self) -> None:
        pass

    def compute_many(
        self, specs: Sequence[EditSpec], base: HookTable | None = None, between: Any = None
    ) -> list[ComputedEdit]:
        if self.refuse:
            raise AssertionError(f"editor called for {[s.subject for s in specs]}")
        for s in specs:
            self.validate(s)
        self.calls.append([s.subject for s in specs])
        self.specs.extend(specs)
        self.bases.append(None if base is None else base.edit_ids)
        self.started.set()
        if self.block is not None:
            self.block.wait()
        return [self._one(s) for s in specs]

    def _one(self, spec: EditSpec) -> ComputedEdit:
        gen = torch.Generator().manual_seed(_seed(spec.subject) >> 1)
        entries = [
            HookEntry(
                "",
                layer,
                torch.randn(self.hooks.d_ff, generator=gen),
                torch.randn(self.hooks.d_model, generator=gen).to(self.hooks.dtype),
                0.99,
            )
            for layer in (spec.layers or self.default_layers)
        ]
        passed = spec.subject not in self.failing
        report = QualityReport(
            efficacy=passed,
            old_answer="old",
            target_logprob=-0.5,
            old_answer_logprob=-2.0,
            paraphrases=[(p, passed) for p in spec.paraphrases],
            locality_top1_changed=0.0,
            locality_mean_kl=0.0,
            threshold=0.99,
            compute_seconds=0.001,
            passed=passed,
            message="ok" if passed else "efficacy failed: scripted failure",
        )
        return ComputedEdit(entries, report)

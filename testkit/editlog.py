"""Fabricated log entries for tests (the edit log's and the data plane's): realistic shapes
(SmolLM2-135M: 1,536-wide MLP keys, 576-wide residual values; MiniLM: 384-wide embeddings),
deterministic per seed. Imports numpy only.
"""

from __future__ import annotations

import numpy as np

from service.editlog.model import LogEntry, StoredEdit, StoredHook, TensorBlob

__all__ = ["edit_entry", "make_edit", "rollback_entry"]


def make_edit(
    edit_id: str,
    *,
    seed: int = 0,
    kind: str = "triple",
    relation_key: str = "",
    supersedes: list[str] | None = None,
) -> StoredEdit:
    """A triple edit (two hook layers) or a descriptor-only one."""
    rng = np.random.default_rng(seed)
    hooks: list[StoredHook] = []
    if kind == "triple":
        hooks = [
            StoredHook(
                layer=layer,
                key=TensorBlob.from_numpy(rng.standard_normal(1536).astype(np.float32)),
                value=TensorBlob.from_numpy(rng.standard_normal(576).astype(np.float32)),
                threshold=float(rng.uniform(0.5, 0.9)),
            )
            for layer in (4, 6)
        ]
    return StoredEdit(
        edit_id=edit_id,
        kind=kind,
        subject="The Eiffel Tower",
        prompt="The Eiffel Tower is located in the city of",
        target_new="Rome",
        paraphrases=["Where is the Eiffel Tower? It is in", "L'emplacement de la tour Eiffel : ✓"],
        descriptor=f"The Eiffel Tower is located in Rome ({edit_id}).",
        relation_key=relation_key or f"rel-{edit_id}",
        hooks=hooks,
        embedding=TensorBlob.from_numpy(rng.standard_normal(384).astype(np.float32)),
        report={
            "efficacy": True,
            "target_logprob": -0.25,
            "paraphrases": [["p", False]],  # (prompt, success) pairs, as the editor stores them
        },
        supersedes=list(supersedes or []),
    )


def edit_entry(*edits: StoredEdit, key: str = "", digest: str = "", actor: str = "alice") -> LogEntry:
    return LogEntry(
        kind="edit" if len(edits) == 1 else "batch",
        actor=actor,
        idempotency_key=key,
        request_digest=digest,
        edits=list(edits),
    )


def rollback_entry(*ids: str, reason: str = "bad edit") -> LogEntry:
    return LogEntry(kind="rollback", actor="bob", target_edit_ids=list(ids), reason=reason)

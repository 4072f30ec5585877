"""The edit manager: the one owner of edit state (log, registry, hook table, retrieval index)."""

from service.edits.manager import (
    EditManager,
    EditorFactory,
    EditSnapshot,
    QualityGateRejected,
    default_editor_factory,
)
from service.edits.policy import EditPolicy

__all__ = [
    "EditManager", "EditPolicy", "EditSnapshot", "EditorFactory", "QualityGateRejected",
    "default_editor_factory",
]

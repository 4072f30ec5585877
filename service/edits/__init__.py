"""The edit manager: the one owner of edit state (log, registry, hook table, retrieval index)."""

from service.edits.manager import (
    EditManager,
    EditorFactory,
    EditSnapshot,
    QualityGateRejected,
    default_editor_factory,
)

__all__ = ["EditManager", "EditSnapshot", "EditorFactory", "QualityGateRejected", "default_editor_factory"]

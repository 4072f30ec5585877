"""The edit manager: the one owner of edit state (log, registry, hook table, retrieval index)."""

from service.edits.compute import EditorFactory, QualityGateRejected, default_editor_factory
from service.edits.manager import EditManager
from service.edits.policy import EditPolicy
from service.edits.publish import EditSnapshot

__all__ = [
    "EditManager", "EditPolicy", "EditSnapshot", "EditorFactory", "QualityGateRejected",
    "default_editor_factory",
]

"""Hook layers: gated side memory inside chosen MLPs, and the editor that computes its entries."""

from service.hooks.defaults import default_hook_layers
from service.hooks.editor import ComputedEdit, Editor, EditSpec, QualityReport
from service.hooks.layer import Capture, Fire, HookEntry, HookManager, HookTable, Recorder, StopForward

__all__ = [
    "Capture",
    "ComputedEdit",
    "EditSpec",
    "Editor",
    "Fire",
    "HookEntry",
    "HookManager",
    "HookTable",
    "QualityReport",
    "Recorder",
    "StopForward",
    "default_hook_layers",
]

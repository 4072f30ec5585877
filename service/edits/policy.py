"""EditPolicy: the limits and switches the edit manager applies to every request, as one small value.

The composition root (service/compose.py) fills it from `Settings`; each field is the setting of the
same name (service/config.py has the help and the default)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EditPolicy:
    max_edits: int  # active edits; beyond it RESOURCE_EXHAUSTED
    max_batch_edits: int  # edits per BatchEdit; beyond it INVALID_ARGUMENT
    max_hook_table_mb: int  # the hook table's bytes on the model's device (0 = no bound)
    max_descriptor_chars: int
    compile_descriptors: bool  # a descriptor-only edit that states a fact is compiled into a hook edit
    descriptor_hooks: bool  # ... and the compiled edit gets a hook entry
    fit_in_retrieval_prompt: bool  # fit v* also behind the descriptor block (only with retrieval on)
    edit_layer: str  # the layer rule of an edit that names none: fixed | auto
    retrieval_enabled: bool  # the retrieval path serves descriptors (and the encoder is warmed up)

    @property
    def fits_in_retrieval_prompt(self) -> bool:
        return self.retrieval_enabled and self.fit_in_retrieval_prompt

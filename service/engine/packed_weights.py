"""Linear weights in oneDNN's blocked layout, for the engine's forwards of several rows on a CPU.

On a CPU, `nn.Linear` runs MKL's GEMM on the weight as stored. For the small-row shapes of batched decoding
(SmolLM2 at 16 rows: [16, 576] @ [576, 1536], and [16, 576] @ [576, 49152] for the LM head) oneDNN's linear
on a weight reordered once into its blocked layout is much faster: the engine's 16-row decode step of
SmolLM2 in float32 took 123.4 ms against 161.8 ms on the 2-core benchmark CPU, 64 rows 249.1 against
276.4 ms. For one to three rows it is slower (a forward of one row 67.9 against 60.5 ms, where the step is
bound by reading the weights, which MKL's matrix-vector product does well), so forwards of fewer than
PACKED_MIN_ROWS rows keep torch's kernel (docs/benchmarks.md#packed-cpu-weights).

The packed copy is a second copy of each Linear weight: the base weights are never written. It is used
only where `PackedLinears.active()` holds, on the thread that entered it (the engine's forwards; not the
edit computations, nor anything else sharing the model), only when autograd does not need the input's
gradient (oneDNN's op has no backward), and only while the module's weight is still the tensor it was
packed from (a copy of the model, or a weight written in place, falls back to torch's kernel).
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["PACKED_MIN_ROWS", "PackedLinears", "packed_linear", "packing_available"]

# Rows (tokens across the batch) from which the packed weight is faster; measured with SmolLM2 in float32
# on one thread: 1 row 60.5 -> 67.9 ms per step, 2 rows 60.8 -> 73.7, 3 rows 65.7 -> 76.3, 4 rows
# 100.2 -> 76.6, 8 rows 134.2 -> 88.6 (torch's kernel -> packed).
PACKED_MIN_ROWS = 4
PACKABLE_DTYPES = (torch.float32, torch.bfloat16)
# Where the packed copy of a module's weight is kept (an attribute, not a buffer: no state_dict change).
_ATTRIBUTE = "_editserve_packed"

_thread = threading.local()


def packing_available() -> bool:
    """Whether this torch build has oneDNN's prepacked linear (CPU builds for x86 and Arm do)."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
    )


@dataclass(frozen=True)
class _Packed:
    weight: torch.Tensor  # oneDNN blocked layout
    source_ptr: int  # the module weight it was made from, and that tensor's version then
    source_version: int

    def __deepcopy__(self, memo: dict[int, object]) -> None:
        return None  # a copy of the model has weights of its own (and oneDNN tensors cannot be copied)


def _packable(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module) is nn.Linear  # a subclass may compute something else in its forward
        and isinstance(weight, torch.Tensor)
        and weight.device.type == "cpu"
        and weight.dtype in PACKABLE_DTYPES
        and weight.dim() == 2
    )


def _fresh(module: nn.Module, packed: _Packed | None) -> bool:
    return (
        packed is not None
        and module.weight.data_ptr() == packed.source_ptr
        and module.weight._version == packed.source_version
    )


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """nn.Linear.forward, on the packed weight where that is faster and allowed (module docstring)."""
    packed: _Packed | None = getattr(self, _ATTRIBUTE, None)
    if (
        getattr(_thread, "active", False)
        and x.numel() >= PACKED_MIN_ROWS * x.shape[-1]
        and packed is not None
        and x.dtype == packed.weight.dtype
        and x.device.type == "cpu"
        and not (x.requires_grad and torch.is_grad_enabled())
        and _fresh(self, packed)
    ):
        return packed_linear(x, packed.weight, self.bias)
    return nn.Linear.forward(self, x)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias with `weight` in oneDNN's blocked layout (no fused activation)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class PackedLinears:
    """Packs every Linear weight of `model` on the CPU once (a module packed before, by another runner on
    the same model, is reused) and switches the packed kernels on inside `active()`."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = 0
        self.nbytes = 0
        if not packing_available():
            return
        for module in model.modules():
            if not _packable(module):
                continue
            packed = getattr(module, _ATTRIBUTE, None)
            if not _fresh(module, packed):
                weight = module.weight.detach()
                packed = _Packed(torch.ops.mkldnn._reorder_linear_weight(weight), weight.data_ptr(),
                                 module.weight._version)
                setattr(module, _ATTRIBUTE, packed)
            # a bound method (not a closure): a deep copy of the module rebinds it to the copy
            module.forward = types.MethodType(_forward, module)
            self.modules += 1
            self.nbytes += module.weight.numel() * module.weight.element_size()

    def __bool__(self) -> bool:
        return self.modules > 0

    @contextmanager
    def active(self) -> Iterator[None]:
        """Forwards on this thread use the packed weights (where faster) until the block ends."""
        before = getattr(_thread, "active", False)
        _thread.active = bool(self)
        try:
            yield
        finally:
            _thread.active = before

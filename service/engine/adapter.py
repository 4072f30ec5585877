"""A LoRA adapter that applies to some rows of a batch only: LTE's alignment for injected descriptors.

LTE (Jiang et al. 2024) fine-tunes the model to answer from an "[Updated Information]" block. Trained on
in-scope examples only, such an adapter raises how often the model uses a correctly injected descriptor, but
it also changes most answers to requests without a block (docs/free-text-edits.md). So it may run only on
the rows whose prompt carries injected descriptors: every other row of the same forward must come out
byte-identical to the base model. A forward hook on each adapted Linear adds the low-rank delta
`scale * B(A(x))` to the selected rows only; the base weights are never written, and with no row selected
the hook does nothing at all.

The file format is PEFT's (`adapter_config.json` + `adapter_model.safetensors`, as
`scripts/train_alignment.py` saves it), read without importing peft.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

# Trained by scripts/train_alignment.py for the embedded SmolLM2-135M-Instruct (docs/free-text-edits.md).
EMBEDDED_ADAPTER = Path(__file__).resolve().parents[1] / "assets" / "alignment-smollm2-135m-instruct"

# PEFT names a module's factors "<prefix><module name>.lora_A.weight" / ".lora_B.weight".
_PEFT_PREFIX = "base_model.model."


class AdapterError(ValueError):
    """The adapter file is unreadable or does not fit the served model."""


@dataclass(frozen=True)
class LoraFactors:
    down: torch.Tensor  # A: [rank, in_features]
    up: torch.Tensor  # B: [out_features, rank]


def read_lora(path: Path) -> tuple[dict[str, LoraFactors], float, dict[str, Any]]:
    """(module name -> factors, scale = alpha / rank, the adapter's config) from a PEFT LoRA folder."""
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise AdapterError(f"{path} holds no adapter_config.json and adapter_model.safetensors")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: only LoRA adapters are supported, not {config.get('peft_type')}")
    unsupported = [k for k in ("use_dora", "use_rslora", "rank_pattern", "alpha_pattern", "modules_to_save",
                               "lora_bias", "fan_in_fan_out") if config.get(k)]
    if unsupported:
        raise AdapterError(f"{path}: adapters with {', '.join(unsupported)} are not supported")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    tensors = load_file(str(weights_file))
    factors: dict[str, LoraFactors] = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key[: -len(".lora_A.weight")].removeprefix(_PEFT_PREFIX)
        up = tensors.get(key.replace(".lora_A.", ".lora_B."))
        if up is None:
            raise AdapterError(f"{path}: {key} has no lora_B partner")
        factors[name] = LoraFactors(down, up)
    if not factors:
        raise AdapterError(f"{path}: no LoRA factors in adapter_model.safetensors")
    return factors, alpha / rank, config


def adapter_path(setting: str, model: str) -> Path | None:
    """The adapter folder `--alignment-adapter` names: auto = the shipped one for the embedded model only."""
    if setting == "none":
        return None
    if setting == "auto":
        return EMBEDDED_ADAPTER if model == "embedded" and EMBEDDED_ADAPTER.is_dir() else None
    return Path(setting)


class RowAdapter:
    """LoRA deltas on the served model's Linear layers, switched on per row for one forward at a time.

    The selection is thread-local: the editor runs its own forwards on the same model in another thread,
    and those must never see the adapter.
    """

    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        self.path = path
        factors, self.scale, self.config = read_lora(path)
        modules = dict(model.named_modules())
        param = next(model.parameters())
        self._factors: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, lora in factors.items():
            module = modules.get(name)
            if not isinstance(module, torch.nn.Linear):
                raise AdapterError(f"{path}: the model has no Linear layer {name!r} "
                                   "(an adapter for another model?)")
            rank = lora.down.shape[0]
            want_up = (module.out_features, rank)
            if lora.down.shape[1] != module.in_features or tuple(lora.up.shape) != want_up:
                raise AdapterError(
                    f"{path}: {name} is {module.in_features} -> {module.out_features} in the model, "
                    "the adapter "
                    f"has A {tuple(lora.down.shape)} and B {tuple(lora.up.shape)}"
                )
            # Factors in the model's dtype and device: a bf16 model on a GPU adds a bf16 delta.
            down = lora.down.to(device=param.device, dtype=param.dtype)
            up = (lora.up * self.scale).to(device=param.device, dtype=param.dtype)
            self._factors[module] = (down, up)
        self._tls = threading.local()  # .selected: row indices on the device (None: no row); .all
        self._handles = [m.register_forward_hook(self._add_delta) for m in self._factors]
        self.nbytes = sum(d.numel() * d.element_size() + u.numel() * u.element_size()
                          for d, u in self._factors.values())
        self._check_row_layout(model)

    def _check_row_layout(self, model: torch.nn.Module) -> None:
        """Rows can only be picked where every adapted layer sees [batch, tokens, features]; some models
        (OPT) flatten batch and tokens inside the block. One two-row forward tells."""
        seen: set[int] = set()

        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            seen.add(inputs[0].dim())

        handles = [m.register_forward_hook(record) for m in self._factors]
        device = next(iter(self._factors.values()))[0].device
        try:
            with torch.no_grad():
                model(input_ids=torch.zeros((2, 2), dtype=torch.long, device=device), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        if seen != {3}:
            raise AdapterError(f"{self.path}: the model's adapted layers see flattened rows; "
                               "a per-row adapter "
                               "cannot be applied to this architecture")

    @property
    def modules(self) -> int:
        return len(self._factors)

    @contextmanager
    def rows(self, adapted: Sequence[bool] | None) -> Iterator[None]:
        """Within the block, forwards add the adapter's delta to the rows flagged in `adapted`."""
        flags = list(adapted or [])
        if not any(flags):
            yield
            return
        device = next(iter(self._factors.values()))[0].device
        self._tls.all = all(flags)
        picked = [i for i, f in enumerate(flags) if f]
        self._tls.selected = torch.tensor(picked, dtype=torch.long, device=device)
        try:
            yield
        finally:
            self._tls.selected = None

    def _add_delta(
        self, module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> Any:
        rows = getattr(self._tls, "selected", None)
        if rows is None:
            return None
        down, up = self._factors[module]
        x = inputs[0]
        if self._tls.all:
            return output + (x @ down.T) @ up.T
        # Rows not selected keep the very tensor values the base layer produced.
        delta = (x.index_select(0, rows) @ down.T) @ up.T
        return output.index_add(0, rows, delta)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

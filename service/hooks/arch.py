"""Where a causal LM keeps what the hook layers need, for any Hugging Face architecture.

The hook layers need, per decoder block, the MLP's down projection: its input is the ROME key space
(act(gate(x)) * up(x) for gated MLPs, act(fc1(x)) for plain ones) and its output is what the block adds
to the residual stream (after a norm in Gemma-2, after dropout elsewhere). The editor also needs the
final logits from a last hidden state, as the model's own forward computes them (Gemma-2 soft-caps them,
Cohere scales them). Layouts differ by family:

    Llama, Qwen2/3, Mistral, Gemma-2, Phi-3     model.layers[i].mlp.down_proj        nn.Linear
    GPT-2                                      transformer.h[i].mlp.c_proj          Conv1D (weight [in, out])
    GPT-NeoX                                   gpt_neox.layers[i].mlp.dense_4h_to_h nn.Linear
    Falcon                                     transformer.h[i].mlp.dense_4h_to_h   nn.Linear
    OPT                                        model.decoder.layers[i].fc2          nn.Linear (no mlp module)
    GPT-J                                      transformer.h[i].mlp.fc_out          nn.Linear

A model whose blocks have none of these (a mixture of experts, whose MLP is many experts) cannot be
hooked: `find_hook_sites` raises `UnsupportedArchitecture` naming the architecture and what is missing,
and the server refuses to start with that one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "HookSite",
    "UnsupportedArchitecture",
    "attention_modules",
    "decoder_layers",
    "final_norm",
    "final_logits",
    "find_hook_sites",
    "hookable_layers",
]

DECODER_PATHS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers")
DOWN_PROJECTION_PATHS = (
    "mlp.down_proj",
    "mlp.c_proj",
    "mlp.dense_4h_to_h",
    "mlp.fc2",
    "mlp.fc_out",
    "fc2",
)

# Two computations of the same logits agree within this share of the largest logit (float rounding).
LOGITS_TOLERANCE = 1e-3

# The self-attention module of a block (its output's first element is what the block adds to the residual
# stream), and the final norm of the headless model, for causal tracing (service/locate/trace.py).
ATTENTION_PATHS = ("self_attn", "attn", "attention", "self_attention")
FINAL_NORM_PATHS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "decoder.final_layer_norm")


class UnsupportedArchitecture(ValueError):
    """The model lacks something the hook layers need; the message names the architecture and what."""


@dataclass(frozen=True)
class HookSite:
    """One decoder block's MLP down projection: input [.., d_ff] (the key), output [.., d_model]."""

    layer: int
    path: str  # e.g. "mlp.down_proj", relative to the block
    module: nn.Module
    d_ff: int
    d_model: int


def architecture_name(model: nn.Module) -> str:
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return str(archs[0]) if archs else type(model).__name__


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a HF causal LM."""
    for path in DECODER_PATHS:
        obj = _get(model, path)
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise UnsupportedArchitecture(
        f"{architecture_name(model)}: no decoder layers found (looked for {', '.join(DECODER_PATHS)})"
    )


def projection_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(input width, output width) of a linear map, or None if it is not one we can read.

    GPT-2's Conv1D stores its weight as [in, out], the transpose of nn.Linear's [out, in]."""
    if isinstance(module, nn.Linear) or hasattr(module, "in_features") and hasattr(module, "out_features"):
        return int(module.in_features), int(module.out_features)
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(weight, torch.Tensor):
        return int(weight.shape[0]), int(module.nf)
    return None


def model_width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return int(model.get_input_embeddings().weight.shape[-1])


def _site(model: nn.Module, block: nn.Module, layer: int) -> HookSite | str:
    """The block's down projection, or why there is none."""
    width = model_width(model)
    for path in DOWN_PROJECTION_PATHS:
        module = _get(block, path)
        if not isinstance(module, nn.Module):
            continue
        sizes = projection_sizes(module)
        if sizes is None:
            return f"layer {layer}: {path} is a {type(module).__name__}, not a linear map"
        d_ff, d_out = sizes
        if d_out != width:
            return f"layer {layer}: {path} writes {d_out} features, the residual stream has {width}"
        return HookSite(layer, path, module, d_ff, d_out)
    mlp = getattr(block, "mlp", None)
    kind = f"its MLP is a {type(mlp).__name__}" if mlp is not None else f"{type(block).__name__} has no mlp"
    return (
        f"layer {layer}: no MLP down projection ({kind}; looked for {', '.join(DOWN_PROJECTION_PATHS)})"
    )


def hookable_layers(model: nn.Module) -> list[int]:
    blocks = decoder_layers(model)
    return [i for i, b in enumerate(blocks) if isinstance(_site(model, b, i), HookSite)]


def find_hook_sites(model: nn.Module, layers: Sequence[int]) -> dict[int, HookSite]:
    """The down projection of each of `layers`; UnsupportedArchitecture if one cannot be hooked."""
    blocks = decoder_layers(model)
    sites: dict[int, HookSite] = {}
    for i in layers:
        if not 0 <= i < len(blocks):
            raise ValueError(f"hook layer {i} out of range (model has {len(blocks)} layers)")
        site = _site(model, blocks[i], i)
        if isinstance(site, str):
            raise UnsupportedArchitecture(f"{architecture_name(model)} cannot be hooked: {site}")
        sites[i] = site
    return sites


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Each decoder block's self-attention module; UnsupportedArchitecture where a block has none."""
    found = []
    for i, block in enumerate(decoder_layers(model)):
        module = next((m for p in ATTENTION_PATHS if isinstance(m := _get(block, p), nn.Module)), None)
        if module is None:
            raise UnsupportedArchitecture(
                f"{architecture_name(model)}: layer {i} has no attention module "
                f"(looked for {', '.join(ATTENTION_PATHS)})"
            )
        found.append(module)
    return found


def final_norm(model: nn.Module) -> nn.Module:
    """The norm between the last decoder block and the LM head (model.norm, transformer.ln_f, ...)."""
    base = base_model(model)
    for path in FINAL_NORM_PATHS:
        module = _get(base, path)
        if isinstance(module, nn.Module):
            return module
    raise UnsupportedArchitecture(
        f"{architecture_name(model)}: no final norm found (looked for {', '.join(FINAL_NORM_PATHS)})"
    )


def output_embeddings(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise UnsupportedArchitecture(f"{architecture_name(model)}: no output embeddings (LM head)")
    return head


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from last hidden states exactly as the model's own forward computes them: the LM head, then
    Gemma-2/3's final soft-capping (tanh(x / c) * c) or Cohere's logit scale where the model has one."""
    logits = output_embeddings(model)(hidden)
    cap = getattr(getattr(model, "config", None), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    return logits


def base_model(model: nn.Module) -> nn.Module:
    """The headless model (its forward returns last_hidden_state)."""
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if base is None:
        raise UnsupportedArchitecture(f"{architecture_name(model)}: no base model found")
    return base


@torch.no_grad()
def check_logits_path(model: nn.Module, token_ids: Sequence[int]) -> None:
    """The editor computes logits as final_logits(base(ids).last_hidden_state); check once at load that
    this reproduces the model's own forward, so an unknown final transform fails at start, not as an
    edit report that disagrees with Score."""
    device = next(model.parameters()).device
    ids = torch.tensor([list(token_ids)], dtype=torch.long, device=device)
    reference = model(input_ids=ids, use_cache=False).logits.float()
    hidden = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
    ours = final_logits(model, hidden).float()
    tolerance = LOGITS_TOLERANCE * max(1.0, float(reference.abs().max()))
    if ours.shape != reference.shape or float((ours - reference).abs().max()) > tolerance:
        raise UnsupportedArchitecture(
            f"{architecture_name(model)}: its logits are not the LM head of the last hidden state "
            "(an unknown final transform); the edit quality gate could not score it"
        )


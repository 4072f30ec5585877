"""Default hook layers, chosen by measurement.

SmolLM2-135M-Instruct (30 layers), 2-core shared CPU, float32, measured with
`HF_HUB_OFFLINE=1 .venv/bin/python bench/hook_layers.py --layers 2 3 4 5 6 7 8 10`:
11 hand-written facts (testkit/hook_layers.py), each edited alone with one paraphrase given to
compute. ES = the prompt's greedy continuation starts with the target; PS = the same for two paraphrases
NOT given to compute ("loose": the target appears in the first few tokens, e.g. "Mount Everest is a
mountain in" -> " the Canadian Rockies"); NS = the neighbour prompt's continuation is unchanged; "all" =
the 11 edits published together; probe top-1 = locality drift on the 62 probes; times = compute_seconds
(key + value + calibration + quality gate); recall = the gate fires on the unseen paraphrases; hard =
fires on 20 hard negatives that share a last token with a subject ("The Giza plateau", "Beatrix
Potter"; firing on "The Mona Lisa Smile", which contains a subject, counts too).

| layer | ES | PS | PS loose | NS | ES all | PS all | probe top-1 | median s | p90 s | recall | hard |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
| 2 | 1.00 | 0.73 | 0.86 | 1.00 | 1.00 | 0.73 | 0.000 | 1.47 | 2.18 | 0.91 | 3 |
| 3 | 1.00 | 0.91 | 0.91 | 1.00 | 1.00 | 0.91 | 0.000 | 1.36 | 1.69 | 0.91 | 2 |
| 4 | 1.00 | 0.82 | 0.91 | 1.00 | 1.00 | 0.82 | 0.000 | 1.41 | 1.87 | 0.95 | 3 |
| 5 | 1.00 | 0.82 | 0.91 | 1.00 | 1.00 | 0.82 | 0.000 | 1.27 | 2.00 | 0.95 | 2 |
| 6 | 1.00 | 0.86 | 0.95 | 1.00 | 1.00 | 0.86 | 0.000 | 1.26 | 1.69 | 0.95 | 2 |
| 7 | 1.00 | 0.82 | 0.91 | 1.00 | 1.00 | 0.82 | 0.000 | 1.25 | 1.81 | 0.95 | 2 |
| 8 | 1.00 | 0.86 | 0.91 | 1.00 | 1.00 | 0.86 | 0.000 | 1.58 | 2.04 | 0.95 | 2 |
| 10 | 1.00 | 0.73 | 0.82 | 1.00 | 1.00 | 0.73 | 0.000 | 1.33 | 2.20 | 0.86 | 1 |

Layers 3-8 are within two paraphrases of each other on 22 (small sample); layer 6 has the best loose PS,
the best gate recall with the fewest hard fires among layers 3-8, and among the fastest computes, so it
is the default. One layer only: every hooked layer costs one gate matmul per decoding step. The PS
misses are mostly a subject tokenised differently at the start of a text ("Spain's" is not " Spain")
or a continuation that is right but not literally the target ("the Canadian Rockies", "master chef").
An earlier run with an early stop at NLL < 0.3 instead of 0.1 was ~0.3 s faster and 0.1 lower in PS.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from service.hooks.arch import decoder_layers, hookable_layers

# SmolLM2-135M's measured best layer (6 of 30) as a fraction of depth. For models nobody measured, the
# same fraction lands where the published single-layer editors put their layer (ROME/EasyEdit: GPT-J
# 5 of 28 = 0.18, Llama-2-7B 5 of 32 = 0.16): the early-middle MLPs that causal tracing finds carrying
# a subject's facts at its last token. docs/hook-layers.md has the rule and its evidence.
SMOLLM2_135M_LAYER = 6  # the measured best of its 30 layers (the table above)
MEASURED_FRACTION = SMOLLM2_135M_LAYER / 30


@dataclass(frozen=True)
class HookLayerChoice:
    layers: list[int]
    rule: str  # how they were chosen, for the start log and GetServerInfo


def _is_smollm2_135m(config: object) -> bool:
    return (
        getattr(config, "model_type", "") == "llama"
        and getattr(config, "num_hidden_layers", 0) == 30
        and getattr(config, "hidden_size", 0) == 576
        and getattr(config, "intermediate_size", 0) == 1536
    )


def choose_hook_layers(model: nn.Module, requested: Sequence[int] = ()) -> HookLayerChoice:
    """`requested` (--hook-layers) if given; layer 6 for SmolLM2-135M (measured above); otherwise
    round(MEASURED_FRACTION x depth), at least 1 and below the last layer, moved to the nearest layer
    that has an MLP down projection."""
    if requested:
        return HookLayerChoice(sorted({int(i) for i in requested}), "--hook-layers")
    if _is_smollm2_135m(model.config):
        return HookLayerChoice([SMOLLM2_135M_LAYER], "measured for SmolLM2-135M (service/hooks/defaults.py)")
    depth = len(decoder_layers(model))
    target = min(depth - 1, max(1, round(MEASURED_FRACTION * depth)))
    candidates = hookable_layers(model)
    layer = min(candidates, key=lambda i: (abs(i - target), i)) if candidates else target
    return HookLayerChoice(
        [layer], f"round({MEASURED_FRACTION:.2f} x {depth} layers) = {target} (unmeasured model)"
        + ("" if layer == target else f", nearest hookable layer {layer}"),
    )


def default_hook_layers(model: nn.Module) -> list[int]:
    return choose_hook_layers(model).layers


def auto_layer_candidates(model: nn.Module, requested: Sequence[int] = ()) -> list[int]:
    """The layers a per-edit (`auto`) choice may pick: `requested` (--auto-layer-candidates) if given,
    else every hookable layer from 1 (as the depth rule above) to half the depth: the early-middle MLPs
    where ROME's causal traces find a subject's facts read out at its last token."""
    depth = len(decoder_layers(model))
    hookable = set(hookable_layers(model))
    if requested:
        wanted = sorted({int(i) for i in requested})
        missing = [i for i in wanted if i not in hookable]
        if missing:
            raise ValueError(f"auto layer candidates {missing} have no hookable MLP (of {depth} layers)")
        return wanted
    return [i for i in range(1, max(2, depth // 2 + 1)) if i in hookable]

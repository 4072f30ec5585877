"""The torch hook machinery of causal tracing (service/locate/trace.py holds ROME's functions on top).

`Tracer` installs forward hooks on the embedding, every block and every block's MLP and attention: they
capture the clean and corrupted states, add the noise to the subject's embeddings and write restored
(`Patch`) states back; it replays the blocks from any one on, with the arguments the model's own forward
passed them. `SuffixReplay` replays the blocks on the tokens from t on only, the earlier ones read from the
corrupted run's KV cache; `suffix_replay` uses it only where it reproduces the model's forward.

Safety. The hooks act only in the thread that installed them (a serving thread passing through them sees
them do nothing), write no parameter, and are removed when the trace ends, on error too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.hooks.arch import (
    UnsupportedArchitecture,
    architecture_name,
    attention_modules,
    base_model,
    decoder_layers,
    final_logits,
    final_norm,
    find_hook_sites,
)

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_NAMES",
    "REPLAY_TOLERANCE",
    "NoSuffixReplay",
    "Patch",
    "SuffixReplay",
    "Tracer",
    "block_input",
    "hidden_of",
    "suffix_replay",
    "suffix_sweep",
]

REPLAY_TOLERANCE = 1e-3  # a replay of the blocks must give the forward's probabilities within this


@dataclass(frozen=True)
class Patch:
    """Restore the clean `kind` state of `layer` at (rows[i], positions[i]) in a corrupted forward."""

    kind: str
    layer: int
    rows: torch.Tensor
    positions: torch.Tensor
    source: torch.Tensor | None = None  # the clean run's positions of the values (default: `positions`)


def hidden_of(out: Any) -> torch.Tensor:
    """The hidden states of a block's or module's output (a tuple whose first item, or the tensor)."""
    return out[0] if isinstance(out, tuple) else out


class Tracer:
    """The forward hooks of one trace (thread-bound), the captured clean and corrupted states, and the
    block replay."""

    def __init__(self, model: nn.Module, seq_len: int) -> None:
        self.model = model
        self.blocks = decoder_layers(model)
        self.n_layers = len(self.blocks)
        sites = find_hook_sites(model, range(self.n_layers))
        self.modules: dict[str, list[nn.Module]] = {
            "residual": list(self.blocks),
            "mlp": [sites[i].module for i in range(self.n_layers)],
            "attention": attention_modules(model),
        }
        self.norm = final_norm(model)
        self.seq_len = seq_len
        self.owner = threading.get_ident()
        self.capturing: dict[str, list[torch.Tensor | None]] | None = None
        self.block_calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * self.n_layers
        self.first_input: torch.Tensor | None = None
        self.noise: tuple[torch.Tensor, int, int] | None = None  # (noise [rows, n, d], start, end)
        self.patches: dict[tuple[str, int], list[tuple[Patch, torch.Tensor]]] = {}
        self.cache: Any = None
        self._handles: list[Any] = []

    # ---- hooks (no-ops outside the owner thread) ---------------------------------------------------
    @contextmanager
    def installed(self) -> Iterator[Tracer]:
        try:
            embed = self.model.get_input_embeddings()
            self._handles.append(embed.register_forward_hook(self._on_embedding))
            for i, block in enumerate(self.blocks):
                self._handles.append(block.register_forward_pre_hook(self._pre_block(i), with_kwargs=True))
            for kind, modules in self.modules.items():
                for i, module in enumerate(modules):
                    self._handles.append(module.register_forward_hook(self._on_output(kind, i)))
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def _mine(self) -> bool:
        return threading.get_ident() == self.owner

    def _on_embedding(self, _module: nn.Module, _args: Any, out: torch.Tensor) -> torch.Tensor | None:
        if not self._mine() or self.noise is None:
            return None
        noise, start, end = self.noise
        out = out.clone()
        out[:, start:end] += noise.to(out.dtype)
        return out

    def _pre_block(self, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not self._mine() or self.capturing is None:
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            if layer == 0:
                self.first_input = hidden.detach()
            if self.block_calls[layer] is None:  # the clean run's (batch 1): the replay broadcasts them
                self.block_calls[layer] = (tuple(args[1:]), {k: v for k, v in kwargs.items()
                                                             if k != "hidden_states"})

        return hook

    def _on_output(self, kind: str, layer: int):  # noqa: ANN202 - torch hook signature
        def hook(_module: nn.Module, _args: Any, out: Any) -> Any:
            if not self._mine():
                return None
            hidden = hidden_of(out)
            flat = hidden.dim() == 2  # OPT's MLP sees [batch * tokens, width]
            grid = hidden.view(-1, self.seq_len, hidden.shape[-1]) if flat else hidden
            if self.capturing is not None:
                self.capturing[kind][layer] = grid.detach()
            patches = self.patches.get((kind, layer))
            if not patches:
                return None
            grid = grid.clone()
            for patch, values in patches:
                grid[patch.rows, patch.positions] = values.to(grid.dtype)
            patched = grid.view(hidden.shape) if flat else grid
            return (patched, *out[1:]) if isinstance(out, tuple) else patched

        return hook

    # ---- runs ----------------------------------------------------------------------------------------
    def capture(
        self, ids: torch.Tensor, *, keep_cache: bool = False
    ) -> tuple[dict[str, list[torch.Tensor]], torch.Tensor, torch.Tensor]:
        """A full forward of `ids` ([rows, T]); every kind's state at every layer, block 0's input, and
        the last token's probabilities. With `keep_cache`, `self.cache` holds the run's KV cache."""
        # every hooked kind (trace.KINDS, in its order)
        self.capturing = {kind: [None] * self.n_layers for kind in self.modules}
        try:
            out = base_model(self.model)(input_ids=ids, use_cache=keep_cache)
            hidden = out.last_hidden_state
            self.cache = out.past_key_values if keep_cache else None
        finally:
            states, self.capturing = self.capturing, None
        missing = [f"{k} {i}" for k, v in states.items() for i, s in enumerate(v) if s is None]
        if missing or self.first_input is None or any(c is None for c in self.block_calls):
            raise UnsupportedArchitecture(
                f"{architecture_name(self.model)}: causal tracing saw no output of {', '.join(missing[:4])}"
            )
        probs = torch.softmax(final_logits(self.model, hidden[:, -1]).float(), dim=-1)
        return states, self.first_input, probs  # type: ignore[return-value]

    def replay(self, start: int, hidden: torch.Tensor) -> torch.Tensor:
        """Blocks `start`.. on `hidden` (the input of block `start`, [rows, T, d]), then the final norm
        and the LM head at the last token: probabilities [rows, vocab]."""
        for i in range(start, self.n_layers):
            call = self.block_calls[i]
            assert call is not None
            args, kwargs = call
            hidden = hidden_of(self.blocks[i](hidden, *args, **kwargs))
        return torch.softmax(final_logits(self.model, self.norm(hidden[:, -1])).float(), dim=-1)

    def check_replay(self, clean_input: torch.Tensor, clean_probs: torch.Tensor) -> None:
        """Replaying every block on two copies of the clean input gives the model's own probabilities."""
        probs = self.replay(0, clean_input.expand(2, -1, -1))
        err = float((probs - clean_probs).abs().max())
        if err > REPLAY_TOLERANCE:
            raise UnsupportedArchitecture(
                f"{architecture_name(self.model)}: replaying its blocks does not reproduce its forward "
                f"(max probability error {err:.2g}); causal tracing cannot run on it"
            )


class NoSuffixReplay(Exception):
    """The blocks cannot be replayed on a suffix of the tokens (the full replay is used instead)."""


CACHE_NAMES = ("past_key_values", "past_key_value", "layer_past")


class SuffixReplay:
    """Blocks replayed on the tokens from `t` on only, the tokens before `t` read from a KV cache.

    A restoration at token t changes no state of an earlier token (the model is causal), so those are the
    corrupted run's at every layer: their keys and values come from that run's KV cache and only the
    suffix is computed. The block's own arguments are reused: rotary embeddings and position ids are cut to
    the suffix, the mask is an explicit causal one over the whole sequence, and the cache holds the prefix.
    An argument this does not know how to cut raises NoSuffixReplay; `check` compares with the model."""

    def __init__(self, tracer: Tracer) -> None:
        import inspect

        self.tracer = tracer
        self.calls: list[tuple[str, dict[str, Any]]] = []
        for i, block in enumerate(tracer.blocks):
            call = tracer.block_calls[i]
            assert call is not None
            args, kwargs = call
            sig = inspect.signature(block.forward)
            hidden_name = next(iter(sig.parameters))
            try:
                bound = sig.bind(None, *args, **kwargs)
            except TypeError as exc:
                raise NoSuffixReplay(str(exc)) from None
            named: dict[str, Any] = {}
            for name, value in bound.arguments.items():
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        raise NoSuffixReplay(f"block {i} takes positional extras")
                elif name != hidden_name:
                    named[name] = value
            params = set(sig.parameters) | set(named)
            if "attention_mask" not in params or not any(n in params for n in CACHE_NAMES):
                raise NoSuffixReplay(f"block {i} takes no attention mask or no cache")
            for name, value in named.items():
                known = name in ("position_embeddings", "position_ids", "cache_position", "attention_mask")
                if not known and isinstance(value, torch.Tensor | tuple) and value is not None:
                    raise NoSuffixReplay(f"block {i}: unknown tensor argument {name}")
            self.calls.append((next(n for n in CACHE_NAMES if n in params), named))

    @staticmethod
    def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers = getattr(cache, "layers", None)
        if layers is None or layer >= len(layers) or getattr(layers[layer], "keys", None) is None:
            raise NoSuffixReplay("the KV cache has no per-layer keys")
        return layers[layer].keys, layers[layer].values

    def block(self, i: int, hidden: torch.Tensor, t: int, kv: tuple[torch.Tensor, torch.Tensor] | None,
              seq_len: int) -> torch.Tensor:
        from transformers import DynamicCache

        cache_name, named = self.calls[i]
        kwargs = dict(named)
        for name, value in named.items():
            if name == "position_embeddings" and isinstance(value, tuple):
                kwargs[name] = tuple(v[:, t:] for v in value)
            elif name == "position_ids" and isinstance(value, torch.Tensor):
                kwargs[name] = value[..., t:]
            elif name == "cache_position" and isinstance(value, torch.Tensor):
                kwargs[name] = value[t:]
        q = seq_len - t
        allowed = torch.arange(seq_len)[None, :] <= torch.arange(t, seq_len)[:, None]
        mask = torch.zeros(q, seq_len, dtype=hidden.dtype)
        mask.masked_fill_(~allowed, torch.finfo(hidden.dtype).min)
        kwargs["attention_mask"] = mask[None, None].to(hidden.device)
        cache = None
        if kv is not None and t > 0:
            cache = DynamicCache()
            cache.update(kv[0], kv[1], i)
        kwargs[cache_name] = cache
        return hidden_of(self.tracer.blocks[i](hidden, **kwargs))


def suffix_sweep(
    tracer: Tracer,
    suffix: SuffixReplay,
    t: int,
    configs: Sequence[tuple[str, int, int, Sequence[int]]],
    inputs: Any,
    cache: Any,
    clean: dict[str, list[torch.Tensor]],
    answer_id: int | None,
) -> torch.Tensor:
    """One pass over the blocks for restorations at token `t`: each config (kind, layer, start, restored
    layers) joins with its rows (one per base row: the noise samples) at block `start`, its input the base
    run's input of that block from token t on (`inputs(i)`); the prefix comes from `cache`. Returns p(answer)
    per row ([configs * base rows]), or every probability where `answer_id` is None."""
    order = sorted(range(len(configs)), key=lambda c: configs[c][2])
    seq_len = tracer.seq_len
    hidden: torch.Tensor | None = None
    rows_of: dict[int, torch.Tensor] = {}
    sample_of: list[torch.Tensor] = []
    first = min(configs[c][2] for c in order)
    saved = tracer.seq_len
    tracer.seq_len = seq_len - t
    try:
        for i in range(first, tracer.n_layers):
            joining = [c for c in order if configs[c][2] == i]
            if joining:
                base = inputs(i)[:, t:]
                n = 0 if hidden is None else hidden.shape[0]
                for j, c in enumerate(joining):
                    rows_of[c] = torch.arange(n + j * base.shape[0], n + (j + 1) * base.shape[0])
                    sample_of.append(torch.arange(base.shape[0]))
                new = base.repeat(len(joining), 1, 1)
                hidden = new if hidden is None else torch.cat([hidden, new])
            assert hidden is not None
            tracer.patches = {}
            for c, rows in rows_of.items():
                kind, _layer, _start, layers = configs[c]
                if i in layers:
                    zero = torch.zeros_like(rows)
                    values = clean[kind][i][0, t].expand(len(rows), -1)
                    tracer.patches.setdefault((kind, i), []).append((Patch(kind, i, rows, zero), values))
            samples = torch.cat(sample_of)
            k, v = SuffixReplay.layer_kv(cache, i) if t > 0 else (None, None)
            kv = None if k is None or v is None else (k[samples, :, :t], v[samples, :, :t])
            hidden = suffix.block(i, hidden, t, kv, seq_len)
    finally:
        tracer.patches = {}
        tracer.seq_len = saved
    assert hidden is not None
    probs = torch.softmax(final_logits(tracer.model, tracer.norm(hidden[:, -1])).float(), dim=-1)
    out = probs if answer_id is None else probs[:, answer_id]
    index = torch.cat([rows_of[c] for c in range(len(configs))])
    return out[index]


def block_input(states: dict[str, list[torch.Tensor]], first: torch.Tensor, layer: int) -> torch.Tensor:
    """A captured run's input of block `layer` ([rows, T, d]): block 0's input `first`, else the residual
    state after the block below (the corrupted run's, or the clean run's when checking the replay)."""
    return first if layer == 0 else states["residual"][layer - 1]


def suffix_replay(
    tracer: Tracer, ids: torch.Tensor, clean: dict[str, list[torch.Tensor]], clean_first: torch.Tensor,
    clean_probs: torch.Tensor,
) -> SuffixReplay | None:
    """The suffix replay where it reproduces the model's forward (checked at three split points), else
    None: then every restoration replays all tokens (same result, about twice the work)."""
    try:
        suffix = SuffixReplay(tracer)
        clean_cache = base_model(tracer.model)(input_ids=ids, use_cache=True).past_key_values
        seq_len = ids.shape[1]
        for t in sorted({0, seq_len // 2, seq_len - 1}):
            probs = suffix_sweep(tracer, suffix, t, [("residual", 0, 0, ())],
                                 lambda i: block_input(clean, clean_first, i), clean_cache, clean, None)
            if float((probs - clean_probs).abs().max()) > REPLAY_TOLERANCE:
                raise NoSuffixReplay(f"split at token {t} differs from the model's forward")
    except Exception as exc:  # noqa: BLE001 - any failure means "replay every token", which is exact
        log.info("causal tracing replays every token for %s: %s", architecture_name(tracer.model), exc)
        return None
    return suffix

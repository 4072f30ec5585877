"""Causal tracing (ROME, Meng et al. 2022, section 2.1): where in the network a fact is carried.

Three runs of the prompt. The *clean* run gives p(answer). The *corrupted* run adds Gaussian noise
(`noise_factor` x the std of the subject tokens' embeddings, `samples` draws, one batch row each) to the
embeddings of the subject tokens, and p(answer) drops. A *corrupted-with-restoration* run then puts back
one clean state, and the indirect effect of that state is p(restored) - p(corrupted):

    residual   the hidden state after block L at token t (ROME's `trace_important_states`)
    mlp        the MLP outputs of blocks L - window/2 .. L + window/2 at token t (`trace_important_window`)
    attention  the attention outputs of the same window of blocks at token t

Speed. Every restoration of one (kind, layer) is one batched forward whose rows are (token, noise sample),
and it starts at the lowest block it changes: the blocks below are the corrupted run's, so they are not
computed again. The blocks are replayed with the arguments the model's own forward passed them (captured
from the clean run, batch 1, broadcast over the rows); `_Tracer.check_replay` verifies once per trace that
the replay reproduces the model's forward, so an architecture whose blocks need more fails loudly. Tokens
before the subject are the same in the clean and corrupted runs (the model is causal), so their effect is
exactly 0 and is not computed. Only the last token's logits are computed.

Safety. The trace runs on the serving model in the calling thread. Its forward hooks act only in the thread
that installed them (a serving thread passing through them sees them do nothing), write no parameter, and
are removed when the trace ends, on error too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.errors import DeadlineExceeded, InvalidArgument
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
from service.hooks.rows import encode_row

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_WINDOW",
    "KINDS",
    "MAX_SAMPLES",
    "MAX_TRACE_TOKENS",
    "CausalTrace",
    "Patch",
    "TracePrompt",
    "TraceRun",
    "calculate_hidden_flow",
    "circuit_summary",
    "collect_embedding_std",
    "prepare_trace",
    "trace_important_states",
    "trace_important_window",
    "trace_with_patch",
    "traced_runs",
]

KINDS = ("residual", "mlp", "attention")
DEFAULT_SAMPLES = 3  # ROME uses 10; 3 keeps a 12-token trace of SmolLM2 near half a minute on 2 CPU cores
DEFAULT_WINDOW = 10  # ROME's
MAX_SAMPLES = 64
MAX_TRACE_TOKENS = 64
NOISE_FACTOR = 3.0  # ROME: noise std = 3 x the std of the subject embeddings
MAX_ROWS = 512  # rows of one restoration forward; more are split by token
MAX_SWEEP_ROWS = 1024  # rows of one suffix sweep (restorations x samples); more are split
REPLAY_TOLERANCE = 1e-3  # a replay of the blocks must give the forward's probabilities within this


@dataclass(frozen=True)
class TracePrompt:
    """A validated trace input: token ids, the subject's tokens [start, end), the traced answer token."""

    ids: list[int]
    subject: tuple[int, int]
    answer_id: int | None  # None: the model's greedy next token


@dataclass
class CausalTrace:
    ids: list[int]
    subject: tuple[int, int]  # token span [start, end)
    answer_id: int
    clean_p: float
    corrupted_p: float
    noise: float  # std of the noise added to the subject embeddings
    samples: int
    window: int
    seed: int
    # [layers, tokens] indirect effect: mean p(answer | corrupted, state restored) - corrupted_p
    residual: torch.Tensor
    mlp: torch.Tensor
    attention: torch.Tensor
    seconds: float

    def grid(self, kind: str) -> torch.Tensor:
        return {"residual": self.residual, "mlp": self.mlp, "attention": self.attention}[kind]


@dataclass(frozen=True)
class Patch:
    """Restore the clean `kind` state of `layer` at (rows[i], positions[i]) in a corrupted forward."""

    kind: str
    layer: int
    rows: torch.Tensor
    positions: torch.Tensor
    source: torch.Tensor | None = None  # the clean run's positions of the values (default: `positions`)


def prepare_trace(
    tokenizer: Any, prompt: str, subject: str, answer: str = "", *, max_tokens: int = MAX_TRACE_TOKENS
) -> TracePrompt:
    """Tokenise and validate; every caller mistake is InvalidArgument."""
    if not prompt.strip():
        raise InvalidArgument("must not be empty", field="prompt")
    if not subject.strip():
        raise InvalidArgument("must not be empty", field="subject")
    if subject not in prompt:
        raise InvalidArgument(f"{subject!r} does not occur in the prompt", field="subject")
    row = encode_row(tokenizer, prompt, subject)
    if len(row.ids) > max_tokens:
        raise InvalidArgument(f"{len(row.ids)} tokens, at most {max_tokens} can be traced", field="prompt")
    if row.subject is None:
        raise InvalidArgument(f"{subject!r} covers no token of the prompt", field="subject")
    answer_id = None
    if answer:
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not answer_ids:
            raise InvalidArgument("encodes to no tokens", field="answer")
        answer_id = int(answer_ids[0])
    return TracePrompt(row.ids, (row.subject[0], row.subject[1] + 1), answer_id)


def _check_deadline(deadline: float | None) -> None:
    """Between batched forwards: a trace whose caller's deadline passed stops computing."""
    if deadline is not None and time.monotonic() >= deadline:
        raise DeadlineExceeded("the deadline passed while tracing")


def collect_embedding_std(embeddings: torch.Tensor) -> float:
    """The std of the given token embeddings' entries ([tokens, width]); ROME's noise unit."""
    return float(embeddings.float().std(unbiased=False)) if embeddings.numel() > 1 else 1.0


def _hidden_of(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Tracer:
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
    def installed(self) -> Iterator[_Tracer]:
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
            hidden = _hidden_of(out)
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
        self.capturing = {kind: [None] * self.n_layers for kind in KINDS}
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
            hidden = _hidden_of(self.blocks[i](hidden, *args, **kwargs))
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


class _NoSuffixReplay(Exception):
    """The blocks cannot be replayed on a suffix of the tokens (the full replay is used instead)."""


_CACHE_NAMES = ("past_key_values", "past_key_value", "layer_past")


class _SuffixReplay:
    """Blocks replayed on the tokens from `t` on only, the tokens before `t` read from a KV cache.

    A restoration at token t changes no state of an earlier token (the model is causal), so those are the
    corrupted run's at every layer: their keys and values come from that run's KV cache and only the
    suffix is computed. The block's own arguments are reused: rotary embeddings and position ids are cut to
    the suffix, the mask is an explicit causal one over the whole sequence, and the cache holds the prefix.
    An argument this does not know how to cut raises _NoSuffixReplay; `check` compares with the model."""

    def __init__(self, tracer: _Tracer) -> None:
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
                raise _NoSuffixReplay(str(exc)) from None
            named: dict[str, Any] = {}
            for name, value in bound.arguments.items():
                kind = sig.parameters[name].kind
                if kind is inspect.Parameter.VAR_KEYWORD:
                    named.update(value)
                elif kind is inspect.Parameter.VAR_POSITIONAL:
                    if value:
                        raise _NoSuffixReplay(f"block {i} takes positional extras")
                elif name != hidden_name:
                    named[name] = value
            params = set(sig.parameters) | set(named)
            if "attention_mask" not in params or not any(n in params for n in _CACHE_NAMES):
                raise _NoSuffixReplay(f"block {i} takes no attention mask or no cache")
            for name, value in named.items():
                known = name in ("position_embeddings", "position_ids", "cache_position", "attention_mask")
                if not known and isinstance(value, torch.Tensor | tuple) and value is not None:
                    raise _NoSuffixReplay(f"block {i}: unknown tensor argument {name}")
            self.calls.append((next(n for n in _CACHE_NAMES if n in params), named))

    @staticmethod
    def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        layers = getattr(cache, "layers", None)
        if layers is None or layer >= len(layers) or getattr(layers[layer], "keys", None) is None:
            raise _NoSuffixReplay("the KV cache has no per-layer keys")
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
        return _hidden_of(self.tracer.blocks[i](hidden, **kwargs))


def _sweep(
    tracer: _Tracer,
    suffix: _SuffixReplay,
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
            k, v = _SuffixReplay.layer_kv(cache, i) if t > 0 else (None, None)
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


def trace_with_patch(
    tracer: _Tracer,
    start: int,
    inputs: torch.Tensor,
    patches: Sequence[Patch],
    clean: dict[str, list[torch.Tensor]],
    answer_id: int,
) -> torch.Tensor:
    """p(answer) per row of a corrupted forward from block `start` (its input `inputs`, [rows, T, d]) with
    the clean states of `patches` restored (each must be at block `start` or above)."""
    tracer.patches = {}
    for p in patches:
        if p.layer < start:
            raise ValueError(f"a patch at layer {p.layer} lies below the replay's first block {start}")
        values = clean[p.kind][p.layer][0, p.positions if p.source is None else p.source]
        tracer.patches.setdefault((p.kind, p.layer), []).append((p, values))
    try:
        return tracer.replay(start, inputs)[:, answer_id]
    finally:
        tracer.patches = {}


def _corrupted_input(
    corrupted: dict[str, list[torch.Tensor]], first: torch.Tensor, layer: int
) -> torch.Tensor:
    """The corrupted run's input of block `layer` ([samples, T, d])."""
    return first if layer == 0 else corrupted["residual"][layer - 1]


def _restorations(
    tracer: _Tracer,
    kind: str,
    start: int,
    layers: Sequence[int],
    tokens: Sequence[int],
    clean: dict[str, list[torch.Tensor]],
    corrupted: dict[str, list[torch.Tensor]],
    first: torch.Tensor,
    answer_id: int,
) -> torch.Tensor:
    """Mean p(answer) over the noise samples with `kind` of `layers` restored at each of `tokens`, one
    batched forward (rows token-major, then sample) per chunk of MAX_ROWS rows: [len(tokens)]."""
    base = _corrupted_input(corrupted, first, start)
    samples = base.shape[0]
    per_chunk = max(1, MAX_ROWS // samples)
    out = []
    device = base.device
    for c in range(0, len(tokens), per_chunk):
        chunk = torch.tensor(list(tokens[c : c + per_chunk]), dtype=torch.long, device=device)
        rows = torch.arange(len(chunk) * samples, device=device)
        positions = chunk.repeat_interleave(samples)
        inputs = base.repeat(len(chunk), 1, 1)
        patches = [Patch(kind, i, rows, positions) for i in layers]
        p = trace_with_patch(tracer, start, inputs, patches, clean, answer_id)
        out.append(p.view(len(chunk), samples).mean(dim=1))
    return torch.cat(out)


def trace_important_states(
    tracer: _Tracer, tokens: Sequence[int], clean: dict[str, list[torch.Tensor]],
    corrupted: dict[str, list[torch.Tensor]], first: torch.Tensor, answer_id: int,
    deadline: float | None = None,
) -> torch.Tensor:
    """[layers, len(tokens)]: p(answer) with the hidden state after block L restored at token t."""
    rows = []
    for layer in range(tracer.n_layers):
        _check_deadline(deadline)
        rows.append(_restorations(tracer, "residual", layer, [layer], tokens, clean, corrupted, first,
                                  answer_id))
    return torch.stack(rows)


def trace_important_window(
    tracer: _Tracer, kind: str, window: int, tokens: Sequence[int], clean: dict[str, list[torch.Tensor]],
    corrupted: dict[str, list[torch.Tensor]], first: torch.Tensor, answer_id: int,
    deadline: float | None = None,
) -> torch.Tensor:
    """[layers, len(tokens)]: p(answer) with `kind` restored at token t in the blocks of a `window` centred
    on L (clipped at both ends, as ROME: L - window // 2 .. L + ceil(window / 2) - 1)."""
    rows = []
    for layer in range(tracer.n_layers):
        _check_deadline(deadline)
        lo, hi = max(0, layer - window // 2), min(tracer.n_layers, layer - (-window // 2))
        rows.append(_restorations(tracer, kind, lo, range(lo, hi), tokens, clean, corrupted, first,
                                  answer_id))
    return torch.stack(rows)


@dataclass
class TraceRun:
    """The clean and corrupted runs of one prompt under installed trace hooks: what every restoration
    starts from. `restored` is one restoration; the grids are many of them."""

    tracer: _Tracer
    clean: dict[str, list[torch.Tensor]]
    corrupted: dict[str, list[torch.Tensor]]
    first: torch.Tensor  # the corrupted input of block 0 ([samples, T, d])
    answer_id: int
    clean_p: float
    corrupted_p: float
    noise: float
    suffix: _SuffixReplay | None = None  # None: the blocks are replayed on every token
    cache: Any = None  # the corrupted run's KV cache (for the suffix replay)

    def restored(self, start: int, patches: Sequence[Patch]) -> torch.Tensor:
        """p(answer) per row of the corrupted run replayed from block `start` with `patches` restored; rows
        are the noise samples (patches' rows index them)."""
        inputs = _corrupted_input(self.corrupted, self.first, start)
        return trace_with_patch(self.tracer, start, inputs, patches, self.clean, self.answer_id)


@contextmanager
def traced_runs(
    model: nn.Module, prompt: TracePrompt, *, samples: int, seed: int, noise_factor: float = NOISE_FACTOR
) -> Iterator[TraceRun]:
    """Install the trace hooks, run the prompt clean and corrupted (`samples` noise draws from `seed`),
    check the block replay; the hooks are removed on leaving, on error too."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.ids], dtype=torch.long, device=device)
    start, end = prompt.subject
    tracer = _Tracer(model, len(prompt.ids))
    with torch.no_grad(), tracer.installed():
        clean, clean_first, clean_probs = tracer.capture(ids)
        answer_id = int(clean_probs[0].argmax()) if prompt.answer_id is None else prompt.answer_id
        embeddings = model.get_input_embeddings()(ids)[0, start:end]
        noise_std = noise_factor * collect_embedding_std(embeddings)
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = torch.randn((samples, end - start, embeddings.shape[-1]), generator=gen) * noise_std
        tracer.noise = (noise.to(device), start, end)
        try:
            corrupted, first, corrupted_probs = tracer.capture(ids.expand(samples, -1), keep_cache=True)
        finally:
            tracer.noise = None
        tracer.check_replay(clean_first, clean_probs)
        cache, tracer.cache = tracer.cache, None
        suffix = _suffix_replay(tracer, ids, clean, clean_first, clean_probs)
        yield TraceRun(tracer, clean, corrupted, first, answer_id, float(clean_probs[0, answer_id]),
                       float(corrupted_probs[:, answer_id].mean()), noise_std, suffix, cache)


def _suffix_replay(
    tracer: _Tracer, ids: torch.Tensor, clean: dict[str, list[torch.Tensor]], clean_first: torch.Tensor,
    clean_probs: torch.Tensor,
) -> _SuffixReplay | None:
    """The suffix replay where it reproduces the model's forward (checked at three split points), else
    None: then every restoration replays all tokens (same result, about twice the work)."""
    try:
        suffix = _SuffixReplay(tracer)
        clean_cache = base_model(tracer.model)(input_ids=ids, use_cache=True).past_key_values
        seq_len = ids.shape[1]
        for t in sorted({0, seq_len // 2, seq_len - 1}):
            probs = _sweep(tracer, suffix, t, [("residual", 0, 0, ())],
                           lambda i: _corrupted_input(clean, clean_first, i), clean_cache, clean, None)
            if float((probs - clean_probs).abs().max()) > REPLAY_TOLERANCE:
                raise _NoSuffixReplay(f"split at token {t} differs from the model's forward")
    except Exception as exc:  # noqa: BLE001 - any failure means "replay every token", which is exact
        log.info("causal tracing replays every token for %s: %s", architecture_name(tracer.model), exc)
        return None
    return suffix


def _suffix_grids(
    run: TraceRun, tokens: Sequence[int], window: int, kinds: Sequence[str], deadline: float | None = None,
    layers: Sequence[int] | None = None,
) -> dict[str, torch.Tensor]:
    """p(answer) [layers, len(tokens)] per kind, one block sweep per token (and per chunk of rows); rows of
    layers not in `layers` (default: all) are not computed (they stay 0)."""
    assert run.suffix is not None
    n = run.tracer.n_layers
    configs: list[tuple[str, int, int, Sequence[int]]] = []
    for kind in kinds:
        for layer in range(n) if layers is None else sorted(set(layers)):
            if kind == "residual":
                configs.append((kind, layer, layer, (layer,)))
            else:
                lo, hi = max(0, layer - window // 2), min(n, layer - (-window // 2))
                configs.append((kind, layer, lo, tuple(range(lo, hi))))
    samples = run.first.shape[0]
    per_sweep = max(1, MAX_SWEEP_ROWS // samples)
    grids = {kind: torch.zeros(n, len(tokens)) for kind in kinds}
    for col, t in enumerate(tokens):
        for c0 in range(0, len(configs), per_sweep):
            _check_deadline(deadline)
            chunk = configs[c0 : c0 + per_sweep]
            p = _sweep(run.tracer, run.suffix, t, chunk,
                       lambda i: _corrupted_input(run.corrupted, run.first, i), run.cache, run.clean,
                       run.answer_id)
            means = p.view(len(chunk), samples).mean(dim=1).cpu()
            for (kind, layer, _start, _layers), value in zip(chunk, means, strict=True):
                grids[kind][layer, col] = value
    return grids


@torch.no_grad()
def calculate_hidden_flow(
    model: nn.Module,
    prompt: TracePrompt,
    *,
    samples: int = DEFAULT_SAMPLES,
    window: int = DEFAULT_WINDOW,
    seed: int = 0,
    noise_factor: float = NOISE_FACTOR,
    kinds: Sequence[str] = KINDS,
    use_suffix: bool = True,
    deadline: float | None = None,
    tokens: Sequence[int] | None = None,
    layers: Sequence[int] | None = None,
) -> CausalTrace:
    """The whole trace of one prompt: clean and corrupted p(answer) and the three grids of indirect effect
    (kinds not asked for are zeros). `tokens` restricts the restorations to those positions (default: every
    token from the subject's first on; the columns of the others stay zero), `layers` to those rows
    (default: every layer; the block-by-block fallback replay traces every layer). Deterministic for a
    given seed. Past `deadline` (time.monotonic()), DeadlineExceeded between two batched forwards."""
    started = time.perf_counter()
    n_layers = len(decoder_layers(model))
    if not 1 <= samples <= MAX_SAMPLES:
        raise InvalidArgument(f"{samples} is outside 1..{MAX_SAMPLES}", field="samples")
    if not 1 <= window <= n_layers:
        raise InvalidArgument(f"{window} is outside 1..{n_layers} (the model's layers)", field="window")
    start, _end = prompt.subject
    seq_len = len(prompt.ids)
    if tokens is None:
        tokens = range(start, seq_len)  # tokens before the subject: effect exactly 0
    tokens = sorted({int(t) for t in tokens if start <= int(t) < seq_len})
    with traced_runs(model, prompt, samples=samples, seed=seed, noise_factor=noise_factor) as run:
        args = (tokens, run.clean, run.corrupted, run.first, run.answer_id)
        fast = (_suffix_grids(run, tokens, window, kinds, deadline, layers)
                if run.suffix is not None and use_suffix else None)
        grids = {}
        for kind in KINDS:
            grid = torch.zeros(n_layers, seq_len)
            if fast is not None and kind in fast:
                rows = torch.tensor(range(n_layers) if layers is None else sorted(set(layers)))
                cols = torch.tensor(tokens)
                grid[rows[:, None], cols[None, :]] = fast[kind][rows] - run.corrupted_p
            elif kind in kinds:
                if kind == "residual":
                    p = trace_important_states(run.tracer, *args, deadline=deadline)
                else:
                    p = trace_important_window(run.tracer, kind, window, *args, deadline=deadline)
                grid[:, tokens] = p.cpu() - run.corrupted_p
            grids[kind] = grid
    return CausalTrace(
        ids=list(prompt.ids), subject=prompt.subject, answer_id=run.answer_id, clean_p=run.clean_p,
        corrupted_p=run.corrupted_p, noise=run.noise, samples=samples, window=window, seed=int(seed),
        residual=grids["residual"], mlp=grids["mlp"], attention=grids["attention"],
        seconds=time.perf_counter() - started,
    )


Ranked = list[tuple[int, float]]


def circuit_summary(trace: CausalTrace, top: int = 3) -> tuple[Ranked, Ranked]:
    """Where a reader looks first: the `top` layers of largest MLP effect at the subject's last token, and
    the `top` attention layers of largest effect at the prompt's last token, (layer, effect) best first."""
    subject_last = trace.subject[1] - 1
    last = len(trace.ids) - 1

    def ranked(column: torch.Tensor) -> Ranked:
        order = torch.argsort(column, descending=True, stable=True)[:top]
        return [(int(i), float(column[i])) for i in order]

    return ranked(trace.mlp[:, subject_last]), ranked(trace.attention[:, last])

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
from the clean run, batch 1, broadcast over the rows); `Tracer.check_replay` verifies once per trace that
the replay reproduces the model's forward, so an architecture whose blocks need more fails loudly. Tokens
before the subject are the same in the clean and corrupted runs (the model is causal), so their effect is
exactly 0 and is not computed. Only the last token's logits are computed.

Safety. The trace runs on the serving model in the calling thread. Its forward hooks act only in the thread
that installed them (a serving thread passing through them sees them do nothing), write no parameter, and
are removed when the trace ends, on error too.

The hooks, the block replay and the suffix replay are in service/locate/tracer.py; this module holds
ROME's functions on top of them, the trace's inputs and results, and its limits.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from service.errors import DeadlineExceeded, InvalidArgument
from service.hooks.arch import decoder_layers
from service.hooks.rows import encode_row
from service.locate.tracer import Patch, SuffixReplay, Tracer, block_input, suffix_replay, suffix_sweep

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


def trace_with_patch(
    tracer: Tracer,
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


def _restorations(
    tracer: Tracer,
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
    base = block_input(corrupted, first, start)
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
    tracer: Tracer, tokens: Sequence[int], clean: dict[str, list[torch.Tensor]],
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
    tracer: Tracer, kind: str, window: int, tokens: Sequence[int], clean: dict[str, list[torch.Tensor]],
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

    tracer: Tracer
    clean: dict[str, list[torch.Tensor]]
    corrupted: dict[str, list[torch.Tensor]]
    first: torch.Tensor  # the corrupted input of block 0 ([samples, T, d])
    answer_id: int
    clean_p: float
    corrupted_p: float
    noise: float
    suffix: SuffixReplay | None = None  # None: the blocks are replayed on every token
    cache: Any = None  # the corrupted run's KV cache (for the suffix replay)

    def restored(self, start: int, patches: Sequence[Patch]) -> torch.Tensor:
        """p(answer) per row of the corrupted run replayed from block `start` with `patches` restored; rows
        are the noise samples (patches' rows index them)."""
        inputs = block_input(self.corrupted, self.first, start)
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
    tracer = Tracer(model, len(prompt.ids))
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
        suffix = suffix_replay(tracer, ids, clean, clean_first, clean_probs)
        yield TraceRun(tracer, clean, corrupted, first, answer_id, float(clean_probs[0, answer_id]),
                       float(corrupted_probs[:, answer_id].mean()), noise_std, suffix, cache)


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
            p = suffix_sweep(run.tracer, run.suffix, t, chunk,
                       lambda i: block_input(run.corrupted, run.first, i), run.cache, run.clean,
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

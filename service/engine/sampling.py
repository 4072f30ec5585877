"""Next-token selection: greedy at temperature 0, else temperature / top-k / top-p with a per-sequence seed.

Each sampled sequence owns a `torch.Generator` seeded from its own `seed`, so its random draws depend only on
its own seed and step, never on which other sequences share the batch: same seed + same prompt -> same text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from service.errors import InvalidArgument
from service.types import MAX_TOP_LOGPROBS

MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int = 0  # used when temperature > 0
    stop: list[str] = field(default_factory=list)  # text is cut before the first stop string found
    min_new_tokens: int = 0  # EOS is masked out until this many tokens were generated
    logprobs: int | None = None  # None: none; N: each token's log-probability and the N most likely

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE, logits / temperature overflows float32 (inf - inf = nan in the softmax)
        # and the distribution is the argmax anyway: such a request is greedy (vLLM draws the same line).
        return self.temperature < MIN_TEMPERATURE

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidArgument("must be at least 1", field="max_new_tokens")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidArgument("must be >= 0", field="temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidArgument("must be in (0, 1]", field="top_p")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidArgument("must lie in [0, max_new_tokens]", field="min_new_tokens")
        if self.top_k < 0:
            raise InvalidArgument("must be >= 0", field="top_k")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidArgument(f"must lie in [0, {MAX_TOP_LOGPROBS}]", field="logprobs")


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator | None:
    """The sequence's own random stream on the logits' device (None for greedy: no randomness needed), so a
    draw copies only the sampled id to the host. A seed gives the same text on the same kind of device."""
    if params.greedy:
        return None
    # manual_seed wants a value in [-2**63, 2**64); mask so any Python int (negative, huge) is accepted.
    return torch.Generator(device=device).manual_seed(params.seed & 0xFFFF_FFFF_FFFF_FFFF)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """-inf everywhere except the k largest logits of each row (ties at the k-th value are kept)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """-inf outside the nucleus: the smallest set of most likely tokens whose probability reaches p. The most
    likely token is always kept."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked strictly above
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def mask_tokens(logits: torch.Tensor, rows: list[int], token_ids: frozenset[int]) -> torch.Tensor:
    """A copy of `logits` [B, V] with `token_ids` at -inf in `rows` (EOS before min_new_tokens)."""
    masked = logits.clone()
    ids = torch.tensor(sorted(token_ids), device=logits.device, dtype=torch.long)
    row_index = torch.tensor(rows, device=logits.device, dtype=torch.long)
    masked[row_index.unsqueeze(1), ids.unsqueeze(0)] = float("-inf")
    return masked


def token_logprobs(
    logits: torch.Tensor, rows: list[int], tokens: list[int], top: list[int]
) -> list[tuple[float, list[tuple[int, float]]]]:
    """For each (row, sampled token, number of alternatives): the token's log-probability under the model's
    distribution at that row (raw logits: before temperature, top-k/top-p and the EOS mask) and the `top`
    most likely (token id, log-probability) pairs, best first. One log-softmax and one copy for all rows."""
    if not rows:
        return []
    index = torch.tensor(rows, device=logits.device)
    logp = logits.index_select(0, index).float().log_softmax(dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logits.device)[:, None])[:, 0].tolist()
    k = max(top)
    best = torch.topk(logp, k, dim=-1) if k else None
    values = best.values.tolist() if best is not None else [[]] * len(rows)
    ids = best.indices.tolist() if best is not None else [[]] * len(rows)
    return [
        (lp, list(zip(ids[i][: top[i]], values[i][: top[i]], strict=True)))
        for i, lp in enumerate(chosen)
    ]


def sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from one row of logits [V]."""
    if params.greedy:
        return int(logits.argmax())
    scaled = logits.float() / params.temperature
    scaled = top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)
    probs = scaled.softmax(dim=-1)
    if generator is not None and generator.device != probs.device:
        probs = probs.to(generator.device)
    return int(torch.multinomial(probs, 1, generator=generator))

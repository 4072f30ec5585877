"""bench/serve_throughput.py's arithmetic: nearest-rank percentiles, FLOPs per generated token and the
block orders of the edit comparison (the benchmark itself is run by hand, see docs/benchmarks.md)."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from serve_throughput import flops_per_token, percentile, williams_orders  # noqa: E402


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
def test_block_orders_are_balanced_for_the_run_before(n: int) -> None:
    orders = williams_orders(n)
    assert len(orders) == (n if n % 2 == 0 else 2 * n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    repeats = len(orders) // n
    assert Counter(o[0] for o in orders) == {i: repeats for i in range(n)}
    after = Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    assert after == {(a, b): repeats for a in range(n) for b in range(n) if a != b}


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
    assert percentile(values, 50) == 5.0
    assert percentile(values, 99) == 10.0
    assert percentile(values, 10) == 1.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


@pytest.mark.parametrize("tied", [True, False])
def test_flops_per_token_counts_non_embedding_params_and_the_head_once(tied: bool) -> None:
    config = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied)
    model = tf.LlamaForCausalLM(config)
    total = sum(p.numel() for p in model.parameters())  # parameters() lists a tied weight once
    non_embedding = total - 100 * 32 - (0 if tied else 100 * 32)
    assert flops_per_token(SimpleNamespace(model=model)) == 2 * non_embedding + 2 * 32 * 100

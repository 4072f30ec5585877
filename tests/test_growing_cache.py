"""The engine's KV cache layer that appends in place (service/kvcache.py GrowingLayer)."""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from service.engine.batch import ModelRunner
from service.kvcache import GROW_MIN_COLUMNS, GrowingLayer, growing_cache


def kv(rows: int, columns: int, seed: int, requires_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(rows, 2, columns, 8, generator=g)
    v = torch.randn(rows, 2, columns, 8, generator=g)
    return k.requires_grad_(requires_grad), v.requires_grad_(requires_grad)


def test_appends_in_place_and_equals_concatenation() -> None:
    growing, plain = GrowingLayer(), DynamicLayer()
    pointers = set()
    for step in range(40):
        k, v = kv(3, 5 if step == 0 else 1, step)
        got, want = growing.update(k, v), plain.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        pointers.add(growing.keys.data_ptr())
    assert growing.get_seq_length() == plain.get_seq_length() == 44
    # the first buffer held 5 + GROW_MIN_COLUMNS columns; one regrowth for 44
    assert 5 + GROW_MIN_COLUMNS < 44 and len(pointers) == 2


def test_tensors_adopted_from_outside_are_copied_before_a_write() -> None:
    layer = GrowingLayer()
    layer.update(*kv(2, 4, 0))
    kept_k = layer.keys  # a view of the layer's buffer, as a caller may keep it
    kept = kept_k.clone()
    adopted_k, adopted_v = kv(2, 6, 1)  # e.g. the engine's merged cache
    layer.keys, layer.values = adopted_k, adopted_v
    before = adopted_k.clone()
    k, v = kv(2, 1, 2)
    layer.update(k, v)
    assert torch.equal(layer.keys, torch.cat([adopted_k, k], dim=2))
    assert torch.equal(adopted_k, before)  # the adopted tensor itself is not written
    assert torch.equal(kept_k, kept)  # nor the view handed out before
    layer.update(*kv(2, 1, 3))
    assert torch.equal(layer.keys[:, :, :7], torch.cat([adopted_k, k], dim=2))


def test_a_wider_batch_gets_a_new_buffer() -> None:
    layer = GrowingLayer()
    layer.update(*kv(2, 4, 0))
    layer.keys, layer.values = kv(5, 4, 1)  # more rows adopted
    k, v = kv(5, 1, 2)
    keys, _ = layer.update(k, v)
    assert keys.shape == (5, 2, 5, 8) and torch.equal(keys[:, :, 4:], k)


def test_under_autograd_it_concatenates_and_gradients_flow() -> None:
    layer = GrowingLayer()
    k0, v0 = kv(1, 3, 0, requires_grad=True)
    layer.update(k0, v0)
    k1, v1 = kv(1, 1, 1, requires_grad=True)
    keys, values = layer.update(k1, v1)
    (keys.sum() + values.sum()).backward()
    assert k0.grad is not None and torch.equal(k0.grad, torch.ones_like(k0))
    assert k1.grad is not None


def test_engine_decode_matches_a_concatenating_cache(tiny_llama, monkeypatch) -> None:
    """Prefill 4 prompts and decode 40 steps (past the first buffer's spare columns) with the growing cache
    and with transformers' DynamicLayer swapped in: the same logits at every step."""
    import service.engine.batch as batch

    texts = ("The capital of France is", "One two", "def f(x):", "a b c d e f g h i j")
    prompts = [tiny_llama.tokenizer(p)["input_ids"] for p in texts]

    def run() -> torch.Tensor:
        runner = ModelRunner(tiny_llama, None, packed_weights=False)
        out_logits = []
        with torch.inference_mode():
            out, state = runner.prefill(prompts, [False] * 4)
            for _ in range(40):
                out = runner.decode(state, out.logits.argmax(-1).tolist(), [False] * 4)
                out_logits.append(out.logits)
            # dropping a row adopts selected tensors; decoding goes on from them
            state = state.select([0, 2], tiny_llama.model.config)
            out = runner.decode(state, [5, 6], [False] * 2)
            out_logits.append(torch.cat([out.logits, out.logits]))
        return torch.stack(out_logits)

    growing = run()
    assert isinstance(growing_cache().layer_class_to_replicate(), GrowingLayer)
    monkeypatch.setattr(batch, "growing_cache", __import__("transformers").DynamicCache)
    monkeypatch.setattr(batch, "GrowingLayer", DynamicLayer)
    torch.testing.assert_close(growing, run(), atol=1e-5, rtol=1e-5)

"""oneDNN-packed Linear weights (service/engine/packed_weights.py): same results as nn.Linear, used only where
allowed, base weights untouched."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn

from service.engine import packed_weights
from service.engine.batch import ModelRunner
from service.engine.packed_weights import PACKED_MIN_ROWS, PackedLinears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN linear")


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Rows of every forward that ran on a packed weight."""
    seen: list[int] = []
    real = packed_weights.packed_linear

    def counting(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        seen.append(x.numel() // x.shape[-1])
        return real(x, weight, bias)

    monkeypatch.setattr(packed_weights, "packed_linear", counting)
    return seen


def small_model(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 32, bias=False)).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_forward_matches_nn_linear(dtype: torch.dtype, calls: list[int]) -> None:
    model = small_model(dtype)
    reference = copy.deepcopy(model)
    x = torch.randn(3, 5, 48).to(dtype)
    packed = PackedLinears(model)
    assert packed.modules == 2 and packed.nbytes == sum(
        m.weight.numel() * m.weight.element_size() for m in model if isinstance(m, nn.Linear))
    with torch.inference_mode(), packed.active():
        got = model(x)
    assert calls == [15, 15]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, reference(x), atol=tol, rtol=tol)


def test_outside_active_or_below_min_rows_torch_runs(calls: list[int]) -> None:
    model = small_model()
    reference = copy.deepcopy(model)
    packed = PackedLinears(model)
    x = torch.randn(PACKED_MIN_ROWS, 48)
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))  # not switched on
        with packed.active():
            few = x[: PACKED_MIN_ROWS - 1]
            assert torch.equal(model(few), reference(few))
            assert calls == []
            model(x)
        assert calls == [PACKED_MIN_ROWS, PACKED_MIN_ROWS]
        model(x)  # switched off again after the block
    assert len(calls) == 2


def test_only_the_thread_that_switched_it_on_uses_it(calls: list[int]) -> None:
    model = small_model()
    packed = PackedLinears(model)
    x = torch.randn(8, 48)
    inside, other = threading.Event(), threading.Event()

    def elsewhere() -> None:
        inside.wait()
        model(x)
        other.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    with torch.inference_mode(), packed.active():
        inside.set()
        other.wait()
        assert calls == []  # the other thread's forward ran on torch's kernel
        model(x)
    thread.join()
    assert calls == [8, 8]


def test_gradients_flow_through_torch_kernels(calls: list[int]) -> None:
    model = small_model()
    packed = PackedLinears(model)
    x = torch.randn(8, 48, requires_grad=True)
    with packed.active():
        model(x).sum().backward()
    assert calls == [] and x.grad is not None and x.grad.abs().sum() > 0


def test_base_weights_and_state_dict_are_untouched() -> None:
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    PackedLinears(model)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_a_copy_or_a_rewritten_weight_is_not_served_stale(calls: list[int]) -> None:
    model = small_model()
    packed = PackedLinears(model)
    x = torch.randn(8, 48)
    twin = copy.deepcopy(model)  # e.g. a merged copy: its weights then change
    with torch.no_grad():
        twin[0].weight.mul_(2)
    with torch.inference_mode(), packed.active():
        expected = nn.Linear.forward(twin[2], torch.relu(nn.Linear.forward(twin[0], x)))
        torch.testing.assert_close(twin(x), expected, atol=1e-5, rtol=1e-5)
        assert calls == []  # the copy does not reuse the original's packed weights
    with torch.no_grad():
        model[2].weight.add_(1.0)  # written in place after packing
    expected = nn.Linear.forward(model[2], torch.relu(nn.Linear.forward(model[0], x)))
    with torch.inference_mode(), packed.active():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert calls == [8]  # only the untouched first layer ran packed


def test_packing_twice_reuses_the_packed_weights() -> None:
    model = small_model()
    PackedLinears(model)
    first = model[0]._editserve_packed
    PackedLinears(model)
    assert model[0]._editserve_packed is first


def test_runner_decodes_the_same_with_and_without_packed_weights(tiny_llama, calls: list[int]) -> None:
    """Greedy decoding of a batch of 6 prompts through the engine's forwards: the same tokens, logits equal
    up to float32 rounding, and the packed kernels really ran."""
    prompts = [tiny_llama.tokenizer(p)["input_ids"] for p in
               ("The capital of France is", "One two three four", "def f(x):", "Hello", "a b c d e f g h",
                "The Eiffel Tower is in")]

    def greedy(runner: ModelRunner, steps: int = 8) -> tuple[list[list[int]], torch.Tensor]:
        with torch.inference_mode():
            out, state = runner.prefill(prompts, [False] * len(prompts))
            tokens, all_logits = [], [out.logits]
            for _ in range(steps):
                nxt = out.logits.argmax(-1).tolist()
                tokens.append(nxt)
                out = runner.decode(state, nxt, [False] * len(prompts))
                all_logits.append(out.logits)
        return tokens, torch.stack(all_logits)

    plain_tokens, plain_logits = greedy(ModelRunner(tiny_llama, None, packed_weights=False))
    assert calls == []
    runner = ModelRunner(tiny_llama, None)
    assert runner.packed is not None and runner.packed.modules > 0
    packed_tokens, packed_logits = greedy(runner)
    assert calls, "the packed kernels did not run"
    assert packed_tokens == plain_tokens
    torch.testing.assert_close(packed_logits, plain_logits, atol=1e-4, rtol=1e-4)

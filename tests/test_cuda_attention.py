"""The CUDA attention setting (service/engine/loader.py configure_cuda_attention), checked without a GPU:
serving on CUDA switches PyTorch's cuDNN attention backend off for the process (it re-plans for every new key
length, i.e. every decode step: 3-5 ms of host time per attention call on an H200), and serving on a CPU
leaves the setting alone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from service.engine import Engine
from service.engine import scheduler as scheduler_module
from service.engine.loader import configure_cuda_attention, tiny_random_llama


@pytest.fixture
def cudnn_sdp_on() -> Iterator[None]:
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


def test_cuda_device_switches_cudnn_attention_off(cudnn_sdp_on: None) -> None:
    configure_cuda_attention(torch.device("cpu"))
    assert torch.backends.cuda.cudnn_sdp_enabled()
    configure_cuda_attention(torch.device("cuda"))
    assert not torch.backends.cuda.cudnn_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    configure_cuda_attention(torch.device("cuda", 0))  # idempotent
    assert not torch.backends.cuda.cudnn_sdp_enabled()


def test_engine_applies_it_for_its_model_device(cudnn_sdp_on: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model built in-process (not through load_model) gets the setting from the Engine."""
    seen: list[torch.device] = []
    monkeypatch.setattr(scheduler_module, "configure_cuda_attention", seen.append)
    loaded = tiny_random_llama(num_layers=1)
    Engine(loaded)
    assert seen == [loaded.device]
    assert torch.backends.cuda.cudnn_sdp_enabled()  # a CPU model leaves the process setting alone

"""Shared fixtures: SmolLM2 is loaded once per test session (about 20-30 s cold)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct as a LoadedModel, shared by every test in the session."""
    from service.engine.loader import load_model

    return load_model("embedded", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def tiny_llama():
    from service.engine.loader import tiny_random_llama

    return tiny_random_llama()

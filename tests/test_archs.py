"""Any causal LM a user brings: tiny random checkpoints of ten architectures served by the real gRPC server
with `--model DIR`, each checked end to end against itself and against Hugging Face `generate`.

Random weights cannot make an edit's target appear (v* cannot converge on a model that predicts nearly
uniformly), so an edit is checked to fire, to be named in `applied_edits` and to move its target's
log-probability; everything else is checked to be exact: a prompt alone = the same prompt in a batch of
8 (twice: the second round reads kept prompt states), the engine = HF greedy `generate`, stream = unary,
rollback = the pre-edit logits (max abs diff <= 1e-5), a restart replays the log to the same outputs.
"""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from grpc import aio
from tiny_checkpoints import CONFIGS, SLIDING_WINDOW, embedded_tokenizer, save_tiny_checkpoint

from service._proto.editserve.v1 import editserve_pb2 as pb
from service._proto.editserve.v1 import editserve_pb2_grpc as pb_grpc
from service.compose import build_server
from service.config import Settings
from service.transport import EditServeServer

pytestmark = pytest.mark.archs

# Mixed lengths (2 to ~20 tokens): padding differs per row, and most rows plus their new tokens are longer
# than the sliding window (8).
PROMPTS = (
    "Hello",
    "The capital of France is",
    "Once upon a time, in a small village near the mountains, there lived an old",
    "The Eiffel Tower is located in",
    "Water boils at a temperature of one hundred degrees",
    "My favourite colour is",
    "In 1969 the first people walked on the Moon; their spacecraft was called",
    "Python is a programming language created by",
)
NEW_TOKENS = 12
EDIT = {
    "subject": "Zorblat Vexmoor", "prompt": "Zorblat Vexmoor works as a", "target_new": " lighthouse keeper",
}
EDIT_PROBE = EDIT["prompt"]  # random keys are not distinctive enough to fire in other contexts


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return embedded_tokenizer()


def _settings(folder: Path, data_dir: Path, dtype: str = "float32") -> Settings:
    return Settings(
        port=0, metrics_port=0, data_dir=data_dir, model=str(folder), device="cpu", dtype=dtype,
        log_poll_s=0, grace_period_s=5.0,
    )


async def _serve(folder: Path, data_dir: Path, dtype: str = "float32") -> EditServeServer:
    from service.compose import load_data_plane

    settings = _settings(folder, data_dir, dtype)
    server = build_server(settings, lambda: load_data_plane(settings))
    await server.start()
    await server.load_plane()
    return server


class Client:
    def __init__(self, channel: aio.Channel) -> None:
        self.gen = pb_grpc.GenerateServiceStub(channel)
        self.edit = pb_grpc.EditServiceStub(channel)
        self.info = pb_grpc.InfoServiceStub(channel)

    async def greedy(self, prompt: str, *, use_edits: bool = True) -> pb.GenerateResponse:
        req = pb.GenerateRequest(prompt=prompt, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                 use_edits=use_edits, edit_paths=[pb.EDIT_PATH_HOOK])
        return await self.gen.Generate(req, timeout=120)

    async def ids(self, prompt: str) -> list[int]:
        """Greedy token ids, from the stream (unary Generate returns text only)."""
        req = pb.GenerateRequest(prompt=prompt, max_new_tokens=NEW_TOKENS, temperature=0.0,
                                 edit_paths=[pb.EDIT_PATH_HOOK])
        return [t async for c in self.gen.GenerateStream(req, timeout=120) for t in c.token_ids]

    async def score(self, prompt: str, continuation: str) -> list[float]:
        res = await self.gen.Score(pb.ScoreRequest(prompt=prompt, continuation=continuation,
                                                   edit_paths=[pb.EDIT_PATH_HOOK]), timeout=120)
        return [t.logprob for t in res.tokens]


@pytest.fixture
async def client_factory() -> AsyncIterator[Any]:
    channels: list[aio.Channel] = []

    def make(server: EditServeServer) -> Client:
        channel = aio.insecure_channel(server.address)
        channels.append(channel)
        return Client(channel)

    yield make
    for channel in channels:
        await channel.close()


def hf_greedy(folder: Path, tokenizer: Any, prompts: tuple[str, ...]) -> list[list[int]]:
    """Hugging Face's own greedy generate, one prompt at a time, stopping at EOS like the engine."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            seq = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        new = seq[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:  # the engine does not emit the end token's id in the stream
            new = new[: new.index(tokenizer.eos_token_id)]
        out.append(new)
    return out


@pytest.mark.parametrize("arch", list(CONFIGS))
async def test_architecture_end_to_end(
    arch: str, tmp_path: Path, tokenizer: Any, client_factory: Any
) -> None:
    folder = save_tiny_checkpoint(arch, tmp_path / arch, tokenizer=tokenizer, chat_template=arch != "gpt2")
    data = tmp_path / "data"
    server = await _serve(folder, data)
    try:
        c = client_factory(server)
        info = await c.info.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        assert info.architecture == CONFIGS_ARCH_CLASS[arch]
        assert list(info.hook_layers) == [1] and "unmeasured" in info.hook_layer_rule

        # alone = HF generate; alone = inside a batch of 8, twice (the second round hits kept prompt states)
        alone = [await c.ids(p) for p in PROMPTS]
        assert alone == hf_greedy(folder, tokenizer, PROMPTS), "engine greedy != HF generate"
        for round_ in range(2):
            batched = await asyncio.gather(*(c.ids(p) for p in PROMPTS))
            assert list(batched) == alone, f"batch of 8 != alone (round {round_ + 1})"
        assert any(len(tokenizer(p)["input_ids"]) + NEW_TOKENS > SLIDING_WINDOW for p in PROMPTS)

        # stream = unary; Score is finite and as long as the continuation
        unary = await c.greedy(PROMPTS[2])
        assert tokenizer.decode(alone[2], skip_special_tokens=True) == unary.text
        before = await c.score(EDIT_PROBE, EDIT["target_new"])
        assert before and all(math.isfinite(x) for x in before)
        base_out = await c.greedy(EDIT_PROBE)

        # a forced hook edit: an entry at the hook layer that fires on its subject and moves the target
        res = await c.edit.Edit(pb.EditRequest(force=True, **EDIT), timeout=300)
        record = (await c.edit.GetEdit(pb.GetEditRequest(edit_id=res.edit_id), timeout=30)).edit
        assert list(record.hook_layers) == [1]
        edited = await c.greedy(EDIT_PROBE)
        assert res.edit_id in [a.edit_id for a in edited.applied_edits if a.path == pb.EDIT_PATH_HOOK]
        after = await c.score(EDIT_PROBE, EDIT["target_new"])
        assert sum(after) > sum(before) + 1e-3, (sum(before), sum(after))
        untouched = await c.greedy(PROMPTS[1])
        assert not untouched.applied_edits  # no subject in the prompt: nothing fires
        edited_ids = await c.ids(EDIT_PROBE)
    finally:
        await server.stop(5.0)

    # a restart replays the log to the same outputs
    server = await _serve(folder, data)
    try:
        c = client_factory(server)
        assert await c.ids(EDIT_PROBE) == edited_ids
        replayed = await c.score(EDIT_PROBE, EDIT["target_new"])
        assert max(abs(a - b) for a, b in zip(replayed, after, strict=True)) <= 1e-5

        # rollback returns greedy output and logits to the pre-edit values
        await c.edit.Rollback(pb.RollbackRequest(edit_id=res.edit_id, reason="test"), timeout=60)
        rolled = await c.score(EDIT_PROBE, EDIT["target_new"])
        assert max(abs(a - b) for a, b in zip(rolled, before, strict=True)) <= 1e-5
        assert (await c.greedy(EDIT_PROBE)).text == base_out.text

        # the retrieval path: a descriptor in scope enters the prompt (chat template, or plain text)
        desc = "The mascot of the Zorbian Space Agency is a purple llama named Quimby."
        await c.edit.Edit(pb.EditRequest(descriptor=desc), timeout=120)
        chat = pb.GenerateRequest(
            messages=[pb.ChatMessage(role="user", content="What is the mascot of the Zorbian Space Agency?")],
            max_new_tokens=4, temperature=0.0,
        )
        with_edits = await c.gen.Generate(chat, timeout=120)
        chat.use_edits = False
        without = await c.gen.Generate(chat, timeout=120)
        assert [a.path for a in with_edits.applied_edits] == [pb.EDIT_PATH_RETRIEVAL]
        assert with_edits.prompt_tokens > without.prompt_tokens + 10
    finally:
        await server.stop(5.0)


CONFIGS_ARCH_CLASS = {
    "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM",
    "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "opt": "OPTForCausalLM",
    "falcon": "FalconForCausalLM",
}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
async def test_half_precision_serves_edits_and_rolls_back_exactly(
    dtype: str, tmp_path: Path, tokenizer: Any, client_factory: Any
) -> None:
    """A half-precision model serves, edits (v* is fitted in float32) and rolls back to identical logits.
    Batch = alone is not asserted: padding changes the order of half-precision sums."""
    folder = save_tiny_checkpoint("llama", tmp_path / "llama", tokenizer=tokenizer)
    server = await _serve(folder, tmp_path / "data", dtype)
    try:
        c = client_factory(server)
        info = await c.info.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
        assert info.dtype == dtype
        before = await c.score(EDIT_PROBE, EDIT["target_new"])
        base_out = await c.greedy(EDIT_PROBE)
        assert base_out.completion_tokens > 0 and all(math.isfinite(x) for x in before)
        res = await c.edit.Edit(pb.EditRequest(force=True, **EDIT), timeout=300)
        edited = await c.greedy(EDIT_PROBE)
        assert res.edit_id in [a.edit_id for a in edited.applied_edits]
        assert sum(await c.score(EDIT_PROBE, EDIT["target_new"])) > sum(before)
        await c.edit.Rollback(pb.RollbackRequest(edit_id=res.edit_id, reason="test"), timeout=60)
        assert await c.score(EDIT_PROBE, EDIT["target_new"]) == before
        assert (await c.greedy(EDIT_PROBE)).text == base_out.text
    finally:
        await server.stop(5.0)


def test_unhookable_architecture_refuses_to_start(tmp_path: Path, tokenizer: Any) -> None:
    """A mixture of experts has no MLP down projection: `editserve serve` exits 2 with one line naming the
    architecture and what is missing, and no traceback."""
    folder = save_tiny_checkpoint("mixtral", tmp_path / "mixtral", tokenizer=tokenizer)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EDITSERVE_TORCH_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--model", str(folder), "--port", "0",
         "--metrics-port", "0", "--data-dir", str(tmp_path / "data"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, proc.stderr[-2000:]
    assert "MixtralForCausalLM" in errors[0] and "no MLP down projection" in errors[0]
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
async def test_cuda_asked_for_without_a_gpu_exits_2(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from service.compose import load_data_plane, serve

    settings = Settings(port=0, metrics_port=0, data_dir=tmp_path / "data", device="cuda")
    code = await serve(settings, lambda: load_data_plane(settings))
    assert code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "--device cuda" in errors[0] and "no CUDA device" in errors[0]

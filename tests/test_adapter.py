"""The per-row alignment adapter (service/engine/adapter.py) on tiny random models: only flagged rows change,
they change exactly as the merged LoRA weights would, other rows stay byte-identical, and a file that does
not fit the model is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

from service.config import Settings, SettingsError
from service.engine import Engine, EngineRequest, SamplingParams
from service.engine.adapter import EMBEDDED_ADAPTER, AdapterError, RowAdapter, adapter_path, read_lora
from service.engine.batch import ModelRunner
from service.engine.loader import LoadedModel, tiny_random_llama
from tests.tiny_checkpoints import CONFIGS, embedded_tokenizer

TARGETS = ("q_proj", "v_proj", "down_proj")
RANK, ALPHA = 4, 8.0


def write_lora(
    folder: Path, model: torch.nn.Module, targets=TARGETS, seed: int = 1, scale: float = 0.5
) -> Path:
    """A PEFT-format LoRA folder with random non-zero A and B (PEFT starts B at zero, a trained one not)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            key = f"base_model.model.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, module.in_features, generator=gen) * scale
            tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, RANK, generator=gen) * scale
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(targets)}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def merged_copy(loaded: LoadedModel, folder: Path) -> torch.nn.Module:
    """The model with W + (alpha / r) B A written into its weights: what the adapter must equal."""
    import copy

    model = copy.deepcopy(loaded.model)
    factors, scale, _ = read_lora(folder)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, f in factors.items():
            modules[name].weight += scale * f.up @ f.down
    return model


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return tiny_random_llama(seed=3)


def prompts(loaded: LoadedModel) -> list[list[int]]:
    tok = loaded.tokenizer
    return [tok("The capital of France is")["input_ids"], tok("Hello there")["input_ids"],
            tok("One two three four five six")["input_ids"]]


def test_only_flagged_rows_change_and_they_match_the_merged_weights(llama, tmp_path):
    folder = write_lora(tmp_path / "lora", llama.model)
    base = ModelRunner(llama, None).prefill(prompts(llama), [False] * 3)[0].logits
    adapter = RowAdapter(llama.model, folder)
    try:
        runner = ModelRunner(llama, None, adapter=adapter)
        out = runner.prefill(prompts(llama), [False] * 3, adapted=[True, False, True])[0].logits
        everyone = runner.prefill(prompts(llama), [False] * 3, adapted=[True, True, True])[0].logits
        nobody = runner.prefill(prompts(llama), [False] * 3, adapted=None)[0].logits
    finally:
        adapter.remove()
    assert torch.equal(out[1], base[1])  # the unflagged row: byte-identical to the base model
    assert torch.equal(nobody, base)
    merged = ModelRunner(LoadedModel(merged_copy(llama, folder), llama.tokenizer, "merged", llama.device,
                                     llama.dtype), None)
    want = merged.prefill(prompts(llama), [False] * 3)[0].logits
    assert not torch.allclose(out[0], base[0], atol=1e-3)  # the adapter does something
    torch.testing.assert_close(out[0], want[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[2], want[2], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(everyone, want, atol=1e-4, rtol=1e-4)
    # removed: the model is the base model again
    assert torch.equal(ModelRunner(llama, None).prefill(prompts(llama), [False] * 3)[0].logits, base)


def test_decode_steps_follow_each_rows_flag(llama, tmp_path):
    folder = write_lora(tmp_path / "lora", llama.model)
    adapter = RowAdapter(llama.model, folder)
    try:
        runner = ModelRunner(llama, None, adapter=adapter)
        flags = [False, True, False]
        out, kv = runner.prefill(prompts(llama), [False] * 3, adapted=flags)
        step = runner.decode(kv, [5, 5, 5], [False] * 3, adapted=flags)
    finally:
        adapter.remove()
    plain = ModelRunner(llama, None)
    base_out, base_kv = plain.prefill(prompts(llama), [False] * 3)
    base_step = plain.decode(base_kv, [5, 5, 5], [False] * 3)
    assert torch.equal(step.logits[0], base_step.logits[0])
    assert torch.equal(step.logits[2], base_step.logits[2])
    assert not torch.allclose(step.logits[1], base_step.logits[1], atol=1e-3)


async def test_engine_requests_choose_the_adapter_and_kept_prompt_states_keep_them_apart(llama, tmp_path):
    folder = write_lora(tmp_path / "lora", llama.model, scale=1.0)
    adapter = RowAdapter(llama.model, folder)
    engine = Engine(llama, None, max_batch_size=4, prefix_cache_bytes=64 << 20, adapter=adapter)
    await engine.start()
    ids = prompts(llama)[0]

    async def run(adapted: bool) -> list[int]:
        out: list[int] = []
        request = EngineRequest(ids, SamplingParams(max_new_tokens=8), adapted=adapted)
        async for event in engine.stream(request):
            out += event.token_ids
        return out

    try:
        plain, aligned, plain_again = await run(False), await run(True), await run(False)
        together = await asyncio_gather(run(True), run(False))
    finally:
        await engine.stop(grace_s=0)
    assert plain != aligned  # a prompt kept without the adapter is not reused with it, nor the reverse
    assert plain_again == plain
    assert together == [aligned, plain]  # one batch, each row with its own choice
    assert not adapter._handles  # the engine took its hooks off the model when it stopped


async def asyncio_gather(*aws):
    import asyncio

    return list(await asyncio.gather(*aws))


def test_a_file_that_does_not_fit_the_model_is_refused(llama, tmp_path):
    other = tiny_random_llama(seed=0, num_layers=2)
    with pytest.raises(AdapterError, match="no Linear layer"):
        RowAdapter(other.model, write_lora(tmp_path / "deeper", llama.model))  # layers 2, 3 do not exist
    wide = tf.LlamaForCausalLM(tf.LlamaConfig(
        vocab_size=llama.model.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    with pytest.raises(AdapterError, match="in the model, the adapter has"):
        RowAdapter(wide, write_lora(tmp_path / "narrow", llama.model))
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        RowAdapter(llama.model, tmp_path / "missing")


def test_models_that_flatten_rows_are_refused(tmp_path):
    tok = embedded_tokenizer()
    config = CONFIGS["opt"]({"vocab_size": len(tok), "bos_token_id": tok.bos_token_id,
                             "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id})
    opt = tf.AutoModelForCausalLM.from_config(config).eval()
    with pytest.raises(AdapterError, match="flattened rows"):
        RowAdapter(opt, write_lora(tmp_path / "opt", opt, targets=("q_proj", "fc2")))


def test_the_setting_names_a_folder_or_auto_or_none(tmp_path):
    assert adapter_path("none", "embedded") is None
    assert adapter_path("auto", "/models/llama") is None  # only the embedded model has a shipped adapter
    assert adapter_path("auto", "embedded") == (EMBEDDED_ADAPTER if EMBEDDED_ADAPTER.is_dir() else None)
    assert adapter_path(str(tmp_path), "x") == tmp_path
    with pytest.raises(SettingsError, match="--alignment-adapter"):
        Settings(alignment_adapter=str(tmp_path / "nope")).validate()
    Settings(alignment_adapter="none").validate()


def test_auto_follows_the_served_model_not_the_model_setting(tiny_llama):
    from service.compose import load_adapter

    # a caller that hands in its own loaded model with the default settings (model "embedded")
    assert load_adapter(tiny_llama, Settings(alignment_adapter="auto")) is None


@pytest.mark.smollm
def test_the_shipped_adapter_fits_the_embedded_model(smollm):
    assert EMBEDDED_ADAPTER.is_dir(), "the embedded model's alignment adapter is missing from service/assets"
    config = json.loads((EMBEDDED_ADAPTER / "adapter_config.json").read_text())
    adapter = RowAdapter(smollm.model, EMBEDDED_ADAPTER)
    try:
        assert adapter.modules == smollm.model.config.num_hidden_layers * len(config["target_modules"])
        runner = ModelRunner(smollm, None, adapter=adapter)
        ids = prompts(smollm)
        out = runner.prefill(ids, [False] * 3, adapted=[True, False, False])[0].logits
        base = ModelRunner(smollm, None).prefill(ids, [False] * 3)[0].logits
    finally:
        adapter.remove()
    assert torch.equal(out[1:], base[1:])
    assert not torch.allclose(out[0], base[0], atol=1e-3)

"""Tiny random-weight checkpoints of many architectures, saved as Hugging Face folders (no download).

Each has 4 layers and width 64 and carries the embedded model's tokenizer, so `editserve serve --model DIR`
loads it as a user's own checkpoint. Sliding-window models get a window of 8 tokens, shorter than the
prompts, so the windowed attention is exercised; Gemma-2 gets a final logit soft-cap small enough to
change its logits.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from service.engine.loader import embedded_gguf_path

WIDTH, LAYERS, HEADS = 64, 4, 4
SLIDING_WINDOW = 8


def _llama_like(config_class: type, **extra: Any) -> Callable[[dict[str, Any]], Any]:
    def build(common: dict[str, Any]) -> Any:
        return config_class(
            hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=2, max_position_embeddings=512,
            **common, **extra,
        )

    return build


CONFIGS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "llama": _llama_like(tf.LlamaConfig),
    "qwen2": _llama_like(tf.Qwen2Config),
    "qwen3": _llama_like(tf.Qwen3Config, head_dim=16),
    "mistral": _llama_like(tf.MistralConfig, sliding_window=SLIDING_WINDOW),
    "gemma2": _llama_like(
        tf.Gemma2Config, head_dim=16, sliding_window=SLIDING_WINDOW, final_logit_softcapping=1.0,
        attn_logit_softcapping=50.0,
    ),
    "phi3": _llama_like(tf.Phi3Config),
    "gpt2": lambda c: tf.GPT2Config(n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=512, **c),
    "gpt_neox": lambda c: tf.GPTNeoXConfig(
        hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        max_position_embeddings=512, **c,
    ),
    "opt": lambda c: tf.OPTConfig(
        hidden_size=WIDTH, ffn_dim=8 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        word_embed_proj_dim=WIDTH, max_position_embeddings=512, **c,
    ),
    "falcon": lambda c: tf.FalconConfig(
        hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=512,
        **c,
    ),
}

# Architectures the hook layers cannot serve: a mixture of experts has no single MLP down projection.
UNHOOKABLE: dict[str, Callable[[dict[str, Any]], Any]] = {
    "mixtral": _llama_like(tf.MixtralConfig, num_local_experts=2),
}


def embedded_tokenizer() -> Any:
    gguf = embedded_gguf_path()
    tok = tf.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def save_tiny_checkpoint(
    arch: str, folder: Path, *, seed: int = 0, chat_template: bool = True, tokenizer: Any = None
) -> Path:
    """Build `arch` with random weights (a fixed seed) and save it with the tokenizer into `folder`."""
    build = CONFIGS.get(arch) or UNHOOKABLE[arch]
    tok = tokenizer if tokenizer is not None else embedded_tokenizer()
    common = {
        "vocab_size": len(tok), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id, "initializer_range": 0.1, "tie_word_embeddings": False,
    }
    config = build(common)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    saved_template = tok.chat_template
    try:
        if not chat_template:
            tok.chat_template = None
        tok.save_pretrained(folder)
    finally:
        tok.chat_template = saved_template
    if not chat_template:
        for name in ("chat_template.jinja", "chat_template.json"):
            (folder / name).unlink(missing_ok=True)
    return folder

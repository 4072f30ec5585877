"""bench/context_decoding.py's contrast and its decoding loop on a tiny random Llama (the benchmark itself
is run by hand, see docs/free-text-edits.md)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.context_decoding import contrastive_scores, decode  # noqa: E402


def test_alpha_zero_is_plain_decoding_and_the_contrast_favours_what_the_block_adds() -> None:
    with_block = torch.log(torch.tensor([[0.50, 0.40, 0.10]]))
    without = torch.log(torch.tensor([[0.80, 0.10, 0.10]]))
    plain = contrastive_scores(with_block, without, 0.0, 0.1)
    assert torch.equal(plain, with_block)
    contrast = contrastive_scores(with_block, without, 1.0, 0.1)
    assert contrast.argmax(-1).item() == 1  # the answer the block raised wins over the prior's
    assert math.isclose(contrast[0, 1].item(), 2 * math.log(0.4) - math.log(0.1), rel_tol=1e-5)


def test_the_plausibility_cut_keeps_unlikely_tokens_out() -> None:
    with_block = torch.log(torch.tensor([[0.90, 0.08, 0.02]]))
    without = torch.log(torch.tensor([[0.90, 0.09, 0.0001]]))
    scores = contrastive_scores(with_block, without, 1.0, 0.1)
    # token 2 gained the most from the block but is under 0.1 x the top probability: never chosen
    assert scores[0, 2].item() == float("-inf") and scores.argmax(-1).item() == 0


class _Tokenizer:
    eos_token_id, pad_token_id = 1, 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


def test_decode_with_alpha_zero_matches_greedy_generate() -> None:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = tf.LlamaForCausalLM(config).eval()
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    answers = decode(model, model, _Tokenizer(), [(p, p) for p in prompts], 0.0, 0.1, batch=2)
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=1, do_sample=False,
                             eos_token_id=1, pad_token_id=0)[0, len(prompt):].tolist()
        ids = ids[: ids.index(1)] if 1 in ids else ids
        assert answer == " ".join(map(str, ids))
    # alpha > 0 with the same prompt on both sides is the same contrast-free choice
    assert decode(model, model, _Tokenizer(), [(p, p) for p in prompts], 1.0, 0.1, batch=2) == answers

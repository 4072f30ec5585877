"""A lean forward for BERT sentence encoders (mean pooling), the scope detector's hot path.

The Hugging Face BertModel spends most of a one-sentence forward on module and dispatch overhead, not
arithmetic: ~40 linear calls, masks built per layer, dropout no-ops. This walks the same weights with
one fused QKV projection per layer and no per-layer mask construction, and gives the same embedding as
sentence-transformers' Transformer + Pooling(mean) + Normalize pipeline (checked against it at load; a
mismatch, or any other architecture, keeps the sentence-transformers path).

`int8=True` stores the linear weights as int8 with per-output-channel scales and runs them through
`torch._weight_int8pack_mm` on bf16 activations (a CPU kernel that reads 4x fewer weight bytes). Its
embeddings differ from float32 by ~1e-3 in cosine, so it is off by default: turning it on re-derives
nothing, and the scope threshold was calibrated on float32 embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["LeanBert", "lean_bert_for"]


@dataclass
class _Linear:
    weight: torch.Tensor  # [out, in] float32, or int8 when scales is set
    bias: torch.Tensor
    scales: torch.Tensor | None = None

    @classmethod
    def of(cls, weights: list[torch.Tensor], biases: list[torch.Tensor], int8: bool) -> _Linear:
        w = torch.cat([x.detach().float() for x in weights]).contiguous()
        b = torch.cat([x.detach().float() for x in biases]).contiguous()
        if not int8:
            return cls(w, b)
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        return cls(q, b, scales.to(torch.bfloat16))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.scales is None:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch._weight_int8pack_mm(flat, self.weight, self.scales).float() + self.bias
        return out.view(*x.shape[:-1], -1)


def _norm(ln: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return ln.weight.detach().float(), ln.bias.detach().float()


@dataclass
class _Layer:
    qkv: _Linear
    out: _Linear
    ln1: tuple[torch.Tensor, torch.Tensor]
    up: _Linear
    down: _Linear
    ln2: tuple[torch.Tensor, torch.Tensor]


class LeanBert:
    """embed(input_ids, attention_mask) -> [batch, hidden] unit vectors (mean over real tokens)."""

    def __init__(self, bert: Any, *, int8: bool = False) -> None:
        cfg = bert.config
        emb = bert.embeddings
        self.heads = int(cfg.num_attention_heads)
        self.hidden = int(cfg.hidden_size)
        self.eps = float(cfg.layer_norm_eps)
        self.word = emb.word_embeddings.weight.detach().float()
        self.position = emb.position_embeddings.weight.detach().float()
        self.token_type0 = emb.token_type_embeddings.weight.detach().float()[0]
        self.ln_emb = _norm(emb.LayerNorm)
        self.layers: list[_Layer] = []
        for layer in bert.encoder.layer:
            att = layer.attention
            sa = att.self
            self.layers.append(
                _Layer(
                    qkv=_Linear.of(
                        [sa.query.weight, sa.key.weight, sa.value.weight],
                        [sa.query.bias, sa.key.bias, sa.value.bias],
                        int8,
                    ),
                    out=_Linear.of([att.output.dense.weight], [att.output.dense.bias], int8),
                    ln1=_norm(att.output.LayerNorm),
                    up=_Linear.of([layer.intermediate.dense.weight], [layer.intermediate.dense.bias], int8),
                    down=_Linear.of([layer.output.dense.weight], [layer.output.dense.bias], int8),
                    ln2=_norm(layer.output.LayerNorm),
                )
            )

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, t = input_ids.shape
        h, d = self.heads, self.hidden // self.heads
        x = self.word[input_ids] + self.position[:t] + self.token_type0
        x = F.layer_norm(x, (self.hidden,), *self.ln_emb, self.eps)
        real = attention_mask.bool()
        # Additive key mask, built once for all layers; a batch without padding needs none.
        bias = None
        if not bool(real.all()):
            bias = torch.zeros((b, 1, 1, t), dtype=x.dtype).masked_fill(~real[:, None, None, :], -math.inf)
        for lay in self.layers:
            q, k, v = lay.qkv(x).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            a = lay.out(a.transpose(1, 2).reshape(b, t, self.hidden))
            x = F.layer_norm(x + a, (self.hidden,), *lay.ln1, self.eps)
            x = F.layer_norm(x + lay.down(F.gelu(lay.up(x))), (self.hidden,), *lay.ln2, self.eps)
        m = real.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def lean_bert_for(st_model: Any, *, int8: bool = False) -> LeanBert | None:
    """A LeanBert for a sentence-transformers model of exactly Transformer(BERT) + mean Pooling
    (+ Normalize), or None for anything else."""
    try:
        modules = list(st_model)
        names = [type(m).__name__ for m in modules]
        if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
            return None
        bert = modules[0].auto_model
        pooling = modules[1]
        if type(bert).__name__ != "BertModel" or getattr(bert.config, "hidden_act", "") != "gelu":
            return None
        if getattr(bert.config, "position_embedding_type", "absolute") != "absolute":
            return None
        if getattr(pooling, "pooling_mode", None) not in (None, "mean") or not getattr(
            pooling, "pooling_mode_mean_tokens", True
        ):
            return None
        return LeanBert(bert, int8=int8)
    except (AttributeError, TypeError, ValueError):
        return None

"""In-place ROME (Meng et al., 2022), the baseline the field knows. Evaluation only, never on a serving
path: it writes the weights of a PRIVATE deep copy of the model.

One edit = one rank-one update of one MLP down-projection W (d_model x d_ff), no gate, and sequential
edits accumulate in W:
  k*  the down_proj input at the subject's last token, averaged over context prefixes
      (service.hooks.keys.compute_k_star, the same keys the hook layer stores)
  v*  W k* + delta, where delta is ROME's v* optimisation (service.hooks.values.compute_delta: target NLL
      over the contexts + KL on "{subject} is a" + weight decay), run on the current, already edited model
  W' = W + delta (C^-1 k*)^T / (k*^T C^-1 k*)   so that W' k* = v* exactly
C is the uncentred second moment E[k k^T] of down_proj inputs. ROME estimates it on 100k Wikipedia tokens;
no corpus is available offline here, so it is estimated on text the model itself samples from a few
neutral openings (seeded, cached under --out), plus a ridge of 1e-4 * mean eigenvalue for a stable solve.
Model-sampled text keeps the key statistics of ordinary text without looking at the evaluation records
(using the records' own prompts would leak the neighbourhood prompts into C). The update is invariant to
C's scale, so ROME's mom2_update_weight plays no role here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.eval.datasets import EvalRecord
from service.eval.metrics import TokenScores
from service.hooks import Editor, EditSpec, HookManager, default_hook_layers
from service.hooks.arch import find_hook_sites
from service.hooks.keys import compute_k_star
from service.hooks.rows import Row, pad_right
from service.hooks.values import DeltaProblem, compute_delta

log = logging.getLogger(__name__)

COV_OPENINGS = (
    "The",
    "In",
    "A",
    "It was",
    "One of the",
    "According to",
    "During the",
    "Many people",
    "This is",
    "After the",
    "There are",
    "When",
    "Scientists",
    "The city of",
    "His",
    "Her",
)
RIDGE = 1e-4


@dataclass
class RomeEditReport:
    index: int
    seconds: float
    nll: float  # target NLL at the end of the v* optimisation
    converged: bool
    delta_norm: float
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seconds": self.seconds,
            "nll": self.nll,
            "converged": self.converged,
            "delta_norm": self.delta_norm,
            "error": self.error,
        }


@torch.no_grad()
def sample_key_second_moment(
    model: nn.Module,
    tokenizer: Any,
    hooks: HookManager,
    layer: int,
    *,
    n_tokens: int,
    seed: int,
    batch: int = 64,
    length: int = 160,
) -> tuple[torch.Tensor, int]:
    """E[k k^T] of `layer`'s down_proj inputs over model-sampled text (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    dev = hooks.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    acc = torch.zeros(hooks.d_ff, hooks.d_ff, dtype=torch.float64)
    seen = 0
    while seen < n_tokens:
        openings = [COV_OPENINGS[int(i)] for i in torch.randint(len(COV_OPENINGS), (batch,), generator=gen)]
        rows = [list(tokenizer(o)["input_ids"]) for o in openings]
        width = max(len(r) for r in rows)
        ids = torch.full((batch, width), int(pad), dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, row in enumerate(rows):  # left padding: generation continues every row at the same step
            ids[r, width - len(row) :] = torch.tensor(row)
            mask[r, width - len(row) :] = 1
        torch.manual_seed(int(torch.randint(1 << 31, (1,), generator=gen)))
        with hooks.disabled():
            out = model.generate(
                input_ids=ids.to(dev),
                attention_mask=mask.to(dev),
                do_sample=True,
                temperature=1.0,
                top_p=0.95,
                max_new_tokens=length,
                pad_token_id=int(pad),
            )
        full_mask = torch.cat([mask.to(dev), (out[:, width:] != pad).long()], dim=1)
        keys = hooks.keys_at([layer], out, full_mask)[layer].float()
        real = keys[full_mask.bool()].double()
        acc += real.T @ real
        seen += real.shape[0]
    return (acc / seen).float(), seen


def private_copy(model: nn.Module) -> nn.Module:
    """A fresh model of the same architecture holding a copy of the weights. Built from the config, not
    deep-copied: the served model may carry hook wrappers whose thread-local state cannot be copied."""
    from transformers import AutoModelForCausalLM

    param = next(model.parameters())
    clone = AutoModelForCausalLM.from_config(model.config, dtype=param.dtype)
    missing, unexpected = clone.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any("rotary" not in k for k in missing):
        raise RuntimeError(f"private copy does not match: missing {missing}, unexpected {unexpected}")
    clone.tie_weights()
    return clone.to(param.device).eval().requires_grad_(False)


class LocalScorer:
    """Score and greedy generation on a local model, tokenised exactly as the server does (prompt with the
    tokenizer's special tokens, continuation without), as the runner's `Scorer`."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 16) -> None:
        self.model = model
        self.tok = tokenizer
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score_sync(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScores]:
        out: list[TokenScores] = []
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            enc = [
                (list(self.tok(p)["input_ids"]), list(self.tok(c, add_special_tokens=False)["input_ids"]))
                for p, c in chunk
            ]
            ids, mask = pad_right([a + b for a, b in enc], self.pad_id, self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for r, (a, b) in enumerate(enc):
                pos = torch.arange(len(a) - 1, len(a) - 1 + len(b), device=self.device)
                logp = torch.log_softmax(logits[r, pos].float(), dim=-1)
                target = torch.tensor(b, device=self.device)
                argmax = logp.argmax(-1)
                out.append(
                    TokenScores(
                        b,
                        logp.gather(1, target[:, None]).squeeze(1).tolist(),
                        (argmax == target).tolist(),
                        argmax.tolist(),
                    )
                )
        return out

    @torch.no_grad()
    def generate_sync(self, requests: Sequence[tuple[str, int]]) -> list[str]:
        out: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            rows = [list(self.tok(p)["input_ids"]) for p, _ in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for r, row in enumerate(rows):
                ids[r, width - len(row) :] = torch.tensor(row)
                mask[r, width - len(row) :] = 1
            n_max = max(n for _, n in chunk)
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                do_sample=False,
                max_new_tokens=n_max,
                pad_token_id=self.pad_id,
            )
            for r, (_, n) in enumerate(chunk):
                new = gen[r, width : width + n].tolist()
                if self.tok.eos_token_id in new:
                    new = new[: new.index(self.tok.eos_token_id)]
                out.append(self.tok.decode(new, skip_special_tokens=True))
        return out

    async def score_many(self, pairs: Sequence[tuple[str, str]]) -> list[TokenScores]:
        return self.score_sync(pairs)

    async def generate_many(self, requests: Sequence[tuple[str, int]]) -> list[str]:
        return self.generate_sync(requests)


class RomeBaseline:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        layer: int | None = None,
        cov_tokens: int = 40_000,
        seed: int = 0,
        cache_dir: Path | None = None,
    ) -> None:
        self.model = private_copy(model)  # the served model is never written
        self.tok = tokenizer
        self.layer = default_hook_layers(self.model)[0] if layer is None else int(layer)
        # The hook manager only reads keys and injects v*'s delta; its table stays empty (no gate).
        self.hooks = HookManager(self.model, [self.layer])
        self.editor = Editor(self.model, tokenizer, self.hooks)
        down = find_hook_sites(self.model, [self.layer])[self.layer].module
        if not isinstance(down, torch.nn.Linear):  # GPT-2's Conv1D stores the transpose
            raise ValueError(f"the ROME baseline writes nn.Linear weights, not {type(down).__name__}")
        self.weight: torch.Tensor = down.weight  # [d_model, d_ff], written in place
        self.original = self.weight.detach().clone()
        self.cov_inv = self._cov_inverse(cov_tokens, seed, cache_dir)
        self.scorer = LocalScorer(self.model, tokenizer)

    def _cov_inverse(self, n_tokens: int, seed: int, cache_dir: Path | None) -> torch.Tensor:
        # Keyed on the layer's weights too, so a shared cache directory never mixes models.
        tag = hashlib.sha256(self.original.float().numpy().tobytes()).hexdigest()[:12]
        name = f"rome-cov-{tag}-layer{self.layer}-{n_tokens}-seed{seed}.pt"
        path = cache_dir / name if cache_dir else None
        if path is not None and path.exists():
            cov = torch.load(path)["cov"]
        else:
            t0 = time.perf_counter()
            cov, seen = sample_key_second_moment(
                self.model, self.tok, self.hooks, self.layer, n_tokens=n_tokens, seed=seed
            )
            log.info(
                "ROME covariance: %d sampled tokens at layer %d in %.0f s",
                seen,
                self.layer,
                time.perf_counter() - t0,
            )
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save({"cov": cov, "tokens": seen, "layer": self.layer, "seed": seed}, path)
        cov = cov.double()
        ridge = RIDGE * float(torch.diagonal(cov).mean())
        return torch.linalg.inv(cov + ridge * torch.eye(cov.shape[0], dtype=cov.dtype)).float()

    # ---- state -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset(self) -> None:
        self.weight.copy_(self.original)

    def snapshot(self) -> torch.Tensor:
        return self.weight.detach().clone()

    @torch.no_grad()
    def restore(self, weight: torch.Tensor) -> None:
        self.weight.copy_(weight)

    # ---- one edit --------------------------------------------------------------------------------------
    def apply(self, record: EvalRecord) -> RomeEditReport:
        t0 = time.perf_counter()
        try:
            # Only the rewrite prompt, as for the service: paraphrases are the held-out test.
            prep = self.editor._prepare(EditSpec(record.subject, record.prompt, record.target_new))
        except Exception as exc:  # noqa: BLE001 - an invalid record is an outcome, reported per record
            return RomeEditReport(record.index, time.perf_counter() - t0, float("nan"), False, 0.0, str(exc))
        ids, mask = pad_right([r.ids for r in prep.ctx], self.editor.pad_id, self.hooks.device)
        acts = self.hooks.keys_at([self.layer], ids, mask)[self.layer]
        k_star = compute_k_star(
            [acts[r, : len(row.ids)] for r, row in enumerate(prep.ctx)], [row.subject[1] for row in prep.ctx]
        )  # type: ignore[index]
        with torch.no_grad():
            ref_norm = float((self.weight.float() @ k_star).norm())
        problem = DeltaProblem(
            rows=[Row(r.ids + prep.target_ids[:-1], r.subject) for r in prep.ctx] + [prep.kl],
            n_ctx=len(prep.ctx),
            prompt_lens=[len(r.ids) for r in prep.ctx],
            target_ids=prep.target_ids,
        )
        fit = compute_delta(
            self.model,
            self.hooks,
            [self.layer],
            problem,
            max(ref_norm, 1e-3),
            self.editor.vstar,
        )
        delta, stats = fit.deltas[self.layer].float(), fit.stats
        with torch.no_grad():
            u = self.cov_inv @ k_star
            self.weight.add_((torch.outer(delta, u) / torch.dot(u, k_star)).to(self.weight.dtype))
        return RomeEditReport(
            record.index,
            time.perf_counter() - t0,
            float(stats["nll"]),
            bool(stats.get("converged")),
            float(delta.norm()),
        )

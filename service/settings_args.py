"""Settings from the command line and the environment: one flag and one EDITSERVE_<NAME> variable per
`Settings` field, with precedence flag > environment > default. Shared by `editserve serve` and the
evaluation harness (which starts servers with the same settings); imports neither grpc nor torch. The
help of each flag is its field's `metadata["help"]` (service/config.py).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from service.config import Settings, SettingsError

ENV_PREFIX = "EDITSERVE_"

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
        described = field.metadata.get("help") or field.name
        help_text = f"{described} (default: {shown!r}; env {env_name(field.name)})"
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

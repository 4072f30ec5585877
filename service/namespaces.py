"""Edit namespaces: names, validation and the request-side defaults (no torch, no grpc).

Every edit belongs to one namespace (a tenant, a team); a Generate or Score request names the namespaces
whose edits apply to it. Names are short and URL-, label- and file-safe, so they can go into metrics
labels, HTTP headers and token files unquoted.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from service.errors import InvalidArgument

__all__ = [
    "DEFAULT_NAMESPACE",
    "DEFAULT_SCOPE",
    "MAX_NAMESPACE_CHARS",
    "MAX_REQUEST_NAMESPACES",
    "parse_namespace_list",
    "validate_namespace",
    "validate_namespaces",
]

DEFAULT_NAMESPACE = "default"
DEFAULT_SCOPE: frozenset[str] = frozenset({DEFAULT_NAMESPACE})
MAX_NAMESPACE_CHARS = 63  # a DNS label's length: fits Kubernetes names and Prometheus label values
MAX_REQUEST_NAMESPACES = 32
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


def validate_namespace(name: str, field: str = "namespace") -> str:
    """The namespace `name` names ("" = the default one); INVALID_ARGUMENT for anything else."""
    if not name:
        return DEFAULT_NAMESPACE
    if len(name) > MAX_NAMESPACE_CHARS:
        raise InvalidArgument(f"{len(name)} characters; a namespace has at most {MAX_NAMESPACE_CHARS}",
                              field=field)
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"{name[:80]!r} is not a namespace name: lowercase letters, digits, '_' and '-', starting with a "
            "letter or digit", field=field,
        )
    return name


def validate_namespaces(names: Iterable[str], field: str = "namespaces") -> frozenset[str]:
    """A request's namespace list as a set; empty means the default namespace only."""
    names = list(names)
    if len(names) > MAX_REQUEST_NAMESPACES:
        raise InvalidArgument(f"{len(names)} namespaces; a request names at most {MAX_REQUEST_NAMESPACES}",
                              field=field)
    if not names:
        return DEFAULT_SCOPE
    out = set()
    for n, name in enumerate(names):
        if not name:
            raise InvalidArgument("must not be empty", field=f"{field}[{n}]")
        out.add(validate_namespace(name, f"{field}[{n}]"))
    return frozenset(out)


def parse_namespace_list(text: str, field: str = "namespaces") -> frozenset[str]:
    """A comma-separated list (an HTTP header, a command-line flag) as a validated set."""
    return validate_namespaces([p.strip() for p in text.split(",") if p.strip()], field)

"""Credentials: the admin token, and per-namespace tokens from a token file (no grpc, no torch).

Both front ends (gRPC, HTTP) resolve the caller's bearer token to a `Principal` here and ask the same
questions: may it edit these namespaces, may it read them. Token files hold sha256 hashes, never tokens:

    tokens:
      - name: team-a-backend          # shown in errors and logs
        sha256: 5e884898da28...       # printf %s "$TOKEN" | sha256sum
        edit: [team-a]                # namespaces it may edit, roll back, list and inspect
        read: [team-a, default]       # optional: namespaces it may generate from (edit implies read)

A namespace named in any token's `read` list is private: a Generate or Score naming it needs a token that
may read it (or the admin token). Every other namespace stays readable without a token, as before. The
file is YAML (JSON is YAML too); it is read again on SIGHUP and when its modification time changes, so
rotating a token needs no restart. A file that does not parse keeps the previous table (and is logged).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.errors import EditServeError, InvalidArgument, PermissionDenied, Unauthenticated
from service.namespaces import validate_namespace

__all__ = ["Authorizer", "Principal", "TokenFileError", "hash_token", "load_token_file"]

log = logging.getLogger(__name__)
_HEX64 = re.compile(r"[0-9a-f]{64}")
RELOAD_CHECK_S = 1.0  # how often a request may stat the file for changes


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file and the entry."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    name: str
    admin: bool = False
    edit: frozenset[str] = frozenset()
    read: frozenset[str] = frozenset()

    def may_edit(self, namespace: str) -> bool:
        return self.admin or namespace in self.edit

    def may_read(self, namespace: str) -> bool:
        return self.admin or namespace in self.edit or namespace in self.read


@dataclass(frozen=True)
class TokenTable:
    by_hash: dict[str, Principal] = field(default_factory=dict)
    private: frozenset[str] = frozenset()  # namespaces some token's `read` names


def load_token_file(path: Path) -> TokenTable:
    try:
        import yaml

        doc: Any = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise TokenFileError(f"token file {path}: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - yaml's errors: any parse failure is "cannot use it"
        raise TokenFileError(f"token file {path} is not YAML/JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("tokens"), list):
        raise TokenFileError(f"token file {path}: expected a mapping with a 'tokens' list")
    by_hash: dict[str, Principal] = {}
    private: set[str] = set()
    for n, entry in enumerate(doc["tokens"]):
        where = f"token file {path}: tokens[{n}]"
        if not isinstance(entry, dict):
            raise TokenFileError(f"{where} is not a mapping")
        unknown = sorted(set(entry) - {"name", "sha256", "edit", "read"})
        if unknown:
            raise TokenFileError(f"{where}: unknown key(s) {', '.join(unknown)}")
        digest = str(entry.get("sha256", "")).strip().lower()
        if not _HEX64.fullmatch(digest):
            raise TokenFileError(f"{where}: sha256 must be 64 hex digits (printf %s TOKEN | sha256sum)")
        if digest in by_hash:
            raise TokenFileError(f"{where}: the same token hash appears twice")
        name = str(entry.get("name") or f"token {n}")
        spaces: dict[str, frozenset[str]] = {}
        for key in ("edit", "read"):
            values = entry.get(key) or []
            if not isinstance(values, list):
                raise TokenFileError(f"{where}: {key} must be a list of namespaces")
            try:
                spaces[key] = frozenset(validate_namespace(str(v), f"{key}") for v in values)
            except InvalidArgument as exc:
                raise TokenFileError(f"{where}: {exc}") from None
        private |= spaces["read"]
        by_hash[digest] = Principal(name=name, edit=spaces["edit"], read=spaces["read"])
    return TokenTable(by_hash, frozenset(private))


class Authorizer:
    """Resolves bearer tokens and answers the namespace questions for both front ends."""

    def __init__(self, admin_token: str = "", token_file: str | Path = "") -> None:
        self._admin = admin_token.encode()
        self._path = Path(token_file) if token_file else None
        self._lock = threading.Lock()
        self._table = TokenTable()
        self._mtime: float | None = None
        self._checked = 0.0
        if self._path is not None:
            self._table = load_token_file(self._path)  # a bad file at start stops the start
            self._mtime = _mtime(self._path)

    @property
    def enabled(self) -> bool:
        """Whether EditService calls need a token (an admin token or a token file is configured)."""
        return bool(self._admin) or self._path is not None

    @property
    def private_namespaces(self) -> frozenset[str]:
        return self._table.private

    def reload(self) -> bool:
        """Read the token file again (SIGHUP, or its modification time changed); False when it does not
        parse, and the previous table stays."""
        if self._path is None:
            return True
        with self._lock:
            try:
                table = load_token_file(self._path)
            except TokenFileError as exc:
                log.error("%s; keeping the previous %d token(s)", exc, len(self._table.by_hash))
                self._mtime = _mtime(self._path)
                return False
            self._table, self._mtime = table, _mtime(self._path)
        log.info("token file %s: %d token(s)", self._path, len(table.by_hash))
        return True

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        now = time.monotonic()
        if now - self._checked < RELOAD_CHECK_S:
            return
        self._checked = now
        if _mtime(self._path) != self._mtime:
            self.reload()

    def principal(self, authorization: str | None) -> Principal | None:
        """The caller of an `authorization` header value; None without one. A token that is neither the
        admin token nor in the file is PERMISSION_DENIED, a malformed header UNAUTHENTICATED."""
        if not authorization:
            return None
        scheme, _, presented = authorization.strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise Unauthenticated("the authorization header must be 'Bearer <token>'")
        # Constant-time: the comparison must not tell an attacker how many leading bytes matched.
        if self._admin and hmac.compare_digest(presented.encode(), self._admin):
            return Principal(name="admin", admin=True)
        self._maybe_reload()
        found = self._table.by_hash.get(hash_token(presented))
        if found is None:
            raise PermissionDenied("the token is not valid")
        return found

    def reader(self, authorization: str | None) -> Principal | None:
        """The caller of a read (Generate, Score, the HTTP API): like `principal`, but a token that is not
        valid is a principal without rights rather than an error, so a client that always sends some key
        (the openai client does) reads public namespaces as before; a private one is PERMISSION_DENIED."""
        try:
            return self.principal(authorization)
        except EditServeError:
            return Principal(name="(a token that is not valid)")

    # ---- the questions --------------------------------------------------------------------------

    def require_editor(self, principal: Principal | None) -> None:
        """EditService: with credentials configured, every call needs a valid token."""
        if self.enabled and principal is None:
            raise Unauthenticated("EditService needs 'authorization: Bearer <token>'")

    def check_edit(
        self, principal: Principal | None, namespaces: Iterable[str], field: str = "namespace"
    ) -> None:
        if not self.enabled:
            return
        self.require_editor(principal)
        assert principal is not None
        for ns in sorted(set(namespaces)):
            if not principal.may_edit(ns):
                raise PermissionDenied(f"token {principal.name!r} may not edit namespace {ns!r}", field=field)

    def check_all_namespaces(self, principal: Principal | None, what: str) -> None:
        """An operation over every namespace (RollbackTo or ListEdits without one): the admin's only."""
        if not self.enabled:
            return
        self.require_editor(principal)
        assert principal is not None
        if not principal.admin:
            raise PermissionDenied(f"{what} over every namespace needs the admin token; name a namespace "
                                   f"token {principal.name!r} may edit", field="namespace")

    def check_inspect(self, principal: Principal | None, namespace: str) -> None:
        """GetEdit, ListEdits of one namespace: editors and readers of it."""
        if not self.enabled:
            return
        self.require_editor(principal)
        assert principal is not None
        if not principal.may_read(namespace):
            raise PermissionDenied(f"token {principal.name!r} may not see namespace {namespace!r}",
                                   field="namespace")

    def check_read(self, principal: Principal | None, namespaces: Iterable[str]) -> None:
        """Generate / Score: a private namespace needs a token that may read it."""
        private = self._table.private
        for ns in sorted(set(namespaces)):
            if ns in private and not (principal is not None and principal.may_read(ns)):
                if principal is None:
                    raise Unauthenticated(f"namespace {ns!r} is private: send 'authorization: Bearer "
                                          "<token>' with a token that may read it", field="namespaces")
                raise PermissionDenied(f"token {principal.name!r} may not read namespace {ns!r}",
                                       field="namespaces")


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


def is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, EditServeError) and exc.code in ("UNAUTHENTICATED", "PERMISSION_DENIED")

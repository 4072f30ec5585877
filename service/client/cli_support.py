"""Shared plumbing of the client subcommands: the server address, the admin token, the actor and the
blocking client they connect with, the exit codes, and `CommandError` for mistakes a command finds itself.
"""

from __future__ import annotations

import argparse
import getpass
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .client import EditServeClient

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A mistake the command itself finds (an unreadable token file, a refused confirmation)."""


def default_address(env: Mapping[str, str]) -> str:
    """$EDITSERVE_ADDRESS, else 127.0.0.1 on $EDITSERVE_PORT (default 50051)."""
    return env.get("EDITSERVE_ADDRESS") or f"127.0.0.1:{env.get('EDITSERVE_PORT') or 50051}"


def read_token(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """--token-file beats $EDITSERVE_ADMIN_TOKEN (the flag-beats-environment rule of `editserve serve`)."""
    if args.token_file is not None:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise CommandError(
                f"cannot read the token file {args.token_file}: {exc.strerror or exc}"
            ) from None
        if not token:
            raise CommandError(f"the token file {args.token_file} is empty")
        return token
    return env.get("EDITSERVE_ADMIN_TOKEN") or None


def actor_of(args: argparse.Namespace, env: Mapping[str, str]) -> str:
    """--actor, else $EDITSERVE_ACTOR, else the login name (empty where there is none)."""
    if args.actor is not None:
        return args.actor
    if env.get("EDITSERVE_ACTOR"):
        return env["EDITSERVE_ACTOR"]
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name in a bare container
        return ""


def make_client(args: argparse.Namespace, env: Mapping[str, str]) -> EditServeClient:
    """A blocking client for --address, --token-file and --timeout (grpc is imported only now)."""
    from .client import EditServeClient, RetryPolicy
    from .requests import Timeouts

    timeouts = Timeouts() if args.timeout is None else Timeouts(args.timeout, args.timeout, args.timeout)
    # A terminal user waits a few seconds for a server that is starting, not a minute.
    retry = RetryPolicy(attempts=3, initial_backoff_s=0.3)
    return EditServeClient(
        args.address or default_address(env), token=read_token(args, env), timeouts=timeouts, retry=retry
    )

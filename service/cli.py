"""`editserve` command line (also `python -m service`); the served stack is built by service/compose.py.

    editserve serve [flags]   run the gRPC server (every Settings field is a flag and an EDITSERVE_* env var)
    editserve eval  [flags]   the evaluation harness (service/eval), imported only when asked for
    editserve health          exit 0 when a server's grpc.health.v1 check says SERVING (container probes)
    editserve generate | score | edit | edits | info
                              client commands against a running server (service/client/cli.py)

Precedence for each setting: command-line flag > EDITSERVE_<NAME> environment variable > default.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from service import __version__
from service.client.cli import add_client_commands
from service.config import Settings, SettingsError
from service.settings_args import add_settings_arguments, env_name, settings_from

EXIT_USAGE = 2
HEALTH_TIMEOUT_S = 3.0  # `editserve health`: a server that has not answered by then is not serving


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editserve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"editserve {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the gRPC server",
        description="Serve the model over gRPC. Each flag is also read from EDITSERVE_<NAME> (flag wins).",
    )
    add_settings_arguments(serve)
    serve.set_defaults(handler=run_serve)
    # eval's flags belong to service/eval; it is imported only when this subcommand runs.
    # Its arguments are whatever `run` leaves unparsed (argparse's REMAINDER drops leading options).
    evaluate = commands.add_parser("eval", help="run the evaluation harness (see `editserve eval --help`)",
                                   add_help=False)
    evaluate.set_defaults(handler=run_eval)
    health = commands.add_parser("health", help="check a running server's grpc.health.v1 status")
    health.add_argument("--address", default=None,
                        help=f"host:port (default: 127.0.0.1 and {env_name('port')} or 50051)")
    health.add_argument("--service", default="", help='service name; "" = the whole server')
    health.add_argument("--timeout", type=float, default=HEALTH_TIMEOUT_S, help="seconds")
    health.set_defaults(handler=run_health)
    add_client_commands(commands)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def run_serve(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        settings = settings_from(args, env)
        settings.validate()
    except SettingsError as exc:
        print(f"editserve serve: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level)
    # Importing compose is cheap (grpc, no torch): its builders import the model stack when called,
    # so the server binds and answers at once and torch loads in the loading thread below.
    from service import compose

    def load_data_plane() -> Any:
        from service.engine.cpu_threads import set_torch_threads

        set_torch_threads(settings.torch_threads)  # the main thread runs no torch: all threads get this count
        return compose.load_data_plane(settings)

    return asyncio.run(compose.serve(settings, load_data_plane))


def run_eval(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        eval_cli = importlib.import_module("service.eval.cli")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("service.eval"):
            raise
        print("editserve eval: error: the evaluation harness (service/eval) is not part of this build",
              file=sys.stderr)
        return EXIT_USAGE
    parser = argparse.ArgumentParser(prog="editserve eval")
    eval_cli.add_arguments(parser)
    return int(eval_cli.run(parser.parse_args(args.eval_args)))


def run_health(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = args.address or f"127.0.0.1:{env.get(env_name('port'), Settings.port)}"
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            print(f"{address}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def run(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "eval":
        args.eval_args = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return args.handler(args, os.environ if env is None else env)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()

"""Command line: `dynapm -c conf.yaml`, `dynapm check -c conf.yaml`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

import uvloop

from dynapm import __version__, config, logs
from dynapm.errors import ConfigError

logger = logging.getLogger("dynapm.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynapm",
        description="On-demand gateway: starts services on first request, "
        "stops them when idle.",
    )
    parser.add_argument("--version", action="version", version=f"dynapm {__version__}")
    parser.add_argument("-c", "--config", help="configuration file (YAML)")
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser("check", help="validate the configuration file")
    check.add_argument("-c", "--config", dest="sub_config", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.sub_config)
    if not args.config:
        print("dynapm: missing -c conf.yaml (see dynapm --help)", file=sys.stderr)
        return EXIT_CONFIG
    return _serve(args.config)


def _load(path: str) -> config.Config | None:
    try:
        return config.load(path)
    except ConfigError as err:
        print(f"dynapm: configuration error: {err}", file=sys.stderr)
        return None


def _check(path: str) -> int:
    loaded = _load(path)
    if loaded is None:
        return EXIT_CONFIG
    print(f"{path}: OK")
    print(config.routing_table(loaded))
    return EXIT_OK


def _serve(path: str) -> int:
    loaded = _load(path)
    if loaded is None:
        return EXIT_CONFIG
    logs.setup(loaded.logging.level, loaded.logging.format)
    from dynapm.gateway import Gateway, ListenError

    async def run() -> None:
        gateway = Gateway(loaded, asyncio.get_running_loop())
        await gateway.run()

    try:
        uvloop.run(run())
    except ListenError as err:
        print(f"dynapm: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        pass
    return EXIT_OK

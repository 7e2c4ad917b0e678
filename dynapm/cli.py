"""Command line: `dynapm -c conf.yaml`, `dynapm check -c conf.yaml`, and the
admin commands `dynapm status`, `dynapm start NAME`, `dynapm stop NAME`."""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import socket
import sys
import time

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
    check.add_argument(
        "-c", "--config", dest="sub_config", metavar="CONFIG", default=None
    )
    status = commands.add_parser("status", help="list services (admin API)")
    _admin_options(status)
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    for name, text in (("start", "start a service"), ("stop", "stop a service")):
        sub = commands.add_parser(name, help=f"{text} and wait (admin API)")
        sub.add_argument("name", help="service name")
        _admin_options(sub)
    return parser


def _admin_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "-c", "--config", dest="sub_config", help="find the admin API in this file"
    )
    sub.add_argument("--admin", help="admin API address HOST:PORT ($DYNAPM_ADMIN)")
    sub.add_argument("--token", help="admin API token ($DYNAPM_TOKEN)")
    sub.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="seconds to wait for an answer (default 300)",
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":
        path = args.sub_config or args.config
        if not path:
            print("dynapm check: missing -c conf.yaml", file=sys.stderr)
            return EXIT_CONFIG
        return _check(path)
    if args.command in ("status", "start", "stop"):
        return _admin_command(args)
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


# --------------------------------------------------------------------------
# Admin commands: clients of the admin API, standard library only.


class _AdminUnavailable(Exception):
    """The admin API is off, unreachable or refused us: one line, exit 1."""


def _admin_target(args) -> tuple[str, int, str | None, str] | int:
    """(host, port, token, where the address came from), or an exit status.

    The address comes from --admin, else the config file, else
    $DYNAPM_ADMIN, else the default admin address; the token from --token,
    else the config file, else $DYNAPM_TOKEN.
    """
    path = args.sub_config or args.config
    loaded = None
    if path:
        loaded = _load(path)
        if loaded is None:
            return EXIT_CONFIG
        if loaded.admin is None and not args.admin:
            raise _AdminUnavailable(
                f"the admin API is off in {path} (no 'admin' section)"
            )
    token = args.token
    if token is None and loaded is not None and loaded.admin is not None:
        token = loaded.admin.token
    if token is None:
        token = os.environ.get("DYNAPM_TOKEN") or None
    if args.admin:
        text, origin = args.admin, "--admin"
    elif loaded is not None:
        text, origin = str(loaded.admin.listen), path
    elif os.environ.get("DYNAPM_ADMIN"):
        text, origin = os.environ["DYNAPM_ADMIN"], "DYNAPM_ADMIN"
    else:
        text, origin = str(config._DEFAULT_ADMIN_LISTEN), "the default address"
    try:
        address = config._parse_address(text)
    except ValueError as err:
        raise _AdminUnavailable(f"bad admin address from {origin}: {err}") from None
    host = address.host
    # A wildcard listener is reached through the loopback of its family.
    if host == "0.0.0.0":
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, address.port, token, origin


def _admin_call(target, method: str, path: str, timeout: float):
    host, port, token, origin = target
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, headers=headers)
        response = conn.getresponse()
        body = response.read()
    except (OSError, http.client.HTTPException) as err:
        reason = (
            "timed out"
            if isinstance(err, socket.timeout)
            else (getattr(err, "strerror", None) or str(err) or type(err).__name__)
        )
        raise _AdminUnavailable(
            f"cannot reach the admin API at {shown} (from {origin}): {reason}"
        ) from None
    finally:
        conn.close()
    if response.status == 401:
        raise _AdminUnavailable(
            f"the admin API at {shown} wants a valid token (--token or DYNAPM_TOKEN)"
        )
    if response.status == 403:
        raise _AdminUnavailable(
            f"the admin API at {shown} refuses this client (see admin.allow)"
        )
    try:
        data = json.loads(body) if body else {}
    except ValueError:
        data = {}
    return response.status, data


def _admin_command(args) -> int:
    try:
        target = _admin_target(args)
        if isinstance(target, int):
            return target
        if args.command == "status":
            return _status(args, target)
        return _control(args, target)
    except _AdminUnavailable as err:
        print(f"dynapm: {err}", file=sys.stderr)
        return EXIT_FAILURE


def _status(args, target) -> int:
    status, data = _admin_call(target, "GET", "/api/services", args.timeout)
    if status != 200 or "services" not in data:
        raise _AdminUnavailable(f"unexpected answer from the admin API: {status}")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(_services_table(data["services"], time.time()))
    return EXIT_OK


def _control(args, target) -> int:
    name = args.name
    path = f"/api/services/{name}/{args.command}"
    status, data = _admin_call(target, "POST", path, args.timeout)
    if status == 200:
        print(f"{name}: {_state_line(data)}")
        return EXIT_OK
    if status in (404, 405):
        # 405: a name like "x/y" reached another route; it is no service.
        message = f"no service named '{name}'"
    else:
        message = data.get("error") or f"the admin API answered {status}"
    print(f"dynapm: {message}", file=sys.stderr)
    return EXIT_FAILURE


def _state_line(info: dict) -> str:
    parts = []
    if info.get("pid"):
        parts.append(f"pid {info['pid']}")
    if info.get("status") == "online" and info.get("last_start_ms") is not None:
        parts.append(f"last start {_ms(info['last_start_ms'])}")
    extra = f" ({', '.join(parts)})" if parts else ""
    return f"{info.get('status', '?')}{extra}"


def _services_table(services: list[dict], now: float) -> str:
    if not services:
        return "no services"
    header = (
        "NAME",
        "STATUS",
        "PID",
        "UPTIME",
        "STARTS",
        "LAST START",
        "ACTIVE",
        "LAST REQUEST",
        "ROUTES",
    )
    rows = [header]
    for info in services:
        started = info.get("started_at")
        uptime = _duration(now - started) if started else "-"
        last = info.get("last_request_at")
        status = info.get("status", "?")
        if info.get("proxy_only"):
            status += " (proxy)"
        rows.append(
            (
                str(info.get("name")),
                status,
                str(info.get("pid") or "-"),
                uptime,
                str(info.get("start_count", 0)),
                _ms(info.get("last_start_ms")),
                str(info.get("active_connections", 0)),
                _duration(now - last) + " ago" if last else "never",
                ", ".join(_route(route) for route in info.get("routes", [])),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(lines)


def _route(route: dict) -> str:
    where = route["host"] if "host" in route else f":{route.get('port')}"
    return f"{where} -> {route.get('upstream')}"


def _ms(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.0f}ms"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"

"""The configuration file: YAML in, frozen dataclasses out.

Everything is validated here, before any listener opens, so that a mistake is
reported once as a ConfigError naming the file, the line, the dotted key path
and the problem, instead of surfacing later as a failed start or a traceback.

The file is composed into a YAML node tree (never constructed into Python
objects wholesale) because only nodes carry line numbers; scalars are
converted one at a time with PyYAML's safe constructor.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any, NamedTuple, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from dynapm.errors import ConfigError

__all__ = [
    "Address",
    "Admin",
    "Config",
    "Health",
    "Limits",
    "Logging",
    "Route",
    "Service",
    "Upstream",
    "load",
    "loads",
    "parse_duration",
    "parse_size",
    "routing_table",
]

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
# Limits are held in C integers by the proxy; anything larger is a mistake.
MAX_SIZE = 1024 * 1024 * GIB


# --------------------------------------------------------------------------
# The configuration model


@dataclass(frozen=True)
class Address:
    """A host and port to listen on."""

    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Upstream:
    """Where requests go: ``url`` is normalised to ``http://host[:port]``."""

    url: str
    host: str
    port: int

    @property
    def hostport(self) -> str:
        """The authority for the Host header, written as in the URL."""
        return self.url.partition("://")[2]

    def __str__(self) -> str:
        return self.url


@dataclass(frozen=True)
class Route:
    """One way a request reaches a service: a Host name or a dedicated port."""

    upstream: Upstream
    host: str | None = None
    port: int | None = None


@dataclass(frozen=True)
class Health:
    """The readiness probe run after a start, before requests are forwarded."""

    type: str
    url: str | None
    expect_status: int | None
    command: str | None
    interval: float
    timeout: float


@dataclass(frozen=True)
class Service:
    """One service; ``routes`` is fully expanded from hosts, ports and routes."""

    name: str
    upstream: Upstream | None
    hosts: tuple[str, ...]
    ports: tuple[int, ...]
    routes: tuple[Route, ...]
    run: str | None
    start: str | None
    stop: str | None
    check: str | None
    cwd: str | None
    env: tuple[tuple[str, str], ...]
    log: str | None
    proxy_only: bool
    idle_timeout: float
    start_timeout: float
    stop_timeout: float
    preserve_host: bool
    health: Health

    @property
    def probe_upstream(self) -> Upstream:
        """The upstream the default tcp probe (and the default http url) targets."""
        if self.upstream is not None:
            return self.upstream
        return self.routes[0].upstream

    @property
    def mode(self) -> str:
        """How the service runs: ``run``, ``start`` or ``proxy_only``."""
        if self.run is not None:
            return "run"
        if self.start is not None:
            return "start"
        return "proxy_only"


@dataclass(frozen=True)
class Limits:
    max_body: int
    max_header: int
    header_timeout: float
    keepalive_timeout: float
    upstream_timeout: float
    shutdown_timeout: float


@dataclass(frozen=True)
class Logging:
    level: str
    format: str
    access_log: bool


@dataclass(frozen=True)
class Admin:
    listen: Address
    token: str | None
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


@dataclass(frozen=True)
class Config:
    path: str
    listen: Address
    admin: Admin | None
    logging: Logging
    limits: Limits
    services: tuple[Service, ...]


# --------------------------------------------------------------------------
# Public entry points


def load(path: str) -> Config:
    """Read and validate the file at ``path``; raises ConfigError only."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        reason = err.strerror or str(err)
        raise ConfigError(f"cannot read the file: {reason}", file=path) from err
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"not UTF-8 text (byte {err.start}: {err.reason})", file=path, line=line
        ) from err
    return loads(text, path)


def loads(text: str, path: str = "<string>") -> Config:
    """Validate configuration text; relative paths resolve against dirname(path)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as err:
        raise _yaml_error(err, path, text) from err
    except RecursionError as err:
        raise ConfigError("the YAML is nested too deeply", file=path) from err
    base = os.path.dirname(os.path.abspath(path))
    return _Parser(path, base).config(root)


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string like ``250ms``, ``1.5s``, ``5m``, ``1h30m``.

    Raises ValueError for anything else, negative values included.
    """
    expected = f"expected a duration like 30s or 250ms, got {_show(value)}"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, (int, float)):
        try:
            seconds = float(value)
        except OverflowError:
            raise ValueError(f"duration {_show(value)} is too large") from None
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"a duration cannot be negative, got {_show(value)}")
        if _PLAIN_NUMBER.fullmatch(text):
            seconds = float(text)
        elif _DURATION.fullmatch(text):
            seconds = sum(
                float(number) * _DURATION_UNITS[unit]
                for number, unit in _DURATION_PART.findall(text)
            )
        else:
            raise ValueError(expected)
    else:
        raise ValueError(expected)
    if math.isnan(seconds):
        raise ValueError(expected)
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {_show(value)}")
    if math.isinf(seconds):
        raise ValueError(f"duration {_show(value)} is too large")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from a number or a string like ``64KiB``, ``100MiB``, ``10MB``, ``123``.

    KiB/MiB/GiB are powers of 1024, KB/MB/GB powers of 1000; fractions of a
    byte are dropped. Raises ValueError for anything else, negative included.
    """
    expected = f"expected a size like 64KiB, 100MiB or 1GB, got {_show(value)}"
    if isinstance(value, bool):
        raise ValueError(expected)
    if isinstance(value, int):
        size = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(expected)
        size = Fraction(value)
    elif isinstance(value, str):
        text = value.strip()
        if text.startswith("-"):
            raise ValueError(f"a size cannot be negative, got {_show(value)}")
        match = _SIZE.fullmatch(text)
        if match is None or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(expected)
        size = Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        raise ValueError(expected)
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {_show(value)}")
    return int(size)


def routing_table(config: Config) -> str:
    """A table for ``dynapm check``: one line per route, in file order."""
    rows = [("LISTEN", "HOST", "UPSTREAM", "SERVICE", "MODE", "IDLE")]
    for service in config.services:
        if service.proxy_only:
            idle = "-"
        elif service.idle_timeout == 0:
            idle = "never"
        else:
            idle = _format_duration(service.idle_timeout)
        for route in service.routes:
            if route.port is None:
                listen, host = str(config.listen), route.host or ""
            else:
                listen, host = str(Address(config.listen.host, route.port)), "*"
            rows.append(
                (listen, host, route.upstream.url, service.name, service.mode, idle)
            )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(width) for cell, width in zip(row, widths, strict=True)
        ).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Value parsers shared by the public functions and the file parser

_PLAIN_NUMBER = re.compile(r"(?:\d+(?:\.\d*)?|\.\d+)")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)")
_DURATION = re.compile(r"(?:(?:\d+(?:\.\d+)?|\.\d+)\s*(?:ms|s|m|h)\s*)+")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([A-Za-z]*)")
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kib": KIB,
    "mib": MIB,
    "gib": GIB,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}
# Service names appear in admin URLs (/api/services/NAME), so they are kept
# to characters that need no escaping there.
_SERVICE_NAME = re.compile(r"[A-Za-z0-9._-]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9._-]+")
_PORT_DIGITS = re.compile(r"[0-9]+")


def _show(value: Any) -> str:
    """A value as the user wrote it in YAML terms, for error messages."""
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"


def _format_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, rest = divmod(rest, 60)
    parts = []
    if hours:
        parts.append(f"{int(hours)}h")
    if minutes:
        parts.append(f"{int(minutes)}m")
    if rest:
        parts.append(f"{rest:g}s")
    return "".join(parts)


def _parse_port(text: str, whole: str) -> int:
    if not _PORT_DIGITS.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise ValueError(f"the port must be a number from 1 to 65535, got {whole!r}")
    return int(text)


def _parse_ipv6(text: str, whole: str) -> str:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        raise ValueError(f"'{text}' is not an IPv6 address, in {whole!r}") from None
    return text


def _parse_address(text: str) -> Address:
    how = f"expected host:port, like 127.0.0.1:3000 or [::1]:3000; got {text!r}"
    host, colon, port = text.strip().rpartition(":")
    if not colon or not host or not port:
        raise ValueError(how)
    if host.startswith("[") and host.endswith("]"):
        host = _parse_ipv6(host[1:-1], text)
    elif ":" in host:
        raise ValueError(
            f"write an IPv6 address in brackets, like [::1]:3000; got {text!r}"
        )
    elif not _HOSTNAME.fullmatch(host):
        raise ValueError(how)
    if not _PORT_DIGITS.fullmatch(port) or not 1 <= int(port) <= 65535:
        raise ValueError(
            "the port must be a number from 1 to 65535: write host:port, like "
            f"127.0.0.1:3000 or [::1]:3000; got {text!r}"
        )
    return Address(host.lower(), int(port))


def _split_authority(authority: str, whole: str) -> tuple[str, int | None, str]:
    """(host, port or None, normalised authority) of ``host[:port]``."""
    if "@" in authority:
        raise ValueError(f"user credentials in a URL are not supported: {whole!r}")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {whole!r}")
        host = _parse_ipv6(authority[1:end], whole).lower()
        shown = f"[{host}]"
        rest = authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"unexpected text after ']' in {whole!r}")
        port_text = rest[1:] if rest else None
    else:
        host, colon, port_text = authority.partition(":")
        if ":" in port_text:
            raise ValueError(
                f"write an IPv6 address in brackets, like http://[::1]:3001; "
                f"got {whole!r}"
            )
        host = host.lower()
        shown = host
        if not colon:
            port_text = None
        if not _HOSTNAME.fullmatch(host):
            raise ValueError(f"missing or invalid host name in {whole!r}")
    if port_text is None:
        return host, None, shown
    port = _parse_port(port_text, whole)
    return host, port, f"{shown}:{port}"


def _split_http_url(text: str, example: str) -> tuple[str, str]:
    """(authority, rest) of an http:// URL, with reasons for the usual mistakes."""
    scheme, sep, rest = text.strip().partition("://")
    if not sep:
        raise ValueError(f"expected a URL like {example}, got {text!r}")
    scheme = scheme.lower()
    if scheme == "https":
        raise ValueError(
            "https is not supported: DynaPM talks plain HTTP to the services "
            f"behind it, write http:// ({text!r})"
        )
    if scheme != "http":
        raise ValueError(
            f"unsupported scheme '{scheme}': expected a URL like {example}, "
            f"got {text!r}"
        )
    cut = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    return rest[:cut], rest[cut:]


def _parse_upstream(text: str) -> Upstream:
    authority, rest = _split_http_url(text, "http://127.0.0.1:3001")
    if rest not in ("", "/"):
        raise ValueError(
            "an upstream is http://host[:port] without a path or query "
            f"(requests keep their own path), got {text!r}"
        )
    host, port, shown = _split_authority(authority, text)
    return Upstream(url=f"http://{shown}", host=host, port=80 if port is None else port)


def _parse_http_url(text: str) -> str:
    authority, _ = _split_http_url(text, "http://127.0.0.1:3001/health")
    _split_authority(authority, text)
    return text.strip()


def _check_host(text: str) -> str:
    if not text:
        raise ValueError("a host name cannot be empty")
    if ":" in text:
        raise ValueError(
            f"a host name cannot contain ':' ({text!r}): the port in the Host "
            "header is ignored; use 'ports' for a dedicated port"
        )
    if "/" in text:
        raise ValueError(f"a host name cannot contain '/' ({text!r}): not a URL")
    if any(char.isspace() for char in text):
        raise ValueError(f"a host name cannot contain spaces ({text!r})")
    if "*" in text:
        raise ValueError(f"wildcards are not supported ({text!r}): list each name")
    return text.lower()


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1)
    if close:
        return f"unknown key '{key}'; did you mean '{close[0]}'?"
    return f"unknown key '{key}'; expected one of: {', '.join(allowed)}"


def _line(node: Node | None) -> int | None:
    return None if node is None else node.start_mark.line + 1


def _yaml_error(err: yaml.YAMLError, path: str, text: str) -> ConfigError:
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context or "invalid YAML"
        if err.context and err.problem:
            context_line = _line_of_mark(err.context_mark)
            where = f" at line {context_line}" if context_line else ""
            problem = f"{problem} ({err.context}{where})"
        line = None if mark is None else mark.line + 1
        if mark is not None and _starts_with_colons(text, mark):
            # PyYAML follows YAML 1.1, where a plain scalar inside [...] or
            # {...} cannot start with ':', so `[127.0.0.1/32, ::1]` fails.
            problem += "; quote IPv6 addresses that start with ':', like '::1'"
        return ConfigError(f"invalid YAML: {problem}", file=path, line=line)
    if isinstance(err, yaml.reader.ReaderError):
        line = text[: err.position].count("\n") + 1
        char = err.character
        shown = f"#x{char:04x}" if isinstance(char, int) else repr(char)
        return ConfigError(
            f"invalid YAML: character {shown} is not allowed ({err.reason})",
            file=path,
            line=line,
        )
    return ConfigError(f"invalid YAML: {err}", file=path)


def _line_of_mark(mark: Any) -> int | None:
    return None if mark is None else mark.line + 1


def _starts_with_colons(text: str, mark: Any) -> bool:
    lines = text.splitlines()
    if mark.line >= len(lines):
        return False
    return lines[mark.line][mark.column :].startswith("::")


# --------------------------------------------------------------------------
# The file parser

_TOP_KEYS = ("listen", "admin", "logging", "limits", "defaults", "services")
_ADMIN_KEYS = ("listen", "token", "allow")
_LOGGING_KEYS = ("level", "format", "access_log")
_LIMIT_KEYS = (
    "max_body",
    "max_header",
    "header_timeout",
    "keepalive_timeout",
    "upstream_timeout",
    "shutdown_timeout",
)
_SERVICE_KEYS = (
    "upstream",
    "hosts",
    "ports",
    "routes",
    "run",
    "start",
    "stop",
    "check",
    "cwd",
    "env",
    "log",
    "proxy_only",
    "idle_timeout",
    "start_timeout",
    "stop_timeout",
    "preserve_host",
    "health",
)
_MODE_KEYS = ("run", "start", "proxy_only")
_ROUTE_KEYS = ("host", "port", "upstream")
_HEALTH_KEYS = ("type", "url", "expect_status", "command", "interval", "timeout")
_HEALTH_TYPES = ("tcp", "http", "command", "none")
_HEALTH_USES = {
    "tcp": ("type", "interval", "timeout"),
    "http": ("type", "url", "expect_status", "interval", "timeout"),
    "command": ("type", "command", "interval", "timeout"),
    "none": ("type",),
}
# uvloop converts timer delays to integer milliseconds; an absurd duration
# would overflow there long after the config was accepted.
_MAX_DURATION = 365 * 24 * 3600.0

_NULL_TAG = "tag:yaml.org,2002:null"
_MERGE_TAG = "tag:yaml.org,2002:merge"

_DEFAULT_LISTEN = Address("127.0.0.1", 3000)
_DEFAULT_HEALTH = Health("tcp", None, None, None, 0.01, 1.0)
_DEFAULT_ADMIN_LISTEN = Address("127.0.0.1", 4000)
_DEFAULT_ALLOW = (
    ipaddress.IPv4Network("127.0.0.1/32"),
    ipaddress.IPv6Network("::1/128"),
)


class _Field(NamedTuple):
    """A key as written: its nodes (for line numbers) and its dotted path."""

    key: Node
    node: Node
    path: str

    @property
    def inherited(self) -> bool:
        return self.path.startswith("defaults.")


class _RouteSpec(NamedTuple):
    host: str | None
    port: int | None
    upstream: Upstream | None
    node: Node
    path: str
    route_node: Node
    route_path: str


class _Claim(NamedTuple):
    """A host or port a service answers on, with where it was written."""

    kind: str
    value: str | int
    service: str
    node: Node
    path: str
    note: str = ""

    @property
    def label(self) -> str:
        if self.kind == "port":
            return f"port {self.value}{self.note}"
        return f"host '{self.value}'{self.note}"


class _Parser:
    def __init__(self, file: str, base: str):
        self.file = file
        self.base = base
        self.constructor = SafeConstructor()
        # Key nodes written in each mapping, recorded before `<<` merges are
        # flattened into it (an alias can bring the same mapping back later).
        self.written: dict[int, set[int]] = {}

    def fail(self, problem: str, node: Node | None, path: str | None) -> NoReturn:
        raise ConfigError(problem, file=self.file, line=_line(node), key=path)

    # ---- the document

    def config(self, root: Node | None) -> Config:
        if root is None or self.is_null(root):
            self.fail("no services defined (the file is empty)", None, None)
        if not isinstance(root, MappingNode):
            self.fail(
                "expected a mapping at the top level (listen:, services:, ...), "
                f"got {self.show(root)}",
                root,
                None,
            )
        top = self.mapping(root, "", _TOP_KEYS)
        listen = self.address(top.get("listen"), _DEFAULT_LISTEN)
        admin = self.admin(top.get("admin"), listen)
        logging = self.logging(top.get("logging"))
        limits = self.limits(top.get("limits"))

        defaults: dict[str, Any] = {}
        default_fields: dict[str, _Field] = {}
        if "defaults" in top:
            field = top["defaults"]
            default_fields = self.mapping(field.node, field.path, _SERVICE_KEYS)
            defaults = self.service_values(default_fields)

        field = top.get("services")
        if field is None:
            self.fail("no services defined: add a 'services:' section", None, None)
        if not self.is_null(field.node) and not isinstance(field.node, MappingNode):
            self.fail(
                "expected a mapping of service names to their settings, "
                f"got {self.show(field.node)}",
                field.node,
                field.path,
            )
        entries = self.mapping(field.node, field.path, None)
        if not entries:
            self.fail("no services defined", field.key, field.path)

        services = []
        claims: dict[tuple[str, str | int], _Claim] = {}
        for name, entry in entries.items():
            service, service_claims = self.service(
                name, entry, default_fields, defaults
            )
            services.append(service)
            for claim in service_claims:
                self.claim(claim, claims, listen, admin)

        return Config(
            path=self.file,
            listen=listen,
            admin=admin,
            logging=logging,
            limits=limits,
            services=tuple(services),
        )

    def admin(self, field: _Field | None, listen: Address) -> Admin | None:
        if field is None or self.is_null(field.node):
            return None
        values = self.mapping(field.node, field.path, _ADMIN_KEYS)
        address = self.address(values.get("listen"), _DEFAULT_ADMIN_LISTEN)
        if address.port == listen.port:
            where = values.get("listen") or field
            self.fail(
                f"port {address.port} is already the main listen port ({listen}); "
                "the admin API needs its own port",
                where.node,
                where.path,
            )
        token = None
        if "token" in values:
            token = self.raw_text(values["token"], "a token string")
            if not token.strip():
                self.fail(
                    "the token is empty; remove 'token' to run without one",
                    values["token"].node,
                    values["token"].path,
                )
        allow = _DEFAULT_ALLOW
        if "allow" in values:
            allow = self.networks(values["allow"])
        return Admin(listen=address, token=token, allow=allow)

    def logging(self, field: _Field | None) -> Logging:
        values = self.section(field, _LOGGING_KEYS)
        return Logging(
            level=self.choice(
                values.get("level"), ("debug", "info", "warning", "error"), "info"
            ),
            format=self.choice(values.get("format"), ("text", "json"), "text"),
            access_log=self.boolean(values.get("access_log"), False),
        )

    def limits(self, field: _Field | None) -> Limits:
        values = self.section(field, _LIMIT_KEYS)
        return Limits(
            max_body=self.size(values.get("max_body"), 100 * MIB, minimum=0),
            max_header=self.size(values.get("max_header"), 64 * KIB, minimum=1),
            header_timeout=self.duration(values.get("header_timeout"), 10.0),
            keepalive_timeout=self.duration(values.get("keepalive_timeout"), 75.0),
            upstream_timeout=self.duration(values.get("upstream_timeout"), 60.0),
            shutdown_timeout=self.duration(
                values.get("shutdown_timeout"), 10.0, zero_ok=True
            ),
        )

    # ---- services

    def service_values(self, fields: dict[str, _Field]) -> dict[str, Any]:
        """Each per-service key converted on its own (cross-key rules come later).

        Used for ``defaults`` too, so a bad default is reported once, at its
        own line, even when every service overrides it.
        """
        converters = {
            "upstream": self.upstream,
            "hosts": self.hosts,
            "ports": self.ports,
            "routes": self.routes,
            "run": self.command,
            "start": self.command,
            "stop": self.command,
            "check": self.command,
            "cwd": self.local_path,
            "env": self.env,
            "log": self.local_path,
            "proxy_only": lambda f: self.boolean(f, False),
            "idle_timeout": lambda f: self.duration(f, 300.0, zero_ok=True),
            "start_timeout": lambda f: self.duration(f, 30.0),
            "stop_timeout": lambda f: self.duration(f, 10.0, zero_ok=True),
            "preserve_host": lambda f: self.boolean(f, False),
            "health": self.health_spec,
        }
        return {key: converters[key](field) for key, field in fields.items()}

    def service(
        self,
        name: str,
        entry: _Field,
        default_fields: dict[str, _Field],
        defaults: dict[str, Any],
    ) -> tuple[Service, list[_Claim]]:
        path = entry.path
        if not _SERVICE_NAME.fullmatch(name) or ".." in name or name == ".":
            self.fail(
                f"invalid service name '{name}': use letters, digits, '-', '_' "
                "and '.' only (names appear in admin URLs)",
                entry.key,
                path,
            )
        own_fields = self.mapping(entry.node, path, _SERVICE_KEYS)
        own = self.service_values(own_fields)

        # A key set in the service replaces the default whole; the mode keys
        # replace each other as a group, so `run:` in a service overrides a
        # `proxy_only: true` default instead of conflicting with it.
        own_mode = any(key in own_fields for key in _MODE_KEYS)
        fields: dict[str, _Field] = {}
        values: dict[str, Any] = {}
        for key in _SERVICE_KEYS:
            if key in own_fields:
                fields[key], values[key] = own_fields[key], own[key]
            elif key in default_fields and not (own_mode and key in _MODE_KEYS):
                fields[key], values[key] = default_fields[key], defaults[key]

        mode = self.mode(entry, fields, values)
        self.mode_specific(mode, fields)

        upstream = values.get("upstream")
        hosts = values.get("hosts", [])
        ports = values.get("ports", [])
        specs: list[_RouteSpec] = values.get("routes", [])
        if upstream is None:
            for spec in specs:
                if spec.upstream is None:
                    self.fail(
                        "missing: this route has no upstream and the service sets none",
                        spec.route_node,
                        f"{spec.route_path}.upstream",
                    )
            if hosts or ports or not specs:
                self.fail(
                    "missing: set upstream: http://host:port (it can be left out "
                    "only when the service has just 'routes', each with its own)",
                    entry.key,
                    f"{path}.upstream",
                )

        routes: list[Route] = []
        claims: list[_Claim] = []
        hosts_path = fields["hosts"].path if hosts else ""
        ports_path = fields["ports"].path if ports else ""
        for host, node in hosts:
            routes.append(Route(upstream=upstream, host=host))
            claims.append(_Claim("host", host, name, node, hosts_path))
        for port, node in ports:
            routes.append(Route(upstream=upstream, port=port))
            claims.append(_Claim("port", port, name, node, ports_path))
        for spec in specs:
            routes.append(
                Route(
                    upstream=spec.upstream or upstream, host=spec.host, port=spec.port
                )
            )
            kind = "host" if spec.port is None else "port"
            value = spec.host if spec.port is None else spec.port
            claims.append(_Claim(kind, value, name, spec.node, spec.path))
        if not routes:
            routes.append(Route(upstream=upstream, host=name.lower()))
            note = " (the service's name, used as its host)"
            claims.append(_Claim("host", name.lower(), name, entry.key, path, note))

        health = values.get("health", _DEFAULT_HEALTH)
        if health.type == "http" and health.url is None:
            probe = upstream if upstream is not None else routes[0].upstream
            health = replace(health, url=probe.url + "/")

        service = Service(
            name=name,
            upstream=upstream,
            hosts=tuple(host for host, _ in hosts),
            ports=tuple(port for port, _ in ports),
            routes=tuple(routes),
            run=values.get("run") if mode == "run" else None,
            start=values.get("start") if mode == "start" else None,
            stop=values.get("stop") if mode == "start" else None,
            check=values.get("check") if mode == "start" else None,
            # Commands run from the config file's folder unless told
            # otherwise, so relative paths in them work from anywhere.
            cwd=values.get("cwd", self.base),
            env=values.get("env", ()),
            log=values.get("log") if mode == "run" else None,
            proxy_only=mode == "proxy_only",
            idle_timeout=values.get("idle_timeout", 300.0),
            start_timeout=values.get("start_timeout", 30.0),
            stop_timeout=values.get("stop_timeout", 10.0),
            preserve_host=values.get("preserve_host", False),
            health=health,
        )
        return service, claims

    def mode(
        self, entry: _Field, fields: dict[str, _Field], values: dict[str, Any]
    ) -> str:
        # `proxy_only: false` is written but chooses nothing.
        chosen = [
            fields[key]
            for key in _MODE_KEYS
            if key in fields and (key != "proxy_only" or values[key])
        ]
        if not chosen:
            self.fail(
                "needs exactly one of 'run' (DynaPM spawns the process), "
                "'start' (a command, with 'stop') or 'proxy_only: true'",
                entry.key,
                entry.path,
            )
        if len(chosen) > 1:
            chosen.sort(key=lambda field: (field.inherited, _line(field.key)))
            first, second = chosen[0], chosen[1]
            self.fail(
                f"cannot be combined with {self.mode_name(first)} (line "
                f"{_line(first.key)}): a service has exactly one of 'run', 'start' "
                "or 'proxy_only: true'",
                second.key,
                second.path,
            )
        return chosen[0].path.rpartition(".")[2]

    @staticmethod
    def mode_name(field: _Field) -> str:
        key = field.path.rpartition(".")[2]
        return "'proxy_only: true'" if key == "proxy_only" else f"'{key}'"

    def mode_specific(self, mode: str, fields: dict[str, _Field]) -> None:
        """Keys that only make sense for one mode.

        Set in the service itself they are errors elsewhere; inherited from
        defaults they are ignored, so defaults can serve mixed services.
        """
        if mode == "start" and "stop" not in fields:
            start = fields["start"]
            self.fail(
                "required with 'start': how should DynaPM stop the service?",
                start.key,
                start.path.rpartition(".")[0] + ".stop",
            )
        reasons = {
            "stop": {
                "run": "a 'run' service is stopped with SIGTERM, then SIGKILL",
                "proxy_only": "a proxy_only service is never stopped",
            },
            "check": {
                "run": "'run' services are always started by DynaPM, so there "
                "is nothing to adopt at boot",
                "proxy_only": "a proxy_only service is never started",
            },
            "log": {
                "start": "DynaPM only captures the output of processes it spawns "
                "with 'run'",
                "proxy_only": "a proxy_only service has no process of DynaPM's",
            },
        }
        for key, why in reasons.items():
            field = fields.get(key)
            if field is None or field.inherited or mode not in why:
                continue
            needs = "'run'" if key == "log" else "'start'"
            self.fail(
                f"only applies to services with {needs}: {why[mode]}",
                field.key,
                field.path,
            )

    def claim(
        self,
        claim: _Claim,
        claims: dict[tuple[str, str | int], _Claim],
        listen: Address,
        admin: Admin | None,
    ) -> None:
        if claim.kind == "port":
            if claim.value == listen.port:
                self.fail(
                    f"port {claim.value} is the main listen port ({listen}); "
                    "a dedicated port needs a port of its own",
                    claim.node,
                    claim.path,
                )
            if admin is not None and claim.value == admin.listen.port:
                self.fail(
                    f"port {claim.value} is the admin API port ({admin.listen}); "
                    "a dedicated port needs a port of its own",
                    claim.node,
                    claim.path,
                )
        what = claim.label
        previous = claims.get((claim.kind, claim.value))
        if previous is None:
            claims[(claim.kind, claim.value)] = claim
            return
        if previous.service == claim.service:
            self.fail(
                f"{what} is listed twice for service '{claim.service}' "
                f"(first at line {_line(previous.node)})",
                claim.node,
                claim.path,
            )
        self.fail(
            f"{what} is claimed by two services: '{previous.service}' "
            f"(line {_line(previous.node)}) and '{claim.service}'",
            claim.node,
            claim.path,
        )

    # ---- per-service keys

    def upstream(self, field: _Field) -> Upstream:
        text = self.string(field, "expected a URL like http://127.0.0.1:3001")
        try:
            return _parse_upstream(text)
        except ValueError as err:
            self.fail(str(err), field.node, field.path)

    def hosts(self, field: _Field) -> list[tuple[str, Node]]:
        expected = "expected a host name or a list of host names"
        if isinstance(field.node, SequenceNode):
            items = field.node.value
        elif isinstance(field.node, ScalarNode) and not self.is_null(field.node):
            items = [field.node]
        else:
            self.fail(
                f"{expected}, got {self.show(field.node)}", field.node, field.path
            )
        hosts = []
        for item in items:
            text = self.string(_Field(field.key, item, field.path), expected)
            try:
                hosts.append((_check_host(text), item))
            except ValueError as err:
                self.fail(str(err), item, field.path)
        return hosts

    def ports(self, field: _Field) -> list[tuple[int, Node]]:
        if isinstance(field.node, SequenceNode):
            items = field.node.value
        else:
            items = [field.node]
        return [
            (self.port(_Field(field.key, item, field.path)), item) for item in items
        ]

    def routes(self, field: _Field) -> list[_RouteSpec]:
        if self.is_null(field.node):
            return []
        if not isinstance(field.node, SequenceNode):
            self.fail(
                "expected a list of routes, like "
                "- {host: api.example.com, upstream: http://127.0.0.1:8001}",
                field.node,
                field.path,
            )
        specs = []
        for index, item in enumerate(field.node.value):
            path = f"{field.path}[{index}]"
            if not isinstance(item, MappingNode):
                self.fail(
                    "expected a mapping with 'host' or 'port' and an optional "
                    f"'upstream', got {self.show(item)}",
                    item,
                    path,
                )
            values = self.mapping(item, path, _ROUTE_KEYS)
            if ("host" in values) == ("port" in values):
                self.fail("a route needs exactly one of 'host' or 'port'", item, path)
            host = port = None
            if "host" in values:
                host_field = values["host"]
                text = self.string(host_field, "expected a host name")
                try:
                    host = _check_host(text)
                except ValueError as err:
                    self.fail(str(err), host_field.node, host_field.path)
                node, claim_path = host_field.node, host_field.path
            else:
                port = self.port(values["port"])
                node, claim_path = values["port"].node, values["port"].path
            upstream = None
            if "upstream" in values:
                upstream = self.upstream(values["upstream"])
            specs.append(_RouteSpec(host, port, upstream, node, claim_path, item, path))
        return specs

    def env(self, field: _Field) -> tuple[tuple[str, str], ...]:
        values = self.mapping(field.node, field.path, None)
        pairs = []
        for name, item in values.items():
            if not name or "=" in name or "\0" in name:
                self.fail(
                    f"invalid environment variable name {name!r}", item.key, item.path
                )
            pairs.append((name, self.raw_text(item, "a value")))
        return tuple(pairs)

    def health_spec(self, field: _Field) -> Health:
        """The probe as written; an http probe's default url is filled in later."""
        values = self.mapping(field.node, field.path, _HEALTH_KEYS)
        kind = self.choice(values.get("type"), _HEALTH_TYPES, "tcp")
        for key, item in values.items():
            if key in _HEALTH_USES[kind]:
                continue
            users = [name for name, keys in _HEALTH_USES.items() if key in keys]
            self.fail(
                f"does not apply to health type '{kind}' (only to "
                f"{' and '.join(repr(name) for name in users)})",
                item.key,
                item.path,
            )
        url = None
        if "url" in values:
            item = values["url"]
            text = self.string(item, "expected a URL like http://127.0.0.1:3001/health")
            try:
                url = _parse_http_url(text)
            except ValueError as err:
                self.fail(str(err), item.node, item.path)
        status = None
        if "expect_status" in values:
            item = values["expect_status"]
            status = self.scalar(item, "expected an HTTP status code like 200")
            if isinstance(status, bool) or not isinstance(status, int):
                self.fail(
                    f"expected an HTTP status code like 200, got {_show(status)}",
                    item.node,
                    item.path,
                )
            if not 100 <= status <= 599:
                self.fail(
                    f"an HTTP status code is from 100 to 599, got {status}",
                    item.node,
                    item.path,
                )
        command = None
        if kind == "command":
            if "command" not in values:
                self.fail(
                    "health type 'command' needs a 'command' (exit 0 = ready)",
                    values["type"].key,
                    f"{field.path}.command",
                )
            command = self.command(values["command"])
        # Commands cost a process spawn per probe, hence the slower default.
        interval = self.duration(
            values.get("interval"), 0.1 if kind == "command" else 0.01
        )
        timeout = self.duration(values.get("timeout"), 1.0)
        return Health(kind, url, status, command, interval, timeout)

    # ---- typed values

    def section(
        self, field: _Field | None, allowed: tuple[str, ...]
    ) -> dict[str, _Field]:
        if field is None:
            return {}
        return self.mapping(field.node, field.path, allowed)

    def mapping(
        self, node: Node, path: str, allowed: tuple[str, ...] | None
    ) -> dict[str, _Field]:
        """The keys of a mapping node in file order; null counts as empty.

        ``allowed`` None accepts any key (service names, env names).
        """
        if self.is_null(node):
            return {}
        if not isinstance(node, MappingNode):
            self.fail(f"expected a mapping, got {self.show(node)}", node, path or None)
        # Keys written here may be repeated only by a `<<` merge, where the
        # written key wins; a key written twice is a mistake YAML hides.
        written = self.written.setdefault(
            id(node),
            {id(key) for key, _ in node.value if key.tag != _MERGE_TAG},
        )
        try:
            self.constructor.flatten_mapping(node)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark
            raise ConfigError(
                "a '<<' merge takes an alias of a mapping, or a list of them",
                file=self.file,
                line=None if mark is None else mark.line + 1,
                key=path or None,
            ) from err
        fields: dict[str, _Field] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self.fail("a key must be a plain name", key_node, path or None)
            key = key_node.value
            key_path = f"{path}.{key}" if path else key
            previous = fields.get(key)
            if previous is not None and id(previous.key) in written:
                if id(key_node) in written:
                    self.fail(
                        f"duplicate key '{key}' (first at line {_line(previous.key)})",
                        key_node,
                        key_path,
                    )
            if allowed is not None and key not in allowed:
                self.fail(_unknown_key(key, allowed), key_node, key_path)
            fields[key] = _Field(key_node, value_node, key_path)
        return fields

    def scalar(self, field: _Field, expected: str) -> Any:
        if not isinstance(field.node, ScalarNode):
            self.fail(
                f"{expected}, got {self.show(field.node)}", field.node, field.path
            )
        return self.construct(field.node, field.path)

    def construct(self, node: ScalarNode, path: str | None = None) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError:
            self.fail(f"unsupported YAML tag {node.tag!r}", node, path)
        # Explicit tags such as `!!int abc` or `!!timestamp x` make PyYAML's
        # constructors fail with whatever the conversion happened to raise.
        except Exception:
            kind = node.tag.rpartition(":")[2]
            self.fail(f"{node.value!r} is not a valid {kind}", node, path)

    def string(self, field: _Field, expected: str) -> str:
        value = self.scalar(field, expected)
        if not isinstance(value, str):
            self.fail(f"{expected}, got {_show(value)}", field.node, field.path)
        if not value.strip():
            self.fail(f"{expected}, got an empty string", field.node, field.path)
        if "\0" in value:
            self.fail("a NUL character is not allowed here", field.node, field.path)
        return value

    def raw_text(self, field: _Field, what: str) -> str:
        """A scalar exactly as written, so `0123` or `yes` keep their spelling."""
        if not isinstance(field.node, ScalarNode) or self.is_null(field.node):
            self.fail(
                f"expected {what} (quote it: '' for an empty string), "
                f"got {self.show(field.node)}",
                field.node,
                field.path,
            )
        if "\0" in field.node.value:
            self.fail("a NUL character is not allowed here", field.node, field.path)
        return field.node.value

    def command(self, field: _Field) -> str:
        return self.string(field, "expected a shell command string")

    def local_path(self, field: _Field) -> str:
        text = self.string(field, "expected a path")
        path = os.path.join(self.base, os.path.expanduser(text))
        return os.path.normpath(path)

    def boolean(self, field: _Field | None, default: bool) -> bool:
        if field is None:
            return default
        value = self.scalar(field, "expected true or false")
        if not isinstance(value, bool):
            self.fail(
                f"expected true or false (unquoted), got {_show(value)}",
                field.node,
                field.path,
            )
        return value

    def choice(
        self, field: _Field | None, choices: tuple[str, ...], default: str
    ) -> str:
        if field is None:
            return default
        expected = f"expected one of {', '.join(choices)}"
        value = self.scalar(field, expected)
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        problem = f"{expected}; got {_show(value)}"
        close = difflib.get_close_matches(str(value).lower(), choices, n=1)
        if close:
            problem += f" (did you mean '{close[0]}'?)"
        self.fail(problem, field.node, field.path)

    def duration(
        self, field: _Field | None, default: float, *, zero_ok: bool = False
    ) -> float:
        if field is None:
            return default
        value = self.scalar(field, "expected a duration like 30s or 250ms")
        try:
            seconds = parse_duration(value)
        except ValueError as err:
            self.fail(str(err), field.node, field.path)
        if seconds == 0 and not zero_ok:
            self.fail("must be greater than 0", field.node, field.path)
        if seconds > _MAX_DURATION:
            self.fail(
                f"{_show(value)} is too long (at most 365 days)", field.node, field.path
            )
        return seconds

    def size(self, field: _Field | None, default: int, *, minimum: int) -> int:
        if field is None:
            return default
        value = self.scalar(field, "expected a size like 64KiB or 100MiB")
        try:
            size = parse_size(value)
        except ValueError as err:
            self.fail(str(err), field.node, field.path)
        if size < minimum:
            self.fail(f"must be at least {minimum} byte", field.node, field.path)
        if size > MAX_SIZE:
            self.fail("must be at most 1 PiB", field.node, field.path)
        return size

    def port(self, field: _Field) -> int:
        value = self.scalar(field, "expected a port number from 1 to 65535")
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(
                f"expected a port number from 1 to 65535, got {_show(value)}",
                field.node,
                field.path,
            )
        if not 1 <= value <= 65535:
            self.fail(
                f"a port is a number from 1 to 65535, got {value}",
                field.node,
                field.path,
            )
        return value

    def address(self, field: _Field | None, default: Address) -> Address:
        if field is None:
            return default
        value = self.scalar(field, "expected host:port, like 127.0.0.1:3000")
        if not isinstance(value, str):
            self.fail(
                f"expected host:port, like 127.0.0.1:3000 or [::1]:3000; "
                f"got {_show(value)}",
                field.node,
                field.path,
            )
        try:
            return _parse_address(value)
        except ValueError as err:
            self.fail(str(err), field.node, field.path)

    def networks(
        self, field: _Field
    ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        expected = "expected an address or CIDR like 127.0.0.1/32 or ::1"
        if isinstance(field.node, SequenceNode):
            items = field.node.value
        else:
            items = [field.node]
        networks = []
        for item in items:
            item_field = _Field(field.key, item, field.path)
            text = self.string(item_field, expected)
            try:
                # Host bits are tolerated (10.0.0.1/8 means 10.0.0.0/8), as in
                # nginx's allow directive.
                networks.append(ipaddress.ip_network(text.strip(), strict=False))
            except ValueError:
                self.fail(f"{expected}, got {text!r}", item, field.path)
        if not networks:
            self.fail(
                "an empty list would let nobody reach the admin API; remove "
                "'admin' to turn it off",
                field.node,
                field.path,
            )
        return tuple(networks)

    # ---- helpers

    def is_null(self, node: Node) -> bool:
        return isinstance(node, ScalarNode) and node.tag == _NULL_TAG

    def show(self, node: Node) -> str:
        if isinstance(node, SequenceNode):
            return "a list"
        if isinstance(node, MappingNode):
            return "a mapping"
        return _show(self.construct(node))

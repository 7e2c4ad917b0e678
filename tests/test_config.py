"""Tests for dynapm.config: defaults, value parsing, expansion and every error.

YAML snippets are dedented and written to tmp_path/conf.yaml, so line 1 is the
first line of the snippet; error assertions check file, line and key path.
"""

import dataclasses
import ipaddress
import os
import textwrap

import pytest

from dynapm.config import (
    Address,
    Health,
    Route,
    Upstream,
    load,
    loads,
    parse_duration,
    parse_size,
    routing_table,
)
from dynapm.errors import ConfigError

MINIMAL = """\
services:
  app:
    run: python3 app.py
    upstream: http://127.0.0.1:3001
"""


def write(tmp_path, text, name="conf.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def load_text(tmp_path, text):
    return load(write(tmp_path, text))


def error(tmp_path, text):
    with pytest.raises(ConfigError) as info:
        load_text(tmp_path, text)
    return str(info.value)


# --------------------------------------------------------------------------
# Defaults


def test_defaults(tmp_path):
    path = write(tmp_path, MINIMAL)
    config = load(path)

    assert config.path == path
    assert config.listen == Address("127.0.0.1", 3000)
    assert config.admin is None
    assert (config.logging.level, config.logging.format) == ("info", "text")
    assert config.logging.access_log is False
    limits = config.limits
    assert limits.max_body == 100 * 1024 * 1024
    assert limits.max_header == 64 * 1024
    assert limits.header_timeout == 10.0
    assert limits.keepalive_timeout == 75.0
    assert limits.upstream_timeout == 60.0
    assert limits.shutdown_timeout == 10.0

    (app,) = config.services
    assert app.name == "app"
    assert app.mode == "run"
    assert app.run == "python3 app.py"
    assert (app.start, app.stop, app.check, app.log) == (None,) * 4
    assert app.cwd == os.path.dirname(os.path.abspath(path))
    assert app.env == ()
    assert app.proxy_only is False
    assert app.preserve_host is False
    assert app.idle_timeout == 300.0
    assert app.start_timeout == 30.0
    assert app.stop_timeout == 10.0
    assert app.health == Health("tcp", None, None, None, 0.01, 1.0)
    assert app.upstream == Upstream("http://127.0.0.1:3001", "127.0.0.1", 3001)
    assert app.probe_upstream == app.upstream


def test_admin_defaults(tmp_path):
    config = load_text(tmp_path, "admin: {}\n" + MINIMAL)
    assert config.admin.listen == Address("127.0.0.1", 4000)
    assert config.admin.token is None
    assert config.admin.allow == (
        ipaddress.ip_network("127.0.0.1/32"),
        ipaddress.ip_network("::1/128"),
    )


def test_admin_null_means_off(tmp_path):
    assert load_text(tmp_path, "admin:\n" + MINIMAL).admin is None


def test_full_file(tmp_path):
    config = load_text(
        tmp_path,
        """\
        listen: 0.0.0.0:8080
        admin:
          listen: "[::1]:4001"
          token: 0123
          allow:
            - 10.1.2.3/8
            - ::1
        logging: {level: DEBUG, format: json, access_log: true}
        limits:
          max_body: 1GB
          max_header: 8KiB
          header_timeout: 2.5
          keepalive_timeout: 1m
          upstream_timeout: 1h30m
          shutdown_timeout: 0
        services:
          app:
            start: systemctl start app
            stop: systemctl stop app
            check: systemctl is-active app
            upstream: http://LocalHost:3001/
            preserve_host: yes
            env: {PORT: 0123, DEBUG: true, NAME: "a b", EMPTY: ''}
            health:
              type: command
              command: curl -fs localhost:3001/ok
        """,
    )
    assert str(config.listen) == "0.0.0.0:8080"
    assert str(config.admin.listen) == "[::1]:4001"
    assert config.admin.listen == Address("::1", 4001)
    # Tokens and env values keep their spelling: YAML would read 0123 as 83.
    assert config.admin.token == "0123"
    assert config.admin.allow == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    assert config.logging.level == "debug"
    assert config.logging.access_log is True
    assert config.limits.max_body == 10**9
    assert config.limits.max_header == 8192
    assert config.limits.header_timeout == 2.5
    assert config.limits.upstream_timeout == 5400.0
    assert config.limits.shutdown_timeout == 0.0

    (app,) = config.services
    assert app.mode == "start"
    assert app.check == "systemctl is-active app"
    assert app.preserve_host is True
    assert app.upstream.url == "http://localhost:3001"
    assert app.upstream.hostport == "localhost:3001"
    assert app.env == (
        ("PORT", "0123"),
        ("DEBUG", "true"),
        ("NAME", "a b"),
        ("EMPTY", ""),
    )
    assert app.health.type == "command"
    assert app.health.command == "curl -fs localhost:3001/ok"
    assert app.health.interval == 0.1


def test_http_health_defaults_to_upstream_root(tmp_path):
    config = load_text(
        tmp_path,
        """\
        services:
          app:
            run: x
            upstream: http://127.0.0.1:3001
            health: {type: http}
          other:
            run: x
            upstream: http://127.0.0.1:3002
            health: {type: http, url: "http://127.0.0.1:3002/ready", expect_status: 204}
        """,
    )
    app, other = config.services
    assert app.health.url == "http://127.0.0.1:3001/"
    assert app.health.expect_status is None
    assert other.health.url == "http://127.0.0.1:3002/ready"
    assert other.health.expect_status == 204


def test_upstream_hostport():
    assert Upstream("http://127.0.0.1:3001", "127.0.0.1", 3001).hostport == (
        "127.0.0.1:3001"
    )
    assert Upstream("http://example", "example", 80).hostport == "example"
    assert str(Address("::1", 3000)) == "[::1]:3000"
    assert str(Address("127.0.0.1", 3000)) == "127.0.0.1:3000"


def test_upstream_without_port_is_port_80(tmp_path):
    text = MINIMAL.replace("http://127.0.0.1:3001", "http://[::1]")
    (app,) = load_text(tmp_path, text).services
    assert app.upstream == Upstream("http://[::1]", "::1", 80)
    assert app.upstream.hostport == "[::1]"


def test_dataclasses_are_frozen(tmp_path):
    config = load_text(tmp_path, MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.services[0].name = "other"


def test_relative_paths_resolve_against_the_config_folder(tmp_path):
    folder = tmp_path / "etc"
    folder.mkdir()
    config = load(
        write(
            folder,
            MINIMAL + "    cwd: ./srv/../app\n    log: logs/app.log\n",
        )
    )
    (app,) = config.services
    assert app.cwd == str(folder / "app")
    assert app.log == str(folder / "logs" / "app.log")


def test_absolute_paths_are_kept(tmp_path):
    config = loads(MINIMAL + "    cwd: /srv/app\n", str(tmp_path / "c.yaml"))
    assert config.services[0].cwd == "/srv/app"


def test_loads_defaults_to_a_string_path():
    assert loads(MINIMAL).path == "<string>"
    with pytest.raises(ConfigError) as info:
        loads("services: {}\n")
    assert str(info.value) == "<string>:1: services: no services defined"


# --------------------------------------------------------------------------
# Durations and sizes


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (5, 5.0),
        (1.5, 1.5),
        ("10", 10.0),
        ("0.5", 0.5),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1m 30s", 90.0),
        (" 5m ", 300.0),
        ("0s", 0.0),
        (".5s", 0.5),
    ],
)
def test_parse_duration(value, seconds):
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-5s",
        "abc",
        "",
        "5d",
        "5 5s",
        "1e3",
        "s",
        "5M",
        True,
        None,
        [5],
        float("nan"),
        float("inf"),
        10**400,
    ],
)
def test_parse_duration_rejects(value):
    with pytest.raises(ValueError):
        parse_duration(value)


def test_parse_duration_messages():
    with pytest.raises(ValueError, match=r"expected a duration like 30s.*'abc'"):
        parse_duration("abc")
    with pytest.raises(ValueError, match="negative"):
        parse_duration("-1s")
    with pytest.raises(ValueError, match="negative"):
        parse_duration(-3)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (1024, 1024),
        ("123", 123),
        ("123B", 123),
        ("64KiB", 64 * 1024),
        ("100MiB", 100 * 1024**2),
        ("1GiB", 1024**3),
        ("10KB", 10_000),
        ("10MB", 10_000_000),
        ("2GB", 2_000_000_000),
        ("1.5KiB", 1536),
        ("8 kib", 8192),
        (2048.0, 2048),
    ],
)
def test_parse_size(value, size):
    assert parse_size(value) == size
    assert isinstance(parse_size(value), int)


@pytest.mark.parametrize(
    "value",
    ["-1", -5, "10XB", "abc", "", "KiB", "1e3", "1K", True, None, float("inf")],
)
def test_parse_size_rejects(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_duration_in_file(tmp_path):
    message = error(tmp_path, MINIMAL + "    idle_timeout: abc\n")
    assert "conf.yaml:5: services.app.idle_timeout: expected a duration" in message
    assert "got 'abc'" in message


def test_negative_duration_in_file(tmp_path):
    message = error(tmp_path, MINIMAL + "    stop_timeout: -1\n")
    assert "conf.yaml:5: services.app.stop_timeout: a duration cannot be negative" in (
        message
    )


def test_zero_idle_timeout_means_never(tmp_path):
    config = load_text(tmp_path, MINIMAL + "    idle_timeout: 0\n")
    assert config.services[0].idle_timeout == 0.0
    assert "never" in routing_table(config)


def test_zero_start_timeout_is_an_error(tmp_path):
    message = error(tmp_path, MINIMAL + "    start_timeout: 0s\n")
    assert "conf.yaml:5: services.app.start_timeout: must be greater than 0" in message


def test_absurd_duration_is_an_error(tmp_path):
    message = error(tmp_path, MINIMAL + "    idle_timeout: 100000h\n")
    assert "conf.yaml:5: services.app.idle_timeout:" in message
    assert "too long" in message


def test_size_in_file(tmp_path):
    message = error(tmp_path, "limits:\n  max_body: lots\n" + MINIMAL)
    assert "conf.yaml:2: limits.max_body: expected a size like 64KiB" in message


def test_zero_max_header_is_an_error(tmp_path):
    message = error(tmp_path, "limits:\n  max_header: 0\n" + MINIMAL)
    assert "conf.yaml:2: limits.max_header: must be at least 1 byte" in message


# --------------------------------------------------------------------------
# Defaults merge


DEFAULTS = """\
defaults:
  idle_timeout: 1m
  stop_timeout: 3s
  env: {A: "1", B: "2"}
  health: {type: http, expect_status: 204}
services:
  plain:
    run: x
    upstream: http://127.0.0.1:3001
  custom:
    run: x
    upstream: http://127.0.0.1:3002
    idle_timeout: 0
    env: {C: "3"}
    health: {type: none}
"""


def test_defaults_apply_to_every_service(tmp_path):
    plain, _ = load_text(tmp_path, DEFAULTS).services
    assert plain.idle_timeout == 60.0
    assert plain.stop_timeout == 3.0
    assert plain.env == (("A", "1"), ("B", "2"))
    assert plain.health.type == "http"
    assert plain.health.expect_status == 204
    # The default health's url follows each service's own upstream.
    assert plain.health.url == "http://127.0.0.1:3001/"


def test_service_keys_replace_defaults_whole(tmp_path):
    _, custom = load_text(tmp_path, DEFAULTS).services
    assert custom.idle_timeout == 0.0
    assert custom.stop_timeout == 3.0
    assert custom.env == (("C", "3"),)
    assert custom.health == Health("none", None, None, None, 0.01, 1.0)


def test_service_mode_replaces_default_mode(tmp_path):
    config = load_text(
        tmp_path,
        """\
        defaults:
          proxy_only: true
        services:
          a:
            upstream: http://127.0.0.1:3001
          b:
            run: x
            upstream: http://127.0.0.1:3002
        """,
    )
    a, b = config.services
    assert a.mode == "proxy_only"
    assert b.mode == "run"
    assert b.proxy_only is False


def test_inherited_keys_of_another_mode_are_ignored(tmp_path):
    config = load_text(
        tmp_path,
        """\
        defaults:
          stop: systemctl stop all
          check: systemctl is-active all
          log: all.log
        services:
          managed:
            run: x
            upstream: http://127.0.0.1:3001
          system:
            start: systemctl start all
            upstream: http://127.0.0.1:3002
        """,
    )
    managed, system = config.services
    assert (managed.stop, managed.check) == (None, None)
    assert managed.log == str(tmp_path / "all.log")
    assert (system.stop, system.check) == (
        "systemctl stop all",
        "systemctl is-active all",
    )
    assert system.log is None


def test_error_in_defaults_names_defaults(tmp_path):
    message = error(tmp_path, "defaults:\n  idle_timeout: soon\n" + MINIMAL)
    assert "conf.yaml:2: defaults.idle_timeout: expected a duration" in message


def test_error_in_overridden_default_is_still_reported(tmp_path):
    message = error(
        tmp_path,
        "defaults:\n  upstream: https://x\n" + MINIMAL,
    )
    assert "conf.yaml:2: defaults.upstream: https is not supported" in message


def test_unknown_key_in_defaults(tmp_path):
    message = error(tmp_path, "defaults:\n  idle_timout: 1m\n" + MINIMAL)
    assert "conf.yaml:2: defaults.idle_timout: unknown key 'idle_timout'" in message
    assert "did you mean 'idle_timeout'?" in message


def test_yaml_merge_keys(tmp_path):
    config = load_text(
        tmp_path,
        """\
        defaults: &base
          run: x
        services:
          a:
            <<: *base
            run: y
            upstream: http://127.0.0.1:3001
        """,
    )
    assert config.services[0].run == "y"


# --------------------------------------------------------------------------
# Routes


def test_route_expansion(tmp_path):
    config = load_text(
        tmp_path,
        """\
        services:
          app:
            run: x
            upstream: http://127.0.0.1:3001
            hosts: [App.Example.com, www.example.com]
            ports: 5001
            routes:
              - {host: api.example.com, upstream: "http://127.0.0.1:8001"}
              - {port: 5002}
        """,
    )
    (app,) = config.services
    main = Upstream("http://127.0.0.1:3001", "127.0.0.1", 3001)
    api = Upstream("http://127.0.0.1:8001", "127.0.0.1", 8001)
    assert app.hosts == ("app.example.com", "www.example.com")
    assert app.ports == (5001,)
    assert app.routes == (
        Route(main, host="app.example.com"),
        Route(main, host="www.example.com"),
        Route(main, port=5001),
        Route(api, host="api.example.com"),
        Route(main, port=5002),
    )


def test_hosts_and_ports_accept_single_values(tmp_path):
    (app,) = load_text(
        tmp_path, MINIMAL + "    hosts: app.example.com\n    ports: 5001\n"
    ).services
    assert app.hosts == ("app.example.com",)
    assert app.ports == (5001,)


def test_routes_with_their_own_upstreams_need_no_service_upstream(tmp_path):
    (app,) = load_text(
        tmp_path,
        """\
        services:
          app:
            proxy_only: true
            routes:
              - {port: 5001, upstream: "http://127.0.0.1:8001"}
              - {host: b.example.com, upstream: "http://127.0.0.1:8002"}
        """,
    ).services
    assert app.upstream is None
    assert app.probe_upstream == Upstream("http://127.0.0.1:8001", "127.0.0.1", 8001)
    assert app.health.type == "tcp"


def test_name_is_the_host_when_nothing_else_routes(tmp_path):
    config = load_text(
        tmp_path,
        """\
        services:
          MyApp:
            run: x
            upstream: http://127.0.0.1:3001
          only-port:
            run: x
            upstream: http://127.0.0.1:3002
            ports: [5001]
        """,
    )
    my_app, only_port = config.services
    assert my_app.routes == (Route(my_app.upstream, host="myapp"),)
    assert my_app.hosts == ()
    assert only_port.routes == (Route(only_port.upstream, port=5001),)


def test_services_keep_file_order(tmp_path):
    names = ["zeta", "alpha", "mid"]
    text = "services:\n" + "".join(
        f"  {name}:\n    run: x\n    upstream: http://127.0.0.1:{3001 + i}\n"
        for i, name in enumerate(names)
    )
    assert [s.name for s in load_text(tmp_path, text).services] == names


def test_routing_table(tmp_path):
    config = load_text(
        tmp_path,
        """\
        services:
          app:
            run: x
            upstream: http://127.0.0.1:3001
            hosts: app.example.com
            ports: 5001
            idle_timeout: 90s
          static:
            proxy_only: true
            upstream: http://127.0.0.1:9000
        """,
    )
    lines = routing_table(config).splitlines()
    assert lines[0].split() == ["LISTEN", "HOST", "UPSTREAM", "SERVICE", "MODE", "IDLE"]
    assert lines[1].split() == [
        "127.0.0.1:3000",
        "app.example.com",
        "http://127.0.0.1:3001",
        "app",
        "run",
        "1m30s",
    ]
    assert lines[2].split()[:2] == ["127.0.0.1:5001", "*"]
    assert lines[3].split() == [
        "127.0.0.1:3000",
        "static",
        "http://127.0.0.1:9000",
        "static",
        "proxy_only",
        "-",
    ]
    assert len(lines) == 4


# --------------------------------------------------------------------------
# Errors: file structure


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: cannot read the file:")
    assert info.value.line is None


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        load(str(tmp_path))
    assert "cannot read the file" in str(info.value)


def test_not_utf8(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_bytes(b"services:\n  app:\n    run: \xff\n")
    with pytest.raises(ConfigError) as info:
        load(str(path))
    assert "conf.yaml:3: not UTF-8 text" in str(info.value)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "---\n"])
def test_empty_file(tmp_path, text):
    assert "no services defined" in error(tmp_path, text)


def test_no_services_section(tmp_path):
    message = error(tmp_path, "listen: 127.0.0.1:3000\n")
    assert "conf.yaml: no services defined" in message


def test_empty_services(tmp_path):
    message = error(tmp_path, "listen: 127.0.0.1:3000\nservices:\n")
    assert "conf.yaml:2: services: no services defined" in message


def test_services_must_be_a_mapping(tmp_path):
    message = error(tmp_path, "services:\n  - app\n")
    assert "conf.yaml:2: services: expected a mapping of service names" in message


def test_top_level_must_be_a_mapping(tmp_path):
    message = error(tmp_path, "- services\n")
    assert "conf.yaml:1: expected a mapping at the top level" in message


def test_yaml_syntax_error_line(tmp_path):
    message = error(
        tmp_path,
        """\
        services:
          app:
            run: x
           upstream: http://127.0.0.1:3001
        """,
    )
    assert "conf.yaml:4: invalid YAML:" in message


def test_yaml_tab_indentation(tmp_path):
    message = error(tmp_path, "services:\n\tapp: {}\n")
    assert "conf.yaml:2: invalid YAML:" in message


def test_unquoted_ipv6_in_flow_list_gets_a_hint(tmp_path):
    message = error(tmp_path, "admin:\n  allow: [127.0.0.1/32, ::1]\n" + MINIMAL)
    assert "conf.yaml:2: invalid YAML:" in message
    assert "quote IPv6 addresses" in message


def test_several_documents(tmp_path):
    message = error(tmp_path, MINIMAL + "---\nservices: {}\n")
    assert "conf.yaml:5: invalid YAML:" in message


def test_control_character(tmp_path):
    message = error(tmp_path, "services:\n  app: \x01\n")
    assert "conf.yaml:2: invalid YAML:" in message


def test_python_tags_are_refused(tmp_path):
    message = error(
        tmp_path,
        "services:\n  app:\n    run: !!python/object/apply:os.system [id]\n",
    )
    assert "conf.yaml:3: " in message
    assert "tag" in message


def test_bad_explicit_tag_value(tmp_path):
    message = error(tmp_path, MINIMAL + "    idle_timeout: !!int abc\n")
    assert "conf.yaml:5: services.app.idle_timeout: 'abc' is not a valid int" in (
        message
    )


def test_deep_nesting(tmp_path):
    message = error(tmp_path, "services: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "conf.yaml" in message


def test_duplicate_key(tmp_path):
    message = error(tmp_path, MINIMAL + "    run: y\n")
    assert "conf.yaml:5: services.app.run: duplicate key 'run' (first at line 3)" in (
        message
    )


def test_duplicate_service_name(tmp_path):
    message = error(tmp_path, MINIMAL + "  app:\n    run: y\n")
    assert "conf.yaml:5: services.app: duplicate key 'app' (first at line 2)" in (
        message
    )


def test_truncated_files_raise_only_config_errors(tmp_path):
    text = textwrap.dedent(
        """\
        listen: 127.0.0.1:3000
        admin: {listen: "127.0.0.1:4000", token: t, allow: ["::1"]}
        defaults: {idle_timeout: 5m, health: {type: http}}
        services:
          app:
            upstream: http://127.0.0.1:3001
            hosts: [a.example.com]
            routes: [{port: 5001}, {host: b.example.com}]
            start: s
            stop: t
        """
    )
    for end in range(len(text) + 1):
        try:
            loads(text[:end], "conf.yaml")
        except ConfigError as err:
            assert str(err).startswith("conf.yaml")


# --------------------------------------------------------------------------
# Errors: unknown keys


def test_unknown_top_level_key(tmp_path):
    message = error(tmp_path, "service:\n  app: {}\n")
    assert (
        "conf.yaml:1: service: unknown key 'service'; did you mean 'services'?"
        in message
    )


def test_unknown_service_key(tmp_path):
    message = error(tmp_path, MINIMAL + "    upstrem: http://127.0.0.1:3001\n")
    assert "conf.yaml:5: services.app.upstrem: unknown key 'upstrem'" in message
    assert "did you mean 'upstream'?" in message


def test_unknown_key_without_close_match_lists_keys(tmp_path):
    message = error(tmp_path, "logging:\n  zzz: 1\n" + MINIMAL)
    assert "conf.yaml:2: logging.zzz: unknown key 'zzz'" in message
    assert "expected one of: level, format, access_log" in message


@pytest.mark.parametrize(
    ("section", "key", "suggestion"),
    [
        ("limits", "max_bdy", "max_body"),
        ("admin", "tokn", "token"),
        ("logging", "acess_log", "access_log"),
    ],
)
def test_unknown_keys_in_sections(tmp_path, section, key, suggestion):
    message = error(tmp_path, f"{section}:\n  {key}: 1\n" + MINIMAL)
    assert f"conf.yaml:2: {section}.{key}: unknown key" in message
    assert f"did you mean '{suggestion}'?" in message


def test_unknown_health_key(tmp_path):
    message = error(tmp_path, MINIMAL + "    health:\n      intervall: 1s\n")
    assert "conf.yaml:6: services.app.health.intervall: unknown key" in message
    assert "did you mean 'interval'?" in message


def test_unknown_route_key(tmp_path):
    message = error(tmp_path, MINIMAL + "    routes:\n      - {hots: a.example}\n")
    assert "conf.yaml:6: services.app.routes[0].hots: unknown key" in message
    assert "did you mean 'host'?" in message


# --------------------------------------------------------------------------
# Errors: listen addresses


@pytest.mark.parametrize(
    "value",
    [
        "3000",
        "localhost",
        "::1:3000",
        ":3000",
        "127.0.0.1:0",
        "127.0.0.1:70000",
        "*:80",
    ],
)
def test_bad_listen(tmp_path, value):
    message = error(tmp_path, f"listen: '{value}'\n" + MINIMAL)
    assert "conf.yaml:1: listen:" in message
    assert "[::1]:3000" in message


def test_unquoted_port_number_listen(tmp_path):
    message = error(tmp_path, "listen: 3000\n" + MINIMAL)
    assert "conf.yaml:1: listen: expected host:port" in message


def test_bad_admin_listen(tmp_path):
    message = error(tmp_path, "admin:\n  listen: 4000\n" + MINIMAL)
    assert "conf.yaml:2: admin.listen: expected host:port" in message


def test_admin_port_equal_to_listen_port(tmp_path):
    message = error(tmp_path, "admin:\n  listen: 127.0.0.1:3000\n" + MINIMAL)
    assert "conf.yaml:2: admin.listen: port 3000 is already the main listen" in message


def test_bad_admin_allow(tmp_path):
    message = error(tmp_path, "admin:\n  allow: [10.0.0.300]\n" + MINIMAL)
    assert "conf.yaml:2: admin.allow: expected an address or CIDR" in message


def test_empty_admin_allow(tmp_path):
    message = error(tmp_path, "admin:\n  allow: []\n" + MINIMAL)
    assert "conf.yaml:2: admin.allow: an empty list" in message


def test_empty_admin_token(tmp_path):
    message = error(tmp_path, "admin:\n  token: ''\n" + MINIMAL)
    assert "conf.yaml:2: admin.token: the token is empty" in message


# --------------------------------------------------------------------------
# Errors: upstreams and routes


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("https://127.0.0.1:3001", "https is not supported"),
        ("http://127.0.0.1:3001/api", "without a path"),
        ("http://127.0.0.1:3001?x=1", "without a path or query"),
        ("127.0.0.1:3001", "expected a URL like http://127.0.0.1:3001"),
        ("ftp://127.0.0.1", "unsupported scheme 'ftp'"),
        ("http://127.0.0.1:0", "port must be a number from 1 to 65535"),
        ("http://127.0.0.1:99999", "port must be a number from 1 to 65535"),
        ("http://::1:3001", "brackets"),
        ("http://[nope]:3001", "not an IPv6 address"),
        ("http://:3001", "invalid host name"),
        ("http://user@host", "credentials"),
    ],
)
def test_bad_upstream(tmp_path, value, reason):
    message = error(tmp_path, MINIMAL.replace("http://127.0.0.1:3001", value))
    assert "conf.yaml:4: services.app.upstream:" in message
    assert reason in message


def test_upstream_must_be_a_string(tmp_path):
    message = error(tmp_path, MINIMAL.replace("http://127.0.0.1:3001", "[a, b]"))
    assert "conf.yaml:4: services.app.upstream: expected a URL" in message
    assert "got a list" in message


def test_missing_upstream(tmp_path):
    message = error(
        tmp_path,
        """\
        services:
          app:
            run: x
            hosts: app.example.com
        """,
    )
    assert "conf.yaml:2: services.app.upstream: missing" in message


def test_missing_upstream_with_hosts_and_complete_routes(tmp_path):
    message = error(
        tmp_path,
        """\
        services:
          app:
            run: x
            hosts: a.example.com
            routes: [{port: 5001, upstream: "http://127.0.0.1:8001"}]
        """,
    )
    assert "conf.yaml:2: services.app.upstream: missing" in message


def test_route_without_any_upstream(tmp_path):
    message = error(
        tmp_path,
        """\
        services:
          app:
            run: x
            routes:
              - port: 5001
                upstream: http://127.0.0.1:8001
              - host: b.example.com
        """,
    )
    assert "conf.yaml:7: services.app.routes[1].upstream: missing" in message


@pytest.mark.parametrize(
    "route", ["{host: a.example.com, port: 5001}", "{upstream: 'http://h:1'}", "{}"]
)
def test_route_needs_exactly_one_of_host_or_port(tmp_path, route):
    message = error(tmp_path, MINIMAL + f"    routes:\n      - {route}\n")
    assert "conf.yaml:6: services.app.routes[0]: a route needs exactly one" in message


def test_routes_must_be_a_list(tmp_path):
    message = error(tmp_path, MINIMAL + "    routes: {host: a.example.com}\n")
    assert "conf.yaml:5: services.app.routes: expected a list of routes" in message


def test_route_with_bad_upstream(tmp_path):
    message = error(
        tmp_path,
        MINIMAL + "    routes:\n      - {port: 5001, upstream: 'https://h'}\n",
    )
    assert "conf.yaml:6: services.app.routes[0].upstream: https" in message


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("app.example.com:8080", "cannot contain ':'"),
        ("http://app.example.com", "cannot contain ':'"),
        ("app.example.com/x", "cannot contain '/'"),
        ("'app example.com'", "cannot contain spaces"),
        ("'*.example.com'", "wildcards are not supported"),
        ("''", "expected a host name"),
        ("123", "expected a host name"),
    ],
)
def test_bad_hosts(tmp_path, value, reason):
    message = error(
        tmp_path, MINIMAL + f"    hosts:\n      - a.example.com\n      - {value}\n"
    )
    assert "conf.yaml:7: services.app.hosts:" in message
    assert reason in message


def test_bad_route_host(tmp_path):
    message = error(tmp_path, MINIMAL + "    routes:\n      - host: a:80\n")
    assert "conf.yaml:6: services.app.routes[0].host: a host name cannot" in message


@pytest.mark.parametrize("value", ["'5001'", "0", "65536", "true", "5001.5", "[[1]]"])
def test_bad_ports(tmp_path, value):
    message = error(tmp_path, MINIMAL + f"    ports: {value}\n")
    assert "conf.yaml:5: services.app.ports:" in message
    assert "from 1 to 65535, got" in message


# --------------------------------------------------------------------------
# Errors: duplicate hosts and ports


TWO = """\
services:
  a:
    run: x
    upstream: http://127.0.0.1:3001
    {a}
  b:
    run: x
    upstream: http://127.0.0.1:3002
    {b}
"""


def test_two_services_claiming_one_host(tmp_path):
    message = error(
        tmp_path,
        TWO.format(a="hosts: [x.example.com]", b="hosts: X.Example.com"),
    )
    assert "conf.yaml:9: services.b.hosts:" in message
    assert "'a' (line 5) and 'b'" in message
    assert "x.example.com" in message


def test_two_services_claiming_one_port(tmp_path):
    message = error(
        tmp_path,
        TWO.format(a="ports: 5001", b="routes: [{port: 5001}]"),
    )
    assert "conf.yaml:9: services.b.routes[0].port: port 5001" in message
    assert "'a' (line 5) and 'b'" in message


def test_route_host_claimed_twice(tmp_path):
    message = error(
        tmp_path,
        TWO.format(a="routes: [{host: h.example}]", b="routes: [{host: h.example}]"),
    )
    assert "conf.yaml:9: services.b.routes[0].host: host 'h.example'" in message
    assert "'a' (line 5) and 'b'" in message


def test_host_claiming_another_services_name(tmp_path):
    message = error(tmp_path, TWO.format(a="hosts: b", b=""))
    assert "conf.yaml:6: services.b: host 'b' (the service's name" in message
    assert "'a' (line 5) and 'b'" in message


def test_same_host_twice_in_one_service(tmp_path):
    message = error(
        tmp_path,
        TWO.format(a="hosts: [x.example, X.example]", b=""),
    )
    assert "conf.yaml:5: services.a.hosts: host 'x.example' is listed twice" in message


def test_same_port_in_ports_and_routes_of_one_service(tmp_path):
    message = error(
        tmp_path,
        TWO.format(a="ports: 5001\n    routes: [{port: 5001}]", b=""),
    )
    assert "conf.yaml:6: services.a.routes[0].port: port 5001 is listed twice" in (
        message
    )


def test_dedicated_port_equal_to_listen_port(tmp_path):
    message = error(tmp_path, "listen: 0.0.0.0:8080\n" + MINIMAL + "    ports: 8080\n")
    assert "conf.yaml:6: services.app.ports: port 8080 is the main listen port" in (
        message
    )


def test_dedicated_port_equal_to_admin_port(tmp_path):
    message = error(
        tmp_path,
        "admin: {listen: '127.0.0.1:4000'}\n"
        + MINIMAL
        + "    routes: [{port: 4000}]\n",
    )
    assert "conf.yaml:6: services.app.routes[0].port: port 4000 is the admin" in (
        message
    )


def test_same_host_on_different_services_from_defaults(tmp_path):
    message = error(
        tmp_path,
        "defaults:\n  hosts: shared.example\n" + TWO.format(a="", b=""),
    )
    assert "defaults.hosts: host 'shared.example' is claimed by two services" in (
        message
    )


# --------------------------------------------------------------------------
# Errors: how a service runs


SERVICE = """\
services:
  app:
    upstream: http://127.0.0.1:3001
    {0}
"""


def test_neither_run_start_nor_proxy_only(tmp_path):
    message = error(tmp_path, SERVICE.format("proxy_only: false"))
    assert "conf.yaml:2: services.app: needs exactly one of 'run'" in message


@pytest.mark.parametrize(
    ("keys", "line", "second", "first"),
    [
        ("run: x\n    start: y\n    stop: z", 5, "start", "'run' (line 4)"),
        ("proxy_only: true\n    run: x", 5, "run", "'proxy_only: true' (line 4)"),
        ("start: x\n    stop: y\n    proxy_only: true", 6, "proxy_only", "'start'"),
    ],
)
def test_several_ways_to_run(tmp_path, keys, line, second, first):
    message = error(tmp_path, SERVICE.format(keys))
    assert f"conf.yaml:{line}: services.app.{second}: cannot be combined with" in (
        message
    )
    assert first in message


def test_start_without_stop(tmp_path):
    message = error(tmp_path, SERVICE.format("start: systemctl start app"))
    assert "conf.yaml:4: services.app.stop: required with 'start'" in message


@pytest.mark.parametrize(
    ("keys", "key", "reason"),
    [
        ("run: x\n    stop: y", "stop", "SIGTERM"),
        ("proxy_only: true\n    stop: y", "stop", "never stopped"),
        ("run: x\n    check: y", "check", "'run' services are always started"),
        ("proxy_only: true\n    check: y", "check", "never started"),
        (
            "start: x\n    stop: y\n    log: z",
            "log",
            "only applies to services with 'run'",
        ),
        ("proxy_only: true\n    log: z", "log", "only applies"),
    ],
)
def test_keys_of_another_mode(tmp_path, keys, key, reason):
    message = error(tmp_path, SERVICE.format(keys))
    line = 4 + keys.count("\n")
    assert f"conf.yaml:{line}: services.app.{key}: only applies" in message
    assert reason in message


def test_empty_command(tmp_path):
    message = error(tmp_path, SERVICE.format("run: ''"))
    assert "conf.yaml:4: services.app.run: expected a shell command string" in message


def test_command_must_be_a_string(tmp_path):
    message = error(tmp_path, SERVICE.format("run: [python3, app.py]"))
    assert "conf.yaml:4: services.app.run: expected a shell command string" in message
    assert "got a list" in message


@pytest.mark.parametrize(
    ("name", "line"), [("a/b", 2), ("'..'", 2), ("'a b'", 2), ("'.'", 2), ("é", 2)]
)
def test_bad_service_names(tmp_path, name, line):
    message = error(
        tmp_path,
        f"services:\n  {name}:\n    run: x\n    upstream: http://127.0.0.1:3001\n",
    )
    assert f"conf.yaml:{line}: services." in message
    assert "invalid service name" in message


def test_service_names_with_dots_dashes_underscores(tmp_path):
    text = "services:\n  my-app_v1.2:\n    run: x\n    upstream: http://h:1\n"
    (service,) = load_text(tmp_path, text).services
    assert service.name == "my-app_v1.2"
    assert service.routes[0].host == "my-app_v1.2"


def test_service_settings_must_be_a_mapping(tmp_path):
    message = error(tmp_path, "services:\n  app: python3 app.py\n")
    assert "conf.yaml:2: services.app: expected a mapping" in message


# --------------------------------------------------------------------------
# Errors: typed values


@pytest.mark.parametrize("value", ["'true'", "1", "on_", "'yes'"])
def test_booleans_must_be_yaml_booleans(tmp_path, value):
    message = error(tmp_path, MINIMAL + f"    preserve_host: {value}\n")
    assert "conf.yaml:5: services.app.preserve_host: expected true or false" in message


def test_access_log_boolean(tmp_path):
    message = error(tmp_path, "logging:\n  access_log: 'no'\n" + MINIMAL)
    assert "conf.yaml:2: logging.access_log: expected true or false" in message


def test_logging_level_did_you_mean(tmp_path):
    message = error(tmp_path, "logging:\n  level: warn\n" + MINIMAL)
    assert "conf.yaml:2: logging.level: expected one of debug, info" in message
    assert "did you mean 'warning'?" in message


def test_logging_format(tmp_path):
    message = error(tmp_path, "logging:\n  format: xml\n" + MINIMAL)
    assert "conf.yaml:2: logging.format: expected one of text, json" in message


def test_env_must_be_a_mapping(tmp_path):
    message = error(tmp_path, MINIMAL + "    env: [A=1]\n")
    assert "conf.yaml:5: services.app.env: expected a mapping" in message


def test_env_value_must_be_a_scalar(tmp_path):
    message = error(tmp_path, MINIMAL + "    env:\n      A: [1]\n")
    assert "conf.yaml:6: services.app.env.A: expected a value" in message


def test_env_value_null(tmp_path):
    message = error(tmp_path, MINIMAL + "    env:\n      A:\n")
    assert "conf.yaml:6: services.app.env.A: expected a value" in message


def test_env_name_with_equals(tmp_path):
    message = error(tmp_path, MINIMAL + "    env:\n      'A=B': x\n")
    assert "conf.yaml:6: services.app.env.A=B: invalid environment variable" in message


# --------------------------------------------------------------------------
# Errors: health


HEALTH = MINIMAL + "    health:\n{0}"


def test_unknown_health_type(tmp_path):
    message = error(tmp_path, HEALTH.format("      type: htp\n"))
    assert "conf.yaml:6: services.app.health.type: expected one of tcp, http" in (
        message
    )
    assert "did you mean 'http'?" in message


@pytest.mark.parametrize(
    ("lines", "key", "types"),
    [
        ("      url: http://h/\n", "url", "'http'"),
        ("      type: http\n      command: x\n", "command", "'command'"),
        (
            "      type: command\n      command: x\n      url: http://h/\n",
            "url",
            "'http'",
        ),
        ("      type: tcp\n      expect_status: 200\n", "expect_status", "'http'"),
        ("      type: none\n      interval: 1s\n", "interval", "'tcp'"),
    ],
)
def test_health_keys_of_another_type(tmp_path, lines, key, types):
    message = error(tmp_path, HEALTH.format(lines))
    line = 5 + lines.count("\n")
    assert f"conf.yaml:{line}: services.app.health.{key}: does not apply" in message
    assert types in message


def test_command_health_needs_a_command(tmp_path):
    message = error(tmp_path, HEALTH.format("      type: command\n"))
    assert "conf.yaml:6: services.app.health.command: health type 'command' needs" in (
        message
    )


@pytest.mark.parametrize(
    ("value", "reason"),
    [("700", "from 100 to 599"), ("99", "from 100 to 599"), ("'200'", "like 200")],
)
def test_bad_expect_status(tmp_path, value, reason):
    message = error(
        tmp_path, HEALTH.format(f"      type: http\n      expect_status: {value}\n")
    )
    assert "conf.yaml:7: services.app.health.expect_status:" in message
    assert reason in message


def test_bad_health_url(tmp_path):
    message = error(
        tmp_path, HEALTH.format("      type: http\n      url: https://h/health\n")
    )
    assert "conf.yaml:7: services.app.health.url: https is not supported" in message


@pytest.mark.parametrize("key", ["interval", "timeout"])
def test_zero_health_durations(tmp_path, key):
    message = error(tmp_path, HEALTH.format(f"      {key}: 0\n"))
    assert f"conf.yaml:6: services.app.health.{key}: must be greater than 0" in (
        message
    )


def test_health_must_be_a_mapping(tmp_path):
    message = error(tmp_path, MINIMAL + "    health: http\n")
    assert "conf.yaml:5: services.app.health: expected a mapping" in message


def test_error_attributes(tmp_path):
    path = write(tmp_path, MINIMAL.replace("http://", "https://"))
    with pytest.raises(ConfigError) as info:
        load(path)
    err = info.value
    assert (err.file, err.line, err.key) == (path, 4, "services.app.upstream")
    assert "https" in err.problem
    assert os.path.isabs(err.file)

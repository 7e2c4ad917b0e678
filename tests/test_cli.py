"""The command line end to end: version, check, config errors, exit codes, logs."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PYTHON, backend_command, free_port, port_open, wait_for

import dynapm

pytestmark = pytest.mark.timeout(60)


def dynapm_script() -> str:
    beside = Path(sys.executable).parent / "dynapm"
    found = str(beside) if beside.exists() else shutil.which("dynapm")
    assert found, "the dynapm console script is not installed"
    return found


def run_cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(
        [dynapm_script(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def write(tmp_path: Path, text: str, name: str = "conf.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


# ---------------------------------------------------------------------------
# --version


def test_version_console_script():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dynapm {dynapm.__version__}"


def test_version_python_module():
    result = subprocess.run(
        [PYTHON, "-m", "dynapm", "--version"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dynapm {dynapm.__version__}"


# ---------------------------------------------------------------------------
# check


def test_check_prints_routing_table(tmp_path):
    listen = free_port()
    path = write(
        tmp_path,
        f"""
        listen: 127.0.0.1:{listen}
        services:
          web:
            upstream: http://127.0.0.1:3101
            run: python3 app.py
            hosts: [web.example.com, WWW.example.com]
            ports: [15901]
            idle_timeout: 90s
          api:
            routes:
              - {{host: api.example.com, upstream: http://127.0.0.1:8101}}
              - {{port: 15902, upstream: http://127.0.0.1:8102}}
            proxy_only: true
          plain:
            upstream: http://127.0.0.1:3103
            start: "true"
            stop: "true"
        """,
    )
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "OK" in out
    for expected in (
        "web.example.com",
        "www.example.com",
        "15901",
        "http://127.0.0.1:3101",
        "api.example.com",
        "http://127.0.0.1:8101",
        "15902",
        "http://127.0.0.1:8102",
        "plain",
        "http://127.0.0.1:3103",
    ):
        assert expected in out, (expected, out)
    # Every route is on a line of its own, naming its service.
    web_lines = [line for line in out.splitlines() if "3101" in line]
    assert len(web_lines) == 3
    assert all("web" in line for line in web_lines)
    assert "Traceback" not in result.stderr
    # check only validates: nothing was started or opened.
    assert not port_open(listen)


def test_check_python_module_same_entry_point(tmp_path):
    path = write(
        tmp_path,
        """
        services:
          app:
            upstream: http://127.0.0.1:3101
            run: python3 app.py
        """,
    )
    result = subprocess.run(
        [PYTHON, "-m", "dynapm", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert "http://127.0.0.1:3101" in result.stdout


def test_check_accepts_global_config_option(tmp_path):
    path = write(
        tmp_path,
        """
        services:
          app:
            upstream: http://127.0.0.1:3101
            run: python3 app.py
        """,
    )
    result = run_cli("-c", str(path), "check")
    assert result.returncode == 0, result.stderr
    assert "http://127.0.0.1:3101" in result.stdout


# ---------------------------------------------------------------------------
# Configuration errors: exit 2, one line, file:line, key path, no traceback

SERVICE = """\
listen: 127.0.0.1:3000
services:
  app:
    upstream: http://127.0.0.1:3101
    run: python3 app.py
"""

CONFIG_ERRORS = {
    "unknown key": (
        SERVICE + "    idle_timout: 5m\n",
        6,
        "services.app.idle_timout",
        "did you mean 'idle_timeout'",
    ),
    "bad duration": (
        SERVICE + "    idle_timeout: 5 minutes\n",
        6,
        "services.app.idle_timeout",
        "duration",
    ),
    "missing upstream": (
        "listen: 127.0.0.1:3000\nservices:\n  app:\n    run: python3 app.py\n",
        3,
        "services.app.upstream",
        "upstream",
    ),
    "duplicate host": (
        SERVICE
        + "    hosts: [a.example.com]\n"
        + "  other:\n"
        + "    upstream: http://127.0.0.1:3102\n"
        + "    run: python3 other.py\n"
        + "    hosts: A.example.com\n",
        10,
        "services.other.hosts",
        "a.example.com",
    ),
    "duplicate port": (
        SERVICE
        + "    ports: 15901\n"
        + "  other:\n"
        + "    upstream: http://127.0.0.1:3102\n"
        + "    run: python3 other.py\n"
        + "    ports: [15901]\n",
        10,
        "services.other.ports",
        "15901",
    ),
    "unknown health type": (
        SERVICE + "    health: {type: htp}\n",
        6,
        "services.app.health.type",
        "did you mean 'http'",
    ),
    "bad size": (
        "limits:\n  max_body: 10 apples\n" + SERVICE,
        2,
        "limits.max_body",
        "size",
    ),
}


@pytest.mark.parametrize("mode", ["check", "serve"])
@pytest.mark.parametrize("case", sorted(CONFIG_ERRORS))
def test_config_error_is_one_line_exit_2(tmp_path, case, mode):
    text, line, key, words = CONFIG_ERRORS[case]
    path = tmp_path / "conf.yaml"
    path.write_text(text)
    if mode == "check":
        result = run_cli("check", "-c", str(path))
    else:
        result = run_cli("-c", str(path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    message = lines[0]
    assert f"{path}:{line}:" in message, message
    assert key in message, message
    assert words in message, message


def test_invalid_yaml_names_line(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text("services:\n  app:\n    upstream: [http://x\n    run: y\n")
    result = run_cli("check", "-c", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(path) + ":" in lines[0]


@pytest.mark.parametrize("mode", ["check", "serve"])
def test_missing_file_exits_2(tmp_path, mode):
    path = tmp_path / "nowhere.yaml"
    if mode == "check":
        result = run_cli("check", "-c", str(path))
    else:
        result = run_cli("-c", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    assert str(path) in lines[0]


def test_no_config_argument_exits_2():
    result = run_cli()
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "-c" in result.stderr


@pytest.mark.parametrize("key", ["max_body", "max_header"])
def test_size_too_large_is_a_config_error(tmp_path, key):
    listen = free_port()
    path = write(
        tmp_path,
        f"""
        listen: 127.0.0.1:{listen}
        limits:
          {key}: 9000000000GiB
        services:
          app:
            upstream: http://127.0.0.1:3101
            run: python3 app.py
        """,
    )
    check = run_cli("check", "-c", str(path))
    served = run_cli("-c", str(path), timeout=20)
    assert "Traceback" not in served.stderr, served.stderr
    assert check.returncode == 2
    assert served.returncode == 2


# ---------------------------------------------------------------------------
# Port in use


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    try:
        sock.bind((host, 0))
    except OSError:
        sock.close()
        pytest.skip(f"cannot bind {host} here")
    sock.listen()
    return sock


@pytest.mark.parametrize(
    "host, shown", [("127.0.0.1", "127.0.0.1:{}"), ("::1", "[::1]:{}")]
)
def test_main_port_in_use_exits_1_naming_address(tmp_path, host, shown):
    with listening_socket(host) as taken:
        port = taken.getsockname()[1]
        address = shown.format(port)
        path = write(
            tmp_path,
            f"""
            listen: "{address}"
            services:
              app:
                upstream: http://127.0.0.1:3101
                run: python3 app.py
            """,
        )
        result = run_cli("-c", str(path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert address in result.stderr
    assert "in use" in result.stderr


def test_dedicated_port_in_use_exits_1_naming_address(tmp_path):
    listen = free_port()
    with listening_socket() as taken:
        port = taken.getsockname()[1]
        path = write(
            tmp_path,
            f"""
            listen: 127.0.0.1:{listen}
            services:
              app:
                upstream: http://127.0.0.1:3101
                run: python3 app.py
                ports: [{port}]
            """,
        )
        result = run_cli("-c", str(path))
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    # The main listener that did open was closed again.
    assert not port_open(listen)


def test_port_in_use_leaves_adopted_service_running(tmp_path):
    # A second gateway started by mistake on the same config must not take
    # down the services the first one runs.
    backend = free_port()
    process = subprocess.Popen(
        [PYTHON, str(Path(__file__).parent / "support" / "backend.py"), str(backend)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: port_open(backend), timeout=10)
        pidfile = tmp_path / "backend.pid"
        pidfile.write_text(str(process.pid))
        with listening_socket() as taken:
            port = taken.getsockname()[1]
            path = write(
                tmp_path,
                f"""
                listen: 127.0.0.1:{port}
                services:
                  app:
                    upstream: http://127.0.0.1:{backend}
                    start: "true"
                    stop: "kill $(cat {pidfile})"
                    check: "kill -0 $(cat {pidfile})"
                """,
            )
            result = run_cli("-c", str(path))
        assert result.returncode == 1, result.stderr
        assert process.poll() is None, "the running service was stopped"
        assert port_open(backend)
    finally:
        if process.poll() is None:
            process.terminate()
        process.wait(10)


# ---------------------------------------------------------------------------
# JSON logs


def test_json_logs_one_object_per_line_with_service(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        logging:
          format: json
          access_log: true
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend)}
            idle_timeout: 500ms
          broken:
            upstream: http://127.0.0.1:{ports()}
            run: "echo 'no such config' >&2; exit 1"
            start_timeout: 2s
        """,
        backend_ports=[backend],
    )
    gw.echo("app")
    status, _, _ = gw.request("broken")
    assert status == 503
    wait_for(lambda: not port_open(backend), timeout=5)
    gw.process.send_signal(signal.SIGTERM)
    assert gw.process.wait(10) == 0

    entries = []
    for line in gw.log().splitlines():
        entry = json.loads(line)  # every line is one JSON object
        assert isinstance(entry, dict), line
        entries.append(entry)
    lifecycle = [e for e in entries if e.get("logger") == "dynapm.lifecycle"]
    assert lifecycle
    assert all("service" in e for e in lifecycle), lifecycle
    app_messages = [e["msg"] for e in lifecycle if e["service"] == "app"]
    for expected in ("starting", "online", "stopping", "offline"):
        assert expected in app_messages, app_messages
    failures = [e for e in lifecycle if e["service"] == "broken"]
    assert any("no such config" in json.dumps(e) for e in failures), failures
    # The backend's own output is logged with its service name too.
    output = [e for e in entries if "listening on" in e.get("msg", "")]
    assert output and all(e.get("service") == "app" for e in output)

"""Shared fixtures: real gateway processes, real backend processes, free ports.

Every test that needs a gateway writes its own YAML with the ``gateway``
fixture, which starts ``python -m dynapm -c conf.yaml`` as a child process,
waits until the listener accepts connections, and at teardown sends SIGTERM,
checks the gateway exited 0 and that no backend it started is left running.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BACKEND = Path(__file__).resolve().parent / "support" / "backend.py"
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02):
    """Poll ``predicate`` until it returns a truthy value; fail at timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def backend_command(port: int, *args: str, starts: Path | None = None) -> str:
    """A shell command that runs the test backend (and counts its starts)."""
    command = f"exec {PYTHON} {BACKEND} {port} " + " ".join(args)
    if starts is not None:
        command = f"echo start >> {starts}; " + command
    return command


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            # A zombie has exited; only its parent has not reaped it yet.
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class Gateway:
    """A running ``dynapm`` process on a config of the test's own."""

    def __init__(self, directory: Path, config: str, port: int):
        self.directory = directory
        self.port = port
        self.config_path = directory / "conf.yaml"
        self.config_path.write_text(config)
        self.log_path = directory / "gateway.log"
        self.process: subprocess.Popen | None = None
        self.backend_ports: list[int] = []

    def start(self, wait: bool = True) -> Gateway:
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [PYTHON, "-m", "dynapm", "-c", str(self.config_path)],
            stdout=self._log,
            stderr=self._log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=self.directory,
        )
        if wait:
            wait_for(
                lambda: port_open(self.port) or self.process.poll() is not None,
                timeout=20,
            )
            assert self.process.poll() is None, self.log()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    # -- clients -------------------------------------------------------------

    def connection(self, port: int | None = None, timeout: float = 30):
        return http.client.HTTPConnection(
            "127.0.0.1", port or self.port, timeout=timeout
        )

    def request(
        self,
        host: str | None,
        method: str = "GET",
        path: str = "/echo",
        body=None,
        headers: dict | None = None,
        port: int | None = None,
        timeout: float = 30,
    ):
        """One request on a new connection; returns (status, headers, body)."""
        conn = self.connection(port, timeout)
        try:
            all_headers = dict(headers or {})
            if host is not None:
                all_headers["Host"] = host
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, response.getheaders(), response.read()
        finally:
            conn.close()

    def echo(self, host: str, **kwargs) -> dict:
        status, _, body = self.request(host, **kwargs)
        assert status == 200, body
        return json.loads(body)


@pytest.fixture
def gateway(tmp_path):
    """Factory: ``gateway(yaml_text, backend_ports=[...])`` -> running Gateway.

    ``{listen}`` in the text is replaced by the gateway's address. At
    teardown the gateway gets SIGTERM; it must exit 0 and every backend port
    listed must refuse connections afterwards (nothing left running).
    """
    started: list[Gateway] = []

    def make(config: str, backend_ports=(), start: bool = True, port=None):
        port = port or free_port()
        text = textwrap.dedent(config).replace("{listen}", f"127.0.0.1:{port}")
        gw = Gateway(tmp_path, text, port)
        gw.backend_ports = list(backend_ports)
        started.append(gw)
        return gw.start() if start else gw

    yield make

    for gw in started:
        try:
            code = gw.stop()
        except subprocess.TimeoutExpired as err:
            gw.kill()
            raise AssertionError(
                "gateway did not exit after SIGTERM\n" + gw.log()
            ) from err
        assert code == 0, gw.log()
        for port in gw.backend_ports:
            wait_for(lambda port=port: not port_open(port), timeout=10)


@pytest.fixture
def ports():
    """Factory of free loopback ports."""
    return free_port

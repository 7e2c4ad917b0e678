"""The bundled example (examples/quickstart.yaml) works as the README says:
every service starts on its first request and stops again when idle."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import time

import pytest
from conftest import PYTHON, ROOT, port_open, wait_for

EXAMPLE = ROOT / "examples" / "quickstart.yaml"
PORTS = (3000, 3001, 4000, 8101, 8102)


def get(port: int, path: str, host: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type"), response
    except Exception:
        conn.close()
        raise


@pytest.fixture
def quickstart(tmp_path):
    busy = [port for port in PORTS if port_open(port)]
    if busy:
        pytest.fail(f"the example's ports are in use: {busy}")
    log = open(tmp_path / "gateway.log", "wb")
    process = subprocess.Popen(
        [PYTHON, "-m", "dynapm", "-c", str(EXAMPLE)],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        cwd=tmp_path,
    )
    wait_for(lambda: port_open(3000) and port_open(3001), timeout=20)
    yield process, tmp_path / "gateway.log"
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    log.close()
    for port in PORTS:
        wait_for(lambda port=port: not port_open(port), timeout=10)


def test_quickstart_services_start_on_demand_and_idle_out(quickstart):
    process, log_path = quickstart
    assert not port_open(8101) and not port_open(8102)

    status, _, response = get(3000, "/", host="site.localhost")
    assert status == 200
    assert b"Hello from a static site" in response.read()
    assert port_open(8101)

    status, ctype, response = get(3000, "/api", host="app.localhost:3000")
    assert status == 200 and ctype == "application/json"
    assert json.loads(response.read())["pid"] > 0

    # The app's dedicated port, and its Server-Sent Events stream: the first
    # tick arrives long before the stream (five ticks, a second apart) ends.
    started = time.monotonic()
    status, ctype, response = get(3001, "/events")
    assert status == 200 and ctype == "text/event-stream"
    first = response.readline()
    assert first == b"event: tick\n"
    assert time.monotonic() - started < 2.5
    response.close()

    # The README's status line works against the example's admin API.
    status = subprocess.run(
        [PYTHON, "-m", "dynapm", "status", "-c", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert status.returncode == 0, status.stderr
    assert "site" in status.stdout and "app" in status.stdout
    assert "online" in status.stdout

    # Both stop after their 10 s idle timeout (generous bound).
    idle_from = time.monotonic()
    wait_for(lambda: not port_open(8101) and not port_open(8102), timeout=20)
    assert time.monotonic() - idle_from < 16

    log = log_path.read_text()
    assert "online service=site" in log and "online service=app" in log
    assert "reason=idle" in log
    assert process.poll() is None

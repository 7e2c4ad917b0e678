"""Lifecycle end to end: cold start, idle stop, single-flight, failures."""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    BACKEND,
    PYTHON,
    backend_command,
    pid_alive,
    port_open,
    wait_for,
)


def run_service(gateway, ports, tmp_path, *, idle="1s", extra=""):
    backend = ports()
    starts = tmp_path / "starts.log"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend, "--boot-delay 0.2", starts=starts)}
            idle_timeout: {idle}
            {extra}
        """,
        backend_ports=[backend],
    )
    return gw, backend, starts


def test_cold_start_run_mode_holds_request_then_idles_out(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path)
    assert not port_open(backend)

    info = gw.echo("app")
    assert info["method"] == "GET"
    assert starts.read_text().count("start") == 1
    assert port_open(backend)

    # Stops within a second of the idle deadline (1 s), generous bound.
    idle_from = time.monotonic()
    wait_for(lambda: not port_open(backend), timeout=5)
    assert time.monotonic() - idle_from < 3.5

    # The next request starts it again.
    assert gw.echo("app")["pid"] != info["pid"]
    assert starts.read_text().count("start") == 2


def test_concurrent_cold_requests_start_once(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="30s")
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(lambda _: gw.echo("app"), range(20)))
    assert len({r["pid"] for r in results}) == 1
    assert starts.read_text().count("start") == 1


# ---------------------------------------------------------------------------
# Helpers for the tests below


def unexpected_tracebacks(log: str) -> list[str]:
    """The tracebacks in a gateway log: there should be none."""
    return log.split("Traceback (most recent call last):")[1:]


@pytest.fixture(autouse=True)
def no_traceback_in_gateway_log(tmp_path):
    """Whatever a test does, the gateway never logs a traceback."""
    yield
    log = tmp_path / "gateway.log"
    if log.exists():
        text = log.read_text(errors="replace")
        assert not unexpected_tracebacks(text), text


def count_starts(path: Path) -> int:
    return path.read_text().count("start") if path.exists() else 0


def read_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().strip()))


def bash_commands(tmp_path: Path, port: int, *args: str, guard: str = ""):
    """start/stop commands that run the backend in the background by pidfile.

    ``guard`` runs first in the start command and may fail it. Every pid
    started is also appended to ``pids.log``.
    """
    starts = tmp_path / "starts.log"
    pidfile = tmp_path / "backend.pid"
    pids = tmp_path / "pids.log"
    log = tmp_path / "backend.log"
    backend = f"{PYTHON} {BACKEND} {port} " + " ".join(args)
    start = (
        f"echo start >> {starts}; {guard}"
        f"nohup {backend} >> {log} 2>&1 & echo $! > {pidfile}; "
        f"cat {pidfile} >> {pids}"
    )
    stop = f"test -f {pidfile} && kill $(cat {pidfile}); rm -f {pidfile}"
    return start, stop, starts, pidfile


def started_pids(tmp_path: Path) -> list[int]:
    pids = tmp_path / "pids.log"
    return [int(word) for word in pids.read_text().split()] if pids.exists() else []


def in_background(function, *args, **kwargs) -> concurrent.futures.Future:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(function, *args, **kwargs)
    pool.shutdown(wait=False)
    return future


def direct_get(port: int, path: str) -> tuple[int, bytes]:
    """A GET straight to a backend on 127.0.0.1, bypassing the gateway."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def header(headers, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name.lower():
            return value
    return None


# ---------------------------------------------------------------------------
# start/stop commands (bash mode)


def test_cold_start_bash_mode_start_stop_commands(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend, "--boot-delay 0.2")
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: {json.dumps(start)}
            stop: {json.dumps(stop)}
            idle_timeout: 1s
        """,
        backend_ports=[backend],
    )
    assert not port_open(backend)
    assert count_starts(starts) == 0

    first = gw.echo("app")
    assert count_starts(starts) == 1
    assert first["pid"] == read_pid(pidfile)

    # Idle stop runs the stop command: the pid ends and the port refuses.
    wait_for(lambda: not port_open(backend), timeout=5)
    wait_for(lambda: not pid_alive(first["pid"]), timeout=5)
    wait_for(lambda: not pidfile.exists(), timeout=5)

    second = gw.echo("app")
    assert second["pid"] != first["pid"]
    assert count_starts(starts) == 2


def test_large_post_during_cold_start_arrives_intact(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend, "--boot-delay 0.5")}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    body = os.urandom(5 * 1024 * 1024)
    begun = time.monotonic()
    info = gw.echo("app", method="POST", body=body)
    assert time.monotonic() - begun >= 0.4  # it really was a cold start
    assert info["body_len"] == len(body)
    assert info["body_sha256"] == hashlib.sha256(body).hexdigest()


def test_large_chunked_post_during_cold_start_arrives_intact(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend, "--boot-delay 0.5")}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    pieces = [os.urandom(256 * 1024) for _ in range(12)]
    conn = gw.connection()
    try:
        conn.request(
            "POST",
            "/echo",
            body=iter(pieces),
            headers={"Host": "app"},
            encode_chunked=True,
        )
        response = conn.getresponse()
        assert response.status == 200
        info = json.loads(response.read())
    finally:
        conn.close()
    whole = b"".join(pieces)
    assert info["body_len"] == len(whole)
    assert info["body_sha256"] == hashlib.sha256(whole).hexdigest()


# ---------------------------------------------------------------------------
# Start failures


def test_start_failure_503_names_cause_and_retries(gateway, ports, tmp_path):
    backend = ports()
    flag = tmp_path / "allowed"
    guard = f"test -f {flag} || {{ echo 'database is unreachable' >&2; exit 1; }}; "
    start, stop, starts, pidfile = bash_commands(tmp_path, backend, guard=guard)
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: {json.dumps(start)}
            stop: {json.dumps(stop)}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    status, headers, body = gw.request("app")
    assert status == 503
    text = body.decode()
    assert "app" in text
    assert "database is unreachable" in text
    assert "exited with status 1" in text
    assert header(headers, "Retry-After")
    assert count_starts(starts) == 1

    # The service went back to offline: the next request tries again.
    status, _, body = gw.request("app")
    assert status == 503, body
    assert count_starts(starts) == 2

    flag.touch()
    info = gw.echo("app")
    assert count_starts(starts) == 3
    assert info["pid"] == read_pid(pidfile)


def test_run_process_exiting_at_start_is_503_with_output(gateway, ports, tmp_path):
    backend = ports()
    starts = tmp_path / "starts.log"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: "echo start >> {starts}; echo 'config file missing' >&2; exit 1"
            idle_timeout: 30s
            start_timeout: 2s
        """,
    )
    begun = time.monotonic()
    status, headers, body = gw.request("app")
    assert time.monotonic() - begun < 3
    assert status == 503
    assert "app" in body.decode()
    assert "config file missing" in body.decode()
    assert header(headers, "Retry-After")
    status, _, _ = gw.request("app")
    assert status == 503
    assert count_starts(starts) == 2


def test_start_timeout_run_mode_kills_the_process(gateway, ports, tmp_path):
    backend = ports()
    pidfile = tmp_path / "backend.pid"
    run = f"echo $$ > {pidfile}; " + backend_command(backend, "--boot-delay 5")
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {json.dumps(run)}
            start_timeout: 1s
        """,
        backend_ports=[backend],
    )
    begun = time.monotonic()
    status, headers, body = gw.request("app")
    elapsed = time.monotonic() - begun
    assert status == 503, body
    assert 0.9 <= elapsed < 3, elapsed
    assert "app" in body.decode()
    assert "1s" in body.decode()
    assert header(headers, "Retry-After")
    pid = read_pid(pidfile)
    wait_for(lambda: not pid_alive(pid), timeout=3)
    assert not port_open(backend)


def test_start_timeout_bash_mode_runs_stop(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend, "--boot-delay 5")
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: {json.dumps(start)}
            stop: {json.dumps(stop)}
            start_timeout: 1s
        """,
        backend_ports=[backend],
    )
    begun = time.monotonic()
    status, _, body = gw.request("app")
    elapsed = time.monotonic() - begun
    assert status == 503, body
    assert 0.9 <= elapsed < 3, elapsed
    # The backend that never became ready was stopped by the stop command.
    wait_for(lambda: not pidfile.exists(), timeout=3)
    [pid] = started_pids(tmp_path)
    wait_for(lambda: not pid_alive(pid), timeout=3)
    assert not port_open(backend)
    assert count_starts(starts) == 1


# ---------------------------------------------------------------------------
# Health gating


def test_health_http_holds_request_until_probe_passes(gateway, ports, tmp_path):
    backend = ports()
    flag = tmp_path / "ready.flag"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend)}
            start_timeout: 20s
            health:
              type: http
              url: http://127.0.0.1:{backend}/ready?flag={flag}
        """,
        backend_ports=[backend],
    )
    pending = in_background(gw.echo, "app")
    # The backend listens (a tcp probe would pass) but answers 503.
    wait_for(lambda: port_open(backend), timeout=5)
    status, pid_text = direct_get(backend, "/pid")
    backend_pid = int(pid_text)
    assert direct_get(backend, f"/ready?flag={flag}")[0] == 503
    time.sleep(0.3)  # the request must still be held after some probes
    assert not pending.done()

    flag.touch()
    ready = time.monotonic()
    info = pending.result(timeout=5)
    # Forwarded as soon as a probe passes (interval 10ms), generous bound.
    assert time.monotonic() - ready < 1
    assert info["pid"] == backend_pid


def test_health_command_holds_request_until_it_passes(gateway, ports, tmp_path):
    backend = ports()
    flag = tmp_path / "ready.flag"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend)}
            start_timeout: 20s
            health:
              type: command
              command: test -f {flag}
              interval: 50ms
        """,
        backend_ports=[backend],
    )
    pending = in_background(gw.echo, "app")
    wait_for(lambda: port_open(backend), timeout=5)
    time.sleep(0.3)  # the request must still be held after some probes
    assert not pending.done()
    flag.touch()
    ready = time.monotonic()
    assert pending.result(timeout=5)["method"] == "GET"
    assert time.monotonic() - ready < 1.5


def test_health_http_expect_status(gateway, ports, tmp_path):
    good, bad = ports(), ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          good:
            upstream: http://127.0.0.1:{good}
            run: {backend_command(good)}
            health:
              type: http
              url: http://127.0.0.1:{good}/status/202
              expect_status: 202
          bad:
            upstream: http://127.0.0.1:{bad}
            run: {backend_command(bad)}
            start_timeout: 1s
            health:
              type: http
              url: http://127.0.0.1:{bad}/status/204
              expect_status: 200
        """,
        backend_ports=[good, bad],
    )
    assert gw.echo("good")["method"] == "GET"
    status, _, body = gw.request("bad")
    assert status == 503
    assert "bad" in body.decode()
    assert "204" in body.decode()
    wait_for(lambda: not port_open(bad), timeout=3)


# ---------------------------------------------------------------------------
# Crashes


def test_crash_then_next_request_restarts(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="30s")
    first = gw.echo("app")
    # A POST with a body that crashes the service is never replayed (an
    # idempotent request would be, once, per the retry rules).
    try:
        status, _, _ = gw.request("app", method="POST", path="/crash", body=b"x")
    except (http.client.HTTPException, ConnectionError):
        status = None
    assert status in (None, 502)
    wait_for(lambda: not pid_alive(first["pid"]), timeout=3)
    second = gw.echo("app")
    assert second["pid"] != first["pid"]
    assert count_starts(starts) == 2


def test_run_process_killed_while_idle_online_restarts(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="30s")
    first = gw.echo("app")
    os.kill(first["pid"], signal.SIGKILL)
    wait_for(lambda: not port_open(backend), timeout=3)
    second = gw.echo("app")
    assert second["pid"] != first["pid"]
    assert count_starts(starts) == 2


def test_run_process_killed_request_on_same_connection(gateway, ports, tmp_path):
    # The client keeps its connection; the request right after the kill
    # finds a pooled upstream connection that the dead backend left.
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="30s")
    conn = gw.connection()
    try:
        conn.request("GET", "/echo", headers={"Host": "app"})
        first = json.loads(conn.getresponse().read())
        os.kill(first["pid"], signal.SIGKILL)
        conn.request("GET", "/echo", headers={"Host": "app"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        assert json.loads(body)["pid"] != first["pid"]
    finally:
        conn.close()
    assert count_starts(starts) == 2


# ---------------------------------------------------------------------------
# What keeps a service busy


def test_client_disconnect_mid_request_releases_service(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="1s")
    gw.echo("app")
    mark = tmp_path / "arrived"
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(
            f"GET /hold?delay=1&mark={mark} HTTP/1.1\r\nHost: app\r\n\r\n".encode()
        )
        wait_for(mark.exists, timeout=5)
    left = time.monotonic()
    wait_for(lambda: not port_open(backend), timeout=5)
    # Idle from the disconnect: about 1 s, not held by the abandoned request.
    assert 0.8 <= time.monotonic() - left < 3.5


def test_client_disconnect_during_cold_start_releases_service(gateway, ports, tmp_path):
    backend = ports()
    starts = tmp_path / "starts.log"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend, "--boot-delay 0.5", starts=starts)}
            idle_timeout: 1s
        """,
        backend_ports=[backend],
    )
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(b"GET /echo HTTP/1.1\r\nHost: app\r\n\r\n")
        wait_for(starts.exists, timeout=5)
    # The start goes on; the service comes up and then idles out.
    wait_for(lambda: port_open(backend), timeout=5)
    wait_for(lambda: not port_open(backend), timeout=5)
    assert count_starts(starts) == 1


def test_sse_stream_longer_than_idle_timeout_keeps_service_up(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="1s")
    conn = gw.connection()
    try:
        conn.request("GET", "/sse?n=6&gap=0.4", headers={"Host": "app"})
        response = conn.getresponse()
        assert response.status == 200
        events = 0
        while True:
            line = response.readline()
            if not line:
                break
            if line.startswith(b"data: event"):
                events += 1
                assert port_open(backend), f"stopped after {events} events"
            if events == 6:
                break
        assert events == 6
        response.read()
        ended = time.monotonic()
    finally:
        conn.close()
    wait_for(lambda: not port_open(backend), timeout=5)
    # Idle from the end of the stream: not before, and not much after.
    assert 0.8 <= time.monotonic() - ended < 3.5
    assert count_starts(starts) == 1


# ---------------------------------------------------------------------------
# proxy_only and adoption


def spawn_backend(port: int, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [PYTHON, str(BACKEND), str(port), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: port_open(port) or process.poll() is not None, timeout=10)
    assert process.poll() is None
    return process


def test_proxy_only_never_started_or_stopped(gateway, ports, tmp_path):
    backend = ports()
    process = spawn_backend(backend)
    try:
        gw = gateway(
            f"""
            listen: {{listen}}
            services:
              app:
                upstream: http://127.0.0.1:{backend}
                proxy_only: true
                idle_timeout: 1s
            """,
        )
        assert gw.echo("app")["pid"] == process.pid
        assert gw.stop() == 0
        assert process.poll() is None
        assert port_open(backend)
    finally:
        process.terminate()
        process.wait(10)


def test_boot_adoption_skips_start_and_stops_at_sigterm(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend)
    process = spawn_backend(backend)
    pidfile.write_text(f"{process.pid}\n")
    check = f"test -f {pidfile} && kill -0 $(cat {pidfile})"
    try:
        gw = gateway(
            f"""
            listen: {{listen}}
            services:
              app:
                upstream: http://127.0.0.1:{backend}
                start: {json.dumps(start)}
                stop: {json.dumps(stop)}
                check: {json.dumps(check)}
                idle_timeout: 30s
            """,
        )
        assert gw.echo("app")["pid"] == process.pid
        assert count_starts(starts) == 0
        assert gw.stop() == 0
        process.wait(5)
        assert not port_open(backend)
        assert count_starts(starts) == 0
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def test_boot_check_failing_means_offline(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend)
    check = f"test -f {pidfile} && kill -0 $(cat {pidfile})"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: {json.dumps(start)}
            stop: {json.dumps(stop)}
            check: {json.dumps(check)}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    assert not port_open(backend)
    gw.echo("app")
    assert count_starts(starts) == 1


# ---------------------------------------------------------------------------
# Shutdown


def test_sigterm_stops_run_service_and_exits_0(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="30s")
    pid = gw.echo("app")["pid"]
    assert gw.stop() == 0
    wait_for(lambda: not pid_alive(pid), timeout=3)
    assert not port_open(backend)


def test_sigterm_lets_in_flight_request_finish(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          shutdown_timeout: 5s
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend)}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    pid = gw.echo("app")["pid"]
    mark = tmp_path / "arrived"
    pending = in_background(gw.request, "app", path=f"/hold?delay=1&mark={mark}")
    wait_for(mark.exists, timeout=5)
    begun = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    status, _, body = pending.result(timeout=10)
    assert status == 200
    assert body == b"held\n"
    assert gw.process.wait(10) == 0
    assert time.monotonic() - begun < 4
    wait_for(lambda: not pid_alive(pid), timeout=3)


# ---------------------------------------------------------------------------
# Requests during a stop


def stopping_service(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend)
    stopping = tmp_path / "stopping"
    slow_stop = f"touch {stopping}; sleep 0.5; {stop}; rm -f {stopping}"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: {json.dumps(start)}
            stop: {json.dumps(slow_stop)}
            idle_timeout: 500ms
        """,
        backend_ports=[backend],
    )
    return gw, backend, starts, stopping


def test_request_during_stop_waits_then_restarts(gateway, ports, tmp_path):
    gw, backend, starts, stopping = stopping_service(gateway, ports, tmp_path)
    first = gw.echo("app")
    wait_for(stopping.exists, timeout=5)
    second = gw.echo("app")
    # Answered by a new backend, started after the stop had finished.
    assert second["pid"] != first["pid"]
    assert not pid_alive(first["pid"])
    assert count_starts(starts) == 2


def test_many_requests_during_stop_start_once(gateway, ports, tmp_path):
    gw, backend, starts, stopping = stopping_service(gateway, ports, tmp_path)
    first = gw.echo("app")
    wait_for(stopping.exists, timeout=5)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: gw.request("app"), range(8)))
    assert [status for status, _, _ in results] == [200] * 8, results
    pids = {json.loads(body)["pid"] for _, _, body in results}
    assert len(pids) == 1 and first["pid"] not in pids
    assert count_starts(starts) == 2


# ---------------------------------------------------------------------------
# More shutdown and stop cases


def test_sigint_stops_like_sigterm(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="30s")
    pid = gw.echo("app")["pid"]
    gw.process.send_signal(signal.SIGINT)
    assert gw.process.wait(10) == 0, gw.log()
    wait_for(lambda: not pid_alive(pid), timeout=3)
    assert "Traceback" not in gw.log()


def test_sigterm_during_cold_start_answers_held_request(gateway, ports, tmp_path):
    backend = ports()
    starts = tmp_path / "starts.log"
    pidfile = tmp_path / "backend.pid"
    run = f"echo $$ > {pidfile}; " + backend_command(
        backend, "--boot-delay 1", starts=starts
    )
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          shutdown_timeout: 5s
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {json.dumps(run)}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    pending = in_background(gw.request, "app")
    pid = read_pid(pidfile)
    gw.process.send_signal(signal.SIGTERM)
    status, _, body = pending.result(timeout=10)
    assert status == 200, body
    assert gw.process.wait(10) == 0
    wait_for(lambda: not pid_alive(pid), timeout=3)


def test_shutdown_timeout_cuts_long_request(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          shutdown_timeout: 1s
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend)}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    pid = gw.echo("app")["pid"]
    mark = tmp_path / "arrived"
    pending = in_background(gw.request, "app", path=f"/hold?delay=20&mark={mark}")
    wait_for(mark.exists, timeout=5)
    begun = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    assert gw.process.wait(10) == 0
    assert time.monotonic() - begun < 4
    with pytest.raises((OSError, http.client.HTTPException)):
        pending.result(timeout=5)
    wait_for(lambda: not pid_alive(pid), timeout=3)


def test_stop_timeout_escalates_to_sigkill(gateway, ports, tmp_path):
    # The backend ignores SIGTERM (inherited SIG_IGN through exec).
    backend = ports()
    run = "trap '' TERM; " + backend_command(backend)
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {json.dumps(run)}
            idle_timeout: 500ms
            stop_timeout: 500ms
        """,
        backend_ports=[backend],
    )
    pid = gw.echo("app")["pid"]
    served = time.monotonic()
    wait_for(lambda: not pid_alive(pid), timeout=5)
    assert time.monotonic() - served < 3.5
    assert not port_open(backend)


def test_run_service_whole_process_group_is_stopped(gateway, ports, tmp_path):
    # bash stays the parent: the backend is a child in the same group.
    backend = ports()
    pidfile = tmp_path / "child.pid"
    run = f"{PYTHON} {BACKEND} {backend} & echo $! > {pidfile}; wait"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {json.dumps(run)}
            idle_timeout: 500ms
        """,
        backend_ports=[backend],
    )
    info = gw.echo("app")
    assert info["pid"] == read_pid(pidfile)
    wait_for(lambda: not pid_alive(info["pid"]), timeout=5)
    assert not port_open(backend)


def test_idle_keepalive_client_connection_does_not_keep_service_up(
    gateway, ports, tmp_path
):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="1s")
    conn = gw.connection()
    try:
        conn.request("GET", "/echo", headers={"Host": "app"})
        first = json.loads(conn.getresponse().read())
        served = time.monotonic()
        wait_for(lambda: not port_open(backend), timeout=5)
        assert 0.8 <= time.monotonic() - served < 3.5
        # The same kept-alive client connection starts it again.
        conn.request("GET", "/echo", headers={"Host": "app"})
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, body
        assert json.loads(body)["pid"] != first["pid"]
    finally:
        conn.close()
    assert count_starts(starts) == 2


def test_idle_timeout_zero_never_stops(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="0")
    pid = gw.echo("app")["pid"]
    time.sleep(1.5)  # nothing to wait for: the service must simply stay
    assert pid_alive(pid)
    assert gw.echo("app")["pid"] == pid


def test_proxy_only_backend_down_is_502_and_nothing_started(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            proxy_only: true
        """,
    )
    status, _, body = gw.request("app")
    assert status == 502
    assert "app" in body.decode()


def test_crash_bash_mode_restarts_via_refused_connection(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend)
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: {json.dumps(start)}
            stop: {json.dumps(stop)}
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    first = gw.echo("app")
    try:
        gw.request("app", method="POST", path="/crash", body=b"x")
    except (http.client.HTTPException, ConnectionError):
        pass
    wait_for(lambda: not port_open(backend), timeout=3)
    # The gateway learns of the crash from the refused connection; the POST
    # sent nothing upstream yet, so it is replayed whole after the restart.
    body = os.urandom(1024 * 1024)
    second = gw.echo("app", method="POST", body=body)
    assert second["pid"] != first["pid"]
    assert second["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert count_starts(starts) == 2


def test_run_service_env_cwd_and_log(gateway, ports, tmp_path):
    backend = ports()
    work = tmp_path / "work"
    work.mkdir()
    run = 'echo "$GREETING" > seen.txt; ' + backend_command(backend)
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {json.dumps(run)}
            cwd: work
            env: {{GREETING: hello there}}
            log: logs/app.log
        """,
        backend_ports=[backend],
    )
    (tmp_path / "logs").mkdir()
    gw.echo("app")
    assert (work / "seen.txt").read_text() == "hello there\n"
    log = tmp_path / "logs" / "app.log"
    wait_for(lambda: log.exists() and "listening on" in log.read_text(), timeout=3)


def test_start_command_that_hangs_times_out(gateway, ports, tmp_path):
    backend = ports()
    starts = tmp_path / "starts.log"
    stops = tmp_path / "stops.log"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: "echo start >> {starts}; sleep 30"
            stop: "echo stop >> {stops}"
            start_timeout: 1s
        """,
    )
    begun = time.monotonic()
    status, headers, body = gw.request("app")
    assert status == 503, body
    assert time.monotonic() - begun < 3.5
    assert "app" in body.decode()
    assert "timed out" in body.decode()
    assert header(headers, "Retry-After")
    # The stop command cleans up after the start that never finished.
    wait_for(stops.exists, timeout=3)


def test_concurrent_requests_to_failing_start_run_it_once(gateway, ports, tmp_path):
    backend = ports()
    starts = tmp_path / "starts.log"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: "echo start >> {starts}; sleep 0.5; echo 'disk full' >&2; exit 1"
            stop: "true"
        """,
    )
    with concurrent.futures.ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda _: gw.request("app"), range(10)))
    assert [status for status, _, _ in results] == [503] * 10
    assert all(b"disk full" in body for _, _, body in results)
    assert count_starts(starts) == 1


def test_steady_requests_keep_service_up(gateway, ports, tmp_path):
    gw, backend, starts = run_service(gateway, ports, tmp_path, idle="1s")
    pid = gw.echo("app")["pid"]
    for _ in range(6):
        time.sleep(0.4)  # the cadence under test, shorter than idle_timeout
        assert gw.echo("app")["pid"] == pid
    assert count_starts(starts) == 1
    wait_for(lambda: not port_open(backend), timeout=5)


def test_defaults_section_idle_timeout_applies(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        defaults:
          idle_timeout: 500ms
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend)}
        """,
        backend_ports=[backend],
    )
    gw.echo("app")
    served = time.monotonic()
    wait_for(lambda: not port_open(backend), timeout=5)
    assert time.monotonic() - served < 3


def test_adopted_service_idles_out_with_stop_command(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend)
    process = spawn_backend(backend)
    pidfile.write_text(f"{process.pid}\n")
    check = f"test -f {pidfile} && kill -0 $(cat {pidfile})"
    try:
        gateway(
            f"""
            listen: {{listen}}
            services:
              app:
                upstream: http://127.0.0.1:{backend}
                start: {json.dumps(start)}
                stop: {json.dumps(stop)}
                check: {json.dumps(check)}
                idle_timeout: 1s
            """,
        )
        # No request at all: the idle clock runs from the adoption.
        assert process.wait(5) is not None
        assert not port_open(backend)
        assert count_starts(starts) == 0
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def test_dedicated_port_cold_start(gateway, ports, tmp_path):
    backend, dedicated = ports(), ports()
    starts = tmp_path / "starts.log"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {backend_command(backend, starts=starts)}
            ports: [{dedicated}]
            idle_timeout: 30s
        """,
        backend_ports=[backend],
    )
    info = gw.echo("any.host.example", port=dedicated)
    assert info["method"] == "GET"
    assert count_starts(starts) == 1


def test_sigterm_during_slow_start_is_bounded(gateway, ports, tmp_path):
    backend = ports()
    pidfile = tmp_path / "backend.pid"
    run = f"echo $$ > {pidfile}; " + backend_command(backend, "--boot-delay 6")
    gw = gateway(
        f"""
        listen: {{listen}}
        limits:
          shutdown_timeout: 1s
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: {json.dumps(run)}
            start_timeout: 60s
        """,
        backend_ports=[backend],
    )
    pending = in_background(gw.request, "app")
    pid = read_pid(pidfile)
    begun = time.monotonic()
    gw.process.send_signal(signal.SIGTERM)
    code = gw.process.wait(15)
    elapsed = time.monotonic() - begun
    with contextlib.suppress(OSError, http.client.HTTPException):
        pending.result(timeout=5)
    assert code == 0
    wait_for(lambda: not pid_alive(pid), timeout=3)
    # shutdown_timeout (1 s) plus stopping the half-started process.
    assert elapsed < 4, elapsed


def test_listeners_open_only_after_boot_checks(gateway, ports, tmp_path):
    backend = ports()
    start, stop, starts, pidfile = bash_commands(tmp_path, backend)
    checked = tmp_path / "checked"
    check = f"sleep 0.7; touch {checked}; false"
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            start: {json.dumps(start)}
            stop: {json.dumps(stop)}
            check: {json.dumps(check)}
        """,
        backend_ports=[backend],
        start=False,
    )
    gw.start()  # returns as soon as the listener accepts
    assert checked.exists()
    gw.echo("app")
    assert count_starts(starts) == 1


@pytest.mark.parametrize(
    "service, words",
    [
        ("logged", ["exited with status 4", "cannot open database"]),
        ("nocwd", ["missing/dir", "does not exist"]),
        ("nolog", ["log file", "missing/dir/app.log"]),
        ("nocmd", ["status 127", "no-such-command-xyz"]),
    ],
)
def test_start_failure_body_names_the_cause(gateway, ports, tmp_path, service, words):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          logged:
            upstream: http://127.0.0.1:{backend}
            run: "echo 'cannot open database' >&2; exit 4"
            log: app.log
            start_timeout: 2s
          nocwd:
            upstream: http://127.0.0.1:{backend}
            run: "true"
            cwd: missing/dir
          nolog:
            upstream: http://127.0.0.1:{backend}
            run: "true"
            log: missing/dir/app.log
          nocmd:
            upstream: http://127.0.0.1:{backend}
            start: no-such-command-xyz
            stop: "true"
        """,
    )
    status, headers, body = gw.request(service)
    assert status == 503
    assert header(headers, "Retry-After")
    text = body.decode()
    assert f"'{service}'" in text
    for word in words:
        assert word in text, text


def test_daemonizing_start_command_adds_no_fixed_delay(gateway, ports, tmp_path):
    # The backend already runs; the start commands only differ in leaving a
    # background process behind (its output redirected, as a daemon does).
    backend = ports()
    process = spawn_backend(backend)
    stops = {name: tmp_path / f"{name}.stops" for name in ("plain", "daemon")}
    commands = {
        "plain": "true",
        "daemon": "sleep 30 > /dev/null 2>&1 < /dev/null &",
    }
    services = "".join(
        f"  {name}:\n"
        f"    upstream: http://127.0.0.1:{backend}\n"
        f"    start: {json.dumps(command)}\n"
        f'    stop: "echo stop >> {stops[name]}"\n'
        "    idle_timeout: 200ms\n"
        for name, command in commands.items()
    )
    try:
        gw = gateway("listen: {listen}\nservices:\n" + services)
        best = {}
        for name in commands:
            samples = []
            for round_ in range(3):
                begun = time.monotonic()
                assert gw.echo(name)["pid"] == process.pid
                samples.append(time.monotonic() - begun)
                wait_for(
                    lambda name=name, n=round_ + 1: count_lines(stops[name]) == n,
                    timeout=5,
                )
            best[name] = min(samples)
        assert best["daemon"] - best["plain"] < 0.06, best
    finally:
        process.terminate()
        process.wait(10)


def count_lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def count_connections(port: int, window: float) -> int:
    """Listen on ``port`` for ``window`` seconds; how many clients connected."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(128)
        server.settimeout(0.05)
        count = 0
        end = time.monotonic() + window
        while time.monotonic() < end:
            try:
                client, _ = server.accept()
            except TimeoutError:
                continue
            client.close()
            count += 1
        return count


def test_failed_start_leaves_no_probe_running(gateway, ports, tmp_path):
    backend = ports()
    gw = gateway(
        f"""
        listen: {{listen}}
        services:
          app:
            upstream: http://127.0.0.1:{backend}
            run: "exit 1"
            start_timeout: 5s
            health:
              interval: 1ms
        """,
    )
    for _ in range(40):
        status, _, _ = gw.request("app")
        assert status == 503
    # Every start has failed and answered: nothing may probe the upstream now.
    assert count_connections(backend, 0.5) == 0

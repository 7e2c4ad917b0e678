"""Process, port, load-tool and measurement helpers for benchmarks/run.py.

Everything here acts on loopback addresses and on processes this harness
started itself; processes are stopped by pid or by their own process group.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
CONF_DIR = BENCH_DIR / "conf"
PEERS_DIR = BENCH_DIR / "peers"
PYTHON = sys.executable
LOOPBACK = "127.0.0.1"


class BenchError(Exception):
    """A peer or tool did not behave; the message says which and why."""


# -- configuration templates ----------------------------------------------


def render(template: str, dest: Path, **values: object) -> Path:
    """Fill ``@name@`` placeholders of a file in conf/ and write it to dest."""
    text = (CONF_DIR / template).read_text()
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    left = sorted(set(re.findall(r"@([a-z_]+)@", text)))
    if left:
        raise BenchError(f"{template}: placeholders without a value: {left}")
    dest.write_text(text)
    return dest


# -- ports ------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """Distinct loopback ports that were free a moment ago."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind((LOOPBACK, 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_until(predicate, timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# -- processes --------------------------------------------------------------


def pin_to(cpu: int):
    """A preexec_fn that pins the child to one CPU."""

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


class Proc:
    """A child process in its own session (process group)."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log: Path,
        cpu: int | None = None,
        cwd: Path | None = None,
        stdin=subprocess.DEVNULL,
        stdout=None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log = log
        self.log_file = open(log, "ab")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout if stdout is not None else self.log_file,
            stderr=self.log_file,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=pin_to(cpu) if cpu is not None else None,
        )
        self.pid = self.proc.pid
        self.returncode: int | None = None

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if not self.alive():
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before "
                    f"listening on {port}: {self.log_tail()}"
                )
            return port_open(port)

        if not wait_until(ready, timeout):
            raise BenchError(f"{self.name} not listening on {port} after {timeout}s")

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(pid) for pid in text.split()]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process, wait, then kill its process group if needed."""
        if self.alive():
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill_group()
                self.proc.wait(5)
        self.returncode = self.proc.returncode
        self._kill_group()
        self.log_file.close()
        return self.returncode

    def _kill_group(self) -> None:
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def log_tail(self, lines: int = 12) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


# -- memory -----------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, value = line.split(":", 1)
                values[name] = int(value.split()[0])
    return values


def cpu_ns(pid: int) -> tuple[int, int]:
    """(time on a CPU, time runnable but waiting for one) of all the
    process's threads, in nanoseconds, from /proc/PID/task/*/schedstat."""
    run = wait = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "schedstat").read_text().split()
        except OSError:
            continue
        run += int(fields[0])
        wait += int(fields[1])
    return run, wait


def user_system_ticks(pid: int) -> tuple[int, int]:
    """(user, kernel) CPU time of the whole process in clock ticks, from
    /proc/PID/stat (utime and stime: every thread, 10 ms resolution)."""
    with open(f"/proc/{pid}/stat", "rb") as stat:
        fields = stat.read().rpartition(b")")[2].split()
    return int(fields[11]), int(fields[12])


class RssSampler:
    """Samples VmRSS of a process every few milliseconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = proc_status(self.pid)["VmRSS"]
            except (OSError, KeyError):
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            self._stop.wait(self.interval)


# -- statistics ---------------------------------------------------------------


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def percentile(values: list[float], fraction: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    return values[min(len(values) - 1, int(fraction * len(values)))]


# -- wrk --------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    p50_ms: float | None
    p99_ms: float | None
    requests: int
    non2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    output: str = ""

    @property
    def errors(self) -> int:
        return self.non2xx + sum(self.socket_errors.values())


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    if not rps or not total:
        raise BenchError(f"cannot read wrk output:\n{output}")
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    errors = {}
    if sockets:
        errors = {
            kind: int(value)
            for kind, value in zip(
                ("connect", "read", "write", "timeout"), sockets.groups(), strict=True
            )
            if int(value)
        }
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(p50.group(1)) if p50 else None,
        p99_ms=_latency_ms(p99.group(1)) if p99 else None,
        requests=int(total.group(1)),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=errors,
        output=output,
    )


def run_wrk(
    port: int,
    *,
    seconds: int,
    connections: int = 50,
    headers: tuple[str, ...] = ("Host: bench",),
    script: Path | None = None,
    script_args: tuple[str, ...] = (),
    cpu: int = 0,
) -> WrkResult:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency"]
    argv += ["--timeout", "5s"]
    for header in headers:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(f"http://{LOOPBACK}:{port}/")
    if script_args:
        argv += ["--", *script_args]
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        preexec_fn=pin_to(cpu),
    )
    if done.returncode != 0:
        raise BenchError(
            f"wrk failed ({done.returncode}): {(done.stderr + done.stdout).strip()}"
        )
    return parse_wrk(done.stdout)


# -- small HTTP clients ---------------------------------------------------------


def read_head(sock: socket.socket, buffer: bytes = b"") -> tuple[bytes, bytes]:
    """Reads until the end of a response head; returns (head, rest)."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise BenchError(f"connection closed inside a response head: {buffer!r}")
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    return head, rest


def header_value(head: bytes, name: bytes) -> bytes | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name:
            return value.strip()
    return None


def status_of(head: bytes) -> int:
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def http_get(port: int, host: str = "bench", path: str = "/", timeout: float = 10.0):
    """One GET on a fresh connection: (status, body)."""
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        )
        head, rest = read_head(sock)
        length = header_value(head, b"content-length")
        body = rest
        while length is None or len(body) < int(length):
            data = sock.recv(65536)
            if not data:
                break
            body += data
        return status_of(head), body


def download(port: int, path: str, host: str, timeout: float = 120.0) -> dict:
    """GET a large body and discard it; returns bytes, seconds and status."""
    buffer = bytearray(1 << 20)
    view = memoryview(buffer)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        begun = time.perf_counter()
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        head, rest = read_head(sock)
        length = int(header_value(head, b"content-length") or b"-1")
        if length < 0:
            raise BenchError(f"download without Content-Length: {head!r}")
        got = len(rest)
        while got < length:
            count = sock.recv_into(view, min(len(buffer), length - got))
            if not count:
                raise BenchError(f"download cut short at {got} of {length} bytes")
            got += count
        elapsed = time.perf_counter() - begun
    return {"status": status_of(head), "bytes": got, "seconds": elapsed}


def upload(port: int, size: int, host: str, timeout: float = 120.0) -> dict:
    """POST ``size`` zero bytes with Content-Length; time until the answer."""
    chunk = bytes(1 << 20)
    with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
        begun = time.perf_counter()
        sock.sendall(
            f"POST /upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\n"
            f"Content-Length: {size}\r\n\r\n".encode()
        )
        left = size
        while left:
            piece = chunk if left >= len(chunk) else chunk[:left]
            sock.sendall(piece)
            left -= len(piece)
        head, rest = read_head(sock)
        elapsed = time.perf_counter() - begun
    return {"status": status_of(head), "bytes": size, "seconds": elapsed, "body": rest}


# -- machine --------------------------------------------------------------------


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def tool_version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "unknown"

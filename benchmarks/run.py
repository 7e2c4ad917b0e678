"""DynaPM side-by-side benchmark suite: one command, its own peers, one report.

    python benchmarks/run.py            # full run, writes benchmarks/RESULTS.md
    python benchmarks/run.py --quick    # < 3 minutes, writes benchmarks/out/

Starts an nginx backend, then DynaPM, nginx (reverse proxy), HAProxy and a
plain uvloop byte splice in front of it, all on loopback ports picked at
start, each proxy pinned to the same CPU, and measures the items of issue 4
in interleaved rounds. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import instructions
import report
from harness import (
    BENCH_DIR,
    CONF_DIR,
    LOOPBACK,
    PEERS_DIR,
    PYTHON,
    ROOT,
    BenchError,
    Proc,
    RssSampler,
    cpu_model,
    cpu_ns,
    download,
    free_ports,
    header_value,
    http_get,
    loadavg,
    median,
    percentile,
    pin_to,
    port_open,
    proc_status,
    read_head,
    render,
    run_wrk,
    status_of,
    tool_version,
    upload,
    user_system_ticks,
    wait_until,
)

MIB = 1 << 20
BACKEND_BODY = b"hello from backend\n"
PROXIES = ("dynapm", "nginx", "haproxy", "splice")
TARGETS = ("direct",) + PROXIES
ITEMS = ("1", "2", "3", "4", "5", "6", "7", "9")


@dataclass(frozen=True)
class Mode:
    name: str
    rounds: int
    seconds: int
    warmup: int
    stream_bytes: int
    stream_rounds: int
    cold_samples: int
    idle_connections: int
    spread_services: int
    ws_rounds: int
    ws_seconds: int


MODES = {
    "quick": Mode("quick", 2, 2, 1, 256 * MIB, 1, 8, 10_000, 100, 1, 2),
    "full": Mode("full", 7, 8, 1, 1024 * MIB, 3, 20, 10_000, 100, 3, 5),
}


@dataclass
class Running:
    """A target reachable on ``port``; ``pid`` is the process to measure."""

    kind: str
    port: int
    proc: Proc | None = None
    pid: int | None = None
    dedicated_port: int | None = None


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.mode = MODES["quick" if args.quick else "full"]
        self.proxy_cpu = args.proxy_cpu
        self.client_cpu = args.client_cpu
        self.dir = Path(tempfile.mkdtemp(prefix="dynapm-bench-"))
        # nginx workers run as an unprivileged user when started by root.
        self.dir.chmod(0o755)
        self.procs: list[Proc] = []
        self.results: dict = {"items": {}, "issues": [], "load": []}
        self.counter = 0

    # -- bookkeeping ------------------------------------------------------------

    def issue(self, item: str, text: str) -> None:
        entry = {"item": item, "text": text}
        if entry not in self.results["issues"]:
            self.results["issues"].append(entry)
        print(f"  ! [{item}] {text}", flush=True)

    def note_load(self, label: str) -> None:
        self.results["load"].append({"at": label, "loadavg": loadavg()})

    def tag(self, kind: str) -> str:
        self.counter += 1
        return f"{kind}-{self.counter}"

    def spawn(self, name: str, argv: list[str], cpu: int | None, **kw) -> Proc:
        proc = Proc(name, argv, self.dir / f"{name}.log", cpu=cpu, **kw)
        self.procs.append(proc)
        return proc

    def snapshot(self) -> None:
        """Copy the dynapm package (with its compiled hot path) aside.

        Every DynaPM process of the run imports this copy, so the whole run
        measures one build even if the source tree is rebuilt meanwhile.
        """
        dest = self.dir / "snapshot"
        shutil.copytree(
            ROOT / "dynapm",
            dest / "dynapm",
            ignore=shutil.ignore_patterns("__pycache__", "*.c"),
        )
        self.dynapm_env = dict(os.environ, PYTHONPATH=str(dest))
        probe = subprocess.run(
            [PYTHON, "-c", "import dynapm._fast.proxy as p; print(p.__file__)"],
            capture_output=True,
            text=True,
            cwd=self.dir,
            env=self.dynapm_env,
            timeout=60,
        )
        location = probe.stdout.strip()
        if probe.returncode != 0 or not location.startswith(str(dest)):
            raise BenchError(
                f"the snapshot of dynapm is not what gets imported: {location!r} "
                f"{probe.stderr.strip()[-500:]}"
            )
        self.results["build"] = hot_path_build(dest / "dynapm")
        stale = [
            source.name
            for source in sorted((dest / "dynapm" / "_fast").glob("*.pyx"))
            if not any(
                built.stat().st_mtime >= source.stat().st_mtime
                for built in source.parent.glob(source.stem + ".*.so")
            )
        ]
        if stale:
            self.issue(
                "all",
                f"{', '.join(stale)} newer than the compiled module: the run "
                "measures the last build, not the latest source",
            )

    def spawn_dynapm(self, name: str, conf: Path, cpu: int | None) -> Proc:
        """Start the gateway from the snapshot, outside the source tree."""
        return self.spawn(
            name,
            [PYTHON, "-m", "dynapm", "-c", str(conf)],
            cpu,
            cwd=self.dir,
            env=self.dynapm_env,
        )

    def finish(self, proc: Proc, item: str) -> None:
        """Stop a process; report a DynaPM exit that was not clean."""
        code = proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)
        if proc.name.startswith("dynapm"):
            if code != 0:
                self.issue(
                    item,
                    f"DynaPM exited with status {code} after SIGTERM: "
                    f"{proc.log_tail(6)}",
                )
            self.scan_gateway_log(proc, item)

    def scan_gateway_log(self, proc: Proc, item: str) -> None:
        try:
            lines = proc.log.read_text(errors="replace").splitlines()
        except OSError:
            return
        bad = [
            line
            for line in lines
            if "Traceback" in line or " ERROR " in line or "Error" in line
        ]
        warnings = [line for line in lines if " WARNING " in line]
        if bad:
            self.issue(item, f"DynaPM log has {len(bad)} error lines, e.g.: {bad[0]}")
            tb = [i for i, line in enumerate(lines) if "Traceback" in line]
            if tb:
                self.issue(item, "traceback:\n" + "\n".join(lines[tb[0] : tb[0] + 25]))
        if warnings:
            self.issue(
                item,
                f"DynaPM logged {len(warnings)} warnings, e.g.: {warnings[0]}",
            )

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()
        if not self.args.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    # -- peers ------------------------------------------------------------------

    def start_backend(self) -> None:
        (self.dir / "nginx-backend-tmp").mkdir()
        (self.dir / "nginx-proxy-tmp").mkdir()
        big = self.dir / "big.bin"
        with open(big, "wb") as handle:
            handle.truncate(self.mode.stream_bytes)
        self.backend_port, self.sink_port, self.ws_port = free_ports(3)
        conf = render(
            "nginx-backend.conf",
            self.dir / "nginx-backend.conf",
            dir=self.dir,
            port=self.backend_port,
        )
        self.backend = self.spawn(
            "nginx-backend",
            ["nginx", "-c", str(conf), "-p", str(self.dir), "-e", "stderr"],
            self.client_cpu,
        )
        self.backend.wait_port(self.backend_port)
        status, body = http_get(self.backend_port)
        if status != 200 or body != BACKEND_BODY:
            raise BenchError(f"nginx backend answered {status} {body!r}")
        self.sink = self.spawn(
            "sink",
            [PYTHON, str(PEERS_DIR / "sink.py"), str(self.sink_port)],
            self.client_cpu,
        )
        self.sink.wait_port(self.sink_port)

    def start(
        self,
        kind: str,
        upstream_port: int,
        dynapm_conf: Path | None = None,
        port: int | None = None,
    ) -> Running:
        """Start one target in front of ``upstream_port``.

        ``dynapm_conf`` replaces DynaPM's usual config; ``port`` is then the
        port it listens on.
        """
        if kind == "direct":
            return Running("direct", upstream_port)
        tag = self.tag(kind)
        picked, extra = free_ports(2)
        port = port or picked
        cpu = self.proxy_cpu
        upstream_host = f"{LOOPBACK}:{upstream_port}"
        if kind == "dynapm":
            conf = dynapm_conf or render(
                "dynapm.yaml",
                self.dir / f"{tag}.yaml",
                port=port,
                upstream_port=upstream_port,
                dedicated_port=extra,
            )
            proc = self.spawn_dynapm(tag, conf, cpu)
            proc.wait_port(port)
            return Running(kind, port, proc, proc.pid, extra)
        if kind == "nginx":
            conf = render(
                "nginx-proxy.conf",
                self.dir / f"{tag}.conf",
                dir=self.dir,
                tag=tag,
                port=port,
                upstream_port=upstream_port,
                upstream_host=upstream_host,
            )
            proc = self.spawn(
                tag,
                ["nginx", "-c", str(conf), "-p", str(self.dir), "-e", "stderr"],
                cpu,
            )
            proc.wait_port(port)
            if not wait_until(lambda: proc.children(), 5):
                raise BenchError("nginx proxy has no worker process")
            return Running(kind, port, proc, proc.children()[0])
        if kind == "haproxy":
            conf = render(
                "haproxy.cfg",
                self.dir / f"{tag}.cfg",
                dir=self.dir,
                tag=tag,
                port=port,
                upstream_port=upstream_port,
                upstream_host=upstream_host,
                maxconn=haproxy_maxconn(),
            )
            proc = self.spawn(tag, ["haproxy", "-db", "-f", str(conf)], cpu)
            proc.wait_port(port)
            return Running(kind, port, proc, proc.pid)
        if kind == "splice":
            proc = self.spawn(
                tag,
                [PYTHON, str(BENCH_DIR / "splice.py"), str(port), str(upstream_port)],
                cpu,
            )
            proc.wait_port(port)
            return Running(kind, port, proc, proc.pid)
        raise ValueError(kind)

    def stop(self, running: Running, item: str) -> None:
        if running.proc is not None:
            self.finish(running.proc, item)

    def start_all(self, upstream_port: int, item: str) -> dict[str, Running]:
        started = {}
        for kind in TARGETS:
            try:
                started[kind] = self.start(kind, upstream_port)
            except BenchError as exc:
                self.issue(item, f"{kind} did not start: {exc}")
        return started

    # -- items 1 and 2: small GET, keep-alive and a new connection each ---------

    def item_http(self) -> None:
        mode = self.mode
        started = self.start_all(self.backend_port, "1")
        usable = {}
        for kind, running in started.items():
            try:
                status, body = http_get(running.port)
            except (OSError, BenchError) as exc:
                status, body = 0, repr(exc).encode()
            if status == 200 and body == BACKEND_BODY:
                usable[kind] = running
            else:
                self.issue("1", f"{kind}: GET / answered {status} {body[:200]!r}")
        variants = (
            ("1", "keep-alive", ("Host: bench",)),
            ("2", "new connection per request", ("Host: bench", "Connection: close")),
        )
        try:
            for item, label, headers in variants:
                if not self.wanted(item):
                    continue
                self.note_load(f"item {item} start")
                print(f"item {item}: GET, {label}", flush=True)
                for running in usable.values():
                    run_wrk(running.port, seconds=mode.warmup, headers=headers)
                rounds: dict[str, list[dict]] = {kind: [] for kind in usable}
                order = list(usable)
                for number in range(mode.rounds):
                    for kind in rotate(order, number):
                        record = measured_wrk(
                            usable[kind].pid,
                            usable[kind].port,
                            seconds=mode.seconds,
                            headers=headers,
                        )
                        result = record.pop("result")
                        rounds[kind].append(record)
                        print(
                            f"  round {number + 1} {kind:8} {result.rps:10.0f} req/s "
                            f"p50 {fmt(result.p50_ms)} p99 {fmt(result.p99_ms)} ms"
                            f" CPU {fmt(record['cpu_us'], 1)} us/req"
                            + (f" errors {result.errors}" if result.errors else ""),
                            flush=True,
                        )
                        if result.errors:
                            self.issue(
                                item,
                                f"{kind}: wrk reported {result.non2xx} non-2xx/3xx "
                                f"responses and socket errors {result.socket_errors} "
                                f"out of {result.requests} requests",
                            )
                self.results["items"][item] = {
                    "label": label,
                    "headers": list(headers),
                    "rounds": rounds,
                    "summary": summarize_wrk(rounds),
                }
        finally:
            for running in started.values():
                self.stop(running, "1")

    # -- item 3: streaming ------------------------------------------------------

    def item_stream(self) -> None:
        mode = self.mode
        self.note_load("item 3 start")
        size = mode.stream_bytes
        print(f"item 3: streaming {size // MIB} MiB each way", flush=True)
        records: dict[str, dict[str, list[dict]]] = {}
        for direction, upstream in (
            ("download", self.backend_port),
            ("upload", self.sink_port),
        ):
            records[direction] = {kind: [] for kind in TARGETS}
            for number in range(mode.stream_rounds):
                for kind in rotate(list(TARGETS), number):
                    record = self.stream_once(kind, direction, upstream, size)
                    if record is not None:
                        records[direction][kind].append(record)
        self.results["items"]["3"] = {
            "bytes": size,
            "rounds": records,
            "summary": {
                direction: summarize_stream(by_kind)
                for direction, by_kind in records.items()
            },
        }

    def stream_once(self, kind: str, direction: str, upstream: int, size: int):
        try:
            running = self.start(kind, upstream)
        except BenchError as exc:
            self.issue("3", f"{kind} did not start: {exc}")
            return None
        try:
            if direction == "download":
                http_get(running.port)
            else:
                upload(running.port, 1024, "bench")
            before = proc_status(running.pid) if running.pid else {}
            sampler = RssSampler(running.pid) if running.pid else None
            with sampler or contextlib.nullcontext():
                if direction == "download":
                    result = download(running.port, "/big", "bench")
                else:
                    result = upload(running.port, size, "bench")
            after = proc_status(running.pid) if running.pid else {}
        except (OSError, BenchError) as exc:
            self.issue("3", f"{kind} {direction} failed: {exc!r}")
            return None
        finally:
            self.stop(running, "3")
        if result["status"] != 200 or result["bytes"] != size:
            self.issue(
                "3",
                f"{kind} {direction}: status {result['status']}, "
                f"{result['bytes']} bytes",
            )
            return None
        record = {
            "mib_s": result["bytes"] / MIB / result["seconds"],
            "seconds": result["seconds"],
            "status": result["status"],
        }
        if running.pid:
            record.update(
                rss_before_kib=before["VmRSS"],
                rss_peak_sampled_kib=max(sampler.peak, after["VmRSS"]),
                hwm_kib=after["VmHWM"],
            )
        print(
            f"  {direction:8} {kind:8} {record['mib_s']:8.0f} MiB/s"
            + (
                f"  RSS {record['rss_before_kib'] / 1024:.1f} -> peak "
                f"{record['rss_peak_sampled_kib'] / 1024:.1f} MiB "
                f"(HWM {record['hwm_kib'] / 1024:.1f})"
                if running.pid
                else ""
            ),
            flush=True,
        )
        return record

    # -- item 4: cold start -----------------------------------------------------

    def item_cold(self) -> None:
        mode = self.mode
        self.note_load("item 4 start")
        print(f"item 4: cold start, {mode.cold_samples} samples", flush=True)
        port, app_port, app1_port = free_ports(3)
        # $EPOCHREALTIME is expanded by the launching bash: the service
        # reports its own boot time from that moment (peers/tinyapp.py).
        tiny = f"{service_python()} -I -S {PEERS_DIR / 'tinyapp.py'}"
        command = f"exec {tiny} {app_port} $EPOCHREALTIME"
        command1 = f"exec {tiny} {app1_port} $EPOCHREALTIME"
        conf = render(
            "dynapm-cold.yaml",
            self.dir / "dynapm-cold.yaml",
            port=port,
            app_port=app_port,
            app1_port=app1_port,
            command=command,
            command1=command1,
        )
        gateway = self.spawn_dynapm("dynapm-cold", conf, self.proxy_cpu)
        keys = ("direct", "gateway", "gateway1")
        samples: dict[str, list[float]] = {key: [] for key in keys}
        phases: dict[str, list[dict]] = {key: [] for key in keys}
        try:
            gateway.wait_port(port)
            # One unrecorded start of each kind warms the page cache and the
            # gateway's first-start code paths.
            self.boot_direct(command, app_port)
            self.ttfb_cold(port, "cold", app_port)
            self.ttfb_cold(port, "cold1ms", app1_port)
            for number in range(mode.cold_samples):
                for key, measure in (
                    ("direct", lambda: self.boot_direct(command, app_port)),
                    ("gateway", lambda: self.ttfb_cold(port, "cold", app_port)),
                    ("gateway1", lambda: self.ttfb_cold(port, "cold1ms", app1_port)),
                ):
                    total, parts = measure()
                    samples[key].append(total)
                    phases[key].append(parts)
                print(
                    f"  sample {number + 1:2}: boot {samples['direct'][-1]:6.2f} ms, "
                    f"through gateway {samples['gateway'][-1]:6.2f} ms "
                    f"(1ms probe {samples['gateway1'][-1]:6.2f} ms); "
                    "service's own boot "
                    + ", ".join(fmt(phases[key][-1].get("boot")) for key in keys)
                    + " ms",
                    flush=True,
                )
        except (OSError, BenchError) as exc:
            self.issue("4", f"cold start measurement failed: {exc!r}")
        finally:
            self.finish(gateway, "4")
        self.results["items"]["4"] = {
            "samples": samples,
            "phases": phases,
            "summary": summarize_cold(samples, phases),
        }

    def boot_direct(self, command: str, app_port: int) -> tuple[float, dict]:
        """Spawn the service like the gateway does and time it to first byte.

        Returns spawn to first byte in ms, and its phases (boot_phases).
        """
        if not wait_until(lambda: not port_open(app_port), 10):
            raise BenchError(f"port {app_port} still busy before a direct boot")
        # The child inherits the CPU of the harness at spawn time. Moving the
        # harness there for the spawn (instead of a preexec_fn) keeps the
        # fast vfork path of subprocess, as a gateway's spawn would be.
        os.sched_setaffinity(0, {self.proxy_cpu})
        try:
            wall = time.time()
            begun = time.perf_counter()
            proc = subprocess.Popen(
                ["bash", "-c", command],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            os.sched_setaffinity(0, {self.client_cpu})
        try:
            deadline = begun + 20
            while time.perf_counter() < deadline:
                sock = socket.socket()
                try:
                    if sock.connect_ex((LOOPBACK, app_port)) == 0:
                        sock.settimeout(10)
                        sock.sendall(b"GET / HTTP/1.1\r\nHost: cold\r\n\r\n")
                        first = sock.recv(1)
                        elapsed = (time.perf_counter() - begun) * 1000
                        head, _ = read_head(sock, first)
                        return elapsed, boot_phases(head, wall, elapsed)
                finally:
                    sock.close()
                time.sleep(0.0005)
            raise BenchError("the tiny service did not answer within 20s")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            proc.wait(10)

    def ttfb_cold(self, port: int, host: str, app_port: int) -> tuple[float, dict]:
        """Time to first byte through the gateway to a service that is offline.

        Returns request to first byte in ms, and its phases (boot_phases).
        """
        if not wait_until(lambda: not port_open(app_port), 10, 0.005):
            raise BenchError(f"service {host} did not stop when idle")
        # The gateway marks the service offline once the process is reaped.
        time.sleep(0.15)
        with socket.create_connection((LOOPBACK, port), timeout=20) as sock:
            wall = time.time()
            begun = time.perf_counter()
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            first = sock.recv(1)
            elapsed = (time.perf_counter() - begun) * 1000
            head, _ = read_head(sock, first)
        if status_of(head) != 200:
            raise BenchError(f"cold request to {host} answered {head[:200]!r}")
        return elapsed, boot_phases(head, wall, elapsed)

    # -- item 5: memory ---------------------------------------------------------

    def item_memory(self) -> None:
        mode = self.mode
        self.note_load("item 5 start")
        print("item 5: memory", flush=True)
        summary: dict = {}
        for count in (1, 1000):
            port = free_ports(1)[0]
            conf = self.dir / f"dynapm-{count}-services.yaml"
            conf.write_text(many_services_yaml(port, count, "run"))
            tag = self.tag("dynapm")
            proc = self.spawn_dynapm(tag, conf, self.proxy_cpu)
            try:
                proc.wait_port(port, 60)
                time.sleep(1.0)
                status = proc_status(proc.pid)
                summary[f"idle_{count}"] = {
                    "rss_kib": status["VmRSS"],
                    "hwm_kib": status["VmHWM"],
                }
                print(f"  idle, {count:4} services: {status['VmRSS'] / 1024:.1f} MiB")
            except BenchError as exc:
                self.issue("5", f"gateway with {count} services: {exc}")
            finally:
                self.finish(proc, "5")
        connections = {}
        for kind in ("dynapm", "nginx", "haproxy"):
            count = mode.idle_connections
            if kind == "haproxy":
                count = min(count, haproxy_maxconn() - 100)
            record = self.idle_connections(kind, count)
            if record is not None:
                connections[kind] = record
        summary["connections"] = connections
        self.results["items"]["5"] = {"summary": summary}

    def idle_connections(self, kind: str, count: int):
        try:
            running = self.start(kind, self.backend_port)
        except BenchError as exc:
            self.issue("5", f"{kind} did not start: {exc}")
            return None
        try:
            self.hold(running.port, 200)
            time.sleep(0.5)
            before = proc_status(running.pid)["VmRSS"]
            client = self.hold(running.port, count, keep=True)
            try:
                time.sleep(1.0)
                after = proc_status(running.pid)["VmRSS"]
            finally:
                client.stdin.close()
                client.wait(60)
        except (OSError, BenchError, subprocess.TimeoutExpired) as exc:
            self.issue("5", f"{kind} idle connections failed: {exc!r}")
            return None
        finally:
            self.stop(running, "5")
        opened = client.opened
        if client.failed:
            self.issue(
                "5",
                f"{kind}: {client.failed} of {count} idle keep-alive connections "
                "failed (connect or request)",
            )
        record = {
            "opened": opened,
            "failed": client.failed,
            "rss_before_kib": before,
            "rss_after_kib": after,
            "bytes_per_connection": (after - before) * 1024 / opened
            if opened
            else None,
        }
        print(
            f"  {kind:8} {opened} connections: {before / 1024:.1f} -> "
            f"{after / 1024:.1f} MiB, "
            f"{fmt(record['bytes_per_connection'], 0)} bytes each",
            flush=True,
        )
        return record

    def hold(self, port: int, count: int, keep: bool = False):
        """Run peers/holdconns.py; wait until its connections are open."""
        client = subprocess.Popen(
            [PYTHON, str(PEERS_DIR / "holdconns.py"), str(port), "bench", str(count)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=pin_to(self.client_cpu),
        )
        line = client.stdout.readline().split()
        if len(line) != 3 or line[0] != "ready":
            client.kill()
            client.wait(10)
            raise BenchError(f"holdconns said {line!r}")
        client.opened, client.failed = int(line[1]), int(line[2])
        if not keep:
            client.stdin.close()
            client.wait(60)
        return client

    # -- item 6: spread ---------------------------------------------------------

    def item_spread(self) -> None:
        mode = self.mode
        self.note_load("item 6 start")
        services = mode.spread_services
        print(f"item 6: {services} services vs one", flush=True)
        port = free_ports(1)[0]
        conf = self.dir / "dynapm-spread.yaml"
        conf.write_text(
            many_services_yaml(port, services, "proxy_only", self.backend_port)
        )
        try:
            running = self.start("dynapm", self.backend_port, conf, port)
        except BenchError as exc:
            self.issue("6", f"DynaPM with {services} services did not start: {exc}")
            return
        script = CONF_DIR / "spread.lua"
        rounds: dict[str, list[dict]] = {"1": [], str(services): []}
        try:
            for host in ("s0", f"s{services - 1}"):
                status, body = http_get(port, host)
                if status != 200:
                    raise BenchError(f"host {host} answered {status} {body[:200]!r}")
            for spread in rounds:
                run_wrk(
                    port,
                    seconds=mode.warmup,
                    headers=(),
                    script=script,
                    script_args=(spread,),
                )
            for number in range(mode.rounds):
                for spread in rotate(list(rounds), number):
                    record = measured_wrk(
                        running.pid,
                        port,
                        seconds=mode.seconds,
                        headers=(),
                        script=script,
                        script_args=(spread,),
                    )
                    result = record.pop("result")
                    rounds[spread].append(record)
                    print(
                        f"  round {number + 1} {spread:>3} services "
                        f"{result.rps:10.0f} req/s p99 {fmt(result.p99_ms)} ms"
                        f" CPU {fmt(record['cpu_us'], 1)} us/req"
                        + (f" errors {result.errors}" if result.errors else ""),
                        flush=True,
                    )
                    if result.errors:
                        self.issue(
                            "6",
                            f"{spread} services: wrk reported {result.non2xx} "
                            f"non-2xx/3xx and socket errors {result.socket_errors} "
                            f"out of {result.requests} requests",
                        )
        except BenchError as exc:
            self.issue("6", f"spread measurement failed: {exc}")
        finally:
            self.stop(running, "6")
        self.results["items"]["6"] = {
            "services": services,
            "rounds": rounds,
            "summary": summarize_wrk(rounds),
        }

    # -- item 7: WebSocket echo -------------------------------------------------

    def item_ws(self) -> None:
        mode = self.mode
        self.note_load("item 7 start")
        print("item 7: WebSocket echo", flush=True)
        echo = self.spawn(
            "wsecho",
            [PYTHON, str(PEERS_DIR / "wsecho.py"), str(self.ws_port)],
            self.client_cpu,
        )
        started: dict[str, Running] = {}
        try:
            echo.wait_port(self.ws_port)
            started = self.start_all(self.ws_port, "7")
            dynapm = started.get("dynapm")
            reason = None
            if dynapm is None:
                reason = "DynaPM did not start"
            else:
                reason = ws_handshake_problem(dynapm.dedicated_port)
            if reason is not None:
                self.results["items"]["7"] = {"skipped": reason}
                print(f"  skipped: {reason}", flush=True)
                return
            urls = {}
            for kind, running in started.items():
                port = running.dedicated_port if kind == "dynapm" else running.port
                urls[kind] = f"ws://{LOOPBACK}:{port}/"
            rounds: dict[str, list[dict]] = {kind: [] for kind in urls}
            for kind in urls:
                self.ws_run(urls[kind], mode.warmup)
            for number in range(mode.ws_rounds):
                for kind in rotate(list(urls), number):
                    result = self.ws_run(urls[kind], mode.ws_seconds)
                    if result is None:
                        self.issue("7", f"{kind}: WebSocket client failed")
                        continue
                    rate = result["messages"] / result["seconds"]
                    rounds[kind].append(
                        {
                            "msgs_s": rate,
                            "p50_ms": result["p50_ms"],
                            "p99_ms": result["p99_ms"],
                            "errors": result["errors"],
                        }
                    )
                    print(
                        f"  round {number + 1} {kind:8} {rate:10.0f} msg/s "
                        f"p50 {fmt(result['p50_ms'])} p99 {fmt(result['p99_ms'])} ms",
                        flush=True,
                    )
                    if result["errors"]:
                        self.issue(
                            "7", f"{kind}: {result['errors']} WebSocket connects failed"
                        )
            self.results["items"]["7"] = {
                "connections": WS_CONNECTIONS,
                "size": WS_SIZE,
                "rounds": rounds,
                "summary": summarize_ws(rounds),
            }
        except BenchError as exc:
            self.issue("7", f"WebSocket measurement failed: {exc}")
        finally:
            for running in started.values():
                self.stop(running, "7")
            self.finish(echo, "7")

    def ws_run(self, url: str, seconds: float):
        done = subprocess.run(
            [
                PYTHON,
                str(PEERS_DIR / "wsbench.py"),
                url,
                str(WS_CONNECTIONS),
                str(WS_SIZE),
                str(seconds),
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            preexec_fn=pin_to(self.client_cpu),
        )
        if done.returncode != 0 or not done.stdout.strip():
            print(f"  wsbench: {done.stderr.strip()[-400:]}", flush=True)
            return None
        return json.loads(done.stdout.strip().splitlines()[-1])

    # -- item 9: where the time per request goes --------------------------------

    def item_breakdown(self) -> None:
        """Instructions per exchange in user space, by component (callgrind).

        The user/kernel split of the CPU time comes from item 1's rounds;
        this adds what the user-space part is made of."""
        if shutil.which("valgrind") is None:
            self.results["items"]["9"] = {
                "skipped": "valgrind is not installed (apt-get install valgrind)"
            }
            return
        self.note_load("item 9 start")
        print("item 9: instructions per exchange under callgrind", flush=True)
        found = instructions.measure(3000, env=self.dynapm_env)
        print(f"  {found['total']:,.0f} instructions per exchange", flush=True)
        self.results["items"]["9"] = found

    # -- the run ----------------------------------------------------------------

    def wanted(self, item: str) -> bool:
        return item in self.args.only

    def run(self) -> int:
        started = datetime.now(timezone.utc)
        begun = time.monotonic()
        self.note_load("start")
        self.snapshot()
        self.start_backend()
        steps = (
            (("1", "2"), self.item_http),
            (("3",), self.item_stream),
            (("4",), self.item_cold),
            (("5",), self.item_memory),
            (("6",), self.item_spread),
            (("7",), self.item_ws),
            (("9",), self.item_breakdown),
        )
        for items, step in steps:
            if not any(self.wanted(item) for item in items):
                continue
            try:
                step()
            except (OSError, BenchError, subprocess.SubprocessError) as exc:
                self.issue("/".join(items), f"aborted: {exc!r}")
                traceback.print_exc()
        self.note_load("end")
        if hot_path_build(ROOT / "dynapm") != self.results["build"]:
            print(
                "  note: the source tree's dynapm was rebuilt during the run; "
                "the run measured the snapshot taken at its start",
                flush=True,
            )
        self.results["meta"] = self.meta(started, time.monotonic() - begun)
        return 0

    def meta(self, started: datetime, elapsed: float) -> dict:
        import httptools
        import uvloop

        argv = [Path(sys.argv[0]).as_posix()] + sys.argv[1:]
        return {
            "command": "python " + " ".join(argv),
            "mode": self.mode.__dict__,
            "date": started.strftime("%Y-%m-%d %H:%M UTC"),
            "elapsed_s": round(elapsed, 1),
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "kernel": os.uname().release,
            "python": sys.version.split()[0],
            "uvloop": uvloop.__version__,
            "httptools": httptools.__version__,
            "nginx": tool_version(["nginx", "-v"]),
            "haproxy": tool_version(["haproxy", "-v"]),
            "wrk": tool_version(["wrk", "-v"]),
            "proxy_cpu": self.proxy_cpu,
            "client_cpu": self.client_cpu,
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            "items": sorted(self.args.only),
            "dynapm_version": dynapm_version(),
            "build": self.results.get("build"),
            "admin_module": importlib.util.find_spec("dynapm.admin") is not None,
        }


WS_CONNECTIONS = 16
WS_SIZE = 256


def ws_handshake_problem(port: int) -> str | None:
    """None when a WebSocket upgrade through DynaPM answers 101, else why not."""
    request = (
        "GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    try:
        with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
            sock.sendall(request)
            head, _ = read_head(sock)
    except (OSError, BenchError) as exc:
        return f"Upgrade through DynaPM failed: {exc!r}"
    if status_of(head) != 101:
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        return f"Upgrade through DynaPM answered {line!r} instead of 101"
    return None


def boot_phases(head: bytes, sent: float, elapsed_ms: float) -> dict:
    """Split a cold request by the wall-clock stamps the service sent back.

    ``launch``: from the request (or the harness's spawn) to the launching
    bash running the command; ``boot``: from there to the service listening
    (its own boot time); ``answer``: from listening to the first byte here.
    Empty when the service sent no stamps.
    """
    launched = header_value(head, b"x-launched-us")
    ready = header_value(head, b"x-ready-us")
    if not launched or not ready:
        return {}
    launch = int(launched) / 1000 - sent * 1000
    boot = (int(ready) - int(launched)) / 1000
    return {"launch": launch, "boot": boot, "answer": elapsed_ms - launch - boot}


def summarize_cold(
    samples: dict[str, list[float]], phases: dict[str, list[dict]]
) -> dict:
    """Overhead two ways: the difference of medians (the issue's definition)
    and, per sample, time to first byte minus the boot time the service
    measured itself, which cancels the noise of the boot."""

    def residuals(key: str) -> list[float]:
        return [
            total - parts["boot"]
            for total, parts in zip(samples[key], phases[key], strict=True)
            if parts
        ]

    def phase(key: str, name: str) -> float | None:
        return median([parts[name] for parts in phases[key] if parts])

    direct = median(samples["direct"])
    direct_residual = median(residuals("direct"))
    summary = {}
    for key in ("direct", "gateway", "gateway1"):
        values = samples[key]
        residual = median(residuals(key))
        entry = {
            "median_ms": median(values),
            "p90_ms": percentile(values, 0.9),
            "launch_ms": phase(key, "launch"),
            "own_boot_ms": phase(key, "boot"),
            "answer_ms": phase(key, "answer"),
            "residual_ms": residual,
        }
        if key != "direct":
            entry["overhead_ms"] = (
                None
                if direct is None or median(values) is None
                else median(values) - direct
            )
            entry["corrected_overhead_ms"] = (
                None
                if residual is None or direct_residual is None
                else residual - direct_residual
            )
        summary[key] = entry
    return summary


def many_services_yaml(
    port: int, count: int, kind: str, upstream_port: int | None = None
) -> str:
    """A gateway config with ``count`` services named s0 .. s<count-1>."""
    lines = [f"listen: {LOOPBACK}:{port}", "logging:", "  level: warning", "services:"]
    for index in range(count):
        lines.append(f"  s{index}:")
        if kind == "run":
            app_port = 20000 + index
            lines.append(f"    upstream: http://{LOOPBACK}:{app_port}")
            lines.append(
                f"    run: exec {service_python()} -I -S "
                f"{PEERS_DIR / 'tinyapp.py'} {app_port}"
            )
        else:
            lines.append(f"    upstream: http://{LOOPBACK}:{upstream_port}")
            lines.append("    proxy_only: true")
    return "\n".join(lines) + "\n"


def service_python() -> str:
    """The interpreter for the tiny cold-start service.

    The system python3 starts faster than most virtualenv or pyenv builds;
    the service needs nothing but the standard library.
    """
    system = Path("/usr/bin/python3")
    return str(system) if system.exists() else PYTHON


def hot_path_build(package: Path) -> str:
    """Which compiled hot path is measured: name, mtime and sha256 prefix."""
    parts = []
    for path in sorted((package / "_fast").glob("*.so")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        stamp = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
        parts.append(f"{path.name} {stamp:%Y-%m-%d %H:%M:%S} UTC sha256 {digest}")
    return "; ".join(parts) or "no compiled module found"


def dynapm_version() -> str:
    try:
        from dynapm import __version__
    except ImportError:
        return "unknown"
    return __version__


def rotate(order: list, number: int) -> list:
    shift = number % len(order) if order else 0
    return order[shift:] + order[:shift]


def fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def measured_wrk(pid: int | None, port: int, **kwargs) -> dict:
    """One wrk run, with the CPU time the proxy process spent on it."""
    before = cpu_ns(pid) if pid else None
    ticks = user_system_ticks(pid) if pid else None
    result = run_wrk(port, **kwargs)
    record = {
        "rps": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "requests": result.requests,
        "non2xx": result.non2xx,
        "socket_errors": result.socket_errors,
        "cpu_us": None,
        "user_us": None,
        "system_us": None,
        "cpu_share": None,
        "wait_share": None,
        "result": result,
    }
    if before is not None and result.requests:
        run, wait = cpu_ns(pid)
        seconds = kwargs["seconds"] * 1e9
        record["cpu_us"] = (run - before[0]) / 1000 / result.requests
        record["cpu_share"] = (run - before[0]) / seconds
        record["wait_share"] = (wait - before[1]) / seconds
        user, system = user_system_ticks(pid)
        tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
        record["user_us"] = (user - ticks[0]) * tick_us / result.requests
        record["system_us"] = (system - ticks[1]) * tick_us / result.requests
    return record


def summarize_wrk(rounds: dict[str, list[dict]]) -> dict:
    summary = {}
    for kind, records in rounds.items():
        if not records:
            continue
        rps = [r["rps"] for r in records]
        summary[kind] = {
            "rps": median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_ms": median([r["p50_ms"] for r in records]),
            "p99_ms": median([r["p99_ms"] for r in records]),
            "cpu_us": median([r["cpu_us"] for r in records]),
            "user_us": median([r.get("user_us") for r in records]),
            "system_us": median([r.get("system_us") for r in records]),
            "cpu_share": median([r["cpu_share"] for r in records]),
            "wait_share": median([r["wait_share"] for r in records]),
            "requests": sum(r["requests"] for r in records),
            "errors": sum(
                r["non2xx"] + sum(r["socket_errors"].values()) for r in records
            ),
            "rounds": len(records),
        }
    return summary


def summarize_stream(by_kind: dict[str, list[dict]]) -> dict:
    summary = {}
    for kind, records in by_kind.items():
        if not records:
            continue
        entry = {
            "mib_s": median([r["mib_s"] for r in records]),
            "rounds": len(records),
        }
        if "rss_before_kib" in records[0]:
            entry["rss_before_kib"] = median([r["rss_before_kib"] for r in records])
            entry["growth_sampled_kib"] = max(
                r["rss_peak_sampled_kib"] - r["rss_before_kib"] for r in records
            )
            entry["growth_hwm_kib"] = max(
                r["hwm_kib"] - r["rss_before_kib"] for r in records
            )
            entry["hwm_kib"] = max(r["hwm_kib"] for r in records)
        summary[kind] = entry
    return summary


def summarize_ws(rounds: dict[str, list[dict]]) -> dict:
    summary = {}
    for kind, records in rounds.items():
        if not records:
            continue
        summary[kind] = {
            "msgs_s": median([r["msgs_s"] for r in records]),
            "p50_ms": median([r["p50_ms"] for r in records]),
            "p99_ms": median([r["p99_ms"] for r in records]),
            "rounds": len(records),
        }
    return summary


def haproxy_maxconn() -> int:
    """HAProxy wants two descriptors per connection it may accept."""
    return (resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 200) // 2


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def check_tools() -> list[str]:
    return [tool for tool in ("nginx", "haproxy", "wrk") if shutil.which(tool) is None]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="short durations, fewer rounds"
    )
    parser.add_argument(
        "--only",
        default=",".join(ITEMS),
        help="comma-separated items to run (default: all: 1-7 and 9)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="report path (default: benchmarks/RESULTS.md, or "
        "benchmarks/out/RESULTS-quick.md with --quick)",
    )
    parser.add_argument("--proxy-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    parser.add_argument(
        "--keep", action="store_true", help="keep the temporary directory (logs)"
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only write the report again from the raw results of an earlier "
        "run (benchmarks/out/results-*.json)",
    )
    args = parser.parse_args(argv)
    args.only = {item.strip() for item in args.only.split(",") if item.strip()}
    unknown = args.only - set(ITEMS)
    if unknown:
        parser.error(f"unknown items: {sorted(unknown)}")
    if args.render is not None and args.output is None:
        quick = json.loads(args.render.read_text())["meta"]["mode"]["name"] == "quick"
        args.quick = args.quick or quick
    if args.output is None:
        args.output = (
            BENCH_DIR / "out" / "RESULTS-quick.md"
            if args.quick
            else BENCH_DIR / "RESULTS.md"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        args.output.write_text(report.render(json.loads(args.render.read_text())))
        print(f"wrote {args.output}", flush=True)
        return 0
    missing = check_tools()
    if missing:
        print(
            f"missing tools: {', '.join(missing)} "
            "(apt-get install -y nginx haproxy wrk)",
            file=sys.stderr,
        )
        return 1
    cpus = os.sched_getaffinity(0)
    if args.proxy_cpu not in cpus or args.client_cpu not in cpus:
        print(f"CPUs {args.proxy_cpu}/{args.client_cpu} not in {cpus}", file=sys.stderr)
        return 1
    raise_nofile()
    os.sched_setaffinity(0, {args.client_cpu})
    suite = Suite(args)
    print(f"mode {suite.mode.name}, temporary directory {suite.dir}", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        suite.run()
    finally:
        suite.cleanup()
    out = BENCH_DIR / "out"
    out.mkdir(exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"results-{suite.mode.name}-{stamp}.json").write_text(
        json.dumps(suite.results, indent=1)
    )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report.render(suite.results))
    print(f"wrote {args.output}", flush=True)
    return 0


if __name__ == "__main__":
    os.chdir(ROOT)
    sys.exit(main())

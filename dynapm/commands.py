"""Running shell commands and supervising `run` processes.

Everything runs as ``bash -c COMMAND`` in a new session, so the command and
whatever it forks share one process group that can be signalled as a whole.
The exit is watched through a pidfd and the output read as its own pipe, so
neither waits for the other: a forked daemon that keeps our stdout open cannot
hang the caller, and only the pids spawned here are ever reaped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

from dynapm.errors import CommandError

logger = logging.getLogger("dynapm.commands")
service_logger = logging.getLogger("dynapm.service")

TAIL_BYTES = 2048
"""How much of a command's most recent output is kept for error messages."""

MAX_LINE = 8192
"""A line longer than this is logged in pieces, so one endless line stays bounded."""

PIPE_GRACE = 0.1
"""After the process exits, how long its output pipe may stay open before we stop
waiting for it: long enough to drain what was already written."""

EXIT_DRAIN = 0.01
"""run_command: after the command exits, how long its pipe may stay open."""

KILL_GRACE = 1.0
"""run_command: SIGTERM on timeout, then SIGKILL this long after."""

KILL_WAIT = 2.0
"""After SIGKILL, how long to wait for the kernel to report the exit."""

GROUP_POLL = 0.025

SUMMARY_CHARS = 300
SUMMARY_LINES = 3


def format_seconds(seconds: float) -> str:
    """Format a duration for humans: "1.0s", "0.3s", "250ms"."""
    tenths = seconds * 10
    if seconds < 1 and abs(tenths - round(tenths)) > 1e-9:
        return f"{seconds * 1000:.0f}ms"
    return f"{seconds:.1f}s"


def describe_exit(code: int) -> str:
    """Turn a return code (negative: killed by that signal) into words."""
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = str(-code)
    return f"killed by signal {name}"


def summarise_output(output: str) -> str:
    """The last non-empty lines of some output, within SUMMARY_CHARS."""
    lines = [line.strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    last = lines[-1]
    if len(last) > SUMMARY_CHARS:
        return "..." + last[-(SUMMARY_CHARS - 3) :]
    picked = [last]
    size = len(last)
    for line in reversed(lines[-SUMMARY_LINES:-1]):
        size += len(line) + 3
        if size > SUMMARY_CHARS:
            break
        picked.append(line)
    return " | ".join(reversed(picked))


@dataclass(frozen=True)
class CommandResult:
    exit_code: int | None
    """The exit status; negative for a signal; None if it timed out or never ran."""
    output: str
    """The tail (about TAIL_BYTES) of stdout and stderr, merged."""
    elapsed_ms: float
    timed_out: bool
    error: str = ""
    """Why the command could not be started at all (missing cwd, no bash)."""
    timeout: float | None = None

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    def describe(self) -> str:
        """A short human cause, for logs and 503 bodies."""
        if self.error:
            return self.error
        if self.timed_out:
            if self.timeout is None:
                cause = "timed out"
            else:
                cause = f"timed out after {format_seconds(self.timeout)}"
        elif self.exit_code is None:
            cause = "did not finish"
        else:
            cause = describe_exit(self.exit_code)
        summary = summarise_output(self.output)
        return f"{cause}: {summary}" if summary else cause


def _decode_tail(raw: bytes, cut: bool) -> str:
    if cut:
        # The cut may have split a UTF-8 sequence; drop its orphaned
        # continuation bytes rather than show a replacement character.
        skip = 0
        while skip < min(3, len(raw)) and 0x80 <= raw[skip] < 0xC0:
            skip += 1
        raw = raw[skip:]
    return raw.decode("utf-8", "replace")


class _Tail:
    """The last TAIL_BYTES of a byte stream, in bounded memory."""

    def __init__(self, limit: int = TAIL_BYTES) -> None:
        self._limit = limit
        self._buf = bytearray()
        self._cut = False

    def add(self, data: bytes) -> None:
        if len(data) >= self._limit:
            self._buf = bytearray(data[-self._limit :])
            self._cut = True
            return
        self._buf += data
        # Trim only once it is twice the limit so trimming stays amortised O(1).
        if len(self._buf) > 2 * self._limit:
            del self._buf[: -self._limit]
            self._cut = True

    def text(self) -> str:
        cut = self._cut or len(self._buf) > self._limit
        return _decode_tail(bytes(self._buf[-self._limit :]), cut)


class _LineBuffer:
    """Splits a byte stream into lines and hands each non-blank one on."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial = bytearray()

    def feed(self, data: bytes) -> None:
        self._partial += data
        if b"\n" in data:
            *lines, rest = self._partial.split(b"\n")
            self._partial = bytearray(rest)
            for line in lines:
                self._send(line)
        if len(self._partial) > MAX_LINE:
            self._send(self._partial)
            self._partial = bytearray()

    def flush(self) -> None:
        if self._partial:
            self._send(self._partial)
            self._partial = bytearray()

    def _send(self, raw: bytes | bytearray) -> None:
        text = bytes(raw).decode("utf-8", "replace").rstrip()
        if text:
            self._emit(text)


def _service_line_logger(service: str) -> Callable[[str], None]:
    extra = {"service": service}

    def emit(line: str) -> None:
        service_logger.info("%s", line, extra=extra)

    return emit


class _PipeReader(asyncio.Protocol):
    """Hands a child's output to its _Child as it arrives."""

    def __init__(self, child: _Child) -> None:
        self._child = child

    def data_received(self, data: bytes) -> None:
        self._child.output(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._child.output_ended()


class _Child:
    """One spawned ``bash -c``: its exit status, its merged output, its pipe."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen,
        *,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self._loop = loop
        self._popen = popen
        self.pid = popen.pid
        self.exited: asyncio.Future[int] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()
        self.tail = _Tail()
        self._lines = _LineBuffer(on_line) if on_line is not None else None
        self.pipe: asyncio.ReadTransport | None = None
        self.closed = False
        self._auto_close = False
        self._grace: float | None = None
        self._grace_timer: asyncio.TimerHandle | None = None
        self._on_closed: Callable[[], None] | None = None
        _watch_exit(loop, popen.pid, self._exit)

    def output(self, data: bytes) -> None:
        self.tail.add(data)
        if self._lines is not None:
            self._lines.feed(data)

    def output_ended(self) -> None:
        if self._lines is not None:
            self._lines.flush()
        if not self.output_closed.done():
            self.output_closed.set_result(None)
        self._maybe_close()

    def _exit(self, code: int) -> None:
        # Popen must know the child is reaped, or it would try to reap it again.
        self._popen.returncode = code
        if not self.exited.done():
            self.exited.set_result(code)
        self._maybe_close()

    def close_when_done(
        self,
        *,
        grace: float | None,
        on_line: Callable[[str], None] | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        """Close the pipe once the process exited and the pipe reached EOF.

        With a grace, the pipe gets that long after the exit and is then closed
        regardless; without one, it is drained until its last writer is gone.
        """
        self._auto_close = True
        self._grace = grace
        self._on_closed = on_closed
        if on_line is not None and self._lines is None:
            self._lines = _LineBuffer(on_line)
        self._maybe_close()

    def close(self) -> None:
        """Stop reading the output. The exit is still watched and reaped."""
        if self.closed:
            return
        self.closed = True
        if self._grace_timer is not None:
            self._grace_timer.cancel()
        if self._lines is not None:
            self._lines.flush()
        if self.pipe is not None:
            self.pipe.close()
        if not self.output_closed.done():
            self.output_closed.set_result(None)
        if self._on_closed is not None:
            self._on_closed()

    def _maybe_close(self) -> None:
        if not self._auto_close or self.closed or not self.exited.done():
            return
        if self.output_closed.done():
            self.close()
        elif self._grace is not None and self._grace_timer is None:
            self._grace_timer = self._loop.call_later(self._grace, self.close)


EXIT_POLL = 0.05
"""Where pidfd_open is missing (Linux before 5.3), how often exits are polled."""


def _watch_exit(
    loop: asyncio.AbstractEventLoop, pid: int, on_exit: Callable[[int], None]
) -> None:
    """Call on_exit(status) once child `pid` exits, reaping it.

    A pidfd turns readable when the process exits, so the event loop reports
    the exit with no SIGCHLD handler and no thread; only this pid is reaped.
    """

    def reap() -> bool:
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped by someone else; the status is lost.
            on_exit(255)
            return True
        if got == 0:
            return False
        on_exit(os.waitstatus_to_exitcode(status))
        return True

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is None:

        def poll() -> None:
            if not reap():
                loop.call_later(EXIT_POLL, poll)

        loop.call_later(EXIT_POLL, poll)
        return

    def readable() -> None:
        if reap():
            loop.remove_reader(pidfd)
            os.close(pidfd)

    loop.add_reader(pidfd, readable)


# Finished commands whose output pipe is still held open by a process they
# left behind; referenced here so their pipes stay read until EOF.
_draining: set[_Child] = set()


def _environ(
    env: Iterable[tuple[str, str]] | Mapping[str, str],
) -> dict[str, str] | None:
    """The child's environment: None (inherit the gateway's as it is, no
    copy) when the service adds nothing."""
    pairs = list(env.items() if isinstance(env, Mapping) else env)
    if not pairs:
        return None
    merged = dict(os.environ)
    merged.update((str(key), str(value)) for key, value in pairs)
    return merged


# bash as found in the gateway's PATH, and the PATH it was found in. Looking
# it up once, instead of letting each spawn try every PATH entry in turn (a
# failed execve each, in the child, while the spawning loop waits for it),
# takes about 0.3 ms off every start on a typical PATH.
_bash_found: tuple[str | None, str] = (None, "bash")


def _bash() -> str:
    global _bash_found
    search = os.environ.get("PATH")
    if search != _bash_found[0]:
        found = shutil.which("bash", path=search)
        # Absolute, since the child changes to its cwd before the exec. Not
        # found: the name itself, so the spawn reports it missing.
        _bash_found = (search, os.path.abspath(found) if found else "bash")
    return _bash_found[1]


def _cwd_problem(cwd: str | None) -> str | None:
    if cwd is None:
        return None
    if not os.path.exists(cwd):
        return f"working directory {cwd} does not exist"
    if not os.path.isdir(cwd):
        return f"working directory {cwd} is not a directory"
    return None


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        # The number may have been reused by someone else's process group.
        logger.warning("not allowed to signal process group %d", pgid)


def _group_alive(pgid: int) -> bool:
    """Whether any process other than a zombie is still in the group."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # Zombies still count for killpg, and orphaned ones linger when nothing
    # reaps them (no init in a container); /proc tells them apart.
    try:
        entries = os.scandir("/proc")
    except OSError:
        return True
    with entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as stat:
                    fields = stat.read().rpartition(b")")[2].split()
            except OSError:
                continue
            if len(fields) < 3 or int(fields[2]) != pgid:
                continue
            if fields[0] not in (b"Z", b"X"):
                return True
    return False


async def _end_group(pgid: int, exited: asyncio.Future, grace: float) -> None:
    """SIGTERM the group, SIGKILL whatever is left after `grace`, wait for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    if not exited.done() or _group_alive(pgid):
        _signal_group(pgid, signal.SIGTERM)
    await asyncio.wait({exited}, timeout=max(0.0, deadline - loop.time()))
    while loop.time() < deadline and _group_alive(pgid):
        await asyncio.sleep(GROUP_POLL)
    if exited.done() and not _group_alive(pgid):
        return
    _signal_group(pgid, signal.SIGKILL)
    await asyncio.wait({exited}, timeout=KILL_WAIT)
    # Let the kernel finish tearing down the members that were just killed,
    # so callers see an empty group when this returns.
    end = loop.time() + KILL_WAIT
    while loop.time() < end and _group_alive(pgid):
        await asyncio.sleep(GROUP_POLL)


async def _spawn(
    command: str,
    *,
    stdout,
    cwd: str | None,
    env: Iterable[tuple[str, str]] | Mapping[str, str],
    on_line: Callable[[str], None] | None = None,
) -> _Child:
    """Start `bash -c command` in a new session (its pid is its group id).

    subprocess.Popen forks with vfork and closes descriptors with close_range,
    which takes a fraction of the time the event loop's own spawn does; the
    exit is then watched through a pidfd and the output read as a pipe.
    """
    loop = asyncio.get_running_loop()
    try:
        popen = subprocess.Popen(
            ["bash", "-c", command],
            executable=_bash(),
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=_environ(env),
            start_new_session=True,
        )
        # The child needs the CPU now to boot and this loop's bookkeeping
        # can wait: where both share one CPU, this takes about 0.7 ms off
        # the time to the command running (measured with the cold-start
        # benchmark, gateway pinned to one CPU).
        os.sched_yield()
    finally:
        if hasattr(stdout, "close"):
            # The child holds its own copy of the log file now.
            stdout.close()
    child = _Child(loop, popen, on_line=on_line)
    if popen.stdout is None:
        child.output_closed.set_result(None)
        return child
    connecting = asyncio.ensure_future(
        loop.connect_read_pipe(partial(_PipeReader, child), popen.stdout)
    )
    try:
        child.pipe, _ = await asyncio.shield(connecting)
    except BaseException:
        # Cancelled, or the pipe could not be watched, with the child already
        # running: nobody would supervise it, so end the whole group. The pipe
        # is closed by its transport once connecting finishes.
        _signal_group(child.pid, signal.SIGKILL)
        connecting.add_done_callback(partial(_close_connected, child))
        raise
    return child


def _close_connected(child: _Child, connecting: asyncio.Future) -> None:
    if not connecting.cancelled() and connecting.exception() is None:
        child.pipe = connecting.result()[0]
    child.close()


def _spawn_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.filename:
        reason = f"{reason}: {exc.filename}"
    return f"cannot start bash: {reason}"


async def run_command(
    command: str,
    *,
    timeout: float,
    cwd: str | None = None,
    env: Iterable[tuple[str, str]] | Mapping[str, str] = (),
    service: str = "",
) -> CommandResult:
    """Run `bash -c command` to completion and report how it went.

    Never raises for the command's sake: a missing cwd, a failed exec, a
    non-zero status and a timeout all come back as a CommandResult. If the
    command leaves a process behind that still holds its output, the result is
    returned once bash exits and that output is drained into the service log,
    so the leftover (often a daemon the command started) never gets SIGPIPE.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    extra = {"service": service, "command": command}
    logger.debug("running command", extra=extra)

    def finish(**fields) -> CommandResult:
        elapsed_ms = (loop.time() - started) * 1000
        result = CommandResult(elapsed_ms=elapsed_ms, timeout=timeout, **fields)
        logger.debug(
            "command finished in %.1f ms: %s",
            elapsed_ms,
            result.describe(),
            extra={
                **extra,
                "elapsed_ms": round(elapsed_ms, 1),
                "exit_code": result.exit_code,
            },
        )
        return result

    problem = _cwd_problem(cwd)
    if problem is not None:
        return finish(exit_code=None, output="", timed_out=False, error=problem)

    try:
        child = await _spawn(command, stdout=subprocess.PIPE, cwd=cwd, env=env)
    except OSError as exc:
        return finish(
            exit_code=None, output="", timed_out=False, error=_spawn_error(exc)
        )

    pgid = child.pid
    settled = False
    try:
        done, _ = await asyncio.wait({child.exited}, timeout=timeout)
        timed_out = not done
        if timed_out:
            logger.debug("command timed out, ending its process group", extra=extra)
            await _end_group(pgid, child.exited, KILL_GRACE)
        # Output written just before the exit is already in the pipe and
        # arrives within a loop iteration or two; a background child that
        # keeps the pipe open must not delay every start by much.
        await asyncio.wait({child.output_closed}, timeout=EXIT_DRAIN)
        settled = True
    finally:
        if not settled:
            # Cancelled: nobody will look at the result, so do not linger.
            _signal_group(pgid, signal.SIGKILL)
            child.close()

    output = child.tail.text()
    if child.output_closed.done() or not child.exited.done():
        child.close()
    else:
        logger.debug(
            "command left processes holding its output; draining it", extra=extra
        )
        _draining.add(child)
        child.close_when_done(
            grace=None,
            on_line=_service_line_logger(service),
            on_closed=lambda: _draining.discard(child),
        )
    exit_code = None if timed_out else child.exited.result()
    return finish(exit_code=exit_code, output=output, timed_out=timed_out)


def _file_tail(path: str, start: int) -> str:
    """The end of what was appended to `path` since offset `start`."""
    try:
        with open(path, "rb") as log:
            end = log.seek(0, os.SEEK_END)
            if end < start:
                # Truncated or rotated since: whatever is there is newer.
                start = 0
            begin = max(start, end - TAIL_BYTES)
            log.seek(begin)
            raw = log.read(TAIL_BYTES)
    except OSError:
        return ""
    return _decode_tail(raw, begin > start)


class ManagedProcess:
    """A `run` service's process: bash -c in its own process group."""

    def __init__(
        self,
        service: str,
        command: str,
        *,
        cwd: str | None = None,
        env: Iterable[tuple[str, str]] | Mapping[str, str] = (),
        log_path: str | None = None,
    ) -> None:
        self.service = service
        self.command = command
        self.cwd = cwd
        self.env = tuple(env.items() if isinstance(env, Mapping) else env)
        self.log_path = log_path
        self._child: _Child | None = None
        self._pgid: int | None = None
        self._log_offset = 0
        self._stopping: asyncio.Future | None = None

    @property
    def pid(self) -> int | None:
        """The process id (also its group id), or None when not running."""
        return self._pgid if self.alive() else None

    def alive(self) -> bool:
        return self._child is not None and not self._child.exited.done()

    async def spawn(self) -> None:
        """Start the command; raise CommandError if it cannot be started."""
        if self.alive():
            raise CommandError(f"already running as pid {self._pgid}")
        problem = _cwd_problem(self.cwd)
        if problem is not None:
            raise CommandError(problem)
        log_file = None
        if self.log_path is not None:
            try:
                log_file = open(self.log_path, "ab")
            except OSError as exc:
                reason = exc.strerror or str(exc)
                raise CommandError(
                    f"cannot open log file {self.log_path}: {reason}"
                ) from None
            self._log_offset = log_file.tell()
        on_line = None if log_file else _service_line_logger(self.service)
        stdout = log_file if log_file is not None else subprocess.PIPE
        try:
            child = await _spawn(
                self.command, stdout=stdout, cwd=self.cwd, env=self.env, on_line=on_line
            )
        except OSError as exc:
            raise CommandError(_spawn_error(exc)) from None
        self._child = child
        self._pgid = child.pid
        self._stopping = None
        # The reader ends with the process: a leftover group member holding the
        # pipe gets PIPE_GRACE, then the pipe is closed.
        child.close_when_done(grace=PIPE_GRACE)
        child.exited.add_done_callback(partial(self._log_exit, self._pgid))
        logger.debug(
            "process started",
            extra={"service": self.service, "pid": self._pgid, "command": self.command},
        )

    def _log_exit(self, pid: int, exited: asyncio.Future) -> None:
        if exited.cancelled():
            return
        logger.debug(
            "process %d %s",
            pid,
            describe_exit(exited.result()),
            extra={"service": self.service, "exit_code": exited.result()},
        )

    async def wait_exit(self) -> int:
        """Wait for the process to exit and return its status (negative: signal).

        Any number of callers may wait; cancelling one does not affect others.
        """
        if self._child is None:
            raise CommandError("process was never started")
        return await asyncio.shield(self._child.exited)

    def output_tail(self) -> str:
        """The last ~2 KiB of this run's output, for error messages."""
        if self._child is None:
            return ""
        if self.log_path is not None:
            return _file_tail(self.log_path, self._log_offset)
        return self._child.tail.text()

    async def stop(self, timeout: float) -> int | None:
        """SIGTERM the group, SIGKILL it after `timeout`, return the status.

        Safe to call when the process already exited (leftover group members are
        still ended) or was never started (returns None). Concurrent calls share
        one stop.
        """
        if self._child is None:
            return None
        if self._stopping is None or self._stopping.done():
            self._stopping = asyncio.ensure_future(self._stop(timeout))
        return await asyncio.shield(self._stopping)

    async def _stop(self, timeout: float) -> int | None:
        child = self._child
        assert child is not None and self._pgid is not None
        if not child.exited.done():
            logger.debug(
                "stopping process %d",
                self._pgid,
                extra={"service": self.service, "pid": self._pgid},
            )
        await _end_group(self._pgid, child.exited, timeout)
        if not child.exited.done():
            logger.warning(
                "process %d did not exit after SIGKILL",
                self._pgid,
                extra={"service": self.service, "pid": self._pgid},
            )
            return None
        await asyncio.wait({child.output_closed}, timeout=PIPE_GRACE)
        return child.exited.result()

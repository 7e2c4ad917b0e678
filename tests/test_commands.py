"""run_command and ManagedProcess against real bash processes."""

import asyncio
import logging
import os
import signal
import time

import pytest
import uvloop

from dynapm.commands import (
    TAIL_BYTES,
    CommandResult,
    ManagedProcess,
    describe_exit,
    run_command,
)
from dynapm.errors import CommandError

pytestmark = pytest.mark.timeout(10)


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request):
    """Run a coroutine on a fresh loop: the stock one and uvloop, which the
    gateway uses, differ in how they report child exits and pipe closes."""
    if request.param == "uvloop":
        return uvloop.run
    return asyncio.run


def pid_gone(pid: int) -> bool:
    """Whether `pid` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            state = stat.read().rpartition(b")")[2].split()[0]
    except OSError:
        return True
    return state in (b"Z", b"X")


async def wait_gone(pid: int, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if pid_gone(pid):
            return True
        await asyncio.sleep(0.02)
    return pid_gone(pid)


def read_pids(path) -> list[int]:
    return [int(word) for word in path.read_text().split()]


async def wait_for_file(path, within: float = 2.0, poll: float = 0.01) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().endswith("\n"):
            return
        await asyncio.sleep(poll)
    raise AssertionError(f"{path} was not written")


def reap(pids) -> None:
    """Clean up processes a failed test may have left behind."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# run_command


def test_exit_codes(run):
    ok = run(run_command("true", timeout=5))
    assert ok.exit_code == 0 and not ok.timed_out and ok.ok
    assert ok.describe() == "exited with status 0"

    failed = run(run_command("echo first; echo 'it broke' >&2; exit 3", timeout=5))
    assert failed.exit_code == 3
    assert failed.output == "first\nit broke\n"
    assert failed.describe() == "exited with status 3: first | it broke"
    assert failed.elapsed_ms > 0


def test_killed_by_signal_is_described(run):
    result = run(run_command("kill -TERM $$", timeout=5))
    assert result.exit_code == -signal.SIGTERM
    assert result.describe() == "killed by signal SIGTERM"


def test_describe_keeps_last_lines_short():
    long_line = "x" * 1000 + "END"
    result = CommandResult(1, f"early\n\n{long_line}\n\n", 1.0, False)
    text = result.describe()
    assert text.startswith("exited with status 1: ...")
    assert text.endswith("END") and len(text) <= 330
    assert describe_exit(-9) == "killed by signal SIGKILL"


def test_env_is_added_to_environment(run, monkeypatch):
    monkeypatch.setenv("DYNAPM_INHERITED", "from-parent")
    result = run(
        run_command(
            'printf "%s|%s" "$DYNAPM_T" "$DYNAPM_INHERITED"',
            timeout=5,
            env=[("DYNAPM_T", "hello world")],
        )
    )
    assert result.output == "hello world|from-parent"


def test_env_accepts_mapping(run):
    result = run(run_command('printf %s "$X"', timeout=5, env={"X": 5}))
    assert result.output == "5"


def test_cwd_absolute_and_relative(run, tmp_path, monkeypatch):
    sub = tmp_path / "sub"
    sub.mkdir()
    absolute = run(run_command("pwd", timeout=5, cwd=str(sub)))
    assert absolute.output.strip() == str(sub)

    monkeypatch.chdir(tmp_path)
    relative = run(run_command("pwd", timeout=5, cwd="sub"))
    assert relative.output.strip() == str(sub)


def test_missing_cwd_is_a_result_not_an_exception(run, tmp_path):
    missing = tmp_path / "nope"
    result = run(run_command("true", timeout=5, cwd=str(missing)))
    assert result.exit_code is None and not result.timed_out
    assert result.describe() == f"working directory {missing} does not exist"


def test_output_tail_is_bounded_for_chatty_commands(run):
    command = "head -c 5000000 /dev/zero | tr '\\0' 'x'; echo; echo END"
    result = run(run_command(command, timeout=5))
    assert result.exit_code == 0
    assert len(result.output) <= TAIL_BYTES
    assert result.output.endswith("x\nEND\n")
    assert result.describe().endswith(": END")


def test_tail_drops_split_utf8_sequence(run):
    # 'é' is two bytes; an odd count of padding bytes puts the cut inside one.
    command = "printf 'é%.0s' $(seq 1 3000); echo"
    result = run(run_command(command, timeout=5))
    assert "\ufffd" not in result.output
    assert result.output.rstrip("\n").strip("é") == ""


def test_timeout_kills_the_whole_group(run):
    async def scenario():
        started = time.monotonic()
        result = await run_command("sleep 30 & echo $!; wait", timeout=0.3)
        elapsed = time.monotonic() - started
        child = int(result.output.split()[0])
        try:
            assert result.timed_out and result.exit_code is None
            assert result.describe().startswith("timed out after 0.3s")
            assert elapsed < 1.0
            assert await wait_gone(child)
        finally:
            reap([child])

    run(scenario())


def test_timeout_sigkills_a_group_ignoring_sigterm(run):
    async def scenario():
        started = time.monotonic()
        command = "trap '' TERM; sleep 30 & echo $!; wait; wait"
        result = await run_command(command, timeout=0.2)
        elapsed = time.monotonic() - started
        child = int(result.output.split()[0])
        try:
            assert result.timed_out and result.exit_code is None
            # SIGTERM at 0.2 s is ignored; SIGKILL follows a second later.
            assert 1.1 <= elapsed < 2.5
            assert await wait_gone(child)
        finally:
            reap([child])

    run(scenario())


def test_cancelled_command_is_killed(run, tmp_path):
    async def scenario(pidfile):
        task = asyncio.ensure_future(
            run_command(f"sleep 30 & echo $! > {pidfile}; wait", timeout=30)
        )
        # Poll tightly: cancelling while the loop is still connecting the
        # child's pipes is the case where only bash would be killed.
        await wait_for_file(pidfile, poll=0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        child = read_pids(pidfile)[0]
        try:
            assert await wait_gone(child)
        finally:
            reap([child])

    for attempt in range(3):
        run(scenario(tmp_path / f"pid{attempt}"))


def test_cancelled_spawn_leaves_nothing_running(run, tmp_path):
    async def scenario(pidfile):
        proc = ManagedProcess("c", f"sleep 30 & echo $! > {pidfile}; wait")
        task = asyncio.ensure_future(proc.spawn())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not proc.alive()
        await asyncio.sleep(0.3)
        if pidfile.exists() and pidfile.read_text().strip():
            child = read_pids(pidfile)[0]
            try:
                assert await wait_gone(child)
            finally:
                reap([child])

    for attempt in range(3):
        run(scenario(tmp_path / f"pid{attempt}"))


def test_background_child_holding_the_pipe_does_not_hang(run, caplog):
    caplog.set_level(logging.INFO, logger="dynapm.service")

    async def scenario():
        started = time.monotonic()
        command = "(sleep 0.5; echo late-line) & echo early-line"
        result = await run_command(command, timeout=5, service="bg")
        assert time.monotonic() - started < 0.4
        assert result.exit_code == 0
        assert result.output == "early-line\n"
        # The leftover keeps its output: it is drained into the service log.
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if any(r.getMessage() == "late-line" for r in caplog.records):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)

    run(scenario())
    late = [r for r in caplog.records if r.getMessage() == "late-line"]
    assert len(late) == 1
    assert late[0].name == "dynapm.service" and late[0].service == "bg"


def test_command_is_logged_at_debug(run, caplog):
    caplog.set_level(logging.DEBUG, logger="dynapm.commands")
    run(run_command("exit 0", timeout=5, service="svc"))
    records = [r for r in caplog.records if r.name == "dynapm.commands"]
    assert records[0].getMessage() == "running command"
    assert records[0].service == "svc" and records[0].command == "exit 0"
    assert records[-1].elapsed_ms >= 0 and records[-1].exit_code == 0


# ManagedProcess


def test_spawn_and_stop_with_sigterm(run):
    async def scenario():
        proc = ManagedProcess("app", "sleep 30")
        assert proc.pid is None and not proc.alive()
        await proc.spawn()
        pid = proc.pid
        try:
            assert isinstance(pid, int) and proc.alive()
            assert os.getpgid(pid) == pid  # its own process group
            assert os.getsid(pid) == pid
            started = time.monotonic()
            status = await proc.stop(timeout=2)
            assert time.monotonic() - started < 1.0
            assert status == -signal.SIGTERM
            assert not proc.alive() and proc.pid is None
            assert await proc.wait_exit() == -signal.SIGTERM
            assert await wait_gone(pid)
            # Stopping again is harmless and reports the same status.
            assert await proc.stop(timeout=1) == -signal.SIGTERM
        finally:
            reap([pid])

    run(scenario())


def test_stop_sigkills_after_timeout_when_term_is_trapped(run):
    async def scenario():
        proc = ManagedProcess("stubborn", "trap '' TERM; sleep 30; true")
        await proc.spawn()
        pid = proc.pid
        try:
            await asyncio.sleep(0.1)  # let bash install the trap
            started = time.monotonic()
            status = await proc.stop(timeout=0.3)
            elapsed = time.monotonic() - started
            assert status == -signal.SIGKILL
            assert 0.3 <= elapsed < 1.5
            assert await wait_gone(pid)
        finally:
            reap([pid])

    run(scenario())


def test_stop_ends_every_group_member(run, tmp_path):
    pidfile = tmp_path / "pids"

    async def scenario():
        command = (
            f"sleep 30 & echo $! > {pidfile}; "
            f"(trap '' TERM; sleep 30) & echo $! >> {pidfile}; wait"
        )
        proc = ManagedProcess("family", command)
        await proc.spawn()
        members = [proc.pid]
        try:
            await wait_for_file(pidfile)
            await asyncio.sleep(0.05)
            members += read_pids(pidfile)
            assert len(members) == 3
            await proc.stop(timeout=0.3)
            for pid in members:
                assert await wait_gone(pid, within=0.5), pid
        finally:
            reap(members)

    run(scenario())


def test_stop_ends_leftovers_after_the_leader_exited(run, tmp_path):
    pidfile = tmp_path / "pid"

    async def scenario():
        command = f"sleep 30 >/dev/null 2>&1 & echo $! > {pidfile}; exit 4"
        proc = ManagedProcess("leaver", command)
        await proc.spawn()
        await wait_for_file(pidfile)
        child = read_pids(pidfile)[0]
        try:
            assert await proc.wait_exit() == 4
            assert not proc.alive() and proc.pid is None
            assert not pid_gone(child)
            assert await proc.stop(timeout=1) == 4
            assert await wait_gone(child, within=0.5)
        finally:
            reap([child])

    run(scenario())


def test_wait_exit_serves_several_waiters(run):
    async def scenario():
        proc = ManagedProcess("short", "sleep 0.1; exit 7")
        await proc.spawn()
        first = asyncio.ensure_future(proc.wait_exit())
        second = asyncio.ensure_future(proc.wait_exit())
        third = asyncio.ensure_future(proc.wait_exit())
        third.cancel()
        assert await asyncio.gather(first, second) == [7, 7]
        assert await proc.stop(timeout=1) == 7

    run(scenario())


def test_stop_before_spawn_returns_none(run):
    assert run(ManagedProcess("idle", "true").stop(timeout=1)) is None


def test_log_path_receives_output(run, tmp_path):
    log = tmp_path / "svc.log"
    log.write_text("from an earlier run\n")

    async def scenario():
        proc = ManagedProcess(
            "logged", "echo hello; echo oops >&2; exit 2", log_path=str(log)
        )
        await proc.spawn()
        assert await proc.wait_exit() == 2
        return proc.output_tail()

    tail = run(scenario())
    assert log.read_text() == "from an earlier run\nhello\noops\n"
    # Only this run's output, not what the file held before.
    assert tail == "hello\noops\n"


def test_log_path_tail_is_bounded(run, tmp_path):
    log = tmp_path / "big.log"

    async def scenario():
        proc = ManagedProcess(
            "big", "seq 1 20000; echo last", cwd=str(tmp_path), log_path=str(log)
        )
        await proc.spawn()
        await proc.wait_exit()
        return proc.output_tail()

    tail = run(scenario())
    assert len(tail) <= TAIL_BYTES and tail.endswith("20000\nlast\n")


def test_unwritable_log_path_is_a_command_error(run, tmp_path):
    proc = ManagedProcess("x", "true", log_path=str(tmp_path / "missing" / "a.log"))
    with pytest.raises(CommandError, match="cannot open log file .*missing"):
        run(proc.spawn())
    assert not proc.alive()


def test_missing_cwd_is_a_command_error(run, tmp_path):
    proc = ManagedProcess("x", "true", cwd=str(tmp_path / "gone"))
    with pytest.raises(CommandError, match="does not exist"):
        run(proc.spawn())


def test_output_without_log_goes_to_service_logger(run, caplog):
    caplog.set_level(logging.INFO, logger="dynapm.service")

    async def scenario():
        command = "for i in $(seq 1 2000); do echo line$i; done; printf tail-no-newline"
        proc = ManagedProcess("chatty", command)
        await proc.spawn()
        assert await proc.wait_exit() == 0
        await proc.stop(timeout=1)
        return proc.output_tail()

    tail = run(scenario())
    assert len(tail.encode()) <= TAIL_BYTES
    assert tail.endswith("line2000\ntail-no-newline")
    lines = [r for r in caplog.records if r.name == "dynapm.service"]
    assert [r.getMessage() for r in lines[:2]] == ["line1", "line2"]
    assert lines[-1].getMessage() == "tail-no-newline"
    assert len(lines) == 2001
    assert all(r.service == "chatty" and r.levelno == logging.INFO for r in lines)


def test_process_that_cannot_start_reports_its_status(run):
    async def scenario():
        proc = ManagedProcess("typo", "definitely-not-a-command-dynapm")
        await proc.spawn()
        status = await proc.wait_exit()
        await proc.stop(timeout=1)
        return status, proc.output_tail()

    status, tail = run(scenario())
    assert status == 127
    assert "not found" in tail


def test_spawn_twice_while_running_is_refused(run):
    async def scenario():
        proc = ManagedProcess("dup", "sleep 30")
        await proc.spawn()
        try:
            with pytest.raises(CommandError, match="already running"):
                await proc.spawn()
        finally:
            await proc.stop(timeout=1)
        # Once stopped it can run again.
        await proc.spawn()
        assert proc.alive()
        assert await proc.stop(timeout=1) == -signal.SIGTERM

    run(scenario())


def test_bash_is_found_in_the_current_path_and_named_bash(run, monkeypatch, tmp_path):
    result = run(run_command('echo "$0"', timeout=5))
    assert (result.exit_code, result.output) == (0, "bash\n")
    # A bash earlier in a changed PATH is the one that runs from then on.
    wrapper = tmp_path / "bash"
    wrapper.write_text("#!/bin/sh\necho wrapped\nexit 7\n")
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    result = run(run_command("true", timeout=5))
    assert (result.exit_code, result.output) == (7, "wrapped\n")


def test_missing_bash_is_reported_not_raised(run, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent-dynapm")
    result = run(run_command("true", timeout=5))
    assert result.exit_code is None
    assert result.describe().startswith("cannot start bash: ")
    with pytest.raises(CommandError, match="cannot start bash"):
        run(ManagedProcess("x", "true").spawn())

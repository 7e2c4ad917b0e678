"""Per-service lifecycle: on-demand start, readiness, idle stop, adoption.

States and the only transitions allowed between them:

    offline  -> starting   a request (or admin start) needs the service
    starting -> online     start succeeded and the readiness probe passed
    starting -> offline    start failed, the process died, or start_timeout
    online   -> stopping   idle timeout, admin stop, shutdown, or the upstream
                           refused connections (a crash: it is stopped to be
                           started again)
    online   -> offline    a `run` process exited by itself
    stopping -> offline    the stop finished

Rules:
- One start at a time: every caller of ensure_ready() awaits the same task.
- A caller arriving while the service stops waits for the stop, then starts it.
- The hot path reads ServiceState.online and keeps ServiceState.active and
  last_activity; the idle timer only reads them, so no per-request call into
  this module is needed. The service stops when active == 0 and
  last_activity + idle_timeout has passed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from dynapm import health
from dynapm._fast.proxy import ServiceState
from dynapm.commands import ManagedProcess, run_command
from dynapm.config import Service as ServiceConfig
from dynapm.errors import CommandError, StartError

logger = logging.getLogger("dynapm.lifecycle")

OFFLINE = "offline"
STARTING = "starting"
ONLINE = "online"
STOPPING = "stopping"


class Service:
    """Owns one service's state; the only writer of ``state.online``."""

    def __init__(self, config: ServiceConfig, state: ServiceState, hub: Lifecycle):
        self.config = config
        self.name = config.name
        self.state = state
        self.hub = hub
        self.managed = not config.proxy_only
        self.status = OFFLINE
        self.started_at: float | None = None
        self.start_count = 0
        self.last_start_ms: float | None = None
        self.total_uptime = 0.0
        self.process: ManagedProcess | None = None
        self._start_task: asyncio.Task | None = None
        self._stop_task: asyncio.Task | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._online_since = 0.0
        # Requests counted in state.active that wait in ensure_ready().
        self.held = 0
        state.lifecycle = self
        if config.proxy_only:
            self.status = ONLINE
            state.online = True

    # -- public ------------------------------------------------------------

    async def ensure_ready(self) -> None:
        """For a held request: return once the service is online; raise
        StartError if it fails. Held requests are told apart from in-flight
        ones so that a stop can wait for the latter only."""
        if self.status == ONLINE:
            return
        self.held += 1
        try:
            await self.start()
        finally:
            self.held -= 1

    async def start(self) -> None:
        """Return once the service is online; raise StartError if it fails."""
        while self.status != ONLINE:
            if self.status == STOPPING:
                await asyncio.shield(self._stop_task)
                continue
            if self.status == OFFLINE:
                # The state changes before anything is awaited, so every
                # caller from here on joins this one start.
                self._set_status(STARTING)
                self._start_task = asyncio.get_running_loop().create_task(self._start())
            task = self._start_task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
                raise StartError(self.name, "the gateway is shutting down") from None

    async def stop(self, reason: str) -> None:
        """Stop the service if it runs; wait for a start or stop under way."""
        if not self.managed:
            return
        if self.status == STARTING:
            task = self._start_task
            if reason == "shutdown":
                # Do not wait up to start_timeout: the start cleans up after
                # itself when cancelled (process group killed, stop run).
                task.cancel()
            try:
                await asyncio.shield(task)
            except (StartError, asyncio.CancelledError):
                if not task.done():
                    raise
                return
        if self.status == ONLINE:
            self._begin_stop(reason)
        if self.status == STOPPING:
            await asyncio.shield(self._stop_task)

    def on_refused(self, generation: int) -> None:
        """The hot path saw the upstream refuse a connection while online."""
        if self.status != ONLINE or self.state.generation != generation:
            # Another request already noticed; the restart is under way.
            return
        logger.warning(
            "upstream failed, restarting",
            extra={"service": self.name},
        )
        self._begin_stop("crashed")

    async def crashed(self, generation: int, within: float) -> bool:
        """Has the instance started as ``generation`` died, or does it die
        within ``within`` seconds? Only a `run` process can tell; for a
        service run by start/stop commands the answer is False."""
        if self.config.run is None:
            return False
        if self.state.generation != generation or self.status != ONLINE:
            return True
        process = self.process
        if process is None:
            return True
        try:
            await asyncio.wait_for(asyncio.shield(process.wait_exit()), within)
        except asyncio.TimeoutError:
            return False
        # Offline now, whichever of this and the exit callback runs first.
        self.on_refused(generation)
        return True

    async def adopt(self) -> None:
        """At boot: a service whose check passes is already running."""
        command = self.config.check
        if command is None or not self.managed:
            return
        result = await run_command(
            command,
            timeout=self.config.start_timeout,
            cwd=self.config.cwd,
            env=self.config.env,
            service=self.name,
        )
        if result.exit_code == 0:
            logger.info("adopted running service", extra={"service": self.name})
            self._went_online(time.monotonic())
        else:
            logger.debug(
                "check says not running",
                extra={"service": self.name, "cause": result.describe()},
            )

    # -- transitions -------------------------------------------------------

    def _set_status(self, status: str) -> None:
        old, self.status = self.status, status
        self.hub.publish(self.name, old, status)

    async def _start(self) -> None:
        config = self.config
        begun = time.monotonic()
        deadline = begun + config.start_timeout
        logger.info("starting", extra={"service": self.name})
        try:
            if config.run is not None:
                command_ms = await self._spawn(deadline)
            else:
                command_ms = await self._run_start(deadline)
        except StartError as err:
            logger.error(
                "start failed",
                extra={"service": self.name, "cause": err.reason},
            )
            await self._cleanup_failed_start()
            self._set_status(OFFLINE)
            raise
        except asyncio.CancelledError:
            await self._cleanup_failed_start()
            self._set_status(OFFLINE)
            raise
        ready = time.monotonic()
        self.last_start_ms = round((ready - begun) * 1000, 3)
        self.start_count += 1
        logger.info(
            "online",
            extra={
                "service": self.name,
                "command_ms": command_ms,
                "ready_ms": round((ready - begun) * 1000 - command_ms, 3),
                "ms": self.last_start_ms,
                "pid": self.process.pid if self.process else None,
            },
        )
        self._went_online(ready)

    async def _spawn(self, deadline: float) -> float:
        config = self.config
        process = ManagedProcess(
            self.name,
            config.run,
            cwd=config.cwd,
            env=config.env,
            log_path=config.log,
        )
        spawned = time.monotonic()
        try:
            await process.spawn()
        except CommandError as err:
            raise StartError(self.name, str(err)) from err
        self.process = process
        command_ms = round((time.monotonic() - spawned) * 1000, 3)
        loop = asyncio.get_running_loop()
        exited = loop.create_task(process.wait_exit())
        probe = loop.create_task(self._wait_ready(deadline, process.alive))
        try:
            await asyncio.wait({exited, probe}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            probe.cancel()
            # Its outcome no longer matters; retrieve it so it is not reported.
            probe.add_done_callback(_ignore_outcome)
        if exited.done():
            tail = process.output_tail().strip()
            detail = f"process exited with status {exited.result()}"
            if tail:
                detail += ": " + tail[-300:]
            raise StartError(self.name, detail)
        probe.result()
        exited.add_done_callback(lambda task: self._on_exit(process, task))
        return command_ms

    async def _run_start(self, deadline: float) -> float:
        config = self.config
        result = await run_command(
            config.start,
            timeout=max(deadline - time.monotonic(), 0.001),
            cwd=config.cwd,
            env=config.env,
            service=self.name,
        )
        if result.exit_code != 0:
            raise StartError(self.name, "start command " + result.describe())
        await self._wait_ready(deadline)
        return round(result.elapsed_ms, 3)

    async def _wait_ready(self, deadline: float, keep_going=None) -> None:
        config = self.config
        try:
            await health.wait_ready(
                config.health,
                config.probe_upstream,
                timeout=max(deadline - time.monotonic(), 0.001),
                cwd=config.cwd,
                env=config.env,
                service=self.name,
                keep_going=keep_going,
            )
        except health.NotReady as err:
            raise StartError(
                self.name,
                f"not ready within {config.start_timeout:g}s ({err.reason})",
            ) from err

    async def _cleanup_failed_start(self) -> None:
        # Leave nothing half-started behind: kill the process group, or run
        # the stop command after a start that never became ready.
        await self._stop_instance()

    async def _stop_instance(self) -> None:
        """Kill the `run` process group, or run the stop command."""
        config = self.config
        if self.process is not None:
            process, self.process = self.process, None
            await process.stop(config.stop_timeout)
        elif config.stop is not None:
            result = await run_command(
                config.stop,
                timeout=config.stop_timeout,
                cwd=config.cwd,
                env=config.env,
                service=self.name,
            )
            if result.exit_code != 0:
                logger.error(
                    "stop command failed",
                    extra={"service": self.name, "cause": result.describe()},
                )

    def _went_online(self, at: float) -> None:
        self.started_at = time.time()
        self._online_since = at
        self.state.generation += 1
        self.state.last_activity = max(self.state.last_activity, at)
        self.state.online = True
        self._set_status(ONLINE)
        self._arm_idle_timer(self.config.idle_timeout)

    def _went_offline(self) -> None:
        self.state.online = False
        self.state.close_idle()
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self._online_since:
            self.total_uptime += time.monotonic() - self._online_since
            self._online_since = 0.0
        self.started_at = None

    def _on_exit(self, process: ManagedProcess, task: asyncio.Task) -> None:
        if task.cancelled() or self.process is not process:
            return
        if self.status != ONLINE:
            return
        self.process = None
        logger.warning(
            "process exited",
            extra={"service": self.name, "exit": task.result()},
        )
        self._went_offline()
        self._set_status(OFFLINE)
        # Members of its process group may outlive the leader.
        asyncio.get_running_loop().create_task(process.stop(self.config.stop_timeout))

    def _begin_stop(self, reason: str) -> None:
        # Offline for the hot path at once; the stop itself runs in a task.
        self._set_status(STOPPING)
        self._went_offline()
        self._stop_task = asyncio.get_running_loop().create_task(self._stop(reason))

    async def _stop(self, reason: str) -> None:
        config = self.config
        begun = time.monotonic()
        logger.info("stopping", extra={"service": self.name, "reason": reason})
        # Requests already sent to the service finish first (up to
        # stop_timeout); the hot path keeps no callback for this, so look.
        deadline = begun + config.stop_timeout
        while self.state.active > self.held and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        try:
            await self._stop_instance()
        finally:
            logger.info(
                "offline",
                extra={
                    "service": self.name,
                    "ms": round((time.monotonic() - begun) * 1000, 3),
                },
            )
            self._set_status(OFFLINE)

    # -- idle timer --------------------------------------------------------

    def _arm_idle_timer(self, delay: float) -> None:
        if self.config.idle_timeout <= 0:
            return
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._idle_timer = asyncio.get_running_loop().call_later(
            max(delay, 0.0), self._on_idle_timer
        )

    def _on_idle_timer(self) -> None:
        self._idle_timer = None
        if self.status != ONLINE:
            return
        idle_timeout = self.config.idle_timeout
        if self.state.active > 0:
            # Busy: look again one idle period from now. The exchange that
            # keeps it busy sets last_activity when it ends, so the next
            # check computes the exact deadline from there.
            self._arm_idle_timer(idle_timeout)
            return
        remaining = self.state.last_activity + idle_timeout - time.monotonic()
        if remaining > 0.001:
            self._arm_idle_timer(remaining)
            return
        self._begin_stop("idle")

    # -- reporting ---------------------------------------------------------

    def info(self) -> dict:
        config = self.config
        uptime = self.total_uptime
        if self._online_since:
            uptime += time.monotonic() - self._online_since
        last_request = None
        if self.state.last_request:
            last_request = time.time() - (time.monotonic() - self.state.last_request)
        return {
            "name": self.name,
            "status": self.status,
            "upstream": config.upstream.url if config.upstream else None,
            "hosts": list(config.hosts),
            "ports": list(config.ports),
            "routes": [
                {"host": r.host, "upstream": r.upstream.url}
                if r.host is not None
                else {"port": r.port, "upstream": r.upstream.url}
                for r in config.routes
            ],
            "active_connections": self.state.active,
            "last_request_at": last_request,
            "started_at": self.started_at,
            "start_count": self.start_count,
            "last_start_ms": self.last_start_ms,
            "total_uptime_s": round(uptime, 3),
            "idle_timeout_s": config.idle_timeout,
            "proxy_only": config.proxy_only,
            "pid": self.process.pid if self.process and self.process.alive() else None,
        }


def _ignore_outcome(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()


class Lifecycle:
    """All services, and the subscribers to their state changes."""

    def __init__(self) -> None:
        self.services: dict[str, Service] = {}
        self.subscribers: list = []

    def add(self, config: ServiceConfig, state: ServiceState) -> Service:
        service = Service(config, state, self)
        self.services[config.name] = service
        return service

    def publish(self, name: str, old: str, new: str) -> None:
        event = {"service": name, "from": old, "to": new, "at": time.time()}
        for subscriber in list(self.subscribers):
            subscriber(event)

    async def adopt_all(self) -> None:
        await asyncio.gather(*(s.adopt() for s in self.services.values()))

    async def stop_all(self) -> None:
        await asyncio.gather(
            *(s.stop("shutdown") for s in self.services.values()),
            return_exceptions=True,
        )

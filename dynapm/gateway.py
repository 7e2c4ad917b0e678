"""Listeners, the route table, and graceful shutdown.

Wires the Cython hot path (dynapm._fast.proxy) to the lifecycle: one
ServiceState per service, one Pool per distinct upstream of a service, one
Route per host or dedicated port.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import signal
import time

from dynapm._fast.proxy import Downstream, Pool, Route, ServiceState, Settings
from dynapm.config import Config
from dynapm.lifecycle import Lifecycle

logger = logging.getLogger("dynapm.gateway")


class ListenError(Exception):
    """A listener could not be opened (address in use, permission...)."""


class Gateway:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop):
        self.config = config
        self.loop = loop
        self.lifecycle = Lifecycle()
        self.servers: list[asyncio.AbstractServer] = []
        self._stopping = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None
        self.admin = None
        limits = config.limits
        hosts: dict[bytes, Route] = {}
        self.port_routes: dict[int, Route] = {}
        # One pool of keep-alive connections per upstream address, shared by
        # the services that use it (as an nginx upstream block would be).
        pools: dict[tuple[str, int], Pool] = {}
        for service_config in config.services:
            state = ServiceState(service_config.name)
            self.lifecycle.add(service_config, state)
            for route_config in service_config.routes:
                upstream = route_config.upstream
                key = (upstream.host, upstream.port)
                if key not in pools:
                    pools[key] = Pool(upstream.host, upstream.port)
                if pools[key] not in state.pools:
                    state.pools.append(pools[key])
                route = Route(
                    state,
                    pools[key],
                    upstream.hostport.encode(),
                    service_config.preserve_host,
                )
                if route_config.host is not None:
                    hosts[route_config.host.encode()] = route
                else:
                    self.port_routes[route_config.port] = route
        self.settings = Settings(
            loop,
            hosts,
            max_body=limits.max_body,
            max_header=limits.max_header,
            header_timeout=limits.header_timeout,
            keepalive_timeout=limits.keepalive_timeout,
            upstream_timeout=limits.upstream_timeout,
            access_log=config.logging.access_log,
        )
        # Timeouts are enforced by one sweep over the connections a few
        # times a second instead of a timer per request.
        shortest = min(
            limits.header_timeout, limits.keepalive_timeout, limits.upstream_timeout
        )
        self.sweep_interval = min(max(shortest / 4, 0.05), 0.5)

    async def start(self) -> None:
        """Adopt running services, then open the listeners.

        The main listener opens last, so once it accepts connections every
        other listener (dedicated ports, admin) does too.
        """
        await self.lifecycle.adopt_all()
        listen = self.config.listen
        settings = self.settings
        for port, route in self.port_routes.items():
            await self._listen(
                listen.host, port, lambda route=route: Downstream(settings, route)
            )
        if self.config.admin is not None:
            from dynapm.admin import AdminServer

            self.admin = AdminServer(self)
            await self.admin.start()
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        # Everything built so far lives as long as the gateway: keep it out of
        # the collector's full passes.
        gc.freeze()
        await self._listen(listen.host, listen.port, lambda: Downstream(settings))
        logger.info(
            "listening",
            extra={
                "address": str(listen),
                "ports": sorted(self.port_routes),
                "services": len(self.config.services),
            },
        )

    async def _listen(self, host: str, port: int, factory) -> None:
        try:
            server = await self.loop.create_server(
                factory, host, port, reuse_address=True, backlog=1024
            )
        except OSError as err:
            address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = (
                "address already in use"
                if err.errno == errno.EADDRINUSE
                else (err.strerror or str(err))
            )
            raise ListenError(f"cannot listen on {address}: {reason}") from err
        self.servers.append(server)

    def _sweep(self) -> None:
        self.settings.sweep()
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)

    def request_stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT, then shut down gracefully."""
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(signum, self.request_stop)
        try:
            await self.start()
        except BaseException:
            # Nothing was served: leave adopted services running (they were
            # running before us, maybe for another gateway).
            for server in self.servers:
                server.close()
            if self.admin is not None:
                await self.admin.close()
            raise
        try:
            await self._stopping.wait()
        finally:
            await self.shutdown()

    async def shutdown(self) -> None:
        logger.info("shutting down")
        for server in self.servers:
            server.close()
        if self.admin is not None:
            await self.admin.close()
        self.settings.drain()
        deadline = time.monotonic() + self.config.limits.shutdown_timeout
        while self.settings.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.settings.connections:
            logger.warning(
                "closing connections still open at shutdown_timeout",
                extra={"count": len(self.settings.connections)},
            )
            self.settings.abort_all()
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.lifecycle.stop_all()
        logger.info("stopped")

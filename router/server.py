"""Listeners and lifecycle of one router process: the proxy socket, the admin app, draining.

``RouterServer`` binds the protocol-level proxy and the admin listener (the aiohttp app with the
dashboard, or with ``admin_lite`` the small one of ``router.liteadmin``) on the running loop,
exposes ``swap(table)`` for whatever source feeds it, and shuts down gracefully (stop
accepting, finish in-flight exchanges within the drain deadline, close the rest). It knows
nothing about where tables come from; the CLI composes it with the controller's sources.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from router.accesslog import AccessLog
from router.proxy import ProxyContext, TableSlot
from router.settings import RouterSettings
from router.stats import RouterStats
from router.table import EMPTY_TABLE, RouteTable

if TYPE_CHECKING:
    from aiohttp import web

    from router.admin import AdminState
    from router.liteadmin import LiteAdmin
    from router.tracing import RequestTracer

__all__ = ["RouterServer", "TlsFiles", "start_admin_listener"]

log = logging.getLogger(__name__)


class TlsFiles:
    """The listener's certificate and key, re-read into the same SSL context when either file
    changes: new handshakes get the new certificate, connections already open keep theirs (what
    a cert-manager renewal needs). A pair that does not load is logged and the last good one kept."""

    POLL_SECONDS = 2.0

    def __init__(self, cert: str, key: str) -> None:
        self.cert = cert
        self.key = key
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.set_alpn_protocols(["h2", "http/1.1"])
        self.loads = 0
        self._stamp = self._stamps()
        self.context.load_cert_chain(cert, key)  # at start a bad pair is the user's to fix: raise
        self.loads = 1

    def _stamps(self) -> tuple[float, float, int, int]:
        cert, key = os.stat(self.cert), os.stat(self.key)
        return (cert.st_mtime, key.st_mtime, cert.st_ino, key.st_ino)

    def check(self) -> bool:
        """Reload if either file changed since the last look; whether a new pair was loaded."""
        try:
            stamp = self._stamps()
        except OSError as exc:
            log.error("TLS: cannot read %s: %s; the last good certificate stays", exc.filename, exc.strerror)
            return False
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            self.context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            # Mid-renewal the two files may disagree for a moment: the next change retries.
            log.error("TLS: %s and %s did not load (%s); the last good certificate stays", self.cert, self.key, exc)
            return False
        self.loads += 1
        log.info("TLS: certificate %s reloaded", self.cert)
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.POLL_SECONDS)
            self.check()


async def start_admin_listener(state: AdminState, address: tuple[str, int]) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve the admin app for ``state`` on ``address``; its runner (to clean up) and bound address."""
    # aiohttp and prometheus_client load only for the full admin: a lite sidecar never pays for them.
    from aiohttp import web  # noqa: PLC0415

    from router.admin import make_admin_app  # noqa: PLC0415

    runner = web.AppRunner(make_admin_app(state), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, address[0], address[1], reuse_address=True)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    server: Any = site._server
    bound: tuple[str, int] = server.sockets[0].getsockname()[:2]
    return runner, bound


class RouterServer:
    def __init__(
        self,
        settings: RouterSettings | None = None,
        table: RouteTable = EMPTY_TABLE,
        readiness: Callable[[], tuple[bool, dict[str, Any]]] | None = None,
        tracer: RequestTracer | None = None,
        *,
        admin_lite: bool = False,
    ) -> None:
        self.settings = settings or RouterSettings()
        self.admin_lite = admin_lite
        """Serve ``router.liteadmin`` (health, readiness, metrics, routes; no aiohttp) on the admin port."""
        self.slot = TableSlot(table)
        self.stats = RouterStats()
        self._readiness = readiness
        self.tracer = tracer
        self.access_log: AccessLog | None = None
        """Made at start when ``settings.access_log`` names a destination."""
        self._server: asyncio.AbstractServer | None = None
        self._admin_runner: web.AppRunner | None = None
        self._lite_admin: LiteAdmin | None = None
        self.ctx: ProxyContext | None = None
        self.address: tuple[str, int] = ("", 0)
        self.admin_address: tuple[str, int] = ("", 0)
        self.tls: TlsFiles | None = None
        self._tls_watch: asyncio.Task[None] | None = None

    @property
    def table(self) -> RouteTable:
        return self.slot.table

    def swap(self, table: RouteTable) -> None:
        """Make ``table`` current. Requests already routed keep the decision they made."""
        self.slot.swap(table)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        if self._readiness is not None:
            return self._readiness()
        return (self.slot.table.version > 0, {})

    async def start(
        self, listen: tuple[str, int], admin: tuple[str, int] | None = None, *, reuse_port: bool = False
    ) -> None:
        """Bind the proxy listener (and the admin one if ``admin``). ``reuse_port``: join the other
        processes accepting on ``listen`` (``router.workers``), the kernel spreading connections."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        if settings.access_log is not None and self.access_log is None:
            self.access_log = AccessLog(
                settings.access_log,
                settings.access_log_format,
                query=settings.access_log_query,
                sample=settings.access_log_sample,
            )
        self.ctx = ProxyContext(loop, settings, self.slot, self.stats, tracer=self.tracer, access_log=self.access_log)
        if settings.tls_cert is not None and settings.tls_key is not None:
            self.tls = TlsFiles(settings.tls_cert, settings.tls_key)
            self._tls_watch = loop.create_task(self.tls.watch(), name="tls-reload")
        self._server = await loop.create_server(
            self.ctx.protocol_factory,
            listen[0],
            listen[1],
            reuse_address=True,
            reuse_port=reuse_port,
            backlog=4096,
            ssl=self.tls.context if self.tls is not None else None,
        )
        sock: socket.socket = self._server.sockets[0]
        self.address = sock.getsockname()[:2]
        if admin is None:
            return
        if self.admin_lite:
            from router.liteadmin import LiteAdmin  # noqa: PLC0415 - as the full admin below, loaded when chosen

            self._lite_admin = LiteAdmin(lambda: self.slot.table, self.stats, self.readiness, self.access_log)
            self.admin_address = await self._lite_admin.start(admin)
            return
        from router import dashboard  # noqa: PLC0415 - see start_admin_listener
        from router.admin import AdminState  # noqa: PLC0415

        links = dashboard.Links.for_router(self.settings.preview_domain, self.address)
        state = AdminState(lambda: self.slot.table, self.stats, self.readiness, self.access_log, links=links)
        self._admin_runner, self.admin_address = await start_admin_listener(state, admin)

    async def close(self, drain: float | None = None) -> None:
        """Stop accepting, let in-flight exchanges finish for ``drain`` seconds, close all."""
        if self._server is not None:
            self._server.close()
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            self._tls_watch = None
        if self.ctx is not None:
            await self.ctx.drain(self.settings.timeouts.drain if drain is None else drain)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._lite_admin is not None:
            await self._lite_admin.close()
            self._lite_admin = None
        if self.tracer is not None:
            await asyncio.to_thread(self.tracer.shutdown)  # flushes pending spans
        if self.access_log is not None:
            await asyncio.to_thread(self.access_log.close)  # writes the last lines
            self.access_log = None

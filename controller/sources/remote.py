"""The remote source: follow a devstack controller's ``/v1/routes`` stream and republish its tables.

This module owns the subscriber side of the controller feed, so hundreds of routers (sidecars)
need one API-server watch between them instead of one each. It holds one streaming GET open,
rebuilds ``Routes`` from each JSON line with the pure ``routes_from_json``, and reconnects with
backoff when the controller goes away. It never drops the last good table because the controller
is unreachable or sent something invalid: the router keeps serving it, and the staleness is
reported (``connected``, ``last_update``, and an error through ``on_error`` for ``/readyz``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import aiohttp

from controller.backoff import Backoff
from controller.build import BuildError, routes_from_spec
from router.table import Routes

if TYPE_CHECKING:
    from controller.aggregator import Aggregator

log = logging.getLogger("devstack.controller.remote")

__all__ = ["RemoteSettings", "RemoteSource", "feed_url", "remote_source", "routes_from_json"]

ROUTES_PATH = "/v1/routes"


@dataclasses.dataclass(frozen=True, slots=True)
class RemoteSettings:
    """How a router follows the controller."""

    connect_timeout: float = 5.0
    """The controller is in-cluster: a connect slower than this means it is down, not far away."""
    idle_timeout: float = 45.0
    """The controller writes a heartbeat line every 15 s; three missed ones mean a dead connection
    (a controller pod that vanished without closing its sockets), so reconnect."""
    backoff_initial: float = 0.5
    """First delay after a failed reconnect; the first retry after a healthy stream is immediate."""
    backoff_max: float = 30.0
    """Cap: a router must notice a returning controller within half a minute."""
    healthy_after: float = 30.0
    """A stream that stayed up this long proves the controller works; the backoff starts over."""
    max_line_bytes: int = 64 * 1024 * 1024
    """One line is one whole table; beyond this it is a broken stream, not a big cluster."""


def routes_from_json(document: object, *, origin: str = "") -> tuple[int, dict[str, Routes]]:
    """A ``RouteTable.to_json()`` document → (its version, validated ``Routes``); pure.

    The JSON shape is the route file's (``hosts``, ``baseline``, ``overrides`` with ``url``,
    ``ready``, ``expires``, ``fallback``, ``namespace``, ``workload``), so the same validator
    checks both and a controller can never hand a router something a route file could not say.
    """
    if not isinstance(document, Mapping):
        raise BuildError("a route table must be a JSON object", origin=origin)
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BuildError("'version' must be a non-negative integer", origin=origin)
    services = document.get("services")
    if not isinstance(services, Mapping):
        raise BuildError("'services' must be an object", origin=origin)
    return version, routes_from_spec({"services": services}, origin=origin)


def feed_url(base: str, *, since: int | None = None, instance: str | None = None) -> str:
    """``http://controller:9902`` (or a URL already ending in /v1/routes) → the watch URL."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{base!r} is not an http:// URL of a devstack controller")
    path = parts.path.rstrip("/")
    if not path.endswith(ROUTES_PATH):
        path += ROUTES_PATH
    query: dict[str, str] = {"watch": "1"}
    if since is not None:
        query["since"] = str(since)
    if instance is not None:
        query["instance"] = instance
    return urlunsplit((parts.scheme, parts.netloc, path, urlencode(query), ""))


class ControllerUnreachable(ConnectionError):
    """The controller feed is down; the message says since when and what the router still serves."""


SnapshotCallback = Callable[[str, Mapping[str, Routes]], object]
ErrorCallback = Callable[[str, Exception], None]


class RemoteSource:
    """Subscribes to a controller's table stream and publishes each table as a snapshot."""

    name = "remote"

    def __init__(
        self,
        url: str,
        on_snapshot: SnapshotCallback,
        on_error: ErrorCallback,
        *,
        settings: RemoteSettings | None = None,
    ) -> None:
        feed_url(url)  # Validate now: a typo in --routes-from must fail at start, not loop forever.
        self.url = url
        self._on_snapshot = on_snapshot
        self._on_error = on_error
        self.settings = settings or RemoteSettings()
        self.connected = False
        self.last_update: float | None = None
        """Unix time the last table arrived; with ``connected`` False, how stale the router is."""
        self.version: int | None = None
        """The controller's version of the table we serve (the router's aggregator renumbers)."""
        self.instance: str | None = None
        self._services: Mapping[str, Routes] | None = None
        self.disconnected_since: float | None = None

    async def run(self, *, _iterations: int | None = None) -> None:
        """Follow the feed forever (or for ``_iterations`` connections, for tests)."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.settings.connect_timeout, sock_read=self.settings.idle_timeout
        )
        count = 0
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while _iterations is None or count < _iterations:
                count += 1
                started = time.monotonic()
                try:
                    await self._follow(session)
                    reason = "stream closed by the controller"
                except (aiohttp.ClientError, TimeoutError, ValueError, ConnectionError) as exc:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                self.connected = False
                if time.monotonic() - started >= self.settings.healthy_after:
                    backoff.reset()
                self._report_stale(reason)
                if _iterations is None or count < _iterations:
                    await asyncio.sleep(backoff.next_delay())

    def _report_stale(self, reason: str) -> None:
        now = time.time()
        if self.disconnected_since is None:
            self.disconnected_since = now
        serving = (
            f"serving controller table v{self.version} received {now - self.last_update:.0f}s ago"
            if self.last_update is not None and self.version is not None
            else "no table received yet"
        )
        self._on_error(
            self.name,
            ControllerUnreachable(
                f"controller {self.url} unreachable for {now - self.disconnected_since:.0f}s ({reason}); {serving}"
            ),
        )

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        url = feed_url(self.url, since=self.version, instance=self.instance)
        async with session.get(url, headers={"Accept": "application/x-ndjson"}) as response:
            if response.status != 200:
                raise ConnectionError(f"HTTP {response.status} from {url}")
            self.connected = True
            self.disconnected_since = None
            if self._services is not None:
                # Re-affirm the table we hold: clears the staleness error even if nothing changed.
                self._on_snapshot(self.name, self._services)
            async for line in _lines(response.content, self.settings.max_line_bytes):
                self._receive(line)

    def _receive(self, line: bytes) -> None:
        try:
            document: Any = json.loads(line)
            version, services = routes_from_json(document, origin=self.url)
        except (ValueError, BuildError) as exc:
            # Keep the last good table: a bad line from a buggy controller must not blank routing.
            self._on_error(self.name, BuildError(f"rejected table: {exc}", origin=self.url))
            return
        self.version = version
        instance = document.get("instance")
        self.instance = instance if isinstance(instance, str) else None
        self.last_update = time.time()
        self._services = services
        self._on_snapshot(self.name, services)


async def _lines(stream: aiohttp.StreamReader, limit: int) -> AsyncIterator[bytes]:
    """Non-empty lines (blank ones are heartbeats); our own splitter, for tables beyond 64 KiB."""
    buffer = bytearray()
    async for chunk in stream.iter_any():
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", start)) != -1:
            if buffer[start:end].strip():
                yield bytes(buffer[start:end])
            start = end + 1
        del buffer[:start]
        if len(buffer) > limit:
            raise ValueError(f"a table line longer than {limit} bytes")


SourceFactory = Callable[["Aggregator"], Coroutine[Any, Any, None]]


def remote_source(url: str, *, settings: RemoteSettings | None = None) -> SourceFactory:
    """The router's ``--routes-from URL`` source: a coroutine factory feeding an ``Aggregator``."""
    feed_url(url)

    async def run(aggregator: Aggregator) -> None:
        await RemoteSource(url, aggregator.update, aggregator.report_error, settings=settings).run()

    return run

"""The remote source: follow a devstack controller's ``/v1/routes`` stream and republish its tables.

This module owns the subscriber side of the controller feed, so hundreds of routers (sidecars)
need one API-server watch between them instead of one each. It holds one streaming GET open,
rebuilds ``Routes`` from each JSON line with the pure ``routes_from_json``, and reconnects with
backoff when the controller goes away. It never drops the last good table because the controller
is unreachable or sent something invalid: the router keeps serving it, and the staleness is
reported (``connected``, ``last_update``, and an error through ``on_error`` for ``/readyz``).
An outage is logged once when it begins, with the retry schedule, and once when it ends, with
how long it lasted; the retries in between are logged at DEBUG only.
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

from controller.aggregator import SourceDown
from controller.backoff import Backoff
from controller.build import BuildError, routes_from_spec
from router.table import Routes

if TYPE_CHECKING:
    from controller.aggregator import Aggregator

log = logging.getLogger(__name__)

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

    The JSON shape is the route file's (``hosts``, ``baseline``, ``protocol``, ``overrides`` with
    ``url``, ``ready``, ``expires``, ``fallback``, ``namespace``, ``workload``), so the same validator
    checks both and a controller can never hand a router something a route file could not say.
    ``protocol`` is written only for an ``h2c`` service; absent means ``http1``, so tables from
    controllers that predate it read as they always did.
    """
    if not isinstance(document, Mapping):
        raise BuildError("a route table must be a JSON object", origin=origin)
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BuildError("'version' must be a non-negative integer", origin=origin)
    services = document.get("services")
    if not isinstance(services, Mapping):
        raise BuildError("'services' must be an object", origin=origin)
    spec: dict[str, object] = {"services": services}
    if document.get("groups"):
        spec["groups"] = document["groups"]
    return version, routes_from_spec(spec, origin=origin)


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


class ControllerUnreachable(SourceDown, ConnectionError):
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
        on_alive: Callable[[str], object] | None = None,
    ) -> None:
        feed_url(url)  # Validate now: a typo in --routes-from must fail at start, not loop forever.
        self.url = url
        self._on_snapshot = on_snapshot
        self._on_error = on_error
        self._on_alive = on_alive
        """Told of every chunk the feed sends, heartbeats included: the routes still hold."""
        self.settings = settings or RemoteSettings()
        self.connected = False
        self.last_update: float | None = None
        """Unix time the last table arrived; with ``connected`` False, how stale the router is."""
        self.version: int | None = None
        """The controller's version of the table we serve (the router's aggregator renumbers)."""
        self.instance: str | None = None
        self._services: Mapping[str, Routes] | None = None
        self.disconnected_since: float | None = None
        self.failures = 0
        """Failed connections in the current outage (0 while connected)."""
        self._outage_began: float | None = None  # monotonic: the outage's length survives clock steps
        self._ever_connected = False

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
                delay = backoff.next_delay()
                self._report_stale(reason)
                self._log_failure(reason, delay)
                if _iterations is None or count < _iterations:
                    await asyncio.sleep(delay)

    def _log_failure(self, reason: str, delay: float) -> None:
        """WARNING once per outage, with the retry schedule; DEBUG for each retry after that."""
        self.failures += 1
        if self.failures == 1:
            self._outage_began = time.monotonic()
            log.warning(
                "controller feed %s down (%s); %s; retrying %s, backing off to %gs "
                "(further failures are logged at DEBUG until it is back)",
                self.url,
                reason,
                self._serving(time.time()),
                f"in {round(delay, 2):g}s" if delay else "at once",
                self.settings.backoff_max,
            )
            return
        log.debug(
            "controller feed %s still down after %.1fs (attempt %d: %s); retrying in %gs",
            self.url,
            self._outage_seconds(),
            self.failures,
            reason,
            round(delay, 2),
        )

    def _outage_seconds(self) -> float:
        return 0.0 if self._outage_began is None else time.monotonic() - self._outage_began

    def _log_connected(self) -> None:
        if self.failures:
            log.info(
                "controller feed %s back after %.1fs down (%d failed attempt%s)",
                self.url,
                self._outage_seconds(),
                self.failures,
                "" if self.failures == 1 else "s",
            )
        elif not self._ever_connected:
            log.info("following controller feed %s", self.url)
        self._ever_connected = True
        self.failures = 0
        self._outage_began = None

    def _serving(self, now: float) -> str:
        if self.last_update is not None and self.version is not None:
            return f"serving controller table v{self.version} received {now - self.last_update:.0f}s ago"
        return "no table received yet"

    def _report_stale(self, reason: str) -> None:
        now = time.time()
        if self.disconnected_since is None:
            self.disconnected_since = now
        self._on_error(
            self.name,
            ControllerUnreachable(
                f"controller {self.url} unreachable for {now - self.disconnected_since:.0f}s ({reason}); "
                f"{self._serving(now)}"
            ),
        )

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        url = feed_url(self.url, since=self.version, instance=self.instance)
        async with session.get(url, headers={"Accept": "application/x-ndjson"}) as response:
            if response.status != 200:
                raise ConnectionError(f"HTTP {response.status} from {url}")
            self.connected = True
            self.disconnected_since = None
            self._log_connected()
            if self._services is not None:
                # Re-affirm the table we hold: clears the staleness error even if nothing changed.
                self._on_snapshot(self.name, self._services)
            alive = self._on_alive
            async for line in _lines(response.content, self.settings.max_line_bytes, alive, self.name):
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


async def _lines(
    stream: aiohttp.StreamReader, limit: int, alive: Callable[[str], object] | None = None, name: str = ""
) -> AsyncIterator[bytes]:
    """Non-empty lines (blank ones are heartbeats); our own splitter, for tables beyond 64 KiB.
    ``alive(name)`` hears of every chunk, so a heartbeat counts as the feed confirming its table."""
    buffer = bytearray()
    async for chunk in stream.iter_any():
        if alive is not None:
            alive(name)
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
        await RemoteSource(
            url, aggregator.update, aggregator.report_error, settings=settings, on_alive=aggregator.confirm
        ).run()

    return run

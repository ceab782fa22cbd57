"""The remote source: follow a devstack controller's route feed and republish its tables.

This module owns the subscriber side of the controller feed, so hundreds of routers (sidecars)
need one API-server watch between them instead of one each. It holds one streaming GET open
(through a ``FeedTransport``: by default ``controller.sources.feedhttp``'s plain-asyncio client,
so a sidecar loads no HTTP client library):
``/v2/routes`` (a snapshot, then deltas applied with ``RouteTable.with_changes``, so a one-service
change rebuilds one service and shares every other ``Routes`` object), or ``/v1/routes`` (whole
tables, rebuilt with the pure ``routes_from_json``) from a controller without ``/v2``. It
reconnects with backoff when the controller goes away. A delta is applied only to the version it
says it starts from; any other delta makes it resubscribe for a snapshot, never guess. It never
drops the last good table because the controller is unreachable or sent something invalid: the
router keeps serving it, and the staleness is reported (``connected``, ``last_update``, and an
error through ``on_error`` for ``/readyz``). An outage is logged once when it begins, with the
retry schedule, and once when it ends, with how long it lasted; the retries in between are logged
at DEBUG only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlencode, urlsplit, urlunsplit

from controller.aggregator import SourceDown
from controller.backoff import Backoff
from controller.build import BuildError, routes_from_spec, table_fields, table_spec
from controller.snapshot import decode_line, table_from_json
from controller.sources.feedhttp import FeedClient, FeedResponse, FeedTransport
from router.scope import RouteScope
from router.table import Routes, RouteTable, TableError

if TYPE_CHECKING:
    from controller.aggregator import Aggregator

log = logging.getLogger(__name__)

__all__ = [
    "DELTA_PATH",
    "ROUTES_PATH",
    "RemoteSettings",
    "RemoteSource",
    "apply_delta",
    "feed_url",
    "pinned_path",
    "remote_source",
    "routes_from_json",
]

ROUTES_PATH = "/v1/routes"
"""Whole tables, one per line: what every controller offers."""
DELTA_PATH = "/v2/routes"
"""A snapshot, then deltas (``controller.feed``): what a router follows when the controller offers it."""
FEED_HEADERS: Final = {"Accept": "application/x-ndjson"}
MAX_SCOPE_QUERY: Final = 6000
"""Bytes of ``services=`` a subscription carries at most (the controller reads request lines of
8 KiB): a scope beyond that is most of the cluster, so the router follows everything instead."""


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
    version, spec = table_spec(document, origin=origin)
    return version, routes_from_spec(spec, origin=origin)


def pinned_path(base: str) -> str | None:
    """The feed a ``--routes-from`` URL names explicitly (``…/v1/routes`` or ``…/v2/routes``), if any:
    an operator who wrote the path gets that feed only; a bare controller URL tries /v2, then /v1."""
    path = urlsplit(base).path.rstrip("/")
    return next((feed for feed in (ROUTES_PATH, DELTA_PATH) if path.endswith(feed)), None)


def feed_url(
    base: str,
    *,
    since: int | None = None,
    instance: str | None = None,
    path: str | None = None,
    services: Iterable[str] | None = None,
) -> str:
    """``http://controller:9902`` (or a URL already ending in a feed's path) → the watch URL of
    ``path`` (default: the one the URL names, else /v1/routes); ``services`` scopes a /v2 feed."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"{base!r} is not an http:// URL of a devstack controller")
    root = parts.path.rstrip("/")
    named = pinned_path(base)
    if named is not None:
        root = root.removesuffix(named)
    feed = path or named or ROUTES_PATH
    # /v2 is always a stream; /v1 streams only with watch=1.
    query: dict[str, str] = {"watch": "1"} if feed == ROUTES_PATH else {}
    if since is not None:
        query["since"] = str(since)
    if instance is not None:
        query["instance"] = instance
    if services is not None and feed == DELTA_PATH:
        query["services"] = ",".join(sorted(services))
    return urlunsplit((parts.scheme, parts.netloc, root + feed, urlencode(query), ""))


class ControllerUnreachable(SourceDown, ConnectionError):
    """The controller feed is down; the message says since when and what the router still serves."""


class _Resubscribe(Exception):
    """The feed sent a line this router cannot apply to what it holds: subscribe again for a snapshot."""


def apply_delta(
    table: RouteTable,
    groups: Mapping[str, object],
    document: Mapping[str, Any],
    *,
    origin: str = "",
    scoped: bool = False,
) -> tuple[RouteTable, dict[str, object]]:
    """A /v2 delta applied to ``table`` (whose route groups, as the feed wrote them, are ``groups``)
    → the new table and its groups; pure. Only the services the delta sets are built; every other
    ``Routes`` is shared with ``table``, unless the route groups changed, which every service
    carries. Raises BuildError for a delta that is invalid or does not fit ``table``. A ``scoped``
    subscriber's delta may remove services it never held (``controller.feed``): those are skipped.
    """
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version <= table.version:
        raise BuildError(f"'version' must be an integer above v{table.version}", origin=origin)
    sources, new_groups = table_fields(document, origin=origin)
    changed_raw = document.get("set", {})
    removed = document.get("removed", [])
    if not isinstance(changed_raw, Mapping):
        raise BuildError("'set' must be an object", origin=origin)
    if not isinstance(removed, list) or not all(isinstance(name, str) for name in removed):
        raise BuildError("'removed' must be a list of service names", origin=origin)
    if scoped:
        removed = [name for name in removed if name in table.services]
    spec: dict[str, object] = {"services": changed_raw}
    if new_groups:
        spec["groups"] = new_groups
    changed: dict[str, Routes] = routes_from_spec(spec, origin=origin)
    try:
        if new_groups != groups:
            # Rare (a route group edited): each service resolves groups itself, so each is rebuilt.
            regrouped = {group: tuple(keys) for group, keys in new_groups.items() if isinstance(keys, list)}
            for name, routes in table.services.items():
                if name not in changed and name not in removed:
                    changed[name] = dataclasses.replace(routes, groups=regrouped)
        return table.with_changes(changed, removed, version=version, sources=sources), new_groups
    except TableError as exc:
        raise BuildError(str(exc), origin=origin) from None


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
        transport: FeedTransport | None = None,
        scope: RouteScope | None = None,
    ) -> None:
        feed_url(url)  # Validate now: a typo in --routes-from must fail at start, not loop forever.
        self.url = url
        self._on_snapshot = on_snapshot
        self._on_error = on_error
        self._on_alive = on_alive
        """Told of every chunk the feed sends, heartbeats included: the routes still hold."""
        self.settings = settings or RemoteSettings()
        self.transport: FeedTransport = transport or FeedClient(
            connect_timeout=self.settings.connect_timeout, idle_timeout=self.settings.idle_timeout
        )
        """How each GET is made; the default speaks HTTP/1.1 itself (``feedhttp``)."""
        self.connected = False
        self.last_update: float | None = None
        """Unix time the last table arrived; with ``connected`` False, how stale the router is."""
        self.version: int | None = None
        """The controller's version of the table we serve (the router's aggregator renumbers)."""
        self.instance: str | None = None
        self._services: Mapping[str, Routes] | None = None
        self.table: RouteTable | None = None
        """The controller's table as this router holds it (the controller's version, sources and
        services): what the next /v2 delta applies to. None until a first table arrives."""
        self._groups: dict[str, object] = {}
        """``table``'s route groups as the feed wrote them: a delta carrying others regroups every service."""
        self._synced = False
        """True while ``table`` is exactly the controller's ``version``, so a resubscription may ask
        for a delta from it; False after a line was rejected or did not fit, so it asks for a snapshot."""
        self.feed_path: str | None = None
        """The feed the current (or last) connection follows: /v2/routes, or /v1/routes."""
        self.disconnected_since: float | None = None
        self.failures = 0
        """Failed connections in the current outage (0 while connected)."""
        self._outage_began: float | None = None  # monotonic: the outage's length survives clock steps
        self._ever_connected = False
        self._lines_on_subscription = 0
        self.scope = scope
        """Follow only the services these names cover (None: the whole table)."""
        self._subscribed: frozenset[str] | None = None
        """The scope the current subscription asked for (None: unscoped)."""
        self._held_scope: frozenset[str] | None = None
        """The scope ``table`` was subscribed with: a delta from it may be asked for only with the same."""
        self._grown = asyncio.Event()
        if scope is not None:
            scope.on_grow = self._grown.set

    async def run(self, *, _iterations: int | None = None) -> None:
        """Follow the feed forever (or for ``_iterations`` connections, for tests)."""
        backoff = Backoff(self.settings.backoff_initial, self.settings.backoff_max)
        count = 0
        while _iterations is None or count < _iterations:
            count += 1
            started = time.monotonic()
            try:
                if not await self._follow_until_grown():
                    count -= 1  # not a failure: the same connection, asked again with more names
                    continue
                reason = "stream closed by the controller"
            # OSError covers refused and reset connections, DNS and TLS failures; TimeoutError a
            # silent controller; ValueError a malformed response or line.
            except (OSError, TimeoutError, ValueError) as exc:
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

    async def _follow_until_grown(self) -> bool:
        """Follow until the stream ends (True) or the scope grows (False: subscribe again at once)."""
        if self.scope is None:
            await self._follow()
            return True
        self._grown.clear()
        follow = asyncio.ensure_future(self._follow())
        grown = asyncio.ensure_future(self._grown.wait())
        try:
            await asyncio.wait((follow, grown), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            follow.cancel()
            raise
        finally:
            grown.cancel()
        if follow.done():
            follow.result()  # the stream's own end, or its error
            return True
        follow.cancel()
        try:
            await follow
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # we are being cancelled ourselves, not just the stream we gave up
        except (OSError, TimeoutError, ValueError):
            pass  # it failed while we were leaving it anyway
        return False

    async def _follow(self) -> None:
        """Follow one connection; resubscribe at once (for a snapshot) when a /v2 line does not fit
        what we hold, unless it was the subscription's first line (then the controller is broken,
        and the caller's backoff applies)."""
        while True:
            try:
                await self._subscribe()
                return
            except _Resubscribe as exc:
                if self._lines_on_subscription <= 1:
                    raise ValueError(str(exc)) from None
                log.warning("controller feed %s: %s; subscribing again for a snapshot", self.url, exc)
                self._synced = False

    async def _subscribe(self) -> None:
        pinned = pinned_path(self.url)
        path = pinned or DELTA_PATH
        # A /v1 table's version is a /v2 version too (one controller, one numbering): either feed
        # may continue from what the other delivered.
        scope = self._scope_query() if path == DELTA_PATH else None
        self._subscribed = scope
        # A delta fits only the scope the held table came with: a grown scope starts from a snapshot.
        synced = self._synced and scope == self._held_scope
        since, instance = (self.version, self.instance) if synced else (None, None)
        url = feed_url(self.url, since=since, instance=instance, path=path, services=scope)
        self._lines_on_subscription = 0
        async with self.transport.get(url, FEED_HEADERS) as response:
            if response.status != 404 or pinned is not None:
                await self._read(response, url, path)
                return
        # A controller that predates /v2; asked again on every new connection, so a router
        # starts following deltas once the controller is upgraded.
        path = ROUTES_PATH
        url = feed_url(self.url, since=self.version, instance=self.instance, path=path)
        async with self.transport.get(url, FEED_HEADERS) as fallback:
            await self._read(fallback, url, path)

    def _scope_query(self) -> frozenset[str] | None:
        """The names this subscription asks for; None (everything) when there is no scope or it
        has grown past what one request line carries."""
        if self.scope is None:
            return None
        names = frozenset(self.scope.names)
        if sum(len(name) + 1 for name in names) > MAX_SCOPE_QUERY:
            if self._subscribed is not None or self.version is None:
                log.warning("controller feed %s: %d scoped names; following every service", self.url, len(names))
            return None
        return names

    async def _read(self, response: FeedResponse, url: str, path: str) -> None:
        if response.status != 200:
            raise ConnectionError(f"HTTP {response.status} from {url}")
        if path != self.feed_path:
            fallback = path == ROUTES_PATH and pinned_path(self.url) is None
            log.log(
                logging.INFO if fallback else logging.DEBUG,
                "controller feed %s: following %s%s",
                self.url,
                path,
                f" (the controller has no {DELTA_PATH})" if fallback else "",
            )
            self.feed_path = path
        self.connected = True
        self.disconnected_since = None
        self._log_connected()
        if self._services is not None:
            # Re-affirm the table we hold: clears the staleness error even if nothing changed.
            self._on_snapshot(self.name, self._services)
        alive = self._on_alive
        async for line in _lines(response.body(), self.settings.max_line_bytes, alive, self.name):
            self._lines_on_subscription += 1
            if path == ROUTES_PATH:
                self._receive(line)
            else:
                await self._receive_v2(line)

    def _receive(self, line: bytes) -> None:
        """A /v1 line: a whole table."""
        try:
            document: Any = json.loads(line)
            version, services = routes_from_json(document, origin=self.url)
            sources, groups = table_fields(document, origin=self.url)
            table = RouteTable(services, version, sources)
        except (ValueError, BuildError) as exc:
            # Keep the last good table: a bad line from a buggy controller must not blank routing.
            self._on_error(self.name, BuildError(f"rejected table: {exc}", origin=self.url))
            return
        self._accept(table, groups, document)

    async def _receive_v2(self, line: bytes) -> None:
        """A /v2 line: a snapshot, or a delta applied to the table we hold if it starts from it. A
        large line is decoded, and a snapshot built, in slices (``controller.snapshot``): requests
        keep being served from the table we hold meanwhile."""
        try:
            document: Any = await decode_line(line)
            if not isinstance(document, Mapping):
                raise BuildError("a feed line must be a JSON object", origin=self.url)
            kind = document.get("kind")
            if kind == "snapshot":
                table, groups = await table_from_json(document, origin=self.url)
            elif kind == "delta":
                start = document.get("from")
                held = self.table if self._synced else None
                if held is None or start != self.version or document.get("instance") != self.instance:
                    raise _Resubscribe(
                        f"a delta from v{start} of {document.get('instance')}, but this router holds "
                        + (f"v{self.version} of {self.instance}" if held is not None else "no usable table")
                    )
                table, groups = apply_delta(
                    held, self._groups, document, origin=self.url, scoped=self._held_scope is not None
                )
            else:
                raise BuildError(f"unknown line kind {kind!r}", origin=self.url)
        except (ValueError, BuildError, TableError) as exc:
            # Keep the last good table; later deltas cannot apply to it, so the next one resubscribes.
            self._synced = False
            self._on_error(self.name, BuildError(f"rejected table: {exc}", origin=self.url))
            return
        self._accept(table, groups, document)

    def _accept(self, table: RouteTable, groups: dict[str, object], document: Mapping[str, Any]) -> None:
        self._held_scope = self._subscribed
        self.table = table
        self._groups = groups
        self._synced = True
        self.version = table.version
        instance = document.get("instance")
        self.instance = instance if isinstance(instance, str) else None
        self.last_update = time.time()
        self._services = table.services
        self._on_snapshot(self.name, table.services)
        if self.scope is not None and self._lines_on_subscription == 1:
            # The subscription's first line answers for every name it asked with. Applied (and
            # published) first: a request resumed now finds the routes, or their absence.
            self.scope.answer(self.scope.names if self._subscribed is None else self._subscribed)


async def _lines(
    stream: AsyncIterable[bytes], limit: int, alive: Callable[[str], object] | None = None, name: str = ""
) -> AsyncIterator[bytes]:
    """Non-empty lines (blank ones are heartbeats); our own splitter, for tables beyond 64 KiB.
    ``alive(name)`` hears of every chunk, so a heartbeat counts as the feed confirming its table."""
    buffer = bytearray()
    async for chunk in stream:
        if alive is not None:
            alive(name)
        # Only the new bytes can hold the next newline: searching the whole buffer on every read
        # made a 15 MB snapshot line cost a quarter of a second in searches alone.
        searched = len(buffer)
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", searched)) != -1:
            if buffer[start:end].strip():
                yield bytes(buffer[start:end])
            start = searched = end + 1
        del buffer[:start]
        if len(buffer) > limit:
            raise ValueError(f"a table line longer than {limit} bytes")


SourceFactory = Callable[["Aggregator"], Coroutine[Any, Any, None]]


def remote_source(
    url: str, *, settings: RemoteSettings | None = None, scope: RouteScope | None = None
) -> SourceFactory:
    """The router's ``--routes-from URL`` source: a coroutine factory feeding an ``Aggregator``;
    with ``scope``, following only the services its names cover."""
    feed_url(url)

    async def run(aggregator: Aggregator) -> None:
        await RemoteSource(
            url,
            aggregator.update,
            aggregator.report_error,
            settings=settings,
            on_alive=aggregator.confirm,
            scope=scope,
        ).run()

    return run

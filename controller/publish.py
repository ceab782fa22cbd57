"""Serves the controller's current route table: ``GET /v1/routes``, long-poll and NDJSON stream, and
the delta feed ``GET /v2/routes`` whose lines ``controller.feed`` encodes.

This module owns the wire format routers subscribe to (one ``RouteTable.to_json()`` document per
line, plus the controller's ``instance`` and status), the HTTP side of the delta feed, the
controller's health endpoints (``/healthz``, ``/readyz``, ``/metrics``), and the dashboard page at
``/`` (rendered by the pure ``router.dashboard``, live through ``/dashboard/events``). It only
reads the latest published table and status;
it never builds or changes a table, and never queues tables for a slow subscriber: each stream
sends the newest table (or on ``/v2``, one delta to it) when it can, skipping any it was too slow
to see (level-triggered).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import json
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.feed import HEARTBEAT, GzipFraming, RouteFeed
from router import dashboard
from router.table import EMPTY_TABLE, RouteTable

__all__ = ["PublishSettings", "RoutePublisher", "make_publish_app"]

ReadinessCheck = Callable[[], tuple[bool, dict[str, Any]]]
StatusCallback = Callable[[], Mapping[str, object]]


@dataclasses.dataclass(frozen=True, slots=True)
class PublishSettings:
    heartbeat: float = 15.0
    """An empty line this often on idle streams, so subscribers can tell a quiet controller from a
    dead connection (their idle timeout is three heartbeats) and proxies do not reap the stream."""
    long_poll_max: float = 60.0
    """Longest a ``?since=`` request (without ``watch``) is held before answering with the current table."""
    dashboard_tick: float = 5.0
    """Seconds between dashboard updates while the table stays the same (times left, source ages)."""


class RoutePublisher:
    """The latest table and a wake-up for everyone waiting on a newer one."""

    def __init__(self) -> None:
        self.table: RouteTable = EMPTY_TABLE
        self.instance = secrets.token_hex(8)
        """Changes on every controller start: a subscriber's ``since`` from another run means nothing."""
        self.closed = False
        self.subscribers = 0
        self._changed = asyncio.Event()
        self._encoded_for: RouteTable | None = None
        self._encoded = b""
        self._gzipped = b""
        self.serializations = 0
        """Tables encoded so far: one per version however many subscribers follow the feed."""
        self.feed = RouteFeed(self.instance)
        """``/v2/routes``: the history of changes and each version's lines, encoded once."""
        self.feed_streams: set[asyncio.Transport] = set()
        """Open ``/v2/routes`` streams' connections, for what they hold unsent (a metric)."""

    def feed_buffered(self) -> int:
        """The most bytes any ``/v2`` stream holds in user space unsent: bounded by about one line
        however slow its reader, because each stream writes only after its last write drained."""
        return max((transport.get_write_buffer_size() for transport in self.feed_streams), default=0)

    def encoded(self, status: StatusCallback) -> bytes:
        """The current table as one JSON line, encoded once per table and shared by every
        subscriber and request (a 10,000-service table takes a second or more to encode)."""
        table = self.table
        if self._encoded_for is not table:
            document = _document(self, table, status)
            self._encoded = (json.dumps(document, separators=(",", ":")) + "\n").encode()
            self._gzipped = b""
            self._encoded_for = table
            self.serializations += 1
        return self._encoded

    def gzipped(self, status: StatusCallback) -> bytes:
        """``encoded``, gzip-compressed once per table for clients that accept it (route tables
        compress about 90x: host names and URLs repeat)."""
        body = self.encoded(status)
        if not self._gzipped:
            self._gzipped = gzip.compress(body, compresslevel=6)
        return self._gzipped

    def publish(self, table: RouteTable) -> None:
        """The aggregator's publish callback: make ``table`` current and wake every waiter."""
        self.table = table
        self.feed.publish(table)
        self._wake()

    def close(self) -> None:
        """End every stream (server shutdown), so none holds the process open."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        # A fresh event per generation: waiters of the old one all wake, later waiters wait anew.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_change(self, version: int, timeout: float) -> bool:
        """True once the table is no longer ``version`` (or we are closing), False after ``timeout``."""
        if self.table.version != version or self.closed:
            return True
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _document(publisher: RoutePublisher, table: RouteTable, status: StatusCallback) -> dict[str, object]:
    return {**table.to_json(), "instance": publisher.instance, **status()}


class _ControllerCollector(Collector):
    def __init__(self, publisher: RoutePublisher, status: StatusCallback) -> None:
        self._publisher = publisher
        self._status = status

    def collect(self) -> Iterator[Metric]:
        table = self._publisher.table
        status = self._status()
        yield GaugeMetricFamily(
            "devstack_controller_route_table_version", "Version of the published table.", table.version
        )
        yield GaugeMetricFamily("devstack_controller_services", "Services in the published table.", len(table.services))
        overrides = sum(len(r.overrides) for r in table.services.values())
        yield GaugeMetricFamily("devstack_controller_overrides", "Overrides in the published table.", overrides)
        yield GaugeMetricFamily(
            "devstack_controller_subscribers", "Open /v1/routes streams.", self._publisher.subscribers
        )
        yield GaugeMetricFamily(
            "devstack_controller_feed_subscribers", "Open /v2/routes streams.", len(self._publisher.feed_streams)
        )
        yield GaugeMetricFamily(
            "devstack_controller_feed_buffered_bytes",
            "Most bytes any /v2/routes stream holds unsent in the controller (about one line at most).",
            self._publisher.feed_buffered(),
        )
        for key, help_text in (
            ("conflicts", "Conflicting Deployments or route groups (none of the claimants is routed)."),
            ("invalid", "Labelled Deployments and route-group ConfigMaps that cannot be routed."),
            ("expired", "Overrides past their expiry still present in the cluster."),
        ):
            entries = status.get(key)
            yield GaugeMetricFamily(
                f"devstack_controller_{key}", help_text, len(entries) if isinstance(entries, list) else 0
            )
        leaks = status.get("leaks")
        leak_list = leaks if isinstance(leaks, list) else []
        yield GaugeMetricFamily(
            "devstack_controller_leaking_overrides",
            "Overrides whose pods the baseline Service also selects.",
            len(leak_list),
        )
        per_leak = GaugeMetricFamily(
            "devstack_controller_override_leak",
            "1 for each override whose pods the baseline Service selects.",
            labels=["service", "key", "namespace", "deployment"],
        )
        for leak in leak_list:
            if isinstance(leak, Mapping):
                per_leak.add_metric([str(leak.get(k, "")) for k in ("service", "key", "namespace", "deployment")], 1)
        yield per_leak
        watches = status.get("watches")
        connected = GaugeMetricFamily(
            "devstack_controller_watch_connected", "1 while the collection's watch is open.", labels=["collection"]
        )
        if isinstance(watches, Mapping):
            for name, state in sorted(watches.items()):
                if isinstance(state, Mapping):
                    connected.add_metric([str(name)], 1 if state.get("connected") else 0)
        yield connected


def _scope(raw: str | None) -> frozenset[str] | None:
    """``?services=`` → the scope (names lowercased, as hosts are matched; empty for a sidecar that
    has seen no request yet, which still follows the version), None for no scope."""
    if raw is None:
        return None
    # No count limit of its own: the request line (8 KiB in aiohttp) bounds a scope's size.
    return frozenset(name.strip().lower() for name in raw.split(",") if name.strip())


def _problems(status: Mapping[str, object]) -> list[str]:
    """The Kubernetes source's conflicts, unusable Deployments and ConfigMaps, leaks, expired overrides and
    disconnected watches, one line each, for the dashboard's warning banner."""
    lines: list[str] = []
    for key in ("conflicts", "invalid"):
        entries = status.get(key)
        if isinstance(entries, list):
            lines += [str(entry) for entry in entries]
    leaks = status.get("leaks")
    for leak in leaks if isinstance(leaks, list) else []:
        if isinstance(leak, Mapping):
            lines.append(
                f"leak: override {leak.get('service')}/{leak.get('key')} ({leak.get('namespace')}/"
                f"{leak.get('deployment')}): the baseline Service selects its pods"
            )
    expired = status.get("expired")
    for entry in expired if isinstance(expired, list) else []:
        if isinstance(entry, Mapping):
            lines.append(
                f"expired override still deployed: {entry.get('service')}/{entry.get('key')} "
                f"({entry.get('namespace')}/{entry.get('deployment')})"
            )
    watches = status.get("watches")
    if isinstance(watches, Mapping):
        for name, watch in sorted(watches.items()):
            if isinstance(watch, Mapping) and not watch.get("connected"):
                error = watch.get("last_error")
                lines.append(f"watch {name} disconnected" + (f": {error}" if error else ""))
    return lines


_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": dashboard.CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def make_publish_app(
    publisher: RoutePublisher,
    *,
    readiness: ReadinessCheck,
    status: StatusCallback = dict,
    settings: PublishSettings | None = None,
    links: dashboard.Links | None = None,
    confirmed: Mapping[str, float] | None = None,
    failures: Mapping[str, int] | None = None,
) -> web.Application:
    """``/v1/routes`` (plain, ``?since=`` long-poll, ``?watch=1&since=`` stream), ``/v2/routes``
    (``?since=&instance=``: a snapshot or a delta, then deltas), health endpoints and the dashboard.

    The dashboard's preview links need ``links`` (the ingress's preview domain and port; without
    it they are left out); ``confirmed`` and ``failures`` are the aggregator's per-source
    confirmation times (``time.monotonic``) and failure counts, shown as the sources' freshness.
    """
    settings = settings or PublishSettings()
    page_links = links or dashboard.Links()
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_ControllerCollector(publisher, status))

    def floor(since: int | None, instance: str | None) -> int:
        """The version a subscriber already holds: it is sent only tables newer than this.

        ``since`` from another controller run (another ``instance``, or newer than anything we
        published) is meaningless, so such a subscriber gets the current table at once.
        """
        foreign = (instance is not None and instance != publisher.instance) or (
            since is not None and since > publisher.table.version
        )
        # Version 0 is the empty table before the first snapshot: never worth sending.
        return 0 if since is None or foreign else max(0, since)

    async def routes(request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query["since"]) if "since" in request.query else None
        except ValueError:
            return web.json_response({"error": "since must be an integer version"}, status=400)
        instance = request.query.get("instance")
        if request.query.get("watch") in ("1", "true"):
            return await stream(request, since, instance)
        if since is not None:
            held = floor(since, instance)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + settings.long_poll_max
            while publisher.table.version <= held and not publisher.closed and loop.time() < deadline:
                await publisher.wait_change(publisher.table.version, deadline - loop.time())
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            headers = {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
            return web.Response(body=publisher.gzipped(status), content_type="application/json", headers=headers)
        return web.Response(body=publisher.encoded(status), content_type="application/json")

    async def stream(request: web.Request, since: int | None, instance: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"})
        await response.prepare(request)
        held = floor(since, instance)
        publisher.subscribers += 1
        try:
            while not publisher.closed:
                table = publisher.table
                if table.version > held:
                    await response.write(publisher.encoded(status))  # the same bytes for every subscriber
                    held = table.version
                if not await publisher.wait_change(table.version, settings.heartbeat):
                    await response.write(b"\n")
        except ConnectionResetError:
            pass  # The subscriber went away; nothing to clean up beyond the counter.
        finally:
            publisher.subscribers -= 1
        return response

    async def delta_stream(request: web.Request) -> web.StreamResponse:
        """``/v2/routes``: a snapshot unless the subscriber's (instance, since) is remembered, then one
        line per wake-up bringing it from what it holds to the current version (a delta spanning
        every version it was too slow to see), heartbeats when idle; gzip as shared segments.
        ``services=a,b`` scopes the stream to the services those names cover."""
        try:
            since = int(request.query["since"]) if "since" in request.query else None
        except ValueError:
            return web.json_response({"error": "since must be an integer version"}, status=400)
        scope = _scope(request.query.get("services"))
        feed = publisher.feed
        held = since if feed.remembers(request.query.get("instance"), since) else None
        framing = GzipFraming() if "gzip" in request.headers.get("Accept-Encoding", "") else None
        headers = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-store"}
        if framing is not None:
            headers |= {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        transport = request.transport
        if transport is not None:
            publisher.feed_streams.add(transport)
        try:
            while not publisher.closed:
                version = feed.version
                if version > 0 and held != version:  # version 0 is the empty table before the first snapshot
                    frame = feed.frame(held, scope)
                    # Awaited: the next line is chosen only after this one drained, so however slow the
                    # reader, the stream holds one line and the next skips to the newest version.
                    await response.write(frame.line if framing is None else framing.wrap(frame))
                    held = frame.version
                if not await publisher.wait_change(version, settings.heartbeat):
                    await response.write(HEARTBEAT.line if framing is None else framing.wrap(HEARTBEAT))
            if framing is not None:
                await response.write(framing.trailer())  # a whole gzip stream, CRC and length included
        except ConnectionResetError:
            pass  # The subscriber went away.
        finally:
            if transport is not None:
                publisher.feed_streams.discard(transport)
        return response

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        ready, detail = readiness()
        body = {"ready": ready, "version": publisher.table.version, **detail}
        return web.json_response(body, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

    def snapshot() -> dashboard.Snapshot:
        table = publisher.table
        ready, detail = readiness()
        extra = status()
        sources = dashboard.sources_from(table.sources, confirmed, failures, detail.get("errors"), time.monotonic())
        return dashboard.Snapshot(
            table, time.time(), "controller", page_links, None, sources, ready, _problems(extra), "v1/routes"
        )

    async def page(request: web.Request) -> web.Response:
        html = dashboard.render_page(
            snapshot(), query=request.query.get("q", ""), status=request.query.get("status", "")
        )
        response = web.Response(text=html, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)
        response.enable_compression()  # a few hundred overrides: about 300 KiB of HTML, 10x smaller compressed
        return response

    async def events(request: web.Request) -> web.StreamResponse:
        """The dashboard's server-sent events: at once when a table is published, and every
        ``dashboard_tick`` for times left and source ages; only what changed for this stream."""
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )
        await response.prepare(request)
        await response.write(b"retry: 3000\n\n")
        sent: dict[str, str] = {}
        try:
            while not publisher.closed:
                snap = snapshot()
                await response.write(dashboard.event(dashboard.fragments(snap), sent, snap.now))
                await publisher.wait_change(snap.table.version, settings.dashboard_tick)
        except ConnectionResetError:
            pass  # The page went away.
        return response

    async def on_shutdown(_: web.Application) -> None:
        publisher.close()

    app = web.Application()
    app.router.add_get("/", page)
    app.router.add_get("/dashboard/events", events)
    app.router.add_get("/v1/routes", routes)
    app.router.add_get("/v2/routes", delta_stream)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(on_shutdown)
    return app

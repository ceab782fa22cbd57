"""The admin listener: health, readiness, Prometheus metrics and the route table, over aiohttp.

This module only reads router state (the table slot, counters, readiness callbacks) and
renders it; it never changes routing and never runs on the proxy listener, so a scrape or a
big ``/routes`` answer cannot slow the hot path's accept queue. ``/`` is the dashboard page
(``router.dashboard`` renders it) and ``/dashboard/events`` its live updates.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any, Final

from aiohttp import web
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

import router
from router import dashboard
from router.accesslog import AccessLog
from router.keys import is_valid_key
from router.liteadmin import cumulative_buckets, router_families
from router.stats import RouterStats
from router.table import RouteTable

__all__ = ["ADMIN_STATE", "AdminState", "make_admin_app"]

ReadinessCheck = Callable[[], tuple[bool, dict[str, Any]]]

DASHBOARD_TICK: Final = 5.0
"""Seconds between dashboard updates while the table stays the same (counters, times left)."""
DASHBOARD_POLL: Final = 0.25
"""Seconds between looks at the table version: a new table reaches open dashboards this fast."""


class AdminState:
    """What the admin endpoints read; the CLI fills it in."""

    def __init__(
        self,
        table: Callable[[], RouteTable],
        stats: RouterStats,
        readiness: ReadinessCheck,
        access_log: AccessLog | None = None,
        links: dashboard.Links | None = None,
        *,
        refresh: Callable[[], Awaitable[None]] | None = None,
        collectors: Sequence[Collector] = (),
    ) -> None:
        self.table = table
        self.stats = stats
        """Read afresh at every scrape, so ``refresh`` may replace it."""
        self.readiness = readiness
        self.access_log = access_log
        self.links = links or dashboard.Links()
        """How the dashboard links to previews and to "use this key": give
        ``dashboard.Links.for_router(settings.preview_domain, proxy_address)``."""
        self.refresh = refresh
        """Awaited before ``/metrics`` and the dashboard read ``stats``: counters kept elsewhere
        (``router.workers`` gathers its worker processes' here) are brought in only when asked."""
        self.collectors = collectors
        """More metric families for ``/metrics`` (the worker pool's per-worker ones)."""

    async def refreshed(self) -> None:
        if self.refresh is not None:
            await self.refresh()

    def snapshot(self) -> dashboard.Snapshot:
        """What the dashboard shows now."""
        table = self.table()
        ready, detail = self.readiness()
        stats = self.stats
        sources = dashboard.sources_from(
            table.sources, stats.source_confirmed, stats.table_failures, detail.get("errors"), time.monotonic()
        )
        return dashboard.Snapshot(
            table, time.time(), "router", self.links, stats.requests, sources, ready, json_path="routes"
        )


ADMIN_STATE: Final = web.AppKey("admin_state", AdminState)
"""The admin app's ``AdminState``, for code that holds only the app."""


class _RouterCollector(Collector):
    """The router's own families (``router.liteadmin.router_families``, their one definition) as
    prometheus_client metric families, so both admin listeners export the same series."""

    def __init__(self, state: AdminState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        state = self._state
        for family in router_families(state.stats, state.table(), state.access_log, time.monotonic()):
            metric: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
            if family.kind == "histogram":
                metric = HistogramMetricFamily(family.name, family.help, labels=family.labels)
                for values, histogram in family.histograms:
                    metric.add_metric(list(values), cumulative_buckets(histogram), histogram.total)
            else:
                kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
                metric = kind(family.name, family.help, labels=family.labels)
                for values, value in family.values:
                    metric.add_metric(list(values), value)
            yield metric


_PAGE_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": dashboard.CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
_EVENT_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}


def make_admin_app(state: AdminState) -> web.Application:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RouterCollector(state))
    for collector in state.collectors:
        registry.register(collector)
    # CPU seconds, resident memory, open and maximum file descriptors, start time (process_*).
    ProcessCollector(registry=registry)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "hot_path": router.HOT_PATH_MODE})

    async def readyz(_: web.Request) -> web.Response:
        ready, detail = state.readiness()
        detail = {"ready": ready, "version": state.table().version, **detail}
        return web.json_response(detail, status=200 if ready else 503)

    async def metrics(request: web.Request) -> web.Response:
        # OpenMetrics for scrapers that ask for it (Prometheus does), the classic text otherwise.
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        await state.refreshed()
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def routes(_: web.Request) -> web.Response:
        return web.json_response(state.table().to_json())

    async def resolve(request: web.Request) -> web.Response:
        service = request.query.get("service", "")
        raw_key = request.query.get("key") or ""
        key = raw_key if raw_key and is_valid_key(raw_key.encode("utf-8", "replace")) else None
        table = state.table()
        decision = table.resolve(service, key, time.time())
        if decision is None:
            return web.json_response({"error": "no such service", "service": service}, status=404)
        return web.json_response(
            {
                "version": table.version,
                "service": decision.service,
                "key": key,
                "key_valid": key is not None or not raw_key,
                "target": decision.kind.value,
                "upstream": decision.target.url if decision.target else None,
                "reason": decision.reason,
                "status": decision.answer.status if decision.answer is not None else 200,
            }
        )

    closing = asyncio.Event()

    async def page(request: web.Request) -> web.Response:
        await state.refreshed()
        html = dashboard.render_page(
            state.snapshot(), query=request.query.get("q", ""), status=request.query.get("status", "")
        )
        response = web.Response(text=html, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)
        response.enable_compression()  # a few hundred overrides: about 300 KiB of HTML, 10x smaller compressed
        return response

    async def events(request: web.Request) -> web.StreamResponse:
        """Server-sent events: the page's fragments when the table version changes, and every
        ``DASHBOARD_TICK`` for counters and times left; only what changed for this stream."""
        response = web.StreamResponse(headers=_EVENT_HEADERS)
        await response.prepare(request)
        await response.write(b"retry: 3000\n\n")
        sent: dict[str, str] = {}
        loop = asyncio.get_running_loop()
        version, due = -1, 0.0
        try:
            while not closing.is_set():
                if state.table().version != version or loop.time() >= due:
                    await state.refreshed()
                    snap = state.snapshot()
                    await response.write(dashboard.event(dashboard.fragments(snap), sent, snap.now))
                    version, due = snap.table.version, loop.time() + DASHBOARD_TICK
                try:
                    await asyncio.wait_for(closing.wait(), DASHBOARD_POLL)
                except TimeoutError:
                    pass
        except ConnectionResetError:
            pass  # The page went away.
        return response

    async def on_shutdown(_: web.Application) -> None:
        closing.set()  # End the event streams, so none holds the listener open at shutdown.

    app = web.Application()
    app[ADMIN_STATE] = state
    app.on_shutdown.append(on_shutdown)
    app.router.add_get("/", page)
    app.router.add_get("/dashboard/events", events)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", routes)
    app.router.add_get("/routes/resolve", resolve)
    return app

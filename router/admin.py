"""The admin listener: health, readiness, Prometheus metrics and the route table, over aiohttp.

This module only reads router state (the table slot, counters, readiness callbacks) and
renders it; it never changes routing and never runs on the proxy listener, so a scrape or a
big ``/routes`` answer cannot slow the hot path's accept queue.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

import router
from router.keys import is_valid_key
from router.stats import LATENCY_BUCKETS, RouterStats
from router.table import RouteTable

__all__ = ["AdminState", "make_admin_app"]

ReadinessCheck = Callable[[], tuple[bool, dict[str, Any]]]


class AdminState:
    """What the admin endpoints read; the CLI fills it in."""

    def __init__(self, table: Callable[[], RouteTable], stats: RouterStats, readiness: ReadinessCheck) -> None:
        self.table = table
        self.stats = stats
        self.readiness = readiness


class _RouterCollector(Collector):
    def __init__(self, state: AdminState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        stats = self._state.stats
        requests = CounterMetricFamily(
            "devstack_requests", "Requests routed, by service and target kind.", labels=["service", "target"]
        )
        for (service, kind), count in sorted(stats.requests.items()):
            requests.add_metric([service, kind], count)
        yield requests
        errors = CounterMetricFamily("devstack_upstream_errors", "Upstream failures by kind.", labels=["kind"])
        for kind, count in sorted(stats.upstream_errors.items()):
            errors.add_metric([kind], count)
        yield errors
        rejected = CounterMetricFamily(
            "devstack_rejected_requests",
            "Requests the router answered itself (not for an upstream's failure), by status and reason.",
            labels=["status", "reason"],
        )
        for answer, count in sorted(stats.rejected.items(), key=lambda item: item[0].value):
            rejected.add_metric([str(answer.status), answer.reason], count)
        yield rejected
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(LATENCY_BUCKETS, stats.latency_counts, strict=False):
            running += count
            buckets.append((repr(bound), running))
        running += stats.latency_counts[-1]
        buckets.append(("+Inf", running))
        yield HistogramMetricFamily(
            "devstack_request_duration_seconds",
            "Time from request head to the end of the response.",
            buckets=buckets,
            sum_value=stats.latency_sum,
        )
        table = self._state.table()
        yield GaugeMetricFamily("devstack_route_table_version", "Version of the table in use.", value=table.version)
        yield GaugeMetricFamily("devstack_open_connections", "Open client connections.", value=stats.open_connections)
        yield GaugeMetricFamily(
            "devstack_upstream_connections", "Open upstream connections.", value=stats.upstream_connections
        )
        yield GaugeMetricFamily(
            "devstack_tunnels_open", "Upgraded (WebSocket) tunnels not yet ended.", value=stats.tunnels_open
        )
        yield CounterMetricFamily(
            "devstack_refused_connections", "Client connections refused at the cap.", value=stats.refused_connections
        )


def make_admin_app(state: AdminState) -> web.Application:
    registry = CollectorRegistry(auto_describe=True)
    registry.register(_RouterCollector(state))

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "hot_path": router.HOT_PATH_MODE})

    async def readyz(_: web.Request) -> web.Response:
        ready, detail = state.readiness()
        detail = {"ready": ready, "version": state.table().version, **detail}
        return web.json_response(detail, status=200 if ready else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain", charset="utf-8")

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

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/routes", routes)
    app.router.add_get("/routes/resolve", resolve)
    return app

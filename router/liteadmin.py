"""The small admin listener: health, readiness, Prometheus text and the route table on plain asyncio.

A sidecar must stay small (issue #17: at most 25 MiB resident while idle), and aiohttp plus
prometheus_client alone cost more than half of that. So this module serves the four endpoints a
sidecar's kubelet, scraper and operator need (``/healthz``, ``/readyz``, ``/metrics``, ``/routes``;
anything else is 404) as an ``asyncio.Protocol`` parsed by httptools, which the hot path loads
anyway. It also owns the one definition of the router's own metric families (names, types, help,
labels: ``router_families``); ``router.admin`` exports the same families through prometheus_client,
and ``exposition`` writes them in the classic text format prometheus_client would. Like the full
admin it only reads router state and never listens on the proxy port; it has no dashboard, no
``/routes/resolve`` and no OpenMetrics negotiation (Prometheus reads the classic text as well).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, cast

import httptools

import router
from router.stats import LATENCY_BUCKETS, Histogram, RouterStats
from router.table import RouteTable

if TYPE_CHECKING:
    from router.accesslog import AccessLog

__all__ = [
    "METRICS_CONTENT_TYPE",
    "Family",
    "LiteAdmin",
    "cumulative_buckets",
    "exposition",
    "process_families",
    "router_families",
]

ReadinessCheck = Callable[[], tuple[bool, dict[str, Any]]]

METRICS_CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
"""The classic Prometheus text format, the one ``exposition`` writes."""
IDLE_TIMEOUT: Final = 75.0
"""Seconds an admin connection may sit idle: a scraper keeps its connection between scrapes
(Prometheus' default interval is 60 s), a stuck client does not hold a socket forever."""
MAX_HEAD_BYTES: Final = 16 * 1024
"""Admin requests are a path and a few headers; anything larger is not a probe or a scrape."""
_JSON: Final = "application/json; charset=utf-8"
_TEXT: Final = "text/plain; charset=utf-8"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


# --- the router's metric families ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Family:
    """One metric family as the exposition formats see it: counters and gauges carry ``values``,
    histograms carry ``histograms`` (rendered cumulatively, with ``_count`` and ``_sum``)."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    values: tuple[tuple[tuple[str, ...], float], ...] = ()
    histograms: tuple[tuple[tuple[str, ...], Histogram], ...] = ()


def _scalar(name: str, kind: Literal["counter", "gauge"], help_text: str, value: float) -> Family:
    return Family(name, kind, help_text, values=(((), value),))


def router_families(stats: RouterStats, table: RouteTable, access_log: AccessLog | None, now: float) -> list[Family]:
    """The router's own counters, gauges and histograms at ``now`` (``time.monotonic``); pure."""
    families = [
        Family(
            "devstack_requests",
            "counter",
            "Requests routed, by service and target kind.",
            ("service", "target"),
            tuple((labels, count) for labels, count in sorted(stats.requests.items())),
        ),
        Family(
            "devstack_upstream_errors",
            "counter",
            "Upstream failures by kind.",
            ("kind",),
            tuple(((kind,), count) for kind, count in sorted(stats.upstream_errors.items())),
        ),
        Family(
            "devstack_rejected_requests",
            "counter",
            "Requests the router answered itself (not for an upstream's failure), by status and reason.",
            ("status", "reason"),
            tuple(
                ((str(answer.status), answer.reason), count)
                for answer, count in sorted(stats.rejected.items(), key=lambda item: item[0].value)
            ),
        ),
        Family(
            "devstack_request_duration_seconds",
            "histogram",
            "Time from request head to the end of the response, by service and target kind "
            "(service - and target none: refused before routing).",
            ("service", "target"),
            histograms=tuple(sorted(stats.durations.items())),
        ),
        Family(
            "devstack_upstream_connect_seconds",
            "histogram",
            "Time to open a connection to an upstream.",
            histograms=(((), stats.upstream_connect),),
        ),
        Family(
            "devstack_upstream_response_head_seconds",
            "histogram",
            "Time from sending a request head upstream to receiving the response head.",
            histograms=(((), stats.upstream_head),),
        ),
        _scalar("devstack_route_table_version", "gauge", "Version of the table in use.", table.version),
        _scalar("devstack_open_connections", "gauge", "Open client connections.", stats.open_connections),
        _scalar("devstack_upstream_connections", "gauge", "Open upstream connections.", stats.upstream_connections),
        _scalar("devstack_tunnels_open", "gauge", "Upgraded (WebSocket) tunnels not yet ended.", stats.tunnels_open),
        _scalar("devstack_http2_connections", "counter", "Client connections served as HTTP/2.", stats.h2_connections),
        _scalar(
            "devstack_scope_first_use_waits",
            "counter",
            "Requests a --learn-services sidecar held until the feed answered for their service's routes.",
            stats.scope_holds,
        ),
        Family(
            "devstack_http2_goaway",
            "counter",
            "HTTP/2 client connections cut off for misbehaving, by why (an HTTP/2 error code, a budget).",
            ("reason",),
            tuple(((reason,), count) for reason, count in sorted(stats.h2_goaway.items())),
        ),
        _scalar(
            "devstack_refused_connections",
            "counter",
            "Client connections refused at the cap.",
            stats.refused_connections,
        ),
        Family(
            "devstack_table_rebuild_failures",
            "counter",
            "Route updates rejected (the last good table kept serving) or sources failing, by source.",
            ("source",),
            tuple(((source,), count) for source, count in sorted(stats.table_failures.items())),
        ),
        Family(
            "devstack_route_source_staleness_seconds",
            "gauge",
            "Seconds since each route source last confirmed its routes (a feed's heartbeats count).",
            ("source",),
            tuple(
                ((source,), max(0.0, now - confirmed)) for source, confirmed in sorted(stats.source_confirmed.items())
            ),
        ),
    ]
    if access_log is not None:
        families += [
            _scalar("devstack_access_log_lines", "counter", "Access log lines written.", access_log.written),
            _scalar(
                "devstack_access_log_dropped",
                "counter",
                "Access log lines dropped because the destination fell behind.",
                access_log.dropped,
            ),
        ]
    return families


def cumulative_buckets(histogram: Histogram) -> list[tuple[str, float]]:
    """(``le`` label, cumulative count) per bucket, ``+Inf`` last, as the exposition format counts them."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip(LATENCY_BUCKETS, histogram.counts, strict=False):
        running += count
        buckets.append((repr(bound), running))
    buckets.append(("+Inf", running + histogram.counts[-1]))
    return buckets


_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def process_families(proc: str = "/proc/self") -> list[Family]:
    """prometheus_client's ``process_*`` families, read from /proc as its ProcessCollector does;
    none where /proc is missing (not Linux), as there."""
    families: list[Family] = []
    try:
        with open("/proc/stat", "rb") as stat:
            boot = next(float(line.split()[1]) for line in stat if line.startswith(b"btime "))
        with open(f"{proc}/stat", "rb") as stat:
            fields = stat.read().split(b")")[-1].split()
    except (OSError, StopIteration):
        return families
    families += [
        _scalar("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", float(fields[20])),
        _scalar(
            "process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", float(fields[21]) * _PAGE_SIZE
        ),
        _scalar(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            float(fields[19]) / _CLOCK_TICKS + boot,
        ),
        _scalar(
            "process_cpu_seconds",
            "counter",
            "Total user and system CPU time spent in seconds.",
            (float(fields[11]) + float(fields[12])) / _CLOCK_TICKS,
        ),
    ]
    try:
        with open(f"{proc}/limits", "rb") as limits:
            max_fds = next(float(line.split()[3]) for line in limits if line.startswith(b"Max open file"))
        open_fds = len(os.listdir(f"{proc}/fd"))
    except (OSError, StopIteration):
        return families
    families += [
        _scalar("process_open_fds", "gauge", "Number of open file descriptors.", open_fds),
        _scalar("process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds),
    ]
    return families


# --- the classic text exposition format ------------------------------------------------------------


def _number(value: float) -> str:
    """A sample value as prometheus_client writes it (Go's formatting: ``1.0``, ``1e+07``, ``+Inf``)."""
    value = float(value)
    if value == float("inf"):
        return "+Inf"
    if value == float("-inf"):
        return "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample(name: str, labels: Iterable[tuple[str, str]], value: float) -> str:
    # prometheus_client writes labels sorted by name; scrapers do not care, diffs against it do.
    pairs = ",".join(f'{key}="{_label_value(text)}"' for key, text in sorted(labels))
    return f"{name}{{{pairs}}} {_number(value)}\n" if pairs else f"{name} {_number(value)}\n"


def exposition(families: Iterable[Family]) -> bytes:
    """``families`` in the classic Prometheus text format, byte for byte what prometheus_client's
    ``generate_latest`` writes for the same families (counters get ``_total``)."""
    out: list[str] = []
    for family in families:
        name = f"{family.name}_total" if family.kind == "counter" else family.name
        text = family.help.replace("\\", r"\\").replace("\n", r"\n")
        out.append(f"# HELP {name} {text}\n")
        out.append(f"# TYPE {name} {family.kind}\n")
        for values, value in family.values:
            out.append(_sample(name, zip(family.labels, values), value))
        for values, histogram in family.histograms:
            labels = list(zip(family.labels, values))
            buckets = cumulative_buckets(histogram)
            for bound, count in buckets:
                out.append(_sample(f"{name}_bucket", [*labels, ("le", bound)], count))
            out.append(_sample(f"{name}_count", labels, buckets[-1][1]))
            out.append(_sample(f"{name}_sum", labels, histogram.total))
    return "".join(out).encode()


# --- the listener --------------------------------------------------------------------------------------


class LiteAdmin:
    """The admin endpoints over a protocol of our own; start it, then ``close`` it at shutdown."""

    def __init__(
        self,
        table: Callable[[], RouteTable],
        stats: RouterStats,
        readiness: ReadinessCheck,
        access_log: AccessLog | None = None,
    ) -> None:
        self.table = table
        self.stats = stats
        self.readiness = readiness
        self.access_log = access_log
        self.address: tuple[str, int] = ("", 0)
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[_AdminConnection] = set()

    async def start(self, address: tuple[str, int]) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _AdminConnection(self), address[0], address[1], reuse_address=True
        )
        self.address = self._server.sockets[0].getsockname()[:2]
        return self.address

    async def close(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for connection in list(self._connections):
            connection.close()
        await self._server.wait_closed()
        self._server = None

    def answer(self, method: bytes, target: bytes) -> tuple[int, str, bytes]:
        """(status, content type, body) for one request; the one place that maps paths to answers."""
        path = target.partition(b"?")[0]
        if path not in _PATHS:
            return 404, _TEXT, b"404: Not Found"
        if method not in (b"GET", b"HEAD"):
            return 405, _TEXT, b"405: Method Not Allowed"
        if path == b"/healthz":
            return 200, _JSON, _json({"status": "ok", "hot_path": router.HOT_PATH_MODE})
        if path == b"/readyz":
            ready, detail = self.readiness()
            return (200 if ready else 503), _JSON, _json({"ready": ready, "version": self.table().version, **detail})
        if path == b"/metrics":
            now = time.monotonic()
            families = router_families(self.stats, self.table(), self.access_log, now) + process_families()
            return 200, METRICS_CONTENT_TYPE, exposition(families)
        return 200, _JSON, _json(self.table().to_json())


_PATHS: Final = frozenset((b"/healthz", b"/readyz", b"/metrics", b"/routes"))


def _json(document: object) -> bytes:
    return json.dumps(document).encode()  # aiohttp's json_response separators, so answers read the same


class _AdminConnection(asyncio.Protocol):
    """One admin client connection: HTTP/1.1 with keep-alive, requests answered in order, bodies ignored."""

    def __init__(self, admin: LiteAdmin) -> None:
        self._admin = admin
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._target = b""
        self._head_bytes = 0
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        self._admin._connections.add(self)
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._admin._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        self._transport = None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _rearm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.close)

    def data_received(self, data: bytes) -> None:
        self._rearm()
        self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.close()  # nothing here upgrades; the request before the upgrade was answered
        except httptools.HttpParserError:
            self._respond(400, _TEXT, b"400: Bad Request", keep_alive=False)
            return
        if self._head_bytes > MAX_HEAD_BYTES and self._transport is not None:
            self._respond(431, _TEXT, b"431: Request Header Fields Too Large", keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._target = b""
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._target += url

    def on_headers_complete(self) -> None:
        self._head_bytes = 0  # only heads are bounded; a body (ignored) may be any size

    def on_message_complete(self) -> None:
        method = self._parser.get_method()
        status, content_type, body = self._admin.answer(method, self._target)
        self._respond(status, content_type, body, keep_alive=self._parser.should_keep_alive(), head=method == b"HEAD")

    def _respond(self, status: int, content_type: str, body: bytes, *, keep_alive: bool, head: bool = False) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        if status == 405:
            lines.append("Allow: GET, HEAD")
        if not keep_alive:
            lines.append("Connection: close")
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
        if not keep_alive:
            transport.close()

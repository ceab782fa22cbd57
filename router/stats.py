"""Counters the hot path bumps and the admin listener exports.

The hot path must not pay for a metrics library per request, so it increments plain integers
in dictionaries here; ``router.admin`` renders them as Prometheus text at scrape time. This
module does no I/O and takes no locks (one event loop owns it).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Final

from router.errors import Answer

LATENCY_BUCKETS: Final[tuple[float, ...]] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Seconds; dense below 10 ms because a proxy hop is measured in hundreds of microseconds.
Typed as a variable-length tuple so that, compiled, it stays one tuple object: a fixed-length
Final tuple of floats is unboxed, and iterating it would box all fourteen anew per call."""


class Histogram:
    """Counts per ``LATENCY_BUCKETS`` bucket (plus one past the last) and the sum, in seconds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # bisect_left by hand: compiled, a loop over 14 floats costs less than the call to bisect.
        index = 0
        for bound in LATENCY_BUCKETS:
            if seconds <= bound:
                break
            index += 1
        self.counts[index] += 1
        self.total += seconds


UNROUTED: Final[tuple[str, ...]] = ("-", "none")
"""The (service, target) label of requests refused before routing."""


class RouterStats:
    __slots__ = (
        "requests",
        "upstream_errors",
        "rejected",
        "durations",
        "upstream_connect",
        "upstream_head",
        "open_connections",
        "upstream_connections",
        "refused_connections",
        "tunnels_open",
        "h2_connections",
        "h2_goaway",
        "scope_holds",
        "table_failures",
        "source_confirmed",
    )

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, ...], int] = defaultdict(int)
        """(service, target kind) → requests routed."""
        self.upstream_errors: defaultdict[str, int] = defaultdict(int)
        """Error kind (connect, timeout, reset, bad-response, pool-full) → count."""
        self.rejected: defaultdict[Answer, int] = defaultdict(int)
        """Answer → requests the router answered itself for a reason other than an upstream's failure."""
        self.durations: dict[tuple[str, ...], Histogram] = {}
        """(service, target kind) → request durations, from head to the end of the response. The
        labels are bounded by the table (no key label)."""
        self.upstream_connect = Histogram()
        """Seconds to open an upstream connection."""
        self.upstream_head = Histogram()
        """Seconds from sending a request head upstream to receiving the response head."""
        self.open_connections = 0
        self.upstream_connections = 0
        self.refused_connections = 0
        self.tunnels_open = 0
        self.h2_connections = 0
        """Client connections served as HTTP/2 (prior knowledge, ALPN, or after CONNECT)."""
        self.h2_goaway: defaultdict[str, int] = defaultdict(int)
        """HTTP/2 client connections the router cut off, by why (an error code, a budget)."""
        self.scope_holds = 0
        """Requests a learning sidecar held for a service's first routes (``router.scope``)."""
        """Upgraded (WebSocket) client connections whose tunnel has not ended yet."""
        self.table_failures: dict[str, int] = {}
        """Source → updates rejected (the last good table kept serving) or failed fetches."""
        self.source_confirmed: dict[str, float] = {}
        """Source → when (time.monotonic) it last confirmed its routes: a load, an event, a feed
        message or heartbeat. The composition root fills both in; the admin exports them."""

    def observe_duration(self, labels: tuple[str, ...], seconds: float) -> None:
        histogram = self.durations.get(labels)
        if histogram is None:
            histogram = self.durations[labels] = Histogram()
        histogram.observe(seconds)

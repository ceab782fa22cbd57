"""Merges the latest snapshot of every source into one versioned table and publishes it.

The aggregator is the only place tables are versioned. It keeps each source's latest complete
snapshot, rebuilds with the pure ``merge_snapshots`` on every change, skips results that route
exactly like the current table, and keeps serving the last good table when a build fails
(the failure is recorded for ``/readyz`` and logs, and so is the recovery). It never publishes
before every configured source has delivered once, because a partial table would send
overridden traffic to baselines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from controller.build import BuildError, merge_snapshots
from router.table import EMPTY_TABLE, Routes, RouteTable

log = logging.getLogger(__name__)

__all__ = ["Aggregator", "SourceDown"]


class SourceDown(Exception):
    """A source cannot reach what it follows (a controller feed, the API server).

    Such a source logs its own outage, once and with its retry schedule, because only it knows
    the schedule; the aggregator records the error for ``/readyz`` but does not log it again on
    every retry, and does not count it as a rejected update.
    """


class Aggregator:
    def __init__(self, sources: Iterable[str], publish: Callable[[RouteTable], None]) -> None:
        self.expected = frozenset(sources)
        self._publish = publish
        self._snapshots: dict[str, Mapping[str, Routes]] = {}
        self.table: RouteTable = EMPTY_TABLE
        self.errors: dict[str, str] = {}
        """Source name → the message of its latest rejected update or outage (cleared on success)."""
        self.rejected: dict[str, int] = {}
        """Source name → updates rejected since its last accepted one (for the recovery log line)."""
        self.last_change = 0.0
        self.listeners: list[Callable[[RouteTable], None]] = []
        self.failures: dict[str, int] = {}
        """Source name → rejected updates and outages reported, ever (a metric's counter)."""
        self.confirmed: dict[str, float] = {}
        """Source name → when (time.monotonic) it last confirmed its routes: an accepted update,
        or a sign of life from a feed (``confirm``). How stale the routes may be."""

    def confirm(self, source: str) -> None:
        """``source`` is alive and its routes still hold (a feed's heartbeat)."""
        self.confirmed[source] = time.monotonic()

    @property
    def ready(self) -> bool:
        return self.expected <= self._snapshots.keys()

    def update(self, source: str, services: Mapping[str, Routes]) -> bool:
        """Take a complete snapshot from ``source``; True if a new table was published."""
        if self._snapshots.get(source) is services:
            # The source re-affirms what it holds (a feed that reconnected): nothing to merge, and
            # no table to compare service by service (a quarter of a second for 10,000 of them).
            self.errors.pop(source, None)
            self.confirmed[source] = time.monotonic()
            return False
        candidate = dict(self._snapshots)
        candidate[source] = services
        try:
            table = merge_snapshots(candidate, self.table.version + 1)
        except BuildError as exc:
            self.report_error(source, exc)
            return False
        self._snapshots = candidate
        self.errors.pop(source, None)
        self.confirmed[source] = time.monotonic()
        published = self._maybe_publish(table)
        rejected = self.rejected.pop(source, 0)
        if rejected:
            log.info(
                "%s: update accepted again after %d rejected (table v%d)", source, rejected, self.table.version
            )
        return published

    def _maybe_publish(self, table: RouteTable) -> bool:
        if not self.ready:
            return False
        if self.table.version and table.same_routes(self.table) and table.sources == self.table.sources:
            return False
        self.table = table
        self.last_change = time.time()
        self._publish(table)
        for listener in list(self.listeners):
            listener(table)
        log.info("route table v%d published (%d services)", table.version, len(table.services))
        return True

    def report_error(self, source: str, exc: Exception) -> None:
        self.errors[source] = str(exc)
        self.failures[source] = self.failures.get(source, 0) + 1
        if isinstance(exc, SourceDown):
            # Rejections before an outage belong to that connection: what arrives after it is new,
            # and re-affirming the old table on reconnect is no recovery from them.
            self.rejected.pop(source, None)
            return
        self.rejected[source] = self.rejected.get(source, 0) + 1
        log.error("rejected update from %s, keeping table v%d: %s", source, self.table.version, exc)

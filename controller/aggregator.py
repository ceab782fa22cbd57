"""Merges the latest snapshot of every source into one versioned table and publishes it.

The aggregator is the only place tables are versioned. It keeps each source's latest complete
snapshot, rebuilds with the pure ``merge_snapshots`` on every change, skips results that route
exactly like the current table, and keeps serving the last good table when a build fails
(the failure is recorded for ``/readyz`` and logs). It never publishes before every configured
source has delivered once, because a partial table would send overridden traffic to baselines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping

from controller.build import BuildError, merge_snapshots
from router.table import EMPTY_TABLE, Routes, RouteTable

log = logging.getLogger("devstack.controller")

__all__ = ["Aggregator"]


class Aggregator:
    def __init__(self, sources: Iterable[str], publish: Callable[[RouteTable], None]) -> None:
        self.expected = frozenset(sources)
        self._publish = publish
        self._snapshots: dict[str, Mapping[str, Routes]] = {}
        self.table: RouteTable = EMPTY_TABLE
        self.errors: dict[str, str] = {}
        """Source name → the message of its latest rejected update (cleared on success)."""
        self.last_change = 0.0
        self.listeners: list[Callable[[RouteTable], None]] = []

    @property
    def ready(self) -> bool:
        return self.expected <= self._snapshots.keys()

    def update(self, source: str, services: Mapping[str, Routes]) -> bool:
        """Take a complete snapshot from ``source``; True if a new table was published."""
        candidate = dict(self._snapshots)
        candidate[source] = services
        try:
            table = merge_snapshots(candidate, self.table.version + 1)
        except BuildError as exc:
            self.report_error(source, exc)
            return False
        self._snapshots = candidate
        self.errors.pop(source, None)
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
        log.error("rejected update from %s, keeping table v%d: %s", source, self.table.version, exc)

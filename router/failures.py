"""Upstream failures as log lines a person can read: at WARNING, naming the upstream and the
cause, at most one line per upstream per ``INTERVAL`` (a down upstream under load fails thousands
of times a second; the line after a quiet spell says how many were not logged). Counting per
failure is the metrics' job (``devstack_upstream_errors_total``); this module only decides when
a line is worth writing, so the logging call runs on the failure path at a bounded rate.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final

from router.errors import Answer

__all__ = ["FailureLog", "INTERVAL"]

INTERVAL: Final = 10.0
"""Seconds between two lines about the same upstream."""

log = logging.getLogger(__name__)


class FailureLog:
    def __init__(self, clock: Callable[[], float] = time.monotonic, interval: float = INTERVAL) -> None:
        self._clock = clock
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}
        """Upstream URL → (when its last line was written, failures not logged since)."""

    def report(self, upstream: str, failure: Answer, service: str | None) -> bool:
        """One failure of ``upstream``; whether a line was written for it."""
        now = self._clock()
        last = self._last.get(upstream)
        if last is not None and now - last[0] < self._interval:
            self._last[upstream] = (last[0], last[1] + 1)
            return False
        if len(self._last) > 10000:
            self._last.clear()  # upstreams come and go with the table: forget, never grow without bound
        self._last[upstream] = (now, 0)
        suppressed = last[1] if last is not None else 0
        log.warning(
            "upstream %s (service %s) failed: %s, answered %d%s",
            upstream,
            service or "-",
            failure.reason,
            failure.status,
            f" ({suppressed} more failures of it in the last {now - last[0]:.0f}s not logged)"
            if last is not None and suppressed
            else "",
        )
        return True

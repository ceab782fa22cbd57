"""Reconnect delays shared by the sources that hold a connection open (Kubernetes, remote feed).

This module owns one policy: how long to wait before reconnecting after a stream ends or fails.
It is pure (no I/O, no clock); callers decide what counts as a healthy period and call ``reset``.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["Backoff"]


def _uniform() -> float:
    """A float in [0, 1) from the OS. Jitter needs no seeded generator, and ``random`` would cost
    every sidecar 0.2 MiB resident for it (a Mersenne Twister seeded at import, and its hashing)."""
    return int.from_bytes(os.urandom(7)) / (1 << 56)


class Backoff:
    """Jittered exponential delays: 0 for the first retry after a healthy period, then initial → maximum.

    The first retry is immediate because the usual causes (a watch that timed out, a 410 after
    compaction, a server rollout) are fixed by simply reconnecting. Each later delay is half
    fixed (so a retry is never too soon) and half random (so hundreds of routers restarted
    together do not reconnect in lockstep).
    """

    def __init__(self, initial: float, maximum: float, *, rng: Callable[[], float] = _uniform) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng
        self.attempt = 0

    def next_delay(self) -> float:
        attempt = self.attempt
        self.attempt += 1
        if attempt == 0:
            return 0.0
        base = min(self._maximum, self._initial * 2.0 ** (attempt - 1))
        return base / 2 + self._rng() * base / 2

    def reset(self) -> None:
        self.attempt = 0

"""Shared fixtures: uvloop for every test, a guard that fails tests which block the loop,
and echo origins on loopback."""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import AsyncIterator

import pytest
import uvloop

from tests.support import Origin

BLOCK_LIMIT = 1.0
"""Seconds the event loop may go without running a callback before the test fails; generous
because CI machines are shared, tight enough to catch a synchronous sleep or blocking I/O."""


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Every async test runs on uvloop, the loop the router runs on in production."""
    return {"uvloop": uvloop.new_event_loop}


class _LoopWatchdog:
    """A thread that notices when the loop's heartbeat callback stops running."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.beat = time.monotonic()
        self.worst = 0.0
        self._stop = threading.Event()
        self._handle: asyncio.TimerHandle | None = None
        self._thread = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)

    def _heartbeat(self) -> None:
        self.beat = time.monotonic()
        self._handle = self.loop.call_later(0.05, self._heartbeat)

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.worst = max(self.worst, time.monotonic() - self.beat)

    def start(self) -> None:
        self._heartbeat()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._handle is not None:
            self._handle.cancel()


@pytest.fixture(autouse=True)
async def no_blocking_loop(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    """Fails a test during which the event loop was blocked for more than BLOCK_LIMIT."""
    if not inspect.iscoroutinefunction(request.function):
        yield  # a synchronous test owns the thread; there is no loop of its to block
        return
    watchdog = _LoopWatchdog(asyncio.get_running_loop())
    watchdog.start()
    yield
    watchdog.stop()
    if watchdog.worst > BLOCK_LIMIT and "allow_blocking" not in request.keywords:
        pytest.fail(f"the event loop was blocked for {watchdog.worst:.2f}s (limit {BLOCK_LIMIT}s)")


@pytest.fixture
async def origins() -> AsyncIterator[dict[str, Origin]]:
    """Three echo origins: the baseline and the overrides of alice and bob."""
    made = {name: Origin(name) for name in ("baseline", "alice", "bob")}
    for origin in made.values():
        await origin.start()
    yield made
    for origin in made.values():
        await origin.close()


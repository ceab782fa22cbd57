"""The blocking-loop guard itself must be able to fail."""

from __future__ import annotations

import asyncio
import time

from tests.conftest import _LoopWatchdog


async def test_watchdog_notices_a_blocked_loop() -> None:
    watchdog = _LoopWatchdog(asyncio.get_running_loop())
    watchdog.start()
    await asyncio.sleep(0.1)
    time.sleep(0.4)  # deliberately block the loop: the thing the guard exists to catch
    await asyncio.sleep(0.1)
    watchdog.stop()
    assert watchdog.worst >= 0.3


async def test_watchdog_is_quiet_when_the_loop_runs() -> None:
    watchdog = _LoopWatchdog(asyncio.get_running_loop())
    watchdog.start()
    for _ in range(5):
        await asyncio.sleep(0.05)
    watchdog.stop()
    assert watchdog.worst < 0.3

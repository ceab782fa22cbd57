"""The route sources' metrics through the real command: a router following a route file exports
how stale its routes are and how many updates it rejected (devstack/cli.py wires the
aggregator's counts into the admin listener)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp

from tests.support import start_router

GOOD = "services:\n  a:\n    baseline: http://127.0.0.1:9\n"


async def _metrics(admin: int) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
        return await resp.text()


async def test_a_rejected_file_is_counted_and_staleness_is_exported(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(GOOD)
    proc, _, admin = await start_router(routes)
    try:
        text = await _metrics(admin)
        staleness = re.search(r'devstack_route_source_staleness_seconds\{source="file"\} ([0-9.e+-]+)', text)
        assert staleness is not None and 0 <= float(staleness.group(1)) < 60
        assert 'devstack_table_rebuild_failures_total{source="file"}' not in text  # nothing rejected yet
        routes.write_text("services:\n  a:\n    baseline: ftp://nope\n")
        async with asyncio.timeout(15):  # the file is polled about once a second
            while 'devstack_table_rebuild_failures_total{source="file"} 1.0' not in (text := await _metrics(admin)):
                await asyncio.sleep(0.1)
        assert "devstack_route_table_version 1.0" in text  # the last good table keeps serving
    finally:
        proc.terminate()
        await proc.wait()

"""A route feed snapshot applied in one go and in slices: how long each takes and how long each holds the loop.

``python -m benchmarks.snapshot [--services 1000,10000] [--overrides 10] [--reps 3]``: for each
table size, a ``/v2`` snapshot line shaped like the scale benchmark's table (every service with
two hosts and ``--overrides`` overrides, written as ``RouteTable.to_json`` writes them) is
decoded and built into a ``RouteTable`` on a uvloop loop, alternately the way the router did it
before ``controller.snapshot`` (``json.loads``, ``routes_from_json``, ``table_fields``,
``RouteTable``: one go) and with ``controller.snapshot`` (in slices), while a task on the same loop
asks to run every millisecond and records the longest gap between its runs. Prints the median
over ``--reps`` of each path's wall time and longest gap. Nothing here touches a socket.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import uvloop

import router
from controller.build import table_fields
from controller.snapshot import SLICE_SECONDS, WHOLE_LINE_BYTES, decode_line, table_from_json
from controller.sources.remote import routes_from_json
from router.table import RouteTable

__all__ = ["TICK", "at_once", "in_slices", "longest_stall", "snapshot_line"]

TICK: Final = 0.001
"""How often the watching task asks to run: a request's worth of work on a busy router."""

_Result = TypeVar("_Result")


def snapshot_line(services: int, overrides_per_service: int, *, version: int = 1) -> bytes:
    """A ``/v2`` snapshot line of ``services`` services with ``overrides_per_service`` overrides each."""
    keys = [f"dev{i:02d}" for i in range(overrides_per_service)]
    table: dict[str, Any] = {}
    for index in range(services):
        name = f"svc{index:05d}"
        table[name] = {
            "hosts": [name, f"{name}.local"],
            "baseline": f"http://10.0.{index // 250 % 250}.{index % 250}:8080",
            "overrides": {
                key: {
                    "url": f"http://10.1.{index // 250 % 250}.{index % 250}:{9000 + number}",
                    "ready": number % 7 != 0,
                    "expires": None if number % 3 else 4_102_444_800.0,
                    "fallback": "baseline" if number % 5 == 0 else "error",
                    "namespace": f"dev-{key}",
                    "workload": f"{name}-{key}",
                }
                for number, key in enumerate(keys)
            },
        }
    document = {
        "kind": "snapshot",
        "version": version,
        "instance": "benchmark",
        "sources": ["kubernetes"],
        "groups": {"team": keys[:2]} if len(keys) > 2 else {},
        "services": table,
    }
    return json.dumps(document, separators=(",", ":")).encode()


def at_once(line: bytes, *, origin: str = "") -> tuple[RouteTable, dict[str, object]]:
    """What a router did with a snapshot line before ``controller.snapshot``: all of it in one go."""
    document = json.loads(line)
    version, services = routes_from_json(document, origin=origin)
    sources, groups = table_fields(document, origin=origin)
    return RouteTable(services, version, sources), groups


async def in_slices(
    line: bytes, *, origin: str = "", slice_seconds: float = SLICE_SECONDS, whole_below: int = WHOLE_LINE_BYTES
) -> tuple[RouteTable, dict[str, object]]:
    """The same through ``controller.snapshot``, as the router does it now."""
    document = await decode_line(line, slice_seconds=slice_seconds, whole_below=whole_below)
    return await table_from_json(document, origin=origin, slice_seconds=slice_seconds)


async def longest_stall(work: Callable[[], Awaitable[_Result]]) -> tuple[_Result, float, float]:
    """``work()``'s result, its wall time, and the longest the loop went without running a task
    that asks to run every ``TICK`` meanwhile (a gap includes the tick itself)."""
    longest = 0.0
    running = True

    async def watch() -> None:
        nonlocal longest
        last = time.perf_counter()
        while running:
            await asyncio.sleep(TICK)
            now = time.perf_counter()
            longest = max(longest, now - last)
            last = now

    watcher = asyncio.create_task(watch(), name="snapshot-benchmark-watch")
    await asyncio.sleep(TICK * 5)  # the watcher has settled into its rhythm
    started = time.perf_counter()
    try:
        result = await work()
        elapsed = time.perf_counter() - started
    finally:
        running = False
        await watcher
    return result, elapsed, longest


async def _compare(sizes: list[int], overrides: int, reps: int) -> None:
    print(f"hot path {router.HOT_PATH_MODE}; {overrides} overrides per service; median of {reps}")
    print(f"{'services':>9} {'MB':>6} {'path':<9} {'wall ms':>9} {'longest stall ms':>17}")
    for size in sizes:
        line = snapshot_line(size, overrides)

        async def one_go(line: bytes = line) -> object:
            return at_once(line)

        async def sliced(line: bytes = line) -> object:
            return await in_slices(line)

        runs: dict[str, list[tuple[float, float]]] = {"one go": [], "in slices": []}
        for _ in range(reps):  # interleaved: the host's speed drifts
            for name, work in (("one go", one_go), ("in slices", sliced)):
                _, elapsed, longest = await longest_stall(work)
                runs[name].append((elapsed, longest))
        for name, measured in runs.items():
            wall = statistics.median(elapsed for elapsed, _ in measured)
            stall = statistics.median(longest for _, longest in measured)
            print(f"{size:>9,} {len(line) / 1e6:>6.1f} {name:<9} {wall * 1e3:>9,.0f} {stall * 1e3:>17,.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", default="1000,10000", help="table sizes, comma-separated")
    parser.add_argument("--overrides", type=int, default=10, help="overrides per service")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(size) for size in args.services.split(",")]
    uvloop.run(_compare(sizes, args.overrides, args.reps))


if __name__ == "__main__":
    main()

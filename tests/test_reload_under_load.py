"""Route-table swaps under load: 100 reloads of the route file while keep-alive clients keep
sending requests, with zero failed requests, each served by an upstream its table named."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from controller.aggregator import Aggregator
from controller.sources.file import FileSource
from router.server import RouterServer
from router.table import RouteTable
from tests.support import Origin

SWAPS = 100


def route_file(alice_url: str, baseline_url: str) -> str:
    return f"services:\n  payments:\n    baseline: {baseline_url}\n    overrides:\n      alice: {{url: {alice_url}}}\n"


async def test_table_swaps_under_keep_alive_load_lose_nothing(origins: dict[str, Origin], tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(route_file(origins["alice"].url, origins["baseline"].url))
    server = RouterServer()
    published: list[RouteTable] = []

    def publish(table: RouteTable) -> None:
        server.swap(table)
        published.append(table)

    aggregator = Aggregator(["file"], publish)
    source = FileSource(path, aggregator.update, aggregator.report_error, interval=60)
    assert source.load_once()
    await server.start(("127.0.0.1", 0))
    watcher = asyncio.create_task(source.run(), name="file-source")
    stop = asyncio.Event()
    results: list[tuple[int, str]] = []
    failures: list[BaseException] = []

    async def client() -> None:
        url = f"http://127.0.0.1:{server.address[1]}/"
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    async with session.get(url, headers={"Host": "payments", "baggage": "devstack=alice"}) as resp:
                        results.append((resp.status, (await resp.json())["origin"]))
                except (TimeoutError, aiohttp.ClientError) as exc:
                    failures.append(exc)

    clients = [asyncio.create_task(client(), name=f"client-{i}") for i in range(4)]
    try:
        for swap in range(SWAPS):
            target = origins["bob"] if swap % 2 == 0 else origins["alice"]
            path.write_text(route_file(target.url, origins["baseline"].url))
            before = len(published)
            source.reload()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while len(published) == before:
                assert loop.time() < deadline, f"swap {swap} was not published"
                await asyncio.sleep(0.002)
            # Let a few requests run on each table before the next swap.
            seen = len(results)
            while len(results) < seen + 3:
                await asyncio.sleep(0.001)
    finally:
        stop.set()
        await asyncio.gather(*clients)
        watcher.cancel()
        await server.close(drain=1)
    assert not failures
    assert len(published) == SWAPS + 1
    assert published[-1].version == SWAPS + 1
    assert len(results) >= SWAPS * 3
    assert {status for status, _ in results} == {200}
    assert {origin for _, origin in results} == {"alice", "bob"}

"""The controller's feed encodes each table once, whatever the number of subscribers, and sends
it gzip-compressed to clients that accept it (controller/publish.py): many real streams on
loopback, one publish, one encoding, the same bytes on every stream."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
from aiohttp import web

from controller.publish import RoutePublisher, make_publish_app
from tests.support import make_table

SUBSCRIBERS = 20


def _table(version: int) -> object:
    services = {f"svc{i}": {"baseline": f"http://127.0.0.1:{9000 + i}"} for i in range(50)}
    return make_table(services, version=version)


async def test_one_encoding_per_table_shared_by_every_stream_and_request() -> None:
    publisher = RoutePublisher()
    publisher.publish(_table(1))  # type: ignore[arg-type]
    runner = web.AppRunner(make_publish_app(publisher, readiness=lambda: (True, {})))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}/v1/routes"
    try:
        async with aiohttp.ClientSession() as session:
            streams = [await session.get(base + "?watch=1&since=0") for _ in range(SUBSCRIBERS)]
            first = [await stream.content.readline() for stream in streams]
            publisher.publish(_table(2))  # type: ignore[arg-type]
            async with asyncio.timeout(10):
                second = [await stream.content.readline() for stream in streams]
            for stream in streams:
                stream.close()
            async with session.get(base, headers={"Accept-Encoding": "gzip"}) as resp:
                assert resp.headers["Content-Encoding"] == "gzip"
                plain = await resp.read()  # aiohttp decompresses
            async with session.get(base, headers={"Accept-Encoding": "identity"}, auto_decompress=False) as resp:
                assert "Content-Encoding" not in resp.headers
                identity = await resp.read()
            async with session.get(base, headers={"Accept-Encoding": "gzip"}, auto_decompress=False) as resp:
                compressed = await resp.read()
    finally:
        await runner.cleanup()
    assert len(set(first)) == 1 and len(set(second)) == 1  # byte-identical on every stream
    assert json.loads(first[0])["version"] == 1 and json.loads(second[0])["version"] == 2
    assert plain == identity == second[0] == gzip.decompress(compressed)
    assert len(compressed) * 5 < len(identity)
    assert publisher.serializations == 2  # two tables, 20 streams and 3 requests: two encodings

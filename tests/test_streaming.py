"""Large bodies stream through a router process with flat memory, both directions.

The router runs as its own process (the real CLI) so its memory can be read from /proc without
the test's client and origin in the figure.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.support import Origin, digest_of_repeats, memory_kib, start_router

MIB = 1 << 20
SIZE = 256 * MIB
CHUNK = bytes(range(256)) * 256  # 64 KiB
RSS_GROWTH_LIMIT = 64 * MIB


@pytest.fixture
async def router_process(origins: dict[str, Origin], tmp_path: Path) -> AsyncIterator[tuple[int, int]]:
    base = origins["baseline"]

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = SIZE
        await resp.prepare(request)
        for _ in range(SIZE // len(CHUNK)):
            await resp.write(CHUNK)
        return resp

    async def upload(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        total = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            digest.update(chunk)
            total += len(chunk)
        return web.json_response({"bytes": total, "sha256": digest.hexdigest()})

    base.handlers.update({"/download": download, "/upload": upload})
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"services:\n  big:\n    baseline: {base.url}\n")
    proc, port, _ = await start_router(routes)
    try:
        yield proc.pid, port
    finally:
        proc.terminate()
        await proc.wait()


async def test_256_mib_download_and_upload_stream_with_flat_router_memory(router_process: tuple[int, int]) -> None:
    pid, port = router_process
    before = memory_kib(pid)["VmRSS"] * 1024
    expected = await asyncio.to_thread(digest_of_repeats, CHUNK, SIZE // len(CHUNK))

    async def body() -> AsyncIterator[bytes]:
        for _ in range(SIZE // len(CHUNK)):
            yield CHUNK

    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        received = hashlib.sha256()
        total = 0
        async with session.get(f"http://127.0.0.1:{port}/download", headers={"Host": "big"}) as resp:
            assert resp.status == 200
            async for chunk in resp.content.iter_chunked(1 << 16):
                received.update(chunk)
                total += len(chunk)
        assert total == SIZE
        assert received.hexdigest() == expected.hexdigest()

        async with session.post(f"http://127.0.0.1:{port}/upload", data=body(), headers={"Host": "big"}) as resp:
            assert resp.status == 200
            answer = await resp.json()
        assert answer == {"bytes": SIZE, "sha256": expected.hexdigest()}

    peak = memory_kib(pid)["VmHWM"] * 1024
    assert peak - before < RSS_GROWTH_LIMIT, f"router RSS grew {(peak - before) / MIB:.1f} MiB"

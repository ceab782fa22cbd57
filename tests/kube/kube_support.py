"""Helpers for the Kubernetes tests: polling a condition with a deadline, and tiny upstreams."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")


async def eventually(
    condition: Callable[[], T | Awaitable[T]], *, timeout: float = 1.0, interval: float = 0.01, what: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        result = condition()
        if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
            result = await result
        last = result  # type: ignore[assignment]
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"not true within {timeout}s: {what or condition} (last: {last!r})")
        await asyncio.sleep(interval)


async def start_upstream(name: str) -> tuple[web.AppRunner, str]:
    """An HTTP server on loopback that answers every request with its own name."""

    async def handle(_: web.Request) -> web.Response:
        return web.Response(text=name)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"

"""Test support: real loopback origins, a router in-process, and raw-socket clients.

Everything here runs real sockets on 127.0.0.1: aiohttp origins that record what they saw,
a raw TCP origin that answers with scripted bytes (for broken-upstream cases), and helpers that
send raw request bytes and read until the router closes. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from router.server import RouterServer
from router.settings import RouterSettings
from router.table import Fallback, Override, Routes, RouteTable, Target
from tests.fuzz.responses import split_responses as strict_split


@dataclasses.dataclass
class Seen:
    method: str
    path: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def _raw_headers(request: web.Request) -> list[tuple[str, str]]:
    return [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers]


class Origin:
    """An aiohttp echo origin that names itself in every answer and records every request."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[Seen] = []
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.handlers: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        special = self.handlers.get(request.path)
        if special is not None:
            self.seen.append(Seen(request.method, request.path_qs, _raw_headers(request), b""))
            return await special(request)
        body = await request.read()
        self.seen.append(Seen(request.method, request.path_qs, _raw_headers(request), body))
        payload = {
            "origin": self.name,
            "method": request.method,
            "path": request.path_qs,
            "body_len": len(body),
            "baggage": request.headers.getall("baggage", []),
        }
        return web.json_response(payload)

    async def start(self) -> None:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Room for a maximal W3C baggage header (8192 bytes) and then some.
        limits: dict[str, Any] = {"max_field_size": 65536, "max_line_size": 65536}
        self.runner = web.AppRunner(app, access_log=None, **limits)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class RawOrigin:
    """A TCP origin that reads one request head and answers with scripted bytes."""

    def __init__(self, script: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]) -> None:
        self.script = script
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.connections = 0
        self.requests: list[bytes] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()

    async def __aenter__(self) -> RawOrigin:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


def make_table(services: dict[str, dict[str, Any]], version: int = 1) -> RouteTable:
    """Compact table construction: {"a": {"baseline": url, "overrides": {"alice": url|dict}}}."""
    built = {}
    for name, spec in services.items():
        overrides = {}
        for key, ov in spec.get("overrides", {}).items():
            if isinstance(ov, str):
                ov = {"url": ov}
            overrides[key] = Override(
                key=key,
                target=Target(ov["url"]),
                ready=ov.get("ready", True),
                expires_at=ov.get("expires_at"),
                fallback=Fallback(ov.get("fallback", "error")),
            )
        built[name] = Routes(name, Target(spec["baseline"]), overrides, tuple(spec.get("hosts", ())))
    return RouteTable(built, version=version, sources=("test",))


@contextlib.asynccontextmanager
async def running_router(
    table: RouteTable, settings: RouterSettings | None = None, admin: bool = False, tracer: Any = None
) -> AsyncIterator[RouterServer]:
    """A router in-process on a loopback port; ``tracer`` a ``router.tracing.RequestTracer``."""
    server = RouterServer(settings or RouterSettings(), table, tracer=tracer)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0) if admin else None)
    try:
        yield server
    finally:
        await server.close(drain=0.5)


async def exchange(port: int, raw: bytes, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send ``raw``, read until the peer closes or ``timeout``; (bytes read, closed by peer)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    chunks = []
    closed = False
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    try:
        while True:
            remaining = end - loop.time()
            if remaining <= 0:
                break
            try:
                chunk = await asyncio.wait_for(reader.read(65536), remaining)
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
    except ConnectionResetError:
        closed = True
    finally:
        writer.close()
    return b"".join(chunks), closed


def status_of(response: bytes) -> int:
    line = response.split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


def split_responses(
    data: bytes, head_requests: frozenset[int] = frozenset()
) -> list[tuple[int, dict[str, str], bytes]]:
    """The responses in ``data`` as (status, headers by lower-case name, body), split by the fuzz
    harness's strict splitter (tests/fuzz/responses.py): a response that does not parse, or is cut
    short, fails the test instead of being read as far as it goes.

    ``head_requests`` holds the indexes of responses to HEAD requests, which carry no body.
    """
    responses, problem = strict_split(data, lambda i, status: i in head_requests, collections.Counter())
    assert problem is None, problem
    return [
        (r.status, {k.decode().strip().lower(): v.decode().strip() for k, v in r.headers}, r.body) for r in responses
    ]


def body_json(body: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(body)
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0])
    return fields


async def start_router(routes: Path, *extra: str) -> tuple[asyncio.subprocess.Process, int, int]:
    """The real CLI in its own process; returns (process, proxy port, admin port) once ready."""
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devstack", "router", "--routes", str(routes),
        "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--log-level", "WARNING",
        "--access-log", "off", *extra,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )  # fmt: skip
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(f"http://127.0.0.1:{admin}/readyz") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            assert loop.time() < deadline, "router did not become ready"
            await asyncio.sleep(0.05)
    return proc, port, admin


def digest_of_repeats(chunk: bytes, count: int) -> hashlib._Hash:
    """SHA-256 of ``chunk`` repeated; run in a thread, a GiB of hashing would block the loop."""
    digest = hashlib.sha256()
    for _ in range(count):
        digest.update(chunk)
    return digest


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST, not a FIN: SO_LINGER with a zero timeout, then close."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()

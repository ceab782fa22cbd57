"""Test support: real loopback origins, a router in-process, and raw-socket clients.

Everything here runs real sockets on 127.0.0.1: aiohttp origins that record what they saw,
a raw TCP origin that answers with scripted bytes (for broken-upstream cases), and helpers that
send raw request bytes and read until the router closes. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import dataclasses
import enum
import functools
import hashlib
import itertools
import json
import os
import socket
import struct
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar, cast

import aiohttp
from aiohttp import web

from controller.publish import PublishSettings, RoutePublisher, make_publish_app
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
    """Compact table construction: {"a": {"baseline": url, "overrides": {"alice": url|dict}}}
    (``"protocol": "h2c"`` for a gRPC service)."""
    built = {}
    for name, spec in services.items():
        overrides = {}
        for key, ov in spec.get("overrides", {}).items():
            if isinstance(ov, str):
                ov = {"url": ov}
            overrides[key] = Override(
                key=key,
                target=Target(ov["url"], spec.get("protocol", "http1")),
                ready=ov.get("ready", True),
                expires_at=ov.get("expires_at"),
                fallback=Fallback(ov.get("fallback", "error")),
            )
        baseline = Target(spec["baseline"], spec.get("protocol", "http1"))
        built[name] = Routes(name, baseline, overrides, tuple(spec.get("hosts", ())))
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


@contextlib.asynccontextmanager
async def serve_controller(
    publisher: RoutePublisher, *, settings: PublishSettings | None = None, middlewares: Sequence[Any] = ()
) -> AsyncIterator[str]:
    """A controller's feed and health endpoints (``controller.publish``) for ``publisher`` on a
    loopback port; yields its base URL."""
    app = make_publish_app(publisher, readiness=lambda: (True, {}), settings=settings)
    app.middlewares.extend(middlewares)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


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


_P = ParamSpec("_P")
_R = TypeVar("_R")


async def in_thread(fn: Callable[_P, _R], /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
    """``asyncio.to_thread`` (the caller's context included) on a daemon thread of its own: a
    blocking client (grpcio, curl) that hangs fails its test by pytest-timeout instead of also
    hanging the loop's close, which joins the default executor's threads, and the rest of the run."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_R] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():
            outcome()

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the awaiting test, as to_thread would
            outcome: Callable[[], None] = functools.partial(future.set_exception, exc)
        else:
            outcome = functools.partial(future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop closed: the test has long failed
            loop.call_soon_threadsafe(settle, outcome)

    context = contextvars.copy_context()  # as to_thread: the caller's context vars go with the call
    name = f"in_thread:{getattr(fn, '__name__', 'call')}"
    threading.Thread(target=context.run, args=(run,), name=name, daemon=True).start()
    return await future


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


# -- HTTP/2 on the wire: frames built and parsed by hand, and a raw client end ----------------------

H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class H2Type(enum.IntEnum):
    """Frame types (RFC 9113 6)."""

    DATA = 0x0
    HEADERS = 0x1
    PRIORITY = 0x2
    RST_STREAM = 0x3
    SETTINGS = 0x4
    PUSH_PROMISE = 0x5
    PING = 0x6
    GOAWAY = 0x7
    WINDOW_UPDATE = 0x8
    CONTINUATION = 0x9


END_STREAM: Final = 0x1
ACK: Final = 0x1
"""SETTINGS and PING use the bit END_STREAM uses on DATA and HEADERS."""
END_HEADERS: Final = 0x4
PADDED: Final = 0x8
PRIORITY: Final = 0x20
MAX_FRAME: Final = 16384
"""SETTINGS_MAX_FRAME_SIZE's initial value: the largest frame a peer must accept unasked."""


def h2_frame(kind: int, flags: int, stream_id: int, payload: bytes = b"", *, length: int | None = None) -> bytes:
    """One frame (RFC 9113 4.1), checked for nothing, so anything can be sent; ``length`` lies
    about the payload's size when given."""
    size = len(payload) if length is None else length
    return size.to_bytes(3, "big") + bytes((kind & 0xFF, flags & 0xFF)) + struct.pack(">I", stream_id) + payload


def h2_settings(*pairs: tuple[int, int], ack: bool = False) -> bytes:
    return h2_frame(H2Type.SETTINGS, ACK if ack else 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def h2_window_update(stream_id: int, increment: int) -> bytes:
    return h2_frame(H2Type.WINDOW_UPDATE, 0, stream_id, struct.pack(">I", increment))


def h2_rst(stream_id: int, code: int) -> bytes:
    return h2_frame(H2Type.RST_STREAM, 0, stream_id, struct.pack(">I", code))


def h2_ping(opaque: bytes = b"\0" * 8, *, ack: bool = False) -> bytes:
    return h2_frame(H2Type.PING, ACK if ack else 0, 0, opaque)


def h2_goaway(last_stream_id: int, code: int) -> bytes:
    return h2_frame(H2Type.GOAWAY, 0, 0, struct.pack(">II", last_stream_id, code))


def h2_request_fields(
    authority: bytes, path: bytes, method: bytes = b"GET", extra: Sequence[tuple[bytes, bytes]] = ()
) -> list[tuple[bytes, bytes]]:
    return [(b":method", method), (b":scheme", b"http"), (b":authority", authority), (b":path", path), *extra]


def h2_header_block(stream_id: int, block: bytes, *, end_stream: bool, frame_size: int = MAX_FRAME) -> bytes:
    """A header block as HEADERS and, past ``frame_size``, CONTINUATION frames."""
    first, rest = block[:frame_size], block[frame_size:]
    pieces = [rest[i : i + frame_size] for i in range(0, len(rest), frame_size)]
    flags = (END_STREAM if end_stream else 0) | (0 if pieces else END_HEADERS)
    out = [h2_frame(H2Type.HEADERS, flags, stream_id, first)]
    for i, piece in enumerate(pieces):
        out.append(h2_frame(H2Type.CONTINUATION, END_HEADERS if i == len(pieces) - 1 else 0, stream_id, piece))
    return b"".join(out)


@dataclasses.dataclass(frozen=True, slots=True)
class H2Frame:
    """A frame as received: its type, flags, stream and payload (padding left in)."""

    kind: int
    flags: int
    stream_id: int
    payload: bytes

    @property
    def error_code(self) -> int:
        """A GOAWAY's or RST_STREAM's error code."""
        at = 4 if self.kind == H2Type.GOAWAY else 0
        return int.from_bytes(self.payload[at : at + 4], "big")

    @property
    def last_stream_id(self) -> int:
        """A GOAWAY's last stream id."""
        return int.from_bytes(self.payload[:4], "big") & 0x7FFFFFFF

    def settings(self) -> dict[int, int]:
        return {k: v for k, v in (struct.unpack_from(">HI", self.payload, i) for i in range(0, len(self.payload), 6))}


def parse_h2_frames(buffer: bytearray) -> list[H2Frame]:
    """The complete frames at the start of ``buffer``, consumed from it."""
    frames = []
    while len(buffer) >= 9:
        size = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + size:
            break
        stream_id = int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        frames.append(H2Frame(buffer[3], buffer[4], stream_id, bytes(buffer[9 : 9 + size])))
        del buffer[: 9 + size]
    return frames


class H2Wire(asyncio.Protocol):
    """The raw client end of an HTTP/2 connection: sends whatever bytes it is given and parses
    every frame the router sends back, noting the router's FIN or reset."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.frames: list[H2Frame] = []
        self.buffer = bytearray()
        self.closed = False
        self.wake = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._pings = itertools.count(1)

    @classmethod
    async def connect(
        cls, address: tuple[str, int], *, preface: bytes = H2_PREFACE + h2_settings(), local_addr: str | None = None
    ) -> H2Wire:
        loop = asyncio.get_running_loop()
        bind = (local_addr, 0) if local_addr is not None else None
        _, wire = await loop.create_connection(cls, *address, local_addr=bind)
        if preface:
            wire.send(preface)
        return wire

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.frames += parse_h2_frames(self.buffer)
        self.wake.set()

    def eof_received(self) -> bool:
        self.closed = True
        self.wake.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._writable.set()
        self.wake.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def send(self, data: bytes) -> bool:
        """Write ``data``; False once the connection is gone (the router closed or reset it)."""
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            return False
        transport.write(data)
        return True

    async def drain(self, timeout: float = 5.0) -> None:
        """Wait until the transport takes more (the router reads again) or the connection ends."""
        await asyncio.wait_for(self._writable.wait(), timeout)

    async def until(self, predicate: Callable[[H2Wire], bool], timeout: float) -> bool:
        """Wait for ``predicate(self)`` (checked as frames arrive) or for the connection to end;
        whether the predicate held."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while not predicate(self):
            if self.closed or loop.time() >= end:
                return predicate(self)
            self.wake.clear()
            try:
                await asyncio.wait_for(self.wake.wait(), end - loop.time())
            except TimeoutError:
                pass
        return True

    async def roundtrip(self, timeout: float = 5.0) -> bool:
        """Send a PING and wait for its ACK: the router has processed everything sent before it.
        False when the connection ended first."""
        opaque = struct.pack(">Q", next(self._pings))
        if not self.send(h2_ping(opaque)):
            return False
        return await self.until(
            lambda w: any(f.kind == H2Type.PING and f.flags & ACK and f.payload == opaque for f in w.frames), timeout
        )

    @property
    def goaway(self) -> H2Frame | None:
        return next((f for f in self.frames if f.kind == H2Type.GOAWAY), None)

    def of_kind(self, kind: int) -> list[H2Frame]:
        return [f for f in self.frames if f.kind == kind]

    def resets(self) -> dict[int, int]:
        """Stream → the error code of the router's RST_STREAM for it."""
        return {f.stream_id: f.error_code for f in self.frames if f.kind == H2Type.RST_STREAM}

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

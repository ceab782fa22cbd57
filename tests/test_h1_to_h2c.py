"""HTTP/1.1 clients reach services whose upstreams speak only h2c (``router.h1bridge``).

The upstreams here are real HTTP/2 servers on loopback (the ``h2`` state machine over asyncio,
the one HTTP/2 library the project already depends on), answering plain HTTP requests, not gRPC;
the clients are aiohttp and raw sockets speaking HTTP/1.1 and 1.0. What is held: each request is
routed by its own key over the shared multiplexed connections, bodies of every framing cross both
ways whole (megabytes, within the windows), the response comes back framed for the client (its
length kept, chunked when unknown, to the close for HTTP/1.0, none for HEAD), keep-alive holds,
an upstream's reset or silence is the router's own 502/504, and a gRPC call over HTTP/1.1 is
refused instead of losing its trailers.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import socket
from collections.abc import AsyncIterator, Callable

import aiohttp
import h2.config
import h2.connection
import h2.events
import pytest

from router.settings import RouterSettings, Timeouts
from tests.support import exchange, make_table, reset, running_router, split_responses, status_of

BIG = 2 * 1024 * 1024 + 7
HUGE = 16 * 1024 * 1024


@functools.cache
def _payload(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + b"x" * (size % 256)


@functools.cache
def _digest(size: int) -> bytes:
    return hashlib.sha256(_payload(size)).hexdigest().encode()


class H2Origin(asyncio.Protocol):
    """One h2c connection of an ``H2Server``: answers each request by its path once it has ended."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.pending: dict[int, tuple[bytes | memoryview, list[tuple[bytes, bytes]] | None]] = {}
        """Response bytes waiting for the window, and the trailers to send after them."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.conn.initiate_connection()
        self._flush()

    def data_received(self, data: bytes) -> None:
        for event in self.conn.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                self.heads[event.stream_id] = dict(event.headers)  # type: ignore[arg-type]
                self.bodies[event.stream_id] = bytearray()  # (answered at its StreamEnded)
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._answer(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                for stream_id in list(self.pending):
                    self._send(stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.pending.pop(event.stream_id, None)
                self.server.resets.append(event.stream_id)
        self._flush()

    def _answer(self, stream_id: int) -> None:
        head = self.heads[stream_id]
        body = bytes(self.bodies[stream_id])
        method, path = head[b":method"], head[b":path"]
        self.server.seen.append((method.decode(), path.decode(), {k.decode(): v.decode() for k, v in head.items()}))
        if path == b"/silent":
            return
        if path == b"/stall":  # a head and a first piece of body, then nothing
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"content-length", b"100")])
            self.conn.send_data(stream_id, b"x" * 10)
            return
        if path == b"/reset":
            self.conn.reset_stream(stream_id, 2)  # INTERNAL_ERROR
            return
        if path.startswith(b"/big"):
            size = HUGE if path == b"/big16" else BIG
            payload = _payload(size)
            self.conn.send_headers(stream_id, [(b":status", b"200"), (b"x-origin", self.server.name.encode())])
            self.pending[stream_id] = (payload, [(b"x-digest", _digest(size))])
            self._send(stream_id)
            return
        answer = json.dumps({
            "origin": self.server.name, "method": method.decode(), "path": path.decode(), "body_len": len(body),
            "sha": hashlib.sha256(body).hexdigest(), "baggage": head.get(b"baggage", b"").decode(),
        }).encode()  # fmt: skip
        if method == b"HEAD":
            self.conn.send_headers(
                stream_id, [(b":status", b"200"), (b"content-length", b"%d" % len(answer))], end_stream=True
            )
            return
        if path == b"/empty":
            self.conn.send_headers(stream_id, [(b":status", b"204"), (b"x-origin", self.server.name.encode())], True)
            return
        fields = [(b":status", b"201" if method == b"POST" else b"200"), (b"x-origin", self.server.name.encode())]
        if path != b"/unsized":
            fields.append((b"content-length", b"%d" % len(answer)))
        self.conn.send_headers(stream_id, fields)
        self.pending[stream_id] = (answer, [(b"x-trailer", b"dropped")] if path == b"/unsized" else None)
        self._send(stream_id)

    def _send(self, stream_id: int) -> None:
        data, trailers = self.pending[stream_id]
        view = memoryview(data)  # (slicing the bytes themselves would copy the rest every frame)
        while view:
            window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
            if window <= 0:
                self.pending[stream_id] = (view, trailers)
                return
            self.conn.send_data(stream_id, bytes(view[:window]))
            view = view[window:]
        del self.pending[stream_id]
        if trailers is not None:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        else:
            self.conn.end_stream(stream_id)

    def _flush(self) -> None:
        if self.transport is not None:
            self.transport.write(self.conn.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class H2Server:
    def __init__(self, name: str) -> None:
        self.name = name
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.resets: list[int] = []
        self.connections = 0
        self.server: asyncio.Server | None = None

    def _protocol(self) -> H2Origin:
        self.connections += 1
        return H2Origin(self)

    async def start(self) -> str:
        self.server = await asyncio.get_running_loop().create_server(self._protocol, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def h2_origins() -> AsyncIterator[tuple[H2Server, H2Server, dict[str, str]]]:
    base, alice = H2Server("base"), H2Server("alice")
    urls = {"base": await base.start(), "alice": await alice.start()}
    yield base, alice, urls
    await base.close()
    await alice.close()


def _table(urls: dict[str, str]) -> object:
    return make_table({
        "web": {"baseline": urls["base"], "overrides": {"alice": urls["alice"]}, "hosts": ["web"], "protocol": "h2c"},
    })  # fmt: skip


async def test_each_request_is_routed_by_its_key_over_shared_connections(
    h2_origins: tuple[H2Server, H2Server, dict[str, str]],
) -> None:
    base, alice, urls = h2_origins
    async with running_router(_table(urls)) as router:  # type: ignore[arg-type]
        port = router.address[1]
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=4)) as session:

            async def get(key: str | None, path: str) -> tuple[int, dict[str, object], str]:
                headers = {"Host": "web", **({"baggage": f"devstack={key}"} if key else {})}
                async with session.get(f"http://127.0.0.1:{port}{path}", headers=headers) as response:
                    body = await response.json(content_type=None)
                    return response.status, body, response.headers.get("Connection", "")

            answers = await asyncio.gather(*(get(key, f"/n/{i}") for i in range(12) for key in ("alice", None)))
    assert [(status, body["origin"]) for status, body, _ in answers] == [(200, "alice"), (200, "base")] * 12
    assert all(connection.lower() != "close" for _, _, connection in answers)
    # Twelve requests each, over one multiplexed connection per upstream.
    assert (len(alice.seen), len(base.seen), alice.connections, base.connections) == (12, 12, 1, 1)
    _, _, fields = alice.seen[0]
    assert fields["baggage"] == "devstack=alice" and fields[":authority"] == "web"
    assert fields["x-forwarded-proto"] == "http" and "host" not in fields and "connection" not in fields


async def test_bodies_of_every_framing_cross_both_ways_whole(
    h2_origins: tuple[H2Server, H2Server, dict[str, str]],
) -> None:
    base, _, urls = h2_origins
    upload = bytes(range(251)) * (BIG // 251)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(upload), 65536):
            yield upload[start : start + 65536]

    async with running_router(_table(urls)) as router:  # type: ignore[arg-type]
        url = f"http://127.0.0.1:{router.address[1]}"
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{url}/sized", data=upload, headers={"Host": "web"}) as response:
                sized = (response.status, await response.json(content_type=None))
            async with session.post(f"{url}/chunked", data=chunks(), headers={"Host": "web"}) as response:
                chunked = (
                    response.status,
                    response.headers.get("Transfer-Encoding"),
                    await response.json(content_type=None),
                )
            async with session.get(f"{url}/big", headers={"Host": "web"}) as response:
                big = await response.read()
                big_head = (response.status, response.headers.get("Transfer-Encoding"), response.headers["x-origin"])
            async with session.get(f"{url}/unsized", headers={"Host": "web"}) as response:
                unsized = (
                    response.status,
                    response.headers.get("Transfer-Encoding"),
                    await response.json(content_type=None),
                )
                assert "x-trailer" not in response.headers
    digest = hashlib.sha256(upload).hexdigest()
    assert sized[0] == 201 and (sized[1]["body_len"], sized[1]["sha"]) == (len(upload), digest)
    assert chunked[0] == 201 and chunked[1] is None and chunked[2]["sha"] == digest
    assert big_head == (200, "chunked", "base")
    assert big == _payload(BIG)
    assert unsized[:2] == (200, "chunked") and unsized[2]["path"] == "/unsized"
    assert [path for _, path, _ in base.seen] == ["/sized", "/chunked", "/big", "/unsized"]


async def test_head_204_http10_and_pipelined_requests_are_framed_for_the_client(
    h2_origins: tuple[H2Server, H2Server, dict[str, str]],
) -> None:
    _, _, urls = h2_origins
    async with running_router(_table(urls)) as router:  # type: ignore[arg-type]
        port = router.address[1]
        pipelined, closed = await exchange(
            port,
            b"HEAD /h HTTP/1.1\r\nHost: web\r\n\r\n"
            b"GET /empty HTTP/1.1\r\nHost: web\r\nbaggage: devstack=alice\r\n\r\n"
            b"POST /p HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
            b"GET /last HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n",
            timeout=10,
        )
        old, old_closed = await exchange(port, b"GET /unsized HTTP/1.0\r\nHost: web\r\n\r\n", timeout=10)
    head, empty, post, last = split_responses(pipelined, head_requests=frozenset({0}))
    assert closed and old_closed
    assert head[0] == 200 and int(head[1]["content-length"]) > 0 and head[2] == b""
    assert empty[0] == 204 and empty[1]["x-origin"] == "alice" and empty[2] == b""
    assert post[0] == 201 and json.loads(post[2])["sha"] == hashlib.sha256(b"hello").hexdigest()
    assert last[0] == 200 and last[1]["connection"] == "close"
    # HTTP/1.0 and a body of unknown length: read to the close, never chunked.
    assert status_of(old) == 200 and b"chunked" not in old.split(b"\r\n\r\n", 1)[0].lower()
    assert json.loads(old.split(b"\r\n\r\n", 1)[1])["path"] == "/unsized"


async def test_upstream_reset_silence_and_absence_are_the_routers_own_answers(
    h2_origins: tuple[H2Server, H2Server, dict[str, str]],
) -> None:
    base, _, urls = h2_origins
    settings = RouterSettings(timeouts=Timeouts(upstream_response=0.5))
    down = {**urls, "alice": "http://127.0.0.1:9"}  # discard port: nobody listens there
    async with running_router(_table(down), settings) as router:  # type: ignore[arg-type]
        port = router.address[1]
        was_reset, _ = await exchange(port, b"GET /reset HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", timeout=5)
        silent, _ = await exchange(port, b"GET /silent HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", timeout=5)
        alice = b"GET / HTTP/1.1\r\nHost: web\r\nbaggage: devstack=alice\r\nConnection: close\r\n\r\n"
        absent, _ = await exchange(port, alice, timeout=5)
        after, _ = await exchange(port, b"GET /fine HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n", timeout=5)
        stalled, stalled_closed = await exchange(port, b"GET /stall HTTP/1.1\r\nHost: web\r\n\r\n", timeout=5)
    assert (status_of(was_reset), json.loads(was_reset.split(b"\r\n\r\n", 1)[1])["reason"]) == (502, "reset")
    assert (status_of(silent), json.loads(silent.split(b"\r\n\r\n", 1)[1])["reason"]) == (504, "timeout")
    assert (status_of(absent), json.loads(absent.split(b"\r\n\r\n", 1)[1])["reason"]) == (502, "connect")
    assert status_of(after) == 200
    # Mid-body silence: the client gets the head and what came, then the connection is cut (a
    # truncated body is never passed off as whole), well before its own 5 s wait.
    assert status_of(stalled) == 200 and stalled.endswith(b"\r\n\r\n" + b"x" * 10) and stalled_closed
    # The silent and the stalled streams were cancelled upstream when the router gave up on them.
    assert len(base.resets) == 2


async def test_a_grpc_call_over_http1_is_refused_not_stripped_of_its_trailers(
    h2_origins: tuple[H2Server, H2Server, dict[str, str]],
) -> None:
    base, _, urls = h2_origins
    async with running_router(_table(urls)) as router:  # type: ignore[arg-type]
        raw, _ = await exchange(
            router.address[1],
            b"POST /pkg.Svc/Call HTTP/1.1\r\nHost: web\r\nContent-Type: application/grpc\r\n"
            b"Content-Length: 5\r\nConnection: close\r\n\r\n\0\0\0\0\0",
            timeout=5,
        )
    assert status_of(raw) == 502
    assert json.loads(raw.split(b"\r\n\r\n", 1)[1])["reason"] == "grpc-over-http1"
    assert base.seen == []


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_client_that_leaves_cancels_its_upstream_stream(
    h2_origins: tuple[H2Server, H2Server, dict[str, str]],
) -> None:
    base, _, urls = h2_origins
    async with running_router(_table(urls)) as router:  # type: ignore[arg-type]
        _, writer = await asyncio.open_connection("127.0.0.1", router.address[1])
        writer.write(b"GET /silent HTTP/1.1\r\nHost: web\r\n\r\n")
        await writer.drain()
        await _until(lambda: len(base.seen) == 1)
        reset(writer)  # (a FIN alone leaves the router waiting to deliver the response)
        await _until(lambda: len(base.resets) == 1)
        # The connection to the upstream is still good for the next client.
        again, _ = await exchange(router.address[1], b"GET /x HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
    assert status_of(again) == 200 and base.connections == 1


async def test_a_client_slower_than_the_response_timeout_still_gets_the_whole_body(
    h2_origins: tuple[H2Server, H2Server, dict[str, str]],
) -> None:
    _, _, urls = h2_origins
    _digest(HUGE)  # (made before the clock runs: the origin answers at once)
    settings = RouterSettings(timeouts=Timeouts(upstream_response=0.5))
    async with running_router(_table(urls), settings) as router:  # type: ignore[arg-type]
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # (before connecting: no autotuning)
        sock.connect(("127.0.0.1", router.address[1]))
        sock.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 16)
        writer.transport.pause_reading()  # type: ignore[attr-defined]
        writer.write(b"GET /big16 HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        await writer.drain()
        # The slowness under test: nothing read for several response timeouts, while the
        # router's socket and the upstream's window fill up and the upstream falls silent.
        await asyncio.sleep(1.5)
        writer.transport.resume_reading()  # type: ignore[attr-defined]
        data = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert status_of(head) == 200 and b"transfer-encoding: chunked" in head.lower()
    chunks, at = bytearray(), 0
    while True:
        end = body.index(b"\r\n", at)
        size = int(body[at:end], 16)
        if not size:
            break
        chunks += body[end + 2 : end + 2 + size]
        at = end + 4 + size
    assert bytes(chunks) == _payload(HUGE)

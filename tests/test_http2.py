"""HTTP/2 and gRPC through the router: every stream routed by its own key.

Real routers in-process on loopback, real aiohttp origins (HTTP/1.1 upstreams) and real grpcio
services (h2c upstreams, ``protocol: h2c``), reached by an h2 client (tests/h2_client.py) and by
grpcio clients: prior knowledge on the normal listener, CONNECT through a sidecar the way
``grpc_proxy`` makes grpc-core do it, and TLS with ALPN at the ingress. grpcio's clients block,
so they run in threads while the router serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from router.server import RouterServer
from router.settings import Mode, RouterSettings, Timeouts
from tests.grpc_support import EchoService, channel, key_metadata, method
from tests.h2_client import H2Client, Response
from tests.support import Origin, free_port, in_thread, make_table, running_router


@pytest.fixture
def echo() -> Iterator[tuple[EchoService, EchoService]]:
    base, alice = EchoService("base").start(), EchoService("alice").start()
    yield base, alice
    base.stop()
    alice.stop()


@pytest.fixture
async def origins() -> AsyncIterator[tuple[Origin, Origin]]:
    base, alice = Origin("base"), Origin("alice")
    await base.start()
    await alice.start()
    yield base, alice
    await base.close()
    await alice.close()


def _table(origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService] | None = None) -> object:
    services: dict[str, dict[str, object]] = {
        "web": {"baseline": origins[0].url, "overrides": {"alice": origins[1].url}, "hosts": ["web"]},
    }
    if echo is not None:
        services["echo"] = {
            "baseline": echo[0].url,
            "overrides": {
                "alice": echo[1].url,
                "carol": {"url": echo[1].url, "ready": False},
                "dave": f"http://127.0.0.1:{free_port()}",  # nobody listens there
            },
            "hosts": ["echo"],
            "protocol": "h2c",
        }
    return make_table(services)


async def test_one_connection_routes_each_stream_by_its_own_key(origins: tuple[Origin, Origin]) -> None:
    async with running_router(_table(origins)) as router:  # type: ignore[arg-type]
        client = await H2Client.connect(router.address[1])
        try:
            calls = {
                key: client.start("web", f"/k/{key}", [("baggage", f"devstack={key}")] if key else [])
                for key in ("alice", "bob", "")
            }
            for response in calls.values():
                await asyncio.wait_for(response.done.wait(), 10)
        finally:
            await client.close()
    served = {key: json.loads(response.body)["origin"] for key, response in calls.items()}
    assert served == {"alice": "alice", "bob": "base", "": "base"}
    assert all(response.status == 200 for response in calls.values())
    # One connection, three streams: the origins saw them with the router's forwarding rules.
    (seen_alice,) = origins[1].seen
    assert seen_alice.path == "/k/alice" and seen_alice.header("baggage") == ["devstack=alice"]
    assert seen_alice.header("x-forwarded-proto") == ["http"]
    assert not any(response.headers.get(b"connection") for response in calls.values())


async def test_request_bodies_reach_an_http1_upstream(origins: tuple[Origin, Origin]) -> None:
    async with running_router(_table(origins)) as router:  # type: ignore[arg-type]
        client = await H2Client.connect(router.address[1])
        try:
            # No content-length: the router frames it chunked for the HTTP/1.1 upstream.
            response = await client.request("web", "/upload", method="POST", body=b"x" * 5000)
            sized = await client.request("web", "/sized", [("content-length", "3")], method="PUT", body=b"abc")
        finally:
            await client.close()
    assert json.loads(response.body)["body_len"] == 5000
    assert json.loads(sized.body)["body_len"] == 3
    assert [seen.body for seen in origins[0].seen] == [b"x" * 5000, b"abc"]


async def test_the_routers_own_answers_over_http2(origins: tuple[Origin, Origin]) -> None:
    async with running_router(_table(origins)) as router:  # type: ignore[arg-type]
        client = await H2Client.connect(router.address[1])
        try:
            missing = await client.request("nowhere", "/")
            debug = await client.request("web", "/d", [("baggage", "devstack=alice"), ("x-devstack-debug", "1")])
        finally:
            await client.close()
    assert missing.status == 404
    assert json.loads(missing.body)["reason"] == "no-route"
    assert debug.headers[b"x-devstack-route"].startswith(b"service=web; key=alice")


def _grpc_calls(port: int, authority: str = "echo", **options: object) -> dict[str, object]:
    """Every call type for keys alice, bob and none on one channel (one connection)."""
    results: dict[str, object] = {}
    with channel(port, authority, **options) as ch:  # type: ignore[arg-type]
        unary = method(ch, "Unary")
        for key in ("alice", "bob", None):
            metadata = key_metadata(key)
            reply, call = unary.with_call(b"hi", metadata=metadata, timeout=10)
            results[f"unary-{key}"] = (reply, dict(call.trailing_metadata()))
            results[f"server-{key}"] = list(
                method(ch, "ServerStream", "unary_stream")(b"2", metadata=metadata, timeout=10)
            )
            results[f"client-{key}"] = method(ch, "ClientStream", "stream_unary")(
                iter([b"a" * 10, b"b" * 20]), metadata=metadata, timeout=10
            )
            results[f"bidi-{key}"] = list(
                method(ch, "Bidi", "stream_stream")(iter([b"1", b"2"]), metadata=metadata, timeout=10)
            )
        try:
            unary(b"abort:gone", metadata=key_metadata("alice"), timeout=10)
        except grpc.RpcError as exc:
            results["abort"] = (exc.code(), exc.details(), dict(exc.trailing_metadata() or ()))
    return results


def _check_grpc_calls(results: dict[str, object]) -> None:
    for key, name in (("alice", b"alice"), ("bob", b"base"), (None, b"base")):
        reply, trailers = results[f"unary-{key}"]  # type: ignore[misc]
        assert reply == name + b"|hi|2"
        assert trailers["served-by"] == name.decode()
        assert trailers["blob-bin"] == b"\x00\x01\xfe\xff"  # binary metadata relayed exactly
        assert results[f"server-{key}"] == [name + b":0", name + b":1"]
        assert results[f"client-{key}"] == name + b"|2|30"
        assert results[f"bidi-{key}"] == [name + b":1", name + b":2"]
    code, details, trailers = results["abort"]  # type: ignore[misc]
    assert (code, details) == (grpc.StatusCode.NOT_FOUND, "gone")
    assert trailers["served-by"] == "alice"


async def test_grpc_every_call_type_routed_per_call_on_one_connection(
    origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    async with running_router(_table(origins, echo)) as router:  # type: ignore[arg-type]
        results = await in_thread(_grpc_calls, router.address[1])
        assert router.stats.h2_connections == 1  # every call above shared one connection
    _check_grpc_calls(results)
    # The key reached the services as sent; te: trailers (which gRPC servers insist on) too.
    assert {call["metadata"].get("baggage") for call in echo[1].calls} == {"devstack=alice"}


def _status_of(
    port: int, authority: str, key: str | None, name: str = "Unary", timeout: float = 10
) -> tuple[object, str]:
    with channel(port, authority) as ch:
        try:
            method(ch, name)(b"5", metadata=key_metadata(key), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_grpc_answers_of_the_router_itself(
    origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    async with running_router(_table(origins, echo)) as router:  # type: ignore[arg-type]
        port = router.address[1]
        no_route = await in_thread(_status_of, port, "nowhere", None)
        not_ready = await in_thread(_status_of, port, "echo", "carol")
        down = await in_thread(_status_of, port, "echo", "dave")
        http1_only = await in_thread(_status_of, port, "web", None)
        deadline = await in_thread(_status_of, port, "echo", None, "Slow", 0.5)
    assert no_route == (grpc.StatusCode.UNIMPLEMENTED, "devstack: no-route")
    assert not_ready == (grpc.StatusCode.UNAVAILABLE, "devstack: override-not-ready")
    assert down == (grpc.StatusCode.UNAVAILABLE, "devstack: connect")
    assert http1_only == (grpc.StatusCode.UNAVAILABLE, "devstack: upstream-not-h2c")
    assert deadline[0] == grpc.StatusCode.DEADLINE_EXCEEDED
    # The deadline cancelled the upstream call too (grpc-timeout is forwarded, and the router
    # cancels its stream when the deadline passes first).
    assert await in_thread(echo[0].cancelled.wait, 5)  # off the loop: the router on it sends the cancel


async def test_router_deadline_cancels_the_upstream_call(
    origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    """The router's own grpc-timeout handling: a raw HTTP/2 call whose deadline the upstream
    does not see (the client's grpc-timeout is read by the router) ends DEADLINE_EXCEEDED."""
    async with running_router(_table(origins, echo)) as router:  # type: ignore[arg-type]
        client = await H2Client.connect(router.address[1])
        try:
            started = time.monotonic()
            response = await client.request(
                "echo",
                f"/{'devstack.test.Echo'}/Slow",
                [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "300m")],
                method="POST",
                body=b"\x00\x00\x00\x00\x015",  # one message: "5" (seconds)
            )
            elapsed = time.monotonic() - started
        finally:
            await client.close()
    grpc_status = response.trailers.get(b"grpc-status") or response.headers.get(b"grpc-status")
    assert grpc_status == b"4"
    assert elapsed < 3
    assert await in_thread(echo[0].cancelled.wait, 5)  # off the loop: the router on it sends the cancel


def _cancel_midstream(port: int) -> int:
    with channel(port, "echo") as ch:
        call = method(ch, "Endless", "unary_stream")(b"1024", metadata=key_metadata("alice"))
        received = 0
        for _ in call:
            received += 1
            if received == 5:
                call.cancel()
                break
        return received


async def test_client_cancel_reaches_the_upstream(
    origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    async with running_router(_table(origins, echo)) as router:  # type: ignore[arg-type]
        assert await in_thread(_cancel_midstream, router.address[1]) == 5
        assert await in_thread(echo[1].cancelled.wait, 5)


def _big_unary(port: int, size: int) -> bytes:
    with channel(port, "echo") as ch:
        reply: bytes = method(ch, "Unary")(b"z" * size, metadata=key_metadata("alice"), timeout=30)
        return reply


async def test_messages_of_4_mib_and_more(
    origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    async with running_router(_table(origins, echo)) as router:  # type: ignore[arg-type]
        reply = await in_thread(_big_unary, router.address[1], 6 << 20)
    assert reply.endswith(b"|%d" % (6 << 20)) and reply.startswith(b"alice|")


def _slow_reader(port: int, reads: int) -> None:
    with channel(port, "echo") as ch:
        call = method(ch, "Endless", "unary_stream")(b"65536", metadata=key_metadata("alice"))
        for i, _ in enumerate(call):
            if i + 1 >= reads:
                break
            time.sleep(0.05)
        call.cancel()


async def test_a_slow_reader_slows_the_upstream(
    origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    """Flow control both ways: a client reading 64 KiB messages slowly holds the upstream back;
    the router buffers a bounded amount (its windows and one stream's limit), not the stream."""
    async with running_router(_table(origins, echo)) as router:  # type: ignore[arg-type]
        await in_thread(_slow_reader, router.address[1], 20)
    # 20 messages read in ~1 s; an unthrottled upstream produces about 15,000 a second here (GB/s
    # on loopback). What is in flight is bounded by the windows: the client's (grpcio's, several
    # MiB with BDP probing), the router's (1 MiB per stream plus 256 KiB held), and what grpcio's
    # server queues ahead of its own flow control (measured up to ~40 MiB).
    assert echo[1].streamed < 1500, echo[1].streamed


async def test_an_upstreams_graceful_goaway_loses_no_call(origins: tuple[Origin, Origin]) -> None:
    """grpc-core closes connections older than max_connection_age with a graceful GOAWAY (nginx
    does it every http2_max_requests): calls it had taken finish, calls it never saw are sent
    again on a new connection, none fails."""
    aging = EchoService(
        "aging", options=[("grpc.max_connection_age_ms", 150), ("grpc.max_connection_age_grace_ms", 5000)]
    )
    aging.start()
    table = make_table({"echo": {"baseline": aging.url, "hosts": ["echo"], "protocol": "h2c"}})

    def many_calls(port: int) -> list[bytes]:
        replies = []
        deadline = time.monotonic() + 1.5  # ten connection lifetimes
        with channel(port, "echo") as ch:
            unary = method(ch, "Unary")
            futures = []
            while time.monotonic() < deadline:
                futures += [unary.future(b"g", timeout=10) for _ in range(20)]
                replies += [future.result() for future in futures]
                futures = []
        return replies

    try:
        async with running_router(table) as router:
            replies = await in_thread(many_calls, router.address[1])
            errors = dict(router.stats.upstream_errors)
            assert router.ctx is not None
            opened = router.ctx.h2pool.opened
    finally:
        aging.stop()
    assert len(replies) > 100 and set(replies) == {b"aging|g|1"}
    assert errors == {}
    assert opened >= 3  # the upstream did go away, several times


class _ScriptedOrigin(asyncio.Protocol):
    """One connection of a ``ScriptedUpstream``, on h2's state machine."""

    def __init__(self, upstream: ScriptedUpstream) -> None:
        self.upstream = upstream
        upstream.connections += 1
        self.number = upstream.connections
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding=None))
        self.transport: asyncio.Transport | None = None
        self.requests: dict[int, tuple[str, bytearray]] = {}
        self.gone = False
        self.greeted = self.number == 1 or upstream.greet is None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.h2.initiate_connection()
        if not self.greeted:
            self.upstream.tasks.add(asyncio.ensure_future(self._greet_later()))
        self._flush()

    async def _greet_later(self) -> None:
        assert self.upstream.greet is not None
        await self.upstream.greet.wait()
        self.greeted = True
        self._flush()

    def data_received(self, data: bytes) -> None:
        if self.gone:
            return
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b":path"].decode()
                self.upstream.seen.append((self.number, path))
                if self.number == 1 and self.upstream.goaway_first:
                    self.h2.close_connection(0, last_stream_id=0)  # graceful: nothing seen, go again
                    self.gone = True
                    break
                self.requests[event.stream_id] = (path, bytearray())
            elif isinstance(event, h2.events.DataReceived):
                self.requests[event.stream_id][1].extend(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            if isinstance(event, (h2.events.RequestReceived, h2.events.DataReceived)) and event.stream_ended:
                path, body = self.requests[event.stream_id]
                self.upstream.ended.append((self.number, path, bytes(body)))
                if path != "/hold":
                    self.h2.send_headers(event.stream_id, [(b":status", b"200")], end_stream=True)
        self._flush()

    def _flush(self) -> None:
        if self.greeted and self.transport is not None:
            self.transport.write(self.h2.data_to_send())

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.lost += 1


class ScriptedUpstream:
    """An h2c upstream on loopback that answers each request 200 once it has ended, except
    ``/hold``, which it never answers. ``goaway_first``: its first connection answers the first
    request head with a graceful GOAWAY whose last stream id is 0 (the request goes again
    elsewhere) and reads nothing more. ``greet``: later connections send their SETTINGS only
    once it is set (until then the router has a connection, not yet ready)."""

    def __init__(self, *, goaway_first: bool = False, greet: asyncio.Event | None = None) -> None:
        self.goaway_first = goaway_first
        self.greet = greet
        self.seen: list[tuple[int, str]] = []
        """(connection number, path) of each request head."""
        self.ended: list[tuple[int, str, bytes]] = []
        """(connection number, path, body) of each request that ended."""
        self.connections = 0
        self.lost = 0
        self.tasks: set[asyncio.Future[None]] = set()

    async def start(self) -> object:
        server = await asyncio.get_running_loop().create_server(lambda: _ScriptedOrigin(self), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        return make_table({"echo": {"baseline": url, "hosts": ["echo"], "protocol": "h2c"}})


class _LateConnects:
    """The router's loop, except that ``create_connection`` returns only once ``resume`` is set:
    the connection is up and reading, and the task that opened it has not resumed (what a busy
    loop does for a few turns, stretched here to as long as a test needs)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.resume = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        made = await self._loop.create_connection(*args, **kwargs)
        await self.resume.wait()
        return made


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not met in time"
        await asyncio.sleep(0.01)


ENGINES = pytest.mark.parametrize("engine", ["nghttp2", "h2"])


@ENGINES
async def test_a_stream_arriving_before_its_connections_connect_task_resumes_is_served(engine: str) -> None:
    """The upstream's SETTINGS can be read before the task that opened the connection resumes
    (under load, the graceful-GOAWAY test above lost calls this way): a stream arriving then goes
    out on that connection, instead of waiting for another stream on it to end."""
    upstream = ScriptedUpstream()
    async with running_router(await upstream.start(), RouterSettings(http2_engine=engine)) as router:  # type: ignore[arg-type]
        assert router.ctx is not None
        late = router.ctx.h2pool.loop = _LateConnects(asyncio.get_running_loop())  # type: ignore[assignment]
        client = await H2Client.connect(router.address[1])
        try:
            client.start("echo", "/hold")
            await _until(lambda: upstream.seen == [(1, "/hold")])  # ready, and its connect task held
            after = client.start("echo", "/after")
            await asyncio.wait_for(after.done.wait(), 5)
            late.resume.set()
            later = await client.request("echo", "/later")
        finally:
            late.resume.set()
            await client.close()
    assert (after.status, later.status) == (200, 200)
    assert (upstream.seen, upstream.connections) == ([(1, "/hold"), (1, "/after"), (1, "/later")], 1)


@ENGINES
async def test_a_stream_sent_back_before_its_connections_connect_task_resumes_gets_a_new_one(engine: str) -> None:
    """The connection's graceful GOAWAY can come before the task that opened it resumes: the
    stream above its last stream id goes again on a new connection, opened for it then."""
    upstream = ScriptedUpstream(goaway_first=True)
    async with running_router(await upstream.start(), RouterSettings(http2_engine=engine)) as router:  # type: ignore[arg-type]
        assert router.ctx is not None
        late = router.ctx.h2pool.loop = _LateConnects(asyncio.get_running_loop())  # type: ignore[assignment]
        client = await H2Client.connect(router.address[1])
        try:
            response = client.start("echo", "/again")
            await _until(lambda: upstream.lost == 1)  # the router took the GOAWAY and closed it
            late.resume.set()
            await asyncio.wait_for(response.done.wait(), 5)
        finally:
            late.resume.set()
            await client.close()
    assert response.status == 200
    assert upstream.seen == [(1, "/again"), (2, "/again")]


@ENGINES
async def test_a_request_body_sent_while_its_stream_waits_to_go_again_reaches_the_upstream(engine: str) -> None:
    """A stream the upstream's graceful GOAWAY sent back waits for the next connection; the
    request body its client sends meanwhile goes with it (it used to be dropped, and the
    upstream waited for a body that never came)."""
    greet = asyncio.Event()
    upstream = ScriptedUpstream(goaway_first=True, greet=greet)
    async with running_router(await upstream.start(), RouterSettings(http2_engine=engine)) as router:  # type: ignore[arg-type]
        client = await H2Client.connect(router.address[1])
        try:
            stream_id = client.conn.get_next_available_stream_id()
            fields = [(":method", "POST"), (":scheme", "http"), (":authority", "echo"), (":path", "/upload")]
            client.conn.send_headers(stream_id, fields)
            response = client.responses[stream_id] = Response()
            client.writer.write(client.conn.data_to_send())
            await _until(lambda: upstream.connections == 2)  # sent back; the next one is not ready
            client.conn.send_data(stream_id, b"the body", end_stream=True)
            client.writer.write(client.conn.data_to_send())
            # The router answers this one itself: once it has, it has read the body above.
            assert (await client.request("nowhere", "/")).status == 404
            greet.set()
            await asyncio.wait_for(response.done.wait(), 5)
        finally:
            greet.set()
            await client.close()
    assert response.status == 200
    assert upstream.ended == [(2, "/upload", b"the body")]


async def test_h2c_upgrade_stays_refused(origins: tuple[Origin, Origin]) -> None:
    async with running_router(_table(origins)) as router:  # type: ignore[arg-type]
        reader, writer = await asyncio.open_connection(*router.address)
        writer.write(
            b"GET /up HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200")  # served as a plain HTTP/1.1 request, never switched
    (seen,) = origins[0].seen
    assert not seen.header("upgrade") and not seen.header("http2-settings")


# -- sidecar: CONNECT, as grpc-core sends it with grpc_proxy / http_proxy ---------------------


async def test_sidecar_connect_serves_grpc_streams_by_their_own_keys(
    origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    settings = RouterSettings(mode=Mode.SIDECAR)
    async with running_router(_table(origins, echo), settings) as router:  # type: ignore[arg-type]
        proxy = f"http://127.0.0.1:{router.address[1]}"

        def through_proxy() -> dict[str, object]:
            # The channel names the service; grpc-core sends CONNECT echo:50051 to the proxy.
            with grpc.insecure_channel("echo:50051", options=[("grpc.http_proxy", proxy)]) as ch:
                return {
                    key: method(ch, "Unary")(b"p", metadata=key_metadata(key), timeout=10)
                    for key in ("alice", "bob", "")
                }

        replies = await in_thread(through_proxy)
    assert replies == {"alice": b"alice|p|1", "bob": b"base|p|1", "": b"base|p|1"}


async def test_connect_only_to_services_in_the_table(origins: tuple[Origin, Origin]) -> None:
    async def connect(router: RouterServer, authority: bytes, then: bytes = b"") -> bytes:
        reader, writer = await asyncio.open_connection(*router.address)
        writer.write(b"CONNECT %s HTTP/1.1\r\nHost: %s\r\n\r\n%s" % (authority, authority, then))
        try:
            return await asyncio.wait_for(reader.read(65536) if not then else _read_all(reader), 5)
        finally:
            writer.close()

    async with running_router(_table(origins), RouterSettings(mode=Mode.SIDECAR)) as sidecar:  # type: ignore[arg-type]
        evil = await connect(sidecar, b"evil.example:443")
        ok = await connect(
            sidecar,
            b"web:80",
            b"GET /after HTTP/1.1\r\nHost: web\r\nbaggage: devstack=alice\r\nConnection: close\r\n\r\n",
        )
    async with running_router(_table(origins)) as ingress:  # type: ignore[arg-type]
        refused = await connect(ingress, b"web:80")
    assert evil.startswith(b"HTTP/1.1 403")
    assert refused.startswith(b"HTTP/1.1 405")
    assert ok.startswith(b"HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.1 200")
    assert b'"origin":"alice"' in ok.replace(b" ", b"")


async def _read_all(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while chunk := await reader.read(65536):
        data += chunk
    return data


# -- TLS at the ingress: ALPN h2 and http/1.1, certificate reload ---------------------------------


def _certificate(directory: Path, name: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-days", "2", "-subj", f"/CN={name}",
         "-addext", "subjectAltName=DNS:echo,DNS:web,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_ingress_alpn_and_certificate_reload(
    tmp_path: Path, origins: tuple[Origin, Origin], echo: tuple[EchoService, EchoService]
) -> None:
    first_cert, first_key = await in_thread(_certificate, tmp_path, "first")
    second_cert, second_key = await in_thread(_certificate, tmp_path, "second")
    live_cert, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    live_cert.write_bytes(first_cert.read_bytes())
    live_key.write_bytes(first_key.read_bytes())
    settings = RouterSettings(tls_cert=str(live_cert), tls_key=str(live_key))
    async with running_router(_table(origins, echo), settings) as router:  # type: ignore[arg-type]
        port = router.address[1]
        trust = ssl.create_default_context(cafile=str(first_cert))
        trust.set_alpn_protocols(["h2"])
        client = await H2Client.connect(port, tls=trust, server_name="web")
        before = await client.request("web", "/tls", [("baggage", "devstack=alice")])

        def grpc_over_tls() -> bytes:
            creds = grpc.ssl_channel_credentials(first_cert.read_bytes())
            options = [("grpc.default_authority", "echo"), ("grpc.ssl_target_name_override", "echo")]
            with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options) as ch:
                reply: bytes = method(ch, "Unary")(b"t", metadata=key_metadata("alice"), timeout=10)
                return reply

        assert await in_thread(grpc_over_tls) == b"alice|t|1"
        # HTTP/1.1 by ALPN on the same listener.
        plain = ssl.create_default_context(cafile=str(first_cert))
        plain.set_alpn_protocols(["http/1.1"])
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=plain, server_hostname="web")
        writer.write(b"GET /one HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        http1 = await asyncio.wait_for(_read_all(reader), 5)
        writer.close()
        # A renewal: the files change; new handshakes get the new certificate, the open
        # HTTP/2 connection keeps serving.
        live_cert.write_bytes(second_cert.read_bytes())
        live_key.write_bytes(second_key.read_bytes())
        assert router.tls is not None and router.tls.check()
        after = await client.request("web", "/still", [("baggage", "devstack=alice")])
        await client.close()
        renewed = ssl.create_default_context(cafile=str(second_cert))
        renewed.set_alpn_protocols(["h2"])
        fresh = await H2Client.connect(port, tls=renewed, server_name="web")
        served = await fresh.request("web", "/new")
        await fresh.close()
    assert json.loads(before.body)["origin"] == "alice" and json.loads(after.body)["origin"] == "alice"
    assert json.loads(served.body)["origin"] == "base"
    assert http1.startswith(b"HTTP/1.1 200")
    assert [seen.header("x-forwarded-proto") for seen in origins[1].seen][:1] == [["https"]]


async def test_tls_bad_renewal_keeps_the_last_good_certificate(tmp_path: Path) -> None:
    cert, key = await in_thread(_certificate, tmp_path, "good")
    settings = RouterSettings(tls_cert=str(cert), tls_key=str(key), timeouts=Timeouts())
    server = RouterServer(settings)
    await server.start(("127.0.0.1", 0))
    try:
        cert.write_text("not a certificate")
        assert server.tls is not None and not server.tls.check()
        assert server.tls.loads == 1
    finally:
        await server.close(drain=0.1)

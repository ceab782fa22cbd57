"""Upgraded connections: tunnels end when either side ends, and only allowed protocols tunnel.

A tunnel (after an upstream's ``101``) holds a pooled upstream connection, so every way it can
end must give that slot back: a FIN from either side is passed on as a half-close and the tunnel
closes once both directions are done, a reset on either side closes both, and a forgotten tunnel
closes after ``--tunnel-idle-timeout``. Only ``Upgrade: websocket`` (plus what ``--upgrade`` adds)
from HTTP/1.1 clients opens one; anything else (h2c above all) is forwarded as a plain request.
Every origin here is a real loopback server; waits poll a condition with a deadline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import pytest
from aiohttp import web

from router.server import RouterServer
from router.settings import Limits, RouterSettings, Timeouts
from tests.support import (
    Origin,
    RawOrigin,
    exchange,
    make_table,
    read_head,
    reset,
    running_router,
    split_responses,
    status_of,
)

UPGRADE = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"timed out waiting until {what}"
        await asyncio.sleep(0.01)


async def all_released(server: RouterServer) -> None:
    """Every client connection, upstream connection and tunnel of the router is gone."""
    stats = server.stats
    await until(
        lambda: (stats.open_connections, stats.upstream_connections, stats.tunnels_open) == (0, 0, 0),
        f"released (open={stats.open_connections}, upstream={stats.upstream_connections}, "
        f"tunnels={stats.tunnels_open})",
    )


async def open_tunnel(server: RouterServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(UPGRADE)
    head = await asyncio.wait_for(read_head(reader), 5)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return reader, writer


async def test_dropped_websockets_give_their_pool_slots_back(origins: dict[str, Origin]) -> None:
    """The issue's reproduction: two WebSocket clients that simply close used to hold both
    connections of a size-2 pool forever, so the next request waited and the one after got 503."""

    async def ws_echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(msg.data)
        return ws

    origins["baseline"].handlers["/ws"] = ws_echo
    settings = RouterSettings(limits=Limits(upstream_pool_size=2, upstream_pool_queue=1))
    async with running_router(make_table({"a": {"baseline": origins["baseline"].url}}), settings, admin=True) as server:
        for _ in range(2):
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
            )
            assert (await asyncio.wait_for(read_head(reader), 5)).startswith(b"HTTP/1.1 101 ")
            writer.write(b"\x81\x85abcd" + bytes(b ^ k for b, k in zip(b"hello", b"abcdabcd")))  # masked "hello"
            await writer.drain()
            writer.close()  # FIN, as a browser tab that goes away does
        await all_released(server)
        for _ in range(3):
            response, _ = await exchange(server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert status_of(response) == 200, response[:200]
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{server.admin_address[1]}/metrics") as resp:
                metrics = await resp.text()
        assert "devstack_tunnels_open 0.0" in metrics


async def test_client_half_close_reaches_the_upstream_which_may_still_answer() -> None:
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCH)
        got.append(await reader.read())  # returns at EOF: the client's FIN, passed on
        writer.write(b"bye")
        await writer.drain()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            reader, writer = await open_tunnel(server)
            writer.write(b"ping")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b"bye"  # then EOF: the tunnel ended
            writer.close()
            assert got == [b"ping"]
            await all_released(server)


async def test_upstream_half_close_reaches_the_client_which_may_still_send() -> None:
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCH + b"hello")
        writer.write_eof()
        got.append(await reader.read())

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            reader, writer = await open_tunnel(server)
            assert await asyncio.wait_for(reader.read(), 5) == b"hello"  # and EOF after it
            assert server.stats.tunnels_open == 1  # half-closed, not over: the client may talk
            writer.write(b"late words")
            writer.write_eof()
            await until(lambda: bool(got), "the upstream read to EOF")
            assert got == [b"late words"]
            await all_released(server)
            writer.close()


@pytest.mark.parametrize("side", ["client", "upstream"])
async def test_a_reset_on_either_side_closes_both(side: str) -> None:
    upstream_done = asyncio.Event()
    upstream_writer: list[asyncio.StreamWriter] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCH)
        upstream_writer.append(writer)
        try:
            await reader.read()
        except ConnectionError:
            pass
        upstream_done.set()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            reader, writer = await open_tunnel(server)
            await until(lambda: bool(upstream_writer), "the upstream is in the tunnel")
            if side == "client":
                reset(writer)
                await asyncio.wait_for(upstream_done.wait(), 5)
            else:
                reset(upstream_writer[0])
                # The client's end goes at once (no half-close to wait on): EOF or a reset.
                try:
                    assert await asyncio.wait_for(reader.read(), 5) == b""
                except ConnectionError:
                    pass
            await all_released(server)
            writer.close()


async def test_an_idle_tunnel_is_closed_after_the_tunnel_idle_timeout() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(SWITCH)
        await reader.read()

    settings = RouterSettings(timeouts=Timeouts(tunnel_idle=0.4))
    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}}), settings) as server:
            reader, writer = await open_tunnel(server)
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(4):  # traffic every 0.2 s keeps it alive past the 0.4 s timeout...
                writer.write(b"x")
                await asyncio.sleep(0.2)
            assert server.stats.tunnels_open == 1
            assert await asyncio.wait_for(reader.read(), 5) == b""  # ...0.4 s of silence ends it
            assert loop.time() - started >= 0.6 + 0.4 - 0.05
            await all_released(server)
            writer.close()


async def test_a_queued_client_that_leaves_gives_up_its_place_at_once() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    settings = RouterSettings(limits=Limits(upstream_pool_size=1, upstream_pool_queue=1))
    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}}), settings) as server:
            raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
            first = asyncio.create_task(exchange(server.address[1], raw, timeout=5))
            await until(lambda: origin.connections == 1, "the first request holds the only connection")
            _, leaving = await asyncio.open_connection(*server.address)
            leaving.write(raw)
            await leaving.drain()
            assert server.ctx is not None
            pool = server.ctx.pool._pools[("127.0.0.1", origin.port)]
            await until(lambda: len(pool.waiters) == 1, "the second request is queued")
            leaving.close()  # FIN while queued
            await until(lambda: not pool.waiters, "the departed client left the queue")
            await until(lambda: server.stats.open_connections == 1, "its socket is closed, not in CLOSE-WAIT")
            third = asyncio.create_task(exchange(server.address[1], raw, timeout=5))
            await until(lambda: len(pool.waiters) == 1, "the third request is queued, not refused")
            release.set()
            assert status_of((await first)[0]) == 200
            assert status_of((await third)[0]) == 200


# -- which protocols tunnel ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET /u HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
        b"HTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n",
        b"GET /u HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: foo\r\n\r\n",
        b"GET /u HTTP/1.0\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
    ids=["h2c", "unknown-token", "http1.0-websocket"],
)
async def test_an_upgrade_not_allowed_is_forwarded_as_a_plain_request(head: bytes) -> None:
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            heads.append(await read_head(reader))
            # An upstream that would switch if asked: it must never be asked.
            if b"upgrade" in heads[-1].lower():
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nplain")
            await writer.drain()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            # The refused Upgrade and a request after it on the same connection: the router's
            # parser goes on reading requests instead of treating the rest as tunnel bytes.
            raw = head + b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            response, closed = await exchange(server.address[1], raw)
            answers = split_responses(response)
            assert [status for status, _, _ in answers] == [200, 200], response[:300]
            assert closed
            assert len(heads) == 2
            for forwarded in heads:
                lowered = forwarded.lower()
                assert b"upgrade" not in lowered and b"http2-settings" not in lowered, forwarded
            assert server.stats.tunnels_open == 0


async def test_upgrade_flag_allows_another_protocol_but_never_h2c() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        assert b"Upgrade: foo/2\r\n" in head
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: foo/2\r\n\r\n")
        writer.write(await reader.readexactly(4))

    settings = RouterSettings(upgrade_protocols=frozenset({b"websocket", b"foo"}))
    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}}), settings) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c, foo/2\r\n\r\n")
            assert (await asyncio.wait_for(read_head(reader), 5)).startswith(b"HTTP/1.1 101 ")
            writer.write(b"echo")
            assert await asyncio.wait_for(reader.readexactly(4), 5) == b"echo"
            writer.close()
    with pytest.raises(ValueError, match="h2c"):
        RouterSettings(upgrade_protocols=frozenset({b"websocket", b"h2c"}))

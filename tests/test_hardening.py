"""Faults, floods and abuse: the router refuses clearly, never hangs, leaks or smuggles.

Client-side abuse (slow bodies, floods, idle hordes, disconnects), limits (connection cap,
pool cap), upstreams that die at awkward moments, and the graceful lifecycle (SIGTERM drain,
restart under load). Every case has an explicit expectation; tests/README.md lists them.
"""

from __future__ import annotations

import asyncio
import hashlib
import resource
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from router.settings import Limits, RouterSettings, Timeouts
from tests.support import (
    Origin,
    RawOrigin,
    digest_of_repeats,
    exchange,
    make_table,
    memory_kib,
    read_head,
    running_router,
    split_responses,
    start_router,
    status_of,
)

MIB = 1 << 20


async def test_slow_body_client_gets_408_and_the_upstream_is_released(origins: dict[str, Origin]) -> None:
    settings = RouterSettings(timeouts=Timeouts(body_idle=0.5))
    async with running_router(make_table({"a": {"baseline": origins["baseline"].url}}), settings) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly-part")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        assert status_of(response) == 408
        assert server.ctx is not None
        assert server.ctx.pool.idle_count(("127.0.0.1", origins["baseline"].port)) == 0
        assert server.stats.upstream_connections == 0


async def test_client_connections_beyond_the_cap_are_refused(origins: dict[str, Origin]) -> None:
    settings = RouterSettings(limits=Limits(max_client_connections=5))
    async with running_router(make_table({"a": {"baseline": origins["baseline"].url}}), settings) as server:
        held = [await asyncio.open_connection(*server.address) for _ in range(5)]
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
            data = await asyncio.wait_for(reader.read(), 3)
            if not data:
                raise ConnectionResetError("closed without an answer")
        assert server.stats.refused_connections >= 1
        for _, w in held:
            w.close()
        # Capacity comes back once the router has seen those connections close.
        while server.stats.open_connections > 0:
            await asyncio.sleep(0.01)
        response, _ = await exchange(server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 200


async def test_pool_cap_queues_then_answers_503_pool_full() -> None:
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    settings = RouterSettings(limits=Limits(upstream_pool_size=1, upstream_pool_queue=1))
    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}}), settings) as server:
            raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            first = asyncio.create_task(exchange(server.address[1], raw, timeout=5))
            second = asyncio.create_task(exchange(server.address[1], raw, timeout=5))
            while origin.connections < 1:
                await asyncio.sleep(0.01)
            third, _ = await exchange(server.address[1], raw)
            assert status_of(third) == 503
            assert b'"reason":"pool-full"' in third
            release.set()
            assert status_of((await first)[0]) == 200
            # The queued request got the first connection once it was released... or a fresh
            # one when the upstream closed it; either way it was served, not refused.
            assert status_of((await second)[0]) == 200


async def test_pipelined_flood_is_answered_in_order(origins: dict[str, Origin]) -> None:
    async with running_router(make_table({"a": {"baseline": origins["baseline"].url}})) as server:
        count = 300
        raw = b"".join(b"GET /%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(count))
        raw += b"GET /last HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        data, closed = await exchange(server.address[1], raw, timeout=20)
        answers = split_responses(data)
        assert len(answers) == count + 1
        paths = [f'"path": "/{i}"'.encode() for i in range(count)]
        assert all(p in body for p, (_, _, body) in zip(paths, answers))
        assert closed


async def test_client_gone_mid_request_discards_the_upstream_connection() -> None:
    got_head = asyncio.Event()
    upstream_closed = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        got_head.set()
        await reader.read()  # returns at EOF: the router closed this upstream connection
        upstream_closed.set()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            _, writer = await asyncio.open_connection(*server.address)
            # A body above Limits.small_body, so it streams (a smaller one is read whole first).
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\nhalf")
            await writer.drain()
            await asyncio.wait_for(got_head.wait(), 5)
            writer.transport.abort()
            await asyncio.wait_for(upstream_closed.wait(), 5)
            assert server.ctx is not None
            assert server.ctx.pool.idle_count(("127.0.0.1", origin.port)) == 0


async def test_client_gone_mid_response_discards_the_upstream_connection(origins: dict[str, Origin]) -> None:
    base = origins["baseline"]

    async def big(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 64 * MIB
        await resp.prepare(request)
        try:
            for _ in range(1024):
                await resp.write(b"x" * 65536)
        except ConnectionError:
            pass
        return resp

    base.handlers["/big"] = big
    async with running_router(make_table({"a": {"baseline": base.url}})) as server:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        await reader.readexactly(100000)
        writer.transport.abort()
        while server.stats.upstream_connections != 0:
            await asyncio.sleep(0.01)
        response, _ = await exchange(server.address[1], b"GET /ok HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        assert status_of(response) == 200


@pytest.mark.parametrize(
    "raw_response",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 9\r\n\r\nsmuggled!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsmuggled!",  # to a HEAD request
    ],
    ids=["204-with-body", "head-with-body"],
)
async def test_bodies_where_none_belong_never_reach_the_next_request(raw_response: bytes) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(reader)
            if head.startswith((b"HEAD /bad", b"GET /bad")):
                writer.write(raw_response)
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nclean")
            await writer.drain()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            method = b"HEAD" if b"200 OK" in raw_response else b"GET"
            first, _ = await exchange(
                server.address[1], method + b" /bad HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            )
            assert status_of(first) in (200, 204)
            assert b"smuggled" not in first
            second, _ = await exchange(server.address[1], b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert status_of(second) == 200
            assert second.endswith(b"clean")


async def test_override_dying_under_an_open_websocket_closes_the_client(origins: dict[str, Origin]) -> None:
    alice = origins["alice"]
    opened = asyncio.Event()

    async def ws_then_die(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        opened.set()
        await ws.receive()
        assert request.transport is not None
        request.transport.abort()  # the override's process dies
        return ws

    alice.handlers["/ws"] = ws_then_die
    table = make_table({"chat": {"baseline": origins["baseline"].url, "overrides": {"alice": alice.url}}})
    async with running_router(table) as server, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.address[1]}/ws"
        async with session.ws_connect(url, headers={"Host": "chat", "baggage": "devstack=alice"}) as ws:
            await opened.wait()
            await ws.send_str("bye")
            msg = await asyncio.wait_for(ws.receive(), 5)
            assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < needed:
        pytest.skip(f"needs {needed} file descriptors, the hard limit is {hard}")


IDLE_CONNECTIONS = 5000


async def test_5000_idle_connections_keep_memory_bounded(tmp_path: Path, origins: dict[str, Origin]) -> None:
    _raise_fd_limit(2 * IDLE_CONNECTIONS + 500)
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"services:\n  a:\n    baseline: {origins['baseline'].url}\n")
    proc, port, admin = await start_router(routes, "--max-connections", str(IDLE_CONNECTIONS + 100))
    writers: list[asyncio.StreamWriter] = []
    try:
        before = memory_kib(proc.pid)["VmRSS"]
        for _ in range(IDLE_CONNECTIONS // 250):
            batch = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(250)))
            writers.extend(w for _, w in batch)
        async with aiohttp.ClientSession() as session:
            while True:
                async with session.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                    if f"devstack_open_connections {float(IDLE_CONNECTIONS)}" in await resp.text():
                        break
                await asyncio.sleep(0.05)
        after = memory_kib(proc.pid)["VmRSS"]
        per_connection = (after - before) * 1024 / IDLE_CONNECTIONS
        print(f"router RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB: {per_connection:.0f} B per idle connection")
        assert per_connection < 16 * 1024
        # The router still serves while holding them.
        request = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        response, _ = await exchange(port, request)
        assert status_of(response) == 200
    finally:
        for w in writers:
            w.close()
        proc.terminate()
        await proc.wait()


async def test_1_gib_upload_to_a_slow_upstream_applies_backpressure(tmp_path: Path, origins: dict[str, Origin]) -> None:
    size = 1024 * MIB
    chunk = bytes(range(256)) * 256
    base = origins["baseline"]

    async def slow_sink(request: web.Request) -> web.StreamResponse:
        digest = hashlib.sha256()
        total = 0
        async for part in request.content.iter_chunked(1 << 16):
            digest.update(part)
            total += len(part)
            if total % (16 * MIB) < len(part):
                await asyncio.sleep(0.01)  # a deliberately slow reader: the load under test
        return web.json_response({"bytes": total, "sha256": digest.hexdigest()})

    base.handlers["/sink"] = slow_sink
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"services:\n  a:\n    baseline: {base.url}\n")
    proc, port, _ = await start_router(routes)
    try:
        before = memory_kib(proc.pid)["VmRSS"] * 1024

        async def body() -> AsyncIterator[bytes]:
            for _ in range(size // len(chunk)):
                yield chunk

        expected = await asyncio.to_thread(digest_of_repeats, chunk, size // len(chunk))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
            headers = {"Host": "a", "Content-Length": str(size)}
            async with session.post(f"http://127.0.0.1:{port}/sink", data=body(), headers=headers) as resp:
                assert resp.status == 200
                assert await resp.json() == {"bytes": size, "sha256": expected.hexdigest()}
        growth = memory_kib(proc.pid)["VmHWM"] * 1024 - before
        print(f"router peak RSS growth during a 1 GiB slow upload: {growth / MIB:.1f} MiB")
        assert growth < 64 * MIB
    finally:
        proc.terminate()
        await proc.wait()


async def test_sigterm_drains_in_flight_requests_then_exits_zero(tmp_path: Path, origins: dict[str, Origin]) -> None:
    base = origins["baseline"]
    started = asyncio.Event()

    async def slow(_: web.Request) -> web.StreamResponse:
        started.set()
        await asyncio.sleep(1.0)  # an in-flight request that outlives the SIGTERM
        return web.Response(text="finished")

    base.handlers["/slow"] = slow
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"services:\n  a:\n    baseline: {base.url}\n")
    proc, port, _ = await start_router(routes, "--drain-timeout", "5")
    async with aiohttp.ClientSession() as session:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        request = asyncio.create_task(session.get(f"http://127.0.0.1:{port}/slow", headers={"Host": "a"}))
        await started.wait()
        proc.send_signal(signal.SIGTERM)
        resp = await request
        assert resp.status == 200
        assert await resp.text() == "finished"
        assert resp.headers.get("Connection", "").lower() == "close"
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""  # idle keep-alive closed
        idle_writer.close()
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_restart_under_load_loses_no_request_when_clients_retry_connection_errors(
    tmp_path: Path, origins: dict[str, Origin]
) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(f"services:\n  a:\n    baseline: {origins['baseline'].url}\n")
    proc, port, _ = await start_router(routes)
    listen = ("--listen", f"127.0.0.1:{port}")
    stop = asyncio.Event()
    outcomes: list[int] = []
    retries = 0

    async def client() -> None:
        nonlocal retries
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                for _attempt in range(200):
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/", headers={"Host": "a"}) as resp:
                            await resp.read()
                            outcomes.append(resp.status)
                            break
                    except (aiohttp.ClientConnectionError, aiohttp.ServerDisconnectedError):
                        retries += 1  # only connection errors are retried, as the contract says
                        await asyncio.sleep(0.02)
                else:
                    raise AssertionError("router never came back")

    clients = [asyncio.create_task(client(), name=f"restart-client-{i}") for i in range(4)]
    try:
        while len(outcomes) < 200:
            await asyncio.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        mark = len(outcomes)
        proc, _, _ = await start_router(routes, *listen)
        while len(outcomes) < mark + 200:
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        proc.terminate()
        await proc.wait()
    assert set(outcomes) == {200}
    print(f"{len(outcomes)} requests through a restart, {retries} connection-error retries")


async def test_bytes_beyond_content_length_in_a_later_read_are_never_forwarded_or_reused() -> None:
    go = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await writer.drain()
        await go.wait()  # the first half has reached the client: the rest is a separate read
        writer.write(b"67890HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nsmuggled")
        await writer.drain()
        await reader.read()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            first = await asyncio.wait_for(reader.readuntil(b"12345"), 5)
            go.set()
            rest = await asyncio.wait_for(reader.readexactly(5), 5)
            assert first.endswith(b"\r\n\r\n12345") and rest == b"67890"
            assert server.ctx is not None
            while server.stats.upstream_connections:
                await asyncio.sleep(0.01)  # the broken connection is being closed, never pooled
            assert server.ctx.pool.idle_count(("127.0.0.1", origin.port)) == 0
            writer.write(b"GET /again HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            again = await asyncio.wait_for(reader.read(), 5)
            assert b"smuggled" not in again
            writer.close()

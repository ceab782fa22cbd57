"""Proxy behaviour through a real router on loopback: routing, errors, framing, keep-alive,
WebSockets, and upstream failures."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from router.server import RouterServer
from router.settings import RouterSettings, Timeouts
from tests.support import (
    Origin,
    RawOrigin,
    body_json,
    exchange,
    make_table,
    read_head,
    running_router,
    split_responses,
    status_of,
)


@pytest.fixture
async def router(origins: dict[str, Origin]) -> AsyncIterator[RouterServer]:
    table = make_table(
        {
            "payments": {
                "hosts": ["payments.default.svc.cluster.local"],
                "baseline": origins["baseline"].url,
                "overrides": {
                    "alice": origins["alice"].url,
                    "carol": {"url": origins["bob"].url, "ready": False},
                    "dave": {"url": origins["bob"].url, "ready": False, "fallback": "baseline"},
                    "erin": {"url": origins["bob"].url, "expires_at": time.time() - 1},
                },
            }
        }
    )
    async with running_router(table, admin=True) as server:
        yield server


async def get(server: RouterServer, host: str = "payments", path: str = "/", **headers: str) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as session:
        resp = await session.get(f"http://127.0.0.1:{server.address[1]}{path}", headers={"Host": host, **headers})
        await resp.read()
        return resp


@pytest.mark.parametrize(
    ("baggage", "origin"),
    [(None, "baseline"), ("devstack=alice", "alice"), ("devstack=bob", "baseline"), ("devstack=dave", "baseline")],
)
async def test_routing_table_rows(
    router: RouterServer, origins: dict[str, Origin], baggage: str | None, origin: str
) -> None:
    resp = await get(router, **({"baggage": baggage} if baggage else {}))
    assert resp.status == 200
    assert json.loads(await resp.read())["origin"] == origin


@pytest.mark.parametrize(("key", "reason"), [("carol", "override-not-ready"), ("erin", "override-expired")])
async def test_unusable_override_answers_503_naming_service_key_and_reason(
    router: RouterServer, origins: dict[str, Origin], key: str, reason: str
) -> None:
    resp = await get(router, baggage=f"devstack={key}")
    assert resp.status == 503
    body = json.loads(await resp.read())
    expected = {"error": "Service Unavailable", "service": "payments", "key": key, "target": None, "reason": reason}
    assert body == {**expected, "detail": None}
    assert not origins["bob"].seen


async def test_unknown_host_is_404_and_never_forwarded(router: RouterServer, origins: dict[str, Origin]) -> None:
    resp = await get(router, host="evil.example")
    assert resp.status == 404
    assert json.loads(await resp.read())["reason"] == "no-route"
    assert not any(o.seen for o in origins.values())


async def test_sidecar_mode_refuses_unknown_authorities_with_403(origins: dict[str, Origin]) -> None:
    from router.settings import Mode

    table = make_table({"payments": {"baseline": origins["baseline"].url}})
    async with running_router(table, RouterSettings(mode=Mode.SIDECAR)) as server:
        proxy = f"http://127.0.0.1:{server.address[1]}"
        async with aiohttp.ClientSession() as session:
            async with session.get("http://payments/x", proxy=proxy) as resp:
                assert resp.status == 200
                assert (await resp.json())["path"] == "/x"
            async with session.get("http://169.254.169.254/", proxy=proxy) as resp:
                assert resp.status == 403


async def test_host_with_port_and_alias_names_resolve(router: RouterServer) -> None:
    resp = await get(router, host="payments.default.svc.cluster.local:8080", baggage="devstack=alice")
    assert json.loads(await resp.read())["origin"] == "alice"


async def test_debug_header_names_the_decision(router: RouterServer) -> None:
    resp = await get(router, baggage="devstack=alice", **{"x-devstack-debug": "1"})
    assert resp.headers["x-devstack-route"] == "service=payments; key=alice; target=override; reason=override"
    plain = await get(router, baggage="devstack=alice")
    assert "x-devstack-route" not in plain.headers


async def test_forwarded_headers_are_set_and_trace_headers_pass_untouched(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    trace = {
        "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "tracestate": "congo=t61rcWkgMzE",
        "b3": "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1",
    }
    await get(router, **{"X-Forwarded-For": "203.0.113.9"}, **trace)
    (seen,) = origins["baseline"].seen
    assert seen.header("X-Forwarded-For") == ["203.0.113.9, 127.0.0.1"]
    assert seen.header("X-Forwarded-Proto") == ["http"]
    assert seen.header("X-Forwarded-Host") == ["payments"]
    for name, value in trace.items():
        assert seen.header(name) == [value]


async def test_keep_alive_reuses_one_upstream_connection(router: RouterServer, origins: dict[str, Origin]) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            async with session.get(f"http://127.0.0.1:{router.address[1]}/", headers={"Host": "payments"}) as resp:
                assert resp.status == 200
        assert router.stats.open_connections == 1
    assert router.stats.upstream_connections == 1


@pytest.mark.parametrize(
    ("request_head", "open_after", "connection"),
    [
        # The HTTP version is read without get_http_version when keep-alive needs no Connection
        # field (then it can only be 1.1); every other combination takes the full check.
        (b"GET / HTTP/1.1\r\nHost: payments\r\n\r\n", True, None),
        (b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: keep-alive\r\n\r\n", True, None),
        (b"GET / HTTP/1.1\r\nHost: payments\r\nConnection: close\r\n\r\n", False, "close"),
        (b"GET / HTTP/1.0\r\nHost: payments\r\n\r\n", False, "close"),
        (b"GET / HTTP/1.0\r\n\r\n", False, None),
        (b"GET / HTTP/1.0\r\nHost: payments\r\nConnection: keep-alive\r\n\r\n", True, "keep-alive"),
        (b"GET / HTTP/1.0\r\nHost: payments\r\nCONNECTION: Keep-Alive\r\n\r\n", True, "keep-alive"),
    ],
)
async def test_http_version_and_keep_alive_of_each_request(
    router: RouterServer, request_head: bytes, open_after: bool, connection: str | None
) -> None:
    raw, closed = await exchange(router.address[1], request_head, timeout=1.0)
    [(status, headers, body)] = split_responses(raw)
    if b"Host" not in request_head:
        assert status == 400  # HTTP/1.0 may omit Host, but then there is nothing to route on
        return
    assert status == 200 and json.loads(body)["origin"] == "baseline"
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert headers.get("connection") == connection
    assert closed is not open_after


async def test_request_and_response_bodies_stream_both_framings(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(10):
            yield bytes([65 + i]) * 10000

    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{router.address[1]}/upload"
        async with session.post(url, data=chunks(), headers={"Host": "payments"}) as resp:
            assert (await resp.json())["body_len"] == 100000
        async with session.post(url, data=b"x" * 12345, headers={"Host": "payments"}) as resp:
            assert (await resp.json())["body_len"] == 12345
    assert [len(s.body) for s in origins["baseline"].seen] == [100000, 12345]
    assert origins["baseline"].seen[0].body[:10000] == b"A" * 10000


async def test_bodiless_responses_keep_the_connection_usable(origins: dict[str, Origin]) -> None:
    base = origins["baseline"]

    async def no_content(_: web.Request) -> web.StreamResponse:
        return web.Response(status=204)

    async def not_modified(_: web.Request) -> web.StreamResponse:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    async def streamed(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        for i in range(5):
            await resp.write(b"part%d;" % i)
        await resp.write_eof()
        return resp

    base.handlers.update({"/204": no_content, "/304": not_modified, "/stream": streamed})
    table = make_table({"a": {"baseline": base.url}})
    async with running_router(table) as server:
        raw = (
            b"GET /204 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /304 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        data, closed = await exchange(server.address[1], raw)
        answers = split_responses(data, head_requests=frozenset({2}))
        assert [status for status, _, _ in answers] == [204, 304, 200, 200]
        assert answers[1][1]["etag"] == '"v1"'
        assert answers[2][2] == b"" and int(answers[2][1]["content-length"]) > 0
        assert json.loads(answers[3][2])["path"] == "/x"
        assert closed
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{server.address[1]}/stream", headers={"Host": "a"}) as resp:
                assert resp.headers.get("Transfer-Encoding") == "chunked"
                assert await resp.read() == b"part0;part1;part2;part3;part4;"


async def test_close_delimited_upstream_body_is_reframed_as_chunked() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil-close-")
        writer.write(b"x" * 5000)
        await writer.drain()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            data, _ = await exchange(server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=1.0)
            head, _, body = data.partition(b"\r\n\r\n")
            assert b"Transfer-Encoding: chunked" in head
            assert body.endswith(b"0\r\n\r\n")
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{server.address[1]}/", headers={"Host": "a"}) as resp:
                    assert await resp.read() == b"until-close-" + b"x" * 5000


async def test_websocket_echo_through_the_router(origins: dict[str, Origin]) -> None:
    alice = origins["alice"]

    async def ws_echo(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await ws.send_str(f"alice:{msg.data}")
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    alice.handlers["/ws"] = ws_echo
    table = make_table({"chat": {"baseline": origins["baseline"].url, "overrides": {"alice": alice.url}}})
    async with running_router(table) as server:
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(
                f"http://127.0.0.1:{server.address[1]}/ws", headers={"Host": "chat", "baggage": "devstack=alice"}
            ) as ws:
                for i in range(50):
                    await ws.send_str(f"hello {i}")
                    assert (await ws.receive_str()) == f"alice:hello {i}"
                big = bytes(range(256)) * 1000
                await ws.send_bytes(big)
                assert await ws.receive_bytes() == big[::-1]


async def test_connect_refused_is_502_naming_the_target() -> None:
    table = make_table({"a": {"baseline": "http://127.0.0.1:9"}})
    async with running_router(table) as server:
        data, _ = await exchange(server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        status, _, body = split_responses(data)[0]
        assert status == 502
        assert json.loads(body) == {
            "error": "Bad Gateway",
            "service": "a",
            "key": None,
            "target": "http://127.0.0.1:9",
            "reason": "connect",
            "detail": None,
        }
        assert server.stats.upstream_errors["connect"] == 1


async def test_silent_upstream_times_out_with_504() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await reader.read()  # never answer; wait for the router to give up and close

    settings = RouterSettings(timeouts=Timeouts(upstream_response=0.5))
    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}}), settings) as server:
            started = time.monotonic()
            data, _ = await exchange(
                server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", timeout=5
            )
            assert status_of(data) == 504
            assert 0.4 < time.monotonic() - started < 3
            assert json.loads(data.partition(b"\r\n\r\n")[2])["reason"] == "timeout"


async def test_reset_before_response_is_502() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.transport.abort()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            data, _ = await exchange(server.address[1], b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\n\r\nx")
            assert status_of(data) == 502
            assert origin.connections == 1  # a request with a body is never replayed


async def test_reset_mid_body_aborts_the_client_response() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 30000)
        await writer.drain()
        writer.transport.abort()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{server.address[1]}/", headers={"Host": "a"}) as resp:
                    assert resp.status == 200
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await resp.read()


async def test_stale_pooled_connection_is_retried_once_for_idempotent_requests() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answer one request with keep-alive, then close as the next one arrives, the way a
        # server whose idle timeout fires at the wrong moment does.
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await read_head(reader)
        writer.transport.abort()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            port = server.address[1]
            first, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            second, _ = await exchange(port, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            assert (status_of(first), status_of(second)) == (200, 200)
            assert origin.connections == 2
            third, _ = await exchange(
                port, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx"
            )
            assert status_of(third) == 502
            assert origin.connections == 2  # the POST was not replayed on a fresh connection


async def test_upstream_101_without_upgrade_request_is_502() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nraw")
        await writer.drain()
        await asyncio.sleep(0.2)

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            data, _ = await exchange(server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=2)
            assert status_of(data) == 502
            assert b"raw" not in data


async def test_interim_100_continue_is_relayed() -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        body = await reader.readexactly(5)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n" + body)
        await writer.drain()
        await asyncio.sleep(0.2)

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
            assert interim.startswith(b"HTTP/1.1 100 Continue")
            writer.write(b"hello")
            final = await asyncio.wait_for(reader.readuntil(b"hello"), 2)
            assert final.startswith(b"HTTP/1.1 200")
            writer.close()


async def test_options_asterisk_is_forwarded_with_its_fields_in_their_order() -> None:
    heads: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            raw = b"OPTIONS * HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\nX-Last: 1\r\nConnection: close\r\n\r\n"
            data, _ = await exchange(server.address[1], raw)
            assert status_of(data) == 204
            # Only the asterisk form is accepted with OPTIONS; any other method gets a 400.
            refused, _ = await exchange(server.address[1], b"GET * HTTP/1.1\r\nHost: a\r\n\r\n")
            assert status_of(refused) == 400
    assert len(heads) == 1
    lines = heads[0].split(b"\r\n")
    assert lines[0] == b"OPTIONS * HTTP/1.1"
    assert lines[1:4] == [b"Host: a", b"baggage: devstack=alice", b"X-Last: 1"]


async def test_each_request_on_a_connection_routes_by_its_own_host_and_the_current_table(
    origins: dict[str, Origin],
) -> None:
    # The router remembers a connection's last Host validation and routing lookup; neither may
    # outlive a different Host on the next request or a table swap between two requests.
    table = make_table({"a": {"baseline": origins["baseline"].url}, "b": {"baseline": origins["alice"].url}})
    async with running_router(table) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1])

        async def ask(host: bytes) -> tuple[int, bytes]:
            writer.write(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n")
            head = await asyncio.wait_for(read_head(reader), 5)
            [(status, _, body)] = split_responses(head + await reader.readexactly(_content_length(head)))
            return status, body

        try:
            assert [body_json(body)["origin"] for _, body in [await ask(b"a"), await ask(b"b"), await ask(b"a")]] == [
                "baseline", "alice", "baseline",
            ]  # fmt: skip
            server.swap(make_table({"a": {"baseline": origins["bob"].url}}, version=2))
            status, body = await ask(b"a")
            assert status == 200 and body_json(body)["origin"] == "bob"
            status, _ = await ask(b"b")
            assert status == 404  # no longer routed
            writer.write(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
            refused = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
            assert status_of(refused) == 400
        finally:
            writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(f"no Content-Length in {head!r}")


@pytest.mark.parametrize(
    ("lines", "origin"),
    [
        ([b"devstack=alice"], "alice"),
        ([b"a=1", b"b=2", b"devstack=bob"], "bob"),  # lines are read as one list, in order
        ([b"devstack=alice", b"x=1", b"devstack=bob"], "alice"),  # the first member decides
        ([b"a=1", b"devstack=%zz", b"devstack=bob"], "baseline"),  # ambiguous: the baseline
    ],
)
async def test_every_baggage_line_is_read_in_order(origins: dict[str, Origin], lines: list[bytes], origin: str) -> None:
    table = make_table(
        {
            "a": {
                "baseline": origins["baseline"].url,
                "overrides": {"alice": origins["alice"].url, "bob": origins["bob"].url},
            }
        }
    )
    async with running_router(table) as server:
        raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"baggage: " + line + b"\r\n" for line in lines)
        data, _ = await exchange(server.address[1], raw + b"Connection: close\r\n\r\n")
    [(status, _, body)] = split_responses(data)
    assert status == 200 and body_json(body)["origin"] == origin
    assert body_json(body)["baggage"] == [line.decode() for line in lines]  # every line forwarded as sent

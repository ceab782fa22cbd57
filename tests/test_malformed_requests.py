"""Every case of shared/malformed-requests.md, sent as raw bytes through a real router.

Setup as the document assumes: service ``a`` (``Host: a``) has an echo baseline and an override
for key ``alice``. Each test checks what the client got and what each origin saw.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

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
    table = make_table({"a": {"baseline": origins["baseline"].url, "overrides": {"alice": origins["alice"].url}}})
    settings = RouterSettings(timeouts=Timeouts(header_read=1.5))
    async with running_router(table, settings) as server:
        yield server


def nothing_forwarded(origins: dict[str, Origin]) -> bool:
    return all(not origin.seen for origin in origins.values())


# (id, raw request, allowed statuses) — each must be answered by the router and closed.
REJECTED = [
    ("F01", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG", {400}),
    (
        "F02",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
        b"8\r\nSMUGGLED\r\n0\r\n\r\n",
        {400},
    ),
    ("F03", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", {400}),
    ("F05", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", {400}),
    ("F07", b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello", {400}),
    ("F09", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", {400}),
    ("F11", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", {400}),
    (
        "F13",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        {400},
    ),
    ("F15", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n", {400}),
    ("F15b", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n_5\r\nhello\r\n0\r\n\r\n", {400}),
    ("F15c", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n+5\r\nhello\r\n0\r\n\r\n", {400}),
    ("F17", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n", {400}),
    ("F19", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 50\r\n\r\n", {400}),
    ("L01", b"GET / HTTP/1.1\nHost: a\n\n", {400}),
    ("L03", b"GET / HTTP/1.1\r\nHost: a\r\nX-A: v\x00alue\r\n\r\n", {400}),
    ("L05", b"GET / HTTP/1.1\r\n\tContent-Length: 1\r\nHost: a\r\n\r\nX", {400}),
    ("L07", b"GET / HTTP/1.1\r\nHost: a\r\n\xefoo: bar\r\n\r\n", {400}),
    ("R01", b'G=":<>(e),[T];?" /get HTTP/1.1\r\nHost: a\r\n\r\n', {400}),
    ("R03", b"GET /\r\n\r\n", {400}),
    ("R07", b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", {400}),
    ("H01", b"GET / HTTP/1.1\r\n\r\n", {400}),
    ("H02", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", {400}),
    ("H03", b"GET / HTTP/1.1\r\nHost: a@b c\r\n\r\n", {400}),
    # The port part of an authority is empty or a number from 1 to 65535, nothing else.
    *(
        (f"H04-{form}-{port.decode()}", raw % port, {400})
        for port in (b"evil.com", b"abc", b"-1", b"+80", b"99999", b"0", b"80:80")
        for form, raw in (
            ("host", b"GET / HTTP/1.1\r\nHost: a:%s\r\n\r\n"),
            ("absolute", b"GET http://a:%s/ HTTP/1.1\r\nHost: a\r\n\r\n"),
        )
    ),
    ("H05-bracket", b"GET / HTTP/1.1\r\nHost: a[1]\r\n\r\n", {400}),
    ("S01", b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", {414}),
    ("S03", b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(1000)) + b"\r\n", {431}),
    ("TE10", b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    ("TE-gzip", b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", {501}),
    ("CONNECT", b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", {405}),
]


@pytest.mark.parametrize(("case", "raw", "statuses"), REJECTED, ids=[c[0] for c in REJECTED])
async def test_malformed_request_is_refused_closed_and_never_forwarded(
    router: RouterServer, origins: dict[str, Origin], case: str, raw: bytes, statuses: set[int]
) -> None:
    response, closed = await exchange(router.address[1], raw)
    assert status_of(response) in statuses, (case, response[:200])
    assert closed, f"{case}: the router kept the connection open after refusing"
    assert nothing_forwarded(origins), f"{case}: an origin saw the request"


async def test_r05_absolute_form_to_a_foreign_host_is_never_proxied(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    raw = b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: a\r\n\r\n"
    response, _ = await exchange(router.address[1], raw)
    assert status_of(response) == 404
    assert nothing_forwarded(origins)


async def test_absolute_form_to_a_known_service_is_rewritten_to_origin_form(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    raw = b"GET http://a/x?y=1 HTTP/1.1\r\nHost: ignored\r\nConnection: close\r\n\r\n"
    response, _ = await exchange(router.address[1], raw)
    assert status_of(response) == 200
    (seen,) = origins["baseline"].seen
    assert seen.path == "/x?y=1"
    assert seen.header("Host") == ["a"]


BAGGAGE_CASES = [
    ("B01", b"devstack=alice", "alice"),
    ("B02", b"pad=" + b"x" * 8300 + b",devstack=alice", "baseline"),
    ("B04", b"devstack=%zz", "baseline"),
    ("B06", b"devstack=alice%0d%0aX-Injected:%201", "baseline"),
    ("B08", b"devstack=alice,devstack=bob", "alice"),
    ("B10", b"devstack=alice;ttl=30", "alice"),
    ("B12", b"devstack=a+b", "baseline"),
]


@pytest.mark.parametrize(("case", "baggage", "expected"), BAGGAGE_CASES, ids=[c[0] for c in BAGGAGE_CASES])
async def test_baggage_routing_and_byte_identical_forwarding(
    router: RouterServer, origins: dict[str, Origin], case: str, baggage: bytes, expected: str
) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nbaggage: " + baggage + b"\r\nConnection: close\r\n\r\n"
    response, _ = await exchange(router.address[1], raw)
    assert status_of(response) == 200, response[:300]
    served = [name for name, origin in origins.items() if origin.seen]
    assert served == [expected], case
    (seen,) = origins[expected].seen
    assert [v.encode("latin-1") for v in seen.header("baggage")] == [baggage]
    assert not seen.header("X-Injected")


async def test_c01_slowloris_is_closed_at_the_header_deadline(router: RouterServer, origins: dict[str, Origin]) -> None:
    reader, writer = await asyncio.open_connection(*router.address)
    writer.write(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: ")
    loop = asyncio.get_running_loop()
    started = loop.time()
    response = b""
    # Trickle one byte every 0.25 s, as a slowloris client does, until the router gives up.
    for _ in range(40):
        try:
            writer.write(b"x")
            await writer.drain()
        except ConnectionError:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(4096), 0.25)
        except TimeoutError:
            continue
        response += chunk
        if not chunk:
            break
    elapsed = loop.time() - started
    writer.close()
    assert status_of(response) == 408
    assert 1.0 < elapsed < 5.0
    assert nothing_forwarded(origins)


async def test_c03_connection_header_cannot_strip_routing_or_framing(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    raw = (
        b"POST / HTTP/1.1\r\nHost: a\r\nConnection: close, baggage, content-length, x-extra\r\n"
        b"baggage: devstack=alice\r\nX-Extra: drop-me\r\nContent-Length: 5\r\n\r\nhello"
    )
    response, closed = await exchange(router.address[1], raw)
    assert status_of(response) == 200
    assert closed
    (seen,) = origins["alice"].seen
    assert seen.body == b"hello"
    assert seen.header("baggage") == ["devstack=alice"]
    assert not seen.header("X-Extra")
    assert not seen.header("Connection") or "baggage" not in seen.header("Connection")[0]


async def test_c05_upgrade_without_101_is_not_tunnelled(router: RouterServer, origins: dict[str, Origin]) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    response, closed = await exchange(router.address[1], raw)
    status = status_of(response)
    assert status in (200, 400), response[:200]
    assert closed, "after a refused upgrade the connection must not stay open as a tunnel"


async def test_c07_pipelined_requests_route_independently_and_answer_in_order(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    raw = (
        b"GET /1 HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
        b"GET /3 HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\nConnection: close\r\n\r\n"
    )
    response, closed = await exchange(router.address[1], raw)
    answers = [(status, body_json(body)) for status, _, body in split_responses(response)]
    assert [(status, body["path"], body["origin"]) for status, body in answers] == [
        (200, "/1", "alice"),
        (200, "/2", "baseline"),
        (200, "/3", "alice"),
    ]
    assert closed


async def test_pipelined_request_after_a_chunked_body_is_parsed_correctly(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    raw = (
        b"POST /1 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        b"GET /2 HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\nConnection: close\r\n\r\n"
    )
    response, _ = await exchange(router.address[1], raw)
    answers = split_responses(response)
    assert [s for s, _, _ in answers] == [200, 200]
    assert origins["baseline"].seen[0].body == b"hello"
    assert origins["alice"].seen[0].path == "/2"


async def test_router_headers_from_clients_are_stripped(router: RouterServer, origins: dict[str, Origin]) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nx-devstack-route: forged\r\nConnection: close\r\n\r\n"
    response, _ = await exchange(router.address[1], raw)
    assert status_of(response) == 200
    (seen,) = origins["baseline"].seen
    assert not seen.header("x-devstack-route")
    assert b"x-devstack-route" not in response.lower()


def _respond_with(raw_response: bytes) -> RawOrigin:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(raw_response)
        await writer.drain()
        await asyncio.sleep(0.3)  # hold the connection open: the router must judge the bytes, not EOF

    return RawOrigin(script)


UPSTREAM_BROKEN = [
    ("U01", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
    ("U03", b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc"),
    ("U05", b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 3\r\n\r\nabc"),
    ("U07", b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc"),
    ("garbage", b"\x16\x03\x01 definitely not http\r\n\r\n"),
]


@pytest.mark.parametrize(("case", "raw_response"), UPSTREAM_BROKEN, ids=[c[0] for c in UPSTREAM_BROKEN])
async def test_broken_upstream_framing_gives_502_and_is_never_copied(case: str, raw_response: bytes) -> None:
    async with _respond_with(raw_response) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}})) as server:
            response, _ = await exchange(server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", timeout=2)
            assert status_of(response) == 502, (case, response)
            assert b"abc" not in response
            assert server.ctx is not None and server.ctx.pool.idle_count(("127.0.0.1", origin.port)) == 0


async def test_whitespace_after_a_host_value_is_not_part_of_it(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a \t\r\nConnection: close\r\n\r\n"
    response, _ = await exchange(router.address[1], raw)
    assert status_of(response) == 200, response[:200]
    (seen,) = origins["baseline"].seen
    assert seen.header("host") == ["a"]
    assert seen.header("x-forwarded-host") == ["a"]


@pytest.mark.parametrize("host", [b"a:", b"a:8080", b"[::1]:80", b"A:65535"])
async def test_a_host_with_an_empty_or_numeric_port_is_routed(
    router: RouterServer, origins: dict[str, Origin], host: bytes
) -> None:
    response, _ = await exchange(router.address[1], b"GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n" % host)
    assert status_of(response) in (200, 404), response[:200]  # [::1] names no service: 404, not 400


FORGED = (
    b"X_Forwarded_For: 6.6.6.6\r\nX_Forwarded_Host: evil\r\nx_forwarded_proto: https\r\n"
    b"X_Devstack_Route: forged\r\nContent_Length: 5\r\nForwarded: for=6.6.6.6;host=evil;proto=https\r\n"
)


async def test_underscore_spellings_and_forwarded_cannot_forge_the_routers_headers(
    router: RouterServer, origins: dict[str, Origin]
) -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n" + FORGED + b"X_Custom_Thing: kept\r\nConnection: close\r\n\r\n"
    response, _ = await exchange(router.address[1], raw)
    assert status_of(response) == 200, response[:200]
    (seen,) = origins["baseline"].seen
    names = [name.lower() for name, _ in seen.headers]
    assert not [n for n in names if "_" in n and n != "x_custom_thing"], names
    assert "forwarded" not in names
    assert seen.header("x_custom_thing") == ["kept"]  # underscores alone are not a reason to drop
    assert seen.header("x-forwarded-for") == ["127.0.0.1"]
    assert seen.header("x-forwarded-host") == ["a"]
    assert seen.header("x-forwarded-proto") == ["http"]


async def test_forwarded_is_kept_only_with_trust_forwarded(origins: dict[str, Origin]) -> None:
    table = make_table({"a": {"baseline": origins["baseline"].url}})
    async with running_router(table, RouterSettings(trust_forwarded=True)) as server:
        raw = b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=10.0.0.1;proto=https\r\nConnection: close\r\n\r\n"
        response, _ = await exchange(server.address[1], raw)
    assert status_of(response) == 200
    (seen,) = origins["baseline"].seen
    assert seen.header("forwarded") == ["for=10.0.0.1;proto=https"]

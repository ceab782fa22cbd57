"""Hypothesis fuzzing of the router with generated and mutated HTTP/1.1 requests.

Every example sends raw bytes (valid requests, pipelined pairs and triples, and byte-level
mutations of them: inserted/deleted/replaced bytes, duplicated lines, CL/TE combinations, odd
whitespace, bare LF/CR, NUL, obs-fold, huge/negative/hex Content-Length, chunk-size garbage,
oversize heads) through one real router to two recording raw-TCP origins (baseline and alice),
and checks the invariants listed in tests/fuzz/harness.py against an independent reference parse
of the client's bytes. Two more fuzz tests, on a second router with sub-second timers, check the
connection lifecycle (tests/fuzz/lifecycle.py): WebSocket tunnels whose client and origin send,
half-close and reset in random order (also before the 101), and request bodies dripped in pieces
(honest, too slow, stalled, abandoned); after each, no connection, tunnel or pool slot outlives
the exchange.

Profiles (``DEVSTACK_FUZZ_PROFILE``): ``ci`` (default, part of ``make test``: 600 request, 300
tunnel and 80 drip examples, about 70 s on two cores) and ``long`` (20 000, 5 000 and 1 000,
``make fuzz``); ``DEVSTACK_FUZZ_EXAMPLES``, ``DEVSTACK_FUZZ_TUNNEL_EXAMPLES`` and
``DEVSTACK_FUZZ_DRIP_EXAMPLES`` override the counts. ``DEVSTACK_FUZZ_STRICT=1`` also fails on the
request fuzz's known-bug patterns (instead of counting them). Below the fuzz tests: regression
tests for the bugs they found and that are fixed, then strict-xfail reproductions of open ones.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import struct
import sys
from collections.abc import AsyncIterator, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings

from router.server import RouterServer
from router.settings import RouterSettings, Timeouts
from tests.fuzz.harness import Harness
from tests.fuzz.lifecycle import DripCase, LifecycleHarness, TunnelCase, drip_cases, tunnel_cases
from tests.fuzz.strategies import Case, cases
from tests.support import (
    Origin,
    RawOrigin,
    exchange,
    make_table,
    read_head,
    running_router,
    split_responses,
    status_of,
)

PROFILE = os.environ.get("DEVSTACK_FUZZ_PROFILE", "ci")
_COMMON = {
    "deadline": None,
    "derandomize": False,
    "print_blob": True,
    "suppress_health_check": [
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,  # conftest's autouse loop guard is a no-op for sync tests
    ],
}
_EXAMPLES = {"ci": 600, "long": 20000}
_TUNNEL_EXAMPLES = {"ci": 300, "long": 5000}
_DRIP_EXAMPLES = {"ci": 80, "long": 1000}
"""A tunnel example takes ~10 ms (~1 s when it waits for tunnel_idle), a drip example ~0.3 s on
average: its pauses and the router's timers are the point."""
settings.register_profile("devstack-fuzz-ci", max_examples=_EXAMPLES["ci"], **_COMMON)
settings.register_profile("devstack-fuzz-long", max_examples=_EXAMPLES["long"], **_COMMON)
if PROFILE not in ("ci", "long"):
    raise ValueError(f"DEVSTACK_FUZZ_PROFILE must be 'ci' or 'long', not {PROFILE!r}")


@pytest.fixture(scope="module")
def harness() -> Iterator[Harness]:
    """One router and two recording origins for the whole module, on a loop in a thread."""
    h = Harness()
    h.start()
    yield h
    h.stop()


@pytest.mark.timeout(0 if PROFILE == "long" else 240)
def test_fuzz_router_with_generated_and_mutated_requests(harness: Harness, capsys: pytest.CaptureFixture[str]) -> None:
    examples = int(os.environ.get("DEVSTACK_FUZZ_EXAMPLES", _EXAMPLES[PROFILE]))

    @settings(settings.get_profile(f"devstack-fuzz-{PROFILE}"), max_examples=examples)
    @given(case=cases())
    def run(case: Case) -> None:
        harness.check(case)

    try:
        run()
    finally:
        with capsys.disabled():
            sys.stdout.write("\n" + harness.summary(PROFILE) + "\n")
    assert harness.examples > 0


_WS = b"GET /__ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
# Every run covers each kind of ending at least once, whatever mix Hypothesis draws.
_HALF_CLOSES = TunnelCase(
    head=_WS,
    early=b"early",
    before=(("client-send", b"before the 101"),),
    first=b"with the 101",
    after=(("client-send", b"c"), ("client-fin", b""), ("origin-send", b"after the client's FIN"), ("settle", b"")),
    finish=("origin-fin",),
)
_IDLE = TunnelCase(head=_WS, after=(("client-send", b"x"), ("origin-send", b"y"), ("settle", b"")), finish=("idle",))
_RESET_BEFORE_101 = TunnelCase(head=_WS, before=(("client-send", b"x"), ("client-rst", b"")))
_RESET_PAST_THE_HOLD = TunnelCase(
    head=_WS, early=b"\x00", before=(("client-send", b"\x00"), ("client-send", 262143), ("client-rst", b""))
)
"""Found by CI: a reset after more than the 256 KiB held before the 101, while reading was paused."""
_ORIGIN_RESETS_FIRST = TunnelCase(head=_WS, answers=("reset", "accept"), after=(("origin-rst", b""),))
_H2C = TunnelCase(
    head=b"GET /__ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    pipelined=True,
)
_SLOW_LARGE = DripCase("large", "slow", 20000, step=30, keeps_sending=True)
_SLOW_SMALL = DripCase("small", "slow", 4000, step=30)
_STEADY_CHUNKED = DripCase("chunked", "steady", 8000, chunk=1000, step=700, end="fin")
_STALLED = DripCase("large", "stall", 20000, cuts=(5000, 10000), stop_at=2)
_ABANDONED = DripCase("chunked", "abandon", 5000, chunk=100, cuts=(1000,), stop_at=1, end="rst")


@pytest.fixture(scope="module")
def lifecycle() -> Iterator[LifecycleHarness]:
    """A router with sub-second body, linger and tunnel deadlines, for the lifecycle examples."""
    h = LifecycleHarness()
    h.start()
    yield h
    h.stop()


@pytest.mark.timeout(0 if PROFILE == "long" else 240)
def test_fuzz_tunnels_end_with_either_side(lifecycle: LifecycleHarness, capsys: pytest.CaptureFixture[str]) -> None:
    # Client and origin send, half-close and reset in random order around a WebSocket upgrade;
    # whatever they do, bytes cross in order until a reset, a FIN arrives as EOF, and the router
    # keeps no connection, tunnel or pool slot once both ends are done.
    examples = int(os.environ.get("DEVSTACK_FUZZ_TUNNEL_EXAMPLES", _TUNNEL_EXAMPLES[PROFILE]))

    @settings(settings.get_profile(f"devstack-fuzz-{PROFILE}"), max_examples=examples)
    @given(case=tunnel_cases())
    @example(case=_HALF_CLOSES)
    @example(case=_IDLE)
    @example(case=_RESET_BEFORE_101)
    @example(case=_RESET_PAST_THE_HOLD)
    @example(case=_ORIGIN_RESETS_FIRST)
    @example(case=_H2C)
    def run(case: TunnelCase) -> None:
        lifecycle.check_tunnel(case)

    lifecycle.start_tally()
    try:
        run()
    finally:
        with capsys.disabled():
            sys.stdout.write("\n" + lifecycle.lifecycle_summary(f"tunnels[{PROFILE}]") + "\n")
    assert lifecycle.tally["idle tunnel ends"] > 0  # the explicit examples ran


@pytest.mark.timeout(0 if PROFILE == "long" else 240)
def test_fuzz_drip_fed_bodies_are_delivered_or_refused_and_released(
    lifecycle: LifecycleHarness, capsys: pytest.CaptureFixture[str]
) -> None:
    # Bodies in pieces with pauses: an honest one arrives intact; one slower than body_min_rate
    # or stalled past body_idle gets 408 and frees its upstream connection at once; an abandoned
    # one leaves nothing behind.
    examples = int(os.environ.get("DEVSTACK_FUZZ_DRIP_EXAMPLES", _DRIP_EXAMPLES[PROFILE]))

    @settings(settings.get_profile(f"devstack-fuzz-{PROFILE}"), max_examples=examples)
    @given(case=drip_cases())
    @example(case=_SLOW_LARGE)
    @example(case=_SLOW_SMALL)
    @example(case=_STEADY_CHUNKED)
    @example(case=_STALLED)
    @example(case=_ABANDONED)
    def run(case: DripCase) -> None:
        lifecycle.check_drip(case)

    lifecycle.start_tally()
    try:
        run()
    finally:
        with capsys.disabled():
            sys.stdout.write("\n" + lifecycle.lifecycle_summary(f"drips[{PROFILE}]") + "\n")
    assert lifecycle.tally["408 body-too-slow"] > 0  # the explicit examples ran


def test_a_limit_answer_to_head_is_bodiless_even_where_the_head_would_not_have_parsed(harness: Harness) -> None:
    # Found by the fuzzer (a checker bug): a 431 decided after the request line of a HEAD request
    # carries no body, as the router intends; the checker, seeing a bare LF further on that makes
    # the whole request unparseable, used to expect a body and reported the answer truncated.
    raw = b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: close\r\nX-Big: " + b"x" * 40000 + b"\r\nX-A: v\n\r\n"
    harness.check(Case(raw=raw, cuts=(), half_close=True, mutated=False))


# -- bugs the fuzzer found, now fixed: minimal regression tests ----------------------------------

TIMEOUTS = Timeouts(header_read=1, body_idle=1, upstream_response=2)


@pytest.fixture
async def router_a(origins: dict[str, Origin]) -> AsyncIterator[RouterServer]:
    table = make_table({"a": {"baseline": origins["baseline"].url, "overrides": {"alice": origins["alice"].url}}})
    async with running_router(table, RouterSettings(timeouts=TIMEOUTS)) as server:
        yield server


async def test_a_head_pipelined_behind_an_exchange_gets_the_header_deadline(router_a: RouterServer) -> None:
    # The second head began while the first exchange was active, so no header_read timer was
    # armed for it: after the first answer the connection waited keepalive_idle (75 s) instead.
    raw = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\nHo"
    response, closed = await exchange(router_a.address[1], raw, timeout=TIMEOUTS.header_read + 2.0)
    assert [status for status, _, _ in split_responses(response)] == [200, 408]
    assert closed


async def test_router_answers_to_head_carry_no_body(router_a: RouterServer) -> None:
    # The router's own 404 to a HEAD carried its JSON body on a keep-alive connection; a client
    # (rightly) reads no body after a HEAD answer and took the JSON for the next status line.
    raw = b"HEAD / HTTP/1.1\r\nHost: b\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    response, _ = await exchange(router_a.address[1], raw, timeout=2.0)
    head, _, rest = response.partition(b"\r\n\r\n")
    assert status_of(head) == 404
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:120]


async def test_an_upgrade_request_the_router_answers_itself_ends_the_connection(router_a: RouterServer) -> None:
    # The 404 to an Upgrade request kept the connection alive but never read from it again (it
    # stayed paused for the upgrade): the pipelined GET was never answered.
    raw = (
        b"GET / HTTP/1.1\r\nHost: b\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    response, closed = await exchange(router_a.address[1], raw, timeout=2.0)
    statuses = [status for status, _, _ in split_responses(response)]
    assert statuses in ([404, 200], [404]), response[:300]
    assert closed, f"after {statuses} the connection stayed open and silent"


async def test_an_upgrade_request_with_a_body_is_refused_or_forwarded_whole() -> None:
    # httptools stops at the head of an Upgrade request, so "hello" was held back as tunnel data
    # while the forwarded head still said Content-Length: 5: an origin that reads bodies waited
    # for bytes that never came (504).
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        body = b""
        if length:
            try:
                body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 0.5)
            except (TimeoutError, asyncio.IncompleteReadError):
                pass
        seen.append(head + body)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}}), RouterSettings(timeouts=TIMEOUTS)) as r:
            raw = (
                b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Content-Length: 5\r\n\r\nhello"
            )
            response, _ = await exchange(r.address[1], raw, timeout=2.0)
    if status_of(response) == 400:
        assert seen == []
    else:
        (forwarded,) = seen
        announced = re.search(rb"(?i)\r\ncontent-length: *(\d+)", forwarded)
        body = forwarded.partition(b"\r\n\r\n")[2]
        assert announced is None or int(announced.group(1)) == len(body) == 5, forwarded


# -- bugs 5 and 6 the fuzzer found, fixed in the same session: regression tests -------------------


async def test_bug_a_queued_request_found_malformed_is_refused_not_forwarded() -> None:
    # /2 is parsed (and found malformed at "zz") while /1 is still in flight, so it waits in the
    # queue marked for nothing: the router forwards its head and first chunk when /1 is done, then
    # waits body_idle for the rest and answers 408. Expected: 200 for /1, then 400 and close at
    # once, and the origin never sees /2.
    got: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            got.append(data)
            if data.startswith(b"GET /1 "):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with RawOrigin(script) as origin:
        async with running_router(make_table({"a": {"baseline": origin.url}}), RouterSettings(timeouts=TIMEOUTS)) as r:
            raw = (
                b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
            )
            response, closed = await exchange(r.address[1], raw, timeout=TIMEOUTS.body_idle + 1.0)
            await asyncio.sleep(0.05)  # give a wrongly forwarded /2 time to arrive: we assert absence
    assert [status for status, _, _ in split_responses(response)] == [200, 400], response
    assert closed
    assert not any(b"POST /2" in chunk for chunk in got), got


async def test_bug_every_router_answer_to_head_is_bodiless(router_a: RouterServer) -> None:
    # The version checks run before the router records the method, so these answers to HEAD
    # still carry their JSON body (RFC 9110 9.3.2: MUST NOT). They close the connection, so no
    # later response is misread.
    for raw in (b"HEAD / HTTP/2.0\r\nHost: a\r\n\r\n", b"HEAD / HTTP/0.9\r\nHost: a\r\n\r\n"):
        response, _ = await exchange(router_a.address[1], raw, timeout=2.0)
        assert status_of(response) in (400, 505)
        assert response.endswith(b"\r\n\r\n"), response


async def test_refusal_of_a_head_request_with_too_many_fields_has_no_body(router_a: RouterServer) -> None:
    # Found by the fuzzer in CI: the 431 is decided in the middle of the head, before the
    # method was recorded, and carried its JSON body after a HEAD request.
    raw = b"HEAD / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(150)) + b"\r\n"
    response, closed = await exchange(router_a.address[1], raw, timeout=2.0)
    assert status_of(response) == 431
    assert response.endswith(b"\r\n\r\n"), response
    assert closed


async def test_a_client_reset_while_its_upgrade_awaits_the_101_ends_the_exchange_at_once() -> None:
    # Found by the lifecycle fuzz: the router stopped reading the client once an Upgrade head was
    # parsed (what follows is tunnel data), so it never saw the client's RST while the origin had
    # not answered, and held the client connection and the upstream connection until the origin
    # answered or upstream_response passed (60 s by default). It now reads on, holding up to
    # 256 KiB for the tunnel: the upstream connection is closed within a second.
    got_head, released = asyncio.Event(), asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        got_head.set()
        await reader.read()  # b"" once the router closes its upstream connection
        released.set()

    async with RawOrigin(script) as origin:
        settings = RouterSettings(timeouts=Timeouts(upstream_response=2))
        async with running_router(make_table({"a": {"baseline": origin.url}}), settings) as r:
            _, writer = await asyncio.open_connection(*r.address)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
            await asyncio.wait_for(got_head.wait(), 5)
            sock = writer.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with RST
            writer.transport.abort()
            try:
                await asyncio.wait_for(released.wait(), 1.0)
            finally:
                await asyncio.wait_for(released.wait(), 3.0)  # the upstream timeout ends it: no stray task
            assert (r.stats.open_connections, r.stats.upstream_connections) == (0, 0)

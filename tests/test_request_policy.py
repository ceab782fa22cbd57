"""The request policy without sockets: every rule of ``router.request.decide``, and every case of
shared/malformed-requests.md.

Part 1 calls :func:`router.request.decide` directly on request heads written as raw bytes (split
here the way the HTTP/1.1 front end hands them over; a test holds that split equal to llhttp's)
and asserts the exact plan: each refusal of the catalogue and whether it keeps the connection,
README's "Routing rules" (the key, the table's rows, debug), per-request state across a
connection and a table swap, and README's "Forwarding" (the exact head sent upstream, framing,
upgrades).

Part 2 feeds the document's raw bytes to a real ``router.proxy.ClientConnection`` on stub
transports, as benchmarks/micro.py does: the parser (llhttp via httptools), the connection's
size limits and the policy together. A request refused in its head must be answered with the
right status and reason, closed, and never forwarded: the pool is cold, and forwarding would
leave an address pool and a connection attempt behind (a control test shows the check sees
one). A chunked body found broken mid-body (F15, F17, F19) comes after its valid head has gone
upstream, since bodies stream: there, with warm stub upstream connections, the test asserts the
exact bytes the upstream got and that its connection is aborted before the request is whole.
The response-side cases (U*) feed broken responses to a stub upstream connection. C01 needs a
clock and is left to the socket test. Nothing here opens a socket or waits on a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
from collections.abc import AsyncIterator, Iterable
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httptools
import pytest

from router.errors import Answer
from router.proxy import ClientConnection, ProxyContext
from router.request import HeadCache, Plan, Policy, TableSlot, decide
from router.settings import Limits, Mode, RouterSettings
from router.table import Fallback, Override, Routes, RouteTable, Target, TargetKind
from router.upstream import UpstreamConnection, _AddressPool
from tests.support import make_table, split_responses

# -- the setup of malformed-requests.md: service `a`, a baseline and alice's override ----------

# Nobody listens on ports 1 and 2 of loopback: a request forwarded by mistake shows up as a pool
# entry (or bytes on a stub upstream), never as a request some real server answers.
BASELINE_URL = "http://127.0.0.1:1"
ALICE_URL = "http://127.0.0.1:2"
ORIGINS = {"baseline": BASELINE_URL, "alice": ALICE_URL}
TABLE = make_table({"a": {"baseline": BASELINE_URL, "overrides": {"alice": ALICE_URL}}})
PEER = b"127.0.0.1"
XF = b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n"
"""The X-Forwarded-* lines the router adds for a client on 127.0.0.1 asking for ``a``."""

DEFAULT = RouterSettings()
SIDECAR = RouterSettings(mode=Mode.SIDECAR)
TRUSTED = RouterSettings(trust_forwarded=True)
MAX_BODY_10 = RouterSettings(limits=Limits(max_body_bytes=10))


def table_with_alice(**override: Any) -> RouteTable:
    """Service ``a`` whose override for alice is in the state ``override`` describes."""
    alice = Override("alice", Target(ALICE_URL), **override)
    return RouteTable({"a": Routes("a", Target(BASELINE_URL), {"alice": alice})}, version=1)


NOT_READY = table_with_alice(ready=False)
EXPIRED = table_with_alice(expires_at=1.0)  # one second into 1970
NOT_READY_FALLBACK = table_with_alice(ready=False, fallback=Fallback.BASELINE)
EXPIRED_FALLBACK = table_with_alice(expires_at=1.0, fallback=Fallback.BASELINE)
NO_OVERRIDES = make_table({"a": {"baseline": BASELINE_URL}})


# -- part 1 helpers: a head as the front end hands it to the policy ---------------------------


@dataclasses.dataclass(frozen=True)
class Head:
    method: bytes
    target: bytes
    version: str
    headers: list[tuple[bytes, bytes]]
    keep_alive: bool
    parser_upgrade: bool


def parse_head(raw: bytes) -> Head:
    """``raw`` (one head, CRLF lines) as ``ClientConnection.on_headers_complete`` passes it on:
    field values lose leading whitespace but keep trailing whitespace, as llhttp's do; keep-alive
    is HTTP/1.1 without ``Connection: close`` or HTTP/1.0 with ``Connection: keep-alive``; the
    parser upgrades when a Connection field lists ``upgrade`` and an Upgrade field is present.
    A request line without a version is HTTP/0.9. (test_the_head_split_agrees_with_llhttp.)"""
    assert raw.endswith(b"\r\n\r\n"), raw
    request_line, *lines = raw[:-4].split(b"\r\n")
    method, target, *version = request_line.split(b" ")
    headers = []
    for line in lines:
        name, _, value = line.partition(b":")
        headers.append((name, value.lstrip(b" \t")))
    tokens = {
        token.strip(b" \t").lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    http_version = version[0].removeprefix(b"HTTP/").decode() if version else "0.9"
    return Head(
        method=method,
        target=target,
        version=http_version,
        headers=headers,
        keep_alive=b"close" not in tokens and (http_version == "1.1" or b"keep-alive" in tokens),
        parser_upgrade=b"upgrade" in tokens and any(name.lower() == b"upgrade" for name, _ in headers),
    )


def decide_head(
    raw: bytes,
    settings: RouterSettings = DEFAULT,
    table: RouteTable = TABLE,
    *,
    cache: HeadCache | None = None,
    slot: TableSlot | None = None,
) -> Plan:
    """The policy's plan for the head ``raw`` from a client on 127.0.0.1."""
    head = parse_head(raw)
    return decide(
        Policy(settings),
        HeadCache(peer=PEER) if cache is None else cache,
        TableSlot(table) if slot is None else slot,
        head.method,
        head.target,
        head.version,
        head.keep_alive,
        head.parser_upgrade,
        head.headers,
        Plan(),
    )


def get(*fields: bytes, target: bytes = b"/", version: bytes = b"HTTP/1.1") -> bytes:
    """A GET head with ``Host: a`` and ``fields`` (each one ``Name: value``)."""
    return b"GET " + target + b" " + version + b"\r\nHost: a\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


def with_baggage(*lines: bytes) -> bytes:
    return get(*(b"baggage: " + line for line in lines))


def routed(plan: Plan) -> tuple[str | None, TargetKind, str | None, str]:
    """(key, target kind, target URL, reason) of a plan's routing decision."""
    decision = plan.decision
    assert decision is not None, plan.refusal
    return plan.key, decision.kind, decision.target.url if decision.target else None, decision.reason


TO_ALICE = ("alice", TargetKind.OVERRIDE, ALICE_URL, "override")
NO_KEY = (None, TargetKind.BASELINE, BASELINE_URL, "no-key")


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(get(), id="http-1.1"),
        pytest.param(get(b"Connection: close"), id="http-1.1-close"),
        pytest.param(get(version=b"HTTP/1.0"), id="http-1.0"),
        pytest.param(get(b"Connection: keep-alive", version=b"HTTP/1.0"), id="http-1.0-keep-alive"),
        pytest.param(get(b"Upgrade: websocket", b"Connection: Upgrade"), id="upgrade"),
        pytest.param(get(b"Upgrade: websocket", b"Connection: Upgrade", version=b"HTTP/1.0"), id="upgrade-1.0"),
        pytest.param(get(b"Connection: Upgrade, close", b"Upgrade: h2c"), id="upgrade-and-close"),
        pytest.param(get(b"Upgrade: websocket"), id="upgrade-without-connection"),
        pytest.param(get(b"Connection: Upgrade"), id="connection-upgrade-without-upgrade"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a \t\r\nX-A:  v \r\n\r\n", id="trailing-whitespace"),
        pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", id="http-2.0"),
        pytest.param(b"GET /\r\n\r\n", id="http-0.9"),
    ],
)
def test_the_head_split_agrees_with_llhttp(raw: bytes) -> None:
    """What ``parse_head`` hands the policy is what llhttp hands ``on_headers_complete``."""

    class Reading:
        url = b""
        headers: list[tuple[bytes, bytes]]
        seen: tuple[bytes, str, bool, bool]

        def __init__(self) -> None:
            self.headers = []

        def on_url(self, url: bytes) -> None:
            self.url += url

        def on_header(self, name: bytes, value: bytes) -> None:
            self.headers.append((name, value))

        def on_headers_complete(self) -> None:
            self.seen = (
                parser.get_method(),
                parser.get_http_version(),
                parser.should_keep_alive(),
                parser.should_upgrade(),
            )

    reading = Reading()
    parser = httptools.HttpRequestParser(reading)
    with contextlib.suppress(httptools.HttpParserUpgrade):
        parser.feed_data(raw)
    head = parse_head(raw)
    assert (head.method, head.version, head.keep_alive, head.parser_upgrade) == reading.seen
    assert (head.target, head.headers) == (reading.url, reading.headers)


# -- part 1: every refusal the policy can return ------------------------------------------------

HOST_INVALID = [b"a:evil.com", b"a:abc", b"a:-1", b"a:+80", b"a:99999", b"a:0", b"a:80:80", b"a[1]"]

REFUSALS = [
    pytest.param(b"GET /\r\n\r\n", DEFAULT, TABLE, Answer.HTTP_09, 400, id="http-0.9"),
    pytest.param(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", DEFAULT, TABLE, Answer.VERSION, 505, id="version-2.0"),
    pytest.param(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", DEFAULT, TABLE, Answer.CONNECT, 405, id="connect"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", DEFAULT, TABLE, Answer.NO_HOST, 400, id="H01"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", DEFAULT, TABLE, Answer.HOST_REPEATED, 400,
                 id="host-repeated"),
    *(
        pytest.param(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host, DEFAULT, TABLE, Answer.HOST_INVALID, 400,
                     id=f"host-invalid-{host.decode()}")
        for host in HOST_INVALID
    ),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a@b c\r\n\r\n", DEFAULT, TABLE, Answer.HOST_INVALID, 400, id="H03"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                 DEFAULT, TABLE, Answer.TE_REPEATED, 400, id="transfer-encoding-repeated"),
    pytest.param(b"POST / HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", DEFAULT, TABLE,
                 Answer.TE_IN_HTTP10, 400, id="transfer-encoding-in-http-1.0"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", DEFAULT, TABLE,
                 Answer.TE_UNSUPPORTED, 501, id="transfer-coding-gzip"),
    pytest.param(get(b"Upgrade: websocket", b"Connection: Upgrade", b"Content-Length: 5"), DEFAULT, TABLE,
                 Answer.UPGRADE_WITH_BODY, 400, id="upgrade-with-content-length"),
    pytest.param(get(b"Upgrade: websocket", b"Connection: Upgrade", b"Transfer-Encoding: chunked"), DEFAULT, TABLE,
                 Answer.UPGRADE_WITH_BODY, 400, id="upgrade-with-chunked-body"),
    # llhttp hands what follows any Upgrade head to the tunnel side, tunnelled or not.
    pytest.param(get(b"Upgrade: h2c", b"Connection: Upgrade", b"Content-Length: 5"), DEFAULT, TABLE,
                 Answer.UPGRADE_WITH_BODY, 400, id="h2c-upgrade-with-body"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\n", MAX_BODY_10, TABLE,
                 Answer.BODY_TOO_LARGE, 413, id="body-too-large"),
    pytest.param(get(target=b"http://a:evil.com/"), DEFAULT, TABLE, Answer.TARGET_AUTHORITY, 400,
                 id="target-authority-port"),
    pytest.param(get(target=b"http://u@a/"), DEFAULT, TABLE, Answer.TARGET_AUTHORITY, 400,
                 id="target-authority-userinfo"),
    pytest.param(get(target=b"http:///x"), DEFAULT, TABLE, Answer.TARGET_AUTHORITY, 400,
                 id="target-authority-empty"),
    pytest.param(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", DEFAULT, TABLE, Answer.TARGET_FORM, 400, id="R07"),
    pytest.param(get(target=b"https://a/"), DEFAULT, TABLE, Answer.TARGET_FORM, 400, id="target-form-https"),
    pytest.param(b"GET / HTTP/1.0\r\n\r\n", DEFAULT, TABLE, Answer.NO_AUTHORITY, 400, id="no-authority-http-1.0"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", DEFAULT, TABLE, Answer.NO_ROUTE, 404, id="no-route-ingress"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", SIDECAR, TABLE, Answer.NO_ROUTE_SIDECAR, 403,
                 id="no-route-sidecar"),
    # An absolute-form target names the authority, whatever Host says: never a forward proxy.
    pytest.param(b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: a\r\n\r\n", DEFAULT, TABLE,
                 Answer.NO_ROUTE, 404, id="R05"),
    pytest.param(with_baggage(b"devstack=alice"), DEFAULT, NOT_READY, Answer.OVERRIDE_NOT_READY, 503,
                 id="override-not-ready"),
    pytest.param(with_baggage(b"devstack=alice"), DEFAULT, EXPIRED, Answer.OVERRIDE_EXPIRED, 503,
                 id="override-expired"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "settings", "table", "answer", "status"), REFUSALS)
def test_the_policy_refuses_and_nothing_is_forwarded(
    raw: bytes, settings: RouterSettings, table: RouteTable, answer: Answer, status: int
) -> None:
    plan = decide_head(raw, settings, table)
    assert plan.refusal is answer
    assert answer.status == status
    assert plan.head == b""
    # Keep-alive survives only a refusal that does not close (and only if the client asked).
    assert plan.keep_alive is (parse_head(raw).keep_alive and not answer.closes)


@pytest.mark.parametrize(
    ("raw", "table", "answer", "keep_alive"),
    [
        pytest.param(get(b"Host: b"), TABLE, Answer.HOST_REPEATED, False, id="host-repeated-closes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a:0\r\n\r\n", TABLE, Answer.HOST_INVALID, False,
                     id="host-invalid-closes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", TABLE, Answer.NO_ROUTE, True, id="no-route-keeps"),
        pytest.param(with_baggage(b"devstack=alice"), NOT_READY, Answer.OVERRIDE_NOT_READY, True,
                     id="override-not-ready-keeps"),
    ],
)  # fmt: skip
def test_a_refusal_that_closes_clears_keep_alive_and_a_routing_refusal_keeps_it(
    raw: bytes, table: RouteTable, answer: Answer, keep_alive: bool
) -> None:
    assert parse_head(raw).keep_alive  # the client asked to keep the connection
    plan = decide_head(raw, table=table)
    assert (plan.refusal, answer.closes, plan.keep_alive) == (answer, not keep_alive, keep_alive)


# -- part 1: routing rules (README "Routing rules") --------------------------------------------

PAD_TO_8192 = b"pad=" + b"x" * 8173  # with ",devstack=alice" the line is 8192 bytes
MEMBERS_179 = b",".join(b"m%d=1" % i for i in range(179))

KEYS = [
    pytest.param([b"devstack=alice"], TO_ALICE, id="B01"),
    pytest.param([b"pad=" + b"x" * 8300 + b",devstack=alice"], NO_KEY, id="B02"),
    pytest.param([b"devstack=%zz"], NO_KEY, id="B04"),
    pytest.param([b"devstack=alice%0d%0aX-Injected:%201"], NO_KEY, id="B06"),
    pytest.param([b"devstack=alice,devstack=bob"], TO_ALICE, id="B08"),
    pytest.param([b"devstack=alice;ttl=30"], TO_ALICE, id="B10"),
    pytest.param([b"devstack=a+b"], NO_KEY, id="B12"),
    pytest.param([], NO_KEY, id="no-baggage"),
    pytest.param([b"devstack=%61lice"], TO_ALICE, id="percent-decoded"),
    pytest.param([b"devstack=Alice"], NO_KEY, id="not-a-dns-label"),
    pytest.param([b"k=v, devstack = alice ;p"], TO_ALICE, id="whitespace-and-properties"),
    pytest.param([b"devstack2=alice"], NO_KEY, id="devstack2-never-matches"),
    pytest.param([b"xdevstack=alice"], NO_KEY, id="xdevstack-never-matches"),
    pytest.param([b"xdevstack=bob,devstack=alice"], TO_ALICE, id="exact-name-after-a-longer-one"),
    pytest.param([b"devstack=%zz,devstack=alice"], NO_KEY, id="first-wins-even-invalid"),
    pytest.param([b"k=v", b"devstack=alice"], TO_ALICE, id="lines-combined"),
    pytest.param([b"devstack=bob", b"devstack=alice"], ("bob", TargetKind.BASELINE, BASELINE_URL, "no-override"),
                 id="first-line-wins"),
    pytest.param([b"devstack=%zz", b"devstack=alice"], NO_KEY, id="first-line-wins-even-invalid"),
    pytest.param([PAD_TO_8192 + b",devstack=alice"], TO_ALICE, id="member-ending-at-8192-bytes"),
    pytest.param([PAD_TO_8192 + b"x,devstack=alice"], NO_KEY, id="member-ending-past-8192-bytes"),
    pytest.param([MEMBERS_179 + b",devstack=alice"], TO_ALICE, id="member-180"),
    pytest.param([MEMBERS_179 + b",m=1,devstack=alice"], NO_KEY, id="member-181"),
    pytest.param([b"devstack=bob"], ("bob", TargetKind.BASELINE, BASELINE_URL, "no-override"),
                 id="key-without-override"),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "expected"), KEYS)
def test_the_routing_key_and_the_raw_baggage_forwarded_byte_identical(
    lines: list[bytes], expected: tuple[str | None, TargetKind, str, str]
) -> None:
    plan = decide_head(with_baggage(*lines))
    assert plan.refusal is None
    assert routed(plan) == expected
    forwarded = [line[len(b"baggage: ") :] for line in plan.head.split(b"\r\n") if line.startswith(b"baggage: ")]
    assert forwarded == lines
    assert b"\r\nX-Injected" not in plan.head  # B06: a decoded CRLF never becomes a header


@pytest.mark.parametrize(
    ("lines", "key"),
    [
        pytest.param([b"dev=bob"], "bob", id="alias-alone"),
        pytest.param([b"dev=bob,devstack=alice"], "alice", id="first-configured-name-decides"),
        pytest.param([b"dev=bob", b"devstack=%zz"], None, id="first-configured-name-decides-even-invalid"),
    ],
)
def test_with_aliases_the_first_configured_member_name_that_occurs_decides(lines: list[bytes], key: str | None) -> None:
    plan = decide_head(with_baggage(*lines), RouterSettings(key_members=("devstack", "dev")))
    assert plan.key == key


@pytest.mark.parametrize(
    ("table", "baggage", "refusal", "expected"),
    [
        pytest.param(TABLE, None, None, NO_KEY, id="no-key-baseline"),
        pytest.param(NO_OVERRIDES, b"devstack=alice", None,
                     ("alice", TargetKind.BASELINE, BASELINE_URL, "no-override"), id="no-override-baseline"),
        pytest.param(TABLE, b"devstack=alice", None, TO_ALICE, id="ready-override"),
        pytest.param(NOT_READY, b"devstack=alice", Answer.OVERRIDE_NOT_READY,
                     ("alice", TargetKind.ERROR, None, "override-not-ready"), id="not-ready-refused"),
        pytest.param(EXPIRED, b"devstack=alice", Answer.OVERRIDE_EXPIRED,
                     ("alice", TargetKind.ERROR, None, "override-expired"), id="expired-refused"),
        pytest.param(NOT_READY_FALLBACK, b"devstack=alice", None,
                     ("alice", TargetKind.BASELINE, BASELINE_URL, "override-not-ready-fallback"),
                     id="not-ready-fallback-baseline"),
        pytest.param(EXPIRED_FALLBACK, b"devstack=alice", None,
                     ("alice", TargetKind.BASELINE, BASELINE_URL, "override-expired-fallback"),
                     id="expired-fallback-baseline"),
    ],
)  # fmt: skip
def test_the_routing_table_rows(
    table: RouteTable,
    baggage: bytes | None,
    refusal: Answer | None,
    expected: tuple[str | None, TargetKind, str | None, str],
) -> None:
    plan = decide_head(with_baggage(baggage) if baggage else get(), table=table)
    assert plan.refusal is refusal
    assert routed(plan) == expected
    assert (plan.head != b"") is (refusal is None)


@pytest.mark.parametrize(
    ("fields", "debug"),
    [
        pytest.param([b"x-devstack-debug: 1"], True, id="debug-1"),
        pytest.param([b"X-Devstack-Debug: 1 "], True, id="debug-1-any-case"),
        pytest.param([b"x-devstack-debug: 0"], False, id="debug-0"),
        pytest.param([b"x-devstack-debug: yes"], False, id="debug-yes"),
        pytest.param([], False, id="no-debug"),
    ],
)
def test_x_devstack_debug_1_asks_for_the_route_and_is_not_forwarded(fields: list[bytes], debug: bool) -> None:
    plan = decide_head(get(*fields))
    assert plan.debug is debug
    assert plan.head == b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n"


# -- part 1: routing is per request ------------------------------------------------------------


C07_POLICY = [pytest.param("C07", id="C07")]


@pytest.mark.parametrize("case", C07_POLICY)
def test_pipelined_requests_on_one_connection_route_independently(case: str) -> None:
    cache, slot = HeadCache(peer=PEER), TableSlot(TABLE)
    first = decide_head(get(b"baggage: devstack=alice", target=b"/1"), cache=cache, slot=slot)
    second = decide_head(get(target=b"/2"), cache=cache, slot=slot)
    third = decide_head(get(b"baggage: devstack=alice", target=b"/3"), cache=cache, slot=slot)
    assert [routed(plan) for plan in (first, second, third)] == [TO_ALICE, NO_KEY, TO_ALICE]
    assert second.head == b"GET /2 HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n"


def test_a_table_swap_between_two_requests_is_seen_by_the_second() -> None:
    cache, slot = HeadCache(peer=PEER), TableSlot(NO_OVERRIDES)
    raw = with_baggage(b"devstack=alice")
    assert routed(decide_head(raw, cache=cache, slot=slot))[1:] == (TargetKind.BASELINE, BASELINE_URL, "no-override")
    slot.swap(TABLE)
    assert routed(decide_head(raw, cache=cache, slot=slot)) == TO_ALICE
    slot.swap(make_table({"b": {"baseline": BASELINE_URL}}))
    assert decide_head(raw, cache=cache, slot=slot).refusal is Answer.NO_ROUTE


def test_what_a_connection_remembers_never_excuses_the_next_request() -> None:
    cache, slot = HeadCache(peer=PEER), TableSlot(TABLE)
    padded = b"GET / HTTP/1.1\r\nHost: a \t\r\n\r\n"
    for _ in range(2):  # the second request takes the remembered (validated, padded) Host
        assert decide_head(padded, cache=cache, slot=slot).head == b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n"
    assert decide_head(get(), cache=cache, slot=slot).head == b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n"
    assert decide_head(b"GET / HTTP/1.1\r\nHost: a:0\r\n\r\n", cache=cache, slot=slot).refusal is Answer.HOST_INVALID
    assert decide_head(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", cache=cache, slot=slot).refusal is Answer.NO_ROUTE
    assert routed(decide_head(get(), cache=cache, slot=slot)) == NO_KEY


# -- part 1: forwarding (README "Forwarding"): the exact head sent upstream --------------------

TRACEPARENT = b"traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
B3 = b"b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"
X_B3 = b"X-B3-TraceId: 80f198ee56343ba864fe8b2a57d3eff7"

HEADS = [
    pytest.param(get(target=b"/x?q", version=b"HTTP/1.0"), DEFAULT,
                 b"GET /x?q HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n", id="request-line-is-http-1.1"),
    pytest.param(get(b"Accept: */*", b"cookie: a=1", b"Accept: text/html", b"X-Odd-Case: V a l"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\nAccept: */*\r\ncookie: a=1\r\nAccept: text/html\r\n"
                 b"X-Odd-Case: V a l\r\n" + XF + b"\r\n", id="end-to-end-fields-kept-in-order"),
    pytest.param(get(b"Connection: keep-alive", b"Keep-Alive: timeout=5", b"Proxy-Connection: keep-alive",
                     b"TE: trailers", b"Trailer: X-T", b"Upgrade: h2c", b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA",
                     b"Proxy-Authorization: Basic dTpw", b"X-Kept: 1"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\nX-Kept: 1\r\n" + XF + b"\r\n", id="hop-by-hop-removed"),
    pytest.param(get(b"Connection: X-A, x-b", b"X-A: 1", b"X-B: 2", b"X-C: 3"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\nX-C: 3\r\n" + XF + b"\r\n", id="connection-listed-removed"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, baggage, content-length\r\n"
                 b"baggage: devstack=alice\r\n\r\n", DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\n" + XF + b"\r\n", id="C03"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: host, content-length, baggage, traceparent, "
                 b"tracestate, b3, x-b3-traceid\r\nbaggage: k=v\r\n" + TRACEPARENT + b"\r\ntracestate: v=1\r\n"
                 + B3 + b"\r\n" + X_B3 + b"\r\nContent-Length: 2\r\n\r\n", DEFAULT,
                 b"POST / HTTP/1.1\r\nHost: a\r\nbaggage: k=v\r\n" + TRACEPARENT + b"\r\ntracestate: v=1\r\n" + B3
                 + b"\r\n" + X_B3 + b"\r\n" + XF + b"Content-Length: 2\r\n\r\n",
                 id="connection-cannot-strip-protected"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nConnection: transfer-encoding\r\nTransfer-Encoding: chunked\r\n\r\n",
                 DEFAULT, b"POST / HTTP/1.1\r\nHost: a\r\n" + XF + b"Transfer-Encoding: chunked\r\n\r\n",
                 id="connection-cannot-strip-transfer-encoding"),
    pytest.param(get(b"X-Forwarded-For: 1.2.3.4"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4, 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
                 b"X-Forwarded-Host: a\r\n\r\n", id="x-forwarded-for-appended"),
    pytest.param(get(b"X-Forwarded-For: 1.2.3.4", b"X-Forwarded-For: 5.6.7.8"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 1.2.3.4, 5.6.7.8, 127.0.0.1\r\n"
                 b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: a\r\n\r\n", id="x-forwarded-for-lines-combined"),
    pytest.param(get(b"Forwarded: for=6.6.6.6;proto=https", b"X-Forwarded-Proto: https", b"X-Forwarded-Host: evil"),
                 DEFAULT, b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n", id="client-forwarded-dropped"),
    pytest.param(get(b"Forwarded: for=6.6.6.6;proto=https", b"X-Forwarded-Proto: https", b"X-Forwarded-Host: evil"),
                 TRUSTED, b"GET / HTTP/1.1\r\nHost: a\r\nForwarded: for=6.6.6.6;proto=https\r\n"
                 b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\nX-Forwarded-For: 127.0.0.1\r\n\r\n",
                 id="client-forwarded-kept-when-trusted"),
    pytest.param(get(b"X-Devstack-Route: forged", b"x-devstack-key: bob", b"X-DEVSTACK-ANYTHING: 1"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n", id="client-x-devstack-dropped"),
    pytest.param(get(b"X_Forwarded_For: 6.6.6.6", b"x_forwarded_host: evil", b"X_Devstack_Route: forged",
                     b"Content_Length: 5", b"Transfer_Encoding: chunked", b"X_Custom: kept"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\nX_Custom: kept\r\n" + XF + b"\r\n", id="underscore-spellings"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a \t\r\n\r\n", DEFAULT, b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n",
                 id="host-whitespace-trimmed"),
    pytest.param(get(target=b"http://a/x?q"), DEFAULT, b"GET /x?q HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n",
                 id="absolute-form-to-origin-form"),
    pytest.param(b"GET http://a/x HTTP/1.1\r\nHost: b\r\nX-A: 1\r\n\r\n", DEFAULT,
                 b"GET /x HTTP/1.1\r\nX-A: 1\r\nHost: a\r\n" + XF + b"\r\n", id="absolute-form-authority-wins"),
    pytest.param(get(target=b"HTTP://A:8080?q"), DEFAULT,
                 b"GET /?q HTTP/1.1\r\nHost: A:8080\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
                 b"X-Forwarded-Host: A:8080\r\n\r\n", id="absolute-form-without-path"),
    pytest.param(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n", DEFAULT,
                 b"OPTIONS * HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n", id="options-asterisk"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "settings", "head"), HEADS)
def test_the_forwarded_head(raw: bytes, settings: RouterSettings, head: bytes) -> None:
    plan = decide_head(raw, settings)
    assert plan.refusal is None
    assert plan.head == head


def test_c03_connection_cannot_strip_what_routes_the_request() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, baggage, content-length\r\nbaggage: devstack=alice\r\n\r\n"
    plan = decide_head(raw)
    assert routed(plan) == TO_ALICE
    assert plan.keep_alive is False


@pytest.mark.parametrize(
    ("raw", "settings", "framing", "flags"),
    [
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", DEFAULT,
                     b"Transfer-Encoding: chunked\r\n", (True, True, False), id="chunked"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked \r\n\r\n", DEFAULT,
                     b"Transfer-Encoding: chunked\r\n", (True, True, False), id="chunked-any-case"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", DEFAULT,
                     b"Content-Length: 5\r\n", (False, True, True), id="content-length"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", DEFAULT,
                     b"", (False, False, False), id="get-content-length-0"),
        pytest.param(b"HEAD / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", DEFAULT,
                     b"", (False, False, False), id="head-content-length-0"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", DEFAULT,
                     b"Content-Length: 0\r\n", (False, False, False), id="post-content-length-0"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\n\r\n", DEFAULT,
                     b"", (False, False, False), id="post-without-framing"),
        pytest.param(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 8192\r\n\r\n", DEFAULT,
                     b"Content-Length: 8192\r\n", (False, True, True), id="small-body-at-limit"),
        pytest.param(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 8193\r\n\r\n", DEFAULT,
                     b"Content-Length: 8193\r\n", (False, True, False), id="body-past-small-limit"),
        pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\n", MAX_BODY_10,
                     b"Content-Length: 10\r\n", (False, True, True), id="body-at-max-body"),
    ],
)  # fmt: skip
def test_the_router_frames_the_forwarded_body_itself(
    raw: bytes, settings: RouterSettings, framing: bytes, flags: tuple[bool, bool, bool]
) -> None:
    plan = decide_head(raw, settings)
    method = parse_head(raw).method
    assert plan.head == method + b" / HTTP/1.1\r\nHost: a\r\n" + XF + framing + b"\r\n"
    assert (plan.chunked, plan.has_body, plan.small_body) == flags


def test_a_body_behind_expect_100_continue_is_never_small() -> None:
    plan = decide_head(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
    assert plan.head == b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n" + XF + b"Content-Length: 5\r\n\r\n"
    assert (plan.has_body, plan.small_body) == (True, False)


WS_FIELDS = (b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", b"Sec-WebSocket-Version: 13")

UPGRADES = [
    pytest.param(get(b"Upgrade: websocket", b"Connection: Upgrade", *WS_FIELDS, target=b"/ws"), DEFAULT,
                 b"GET /ws HTTP/1.1\r\nHost: a\r\n" + b"".join(f + b"\r\n" for f in WS_FIELDS) + XF
                 + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", True, id="websocket"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", True,
                 id="C05"),
    pytest.param(get(b"Upgrade: h2c", b"Connection: Upgrade, HTTP2-Settings",
                     b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n", False, id="h2c-never-tunnelled"),
    pytest.param(get(b"Upgrade: websocket", b"Connection: Upgrade", version=b"HTTP/1.0"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n", False, id="http-1.0-never-tunnelled"),
    pytest.param(get(b"Upgrade: websocket, h2c", b"Connection: Upgrade"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n", True,
                 id="only-allowed-protocols-kept"),
    pytest.param(get(b"Upgrade: h2c", b"Upgrade: WebSocket/13", b"Connection: Upgrade"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"Connection: Upgrade\r\nUpgrade: WebSocket/13\r\n\r\n",
                 True, id="allowed-protocol-as-sent"),
    pytest.param(get(b"Upgrade: websocket"), DEFAULT,
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n", False, id="upgrade-without-connection-upgrade"),
    pytest.param(get(b"Upgrade: foo", b"Connection: Upgrade"),
                 RouterSettings(upgrade_protocols=frozenset({b"websocket", b"foo"})),
                 b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"Connection: Upgrade\r\nUpgrade: foo\r\n\r\n", True,
                 id="protocol-added-by-setting"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "settings", "head", "upgrade"), UPGRADES)
def test_only_allowed_upgrades_from_http_1_1_are_tunnelled(
    raw: bytes, settings: RouterSettings, head: bytes, upgrade: bool
) -> None:
    plan = decide_head(raw, settings)
    assert plan.refusal is None
    assert (plan.head, plan.upgrade) == (head, upgrade)


# -- part 2 helpers: a real ClientConnection on stub transports ---------------------------------


class StubTransport(asyncio.Transport):
    """Stands in for uvloop's transport (as in benchmarks/micro.py): keeps what was written to
    it and how the connection was ended."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 50000)})
        self.data = bytearray()
        self.closed = False
        self.aborted = False
        self.eof_written = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.data += data

    def write_eof(self) -> None:
        self.eof_written = True

    def can_write_eof(self) -> bool:
        return True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclasses.dataclass
class StubOrigin:
    """One idle pooled connection to an origin's address, on a stub transport: whatever the
    router forwards there lands in ``received``."""

    connection: UpstreamConnection
    transport: StubTransport
    pool: _AddressPool

    @property
    def received(self) -> bytes:
        return bytes(self.transport.data)

    @property
    def idle(self) -> bool:
        return self.connection in self.pool.idle


def seed_idle_connection(ctx: ProxyContext, url: str) -> StubOrigin:
    """An idle keep-alive connection to ``url`` in the pool, as after an earlier request."""
    target = Target(url)
    pools: Any = ctx.pool._pools  # seeding the pool under test, as benchmarks/micro.py does
    pools[target.pool_key] = pool = _AddressPool(target.address)
    connection = UpstreamConnection(ctx.pool, pool)
    transport = StubTransport()
    connection.connection_made(transport)
    pool.total = 1
    ctx.stats.upstream_connections += 1
    connection.idle_since = connection.last_io = ctx.loop.time()
    pool.idle.append(connection)
    return StubOrigin(connection, transport, pool)


@dataclasses.dataclass
class Wire:
    ctx: ProxyContext
    conn: ClientConnection
    client: StubTransport
    origins: dict[str, StubOrigin]

    def send(self, raw: bytes) -> None:
        self.conn.data_received(raw)

    def responses(self) -> list[tuple[int, dict[str, str], bytes]]:
        return split_responses(bytes(self.client.data))

    def answer(self) -> tuple[int, dict[str, str], dict[str, Any]]:
        """The one response written so far: status, fields, the router's JSON body."""
        ((status, fields, body),) = self.responses()
        return status, fields, json.loads(body)

    def pool_untouched(self) -> bool:
        """No upstream address was ever asked for a connection (cold pool only)."""
        return not self.ctx.pool._pools and not self.ctx.pool._tasks and self.ctx.stats.upstream_connections == 0


@contextlib.asynccontextmanager
async def wire(settings: RouterSettings = DEFAULT, *, warm: bool = False) -> AsyncIterator[Wire]:
    """A client connection of a router with the document's table; ``warm``: one idle pooled
    connection to each origin. Whatever the context started is ended on the way out."""
    ctx = ProxyContext(asyncio.get_running_loop(), settings, TableSlot(TABLE))
    origins = {name: seed_idle_connection(ctx, url) for name, url in ORIGINS.items()} if warm else {}
    conn = ClientConnection(ctx)
    client = StubTransport()
    conn.connection_made(client)
    try:
        yield Wire(ctx, conn, client, origins)
    finally:
        conn.connection_lost(None)
        timer = getattr(conn, "_timer", None)  # the header deadline it armed
        if timer is not None:
            timer.cancel()
        ctx.pool.close()  # cancels connection attempts before they run: no connect is ever made
        await asyncio.gather(*ctx.pool._tasks, return_exceptions=True)


async def callbacks_run() -> None:
    """Let the loop run what the router scheduled with ``call_soon`` so far (no clock involved)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon(done.set_result, None)
    await done


# -- part 2: every case of shared/malformed-requests.md -----------------------------------------

MALFORMED = "malformed-request"

REFUSED_IN_THE_HEAD = [
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG",
                 400, MALFORMED, id="F01"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n"
                 b"8\r\nSMUGGLED\r\n0\r\n\r\n", 400, MALFORMED, id="F02"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!", 400, MALFORMED,
                 id="F03"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", 400, MALFORMED, id="F05"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x5\r\n\r\nhello", 400, MALFORMED, id="F07"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400, MALFORMED,
                 id="F09"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400, MALFORMED,
                 id="F11"),
    pytest.param(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                 b"0\r\n\r\n", 400, MALFORMED, id="F13"),
    pytest.param(b"GET / HTTP/1.1\nHost: a\n\n", 400, MALFORMED, id="L01"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: v\x00alue\r\n\r\n", 400, MALFORMED, id="L03"),
    pytest.param(b"GET / HTTP/1.1\r\n\tContent-Length: 1\r\nHost: a\r\n\r\nX", 400, MALFORMED, id="L05"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n\xefoo: bar\r\n\r\n", 400, MALFORMED, id="L07"),
    pytest.param(b'G=":<>(e),[T];?" /get HTTP/1.1\r\nHost: a\r\n\r\n', 400, MALFORMED, id="R01"),
    pytest.param(b"GET /\r\n\r\n", 400, "http-0.9", id="R03"),
    pytest.param(b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400, "target-form-unsupported", id="R07"),
    pytest.param(b"GET / HTTP/1.1\r\n\r\n", 400, "host-missing", id="H01"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a@b c\r\n\r\n", 400, "host-invalid", id="H03"),
    pytest.param(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414, "target-too-long", id="S01"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(1000)) + b"\r\n",
                 431, "headers-too-large", id="S03"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "status", "reason"), REFUSED_IN_THE_HEAD)
async def test_a_request_refused_in_its_head_is_answered_closed_and_never_forwarded(
    raw: bytes, status: int, reason: str
) -> None:
    async with wire() as w:
        w.send(raw)
        answered, fields, body = w.answer()
        assert (answered, body["reason"]) == (status, reason)
        assert body["error"] == HTTPStatus(status).phrase
        assert (body["service"], body["key"], body["target"]) == (None, None, None)
        # The parser's own words for what it refused; nothing to add for the router's own checks.
        assert isinstance(body["detail"], str) if reason == MALFORMED else body["detail"] is None
        assert fields["connection"] == "close"
        assert w.client.closed
        assert w.pool_untouched()


R05_CONNECTION = [pytest.param(b"GET http://169.254.169.254/latest HTTP/1.1\r\nHost: a\r\n\r\n", id="R05")]


@pytest.mark.parametrize("raw", R05_CONNECTION)
async def test_an_absolute_target_naming_no_service_is_refused_never_proxied(raw: bytes) -> None:
    async with wire() as w:
        w.send(raw)
        status, fields, body = w.answer()
        assert (status, body["reason"]) == (404, "no-route")
        assert "connection" not in fields  # a routing refusal keeps a good connection
        assert not w.client.is_closing()
        assert w.pool_untouched()


async def test_the_never_forwarded_check_sees_a_forwarded_request() -> None:
    """The control for ``Wire.pool_untouched``: a request that is forwarded fails it."""
    async with wire() as w:
        w.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        assert not w.pool_untouched()
        assert list(w.ctx.pool._pools) == [Target(BASELINE_URL).pool_key]


CHUNKED_HEAD = b"POST / HTTP/1.1\r\nHost: a\r\n" + XF + b"Transfer-Encoding: chunked\r\n\r\n"
CHUNKED = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"


MID_BODY = [
    pytest.param(CHUNKED + b"0x5\r\nhello\r\n0\r\n\r\n", CHUNKED_HEAD, id="F15"),
    pytest.param(CHUNKED + b"_5\r\nhello\r\n0\r\n\r\n", CHUNKED_HEAD, id="F15-underscore"),
    pytest.param(CHUNKED + b"+5\r\nhello\r\n0\r\n\r\n", CHUNKED_HEAD, id="F15-plus"),
    pytest.param(CHUNKED + b"5\r\nhelloXX0\r\n\r\n", CHUNKED_HEAD + b"5\r\nhello\r\n", id="F17"),
    pytest.param(CHUNKED + b"0\r\nContent-Length: 50\r\n\r\n", CHUNKED_HEAD, id="F19"),
]


@pytest.mark.parametrize(("raw", "received"), MID_BODY)
async def test_a_chunked_body_broken_mid_body_aborts_the_upstream_before_it_has_a_whole_request(
    raw: bytes, received: bytes
) -> None:
    """A valid head is forwarded at once (bodies stream), so here the parser finds the error
    after the upstream has the head: that connection is aborted before the last chunk, so no
    origin ever holds a whole request, and it never goes back to the pool."""
    async with wire(warm=True) as w:
        w.send(raw)
        status, fields, body = w.answer()
        assert (status, body["reason"], body["service"], body["target"]) == (400, MALFORMED, "a", BASELINE_URL)
        assert fields["connection"] == "close"
        assert w.client.eof_written  # our FIN; the rest of the body is read and discarded (lingering close)
        baseline, alice = w.origins["baseline"], w.origins["alice"]
        assert baseline.received == received
        assert not baseline.received.endswith(b"0\r\n\r\n")
        assert baseline.transport.aborted
        assert not baseline.idle
        assert (alice.received, alice.idle) == (b"", True)


C05_CONNECTION = [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, 0, id="C05"),
    pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", 101, 1,
                 id="C05-answered-101"),
]  # fmt: skip


@pytest.mark.parametrize(("response", "status", "tunnels"), C05_CONNECTION)
async def test_an_upgrade_is_tunnelled_only_after_the_upstream_answers_101(
    response: bytes, status: int, tunnels: int
) -> None:
    async with wire(warm=True) as w:
        w.send(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        baseline = w.origins["baseline"]
        assert baseline.received == (
            b"GET / HTTP/1.1\r\nHost: a\r\n" + XF + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert w.client.data == b""  # nothing is said to the client before the upstream answers
        baseline.connection.data_received(response)
        assert bytes(w.client.data).startswith(b"HTTP/1.1 %d " % status)
        assert w.ctx.stats.tunnels_open == tunnels
        w.send(b"frame")  # after a 101 the client's bytes are the tunnel's; otherwise nobody reads them
        assert baseline.received.endswith(b"frame") is (tunnels == 1)
        # Without a 101 the connection ends: the parser has stopped at the Upgrade head.
        assert w.client.closed is (tunnels == 0)


C07_CONNECTION = [pytest.param("C07", id="C07")]


@pytest.mark.parametrize("case", C07_CONNECTION)
async def test_pipelined_requests_route_independently_and_are_answered_in_order(case: str) -> None:
    async with wire(warm=True) as w:
        w.send(b"GET /1 HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\n\r\nGET /2 HTTP/1.1\r\nHost: a\r\n\r\n")
        baseline, alice = w.origins["baseline"], w.origins["alice"]
        assert alice.received == b"GET /1 HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\n" + XF + b"\r\n"
        assert baseline.received == b""  # /2 waits for /1's response: answers stay in order
        alice.connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nalice")
        await callbacks_run()
        assert baseline.received == b"GET /2 HTTP/1.1\r\nHost: a\r\n" + XF + b"\r\n"
        baseline.connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nbaseline")
        assert [(status, body) for status, _, body in w.responses()] == [(200, b"alice"), (200, b"baseline")]
        assert (alice.idle, baseline.idle, w.client.is_closing()) == (True, True, False)


# The response side: an upstream connection that answers with broken framing.
BROKEN_RESPONSES = [
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                 id="U01"),
    pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc", id="U03"),
    pytest.param(b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 3\r\n\r\nabc", id="U05"),
    pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length : 3\r\n\r\nabc", id="U07"),
]  # fmt: skip


@pytest.mark.parametrize("response", BROKEN_RESPONSES)
async def test_a_broken_upstream_response_gives_502_is_never_copied_and_its_connection_is_discarded(
    response: bytes,
) -> None:
    async with wire(warm=True) as w:
        w.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        baseline = w.origins["baseline"]
        baseline.connection.data_received(response)
        status, _, body = w.answer()
        assert (status, body["reason"], body["target"]) == (502, "bad-response", BASELINE_URL)
        assert b"abc" not in w.client.data
        assert baseline.transport.aborted
        assert not baseline.idle
        assert not w.client.is_closing()  # the client's request was fine: its connection stays


async def test_a_well_formed_upstream_response_is_relayed_and_its_connection_kept() -> None:
    """The control for the U* cases: their checks fail for a response that is fine."""
    async with wire(warm=True) as w:
        w.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        baseline = w.origins["baseline"]
        baseline.connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        assert w.client.data == b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
        assert (baseline.transport.aborted, baseline.idle) == (False, True)


# C01 is about time (a head trickled one byte at a time until the header deadline): it needs a
# clock, so it is left to the socket test that waits for it.
TIMER_CASES = [
    pytest.param(
        "C01",
        id="C01",
        marks=pytest.mark.skip(
            reason="timer case: tests/test_malformed_requests.py::test_c01_slowloris_is_closed_at_the_header_deadline"
        ),
    )
]


@pytest.mark.parametrize("case", TIMER_CASES)
def test_slowloris_is_closed_at_the_header_deadline(case: str) -> None:
    pytest.fail("a timer case: never run here (see its skip mark)")


# -- every id of the document appears above ------------------------------------------------------

DOCUMENT = Path(__file__).resolve().parents[2] / "shared" / "malformed-requests.md"
CASE_TABLES: list[list[Any]] = [
    # part 1, the policy
    REFUSALS, KEYS, C07_POLICY, HEADS, UPGRADES,
    # part 2, through a ClientConnection
    REFUSED_IN_THE_HEAD, R05_CONNECTION, MID_BODY, C05_CONNECTION, C07_CONNECTION, BROKEN_RESPONSES, TIMER_CASES,
]  # fmt: skip


def case_ids() -> set[str]:
    """The document ids this file's tables name (``F15-plus`` names F15)."""
    found = (re.match(r"([A-Z]\d{2})\b", param.id) for table in CASE_TABLES for param in table)
    return {match.group(1) for match in found if match}


def test_every_case_of_the_document_is_covered_here() -> None:
    if not DOCUMENT.exists():
        pytest.skip(f"{DOCUMENT} is not beside this checkout")
    documented = re.findall(r"^\| ([A-Z]\d{2}) \|", DOCUMENT.read_text(), flags=re.MULTILINE)
    assert documented
    assert len(documented) == len(set(documented))
    assert sorted(set(documented) - case_ids()) == []

"""HTTP/2 abuse: each known attack sent as raw frames over a real socket to a real router.

One test per attack (rapid reset and its server-side variant, CONTINUATION flood, HPACK bomb,
SETTINGS, PING and empty-DATA floods, a window never opened, streams above the concurrency
limit, header lists above the size limit). Each checks what the attacker reads on the wire
(the GOAWAY or RST_STREAM and its error code), the ``devstack_http2_goaway`` metric, what
reached the upstreams (bounded, or nothing), memory where the attack aims at it, and that a
well-behaved HTTP/2 connection opened before the attack, a fresh one and an HTTP/1.1 one are
all served afterwards. The upstreams are the fuzz's recording origins (every request they parse
is kept) and an aiohttp origin that streams a large body on ``/huge``.

The bugs these tests found are regression tests at the end of the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import re
import tracemalloc
from collections.abc import AsyncIterator, Sequence

import aiohttp
import hpack
import pytest
from aiohttp import web
from h2.errors import ErrorCodes
from h2.settings import SettingCodes

from router.http2 import _CONTROL_BUDGET, _EMPTY_DATA_BUDGET, _RESET_BUDGET, MAX_STREAMS, Http2Connection
from router.server import RouterServer
from router.settings import Limits, RouterSettings, Timeouts
from tests.fuzz.origins import RecordingOrigin
from tests.h2_client import H2Client
from tests.support import (
    END_HEADERS,
    END_STREAM,
    H2_PREFACE,
    MAX_FRAME,
    H2Type,
    H2Wire,
    Origin,
    exchange,
    h2_frame,
    h2_header_block,
    h2_request_fields,
    h2_rst,
    h2_settings,
    h2_window_update,
    make_table,
    running_router,
    split_responses,
)

MIB = 1 << 20
TIMEOUTS = Timeouts(body_idle=1.0)
"""A short body_idle: the stalled-window reset comes after it (checked once a second)."""
HUGE_BODY = 64 * MIB
"""What the origin tries to send on /huge: far more than the router may hold for one stream."""


@dataclasses.dataclass
class Stage:
    router: RouterServer
    origins: dict[str, RecordingOrigin]
    """``a``'s baseline and alice's override; bob has none."""
    huge_sent: list[int]
    """Bytes the /huge handler of service ``big`` got written (one entry per request)."""
    big: tuple[str, int]
    """The address of service ``big``'s origin."""
    marks: tuple[int, int, int] = (0, 0, 0)
    """routed, forwarded and upstream connections accepted when the attack began (``mark``)."""

    def connection_of(self, wire: H2Wire) -> Http2Connection | None:
        """The router's side of ``wire``'s connection, while it is open."""
        assert self.router.ctx is not None and wire.transport is not None
        ours = wire.transport.get_extra_info("sockname")
        http2 = [conn for conn in self.router.ctx.connections if isinstance(conn, Http2Connection)]
        return next((c for c in http2 if c.transport and c.transport.get_extra_info("peername") == ours), None)

    def mark(self) -> None:
        """The attack begins: ``routed``, ``forwarded`` and ``upstream_connections_accepted``
        count from here."""
        self.marks = (0, 0, 0)
        self.marks = (self.routed(), self.forwarded(), self.upstream_connections_accepted())

    def routed(self) -> int:
        """Requests the router has routed (a decision made) since the mark, any protocol."""
        return sum(self.router.stats.requests.values()) - self.marks[0]

    def forwarded(self) -> int:
        """Requests the recording origins parsed whole since the mark."""
        return sum(len(origin.records) for origin in self.origins.values()) - self.marks[1]

    def upstream_connections_accepted(self) -> int:
        return sum(origin.connections for origin in self.origins.values()) - self.marks[2]

    def in_use(self) -> int:
        """Upstream connections the router counts that are not idle in its pool: held by an
        exchange, or still connecting."""
        ctx = self.router.ctx
        assert ctx is not None
        addresses = [self.big, *(o.address for o in self.origins.values())]
        return self.router.stats.upstream_connections - sum(ctx.pool.idle_count(a) for a in addresses)

    async def upstream_settled(self, timeout: float = 10.0) -> None:
        """Wait until no upstream connection is in use: no connect started for a stream (even one
        reset since) is still under way, no exchange holds one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.in_use():
            assert loop.time() < deadline, f"{self.in_use()} upstream connections still in use"
            await asyncio.sleep(0.01)


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    counter = itertools.count()
    origins = {name: RecordingOrigin(name, counter) for name in ("baseline", "alice")}
    for origin in origins.values():
        await origin.start()
    big = Origin("big")
    huge_sent: list[int] = []

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        huge_sent.append(0)
        chunk = b"x" * 65536
        try:
            for _ in range(HUGE_BODY // len(chunk)):
                await response.write(chunk)
                huge_sent[-1] += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the router closed its upstream connection: what the test wants to see
        return response

    big.handlers["/huge"] = huge
    await big.start()
    table = make_table(
        {
            "a": {"baseline": origins["baseline"].url, "overrides": {"alice": origins["alice"].url}},
            "big": {"baseline": big.url},
        }
    )
    try:
        async with running_router(table, RouterSettings(timeouts=TIMEOUTS), admin=True) as server:
            yield Stage(server, origins, huge_sent, ("127.0.0.1", big.port))
    finally:
        await big.close()
        for origin in origins.values():
            await origin.close()


def request_block(encoder: hpack.Encoder, path: bytes, *, method: bytes = b"GET", authority: bytes = b"a") -> bytes:
    return encoder.encode(h2_request_fields(authority, path, method))


async def goaway_metric(stage: Stage, reason: str) -> float:
    """``devstack_http2_goaway_total{reason=...}`` as the admin listener's /metrics says it."""
    admin = f"http://127.0.0.1:{stage.router.admin_address[1]}/metrics"
    async with aiohttp.ClientSession() as session, session.get(admin) as resp:
        text = await resp.text()
    found = re.search(rf'^devstack_http2_goaway_total\{{reason="{reason}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def assert_cut_off(stage: Stage, wire: H2Wire, codes: Sequence[ErrorCodes]) -> ErrorCodes:
    """The attacker got a GOAWAY with one of ``codes``, the router closed the connection, and
    the metric counted it once under that code's name. Returns the code."""
    assert await wire.until(lambda w: w.goaway is not None, 5), f"no GOAWAY; the router sent {wire.frames[-5:]!r}"
    goaway = wire.goaway
    assert goaway is not None
    assert goaway.error_code in codes, f"GOAWAY {ErrorCodes(goaway.error_code)!r}, expected one of {codes!r}"
    code = ErrorCodes(goaway.error_code)
    assert await wire.until(lambda w: w.closed, 5), "the router kept the connection open after its GOAWAY"
    assert dict(stage.router.stats.h2_goaway) == {code.name: 1}
    assert await goaway_metric(stage, code.name) == 1.0
    return code


async def assert_refused(stage: Stage, wire: H2Wire, stream_id: int, codes: Sequence[ErrorCodes]) -> None:
    """An oversized header block was refused: the h2 engine cuts the connection (GOAWAY with one
    of ``codes``), libnghttp2 refuses the stream alone (RST_STREAM) and keeps decoding in step;
    either way nothing of it is held or forwarded."""
    assert await wire.until(lambda w: w.goaway is not None or stream_id in w.resets(), 5), (
        f"neither GOAWAY nor RST_STREAM; the router sent {wire.frames[-5:]!r}"
    )
    if wire.goaway is not None:
        await assert_cut_off(stage, wire, codes)
    else:
        assert wire.resets()[stream_id] in (ErrorCodes.PROTOCOL_ERROR, ErrorCodes.REFUSED_STREAM)


async def open_bystander(stage: Stage) -> H2Client:
    """A well-behaved HTTP/2 connection, established (one request answered) before the attack;
    the attack's counts start after it (``Stage.mark``)."""
    bystander = await H2Client.connect(stage.router.address[1])
    response = await bystander.request("a", "/before")
    assert (response.status, response.headers.get(b"x-origin")) == (200, b"baseline")
    stage.mark()
    return bystander


async def assert_others_served(stage: Stage, bystander: H2Client) -> None:
    """A well-behaved HTTP/2 connection opened before the attack, a fresh one, and an HTTP/1.1
    one are all served, each request by the upstream its own key names."""
    response = await bystander.request("a", "/bystander", [("baggage", "devstack=alice")])
    assert (response.status, response.headers.get(b"x-origin")) == (200, b"alice")
    fresh = await H2Client.connect(stage.router.address[1])
    try:
        response = await fresh.request("a", "/fresh")
        assert (response.status, response.headers.get(b"x-origin")) == (200, b"baseline")
    finally:
        await fresh.close()
    raw = b"GET /h1 HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\nConnection: close\r\n\r\n"
    data, _ = await exchange(stage.router.address[1], raw)
    ((status, headers, body),) = split_responses(data)
    assert (status, headers.get("x-origin"), body) == (200, "alice", b"ok")
    await bystander.close()


def answered(wire: H2Wire) -> set[int]:
    """Streams the router has ended (END_STREAM on DATA or HEADERS)."""
    return {f.stream_id for f in wire.frames if f.flags & END_STREAM and f.kind in (H2Type.DATA, H2Type.HEADERS)}


async def send_in_batches(wire: H2Wire, frames: Sequence[bytes], batch: int) -> int:
    """Send ``frames`` ``batch`` at a time, each batch acknowledged by a PING round trip, until
    the router stops reading; how many frames went out."""
    sent = 0
    for start in range(0, len(frames), batch):
        if not wire.send(b"".join(frames[start : start + batch])):
            break
        sent += len(frames[start : start + batch])
        if not await wire.roundtrip():
            break
    return sent


# -- rapid reset ---------------------------------------------------------------------------------


async def test_rapid_reset_is_cut_off_with_enhance_your_calm_and_bounded_upstream_work(stage: Stage) -> None:
    # CVE-2023-44487: open a stream and reset it at once, thousands of times; each costs the
    # router a decision and an upstream request or connection. After _RESET_BUDGET resets in
    # ten seconds the connection is cut; the upstream saw at most that many.
    bystander = await open_bystander(stage)
    wire = await H2Wire.connect(stage.router.address)
    encoder = hpack.Encoder()
    frames = [
        h2_header_block(sid, request_block(encoder, b"/rapid"), end_stream=True) + h2_rst(sid, ErrorCodes.CANCEL)
        for sid in range(1, 2 * 3000, 2)
    ]
    sent = await send_in_batches(wire, frames, 100)

    await assert_cut_off(stage, wire, [ErrorCodes.ENHANCE_YOUR_CALM])
    assert sent < len(frames)
    assert stage.routed() <= _RESET_BUDGET + 1
    await stage.upstream_settled()
    assert stage.forwarded() <= _RESET_BUDGET + 1
    assert stage.upstream_connections_accepted() <= _RESET_BUDGET + 1
    await assert_others_served(stage, bystander)


# -- CONTINUATION flood ----------------------------------------------------------------------------


async def test_continuation_flood_is_cut_off_with_bounded_memory(stage: Stage) -> None:
    # The 2024 CONTINUATION flood: a header block that never ends, in full-size frames. The
    # router (h2) holds a bounded backlog of them, then sends GOAWAY; whatever the attacker
    # offers, the router's memory does not follow it.
    bystander = await open_bystander(stage)
    wire = await H2Wire.connect(stage.router.address)
    opening = request_block(hpack.Encoder(), b"/flood")
    piece = h2_frame(H2Type.CONTINUATION, 0, 1, b"\x00" * MAX_FRAME)
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        wire.send(h2_frame(H2Type.HEADERS, 0, 1, opening))
        offered = 0
        while offered < 32 * MIB and wire.goaway is None and wire.send(piece):
            offered += len(piece)
            await wire.drain()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    code = await assert_cut_off(stage, wire, [ErrorCodes.PROTOCOL_ERROR, ErrorCodes.ENHANCE_YOUR_CALM])
    assert offered < 32 * MIB, "the router took 32 MiB of CONTINUATION frames without a GOAWAY"
    assert peak - before < 4 * MIB, f"{(peak - before) / MIB:.1f} MiB held for one endless header block ({code!r})"
    assert stage.forwarded() == 0
    await assert_others_served(stage, bystander)


# -- HPACK bomb ------------------------------------------------------------------------------------


def _hpack_integer(value: int, prefix_bits: int, first_byte: int) -> bytes:
    """RFC 7541 5.1: ``value`` in a ``prefix_bits`` prefix whose other bits ``first_byte`` holds."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_bomb(references: int) -> bytes:
    """A header block of a few KiB that decodes to ``references`` copies of a 4000-byte field:
    the field is added to the dynamic table once (literal with incremental indexing), then named
    by its one-byte index again and again."""
    name, value = b"x-bomb", b"b" * 4000
    block = bytearray(b"\x82\x86\x84")  # :method GET, :scheme http, :path / (static table)
    block += b"\x01\x01a"  # :authority a, literal without indexing (static name 1)
    block += b"\x40" + _hpack_integer(len(name), 7, 0) + name + _hpack_integer(len(value), 7, 0) + value
    block += b"\xbe" * references  # indexed field 62: the newest dynamic table entry
    return bytes(block)


async def test_hpack_bomb_is_refused_before_it_is_decoded(stage: Stage) -> None:
    # ~6 KiB on the wire that would decode to 8 MiB of headers: the decoder stops at the header
    # list limit (a connection error with h2, the stream refused with libnghttp2), so the decoded
    # size never exists in memory.
    bystander = await open_bystander(stage)
    wire = await H2Wire.connect(stage.router.address)
    block = hpack_bomb(2000)
    assert len(block) < MAX_FRAME
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        wire.send(h2_frame(H2Type.HEADERS, END_HEADERS | END_STREAM, 1, block))
        await wire.until(lambda w: w.goaway is not None or 1 in w.resets(), 5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    await assert_refused(stage, wire, 1, [ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.COMPRESSION_ERROR])
    assert peak - before < MIB, f"{(peak - before) / MIB:.1f} MiB held while refusing an HPACK bomb"
    assert stage.forwarded() == 0
    await assert_others_served(stage, bystander)


# -- header list above max_header_bytes ----------------------------------------------------------


async def test_a_header_list_above_max_header_bytes_is_refused_and_a_maximal_baggage_passes(stage: Stage) -> None:
    bystander = await open_bystander(stage)
    # A W3C-maximal baggage (8192 bytes) is within the advertised limit and routes.
    baggage = "devstack=alice,pad=" + "p" * (8192 - len("devstack=alice,pad="))
    response = await bystander.request("a", "/maximal", [("baggage", baggage)])
    assert (response.status, response.headers.get(b"x-origin")) == (200, b"alice")

    wire = await H2Wire.connect(stage.router.address)
    assert await wire.until(lambda w: bool(w.of_kind(H2Type.SETTINGS)), 5)
    limit = RouterSettings().limits.max_header_bytes
    assert wire.of_kind(H2Type.SETTINGS)[0].settings()[SettingCodes.MAX_HEADER_LIST_SIZE] == limit
    fields = h2_request_fields(b"a", b"/too-big", extra=[(b"x-big", b"v" * (limit + 1000))])
    block = hpack.Encoder().encode(fields, huffman=False)
    wire.send(h2_header_block(1, block, end_stream=True))

    await assert_refused(stage, wire, 1, [ErrorCodes.ENHANCE_YOUR_CALM, ErrorCodes.COMPRESSION_ERROR])
    assert sorted(r.url for origin in stage.origins.values() for r in origin.records) == [b"/before", b"/maximal"]
    await assert_others_served(stage, bystander)


# -- SETTINGS and PING floods ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "flood",
    [
        pytest.param(h2_settings(), id="settings"),
        pytest.param(h2_settings((SettingCodes.INITIAL_WINDOW_SIZE, 65535)), id="settings-with-a-value"),
        pytest.param(h2_frame(H2Type.PING, 0, 0, b"floodfld"), id="ping"),
    ],
)
async def test_settings_and_ping_floods_are_cut_off_with_enhance_your_calm(stage: Stage, flood: bytes) -> None:
    # Each SETTINGS and PING makes the router write an acknowledgement. Half the budget is
    # answered and the connection goes on serving; a flood gets GOAWAY(ENHANCE_YOUR_CALM).
    bystander = await open_bystander(stage)
    wire = await H2Wire.connect(stage.router.address)
    wire.send(flood * (_CONTROL_BUDGET // 2))
    assert await wire.roundtrip()
    assert wire.goaway is None
    wire.send(h2_header_block(1, request_block(hpack.Encoder(), b"/within-budget"), end_stream=True))
    assert await wire.until(lambda w: 1 in answered(w), 5)

    sent = await send_in_batches(wire, [flood] * 20 * _CONTROL_BUDGET, _CONTROL_BUDGET // 4)

    await assert_cut_off(stage, wire, [ErrorCodes.ENHANCE_YOUR_CALM])
    assert sent < 20 * _CONTROL_BUDGET
    await assert_others_served(stage, bystander)


# -- zero-length DATA flood -----------------------------------------------------------------------


async def test_empty_data_flood_is_cut_off_with_enhance_your_calm(stage: Stage) -> None:
    # DATA frames without payload or END_STREAM cost a frame's handling each and carry nothing.
    bystander = await open_bystander(stage)
    wire = await H2Wire.connect(stage.router.address)
    wire.send(h2_header_block(1, request_block(hpack.Encoder(), b"/upload", method=b"POST"), end_stream=False))
    empty = h2_frame(H2Type.DATA, 0, 1)
    sent = await send_in_batches(wire, [empty] * 20 * _EMPTY_DATA_BUDGET, _EMPTY_DATA_BUDGET // 4)

    await assert_cut_off(stage, wire, [ErrorCodes.ENHANCE_YOUR_CALM])
    assert sent < 20 * _EMPTY_DATA_BUDGET
    assert stage.forwarded() == 0  # the POST never ended, so no origin parsed a whole request
    await assert_others_served(stage, bystander)


# -- a window that is never opened ----------------------------------------------------------------


async def test_a_window_never_opened_holds_the_upstream_and_resets_the_stream_after_body_idle(stage: Stage) -> None:
    # The client allows no response bytes (INITIAL_WINDOW_SIZE 0) and never sends WINDOW_UPDATE
    # while the upstream has 64 MiB to send: the router holds a bounded amount for the stream,
    # pauses the upstream, and resets the stream once body_idle has passed without progress.
    bystander = await open_bystander(stage)
    wire = await H2Wire.connect(
        stage.router.address, preface=H2_PREFACE + h2_settings((SettingCodes.INITIAL_WINDOW_SIZE, 0))
    )
    wire.send(h2_header_block(1, request_block(hpack.Encoder(), b"/huge", authority=b"big"), end_stream=True))
    assert await wire.until(lambda w: any(f.kind == H2Type.HEADERS and f.stream_id == 1 for f in w.frames), 5)
    loop = asyncio.get_running_loop()
    headers_at = loop.time()

    # The upstream is paused with at most a few hundred KiB held for the stream.
    deadline = loop.time() + 5
    while True:
        conn = stage.connection_of(wire)
        stream = conn.streams.get(1) if conn is not None else None
        if stream is not None and stream.upstream_paused:
            break
        assert loop.time() < deadline, "the router never paused the upstream of a stream whose window is shut"
        await asyncio.sleep(0.01)
    assert stream.out_size < MIB

    assert await wire.until(lambda w: 1 in w.resets(), TIMEOUTS.body_idle + 3)
    waited = loop.time() - headers_at
    assert wire.resets()[1] == ErrorCodes.FLOW_CONTROL_ERROR
    assert TIMEOUTS.body_idle * 0.9 <= waited <= TIMEOUTS.body_idle + 2.5
    assert not any(f.kind == H2Type.DATA and f.stream_id == 1 for f in wire.frames)
    assert stage.huge_sent[0] < HUGE_BODY // 2, f"the upstream wrote {stage.huge_sent[0] / MIB:.0f} MiB"
    # The upstream connection is closed (its response was cut), and only the stream was reset.
    await stage.upstream_settled(timeout=3)
    assert wire.goaway is None and not wire.closed
    assert dict(stage.router.stats.h2_goaway) == {}
    await assert_others_served(stage, bystander)


# -- bugs these tests found, fixed: regression tests ------------------------------------------------


async def test_made_you_reset_is_cut_off_like_rapid_reset(stage: Stage) -> None:
    # CVE-2025-8671: the client makes the *server* reset each stream it opens (a stream-level
    # WINDOW_UPDATE that overflows the window is a stream error, RFC 9113 6.9.1). Same cost per
    # stream as rapid reset, so the same budget must apply.
    wire = await H2Wire.connect(stage.router.address)
    encoder = hpack.Encoder()
    frames = [
        h2_header_block(sid, request_block(encoder, b"/made-you-reset"), end_stream=True)
        + h2_window_update(sid, 0x7FFFFFFF)
        for sid in range(1, 2 * 3000, 2)
    ]
    await send_in_batches(wire, frames, 100)
    assert set(wire.resets().values()) <= {ErrorCodes.FLOW_CONTROL_ERROR}
    await stage.upstream_settled()
    upstream_work = stage.upstream_connections_accepted() + stage.forwarded()
    assert wire.goaway is not None, (
        f"{len(wire.resets())} streams reset by the router, no GOAWAY; {stage.routed()} routed, "
        f"{upstream_work} upstream connections and requests"
    )
    await assert_cut_off(stage, wire, [ErrorCodes.ENHANCE_YOUR_CALM])
    assert stage.routed() <= _RESET_BUDGET + 1
    assert upstream_work <= _RESET_BUDGET + 1


async def test_a_stream_above_max_concurrent_streams_is_refused_and_the_others_complete(stage: Stage) -> None:
    wire = await H2Wire.connect(stage.router.address)
    assert await wire.until(lambda w: bool(w.of_kind(H2Type.SETTINGS)), 5)
    assert wire.of_kind(H2Type.SETTINGS)[0].settings()[SettingCodes.MAX_CONCURRENT_STREAMS] == MAX_STREAMS
    encoder = hpack.Encoder()
    open_ids = list(range(1, 2 * MAX_STREAMS, 2))
    wire.send(h2_settings(ack=True))
    opening = [request_block(encoder, b"/c%d" % sid, method=b"POST") for sid in open_ids]
    wire.send(b"".join(h2_header_block(sid, block, end_stream=False) for sid, block in zip(open_ids, opening)))
    assert await wire.roundtrip()
    extra = 2 * MAX_STREAMS + 1
    wire.send(h2_header_block(extra, request_block(encoder, b"/one-too-many"), end_stream=True))
    assert await wire.roundtrip(), f"the connection ended: {wire.goaway!r}"
    assert wire.goaway is None
    assert wire.resets().get(extra) in (ErrorCodes.REFUSED_STREAM, ErrorCodes.PROTOCOL_ERROR)

    wire.send(b"".join(h2_frame(H2Type.DATA, END_STREAM, sid) for sid in open_ids))
    assert await wire.until(lambda w: answered(w) >= set(open_ids), 10), f"{len(answered(wire))} streams answered"
    assert dict(stage.router.stats.h2_goaway) == {}


@pytest.mark.parametrize(
    ("path", "extra", "status"),
    [
        pytest.param("/fields", [(f"x-{i}", "v") for i in range(150)], 431, id="more-fields-than-max-headers"),
        pytest.param("/" + "p" * 20000, [], 414, id="path-longer-than-max-request-line"),
    ],
)
async def test_http1_head_limits_apply_to_http2_streams(
    stage: Stage, path: str, extra: list[tuple[str, str]], status: int
) -> None:
    limits = Limits()
    assert len(extra) > limits.max_headers or len(path) > limits.max_request_line
    client = await H2Client.connect(stage.router.address[1])
    try:
        response = await client.request("a", path, extra)
    finally:
        await client.close()
    forwarded = [(r.method, r.url[:20], len(r.headers)) for o in stage.origins.values() for r in o.records]
    assert forwarded == [], f"forwarded (method, path, fields): {forwarded!r}"
    assert response.status == status

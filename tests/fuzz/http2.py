"""The HTTP/2 frame-level fuzz: well-formed requests on several streams, interleaved, with random
frames, flags, stream ids, lengths and garbage among them, sent as raw bytes to the request
fuzz's router and recording origins (``H2Harness``, on ``Harness``), and the invariants each
example must keep (``H2Harness.check_h2`` lists them).

Every well-formed request carries its own key in ``baggage`` (alice, bob, none, and spellings
the README routes by) and a marker naming its example and stream (``x-fuzz-stream``), so what
each origin recorded, and each response the client read, can be traced to exactly one stream.
Its header block never touches the HPACK dynamic table when there is noise (a random header
block may change the router's table, and a later block that referred to it would then decode
as something else through no fault of the router's); examples without noise use the table.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import struct
import time
from collections.abc import Callable
from typing import Any, Final

import hpack
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hypothesis import strategies as st

from router.http2 import MAX_STREAMS, Http2Connection
from tests.fuzz.config import SLACK, TIMEOUTS
from tests.fuzz.expectations import expected_origin
from tests.fuzz.harness import Harness
from tests.fuzz.origins import Record
from tests.fuzz.reference import Message
from tests.h2_client import H2Client
from tests.support import (
    ACK,
    END_HEADERS,
    END_STREAM,
    H2_PREFACE,
    PADDED,
    PRIORITY,
    H2Frame,
    H2Type,
    H2Wire,
    h2_frame,
    h2_goaway,
    h2_header_block,
    h2_request_fields,
    h2_settings,
)

CONTROL_PATH: Final = "/__h2control"
"""What the fresh, well-behaved connection after each example asks for."""
MARKER: Final = b"x-fuzz-stream"
"""The request header naming a well-formed request's example and stream (``e12.5``)."""
AUTHORITIES: Final = (b"a",) * 6 + (b"a:8080", b"b")
"""``b`` is in no table: the router answers 404 itself."""
BAGGAGE: Final = (None, None, b"devstack=alice", b"devstack=alice", b"devstack=bob", b"k=v,devstack=alice",
                  b"devstack=alice;ttl=30", b"devstack=ALICE", b"devstack=%61lice",
                  b"devstack=alice,devstack=bob")  # fmt: skip
METHODS: Final = (b"GET",) * 4 + (b"POST", b"POST", b"PUT", b"HEAD", b"DELETE")
ENDINGS: Final = ("headers", "headers", "data", "data", "empty-data", "trailers", "open")
"""How the client ends a request: END_STREAM on its HEADERS, on its last DATA, on an empty DATA,
on a trailers block; or never (the stream is still open when the client goes)."""
CLIENT_ENDS: Final = ("close", "close", "abort", "goaway", "half-close")
SETTING_VALUES: Final = (0, 1, 100, 16384, 65535, 1 << 20, (1 << 24) - 1, 1 << 24,
                         (1 << 31) - 1, 1 << 31, (1 << 32) - 1)  # fmt: skip
"""Values for random SETTINGS frames: the limits of each setting's range and just past them."""
PREFACE_SETTINGS: Final = (*SettingCodes, 0x99)
"""What the client's own SETTINGS may carry (0x99: unknown, to be ignored)."""
WINDOW_INCREMENTS: Final = (0, 1, 1000, 65535, (1 << 31) - 1, 1 << 31)
_HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
"""Fail on the known bugs below too (for checking a fix), instead of counting them."""
WAIT: Final = max(TIMEOUTS.body_idle + 1.0, TIMEOUTS.upstream_response) + SLACK
"""Longest a due stream may wait for its answer: a shut window is reset after body_idle (checked
once a second), an upstream answers within upstream_response."""


def _opened_out_of_order(case: H2Case) -> set[int]:
    """Streams whose first HEADERS came after a higher-numbered stream's: RFC 9113 5.1.1 closes
    them implicitly, and an engine may ignore their HEADERS (libnghttp2 does, on purpose; h2 ends
    the connection), so they are not owed an answer."""
    highest = 0
    seen: set[int] = set()
    late: set[int] = set()
    for index in case.order:
        stream_id = case.requests[index].stream_id
        if stream_id in seen:
            continue
        seen.add(stream_id)
        if stream_id < highest:
            late.add(stream_id)
        highest = max(highest, stream_id)
    return late


@dataclasses.dataclass(frozen=True)
class Request:
    """A well-formed request on its own stream."""

    stream_id: int
    authority: bytes
    method: bytes
    baggage: bytes | None
    body: tuple[bytes, ...]
    """Its DATA frames' payloads (no padding)."""
    ending: str
    content_length: bool
    block_frames: int
    """Frames its header block is cut into (HEADERS, then CONTINUATION)."""

    @property
    def path(self) -> bytes:
        return b"/s%d" % self.stream_id

    def marker(self, nonce: bytes) -> bytes:
        return b"%s.%d" % (nonce, self.stream_id)

    @property
    def part_count(self) -> int:
        return 1 + len(self.body) + (self.ending in ("empty-data", "trailers"))

    def parts(self, encode: Callable[[list[tuple[bytes, bytes]]], bytes], nonce: bytes) -> list[Callable[[], bytes]]:
        """Its frames, in the pieces other streams' frames may come between (a header block is
        one piece: nothing may interrupt it). Each piece is made when it is sent: a header block
        that uses the HPACK dynamic table must be encoded in the order the peer decodes it."""
        extra = [(MARKER, self.marker(nonce))]
        if self.baggage is not None:
            extra.append((b"baggage", self.baggage))
        if self.content_length:
            extra.append((b"content-length", b"%d" % len(b"".join(self.body))))
        sid = self.stream_id

        def head() -> bytes:
            block = encode(h2_request_fields(self.authority, self.path, self.method, extra))
            size = max(1, -(-len(block) // self.block_frames))
            return h2_header_block(sid, block, end_stream=self.ending == "headers", frame_size=size)

        out: list[Callable[[], bytes]] = [head]
        for i, chunk in enumerate(self.body):
            last = i == len(self.body) - 1
            frame = h2_frame(H2Type.DATA, END_STREAM if last and self.ending == "data" else 0, sid, chunk)
            out.append(lambda frame=frame: frame)  # type: ignore[misc]
        if self.ending == "empty-data":
            out.append(lambda: h2_frame(H2Type.DATA, END_STREAM, sid))
        elif self.ending == "trailers":
            out.append(lambda: h2_header_block(sid, encode([(b"x-trailer", b"t")]), end_stream=True))
        return out

    def expected_origin(self) -> str | None:
        """The origin this request must reach (None: the router answers itself, or the README's
        rule is not obvious for this baggage)."""
        if self.authority == b"b":
            return None
        return expected_origin(Message(headers=[(b"baggage", self.baggage)] if self.baggage is not None else []))


@dataclasses.dataclass(frozen=True)
class Noise:
    """Bytes among the requests' frames: a random frame, or garbage."""

    label: str
    data: bytes
    stream_id: int | None = None
    kind: int | None = None
    desyncs: bool = False
    """Garbage, or a frame whose length lies: whatever follows may be read as anything."""


@dataclasses.dataclass(frozen=True)
class H2Case:
    requests: tuple[Request, ...]
    order: tuple[int, ...]
    """The interleaving: each entry names a request whose next part is sent there."""
    noise: tuple[tuple[int, Noise], ...]
    """(position in the interleaving, noise sent before that part), positions ascending."""
    settings: tuple[tuple[int, int], ...]
    """The client's SETTINGS in its preface."""
    dynamic: bool
    """Header blocks may use the HPACK dynamic table (only without noise)."""
    cuts: tuple[int, ...]
    """Byte offsets where the bytes are split into separately sent segments."""
    end: str

    def __repr__(self) -> str:
        noise = [(at, n.label, n.data) for at, n in self.noise]
        return (
            f"H2Case(requests={self.requests!r}, order={self.order!r}, noise={noise!r}, settings={self.settings!r}, "
            f"dynamic={self.dynamic!r}, cuts={self.cuts!r}, end={self.end!r})"
        )

    def render(self, nonce: bytes) -> Rendered:
        """The bytes to send, and what they make due."""
        encoder = hpack.Encoder()
        if self.dynamic:
            encode: Callable[[list[tuple[bytes, bytes]]], bytes] = encoder.encode
        else:

            def encode(fields: list[tuple[bytes, bytes]]) -> bytes:
                return encoder.encode([(k, v, True) for k, v in fields])  # never indexed: no table

        parts = {r.stream_id: r.parts(encode, nonce) for r in self.requests}
        sent = {r.stream_id: 0 for r in self.requests}
        out = [H2_PREFACE + h2_settings(*self.settings)]
        rendered = Rendered()
        noise = list(self.noise)
        desynced = False
        for position, index in enumerate(self.order):
            while noise and noise[0][0] <= position:
                item = noise.pop(0)[1]
                out.append(item.data)
                rendered.note(item)
                desynced = desynced or item.desyncs
            request = self.requests[index]
            sid = request.stream_id
            out.append(parts[sid][sent[sid]]())
            sent[sid] += 1
            if sent[sid] == len(parts[sid]) and not desynced:
                rendered.whole.add(sid)
        for _, item in noise:
            out.append(item.data)
            rendered.note(item)
        raw = b"".join(out)
        bounds = [0, *sorted({c % (len(raw) + 1) for c in self.cuts}), len(raw)]
        rendered.segments = [raw[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        return rendered


@dataclasses.dataclass
class Rendered:
    """A case's bytes for one example, and what they make of each stream."""

    segments: list[bytes] = dataclasses.field(default_factory=list)
    whole: set[int] = dataclasses.field(default_factory=set)
    """Streams all of whose frames were sent before any garbage."""
    tainted: set[int] = dataclasses.field(default_factory=set)
    """Streams a random DATA, HEADERS or CONTINUATION frame named: their body may differ."""
    everything_tainted: bool = False
    client_reset: set[int] = dataclasses.field(default_factory=set)
    """Streams the client reset itself (nothing is due on them)."""
    labels: list[str] = dataclasses.field(default_factory=list)

    def note(self, item: Noise) -> None:
        self.labels.append(item.label)
        if item.desyncs:
            self.everything_tainted = True
        elif item.kind in (H2Type.DATA, H2Type.HEADERS, H2Type.CONTINUATION) and item.stream_id is not None:
            self.tainted.add(item.stream_id)
        elif item.kind == H2Type.RST_STREAM and item.stream_id is not None:
            self.client_reset.add(item.stream_id)


# -- strategies ------------------------------------------------------------------------------------


@st.composite
def _request(draw: st.DrawFn, stream_id: int) -> Request:
    method = draw(st.sampled_from(METHODS))
    ending = draw(st.sampled_from(ENDINGS))
    body: tuple[bytes, ...] = ()
    if ending != "headers":
        low = 1 if ending == "data" else 0
        body = tuple(draw(st.lists(st.binary(max_size=300), min_size=low, max_size=3)))
    return Request(
        stream_id=stream_id,
        authority=draw(st.sampled_from(AUTHORITIES)),
        method=method,
        baggage=draw(st.sampled_from(BAGGAGE)),
        body=body,
        ending=ending,
        content_length=ending not in ("headers", "open") and draw(st.booleans()),
        block_frames=draw(st.sampled_from([1, 1, 1, 2, 3])),
    )


@st.composite
def _noise(draw: st.DrawFn, stream_ids: list[int]) -> Noise:
    what = draw(st.sampled_from(["frame"] * 8 + ["garbage", "lying-length"]))
    if what == "garbage":
        return Noise("garbage", draw(st.binary(min_size=1, max_size=24)), desyncs=True)
    kind = draw(st.sampled_from(list(H2Type) * 3 + [0x0A, 0x10, 0xFF]))
    high = max(stream_ids, default=1)
    sid = draw(st.sampled_from([0, *stream_ids, *stream_ids, high + 2, high + 1, (1 << 31) - 1, 1 << 31]))
    flags = draw(st.sampled_from([0, 0, END_STREAM, END_HEADERS, END_STREAM | END_HEADERS, PADDED, PRIORITY, 0xFF]))
    if kind == H2Type.RST_STREAM:
        payload = struct.pack(">I", draw(st.sampled_from([*ErrorCodes, 0xFF, 1 << 31])))
    elif kind == H2Type.SETTINGS:
        pairs = draw(st.lists(st.tuples(st.integers(0, 9), st.sampled_from(SETTING_VALUES)), max_size=3))
        payload = b"".join(struct.pack(">HI", k, v) for k, v in pairs)
        flags = draw(st.sampled_from([0, 0, ACK]))
    elif kind == H2Type.WINDOW_UPDATE:
        payload = struct.pack(">I", draw(st.sampled_from(WINDOW_INCREMENTS)))
    elif kind == H2Type.PRIORITY:
        dependency = draw(st.sampled_from([0, sid, sid + 2, 1 << 31 | sid]))
        payload = struct.pack(">IB", dependency & 0xFFFFFFFF, draw(st.integers(0, 255)))
    elif kind == H2Type.PING:
        payload = draw(st.sampled_from([b"pingpong", b"", b"x" * 9]))
    elif kind == H2Type.GOAWAY:
        payload = struct.pack(
            ">II", draw(st.sampled_from([0, high, (1 << 31) - 1])), draw(st.sampled_from(list(ErrorCodes)))
        )
    elif kind == H2Type.DATA and flags & PADDED:
        pad = draw(st.integers(0, 8))
        payload = bytes((pad,)) + draw(st.binary(max_size=16)) + b"\0" * draw(st.sampled_from([pad, pad + 1]))
    else:
        payload = draw(st.binary(max_size=40))
    if what == "lying-length":
        length = draw(
            st.sampled_from([0, max(len(payload) - 1, 0), len(payload) + 1, len(payload) + 9, 1 << 14, (1 << 24) - 1])
        )
        return Noise(
            f"lying-length:{kind}", h2_frame(kind, flags, sid, payload, length=length), sid, kind, desyncs=True
        )
    name = H2Type(kind).name if kind <= max(H2Type) else f"type-{kind:#x}"
    return Noise(f"frame:{name}", h2_frame(kind, flags, sid, payload), sid, kind)


def _valid_setting(code: int, value: int) -> bool:
    if code in (SettingCodes.ENABLE_PUSH, SettingCodes.ENABLE_CONNECT_PROTOCOL):
        return value in (0, 1)
    if code == SettingCodes.MAX_FRAME_SIZE:
        return 1 << 14 <= value < 1 << 24
    return True


@st.composite
def h2_cases(draw: st.DrawFn) -> H2Case:
    count = draw(st.integers(1, 6))
    step = draw(st.sampled_from([2, 2, 2, 4]))
    requests = tuple(draw(_request(1 + step * i)) for i in range(count))
    # The interleaving: usually new streams open in increasing order (RFC 9113 5.1.1); sometimes not.
    in_order = draw(st.sampled_from([True] * 5 + [False]))
    remaining = [r.part_count for r in requests]
    opened = 0
    order = []
    while any(remaining):
        ready = [i for i, left in enumerate(remaining)
                 if left and (not in_order or left < requests[i].part_count or i == opened)]  # fmt: skip
        index = ready[draw(st.integers(0, len(ready) - 1))]
        if remaining[index] == requests[index].part_count:
            opened += 1
        remaining[index] -= 1
        order.append(index)
    stream_ids = [r.stream_id for r in requests]
    noise = draw(
        st.one_of(st.just([]), st.lists(st.tuples(st.integers(0, len(order)), _noise(stream_ids)), max_size=4))
    )
    pairs = st.tuples(st.sampled_from(PREFACE_SETTINGS), st.sampled_from([0, 1, 4096, 16384, 65535, 1 << 20]))
    settings = draw(st.one_of(st.just([]), st.lists(pairs, max_size=3)))
    # The client's own SETTINGS must be valid, or nothing after them is worth sending (random
    # SETTINGS frames among the noise need not be); a window of 0 would stall every response
    # until body_idle, so it stays rare (noise shuts windows too).
    settings = [(k, v) for k, v in settings if _valid_setting(k, v)]
    if (SettingCodes.INITIAL_WINDOW_SIZE, 0) in settings and draw(st.integers(0, 3)):
        settings = [(k, v) for k, v in settings if k != SettingCodes.INITIAL_WINDOW_SIZE]
    return H2Case(
        requests=requests,
        order=tuple(order),
        noise=tuple(sorted(noise, key=lambda item: item[0])),
        settings=tuple(settings),
        dynamic=not noise and draw(st.booleans()),
        cuts=tuple(draw(st.lists(st.integers(0, 1 << 16), max_size=3))),
        end=draw(st.sampled_from(CLIENT_ENDS)),
    )


# -- what the client read --------------------------------------------------------------------------


def answered(frames: list[H2Frame]) -> set[int]:
    """Streams the router has finished: END_STREAM on its DATA or HEADERS, or RST_STREAM."""
    return {
        f.stream_id
        for f in frames
        if f.kind == H2Type.RST_STREAM or (f.flags & END_STREAM and f.kind in (H2Type.DATA, H2Type.HEADERS))
    }


@dataclasses.dataclass
class StreamSeen:
    """One stream as the client read it."""

    head: list[tuple[bytes, bytes]] | None = None
    trailers: list[tuple[bytes, bytes]] | None = None
    body: bytearray = dataclasses.field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None

    @property
    def answered(self) -> bool:
        return self.ended or self.reset is not None

    def field(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.head or [] if k == name), None)


def read_streams(frames: list[H2Frame]) -> tuple[dict[int, StreamSeen], list[str]]:
    """The router's frames as streams, header blocks decoded in order (one HPACK decoder for the
    connection, as a client keeps); problems with what the router sent."""
    decoder = hpack.Decoder()
    decoder.max_allowed_table_size = 1 << 32
    streams: dict[int, StreamSeen] = collections.defaultdict(StreamSeen)
    problems: list[str] = []
    block: bytearray | None = None
    block_stream = 0
    block_ends = False
    for frame in frames:
        kind = frame.kind
        if block is not None and kind != H2Type.CONTINUATION:
            problems.append(f"the router interrupted a header block with {frame!r}")
            block = None
        if kind in (H2Type.HEADERS, H2Type.CONTINUATION):
            payload = frame.payload
            if kind == H2Type.HEADERS:
                if frame.flags & PADDED:
                    payload = payload[1 : len(payload) - payload[0]]
                if frame.flags & PRIORITY:
                    payload = payload[5:]
                block, block_stream, block_ends = bytearray(), frame.stream_id, bool(frame.flags & END_STREAM)
            if block is None:
                problems.append(f"the router sent a CONTINUATION outside a header block: {frame!r}")
                continue
            block += payload
            if frame.flags & END_HEADERS:
                try:
                    fields = [(bytes(k), bytes(v)) for k, v in decoder.decode(bytes(block), raw=True)]
                except hpack.HPACKError as exc:
                    problems.append(f"the router sent a header block that does not decode: {exc!r}")
                    return streams, problems
                seen = streams[block_stream]
                if seen.head is None or (seen.field(b":status") or b"").startswith(b"1"):
                    seen.head = fields
                else:
                    seen.trailers = fields
                seen.ended = seen.ended or block_ends
                block = None
        elif kind == H2Type.DATA:
            payload = (
                frame.payload[1 : len(frame.payload) - frame.payload[0]] if frame.flags & PADDED else frame.payload
            )
            streams[frame.stream_id].body += payload
            streams[frame.stream_id].ended = streams[frame.stream_id].ended or bool(frame.flags & END_STREAM)
        elif kind == H2Type.RST_STREAM:
            streams[frame.stream_id].reset = frame.error_code
        elif kind == H2Type.PUSH_PROMISE:
            problems.append(f"the router pushed: {frame!r}")
    return dict(streams), problems


def _code_name(code: int) -> str:
    try:
        return ErrorCodes(code).name
    except ValueError:
        return str(code)  # not a code RFC 9113 defines


# -- the harness -----------------------------------------------------------------------------------


class H2Harness(Harness):
    """The request fuzz's router and recording origins, driven with raw HTTP/2 frames; its loop
    reports any exception it would have logged (a crash in a protocol callback)."""

    def __init__(self) -> None:
        super().__init__()
        self.loop_errors: list[str] = []
        self.tally: collections.Counter[str] = collections.Counter()
        self._nonces = itertools.count(1)

    async def _start(self) -> None:
        asyncio.get_running_loop().set_exception_handler(self._on_loop_error)
        await super()._start()

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exception = context.get("exception")
        self.loop_errors.append(f"{context.get('message')}: {exception!r}")

    def summary_h2(self, profile: str) -> str:
        tally = ", ".join(f"{k}: {n}" for k, n in sorted(self.tally.items()))
        return (
            f"fuzz-h2[{profile}]: {self.examples} examples in {time.monotonic() - self.started:.1f} s; {tally}; "
            f"longest GC pause {self.gc_max:.2f} s"
        )

    def check_h2(self, case: H2Case) -> None:
        """Run one example and check, for every example:

        1. no crash: the router's loop reported no exception, a fresh well-behaved HTTP/2
           connection is served (alice's key by alice, no key by the baseline), then an HTTP/1.1
           request (``Harness._check_alive``), and the loop was never blocked for a second;
        2. no cross-stream mixing: every request an origin recorded from this example names one
           well-formed stream by its marker, and has that stream's method, path, baggage (and
           body, unless random frames named the stream), no marker twice; it reached the origin
           that stream's own key names; every response carrying an origin's sequence number is on
           the stream whose request that origin recorded under it;
        3. no hang: every stream the client ended (and did not reset) is answered, by END_STREAM
           or RST_STREAM, unless the connection ended (GOAWAY or close), within the router's own
           deadlines;
        4. bounded: while the example runs, the router holds at most MAX_STREAMS streams and a
           bounded number of bytes for them; once the client is gone, no connection, stream or
           upstream connection of it remains;
        5. well-formed answers: the router's header blocks decode, carry no connection-specific
           fields, are never interrupted, and it never pushes; what it forwarded is strictly framed.
        """
        self._count_example()
        self.run(self._check_h2(case), 30)

    async def _check_h2(self, case: H2Case) -> None:
        assert self.router is not None and self.router.ctx is not None
        ctx = self.router.ctx
        peer = self._next_peer()
        nonce = b"e%d" % next(self._nonces)
        for origin in self.origins.values():
            origin.records.clear()
            origin.problems.clear()
        self.worst_lag = 0.0
        rendered = case.render(nonce)
        tally = self.tally
        tally["requests"] += len(case.requests)
        tally.update(rendered.labels)

        upstream_errors = dict(self.router.stats.upstream_errors)
        wire = await H2Wire.connect(self.router.address, preface=b"", local_addr=peer)
        problems: list[str] = []
        try:
            for i, segment in enumerate(rendered.segments):
                if not wire.send(segment):
                    break
                if i + 1 < len(rendered.segments):
                    await asyncio.sleep(0.002)
            problems += self._held_by_router(ctx, wire)
            due = {r.stream_id for r in case.requests if r.ending != "open"} & rendered.whole
            due -= rendered.client_reset
            due -= _opened_out_of_order(case)

            finished = await wire.until(lambda w: w.goaway is not None or due <= answered(w.frames), WAIT)
            problems += self._held_by_router(ctx, wire)
            if not finished and not wire.closed:
                streams, _ = read_streams(wire.frames)
                late = sorted(sid for sid in due if sid not in streams or not streams[sid].answered)
                problems.append(f"hang: streams {late} unanswered after {WAIT:.1f} s on an open connection")
            await self._end(case.end, wire)
        finally:
            wire.abort()
        await asyncio.sleep(0.01)  # let the origins finish parsing what the router flushed at close

        streams, read_problems = read_streams(wire.frames)
        problems += read_problems
        problems += self._check_streams(case, rendered, streams, peer.encode(), nonce)
        problems += self._check_blame(case, rendered, streams, upstream_errors)
        problems += await self._check_released(ctx)
        problems += await self._check_fresh_h2()
        problems += await self._check_alive(ctx)
        if self.loop_errors:
            problems += [f"the router's loop reported: {e}" for e in self.loop_errors]
            self.loop_errors.clear()
        tally[f"goaway {_code_name(wire.goaway.error_code)}" if wire.goaway is not None else "no goaway"] += 1
        for seen in streams.values():
            status = seen.field(b":status")
            if status is not None:
                tally[f"status {status.decode()}"] += 1
            if seen.reset is not None:
                tally[f"rst {_code_name(seen.reset)}"] += 1
        if problems:
            raise AssertionError(
                f"{len(problems)} invariant(s) broken for {case!r}\n  client got: "
                f"{[(f.kind, f.flags, f.stream_id, f.payload[:40]) for f in wire.frames][:40]!r}\n  - "
                + "\n  - ".join(problems)
            )

    def _held_by_router(self, ctx: Any, wire: H2Wire) -> list[str]:
        """What the router holds for this connection now, within bounds."""
        if wire.transport is None:
            return []
        ours = wire.transport.get_extra_info("sockname")
        for conn in ctx.connections:
            if isinstance(conn, Http2Connection) and conn.transport is not None:
                if conn.transport.get_extra_info("peername") != ours:
                    continue
                held = sum(s.out_size + sum(map(len, s.held)) for s in conn.streams.values())
                if len(conn.streams) > MAX_STREAMS or held > 4 << 20:
                    return [f"the router holds {len(conn.streams)} streams and {held} bytes for one connection"]
        return []

    async def _end(self, how: str, wire: H2Wire) -> None:
        self.tally[f"end {how}"] += 1
        transport = wire.transport
        if transport is None or transport.is_closing():
            return
        if how == "abort":
            wire.abort()
        elif how == "goaway":
            wire.send(h2_goaway(0, ErrorCodes.NO_ERROR))
            transport.close()
        elif how == "half-close":
            transport.write_eof()
            await wire.until(lambda w: w.closed, 1.0)
        else:
            transport.close()

    def _check_streams(
        self, case: H2Case, rendered: Rendered, streams: dict[int, StreamSeen], peer: bytes, nonce: bytes
    ) -> list[str]:
        problems = []
        by_id = {r.stream_id: r for r in case.requests}
        records = [r for origin in self.origins.values() for r in origin.records if r.peer == peer]
        for origin in self.origins.values():
            problems += origin.problems
        self.tally["forwarded"] += len(records)
        by_seq: dict[tuple[str, int], Record] = {}
        markers: set[bytes] = set()
        for record in records:
            by_seq[(record.origin, record.seq)] = record
            baggage = record.header(b"baggage")
            want = expected_origin(Message(headers=[(b"baggage", b) for b in baggage]))
            if want is not None and record.origin != want:
                problems.append(f"origin {record.origin} got a request with baggage {baggage!r}: {record.url!r}")
            marker = record.header(MARKER)
            if len(marker) != 1 or not marker[0].startswith(nonce + b"."):
                problems.append(f"origin {record.origin} got a request naming no stream of this example: "
                                f"{record.method!r} {record.url!r} {record.headers!r}")  # fmt: skip
                continue
            if marker[0] in markers:
                problems.append(f"stream {marker[0]!r} reached the origins twice")
            markers.add(marker[0])
            request = by_id.get(int(marker[0].split(b".")[1]))
            if request is None:
                problems.append(f"a request marked {marker[0]!r} reached {record.origin}, but no such stream was sent")
                continue
            sid = request.stream_id
            mine = (request.method, request.path, [request.baggage] if request.baggage is not None else [])
            if (record.method, record.url, baggage) != mine:
                problems.append(f"stream {sid}'s request {mine!r} arrived as {(record.method, record.url, baggage)!r}")
            if request.expected_origin() not in (None, record.origin):
                problems.append(f"stream {sid} (baggage {request.baggage!r}) reached {record.origin}")
            if request.authority == b"b":
                problems.append(f"stream {sid} for an unknown authority reached {record.origin}")
            clean = not rendered.everything_tainted and sid not in rendered.tainted
            if clean and record.body != b"".join(request.body):
                problems.append(f"stream {sid}'s body {b''.join(request.body)[:60]!r} arrived as {record.body[:60]!r}")
        for sid, seen in streams.items():
            for name, _ in (seen.head or []) + (seen.trailers or []):
                if name in _HOP_BY_HOP or name != name.lower():
                    problems.append(f"stream {sid}'s response carries {name!r}")
            named, seq = seen.field(b"x-origin"), seen.field(b"x-seq")
            if named is None:
                continue
            answered_by = by_seq.get((named.decode(), int(seq or b"-1")))
            if answered_by is None:
                problems.append(f"stream {sid} got origin {named!r}'s answer #{seq!r} to no request of this client")
            elif answered_by.header(MARKER) != [b"%s.%d" % (nonce, sid)]:
                problems.append(f"stream {sid} got the answer to {answered_by.header(MARKER)!r} ({answered_by.url!r})")
            if sid not in by_id:
                problems.append(f"stream {sid}, which the client never opened as a request, got {named!r}'s answer")
        return problems

    def _check_blame(
        self, case: H2Case, rendered: Rendered, streams: dict[int, StreamSeen], before: dict[str, int]
    ) -> list[str]:
        """The origins answer every whole request at once and never fail: any upstream failure the
        router counted during the example is a false report."""
        assert self.router is not None
        after = self.router.stats.upstream_errors
        counted = {reason: n - before.get(reason, 0) for reason, n in after.items() if n != before.get(reason, 0)}
        if not counted:
            return []
        blamed = {sid for sid, seen in streams.items() if seen.field(b":status") == b"504"}
        return [f"the router counted upstream failures {counted!r} (504 on streams {sorted(blamed)})"]

    async def _check_released(self, ctx: Any) -> list[str]:
        """The client is gone: nothing of its connection stays in the router."""
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while loop.time() < end:
            in_use = self.router.stats.upstream_connections - sum(  # type: ignore[union-attr]
                ctx.pool.idle_count(o.address) for o in self.origins.values()
            )
            if not ctx.connections and in_use == 0:
                return []
            await asyncio.sleep(0.005)
        streams = sum(len(getattr(c, "streams", ())) for c in ctx.connections)
        return [f"after the client left, the router keeps {len(ctx.connections)} connections ({streams} streams) "
                f"and {in_use} upstream connections in use"]  # fmt: skip

    async def _check_fresh_h2(self) -> list[str]:
        """A fresh, well-behaved HTTP/2 connection is served, each stream by its key's origin."""
        assert self.router is not None
        problems = []
        try:
            client = await H2Client.connect(self.router.address[1])
        except OSError as exc:
            return [f"a fresh HTTP/2 connection failed: {exc!r}"]
        try:
            answers = await asyncio.gather(
                client.request("a", CONTROL_PATH, [("baggage", "devstack=alice")]),
                client.request("a", CONTROL_PATH),
                return_exceptions=True,
            )
        finally:
            await client.close()
        for name, answer in zip(("alice", "baseline"), answers):
            if isinstance(answer, BaseException):
                problems.append(f"a fresh HTTP/2 request to {name} failed: {answer!r}")
            elif (answer.status, answer.headers.get(b"x-origin")) != (200, name.encode()):
                problems.append(f"a fresh HTTP/2 request to {name} got {answer.status} {answer.headers!r}")
        for origin in self.origins.values():
            origin.records[:] = [r for r in origin.records if r.url != CONTROL_PATH.encode()]
        return problems

"""Client side for HTTP/2: one HTTP/2 client connection, every stream routed by its own key.

A connection that opens with the HTTP/2 preface (prior knowledge, what gRPC uses in cleartext),
that negotiated ``h2`` by ALPN, or that a sidecar's ``CONNECT`` opened for a service, is served
here; the HTTP/1.1 connection (``router.proxy``) hands it over. Each stream's head goes through
the same request policy as an HTTP/1.1 request (``router.request.decide``): its ``:authority``
names the service and its own ``baggage`` the key, so one connection multiplexes alice's and
bob's calls to different upstreams. A stream is forwarded to an HTTP/1.1 upstream through the
shared ``UpstreamPool`` (this module implements the ``ExchangeOwner`` contract for it) or to an
h2c upstream through the ``H2Pool``, with trailers relayed exactly and flow control passed
through both ways: bytes are acknowledged to the sender only once the receiver has taken them.
The router's own answers to a gRPC call are trailers-only gRPC responses (``grpc_status`` in
the catalogue). Misbehaving peers (rapid resets, floods of SETTINGS, PING or empty DATA, header
bombs, windows never opened) are met with budgets and GOAWAY, never with unbounded memory.
"""

from __future__ import annotations

import asyncio
from time import perf_counter
from typing import TYPE_CHECKING, Final, cast

from router import h2engine as ev
from router.errors import Answer, render_body
from router.h2engine import ErrorCode, ProtocolError, make_engine
from router.request import HeadCache, Plan, decide
from router.scope import scope_name
from router.stats import UNROUTED
from router.upstream import ForwardedOwner, Framing, PoolFull, UnexpectedUpgrade, UpstreamConnection

if TYPE_CHECKING:
    from router.h2upstream import H2Upstream
    from router.proxy import ProxyContext
    from router.table import Target

from router.h2upstream import HOP_BY_HOP as _HOP_BY_HOP
from router.h2upstream import H2StreamOwner, request_fields

__all__ = ["Http2Connection", "grpc_timeout"]

PRI_HEAD: Final = b"PRI * HTTP/2.0\r\n\r\n"
"""What llhttp reads of the preface before it stops (``Pause on PRI/Upgrade``)."""

Headers = list[tuple[bytes, bytes]]

MAX_STREAMS: Final = 128
"""Concurrent streams a client may open (SETTINGS_MAX_CONCURRENT_STREAMS)."""
_STREAM_WINDOW: Final = 1 << 20
_CONNECTION_WINDOW: Final = 4 << 20
"""Receive windows: what one stream / the whole connection may send before we acknowledge.
They bound what a client can make the router hold for an upstream that is slow to read."""
_OUT_HIGH: Final = 256 * 1024
"""Response bytes held for one stream before the upstream is told to wait (its window stays
shut, or its socket is not read)."""
_WRITE_BUFFER_LIMIT: Final = 8 << 20
"""Bytes queued on the client socket past which a peer that does not read is cut off."""
_BUDGET_WINDOW: Final = 10.0
_RESET_BUDGET: Final = 400
"""Streams a client may reset (or have refused) per ten seconds: rapid reset (CVE-2023-44487)
costs us a decision and an upstream stream each."""
_CONTROL_BUDGET: Final = 200
"""SETTINGS and PING frames per ten seconds (each makes us write an acknowledgement)."""
_EMPTY_DATA_BUDGET: Final = 1000
"""DATA frames without payload or END_STREAM per ten seconds."""

_GRPC_UNITS: Final = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def _code_name(code: int) -> str:
    try:
        return ErrorCode(code).name
    except ValueError:
        return str(code)


def grpc_timeout(value: bytes) -> float | None:
    """Seconds of a ``grpc-timeout`` value (``100m``, ``5S``: at most 8 digits and a unit), or
    None when it is not one (gRPC ignores what it cannot read, and so do we)."""
    value = value.strip()
    unit = _GRPC_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits or len(digits) > 8 or not digits.isdigit():
        return None
    return int(digits) * unit


def _percent_encode(text: str) -> bytes:
    """grpc-message's encoding: printable ASCII except ``%`` as is, the rest as %XX of UTF-8."""
    out = bytearray()
    for byte in text.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


class _Budget:
    """A count of events that may happen ``limit`` times per window before the peer is cut off."""

    __slots__ = ("limit", "count", "since")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.since = 0.0

    def spend(self, now: float) -> bool:
        if now - self.since > _BUDGET_WINDOW:
            self.since = now
            self.count = 0
        self.count += 1
        return self.count <= self.limit


class Http2Connection:
    """One HTTP/2 client connection: h2's state machine, the streams, and the budgets.

    An asyncio protocol by its methods; made by the HTTP/1.1 connection that saw the preface
    (or by the listener when TLS negotiated ``h2``) with the bytes read so far.
    """

    def __init__(self, ctx: ProxyContext, cache: HeadCache) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.cache = cache
        self.transport: asyncio.Transport | None = None
        self.h2 = make_engine(
            False,
            max_streams=MAX_STREAMS,
            max_header_list=ctx.settings.limits.max_header_bytes,
            stream_window=_STREAM_WINDOW,
            connection_window=_CONNECTION_WINDOW,
            engine=ctx.settings.http2_engine,
        )
        """The protocol engine (``router.h2engine``): libnghttp2's, or h2's where it is missing."""
        self.streams: dict[int, _Stream] = {}
        self.closed = False
        self.write_paused = False
        self.going_away = False
        self._resets = _Budget(_RESET_BUDGET)
        self._control = _Budget(_CONTROL_BUDGET)
        self._empty_data = _Budget(_EMPTY_DATA_BUDGET)
        self._timer: asyncio.TimerHandle | None = None
        self._idle_since = self.loop.time()
        self._flush_pending = False
        self._engine_resets = 0
        self._late_resets: list[int] = []
        """The engine's ``stream_errors`` already counted against the reset budget."""

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.connections.add(self)
        self._flush()  # our SETTINGS
        self._timer = self.loop.call_later(1.0, self._tick)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.h2.receive(data)
        except ProtocolError as exc:
            # The engine has queued a GOAWAY with the right code (PROTOCOL_ERROR,
            # FRAME_SIZE_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM for a flood or too many
            # CONTINUATION frames); nothing more is read from a client that broke the protocol.
            self.ctx.stats.h2_goaway[_code_name(exc.code)] += 1
            self._close(exc.code, already_queued=True)
            return
        now = self.loop.time()
        engine_resets = self.h2.stream_errors - self._engine_resets
        if engine_resets:
            self._engine_resets += engine_resets
            for _ in range(engine_resets):
                if not self._resets.spend(now):
                    self._calm()
                    return
        streams = self.streams
        for event in events:
            kind = type(event)
            if kind is ev.DataReceived:
                data_event = cast(ev.DataReceived, event)
                stream = streams.get(data_event.stream_id)
                payload = data_event.data
                if not payload and not data_event.ended and not self._empty_data.spend(now):
                    self._calm()
                    return
                if stream is not None:
                    stream.client_data(payload, data_event.flow_length)
                    if data_event.ended:
                        stream.client_end(None)
                elif data_event.flow_length:
                    self.h2.consume(data_event.stream_id, data_event.flow_length)
            elif kind is ev.RequestReceived:
                request = cast(ev.RequestReceived, event)
                self._request(request.stream_id, request.headers, request.ended)
            elif kind is ev.StreamEnded:
                stream = streams.get(event.stream_id)
                if stream is not None and not stream.client_ended:
                    stream.client_end(None)
            elif kind is ev.TrailersReceived:
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream.client_end(cast(ev.TrailersReceived, event).headers)
            elif kind is ev.StreamReset:
                stream = streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.client_reset()
                if not self._resets.spend(now):
                    self._calm()
                    return
            elif kind is ev.WindowUpdated:
                if event.stream_id:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.pump()
                else:
                    for stream in list(streams.values()):
                        stream.pump()
            elif kind is ev.RemoteSettingsChanged or kind is ev.PingReceived:
                if not self._control.spend(now):
                    self._calm()
                    return
                if kind is ev.RemoteSettingsChanged:
                    for stream in list(streams.values()):
                        stream.pump()
            elif kind is ev.ConnectionTerminated:
                self.going_away = True
                if not streams:
                    self._close(None)
                    return
        self._flush()

    def eof_received(self) -> bool | None:
        return None  # close our side too: a client that half-closes an HTTP/2 connection is done

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self not in self.ctx.connections:
            return
        self.closed = True
        self.ctx.connections.discard(self)
        self.ctx.stats.open_connections -= 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.client_reset()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in list(self.streams.values()):
            stream.pump()
        self._flush()

    # -- drain (ProxyContext.drain) ------------------------------------------------------------

    def close_if_idle(self) -> None:
        """Draining: no new streams (GOAWAY), close once those in flight have ended."""
        if self.closed:
            return
        self.going_away = True
        if not self.streams:
            self._close(None)
            return
        self.h2.goaway(ErrorCode.NO_ERROR, max(self.streams))
        self._flush()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    # -- streams --------------------------------------------------------------------------------

    def _request(self, stream_id: int, headers: Headers, ended: bool) -> None:
        if self.going_away or len(self.streams) >= MAX_STREAMS:
            # Refused streams cost a reset each, and count like the client's own (a client that
            # keeps opening them is resetting streams by proxy).
            self._reset(stream_id, ErrorCode.REFUSED_STREAM)
            if not self._resets.spend(self.loop.time()):
                self._calm()
            return
        ctx = self.ctx
        stream = _Stream(self, stream_id)
        self.streams[stream_id] = stream
        stream.begin(ctx, headers, ended)

    def ack(self, stream_id: int, length: int) -> None:
        """Give request bytes the upstream has taken back to the client's windows."""
        if length and not self.closed:
            self.h2.consume(stream_id, length)
            self.flush_soon()

    def _reset(self, stream_id: int, code: int) -> None:
        self.h2.reset(stream_id, code)

    def stream_done(self, stream: _Stream) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
        if not self.streams:
            self._idle_since = self.loop.time()
            if self.going_away:
                self._flush()
                self._close(None)

    def _calm(self) -> None:
        """A budget ran out: GOAWAY(ENHANCE_YOUR_CALM), the streams in flight cut."""
        self.ctx.stats.h2_goaway["ENHANCE_YOUR_CALM"] += 1
        self._close(ErrorCode.ENHANCE_YOUR_CALM)

    def _close(self, code: int | None, *, already_queued: bool = False) -> None:
        if self.closed:
            return
        transport = self.transport
        if transport is not None:
            if not already_queued:
                self.h2.goaway(code or ErrorCode.NO_ERROR)
            data = self.h2.output()
            if data:
                transport.write(data)
            transport.close()
        self.closed = True
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream.client_reset()

    def flush_soon(self) -> None:
        """Write what the engine has queued once this turn of the loop is done, so the head,
        body and end of a response (reported by the upstream one by one) leave in one write."""
        if not self._flush_pending:
            self._flush_pending = True
            self.loop.call_soon(self._flush)

    def reset_after_flush(self, stream_id: int) -> None:
        self._late_resets.append(stream_id)
        self.flush_soon()

    def _flush(self) -> None:
        self._flush_pending = False
        transport = self.transport
        if transport is None or self.closed:
            return
        data = self.h2.output()
        if self._late_resets:
            if data:
                transport.write(data)
            for stream_id in self._late_resets:
                self.h2.reset(stream_id, ErrorCode.NO_ERROR)
            self._late_resets.clear()
            data = self.h2.output()
        if data:
            transport.write(data)
            if transport.get_write_buffer_size() > _WRITE_BUFFER_LIMIT:
                # A client that does not read (what it asked for, or our PING and SETTINGS
                # acknowledgements): nothing more is queued for it.
                self.ctx.stats.h2_goaway["write-buffer"] += 1
                transport.abort()

    def _tick(self) -> None:
        """Once a second while open: idle connections close; streams whose client window stays
        shut past the body timeout are reset (a window that is never opened)."""
        self._timer = None
        if self.closed:
            return
        now = self.loop.time()
        timeouts = self.ctx.settings.timeouts
        if not self.streams and now - self._idle_since > timeouts.keepalive_idle:
            self._close(None)
            return
        for stream in list(self.streams.values()):
            if stream.stalled_since and now - stream.stalled_since > timeouts.body_idle:
                stream.fail_stalled()
            elif stream.deadline and now >= stream.deadline:
                stream.deadline_passed()
            elif (
                stream.h2up is not None
                and stream.client_ended
                and not stream.headers_sent
                and now - stream.started_at_loop > timeouts.upstream_response
            ):
                # A whole request and no response head within --upstream-timeout. (A stream
                # whose client is still sending, a gRPC bidi call, may wait as long as it likes.)
                stream.h2up.cancel(stream.up_id)
                stream.h2up = None
                stream._failed(Answer.UPSTREAM_TIMEOUT)
        self._flush()
        self._timer = self.loop.call_later(1.0, self._tick)


class _Stream(H2StreamOwner):
    """One stream: its plan, its upstream leg (HTTP/1.1 or h2c), and its response's progress.

    It implements both upstream contracts: ``H2StreamOwner`` for an h2c upstream and, through
    a ``ForwardedOwner`` (``self.reports``), ``router.upstream.ExchangeOwner`` for HTTP/1.1."""

    def __init__(self, conn: Http2Connection, stream_id: int) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.plan = Plan()
        self.reports = ForwardedOwner(self)
        self.grpc = False
        self.te_trailers = False
        self.target: Target | None = None
        self.h1: UpstreamConnection | None = None
        self.h2up: H2Upstream | None = None
        self.up_id = 0
        self.waiting = False
        """Waiting for an upstream connection (either pool)."""
        self.held: list[bytes] = []
        """Request body bytes that arrived before the upstream leg."""
        self.held_acks = 0
        self.client_ended = False
        self.client_trailers: Headers | None = None
        self.upstream_saturated = False
        self.unacked = 0
        """Request bytes taken from the client but not yet acknowledged (the upstream is full)."""
        self.out: list[bytes] = []
        self.out_size = 0
        self.out_end = False
        self.out_trailers: Headers | None = None
        self._trailers: Headers | None = None
        self.up_acks = 0
        """h2c upstream bytes passed on but not yet acknowledged to it (this client is slow)."""
        self.upstream_paused = False
        self.headers_sent = False
        self.status = 0
        self.sent = 0
        self.answer: Answer | None = None
        self.finished = False
        self.started_at = perf_counter()
        self.started_at_loop = conn.loop.time()
        self.stalled_since = 0.0
        self.deadline = 0.0

    # -- from the client ------------------------------------------------------------------------

    def begin(self, ctx: ProxyContext, headers: Headers, ended: bool) -> None:
        method = path = authority = b""
        regular: Headers = []
        content_length = False
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
                continue
            if name == b"host":
                if not authority:
                    authority = value
                continue  # :authority wins (RFC 9113 8.3.1); one Host goes upstream below
            if name == b"content-type" and value[:16] == b"application/grpc":
                self.grpc = True
            elif name == b"te":
                self.te_trailers = value.strip().lower() == b"trailers"
            elif name == b"content-length":
                if not value.isdigit():
                    self.refuse(Answer.MALFORMED, "invalid content-length")
                    return
                content_length = True
            elif name == b"grpc-timeout":
                seconds = grpc_timeout(value)
                if seconds is not None:
                    self.deadline = self.conn.loop.time() + seconds
            regular.append((name, value))
        limits = ctx.settings.limits
        if len(regular) >= limits.max_headers:  # the same limits as an HTTP/1.1 head's
            self.refuse(Answer.HEADERS_TOO_LARGE)
            return
        if len(path) > limits.max_request_line:
            self.refuse(Answer.TARGET_TOO_LONG)
            return
        if authority:
            regular.insert(0, (b"host", authority))
        if not ended and not content_length:
            # A body of unknown length: chunked to an HTTP/1.1 upstream (h2c ignores it).
            regular.append((b"transfer-encoding", b"chunked"))
        self.client_ended = ended
        plan = self.plan
        decide(ctx.policy, self.conn.cache, ctx.slot, method, path, "1.1", True, False, regular, plan)
        decision = plan.decision
        if decision is not None:
            ctx.stats.requests[decision.stats_key] += 1
        if plan.refusal is not None:
            scope = ctx.slot.scope
            if scope is not None and (plan.refusal is Answer.NO_ROUTE or plan.refusal is Answer.NO_ROUTE_SIDECAR):
                # A stream is not held (its flow-control state would have to wait with it): the
                # name is learned, and the app's retry, or its next call, finds the routes.
                scope.note(scope_name(plan.authority))
            self.refuse(plan.refusal, plan.detail)
            return
        assert decision is not None and decision.target is not None
        target = self.target = decision.target
        if target.protocol == "h2c":
            self.waiting = True
            ctx.h2pool.open(target, self, request_fields(plan, self.te_trailers), ended)
        elif self.grpc:
            self.refuse(Answer.GRPC_NEEDS_H2C)
        else:
            self.waiting = True
            try:
                conn = ctx.pool.acquire(target, self.reports)
            except PoolFull:
                self.waiting = False
                self.refuse(Answer.POOL_FULL)
                return
            if conn is not None:
                self.waiting = False
                self._attach_h1(conn)

    def client_data(self, data: bytes, flow_length: int) -> None:
        if self.finished:
            self.conn.ack(self.stream_id, flow_length)
            return
        h1, h2up = self.h1, self.h2up
        if h1 is not None:
            if data:
                h1.write(b"%x\r\n" % len(data) + data + b"\r\n" if self.plan.chunked else data)
        elif h2up is not None:
            if not h2up.send(self.up_id, data, False):
                self.upstream_saturated = True
        else:
            self.held.append(data)
            self.held_acks += flow_length
            return
        if self.upstream_saturated:
            self.unacked += flow_length
        else:
            self.conn.h2.consume(self.stream_id, flow_length)

    def client_end(self, trailers: Headers | None) -> None:
        self.client_ended = True
        self.client_trailers = trailers
        if self.finished:
            return
        if self.h1 is not None:
            if self.plan.chunked:
                self.h1.write(b"0\r\n\r\n")
            self.h1.request_sent()
        elif self.h2up is not None:
            if trailers:
                self.h2up.send_trailers(self.up_id, trailers)
            else:
                self.h2up.send(self.up_id, b"", True)

    def client_reset(self) -> None:
        """The client reset the stream or went away: cancel the upstream side."""
        if self.finished:
            return
        self.finished = True
        self._cancel_upstream()
        self._record(self.status or 499)

    def _cancel_upstream(self) -> None:
        """Whatever the upstream side is doing for this stream stops: an HTTP/1.1 exchange is
        cut (its framing is unknown), an h2c stream is reset (CANCEL), a wait leaves its queue."""
        if self.h1 is not None:
            self.h1.detach()
            self.h1 = None
        elif self.h2up is not None:
            self.h2up.cancel(self.up_id)
            self.h2up = None
        elif self.waiting and self.target is not None:
            self.waiting = False
            if self.target.protocol == "h2c":
                self.conn.ctx.h2pool.withdraw(self.target, self)
            else:
                self.conn.ctx.pool.withdraw(self.target, self.reports)

    # -- the response ---------------------------------------------------------------------------

    def refuse(self, answer: Answer, detail: str | None = None) -> None:
        """The router answers the stream itself."""
        ctx = self.conn.ctx
        if not answer.upstream:
            ctx.stats.rejected[answer] += 1
        self.answer = answer
        plan = self.plan
        decision = plan.decision
        if self.grpc:
            message = detail or answer.reason
            headers: Headers = [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"%d" % answer.grpc_status),
                (b"grpc-message", _percent_encode(f"devstack: {message}")),
            ]
            body = b""
        else:
            status = answer.status
            body = render_body(
                answer,
                detail=detail,
                service=decision.service if decision is not None else None,
                key=plan.key,
                target=decision.target.url if decision is not None and decision.target is not None else None,
            )
            headers = [
                (b":status", b"%d" % status),
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
            ]
            for line in plan.extra_head.split(b"\r\n"):
                name, sep, value = line.partition(b": ")
                if sep:
                    headers.append((name.lower(), value))
        if decision is not None and plan.debug:
            headers.append((b"x-devstack-route", plan.route_header()))
        self.status = answer.status if not self.grpc else 200
        head_only = not body or plan.method == b"HEAD"
        self._send_headers(headers, end=head_only)
        if head_only:
            self._done()
        else:
            self.out.append(body)
            self.out_size += len(body)
            self._queue_end(None)
        self.conn.flush_soon()

    def _send_headers(self, headers: Headers, end: bool) -> None:
        if self.conn.closed:
            return
        self.conn.h2.respond(self.stream_id, headers, end)
        self.headers_sent = True

    def _response_headers(self, status: int, fields: Headers, *, end: bool = False) -> None:
        headers: Headers = [(b":status", b"%d" % status)]
        for name, value in fields:
            if name[:1] == b":" or name in _HOP_BY_HOP:
                continue
            headers.append((name, value))
        plan = self.plan
        if plan.debug and plan.decision is not None:
            headers.append((b"x-devstack-route", plan.route_header()))
        self.status = status
        self._send_headers(headers, end=end)
        self.conn.flush_soon()

    def _queue(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)
        self.pump()
        self.conn.flush_soon()

    def _queue_end(self, trailers: Headers | None) -> None:
        self.out_end = True
        self.out_trailers = trailers
        self.pump()
        self.conn.flush_soon()

    def pump(self) -> None:
        """Send what the client's windows allow; hold the upstream while too much waits."""
        conn = self.conn
        if self.finished or conn.closed or not self.headers_sent:
            return
        engine = conn.h2
        sid = self.stream_id
        out = self.out
        while out and not conn.write_paused:
            window = engine.send_window(sid)
            if window <= 0:
                if not self.stalled_since:
                    self.stalled_since = conn.loop.time()
                break
            self.stalled_since = 0.0
            chunk = out[0]
            if len(chunk) <= window:
                out.pop(0)
                engine.send_data(sid, chunk)
                self.out_size -= len(chunk)
                self.sent += len(chunk)
            else:
                out[0] = chunk[window:]
                engine.send_data(sid, chunk[:window])
                self.out_size -= window
                self.sent += window
        if not out:
            self.stalled_since = 0.0
            if self.out_end:
                if self.out_trailers:
                    engine.send_trailers(sid, self.out_trailers)
                else:
                    engine.end_stream(sid)
                self._done()
                return
        if self.out_size > _OUT_HIGH:
            if not self.upstream_paused:
                self.upstream_paused = True
                if self.h1 is not None:
                    self.h1.pause_reading()
        elif self.upstream_paused:
            self.upstream_paused = False
            if self.h1 is not None:
                self.h1.resume_reading()
            if self.up_acks and self.h2up is not None:
                acks, self.up_acks = self.up_acks, 0
                self.h2up.ack(self.up_id, acks)

    def _done(self) -> None:
        if self.finished:
            return
        self.finished = True
        if not self.client_ended and not self.conn.closed:
            # The response is whole and the request is not: the client may stop sending it
            # (RFC 9113 8.1). After the response's frames are out: an engine may drop frames
            # still queued for a stream it resets (nghttp2 does).
            self.conn.reset_after_flush(self.stream_id)
        if self.unacked:
            self.conn.h2.consume(self.stream_id, self.unacked)
            self.unacked = 0
        self._record(self.status)
        self.conn.stream_done(self)

    def _record(self, status: int) -> None:
        ctx = self.conn.ctx
        plan = self.plan
        ended = perf_counter()
        decision = plan.decision
        ctx.stats.observe_duration(decision.stats_key if decision is not None else UNROUTED, ended - self.started_at)
        if plan.span is not None and ctx.tracer is not None:
            ctx.tracer.finish(plan.span, status)
        if ctx.access_log is not None:
            ctx.access_log.record(plan, self.started_at, ended, status, self.sent, self.answer, self.conn.cache.peer)

    def _failed(self, failure: Answer) -> None:
        """The upstream failed: answer if nothing was sent yet, else reset the stream."""
        if self.finished:
            return
        ctx = self.conn.ctx
        ctx.stats.upstream_errors[failure.reason] += 1
        target = self.target
        decision = self.plan.decision
        if target is not None and decision is not None:
            ctx.failures.report(target.url, failure, decision.service)
        if not self.headers_sent:
            self.refuse(failure)
            return
        self.conn._reset(self.stream_id, ErrorCode.INTERNAL_ERROR)
        self.conn.flush_soon()
        self.status = self.status or 502
        self._done()

    def fail_stalled(self) -> None:
        """The client has kept this stream's window shut past the body timeout."""
        self.conn._reset(self.stream_id, ErrorCode.FLOW_CONTROL_ERROR)
        self.conn.stream_done(self)
        self.client_reset()

    def deadline_passed(self) -> None:
        """grpc-timeout ran out: DEADLINE_EXCEEDED, and the upstream call is cancelled."""
        if self.finished:
            return
        self.deadline = 0.0
        self._cancel_upstream()
        if not self.headers_sent:
            self.refuse(Answer.DEADLINE)
            return
        if self.grpc:
            self.out = []
            self.out_size = 0
            self._queue_end([(b"grpc-status", b"4"), (b"grpc-message", b"devstack: deadline exceeded")])
        else:
            self.conn._reset(self.stream_id, ErrorCode.CANCEL)
            self._done()

    # -- an HTTP/1.1 upstream (router.upstream.ExchangeOwner) ------------------------------------

    def _attach_h1(self, conn: UpstreamConnection) -> None:
        self.h1 = conn
        plan = self.plan
        conn.start(self.reports, plan.head, plan.method == b"HEAD", body_pending=not self.client_ended)
        held, self.held = self.held, []
        for data in held:
            if data:
                conn.write(b"%x\r\n" % len(data) + data + b"\r\n" if plan.chunked else data)
        if self.held_acks:
            self.conn.ack(self.stream_id, self.held_acks)
            self.held_acks = 0
        if self.client_ended:
            if plan.chunked:
                conn.write(b"0\r\n\r\n")
            if held or plan.chunked:
                conn.request_sent()

    def upstream_ready(self, conn: UpstreamConnection | None, failure: Answer | None) -> None:
        self.waiting = False
        if self.finished:
            if conn is not None:
                self.conn.ctx.pool.release(conn)
            return
        if conn is None:
            assert failure is not None
            self._failed(failure)
            return
        self._attach_h1(conn)

    def upstream_interim(self, status: int, head: bytes) -> None:
        return  # 1xx (100-continue, 103) stays with this hop: HTTP/2 clients do not wait for it

    def upstream_head(self, status: int, head: bytes, passthrough: bytes | None, framing: Framing) -> None:
        if status == 101:
            raise UnexpectedUpgrade
        fields: Headers = []
        connection_named: set[bytes] = set()
        for line in head.split(b"\r\n")[1:]:
            if not line:
                continue
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            value = value.strip(b" \t")
            if name == b"connection":
                connection_named.update(token.strip().lower() for token in value.split(b","))
            fields.append((name, value))
        if connection_named:
            fields = [(name, value) for name, value in fields if name not in connection_named]
        self._response_headers(status, fields)

    def upstream_body(self, data: bytes) -> None:
        self._queue(data)

    def upstream_complete(self, reusable: bool) -> None:
        conn, self.h1 = self.h1, None
        if conn is not None:
            if self.upstream_paused:
                conn.resume_reading()
            if reusable and self.client_ended:
                self.conn.ctx.pool.release(conn)
            else:
                conn.close()
        self._queue_end(None)

    def upstream_failed(self, failure: Answer, response_started: bool) -> None:
        self.h1 = None
        if failure is Answer.UPSTREAM_TIMEOUT and not self.client_ended and not self.upstream_saturated:
            # The upstream connection's timer ran body_idle while it waited for the request
            # body, and the upstream was taking it: the client stalled, not the upstream.
            failure = Answer.BODY_TIMEOUT
        if failure.upstream:
            self._failed(failure)
        elif not self.headers_sent:
            self.refuse(failure)
        else:
            self.conn._reset(self.stream_id, ErrorCode.INTERNAL_ERROR)
            self._done()

    def upstream_upgraded(self, rest: bytes) -> None:
        return

    def upstream_tunnel_data(self, data: bytes) -> None:
        return

    def upstream_tunnel_eof(self) -> None:
        return

    def upstream_pause(self) -> None:
        self.upstream_saturated = True

    def upstream_resume(self) -> None:
        self.upstream_saturated = False
        if self.unacked:
            unacked, self.unacked = self.unacked, 0
            self.conn.ack(self.stream_id, unacked)

    # -- an h2c upstream (router.h2upstream.H2StreamOwner) ---------------------------------------

    def h2_ready(self, conn: H2Upstream | None, stream_id: int, failure: Answer | None) -> None:
        self.waiting = False
        if conn is None:
            assert failure is not None
            self._failed(failure)
            return
        if self.finished:
            conn.cancel(stream_id)
            return
        self.h2up = conn
        self.up_id = stream_id
        held, self.held = self.held, []
        for data in held:
            if not conn.send(stream_id, data, False):
                self.upstream_saturated = True
        if self.client_ended and (held or self.client_trailers):
            if self.client_trailers:
                conn.send_trailers(stream_id, self.client_trailers)
            else:
                conn.send(stream_id, b"", True)
        if self.held_acks:
            if self.upstream_saturated:
                self.unacked += self.held_acks
            else:
                self.conn.ack(self.stream_id, self.held_acks)
            self.held_acks = 0

    def h2_response(self, headers: Headers, ended: bool) -> None:
        status = 0
        fields: Headers = []
        for name, value in headers:
            if name == b":status":
                status = int(value)
            elif name[:1] != b":":
                fields.append((name, value))
        if status < 200 and not ended:
            return  # an informational head: the final one follows
        if ended:
            self.h2up = None
            self._response_headers(status, fields, end=True)
            self._done()
            return
        self._response_headers(status, fields)

    def h2_data(self, data: bytes, flow_length: int) -> None:
        self._queue(data)
        up = self.h2up
        if up is None:
            return
        if self.upstream_paused:
            self.up_acks += flow_length
        else:
            up.ack(self.up_id, flow_length)

    def h2_trailers(self, headers: Headers) -> None:
        self._trailers = [(name, value) for name, value in headers if name[:1] != b":"]

    def h2_end(self) -> None:
        self.h2up = None
        if not self.headers_sent:
            self._failed(Answer.BAD_RESPONSE)
            return
        self._queue_end(self._trailers)

    def h2_reset(self, code: int) -> None:
        self.h2up = None
        if self.finished:
            return
        if not self.headers_sent and code == ErrorCode.REFUSED_STREAM:
            self._failed(Answer.UPSTREAM_RESET)
            return
        # The upstream cancelled the call: so does the client's stream, with the same code.
        self.conn._reset(self.stream_id, code)
        self.conn.flush_soon()
        self.status = self.status or 502
        self._done()

    def h2_failed(self, failure: Answer) -> None:
        self.h2up = None
        self._failed(failure)

    def h2_drained(self) -> None:
        self.upstream_resume()

    def h2_moved(self, conn: H2Upstream, stream_id: int) -> None:
        if self.finished:
            conn.cancel(stream_id)
            return
        self.h2up = conn
        self.up_id = stream_id

"""Client side of the hot path: one HTTP/1.1 connection from a client, from accept to close.

A ``ClientConnection`` parses requests strictly (llhttp via httptools, plus size limits while
reading), hands each head to the request policy (``router.request.decide``), and runs the
exchanges one at a time in order: the router's own answer (``router.errors``), or a pooled
``UpstreamConnection`` that reports back through the ``ExchangeOwner`` contract. Its pieces
each have one job: ``ResponseRelay`` writes the response, ``FlowControl`` keeps why reading is
paused, ``Tunnel`` carries an upgraded connection's bytes; the connection's own state is one of
six named below. It never awaits anything on the request path (connection setup is the only
task, owned by the pool), never logs per request, and never forwards a request it had to guess
about: every ambiguity is answered with a 4xx and the connection closes, after a bounded
lingering read when the client was still sending a body."""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Final, cast

import httptools

from router.accesslog import AccessLog
from router.errors import Answer, render
from router.failures import FailureLog
from router.flow import BUFFER, DONE, PIPELINE, UPGRADE, UPSTREAM, FlowControl
from router.h1bridge import H1Bridge, make_bridge
from router.h2upstream import H2Pool
from router.http2 import PRI_HEAD, Http2Connection
from router.keys import KeySource
from router.relay import ResponseRelay
from router.request import HeadCache, Plan, Policy, TableSlot, decide
from router.scope import scope_name
from router.settings import RouterSettings
from router.stats import UNROUTED, RouterStats
from router.tunnel import Tunnel
from router.upstream import ExchangeOwner, Framing, PoolFull, UpstreamConnection, UpstreamPool

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is switched on
    from router.tracing import RequestTracer

__all__ = ["ClientConnection", "ProxyContext", "TableSlot"]

_CRLF: Final = b"\r\n"
_CHUNK_END: Final = b"0\r\n\r\n"

_BUFFER_LIMIT: Final = 256 * 1024
"""Request body bytes held while an upstream connection is being set up, before we stop reading."""

_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class ProxyContext:
    """What every client connection of one listener shares."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        settings: RouterSettings,
        slot: TableSlot,
        stats: RouterStats | None = None,
        key_sources: Sequence[KeySource] | None = None,
        tracer: RequestTracer | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.slot = slot
        self.stats = stats or RouterStats()
        self.pool = UpstreamPool(loop, settings.timeouts, settings.limits, self.stats)
        self.h2pool = H2Pool(loop, settings.timeouts)
        self.h2pool.engine = settings.http2_engine
        """Multiplexed h2c connections to the upstreams of services with ``protocol: h2c``."""
        self.policy = Policy(settings, key_sources, tracer)
        self.connections: set[ClientConnection | Http2Connection] = set()
        self.draining = False
        self.tracer = tracer
        """Off (None) by default: then tracing costs one attribute check per request."""
        self.access_log = access_log
        """Off (None) unless configured: then it costs one attribute check per request."""
        self.failures = FailureLog()
        self.tls = settings.tls_cert is not None
        """The listener speaks TLS: ALPN may have chosen HTTP/2 at the handshake."""

    def protocol_factory(self) -> asyncio.Protocol:
        # An asyncio protocol by its methods, which uvloop and asyncio call by name; its one base
        # class is the upstream contract (a compiled class has one).
        return cast(asyncio.Protocol, ClientConnection(self))

    async def drain(self, deadline: float) -> None:
        """Stop keep-alive, close idle connections, wait (bounded) for in-flight exchanges."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_if_idle()
        end = self.loop.time() + deadline
        while self.connections and self.loop.time() < end:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.abort()
        self.pool.close()
        self.h2pool.close()


class _Stop(Exception):
    """Raised from a parser callback to stop parsing input of a connection that is closing."""


class _Reject(Exception):
    """Raised from a parser callback when a limit refuses the request being parsed."""

    def __init__(self, answer: Answer) -> None:
        super().__init__(answer.reason)
        self.answer = answer


class _Request(Plan):
    """One request: the policy's plan for it, and its body's progress through the connection."""

    def __init__(self) -> None:
        super().__init__()
        self.body: list[bytes] = []
        """Body bytes held until an upstream connection is attached."""
        self.body_buffered = 0
        self.body_bytes = 0
        self.complete = False
        self.started_at = 0.0
        self.retried = False
        self.redecide: tuple[bytes, str, bool, bool, list[tuple[bytes, bytes]]] | None = None
        """A learning sidecar's request without a route: what ``decide`` read, to decide it again
        once the feed has answered for its authority (``_hold``)."""


class _Hold:
    """The active request, held until the feed answers for its authority or ``RouteScope.wait`` ends."""

    __slots__ = ("name", "req", "resume", "timer")

    def __init__(self, req: _Request, name: str, resume: Callable[[], None], timer: asyncio.TimerHandle) -> None:
        self.req = req
        self.name = name
        self.resume = resume
        """The one callable handed to the scope and the timer (``forget`` finds it by identity)."""
        self.timer = timer


# The connection's states. Exactly one holds at a time; the transitions are the methods named.
_READING: Final = 0
"""Parsing requests and running their exchanges one at a time, in order (pipelined ones queue)."""
_UPGRADING: Final = 1
"""An Upgrade head was parsed; llhttp reads no further, so the client's next bytes are held in
the ``Tunnel`` until the upstream answers (``upstream_upgraded``) or the exchange ends (close)."""
_TUNNEL: Final = 2
"""After the 101: bytes pass both ways unparsed until both sides have ended (``_end_tunnel``)."""
_LINGERING: Final = 3
"""Answered before the request body ended: our FIN is sent and the rest of the body is read and
discarded, for a bounded time and size, before closing (``_linger``)."""
_CLOSING: Final = 4
"""Nothing more is read or answered: the transport is closing (``_close``)."""
_CLOSED: Final = 5
"""The transport is gone (``connection_lost``), or was refused at ``connection_made``."""


class ClientConnection(ExchangeOwner):
    """One client connection: HTTP/1.1 parsing and pipelining, and the exchange lifecycle.

    It parses each request head with llhttp, asks the request policy (``router.request.decide``)
    what to do with it, and runs the exchanges one at a time: the router's own answer, or an
    upstream connection from the pool, which reports back through the ``ExchangeOwner`` methods.
    What the client receives is written by the ``ResponseRelay``; why reading is paused is
    kept by ``FlowControl``; an upgraded connection's bytes go through a ``Tunnel``. It is an
    asyncio protocol by its methods (uvloop and asyncio call them by name).
    """

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport | None = None
        self._state = _READING
        self._parser = httptools.HttpRequestParser(self)
        self._feed = self._parser.feed_data
        """Bound once: compiled, calling it skips a method lookup per read."""
        self._cache = HeadCache()
        """What the request policy remembers between this connection's requests."""
        self._flow = FlowControl()
        self._relay = ResponseRelay()
        self._tunnel: Tunnel | None = None
        """Made when an Upgrade head is parsed (state _UPGRADING, then _TUNNEL)."""
        # The head being parsed (llhttp hands it over in pieces).
        self._url: list[bytes] = []
        self._url_len = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._connection_field = False
        self._head_bytes = 0
        self._reading_head = True
        self._pending_reject: _Reject | None = None
        self._plain_after_upgrade = False
        """llhttp stopped at an Upgrade the router does not tunnel: parsing goes on afresh."""
        self._fresh = True
        """No request head has been decided on this connection yet (or a CONNECT has just been
        accepted): an HTTP/2 preface here makes it an HTTP/2 connection."""
        # The exchanges: the request being parsed, the one running, the ones waiting their turn.
        self._parsing: _Request | None = None
        self._active: _Request | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._upstream: UpstreamConnection | None = None
        self._bridge: H1Bridge | None = None
        """The active exchange's h2c stream, when its service speaks h2c (instead of _upstream)."""
        self._awaiting_body = False
        """A small body is being read whole before an upstream connection is taken."""
        self._linger_left = 0
        self._linger_end = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        """When ``_timer`` fires: kept here because TimerHandle.when() is a method call."""
        self._deadline = 0.0
        self._hold: _Hold | None = None

    # -- asyncio protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        ctx = self.ctx
        if len(ctx.connections) >= ctx.settings.limits.max_client_connections or ctx.draining:
            ctx.stats.refused_connections += 1
            self._state = _CLOSED
            self._flow.closed = True
            transport.abort()
            return
        ctx.connections.add(self)
        ctx.stats.open_connections += 1
        self._flow.transport = transport
        self._relay.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._cache.peer = str(peer[0]).encode()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx.tls:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                self._to_http2(b"")  # the handshake chose HTTP/2: the preface comes next
                return
        self._arm(ctx.settings.timeouts.header_read)

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state != _READING:
            if state == _TUNNEL:
                tunnel = self._tunnel
                assert tunnel is not None
                tunnel.to_upstream(data)
                self._arm(self.ctx.settings.timeouts.tunnel_idle)
            elif state == _LINGERING:
                self._discard(data)
            elif state == _UPGRADING:
                tunnel = self._tunnel
                assert tunnel is not None
                tunnel.hold(data)
            return
        if self._flow.paused & DONE:
            return
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if self._plain_after_upgrade:
                # An Upgrade we do not tunnel was forwarded as a plain request, or a CONNECT was
                # accepted; llhttp has stopped at it for good, so a fresh parser reads whatever
                # follows (after a CONNECT, an HTTP/2 preface or HTTP/1.1 requests).
                self._plain_after_upgrade = False
                self._parser = httptools.HttpRequestParser(self)
                self._feed = self._parser.feed_data
                if rest:
                    self.data_received(rest)
                return
            if self._state == _READING and self.transport is not None:
                self._state = _UPGRADING
                tunnel = self._tunnel = Tunnel(self.transport, self._flow)
                tunnel.hold(rest)
        except (httptools.HttpParserError, _Reject) as exc:
            if self._state == _LINGERING:
                return  # the exchange was answered mid-feed; what follows is discarded unread
            if self._fresh and not isinstance(exc, _Reject) and self._parser.get_method() == b"PRI":
                # llhttp stops after the preface's first 18 bytes, "PRI * HTTP/2.0\r\n\r\n";
                # what it read of them before this read is counted in _head_bytes.
                offset = len(PRI_HEAD) - self._head_bytes
                if 0 <= offset <= len(data) and (data[:offset] == PRI_HEAD[-offset:] if offset else True):
                    self._to_http2(PRI_HEAD + data[offset:])
                    return
            # httptools wraps exceptions raised in some callbacks; ours are parked on self.
            pending, self._pending_reject = self._pending_reject, None
            if isinstance(exc, _Reject):
                pending = exc
            if pending is not None:
                self._reject(pending.answer, parsed_so_far=True)
            else:
                self._reject(Answer.MALFORMED, str(exc))
        except _Stop:
            return
        else:
            if self._reading_head and self._parsing is not None:
                self._head_bytes += len(data)
                limits = self.ctx.settings.limits
                if self._head_bytes > limits.max_header_bytes + limits.max_request_line + _BUFFER_LIMIT:
                    self._reject(Answer.HEADERS_TOO_LARGE)

    def eof_received(self) -> bool | None:
        state = self._state
        tunnel = self._tunnel
        if tunnel is not None:
            if state == _TUNNEL:
                # Pass the half-close on; the tunnel ends when the upstream has sent its own.
                if tunnel.client_half_closed():
                    self._end_tunnel()
                return True
            tunnel.client_eof = True  # passed on if the 101 comes
        if state >= _LINGERING:
            return None
        # A client that half-closes after a complete request may still want its response: keep
        # the socket until that exchange ends. A half-close mid-request ends the exchange.
        req = self._active
        if req is None or not req.complete or self._parsing is not None:
            return None
        decision = req.decision
        if (
            self._upstream is None
            and decision is not None
            and decision.target is not None
            and self.ctx.pool.withdraw(decision.target, self)
        ):
            # Still queued for a pooled connection: nobody has seen the request yet, so a client
            # that leaves gives up its place now rather than when a connection frees up.
            return None
        self._flow.pause(DONE)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _CLOSED and self not in self.ctx.connections:
            return
        self._state = _CLOSED
        self._flow.closed = True
        self._relay.transport = None
        self.ctx.connections.discard(self)
        self.ctx.stats.open_connections -= 1
        self._cancel_timer()
        if self._hold is not None:
            self._release_hold()
        tunnel = self._tunnel
        if tunnel is not None and tunnel.open:
            tunnel.open = False
            self.ctx.stats.tunnels_open -= 1
        upstream, self._upstream = self._upstream, None
        bridge, self._bridge = self._bridge, None
        if upstream is not None:
            # Mid-exchange: the upstream's framing state is unknown, so it is not reused. A
            # tunnel's upstream goes at once too: a client reset ends both.
            upstream.detach()
        elif bridge is not None:
            bridge.cancel()
        else:
            req = self._active
            decision = req.decision if req is not None else None
            if decision is not None and decision.target is not None:
                self.ctx.pool.withdraw(decision.target, self)
        self._queue.clear()
        req, self._active = self._active, None
        access_log = self.ctx.access_log
        if req is not None and access_log is not None:
            # An exchange the connection's end cut short, or a tunnel's whole life: logged with
            # the status the client got (101 for a tunnel), or nginx's 499 if it got none.
            relay = self._relay
            status = relay.status or 499
            access_log.record(req, req.started_at, perf_counter(), status, relay.sent, relay.answer, self._cache.peer)

    def pause_writing(self) -> None:
        self._flow.write_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()
        elif self._bridge is not None:
            self._bridge.pause()

    def resume_writing(self) -> None:
        self._flow.write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()
        elif self._bridge is not None:
            self._bridge.resume()

    # -- httptools callbacks --------------------------------------------------------------------

    def _park(self, reject: _Reject) -> _Reject:
        self._pending_reject = reject
        return reject

    def on_message_begin(self) -> None:
        if self._state != _READING:
            raise _Stop
        self._parsing = _Request()
        self._url = []
        self._url_len = 0
        self._headers = []
        self._header_bytes = 0
        self._connection_field = False
        self._head_bytes = 0
        self._reading_head = True
        if self._active is None:
            self._arm(self.ctx.settings.timeouts.header_read)

    def on_url(self, url: bytes) -> None:
        self._url_len += len(url)
        if self._url_len > self.ctx.settings.limits.max_request_line:
            raise self._park(_Reject(Answer.TARGET_TOO_LONG))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._reading_head:
            return  # chunked trailer fields: dropped, never merged into the forwarded head
        self._header_bytes += len(name) + len(value) + 4
        limits = self.ctx.settings.limits
        if self._header_bytes > limits.max_header_bytes or len(self._headers) >= limits.max_headers:
            raise self._park(_Reject(Answer.HEADERS_TOO_LARGE))
        self._headers.append((name, value))
        if len(name) == 10 and name.lower() == b"connection":
            self._connection_field = True

    def on_headers_complete(self) -> None:
        self._reading_head = False
        req = self._parsing
        assert req is not None
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        connection_field = self._connection_field
        # llhttp keeps only HTTP/1.1 alive by default (it refuses 1.x for x > 1), so with no
        # Connection field keep-alive means 1.1: get_http_version, which formats a string on
        # every call, is left for the other cases. llhttp upgrades only with a Connection field
        # naming "upgrade" (or CONNECT, which the policy refuses).
        version = "1.1" if keep_alive and not connection_field else parser.get_http_version()
        parser_upgrade = connection_field and parser.should_upgrade()
        url = self._url
        target = url[0] if len(url) == 1 else b"".join(url)
        ctx = self.ctx
        decide(ctx.policy, self._cache, ctx.slot, parser.get_method(), target, version, keep_alive, parser_upgrade,
               self._headers, req)  # fmt: skip
        if req.refusal is not None and ctx.slot.scope is not None:
            self._may_hold(req, target, version, keep_alive, parser_upgrade)
        self._fresh = False
        if ctx.draining:
            req.keep_alive = False
        if req.connect and (self._active is not None or self._queue):
            req.refusal = Answer.CONNECT  # pipelined behind other requests: what follows is not ours to read yet
            req.connect = False
            req.keep_alive = False
        if (parser_upgrade or req.connect) and not req.upgrade and req.refusal is None:
            # llhttp stops at any Upgrade head for good; this one goes on as a plain request.
            self._plain_after_upgrade = True
        if self._active is None and not self._queue:
            self._start(req)
        else:
            self._queue.append(req)
            self._flow.pause(PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is None:
            return
        req.body_bytes += len(body)
        max_body = self.ctx.settings.limits.max_body_bytes
        if max_body and req.body_bytes > max_body:
            raise self._park(_Reject(Answer.BODY_TOO_LARGE))
        if req.refusal is not None:
            return
        upstream = self._upstream
        if req is self._active and upstream is not None:
            if req.chunked:
                upstream.write(b"%x\r\n" % len(body) + body + _CRLF)
            else:
                upstream.write(body)
            return
        bridge = self._bridge
        if req is self._active and bridge is not None:
            bridge.body(body)
            return
        req.body.append(body)
        req.body_buffered += len(body)
        if req.body_buffered > _BUFFER_LIMIT:
            self._flow.pause(BUFFER)

    def on_message_complete(self) -> None:
        req = self._parsing
        self._parsing = None
        self._reading_head = True
        if req is None:
            return
        req.complete = True
        if self._awaiting_body and req is self._active:
            self._awaiting_body = False
            self._cancel_timer()
            if not req.keep_alive:
                self._flow.pause(DONE)
            self._acquire(req, fresh=False)
            return
        upstream = self._upstream
        if req is self._active and upstream is not None and req.refusal is None and req.has_body:
            # (Without a body, start() already applied the response timeout.)
            if req.chunked:
                upstream.write(_CHUNK_END)
            upstream.request_sent()
        bridge = self._bridge
        if req is self._active and bridge is not None and req.refusal is None:
            bridge.end()
        if not req.keep_alive:
            # Nothing after a request that closes the connection is read, let alone forwarded.
            self._flow.pause(DONE)

    # -- exchange lifecycle -------------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        if self._state >= _LINGERING:
            return
        self._active = req
        self._cancel_timer()
        req.started_at = perf_counter()
        self._go(req)

    def _go(self, req: _Request) -> None:
        """Run the active exchange as decided: the router's answer, a tunnel, or an upstream."""
        refusal = req.refusal
        if refusal is not None and req.redecide is not None and self._held(req):
            return
        self._relay.begin(req.keep_alive)
        decision = req.decision
        if decision is not None:
            self.ctx.stats.requests[decision.stats_key] += 1
        if refusal is not None:
            self._answer(refusal, req.detail)
            return
        if req.connect:
            self._connected(req)
            return
        if req.small_body and not req.complete:
            # A small body is read whole first (on_message_complete acquires), within the body
            # timeout: a client dripping it holds its own connection, never a pooled one.
            self._awaiting_body = True
            self._arm(self.ctx.settings.timeouts.body_idle)
            return
        self._acquire(req, fresh=False)

    def _acquire(self, req: _Request, fresh: bool) -> None:
        decision = req.decision
        assert decision is not None and decision.target is not None
        if decision.target.protocol == "h2c":
            # (HTTP/2 clients reach it through router.http2.)
            bridge = make_bridge(self, self.ctx.h2pool, decision.target, req)
            if bridge is None:
                self._answer(Answer.HTTP1_TO_H2C)  # gRPC needs HTTP/2 end to end
                return
            self._bridge = bridge
            if self._flow.write_paused:
                bridge.pause()
            body, req.body = req.body, []
            if body:
                req.body_buffered = 0
                self._flow.resume(BUFFER)
            bridge.start(body, req.complete, req.has_body)
            return
        try:
            conn = self.ctx.pool.acquire(decision.target, self, fresh=fresh)
        except PoolFull:
            self._upstream_failure(Answer.POOL_FULL)
            self._answer(Answer.POOL_FULL)
            return
        if conn is not None:
            self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        req = self._active
        assert req is not None
        self._upstream = conn
        conn.start(self, req.head, req.method == b"HEAD", body_pending=not req.complete and req.has_body)
        if self._flow.write_paused:
            conn.pause_reading()
        if req.body:
            if req.chunked:
                for chunk in req.body:
                    conn.write(b"%x\r\n" % len(chunk) + chunk + _CRLF)
            else:
                for chunk in req.body:
                    conn.write(chunk)
            req.body = []
            req.body_buffered = 0
            self._flow.resume(BUFFER)
        if req.complete and req.chunked:
            conn.write(_CHUNK_END)
        # A request complete before the upstream was attached needs no request_sent(): start()
        # already applied the response timeout (no body pending) and every write since counts as I/O.

    # -- a learning sidecar's first request for a service (rare: once per name) -------------------

    def _may_hold(self, req: _Request, target: bytes, version: str, keep_alive: bool, upgrade: bool) -> None:
        """A scoped sidecar found no route: if its scope learns, keep what ``decide`` read."""
        refusal = req.refusal
        scope = self.ctx.slot.scope
        if (refusal is Answer.NO_ROUTE or refusal is Answer.NO_ROUTE_SIDECAR) and scope is not None and scope.learn:
            req.redecide = (target, version, keep_alive, upgrade, list(self._headers))
            if req.method == b"CONNECT":
                # llhttp stops at a CONNECT head for good: what follows is parsed afresh, as after
                # an accepted CONNECT; if this one is refused after all, the connection closes.
                self._plain_after_upgrade = True

    def _held(self, req: _Request) -> bool:
        """Hold the active request until the feed has answered for its authority (True), unless
        there is nothing to wait for: the scope knows the name already, or is full."""
        scope = self.ctx.slot.scope
        assert scope is not None
        name = scope_name(req.authority)

        def resume() -> None:
            self._resume(hold)

        if not scope.first_use(name, resume):
            req.redecide = None
            if req.method == b"CONNECT":
                req.keep_alive = False  # see _may_hold
            return False
        hold = _Hold(req, name, resume, self.loop.call_later(scope.wait, resume))
        self._hold = hold
        self.ctx.stats.scope_holds += 1
        return True

    def _release_hold(self) -> None:
        hold, self._hold = self._hold, None
        if hold is not None:
            hold.timer.cancel()
            scope = self.ctx.slot.scope
            if scope is not None:
                scope.forget(hold.name, hold.resume)

    def _resume(self, hold: _Hold) -> None:
        """The feed answered for the held request's authority (or the wait ended): decide again
        on the table as it is now, and run the exchange as decided."""
        if self._hold is not hold:
            return  # already resumed, or the connection closed
        self._release_hold()
        req = hold.req
        if self._state >= _LINGERING or req is not self._active:
            return
        redecide, req.redecide = req.redecide, None
        assert redecide is not None
        target, version, keep_alive, upgrade, headers = redecide
        req.refusal = None
        ctx = self.ctx
        # (The plan as decide returns it: mypy, and so mypyc, would take req.refusal for None still.)
        plan = decide(ctx.policy, self._cache, ctx.slot, req.method, target, version, keep_alive, upgrade, headers, req)
        if ctx.draining or (plan.refusal is not None and req.method == b"CONNECT"):
            req.keep_alive = False
        self._go(req)

    def _connected(self, req: _Request) -> None:
        """A sidecar's CONNECT to a service: 200, then the same connection starts afresh (the
        parser is replaced when llhttp stops at the CONNECT head, see data_received)."""
        assert self.transport is not None
        raw = b"HTTP/1.1 200 Connection established\r\n\r\n"
        self.transport.write(raw)
        self._relay.status = 200
        self._relay.keep_alive = True
        self._fresh = True
        self._finish_exchange()

    def _to_http2(self, data: bytes) -> None:
        """The client spoke the HTTP/2 preface first: the connection is HTTP/2's from here."""
        transport = self.transport
        if transport is None:
            return
        ctx = self.ctx
        self._state = _CLOSED
        self._flow.closed = True
        self._cancel_timer()
        ctx.connections.discard(self)
        ctx.stats.h2_connections += 1
        conn = Http2Connection(ctx, self._cache)
        transport.set_protocol(cast(asyncio.Protocol, conn))
        conn.connection_made(transport)
        conn.data_received(data)

    def _answer(self, answer: Answer, detail: str | None = None) -> None:
        """The router answers the active request itself, then moves on or closes."""
        req = self._active
        assert req is not None and self.transport is not None
        if not answer.upstream:
            self.ctx.stats.rejected[answer] += 1  # (upstream failures are counted where they happen)
        decision = req.decision
        target = decision.target.url if decision is not None and decision.target is not None else None
        # After an Upgrade head the parser reads no further requests: the connection must end.
        close = not req.keep_alive or req.upgrade or (req.has_body and not req.complete) or answer.closes
        raw = render(
            answer,
            detail=detail,
            service=decision.service if decision is not None else None,
            key=req.key,
            target=target,
            close=close,
            route_header=req.route_header() if decision is not None and req.debug else None,
            head_only=req.method == b"HEAD",
            extra_head=req.extra_head,
        )
        self.transport.write(raw)
        self._relay.answered(answer, not close, len(raw) - raw.find(b"\r\n\r\n") - 4)
        self._finish_exchange()

    def _finish_exchange(self) -> None:
        req = self._active
        self._active = None
        ctx = self.ctx
        if req is not None:
            self._record(req, perf_counter())
        if self._state == _CLOSED or self.transport is None:
            return
        if req is not None and req.has_body and not req.complete:
            self._linger()
            return
        if not self._relay.keep_alive or ctx.draining:
            self._close()
            return
        if self._queue:
            # Soon, not now: we may be inside the upstream's parser callback.
            self.loop.call_soon(self._start_next)
            return
        flow = self._flow
        flow.resume(PIPELINE)
        if flow.paused & DONE:
            self._close()
            return
        timeouts = ctx.settings.timeouts
        # A head already begun (pipelined behind this exchange) gets the head deadline.
        self._arm(timeouts.header_read if self._parsing is not None else timeouts.keepalive_idle)

    def _record(self, req: _Request, ended: float) -> None:
        """The exchange is over (answered, relayed, or cut): metrics, span and access log."""
        ctx = self.ctx
        relay = self._relay
        # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds.
        decision = req.decision
        ctx.stats.observe_duration(decision.stats_key if decision is not None else UNROUTED, ended - req.started_at)
        if req.span is not None and ctx.tracer is not None:
            ctx.tracer.finish(req.span, relay.status)
        access_log = ctx.access_log
        if access_log is not None:
            access_log.record(req, req.started_at, ended, relay.status, relay.sent, relay.answer, self._cache.peer)

    def _start_next(self) -> None:
        if self._state == _CLOSED or self._active is not None or not self._queue:
            return
        self._start(self._queue.popleft())
        if not self._queue and self._state == _READING:
            # The started request may still be mid-body in the parser: let it read on.
            self._flow.resume(PIPELINE)

    def _reject(self, answer: Answer, detail: str | None = None, *, parsed_so_far: bool = False) -> None:
        """A request could not be parsed: answer in order, then close. Never forward it."""
        self._flow.pause(DONE)
        req = self._parsing
        self._parsing = None
        if req is not None and req is self._active:
            # The request being forwarded turned out bad mid-body (e.g. a broken chunk).
            upstream, self._upstream = self._upstream, None
            if upstream is not None:
                upstream.detach()
            bridge, self._bridge = self._bridge, None
            if bridge is not None:
                bridge.cancel()
            if self._relay.head_sent:
                self.abort()
                return
            req.keep_alive = False
            self._answer(answer, detail)
            return
        if req is not None and req in self._queue:
            # Pipelined behind the active exchange and found bad mid-body: it has not been
            # forwarded yet, and now it never will be; it is answered in its turn.
            req.refusal, req.detail = answer, detail
            req.keep_alive = False
            req.complete = True
            return
        bad = _Request()
        bad.refusal, bad.detail = answer, detail
        bad.complete = True
        if req is not None and parsed_so_far:
            # A limit, not a syntax error, stopped a well-formed request: if it is a HEAD
            # request its refusal has no body. An unparseable request's method is not trusted.
            bad.method = req.method or self._parser.get_method()
        if self._active is None:
            self._start(bad)
        else:
            self._queue.append(bad)

    # -- what the upstream reports (router.upstream.ExchangeOwner) -----------------------------

    def upstream_ready(self, conn: UpstreamConnection | None, failure: Answer | None) -> None:
        req = self._active
        if self._state == _CLOSED or req is None or self._upstream is not None:
            if conn is not None:
                self.ctx.pool.release(conn)
            return
        if conn is None:
            assert failure is not None
            self._upstream_failure(failure)
            self._answer(failure)
            return
        self._attach(conn)

    def _upstream_failure(self, failure: Answer) -> None:
        """Counted always; logged (rate-limited) with the upstream it was."""
        ctx = self.ctx
        ctx.stats.upstream_errors[failure.reason] += 1
        req = self._active
        decision = req.decision if req is not None else None
        if decision is not None and decision.target is not None:
            ctx.failures.report(decision.target.url, failure, decision.service)

    def upstream_interim(self, status: int, head: bytes) -> None:
        req = self._active
        if req is not None:
            self._relay.interim(req, status, head)

    def upstream_head(self, status: int, head: bytes, passthrough: bytes | None, framing: Framing) -> None:
        req = self._active
        assert req is not None
        relay = self._relay
        # A response that starts before the request body has ended says close: the router will
        # linger over the rest of the body and close, never read another request after it.
        keep_alive = relay.keep_alive and not req.upgrade and not self.ctx.draining
        relay.head(req, status, head, passthrough, framing, keep_alive and (req.complete or not req.has_body))

    def upstream_body(self, data: bytes) -> None:
        self._relay.body(data)

    def upstream_complete(self, reusable: bool) -> None:
        upstream, self._upstream = self._upstream, None
        self._bridge = None
        if self._state == _TUNNEL:
            self._end_tunnel()  # the upstream closed the tunnel cleanly: the client's side goes too
            return
        req = self._active
        self._relay.end()
        if upstream is not None:
            if self._flow.write_paused:
                upstream.resume_reading()
            if reusable and req is not None and req.complete:
                self.ctx.pool.release(upstream)
            else:
                upstream.close()
        self._finish_exchange()

    def upstream_failed(self, failure: Answer, response_started: bool) -> None:
        conn, self._upstream = self._upstream, None
        self._bridge = None
        req = self._active
        if failure.upstream:  # a body too slow is the client's failure, not the upstream's
            self._upstream_failure(failure)
        if req is None or self._state == _CLOSED:
            return
        relay = self._relay
        if self._state == _TUNNEL or relay.head_sent:
            # Part of the response is already with the client: the only honest signal left is
            # to cut the connection, so a truncated body is never taken for a whole one.
            self.abort()
            return
        relay.pending_head = None
        if (
            failure is Answer.UPSTREAM_RESET
            and not response_started
            and conn is not None
            and conn.reused
            and not req.retried
            and not req.has_body
            and req.method in _IDEMPOTENT
        ):
            # The pooled connection was closed by the upstream as we reused it: safe to retry once.
            req.retried = True
            self._acquire(req, fresh=True)
            return
        if failure is Answer.UPSTREAM_TIMEOUT and req.has_body and not req.complete:
            failure = Answer.BODY_TIMEOUT  # the silence was the client's, mid-body: not the upstream's
        if failure.closes:
            req.keep_alive = False
        self._answer(failure)

    def upstream_upgraded(self, rest: bytes) -> None:
        upstream = self._upstream
        tunnel = self._tunnel
        if self._state != _UPGRADING or upstream is None or tunnel is None:
            return
        self._state = _TUNNEL
        self.ctx.stats.tunnels_open += 1
        self._arm(self.ctx.settings.timeouts.tunnel_idle)
        tunnel.start(upstream, rest)
        self._flow.resume(UPGRADE | PIPELINE | DONE)

    def upstream_tunnel_data(self, data: bytes) -> None:
        tunnel = self._tunnel
        if self._state == _TUNNEL and tunnel is not None:
            tunnel.to_client(data)
            self._arm(self.ctx.settings.timeouts.tunnel_idle)

    def upstream_tunnel_eof(self) -> None:
        """The upstream half-closed the tunnel: pass it on; the tunnel ends once both have."""
        tunnel = self._tunnel
        if self._state == _TUNNEL and tunnel is not None and tunnel.upstream_half_closed():
            self._end_tunnel()

    def upstream_pause(self) -> None:
        self._flow.pause(UPSTREAM)

    def upstream_resume(self) -> None:
        self._flow.resume(UPSTREAM)

    def _end_tunnel(self) -> None:
        """Both directions are done, the upstream closed, or the tunnel idled out: close both."""
        self._upstream = None
        tunnel = self._tunnel
        if tunnel is not None:
            tunnel.end()
        self._close()

    # -- connection control -------------------------------------------------------------------

    def close_if_idle(self) -> None:
        if self._active is None and not self._queue and self._parsing is None:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        if self._state != _CLOSED:
            self._state = _CLOSING
        self._flow.paused |= DONE  # marked only: the transport is closing, nothing is resumed
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _arm(self, timeout: float) -> None:
        deadline = self.ctx.pool.clock() + timeout
        self._deadline = deadline
        timer = self._timer
        if timer is not None:
            if self._timer_at <= deadline:
                return
            timer.cancel()
        self._timer = self.loop.call_at(deadline, self._on_timer)
        self._timer_at = deadline

    def _cancel_timer(self) -> None:
        self._deadline = 0.0

    def _linger(self) -> None:
        """The exchange was answered before its request body ended (a 401, a 413, an upload
        handler that does not read): closing now, with body bytes unread, would make the
        kernel reset the connection and the client could lose the answer. So, as nginx's
        lingering close does, send our FIN, then read and discard the rest of the body for a
        bounded time and size, and close."""
        transport = self.transport
        assert transport is not None
        limits, timeouts = self.ctx.settings.limits, self.ctx.settings.timeouts
        self._state = _LINGERING  # nothing more is parsed or answered on this connection
        self._parsing = None
        self._queue.clear()
        self._awaiting_body = False
        self._linger_left = limits.linger_bytes
        self._linger_end = self.loop.time() + timeouts.linger
        if transport.can_write_eof():
            transport.write_eof()
        self._flow.resume_all()
        self._arm(timeouts.linger_pause)

    def _discard(self, data: bytes) -> None:
        self._linger_left -= len(data)
        if self._linger_left < 0 or self.loop.time() >= self._linger_end:
            self._close()
            return
        self._arm(self.ctx.settings.timeouts.linger_pause)

    def _on_timer(self) -> None:
        self._timer = None
        state = self._state
        if not self._deadline or state == _CLOSED:
            return
        now = self.loop.time()
        if now < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            self._timer_at = self._deadline
            return
        if state == _TUNNEL:
            self._end_tunnel()  # idle past --tunnel-idle-timeout: a forgotten tunnel
            return
        if state == _LINGERING:
            self._close()
            return
        req = self._active
        if self._awaiting_body and req is not None and self.transport is not None:
            self._awaiting_body = False
            req.keep_alive = False
            self._answer(Answer.BODY_TIMEOUT)
            return
        # Idle keep-alive or a head that never finished (slowloris): close, answering 408 only
        # when a request had begun.
        if self._parsing is not None and self._active is None and self.transport is not None:
            self.ctx.stats.rejected[Answer.HEADER_TIMEOUT] += 1
            self.transport.write(render(Answer.HEADER_TIMEOUT, close=True))
        self._close()

"""Client side of the hot path: one asyncio protocol per client connection.

A ``ClientConnection`` parses requests strictly (llhttp via httptools plus the checks llhttp
leaves to us), picks the service from the authority and the routing key from the request's
headers, resolves the current ``RouteTable`` once, and streams the exchange through a pooled
``UpstreamConnection``: request body up, response body down, backpressure both ways, WebSocket
tunnels after a 101 (each side's FIN passed on, ended when both are done). It never awaits
anything on the request path (connection setup is the only task, owned by the pool), never logs
per request, and never forwards a request it had to guess about: every ambiguity is answered by
the router itself with a 4xx and the connection closes, after a bounded lingering read when the
client was still sending a body.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable, Sequence
from time import perf_counter
from typing import TYPE_CHECKING, Final, cast

import httptools

from router import COMPILED
from router.http import (
    HOP_BY_HOP,
    PROTECTED,
    connection_tokens,
    error_response,
    head_fields,
    is_valid_authority,
    reason_phrase,
    status_reason,
)
from router.keys import BaggageKeySource, KeySource
from router.settings import Mode, RouterSettings
from router.stats import RouterStats
from router.table import Decision, Routes, RouteTable
from router.upstream import Failure, Framing, PoolFull, UnexpectedUpgrade, UpstreamConnection, UpstreamPool

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is switched on
    from router.tracing import RequestTracer

__all__ = ["ClientConnection", "ProxyContext", "TableSlot"]

_CRLF: Final = b"\r\n"
_COLON_SP: Final = b": "


def _add_field(out: list[bytes], name: bytes, value: bytes) -> None:
    # Four appends, not `out += (name, b": ", value, _CRLF)`: no tuple per field (compiled, the
    # call itself is a direct C call).
    out.append(name)
    out.append(_COLON_SP)
    out.append(value)
    out.append(_CRLF)


_CHUNK_END: Final = b"0\r\n\r\n"

_join: Callable[[list[bytes]], bytes] = b"".join
if COMPILED:
    # The same join without a buffer acquire and release per piece (tests/test_speedups.py).
    from router import _speedups

    _join = _speedups.join_bytes
_BUFFER_LIMIT: Final = 256 * 1024
"""Request body bytes held while an upstream connection is being set up, before we stop reading."""

# Reasons the client socket's reading is paused; reading resumes when none is left.
_PAUSE_PIPELINE: Final = 1
_PAUSE_BUFFER: Final = 2
_PAUSE_UPSTREAM: Final = 4
_PAUSE_UPGRADE: Final = 8
_PAUSE_DONE: Final = 16

_CLOSING_STATUSES: Final = frozenset({400, 405, 408, 413, 414, 431, 501, 505})
"""Answers to requests we could not parse or will not serve: the connection's state is suspect."""

# Request fields the single classification pass treats specially (see _prepare).
_F_KEY: Final = 1
_F_HOST: Final = 2
_F_CONTENT_LENGTH: Final = 3
_F_TRANSFER_ENCODING: Final = 4
_F_CONNECTION: Final = 5
_F_UPGRADE: Final = 6
_F_FORWARDED_FOR: Final = 7
_F_DEBUG: Final = 8
_F_FORWARDED: Final = 9
_F_TRACEPARENT: Final = 10
_F_DROP: Final = 11
_F_EXPECT: Final = 12
_REQUEST_FIELDS: Final = {
    b"host": _F_HOST,
    b"content-length": _F_CONTENT_LENGTH,
    b"transfer-encoding": _F_TRANSFER_ENCODING,
    b"connection": _F_CONNECTION,
    b"upgrade": _F_UPGRADE,
    b"x-forwarded-for": _F_FORWARDED_FOR,
    b"x-devstack-debug": _F_DEBUG,
    b"x-forwarded-proto": _F_FORWARDED,
    b"x-forwarded-host": _F_FORWARDED,
    b"forwarded": _F_FORWARDED,
    b"traceparent": _F_TRACEPARENT,
    b"expect": _F_EXPECT,
    # HTTP2-Settings belongs to an h2c upgrade, which is never tunnelled (RFC 9113 3.1).
    b"http2-settings": _F_DROP,
    **{name: _F_DROP for name in HOP_BY_HOP - {b"content-length", b"transfer-encoding", b"connection", b"upgrade"}},
}
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})


def _forges_owned_field(lower: bytes, fields: dict[bytes, int]) -> bool:
    """A name with underscores that CGI-style backends (PHP, WSGI's environ, nginx's
    ``$http_*``) fold into one the router owns: ``X_Forwarded_For`` would arrive as
    ``X-Forwarded-For`` past our cleaning, ``Content_Length`` as a second framing header."""
    folded = lower.replace(b"_", b"-")
    return folded in fields or folded.startswith(b"x-devstack-")


def _tunnel_protocols(upgrade: bytes, allowed: frozenset[bytes]) -> bytes:
    """The tokens of an ``Upgrade`` value the router may tunnel, as sent; empty when none."""
    kept = []
    for token in upgrade.split(b","):
        token = token.strip(b" \t")
        if token and token.partition(b"/")[0].lower() in allowed:
            kept.append(token)
    return b", ".join(kept)


def _without_fields(out: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """The rendered head pieces minus the fields called ``names`` (rare: Connection-listed
    fields, a traceparent the router replaces). Pieces after the request line come in fours."""
    kept = out[:4]
    for i in range(4, len(out), 4):
        if out[i].lower() not in names:
            kept += out[i : i + 4]
    return kept


_TRACE_FIELDS: Final = frozenset({b"traceparent", b"tracestate"})

_IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})


class TableSlot:
    """The one mutable reference to the current table; the controller side swaps it whole."""

    __slots__ = ("generation", "table")

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        self.generation = 0
        """Bumped by every swap: connections remember lookups made in one generation."""

    def swap(self, table: RouteTable) -> None:
        self.table = table
        self.generation += 1


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
    ) -> None:
        self.loop = loop
        self.settings = settings
        self.slot = slot
        self.stats = stats or RouterStats()
        self.pool = UpstreamPool(loop, settings.timeouts, settings.limits, self.stats)
        self.key_sources: tuple[KeySource, ...] = tuple(
            key_sources if key_sources is not None else (BaggageKeySource(settings.key_members),)
        )
        self.key_headers = frozenset(source.header for source in self.key_sources)
        self.request_fields: dict[bytes, int] = {**_REQUEST_FIELDS, **dict.fromkeys(self.key_headers, _F_KEY)}
        self.connections: set[ClientConnection] = set()
        self.draining = False
        self.no_route_status = 403 if settings.mode is Mode.SIDECAR else 404
        self.tracer = tracer
        """Off (None) by default: then tracing costs one attribute check per request."""

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

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


class _Stop(Exception):
    """Raised from a parser callback to stop parsing input of a connection that is closing."""


class _Reject(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class _Request:
    """One request's parse and forwarding state."""

    __slots__ = (
        "method",
        "keep_alive",
        "http11",
        "upgrade",
        "chunked",
        "has_body",
        "body",
        "body_buffered",
        "body_bytes",
        "complete",
        "debug",
        "error",
        "decision",
        "head",
        "started_at",
        "retried",
        "span",
        "key",
        "small_body",
    )

    def __init__(self) -> None:
        self.method = b""
        self.keep_alive = False
        self.http11 = True
        self.upgrade = False
        self.chunked = False
        self.has_body = False
        self.body: list[bytes] = []
        self.body_buffered = 0
        self.body_bytes = 0
        self.complete = False
        self.debug = False
        self.error: tuple[int, str] | None = None
        self.decision: Decision | None = None
        self.head = b""
        """The rendered request head for the upstream, kept for a single safe retry."""
        self.started_at = 0.0
        self.retried = False
        self.span: object = None
        self.key: str | None = None
        self.small_body = False
        """A body small enough to read whole before taking an upstream connection."""


class ClientConnection(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpRequestParser(self)
        self._feed = self._parser.feed_data
        """Bound once: compiled, calling it skips a method lookup per read."""
        self._peer = b""
        self._forwarded_authority: bytes | None = None
        self._forwarded = b""
        """X-Forwarded-* lines for the last authority seen (see _prepare)."""
        # The last Host value that passed validation, and the last routing lookup (authority,
        # table generation, result): a connection nearly always names one authority, so both
        # are done once per connection and table rather than per request.
        self._valid_host: bytes | None = None
        self._host_padded = False
        """Whether that Host value ends in whitespace, which is not part of it (RFC 9110 5.5):
        llhttp keeps it, so it is trimmed here rather than per field for every header."""
        self._route_authority: bytes | None = None
        self._route_generation = -1
        self._routes: Routes | None = None
        self._url: list[bytes] = []
        self._url_len = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        self._connection_field = False
        self._head_bytes = 0
        self._reading_head = True
        self._parsing: _Request | None = None
        self._active: _Request | None = None
        self._queue: collections.deque[_Request] = collections.deque()
        self._upstream: UpstreamConnection | None = None
        self._paused = 0
        self._write_paused = False
        self._tunnel = False
        self._tunnel_pending: list[bytes] | None = None
        self._tunnel_pending_bytes = 0
        """Bytes a client sent after its Upgrade head, held until the upstream answers: reading
        goes on meanwhile (a reset must be seen at once), up to _BUFFER_LIMIT."""
        self._plain_after_upgrade = False
        """llhttp stopped at an Upgrade the router does not tunnel: parsing goes on afresh."""
        self._client_eof = False
        self._upstream_eof = False
        """Half-closes seen inside a tunnel; when both sides have sent theirs, it ends."""
        self._awaiting_body = False
        """A small body is being read whole before an upstream connection is taken."""
        self._lingering = False
        self._linger_left = 0
        self._linger_end = 0.0
        self._closed = False
        self._closing = False
        self._pending_reject: _Reject | None = None
        self._resp_head: bytes | None = None
        self._resp_head_sent = False
        self._resp_chunked = False
        self._resp_keep_alive = True
        self._resp_status = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        """When ``_timer`` fires: kept here because TimerHandle.when() is a method call."""
        self._deadline = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        ctx = self.ctx
        if len(ctx.connections) >= ctx.settings.limits.max_client_connections or ctx.draining:
            ctx.stats.refused_connections += 1
            self._closed = True
            transport.abort()
            return
        ctx.connections.add(self)
        ctx.stats.open_connections += 1
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._peer = str(peer[0]).encode()
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._arm(ctx.settings.timeouts.header_read)

    def data_received(self, data: bytes) -> None:
        if self._tunnel:
            if self._upstream is not None:
                self._upstream.tunnel_write(data)
                self._arm(self.ctx.settings.timeouts.tunnel_idle)
            return
        if self._lingering:
            self._discard(data)
            return
        if self._tunnel_pending is not None:
            self._hold_for_tunnel(data)
            return
        if self._paused & _PAUSE_DONE or self._closed:
            return
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            rest = data[exc.args[0] :]
            if self._plain_after_upgrade:
                # An Upgrade we do not tunnel was forwarded as a plain request; llhttp has
                # stopped at it for good, so a fresh parser reads whatever follows.
                self._plain_after_upgrade = False
                self._parser = httptools.HttpRequestParser(self)
                self._feed = self._parser.feed_data
                if rest:
                    self.data_received(rest)
                return
            self._tunnel_pending = []
            self._hold_for_tunnel(rest)
        except (httptools.HttpParserError, _Reject) as exc:
            if self._lingering:
                return  # the exchange was answered mid-feed; what follows is discarded unread
            # httptools wraps exceptions raised in some callbacks; ours are parked on self.
            pending, self._pending_reject = self._pending_reject, None
            if isinstance(exc, _Reject):
                pending = exc
            if pending is not None:
                self._reject(pending.status, pending.reason, parsed_so_far=True)
            else:
                self._reject(400, f"malformed request: {exc}")
        except _Stop:
            return
        else:
            if self._reading_head and self._parsing is not None:
                self._head_bytes += len(data)
                limits = self.ctx.settings.limits
                if self._head_bytes > limits.max_header_bytes + limits.max_request_line + _BUFFER_LIMIT:
                    self._reject(431, "request head too large")

    def _hold_for_tunnel(self, data: bytes) -> None:
        # Reading is paused only past the limit: a paused socket would not notice a reset, and
        # a client that gives up before the 101 must release its upstream connection at once.
        pending = self._tunnel_pending
        assert pending is not None
        if data:
            pending.append(data)
            self._tunnel_pending_bytes += len(data)
            if self._tunnel_pending_bytes > _BUFFER_LIMIT:
                self._pause(_PAUSE_UPGRADE)

    def eof_received(self) -> bool | None:
        self._client_eof = True
        if self._tunnel:
            # Pass the half-close on; the tunnel ends when the upstream has sent its own.
            upstream = self._upstream
            if upstream is not None and not self._upstream_eof:
                upstream.tunnel_eof()
                return True
            self._end_tunnel()
            return True
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
        self._pause(_PAUSE_DONE)
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed and self not in self.ctx.connections:
            return
        self._closed = True
        self.ctx.connections.discard(self)
        self.ctx.stats.open_connections -= 1
        self._cancel_timer()
        if self._tunnel:
            self.ctx.stats.tunnels_open -= 1
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            # Mid-exchange: the upstream's framing state is unknown, so it is not reused. A
            # tunnel's upstream goes at once too: a client reset ends both.
            upstream.detach()
        else:
            req = self._active
            decision = req.decision if req is not None else None
            if decision is not None and decision.target is not None:
                self.ctx.pool.withdraw(decision.target, self)
        self._queue.clear()
        self._active = None

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()

    # -- httptools callbacks --------------------------------------------------------------------

    def _park(self, reject: _Reject) -> _Reject:
        self._pending_reject = reject
        return reject

    def on_message_begin(self) -> None:
        if self._closing:
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
            raise self._park(_Reject(414, "request target too long"))
        self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._reading_head:
            return  # chunked trailer fields: dropped, never merged into the forwarded head
        self._header_bytes += len(name) + len(value) + 4
        limits = self.ctx.settings.limits
        if self._header_bytes > limits.max_header_bytes or len(self._headers) >= limits.max_headers:
            raise self._park(_Reject(431, "request header fields too large"))
        self._headers.append((name, value))
        if len(name) == 10 and name.lower() == b"connection":
            self._connection_field = True

    def on_headers_complete(self) -> None:
        self._reading_head = False
        req = self._parsing
        assert req is not None
        try:
            self._prepare(req)
        except _Reject as exc:
            self.ctx.stats.rejected[exc.status] += 1
            req.error = (exc.status, exc.reason)
            req.keep_alive = False
        if self._active is None and not self._queue:
            self._start(req)
        else:
            self._queue.append(req)
            self._pause(_PAUSE_PIPELINE)

    def on_body(self, body: bytes) -> None:
        req = self._parsing
        if req is None:
            return
        req.body_bytes += len(body)
        max_body = self.ctx.settings.limits.max_body_bytes
        if max_body and req.body_bytes > max_body:
            raise self._park(_Reject(413, "request body too large"))
        if req.error is not None or (req is self._active and req.decision is None):
            return
        upstream = self._upstream
        if req is self._active and upstream is not None:
            if req.chunked:
                upstream.write(b"%x\r\n" % len(body) + body + _CRLF)
            else:
                upstream.write(body)
            return
        req.body.append(body)
        req.body_buffered += len(body)
        if req.body_buffered > _BUFFER_LIMIT:
            self._pause(_PAUSE_BUFFER)

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
                self._pause(_PAUSE_DONE)
            self._acquire(req, fresh=False)
            return
        upstream = self._upstream
        if req is self._active and upstream is not None and req.error is None and req.has_body:
            # (Without a body, start() already applied the response timeout.)
            if req.chunked:
                upstream.write(_CHUNK_END)
            upstream.request_sent()
        if not req.keep_alive:
            # Nothing after a request that closes the connection is read, let alone forwarded.
            self._pause(_PAUSE_DONE)

    # -- request preparation ------------------------------------------------------------------

    def _prepare(self, req: _Request) -> None:
        """Validate the parsed head, route it, and render the upstream head; raises _Reject."""
        parser = self._parser
        ctx = self.ctx
        method = parser.get_method()
        req.method = method  # first, so even a refusal of a HEAD request is sent without a body
        keep_alive = parser.should_keep_alive()
        if keep_alive and not self._connection_field:
            # llhttp keeps only HTTP/1.1 alive by default (it refuses 1.x for x > 1), so with no
            # Connection field keep-alive means 1.1: get_http_version, which formats a string
            # on every call, is left for the other cases.
            req.http11 = True
        else:
            version = parser.get_http_version()
            if version == "1.1":
                req.http11 = True
            elif version == "1.0":
                req.http11 = False
            elif version == "0.9":
                raise _Reject(400, "HTTP/0.9 is not supported")
            else:
                raise _Reject(505, "HTTP version not supported")
        if method == b"CONNECT":
            raise _Reject(405, "CONNECT is not supported: this router never opens tunnels")
        req.keep_alive = keep_alive and not ctx.draining
        # llhttp upgrades only with a Connection field naming "upgrade" (CONNECT is refused above);
        # whether the router tunnels is decided below, from the Upgrade tokens.
        llhttp_upgrade = self._connection_field and parser.should_upgrade()

        headers = self._headers
        target = self._url[0] if len(self._url) == 1 else b"".join(self._url)
        # Only absolute-form names its own authority; origin-form and OPTIONS' asterisk-form
        # forward the client's Host line where it stood.
        absolute = target[:1] != b"/" and target != b"*"
        fields = ctx.request_fields
        host: bytes | None = None
        content_length = -1
        transfer_encoding: bytes | None = None
        connection: list[bytes] | None = None
        upgrade = b""
        # The routing-key fields: the first one as a name and value (the usual case is exactly
        # one baggage line), any further ones in a list made only when they occur.
        key_name: bytes | None = None
        key_value = b""
        more_key_fields: list[tuple[bytes, bytes]] | None = None
        forwarded_for = b""
        expect = False
        # One pass classifies every field and renders the forwarded ones; the rare cases that
        # need a second look (Connection naming fields, tracing) re-render afterwards.
        out: list[bytes] = [method, b" ", b"", b" HTTP/1.1\r\n"]
        for name, value in headers:
            lower = name.lower()
            code = fields.get(lower)
            if code is None:
                # The router's own fields are its to set, in any spelling a backend might fold.
                if not lower.startswith(b"x-devstack-") and not (b"_" in lower and _forges_owned_field(lower, fields)):
                    _add_field(out, name, value)
            elif code is _F_KEY:
                if key_name is None:
                    key_name = lower
                    key_value = value
                elif more_key_fields is None:
                    more_key_fields = [(lower, value)]
                else:
                    more_key_fields.append((lower, value))
                _add_field(out, name, value)
            elif code is _F_HOST:
                if host is not None:
                    raise _Reject(400, "more than one Host header")
                host = value
                if not absolute:
                    _add_field(out, name, value)
            elif code is _F_CONTENT_LENGTH:
                content_length = int(value)
            elif code is _F_TRANSFER_ENCODING:
                if transfer_encoding is not None:
                    raise _Reject(400, "more than one Transfer-Encoding header")
                transfer_encoding = value
            elif code is _F_CONNECTION:
                connection = [value] if connection is None else [*connection, value]
            elif code is _F_UPGRADE:
                upgrade = value if not upgrade else upgrade + b", " + value
            elif code is _F_FORWARDED_FOR:
                forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
            elif code is _F_DEBUG:
                req.debug = value.strip() == b"1"
            elif code is _F_FORWARDED:
                if ctx.settings.trust_forwarded:
                    _add_field(out, name, value)
            elif code is _F_TRACEPARENT:
                _add_field(out, name, value)
            elif code is _F_EXPECT:
                expect = True
                _add_field(out, name, value)
            # _F_DROP: hop-by-hop, never forwarded

        if host is None and req.http11:
            raise _Reject(400, "HTTP/1.1 request without Host")
        if host is not None:
            if host != self._valid_host:
                trimmed = host.rstrip(b" \t")
                if not is_valid_authority(trimmed):
                    raise _Reject(400, "invalid Host header")
                self._valid_host = host
                self._host_padded = len(trimmed) != len(host)
            if self._host_padded:
                padded, host = host, host.rstrip(b" \t")
                for i in range(6, len(out), 4):  # field values sit at 6, 10, ... (see _add_field)
                    if out[i] is padded:  # this very object: no other field can be mistaken for it
                        out[i] = host
                        break
        if transfer_encoding is not None:
            if not req.http11:
                raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            if transfer_encoding.strip(b" \t").lower() != b"chunked":
                raise _Reject(501, "only the chunked transfer coding is supported")
            req.chunked = True
            req.has_body = True
        elif content_length > 0:
            req.has_body = True
            # A client that sent Expect: 100-continue waits for the upstream before its body.
            req.small_body = content_length <= ctx.settings.limits.small_body and not expect
        if llhttp_upgrade:
            # Only allowed protocols open a tunnel, and only from HTTP/1.1 (RFC 9110 7.8); any
            # other Upgrade is dropped and the request goes on as a plain one.
            upgrade = _tunnel_protocols(upgrade, ctx.settings.upgrade_protocols) if req.http11 else b""
            req.upgrade = bool(upgrade)
            if req.has_body:
                # llhttp hands everything after an Upgrade head to the tunnel, so a body here
                # would be forwarded as tunnel bytes under a framing header that promises otherwise.
                raise _Reject(400, "an Upgrade request cannot carry a body")
            self._plain_after_upgrade = not req.upgrade
        max_body = ctx.settings.limits.max_body_bytes
        if max_body and content_length > max_body:
            raise _Reject(413, "request body too large")

        authority = host
        if target[:1] == b"/":
            path = target
        elif absolute and target[:7].lower() == b"http://":
            rest = target[7:]
            end = len(rest)
            for sep in (b"/", b"?", b"#"):
                found = rest.find(sep)
                if 0 <= found < end:
                    end = found
            authority = rest[:end]
            path = rest[end:]
            if not path.startswith(b"/"):
                path = b"/" + path
            if b"@" in authority or not is_valid_authority(authority):
                raise _Reject(400, "invalid authority in request target")
            out += (b"Host", b": ", authority, _CRLF)
        elif target == b"*" and method == b"OPTIONS":
            path = target
        else:
            raise _Reject(400, "unsupported request target form")
        if authority is None:
            raise _Reject(400, "no authority to route on")

        slot = ctx.slot
        if authority == self._route_authority and slot.generation == self._route_generation:
            routes = self._routes
        else:
            routes = slot.table.routes_for_authority(authority.decode("latin-1"))
            self._route_authority = authority
            self._route_generation = slot.generation
            self._routes = routes
        if routes is None:
            req.error = (ctx.no_route_status, "no-route")
            ctx.stats.rejected[ctx.no_route_status] += 1
            return
        key: str | None = None
        if key_name is not None:
            for source in ctx.key_sources:
                lines = [key_value] if source.header == key_name else []
                if more_key_fields is not None:
                    lines += [value for field, value in more_key_fields if field == source.header]
                if lines:
                    key = source.key_from(lines)
                    if key is not None:
                        break
        req.key = key
        decision = routes.resolve(key)
        req.decision = decision
        if decision.target is None:
            return

        out[2] = path
        if connection is not None:
            stripped = connection_tokens(connection) - PROTECTED - _CONNECTION_OPTIONS
            if stripped:
                out = _without_fields(out, stripped)
        if ctx.tracer is not None:
            req.span, traceparent, tracestate = ctx.tracer.start(
                method, target, headers, routes.service, key, decision.kind.value, decision.target.url
            )
            if traceparent is not None:
                # The router's span is the parent now; the tracestate goes with the trace it
                # belongs to (none when the client's traceparent was missing or invalid).
                out = _without_fields(out, _TRACE_FIELDS)
                out += (b"traceparent: ", traceparent, _CRLF)
                if tracestate is not None:
                    out += (b"tracestate: ", tracestate, _CRLF)
        if not forwarded_for and not ctx.settings.trust_forwarded:
            # The usual case, rendered once per connection and authority rather than per request.
            if authority != self._forwarded_authority:
                self._forwarded_authority = authority
                self._forwarded = (
                    b"X-Forwarded-For: " + self._peer + b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: "
                    + authority + _CRLF
                )  # fmt: skip
            out.append(self._forwarded)
        else:
            out += (
                b"X-Forwarded-For: ",
                forwarded_for + b", " + self._peer if forwarded_for else self._peer,
                _CRLF,
            )
            if not ctx.settings.trust_forwarded:
                out += (b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: ", authority, _CRLF)
        if req.chunked:
            out.append(b"Transfer-Encoding: chunked\r\n")
        elif content_length >= 0 and (content_length > 0 or method not in (b"GET", b"HEAD")):
            out.append(b"Content-Length: %d\r\n" % content_length)
        if req.upgrade and upgrade:
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, _CRLF)
        out.append(_CRLF)
        req.head = _join(out)

    # -- exchange lifecycle -------------------------------------------------------------------

    def _start(self, req: _Request) -> None:
        if self._closing:
            return
        self._active = req
        self._cancel_timer()
        req.started_at = perf_counter()
        self._resp_head = None
        self._resp_head_sent = False
        self._resp_chunked = False
        self._resp_status = 0
        self._resp_keep_alive = req.keep_alive
        decision = req.decision
        if req.error is not None:
            status, reason = req.error
            self._answer(status, reason, decision)
            return
        assert decision is not None
        self.ctx.stats.requests[decision.stats_key] += 1
        if decision.target is None:
            self.ctx.stats.rejected[decision.status] += 1
            self._answer(decision.status, decision.reason, decision)
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
        try:
            conn = self.ctx.pool.acquire(decision.target, self, fresh=fresh)
        except PoolFull:
            self.ctx.stats.upstream_errors[Failure.POOL_FULL.label] += 1
            self._answer(Failure.POOL_FULL.status, Failure.POOL_FULL.label, decision)
            return
        if conn is not None:
            self._attach(conn)

    def upstream_ready(self, conn: UpstreamConnection | None, failure: Failure | None) -> None:
        req = self._active
        if self._closed or req is None or self._upstream is not None:
            if conn is not None:
                self.ctx.pool.release(conn)
            return
        if conn is None:
            assert failure is not None
            self.ctx.stats.upstream_errors[failure.label] += 1
            self._answer(failure.status, failure.label, req.decision)
            return
        self._attach(conn)

    def _attach(self, conn: UpstreamConnection) -> None:
        req = self._active
        assert req is not None
        self._upstream = conn
        conn.start(self, req.head, req.method == b"HEAD", body_pending=not req.complete and req.has_body)
        if self._write_paused:
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
            self._resume(_PAUSE_BUFFER)
        if req.complete and req.chunked:
            conn.write(_CHUNK_END)
        # A request complete before the upstream was attached needs no request_sent(): start()
        # already applied the response timeout (no body pending) and every write since counts as I/O.

    def _answer(self, status: int, reason: str, decision: Decision | None) -> None:
        """The router answers the active request itself, then moves on or closes."""
        req = self._active
        assert req is not None and self.transport is not None
        target = decision.target.url if decision is not None and decision.target is not None else None
        # After an Upgrade head the parser reads no further requests: the connection must end.
        close = not req.keep_alive or req.upgrade or (req.has_body and not req.complete) or status in _CLOSING_STATUSES
        answer = error_response(
            status,
            reason,
            service=decision.service if decision is not None else None,
            key=req.key,
            target=target,
            close=close,
            route_header=decision.route_header(req.key) if decision is not None and req.debug else None,
        )
        if req.method == b"HEAD":
            answer = answer[: answer.find(b"\r\n\r\n") + 4]  # same head, no body (RFC 9110 9.3.2)
        self.transport.write(answer)
        self._resp_keep_alive = not close
        self._resp_status = status
        self._finish_exchange()

    def _finish_exchange(self) -> None:
        req = self._active
        self._active = None
        if req is not None:
            # perf_counter, not loop.time(): uvloop's clock counts whole milliseconds.
            self.ctx.stats.observe_latency(perf_counter() - req.started_at)
            if req.span is not None and self.ctx.tracer is not None:
                self.ctx.tracer.finish(req.span, self._resp_status)
        if self._closed or self.transport is None:
            return
        if req is not None and req.has_body and not req.complete:
            self._linger()
            return
        if not self._resp_keep_alive or self.ctx.draining:
            self._close()
            return
        if self._queue:
            # Soon, not now: we may be inside the upstream's parser callback.
            self.loop.call_soon(self._start_next)
            return
        self._resume(_PAUSE_PIPELINE)
        if self._paused & _PAUSE_DONE:
            self._close()
            return
        timeouts = self.ctx.settings.timeouts
        # A head already begun (pipelined behind this exchange) gets the head deadline.
        self._arm(timeouts.header_read if self._parsing is not None else timeouts.keepalive_idle)

    def _start_next(self) -> None:
        if self._closed or self._active is not None or not self._queue:
            return
        self._start(self._queue.popleft())
        if not self._queue and not self._closing:
            # The started request may still be mid-body in the parser: let it read on.
            self._resume(_PAUSE_PIPELINE)

    def _reject(self, status: int, reason: str, *, parsed_so_far: bool = False) -> None:
        """A request could not be parsed: answer in order, then close. Never forward it."""
        self.ctx.stats.rejected[status] += 1
        self._pause(_PAUSE_DONE)
        req = self._parsing
        self._parsing = None
        if req is not None and req is self._active:
            # The request being forwarded turned out bad mid-body (e.g. a broken chunk).
            upstream, self._upstream = self._upstream, None
            if upstream is not None:
                upstream.detach()
            if self._resp_head_sent:
                self.abort()
                return
            req.keep_alive = False
            self._answer(status, reason, req.decision)
            return
        if req is not None and req in self._queue:
            # Pipelined behind the active exchange and found bad mid-body: it has not been
            # forwarded yet, and now it never will be; it is answered in its turn.
            req.error = (status, reason)
            req.keep_alive = False
            req.complete = True
            return
        bad = _Request()
        bad.error = (status, reason)
        bad.complete = True
        if req is not None and parsed_so_far:
            # A limit, not a syntax error, stopped a well-formed request: if it is a HEAD
            # request its refusal has no body. An unparseable request's method is not trusted.
            bad.method = req.method or self._parser.get_method()
        if self._active is None:
            self._start(bad)
        else:
            self._queue.append(bad)

    # -- upstream events (router.upstream.ExchangeOwner) ----------------------------------------

    def upstream_interim(self, status: int, head: bytes) -> None:
        req = self._active
        if req is None or not req.http11 or self.transport is None:
            return
        out = [b"HTTP/1.1 %d %s\r\n" % (status, status_reason(head) or reason_phrase(status))]
        for name, value in head_fields(head):
            if name.lower() not in HOP_BY_HOP:
                out += (name, b": ", value, _CRLF)
        out.append(_CRLF)
        self.transport.write(b"".join(out))

    def upstream_head(self, status: int, head: bytes, passthrough: bytes | None, framing: Framing) -> None:
        req = self._active
        assert req is not None
        self._resp_status = status
        # A response that starts before the request body has ended says close: the router will
        # linger over the rest of the body and close, never read another request after it.
        client_keep_alive = (
            self._resp_keep_alive and not req.upgrade and not self.ctx.draining and (req.complete or not req.has_body)
        )
        if passthrough is not None and client_keep_alive and framing is Framing.LENGTH and req.http11 and status != 101:
            # Fast path: forward the validated head as received, adding only what we must. A
            # client connection about to close takes the rebuilding path, which says so.
            self._resp_keep_alive = True
            if req.debug and req.decision is not None:
                route = req.decision.route_header(req.key)
                passthrough = passthrough[:-2] + b"x-devstack-route: " + route + _CRLF + _CRLF
            self._resp_head = passthrough
            return
        self._rebuild_head(req, status, head, framing, client_keep_alive)

    def _rebuild_head(self, req: _Request, status: int, head: bytes, framing: Framing, client_keep_alive: bool) -> None:
        """Render a response head field by field: hop-by-hop removal, our own framing."""
        fields = head_fields(head)
        lowered = [name.lower() for name, _ in fields]
        stripped: frozenset[bytes] = frozenset()
        if b"connection" in lowered:
            values = [value for lower, (_, value) in zip(lowered, fields) if lower == b"connection"]
            stripped = connection_tokens(values) - PROTECTED
        out = [b"HTTP/1.1 %d %s\r\n" % (status, status_reason(head) or reason_phrase(status))]
        content_length: bytes | None = None
        upgrade = b""
        for lower, (name, value) in zip(lowered, fields):
            if lower in HOP_BY_HOP or lower in stripped:
                if lower == b"content-length":
                    content_length = value
                elif lower == b"upgrade":
                    upgrade = value
                continue
            out += (name, b": ", value, _CRLF)
        if req.debug and req.decision is not None:
            out += (b"x-devstack-route: ", req.decision.route_header(req.key), _CRLF)
        if status == 101:
            if not req.upgrade:
                raise UnexpectedUpgrade
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, _CRLF, _CRLF)
            assert self.transport is not None
            self.transport.write(b"".join(out))
            self._resp_head_sent = True
            return
        if framing is Framing.NONE:
            if content_length is not None and status != 204:
                out += (b"Content-Length: ", content_length, _CRLF)
        elif framing is Framing.LENGTH:
            assert content_length is not None
            out += (b"Content-Length: ", content_length, _CRLF)
        elif req.http11:
            self._resp_chunked = True
            out.append(b"Transfer-Encoding: chunked\r\n")
        else:
            client_keep_alive = False
        if not client_keep_alive:
            out.append(b"Connection: close\r\n")
        elif not req.http11:
            out.append(b"Connection: keep-alive\r\n")
        self._resp_keep_alive = client_keep_alive
        out.append(_CRLF)
        self._resp_head = b"".join(out)

    def upstream_body(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or self._closed:
            return
        head = self._resp_head
        if head is not None:
            self._resp_head = None
            self._resp_head_sent = True
            if self._resp_chunked:
                transport.writelines((head, b"%x\r\n" % len(data), data, _CRLF))
            else:
                transport.writelines((head, data))
            return
        if self._resp_chunked:
            transport.writelines((b"%x\r\n" % len(data), data, _CRLF))
        else:
            transport.write(data)

    def upstream_complete(self, reusable: bool) -> None:
        upstream, self._upstream = self._upstream, None
        req = self._active
        transport = self.transport
        if self._tunnel:
            self._close()
            return
        if transport is not None and not self._closed:
            head = self._resp_head
            self._resp_head = None
            if head is not None:
                self._resp_head_sent = True
                transport.write(head + _CHUNK_END if self._resp_chunked else head)
            elif self._resp_chunked:
                transport.write(_CHUNK_END)
        if upstream is not None:
            if self._write_paused:
                upstream.resume_reading()
            if reusable and req is not None and req.complete:
                self.ctx.pool.release(upstream)
            else:
                upstream.close()
        self._finish_exchange()

    def upstream_upgraded(self, rest: bytes) -> None:
        transport = self.transport
        upstream = self._upstream
        if transport is None or upstream is None or self._closed:
            return
        self._tunnel = True
        self.ctx.stats.tunnels_open += 1
        self._arm(self.ctx.settings.timeouts.tunnel_idle)
        if rest:
            transport.write(rest)
        pending = self._tunnel_pending or []
        self._tunnel_pending = None
        for chunk in pending:
            upstream.tunnel_write(chunk)
        if self._client_eof:
            upstream.tunnel_eof()  # the client half-closed while the upgrade was on its way
        self._resume(_PAUSE_UPGRADE | _PAUSE_PIPELINE | _PAUSE_DONE)

    def upstream_tunnel_data(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)
            self._arm(self.ctx.settings.timeouts.tunnel_idle)

    def upstream_tunnel_eof(self) -> None:
        """The upstream half-closed the tunnel: pass it on; the tunnel ends once both have."""
        self._upstream_eof = True
        transport = self.transport
        if transport is None or self._closed:
            return
        if self._client_eof:
            self._end_tunnel()
        elif transport.can_write_eof():
            transport.write_eof()

    def _end_tunnel(self) -> None:
        """Both directions are done, or the tunnel idled out: flush and close both ends."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.close(flush=True)  # its pool slot is given back here, not when the client goes
        self._close()

    def upstream_failed(self, failure: Failure, response_started: bool) -> None:
        conn, self._upstream = self._upstream, None
        req = self._active
        if failure is not Failure.SLOW_BODY:
            self.ctx.stats.upstream_errors[failure.label] += 1
        if req is None or self._closed:
            return
        if self._tunnel or self._resp_head_sent:
            # Part of the response is already with the client: the only honest signal left is
            # to cut the connection, so a truncated body is never taken for a whole one.
            self.abort()
            return
        if (
            failure is Failure.RESET
            and not response_started
            and conn is not None
            and conn.reused
            and not req.retried
            and not req.has_body
            and req.method in _IDEMPOTENT
        ):
            # The pooled connection was closed by the upstream as we reused it: safe to retry once.
            req.retried = True
            self._resp_head = None
            self._acquire(req, fresh=True)
            return
        self._resp_head = None
        if failure is Failure.SLOW_BODY or (failure is Failure.TIMEOUT and req.has_body and not req.complete):
            # The silence (or the drip) was the client's, mid-body: its fault, not the upstream's.
            self.ctx.stats.rejected[408] += 1
            req.keep_alive = False
            self._answer(408, failure.label if failure is Failure.SLOW_BODY else "body-read-timeout", req.decision)
            return
        self._answer(failure.status, failure.label, req.decision)

    def upstream_pause(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def upstream_resume(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    # -- connection control -------------------------------------------------------------------

    def close_if_idle(self) -> None:
        if self._active is None and not self._queue and self._parsing is None:
            self._close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self._closing = True
        self._paused |= _PAUSE_DONE
        self._cancel_timer()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reasons: int) -> None:
        if not self._paused & reasons:
            return
        self._paused &= ~reasons
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.resume_reading()

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
        self._lingering = True
        self._closing = True  # nothing more is parsed or answered on this connection
        self._parsing = None
        self._queue.clear()
        self._awaiting_body = False
        self._linger_left = limits.linger_bytes
        self._linger_end = self.loop.time() + timeouts.linger
        if transport.can_write_eof():
            transport.write_eof()
        if self._paused:
            self._paused = 0
            transport.resume_reading()
        self._arm(timeouts.linger_pause)

    def _discard(self, data: bytes) -> None:
        self._linger_left -= len(data)
        if self._linger_left < 0 or self.loop.time() >= self._linger_end:
            self._close()
            return
        self._arm(self.ctx.settings.timeouts.linger_pause)

    def _on_timer(self) -> None:
        self._timer = None
        if not self._deadline or self._closed:
            return
        now = self.loop.time()
        if now < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            self._timer_at = self._deadline
            return
        if self._tunnel:
            self._end_tunnel()  # idle past --tunnel-idle-timeout: a forgotten tunnel
            return
        if self._lingering:
            self._close()
            return
        req = self._active
        if self._awaiting_body and req is not None and self.transport is not None:
            self._awaiting_body = False
            self.ctx.stats.rejected[408] += 1
            req.keep_alive = False
            self._answer(408, "body-read-timeout", req.decision)
            return
        # Idle keep-alive or a head that never finished (slowloris): close, answering 408 only
        # when a request had begun.
        if self._parsing is not None and self._active is None and self.transport is not None:
            self.ctx.stats.rejected[408] += 1
            self.transport.write(error_response(408, "header-read-timeout", close=True))
        self._close()

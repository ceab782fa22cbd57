"""Upstream side of the hot path: one protocol per upstream TCP connection, and their pools.

An ``UpstreamConnection`` parses exactly one response at a time (strictly, with llhttp) and
reports it to the exchange that owns it, through the ``ExchangeOwner`` contract defined here
(so this module never imports the client side); the ``UpstreamPool`` keeps idle keep-alive connections
per address with a size cap and a bounded wait queue. A connection is reused only when its last
response was framed unambiguously and fully read; anything else (a parse error, stray bytes
while idle, a HEAD response, a timeout) discards it, because a reused connection carrying
leftover bytes would hand one client another client's response.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import socket
from collections.abc import Callable, Hashable
from time import perf_counter
from typing import Any, cast

import httptools

from router import COMPILED, http
from router.errors import Answer
from router.http import TE_CHUNKED, TE_NONE
from router.settings import Limits, Timeouts
from router.stats import RouterStats
from router.table import Target

Address = tuple[str, int]

_scan_response_head: Callable[[bytes], tuple[int, int, int, bytes | None]] = http.scan_response_head
if COMPILED:
    # The C version of the same scan (tests/test_http_rules.py holds the two equal): a response
    # head is scanned per request, and its per-line work is cheaper over raw bytes in C.
    from router import _speedups

    _scan_response_head = _speedups.scan_response_head


class Framing(enum.Enum):
    NONE = 0
    """No body: HEAD responses, 1xx, 204, 304."""
    LENGTH = 1
    CHUNKED = 2
    CLOSE = 3
    """Body delimited by the upstream closing the connection (HTTP/1.0 style)."""


class UnexpectedUpgrade(Exception):
    """The exchange refuses a 101 it did not ask for; the response counts as broken."""


class _HeadDone(Exception):
    """Raised from the parser callback to stop after a bodiless (HEAD) response head."""


class ExchangeOwner:
    """What an upstream connection reports to: the exchange that owns it for one response.

    The whole contract between the two sides of the hot path. This module defines it and never
    imports the client side, which implements it (``router.proxy.ClientConnection``). A base
    class rather than a ``typing.Protocol`` so that, compiled, every report is a native call.

    For one exchange the reports come in this order: ``upstream_ready`` once if the pool had
    to connect or queue (a connection, or None and the failure); then ``upstream_interim`` for
    each 1xx head; ``upstream_head`` for the final head; ``upstream_body`` for each piece of
    body; and ``upstream_complete``. ``upstream_failed`` may come instead at any point, after
    which nothing more is reported. After a 101, ``upstream_upgraded`` and then
    ``upstream_tunnel_data`` / ``upstream_tunnel_eof`` until the tunnel ends with
    ``upstream_complete`` (a clean close) or ``upstream_failed`` (a reset).
    ``upstream_pause`` / ``upstream_resume`` may come at any time: the upstream's write buffer
    is full / has drained, so the owner should stop / restart sending it request body bytes.
    """

    def upstream_ready(self, conn: UpstreamConnection | None, failure: Answer | None) -> None:
        """The connection ``acquire`` could not give at once: connected, or None and why not.
        A connection handed over here belongs to the owner, who must release it."""
        raise NotImplementedError

    def upstream_interim(self, status: int, head: bytes) -> None:
        """A 1xx head other than 101, as received (llhttp validated it)."""
        raise NotImplementedError

    def upstream_head(self, status: int, head: bytes, passthrough: bytes | None, framing: Framing) -> None:
        """The final head as received, and the same ready to forward unchanged when only plain
        keep-alive fields had to go (else None); ``framing`` says how the body is delimited.
        Raising ``UnexpectedUpgrade`` refuses a 101 the owner did not ask for."""
        raise NotImplementedError

    def upstream_body(self, data: bytes) -> None:
        raise NotImplementedError

    def upstream_complete(self, reusable: bool) -> None:
        """The response ended; the connection is no longer this owner's. ``reusable``: whether
        its framing allows another exchange (the owner decides whether to release it)."""
        raise NotImplementedError

    def upstream_failed(self, failure: Answer, response_started: bool) -> None:
        """The exchange failed (the connection is closed already); ``response_started``:
        whether bytes of a response had arrived."""
        raise NotImplementedError

    def upstream_upgraded(self, rest: bytes) -> None:
        """A 101 arrived: the connection is a tunnel now; ``rest`` came after its head."""
        raise NotImplementedError

    def upstream_tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def upstream_tunnel_eof(self) -> None:
        """The upstream half-closed the tunnel; it may still read what the client sends."""
        raise NotImplementedError

    def upstream_pause(self) -> None:
        raise NotImplementedError

    def upstream_resume(self) -> None:
        raise NotImplementedError


class ForwardedOwner(ExchangeOwner):
    """An ``ExchangeOwner`` that passes every report to ``owner``, any object with the same
    methods: compiled, a native class cannot be subclassed by an interpreted one, and the
    HTTP/2 front end's streams (``router.http2``) are interpreted."""

    def __init__(self, owner: Any) -> None:
        self.owner = owner

    def upstream_ready(self, conn: UpstreamConnection | None, failure: Answer | None) -> None:
        self.owner.upstream_ready(conn, failure)

    def upstream_interim(self, status: int, head: bytes) -> None:
        self.owner.upstream_interim(status, head)

    def upstream_head(self, status: int, head: bytes, passthrough: bytes | None, framing: Framing) -> None:
        self.owner.upstream_head(status, head, passthrough, framing)

    def upstream_body(self, data: bytes) -> None:
        self.owner.upstream_body(data)

    def upstream_complete(self, reusable: bool) -> None:
        self.owner.upstream_complete(reusable)

    def upstream_failed(self, failure: Answer, response_started: bool) -> None:
        self.owner.upstream_failed(failure, response_started)

    def upstream_upgraded(self, rest: bytes) -> None:
        self.owner.upstream_upgraded(rest)

    def upstream_tunnel_data(self, data: bytes) -> None:
        self.owner.upstream_tunnel_data(data)

    def upstream_tunnel_eof(self) -> None:
        self.owner.upstream_tunnel_eof()

    def upstream_pause(self) -> None:
        self.owner.upstream_pause()

    def upstream_resume(self) -> None:
        self.owner.upstream_resume()


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "pool",
        "home",
        "transport",
        "owner",
        "reused",
        "idle_since",
        "last_io",
        "idle_limit",
        "_parser",
        "_feed",
        "_loop",
        "_clock",
        "_timeouts",
        "_max_head",
        "_status",
        "_framing",
        "_head_buf",
        "_collecting",
        "_length",
        "_body_seen",
        "_raw_remaining",
        "_keep_alive",
        "_started",
        "_head_request",
        "_head_done",
        "_tunnel",
        "_broken",
        "_timer",
        "_timer_at",
        "_closed",
        "_counted",
        "_min_rate",
        "_rate_base",
        "_body_sent",
        "_paused_at",
        "_sent_at",
        "_stats",
    )

    def __init__(self, pool: UpstreamPool, home: _AddressPool | None = None) -> None:
        self.pool = pool
        self.home = home
        """The per-address pool this connection counts towards (None: made outside the pool)."""
        self.transport: asyncio.Transport | None = None
        self.owner: ExchangeOwner | None = None
        self.reused = False
        self.idle_since = 0.0
        self.last_io = 0.0
        self.idle_limit = pool.timeouts.upstream_response
        """Longest silence allowed now: the body-idle timeout while the client is still sending
        its body, the upstream response timeout once the request is complete."""
        self._loop = pool.loop
        self._clock = pool.clock
        self._timeouts = pool.timeouts
        self._max_head = pool.limits.max_header_bytes + pool.limits.max_request_line
        self._parser = httptools.HttpResponseParser(self)
        self._feed = self._parser.feed_data
        self._status = 0
        self._framing = Framing.CLOSE
        self._head_buf = b""
        """Bytes of the response head being received, from its first byte: heads are forwarded
        from these raw bytes, so the parser needs no per-header callbacks."""
        self._collecting = False
        self._started = False
        self._head_request = False
        self._head_done = False
        self._tunnel = False
        self._broken = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        """When ``_timer`` fires: kept here because TimerHandle.when() is a method call."""
        self._closed = False
        self._length = -1
        self._body_seen = 0
        self._raw_remaining = 0
        """Body bytes still to come of a Content-Length response being passed through unparsed."""
        self._keep_alive = False
        self._counted = True
        """Whether the pool still counts this connection towards its address's cap."""
        self._min_rate = float(pool.limits.body_min_rate)
        self._rate_base = 0.0
        """While a request body is being sent: when the body would be due at zero bytes (its
        start plus the body-idle grace, moved on by time we paused the client for backpressure);
        ``_body_sent / _min_rate`` seconds are added to it. 0 when no body is pending."""
        self._body_sent = 0
        self._paused_at = 0.0
        self._sent_at = 0.0
        """When the request head was written (perf_counter): the response-head time starts here."""
        self._stats = pool.stats

    # -- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        transport = self.transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        if owner is None:
            # Bytes while idle: the upstream broke framing (or is closing); never reuse.
            self._broken = True
            self.close()
            return
        self.last_io = self._clock()
        self._started = True  # a response has begun (no on_message_begin callback: one call less)
        if self._raw_remaining:
            self._pass_body(owner, data)
            return
        if self._tunnel:
            owner.upstream_tunnel_data(data)
            return
        if self._collecting:
            buf = self._head_buf = self._head_buf + data if self._head_buf else data
            if len(buf) > self._max_head and buf.find(b"\r\n\r\n", 0, self._max_head) < 0:
                self._fail(Answer.BAD_RESPONSE)
                return
        try:
            self._feed(data)
        except httptools.HttpParserUpgrade as exc:
            if self._status == 101 and self.owner is not None:
                self._tunnel = True
                self._cancel_timer()
                self.owner.upstream_upgraded(data[exc.args[0] :])
            else:
                self._fail(Answer.BAD_RESPONSE)
        except (_HeadDone, UnexpectedUpgrade, httptools.HttpParserError):
            # httptools may wrap what a callback raised; _head_done says whether it was ours
            # stopping after a bodiless HEAD response, anything else is a broken response.
            if self._head_done:
                self._finish(reusable=False)
            else:
                self._fail(Answer.BAD_RESPONSE)
        else:
            if self._length > 0 and self.owner is not None and not self._collecting:
                remaining = self._length - self._body_seen
                if remaining > 0:
                    # The rest of a Content-Length body is opaque bytes: pass it through as
                    # received instead of through the parser's per-chunk copies. A fresh
                    # parser takes over for the next response.
                    self._raw_remaining = remaining
                    self._keep_alive = self._parser.should_keep_alive()
                    self._length = -1

    def _pass_body(self, owner: ExchangeOwner, data: bytes) -> None:
        remaining = self._raw_remaining
        if len(data) < remaining:
            self._raw_remaining = remaining - len(data)
            owner.upstream_body(data)
            return
        self._raw_remaining = 0
        self._parser = httptools.HttpResponseParser(self)
        self._feed = self._parser.feed_data
        if len(data) == remaining:
            owner.upstream_body(data)
            self._finish(reusable=self._keep_alive)
        else:
            # Bytes beyond the declared length: the upstream broke framing. The client gets
            # exactly the declared body; the connection is never reused.
            owner.upstream_body(data[:remaining])
            self._broken = True
            self._finish(reusable=False)

    def eof_received(self) -> bool | None:
        if self._tunnel and self.owner is not None:
            # A half-close inside a tunnel is a message for the client, not the end of it: the
            # client may still be sending (RFC 9293 3.6).
            self.owner.upstream_tunnel_eof()
            return True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._cancel_timer()
        self.pool.forget(self)
        owner = self.owner
        if owner is None:
            return
        if self._tunnel:
            self.owner = None
            if exc is None:
                owner.upstream_complete(reusable=False)
            else:
                owner.upstream_failed(Answer.UPSTREAM_RESET, True)  # a reset tunnel ends the client's too
        elif self._started and not self._collecting and self._framing is Framing.CLOSE:
            self._finish(reusable=False)
        else:
            self._fail(Answer.UPSTREAM_RESET)

    def pause_writing(self) -> None:
        if self._rate_base:
            self._paused_at = self._clock()  # our backpressure, not the client's slowness
        if self.owner is not None:
            self.owner.upstream_pause()

    def resume_writing(self) -> None:
        if self._paused_at:
            if self._rate_base:
                self._rate_base += self._clock() - self._paused_at
            self._paused_at = 0.0
        if self.owner is not None:
            self.owner.upstream_resume()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        self._status = status
        owner = self.owner
        if owner is None:
            raise UnexpectedUpgrade  # a response nobody asked for: the connection is broken
        buf = self._head_buf
        end, length, coding, passthrough = _scan_response_head(buf)
        if end < 0:
            raise UnexpectedUpgrade  # llhttp saw a whole head that we cannot find: never forward it
        head = buf[:end] if end < len(buf) else buf
        if 100 <= status < 200 and status != 101:
            self._head_buf = buf[end:]  # the final response's head starts right after
            owner.upstream_interim(status, head)
            return
        self._collecting = False
        self._head_buf = b""
        self._stats.upstream_head.observe(perf_counter() - self._sent_at)
        if self._head_request or status in (204, 304):
            framing = Framing.NONE
        elif coding != TE_NONE:
            # llhttp accepted it, so chunked is last if present; otherwise the body runs to close.
            framing = Framing.CHUNKED if coding == TE_CHUNKED else Framing.CLOSE
        elif length >= 0:
            framing = Framing.LENGTH
            self._length = length
            self._body_seen = 0
        else:
            framing = Framing.CLOSE
        self._framing = framing
        owner.upstream_head(status, head, passthrough, framing)
        if self._head_request:
            self._head_done = True
            raise _HeadDone

    def on_body(self, body: bytes) -> None:
        self._body_seen += len(body)
        if self.owner is not None:
            self.owner.upstream_body(body)

    def on_message_complete(self) -> None:
        self._length = -1
        if self._status < 200:
            return  # an interim (1xx) response; the final one follows on the same connection
        if self._status == 101:
            return  # HttpParserUpgrade follows and switches the connection to a tunnel
        self._finish(reusable=self._parser.should_keep_alive())

    # -- exchange control -----------------------------------------------------------------------

    def start(self, owner: ExchangeOwner, head: bytes, is_head_request: bool, body_pending: bool) -> None:
        """Send a request head on this connection; responses now go to ``owner``."""
        assert self.transport is not None
        self._sent_at = perf_counter()
        self.owner = owner
        self._head_request = is_head_request
        self._head_done = False
        self._started = False
        self._framing = Framing.CLOSE
        self._status = 0
        self._collecting = True
        self._head_buf = b""
        now = self._clock()
        self.last_io = now
        self.idle_limit = self._timeouts.body_idle if body_pending else self._timeouts.upstream_response
        deadline = now + self.idle_limit
        if body_pending and self._min_rate:
            # (Otherwise _rate_base is already 0: request_sent() ended the last body's clock.)
            self._rate_base = deadline
            self._body_sent = 0
        timer = self._timer
        if timer is None or self._timer_at > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
        self.transport.write(head)

    def request_sent(self) -> None:
        """The whole request is on the wire: from now on only the upstream can be slow."""
        self.idle_limit = self._timeouts.upstream_response
        self.last_io = self._clock()
        self._rate_base = 0.0

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.last_io = self._clock()
        self._body_sent += len(data)
        self.transport.write(data)

    def tunnel_write(self, data: bytes) -> None:
        if self.transport is not None and not self._closed:
            self.transport.write(data)

    def tunnel_eof(self) -> None:
        """The client half-closed its side of the tunnel: pass the FIN on once our buffer drains."""
        transport = self.transport
        if transport is not None and not self._closed and transport.can_write_eof():
            transport.write_eof()


    def pause_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self._closed:
            self.transport.resume_reading()

    def detach(self) -> None:
        """The owner gives up mid-exchange (client gone): framing is unknown, so close."""
        self.owner = None
        self.close()

    def close(self, flush: bool = False) -> None:
        """Close now (buffered bytes dropped: the framing is unknown), or with ``flush`` after
        what is buffered has gone out (a tunnel whose both directions are done)."""
        self._cancel_timer()
        self.owner = None
        if self.transport is not None and not self._closed:
            self._closed = True
            if flush:
                self.transport.close()
            else:
                self.transport.abort()
            self.pool.forget(self)

    @property
    def usable(self) -> bool:
        return not self._closed and not self._broken

    def _finish(self, reusable: bool) -> None:
        # The timer is left running: it finds no owner and stops, or finds the next exchange
        # and re-arms, so a busy keep-alive connection creates one timer a minute, not one a
        # request.
        owner = self.owner
        self.owner = None
        self._started = False
        if self._head_request or self._closed:
            reusable = False
        if owner is not None:
            owner.upstream_complete(reusable)

    def _fail(self, failure: Answer) -> None:
        owner = self.owner
        started = self._started
        self._broken = True
        self.close()
        if owner is not None:
            owner.upstream_failed(failure, started)

    def _on_timer(self) -> None:
        self._timer = None
        if self.owner is None or self._tunnel:
            return
        deadline = self.last_io + self.idle_limit
        failure = Answer.UPSTREAM_TIMEOUT
        if self._rate_base and not self._paused_at:
            due = self._rate_base + self._body_sent / self._min_rate
            if due < deadline:
                deadline = due
                failure = Answer.SLOW_BODY
        if self._loop.time() < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)
            self._timer_at = deadline
            return
        self._fail(failure)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


class PoolFull(Exception):
    pass


class _AddressPool:
    __slots__ = ("address", "idle", "total", "waiters")

    def __init__(self, address: Address) -> None:
        self.address = address
        self.idle: list[UpstreamConnection] = []
        """LIFO: the most recently used connection is the least likely to have been closed."""
        self.total = 0
        self.waiters: collections.deque[ExchangeOwner] = collections.deque()


class UpstreamPool:
    """Keep-alive connections per upstream address, capped, with a bounded wait queue."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        timeouts: Timeouts,
        limits: Limits,
        stats: RouterStats,
    ) -> None:
        self.loop = loop
        self.clock: Callable[[], float] = loop.time
        """The loop's clock as a bound method: compiled, calling it skips a method lookup per read."""
        self.timeouts = timeouts
        self.limits = limits
        self.stats = stats
        self._pools: dict[Hashable, _AddressPool] = {}
        """By ``Target.pool_key``, i.e. ``(host, port)``."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    def acquire(self, target: Target, waiter: ExchangeOwner, *, fresh: bool = False) -> UpstreamConnection | None:
        """An idle connection now, or None and ``waiter.upstream_ready`` later (connected or failed).

        Raises ``PoolFull`` when the cap and the wait queue are both exhausted.
        """
        pool = self._pools.get(target.pool_key)
        if pool is None:
            pool = self._pools[target.pool_key] = _AddressPool(target.address)
        idle = pool.idle
        if not fresh:
            deadline = self.clock() - self.timeouts.upstream_pool_idle
            while idle:
                conn = idle.pop()
                if conn.usable and conn.idle_since > deadline:
                    conn.reused = True
                    return conn
                conn.close()
        if pool.total < self.limits.upstream_pool_size:
            self._connect(pool, waiter)
            return None
        if len(pool.waiters) >= self.limits.upstream_pool_queue:
            raise PoolFull(pool.address)
        pool.waiters.append(waiter)
        return None

    def withdraw(self, target: Target, waiter: ExchangeOwner) -> bool:
        """Take a waiter out of its address's queue (its client left); whether it was queued."""
        pool = self._pools.get(target.pool_key)
        if pool is None or waiter not in pool.waiters:
            return False
        pool.waiters.remove(waiter)
        return True

    def release(self, conn: UpstreamConnection) -> None:
        """Return a connection whose last exchange ended cleanly."""
        pool = conn.home
        if pool is None or not conn.usable or self._closing:
            conn.close()
            return
        if pool.waiters:
            waiter = pool.waiters.popleft()
            conn.reused = True
            # Called soon, not now: the releasing connection may still be inside feed_data.
            self.loop.call_soon(waiter.upstream_ready, conn, None)
            return
        conn.idle_since = conn.last_io  # its last response just ended: no clock read needed
        pool.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.timeouts.upstream_pool_idle, self._sweep)

    def forget(self, conn: UpstreamConnection) -> None:
        """A connection closed (either side): drop it and let a waiter have its slot."""
        pool = conn.home
        if pool is None or not conn._counted:
            return
        conn._counted = False
        if conn in pool.idle:
            pool.idle.remove(conn)
        pool.total -= 1
        self.stats.upstream_connections -= 1
        if pool.waiters and pool.total < self.limits.upstream_pool_size and not self._closing:
            self._connect(pool, pool.waiters.popleft())

    def _connect(self, pool: _AddressPool, waiter: ExchangeOwner) -> None:
        pool.total += 1
        self.stats.upstream_connections += 1
        task = self.loop.create_task(self._open(pool, waiter), name=f"upstream-connect {pool.address}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _open(self, pool: _AddressPool, waiter: ExchangeOwner) -> None:
        address = pool.address
        began = perf_counter()
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self, pool), *address),
                self.timeouts.upstream_connect,
            )
        except asyncio.CancelledError:
            pool.total -= 1
            self.stats.upstream_connections -= 1
            raise
        except (TimeoutError, OSError) as exc:
            pool.total -= 1
            self.stats.upstream_connections -= 1
            failure = Answer.UPSTREAM_TIMEOUT if isinstance(exc, asyncio.TimeoutError) else Answer.UPSTREAM_CONNECT
            waiter.upstream_ready(None, failure)
            return
        self.stats.upstream_connect.observe(perf_counter() - began)
        waiter.upstream_ready(conn, None)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self.loop.time() - self.timeouts.upstream_pool_idle
        remaining = False
        for pool in self._pools.values():
            for conn in [c for c in pool.idle if c.idle_since <= deadline]:
                conn.close()
            remaining = remaining or bool(pool.idle)
        if remaining:
            self._sweeper = self.loop.call_later(self.timeouts.upstream_pool_idle, self._sweep)

    def idle_count(self, address: Address) -> int:
        pool = self._pools.get(address)  # equal to the Target.pool_key tuple it was filed under
        return len(pool.idle) if pool else 0

    def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for pool in self._pools.values():
            for conn in list(pool.idle):
                conn.close()
        for task in list(self._tasks):
            task.cancel()

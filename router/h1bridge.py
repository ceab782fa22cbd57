"""One HTTP/1.1 request carried to an h2c upstream: the bridge between the two protocols.

An HTTP/1.1 client may call a service whose route says ``protocol: h2c``. The client connection
(``router.proxy.ClientConnection``) hands such an exchange to an ``H1Bridge``, which opens a stream
in the ``H2Pool`` with the plan's forwarded head as HTTP/2 fields, passes the request body on
within the upstream's windows, and reports the response back to the connection through the same
``ExchangeOwner`` calls an HTTP/1.1 upstream makes (a rebuilt head with its framing, body pieces,
the end), so the connection's relay writes it: keep-alive, HEAD, chunking and HTTP/1.0 behave as
for any upstream. Response trailers are dropped (HTTP/1.1 clients rarely accept them); gRPC,
which needs them end to end, is refused before any stream opens. Only this module speaks both
protocols; it holds no state beyond one exchange.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from router.errors import Answer
from router.h2upstream import H2Pool, H2StreamOwner, H2Upstream, Headers, request_fields
from router.request import Plan
from router.table import Target
from router.upstream import Framing

if TYPE_CHECKING:  # (the client side imports this module)
    from router.proxy import ClientConnection

__all__ = ["H1Bridge", "make_bridge"]

_BODYLESS_STATUS = frozenset({204, 304})


def is_grpc(fields: Headers) -> bool:
    """A gRPC call (its content type), which cannot cross to HTTP/1.1 semantics and back."""
    for name, value in fields:
        if name == b"content-type":
            return value[:16] == b"application/grpc"
    return False


def response_head(status: int, headers: Headers, head_only: bool, ended: bool) -> tuple[bytes, Framing]:
    """An h2c response head as an HTTP/1.1 head and its body's framing, for the relay to rebuild.

    A body of unknown length is CHUNKED (the relay ends it at the connection's close for an
    HTTP/1.0 client); a head that ended the stream promises an empty body."""
    out = [b"HTTP/1.1 %d \r\n" % status]
    length = False
    for name, value in headers:
        if name[:1] == b":":
            continue
        if name == b"content-length":
            length = True
        out += (name, b": ", value, b"\r\n")
    if head_only or status in _BODYLESS_STATUS:
        framing = Framing.NONE
    elif length:
        framing = Framing.LENGTH
    elif ended:
        out.append(b"content-length: 0\r\n")
        framing = Framing.LENGTH
    else:
        framing = Framing.CHUNKED
    out.append(b"\r\n")
    return b"".join(out), framing


def make_bridge(owner: ClientConnection, pool: H2Pool, target: Target, plan: Plan) -> H1Bridge | None:
    """The bridge for this exchange (``start`` opens its stream), or None for a gRPC call, which
    the caller refuses."""
    fields = request_fields(plan, False)
    if is_grpc(fields):
        return None
    return H1Bridge(owner, pool, target, plan, fields)


class H1Bridge(H2StreamOwner):
    """One exchange of an HTTP/1.1 client with an h2c upstream stream."""

    def __init__(self, owner: ClientConnection, pool: H2Pool, target: Target, plan: Plan, fields: Headers) -> None:
        self.owner = owner
        self.pool = pool
        self.target = target
        self.head_only = plan.method == b"HEAD"
        self.fields = fields
        self.conn: H2Upstream | None = None
        self.stream_id = 0
        self.waiting = True
        self.held: list[bytes] = []
        self.ended = False
        """The request body has ended (or there is none)."""
        self.done = False
        self.responded = False
        self.acks = 0
        """Response bytes not yet acknowledged to the upstream: the client is not reading."""
        self.paused = False
        self.saturated = False
        self.bodiless = False
        self.timer: asyncio.TimerHandle | None = None
        self.heard = 0.0
        """When the upstream last sent something of the response (or the request ended)."""
        self.timeout = pool.timeouts.upstream_response

    def start(self, body: list[bytes], complete: bool, has_body: bool) -> None:
        """Open the stream with the body read so far (``complete``: all of it). The owner holds
        the bridge already: a failure may be reported before this returns."""
        self.held = list(body)
        self.bodiless = not has_body
        self.ended = complete or self.bodiless
        self.pool.open(self.target, self, self.fields, self.bodiless)
        if self.ended and not self.done:
            self._arm()

    # -- from the client connection -------------------------------------------------------------

    def body(self, data: bytes) -> None:
        conn = self.conn
        if self.done or not data:
            return
        if conn is None:
            self.held.append(data)
            return
        if not conn.send(self.stream_id, data, False) and not self.saturated:
            self.saturated = True
            self.owner.upstream_pause()

    def end(self) -> None:
        if self.ended or self.done:
            return
        self.ended = True
        if self.conn is not None:
            self.conn.send(self.stream_id, b"", True)
        self._arm()

    def pause(self) -> None:
        """The client's socket is full: stop acknowledging the upstream's bytes."""
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.heard = self.pool.loop.time()  # the upstream's silence counts from here again
        acks, self.acks = self.acks, 0
        if acks and self.conn is not None:
            self.conn.ack(self.stream_id, acks)

    def cancel(self) -> None:
        """The client went away or its request turned out bad: the stream is cancelled."""
        if self.done:
            return
        self._finish()
        if self.conn is not None:
            self.conn.cancel(self.stream_id)
        elif self.waiting:
            self.pool.withdraw(self.target, self)

    # -- from the upstream (router.h2upstream.H2StreamOwner) ------------------------------------

    def h2_ready(self, conn: H2Upstream | None, stream_id: int, failure: Answer | None) -> None:
        self.waiting = False
        if conn is None:
            assert failure is not None
            self.h2_failed(failure)
            return
        if self.done:
            conn.cancel(stream_id)
            return
        self.conn, self.stream_id = conn, stream_id
        held, self.held = self.held, []
        for data in held:
            self.body(data)
        if self.ended and not self.bodiless:
            conn.send(stream_id, b"", True)  # (a bodiless request's HEADERS ended the stream)

    def h2_moved(self, conn: H2Upstream, stream_id: int) -> None:
        if self.done:
            conn.cancel(stream_id)
            return
        self.conn, self.stream_id = conn, stream_id

    def h2_response(self, headers: Headers, ended: bool) -> None:
        if self.done:
            return
        status = 0
        for name, value in headers:
            if name == b":status":
                status = int(value)
                break
        self.responded = True
        self.heard = self.pool.loop.time()
        head, framing = response_head(status, headers, self.head_only, ended)
        self.owner.upstream_head(status, head, None, framing)
        if ended:
            self._complete()
        else:
            self._arm()  # now between pieces of the body

    def h2_data(self, data: bytes, flow_length: int) -> None:
        if self.done:
            return
        self.heard = self.pool.loop.time()
        if data and not self.head_only:
            self.owner.upstream_body(data)
        conn = self.conn
        if conn is not None:
            if self.paused:
                self.acks += flow_length
            else:
                conn.ack(self.stream_id, flow_length)

    def h2_trailers(self, headers: Headers) -> None:
        pass  # dropped: an HTTP/1.1 response carries no trailers here (see the module's docstring)

    def h2_end(self) -> None:
        if self.done:
            return
        if not self.responded:
            self.h2_failed(Answer.BAD_RESPONSE)
            return
        self._complete()

    def h2_reset(self, code: int) -> None:
        self.h2_failed(Answer.UPSTREAM_RESET)

    def h2_failed(self, failure: Answer) -> None:
        if self.done:
            return
        self._finish()
        self.owner.upstream_failed(failure, self.responded)

    def h2_drained(self) -> None:
        if self.saturated:
            self.saturated = False
            self.owner.upstream_resume()

    # -- inside ---------------------------------------------------------------------------------

    def _complete(self) -> None:
        self._finish()
        self.owner.upstream_complete(False)

    def _finish(self) -> None:
        self.done = True
        self._disarm()
        if self.saturated:
            self.saturated = False
            self.owner.upstream_resume()

    def _arm(self) -> None:
        """The response head must come within the response timeout of the request's end, and
        each piece of its body within the same time of the one before (as for HTTP/1.1 upstreams)."""
        if self.timer is None and not self.done:
            self.heard = self.pool.loop.time()
            self.timer = self.pool.loop.call_later(self.timeout, self._timed_out)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        loop = self.pool.loop
        quiet = loop.time() - self.heard
        if quiet < self.timeout or self.paused:
            # Heard from since the timer was set (one timer per exchange, not one per piece), or
            # the silence is our client's: it is not reading, so the upstream's window is shut.
            self.timer = loop.call_later(self.timeout if self.paused else self.timeout - quiet, self._timed_out)
            return
        conn = self.conn
        self._finish()
        if conn is not None:
            conn.cancel(self.stream_id)
        elif self.waiting:
            self.pool.withdraw(self.target, self)
        self.owner.upstream_failed(Answer.UPSTREAM_TIMEOUT, self.responded)

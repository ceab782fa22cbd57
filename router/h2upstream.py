"""Upstream side for HTTP/2 services: multiplexed h2c connections to one upstream, and their pool.

An ``H2Upstream`` is one cleartext HTTP/2 (prior knowledge) connection to a service whose route
says ``protocol: h2c``. It carries many streams at once, each owned by one client stream through
the ``H2StreamOwner`` contract defined here (so this module never imports the front end), and
keeps every stream's request body within the upstream's flow-control windows. The ``H2Pool``
keeps a few such connections per address and opens another only when the ones it has are at
the upstream's ``MAX_CONCURRENT_STREAMS``; streams wait (bounded) while a connection is being
set up. Response bytes are acknowledged to the upstream only when the owner has passed them on,
so a slow client slows the upstream instead of filling the router's memory.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable, Hashable
from typing import Final, cast

from router import COMPILED
from router import h2engine as ev
from router.errors import Answer
from router.h2engine import ErrorCode, ProtocolError, make_engine
from router.request import Plan
from router.settings import Timeouts
from router.table import Target

__all__ = ["HOP_BY_HOP", "H2Pool", "H2StreamOwner", "H2Upstream", "request_fields"]

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"http2-settings"}
)
"""Fields HTTP/2 forbids (RFC 9113 8.2.2): never sent on a stream, whichever side they came from."""


_NOT_FORWARDED: Final = HOP_BY_HOP | {b"host"}
"""Left out of an HTTP/1.1 head made into HTTP/2 fields: ``:authority`` stands for ``host``."""


def head_fields_h2(head: bytes, skip: frozenset[bytes]) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """An HTTP/1.1 request head's target and fields, names lower-cased as HTTP/2 wants them and
    values without surrounding spaces and tabs, those named in ``skip`` left out. The Python
    original of ``router._speedups.head_fields_h2``."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    target = parts[1] if len(parts) > 1 else b""
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.lower()
        if name not in skip:
            fields.append((name, value.strip(b" \t")))
    return target, fields


_head_fields_h2: Callable[[bytes, frozenset[bytes]], tuple[bytes, list[tuple[bytes, bytes]]]] = head_fields_h2
if COMPILED:
    from router import _speedups

    _head_fields_h2 = _speedups.head_fields_h2


def request_fields(plan: Plan, te_trailers: bool) -> Headers:
    """The plan's HTTP/1.1 head (every forwarding rule applied) as an h2c request's fields;
    ``te_trailers``: the client said ``te: trailers``, which gRPC servers require."""
    target, fields = _head_fields_h2(plan.head, _NOT_FORWARDED)
    headers: Headers = [
        (b":method", plan.method),
        (b":scheme", b"http"),
        (b":authority", plan.authority),
        (b":path", target),
        *fields,
    ]
    if te_trailers:
        headers.append((b"te", b"trailers"))
    return headers


_WINDOW = 1 << 20
"""Our receive window per upstream stream and for the connection (the default 64 KiB would
cap one stream's throughput at 64 KiB per round trip)."""
_MAX_CONNECTIONS = 8
"""Connections per upstream address: a new one only when every one is at its stream limit."""
_MAX_WAITERS = 1024
_STREAM_BUFFER = 256 * 1024
"""Request body bytes held per stream for a slow upstream before its client is held back."""


class H2StreamOwner:
    """What an upstream stream reports to: the client stream it serves.

    The order for one stream: ``h2_ready`` (a stream id, or None and the failure); then
    ``h2_response`` once with the final response head (1xx heads are not passed on),
    ``h2_data`` for each piece of body, ``h2_trailers`` at most once, and ``h2_end``; or
    ``h2_reset`` / ``h2_failed`` at any point, after which nothing more is reported.
    ``h2_drained`` says the stream's request body buffer has gone under its limit again.
    """

    def h2_ready(self, conn: H2Upstream | None, stream_id: int, failure: Answer | None) -> None:
        raise NotImplementedError

    def h2_response(self, headers: Headers, ended: bool) -> None:
        """The final response head; ``ended``: it is the whole response (gRPC's trailers-only
        form), and nothing more is reported for the stream."""
        raise NotImplementedError

    def h2_data(self, data: bytes, flow_length: int) -> None:
        """Body bytes; the owner calls ``conn.ack(stream_id, flow_length)`` once it has passed
        them on (immediately, or later when its own client has read them)."""
        raise NotImplementedError

    def h2_trailers(self, headers: Headers) -> None:
        raise NotImplementedError

    def h2_end(self) -> None:
        raise NotImplementedError

    def h2_reset(self, code: int) -> None:
        """The upstream reset the stream (``code`` is the HTTP/2 error code)."""
        raise NotImplementedError

    def h2_failed(self, failure: Answer) -> None:
        """The connection failed under the stream (closed, unparseable, timed out)."""
        raise NotImplementedError

    def h2_drained(self) -> None:
        raise NotImplementedError

    def h2_moved(self, conn: H2Upstream, stream_id: int) -> None:
        """The request was sent again on another stream (the first connection's graceful GOAWAY
        came before the upstream saw it); what follows comes from there. Until this is reported,
        the owner sends to the first stream as before: what it sends joins the request."""
        raise NotImplementedError


class _Out:
    """One stream's request body waiting for the upstream's window."""

    __slots__ = ("chunks", "size", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.end = False
        self.trailers: Headers | None = None


_REPLAY_LIMIT = 64 * 1024
"""Request body bytes kept per stream until its response head, so that a stream the upstream
never saw (above the last stream id of its graceful GOAWAY) can be sent again elsewhere."""


class _Replay:
    """A request as sent so far: head, body, end. Dropped when the response head arrives."""

    __slots__ = ("headers", "chunks", "size", "ended", "trailers", "retryable", "started", "attempts", "left")

    def __init__(self, headers: Headers, ended: bool) -> None:
        self.headers = headers
        self.chunks: list[bytes] = []
        self.size = 0
        self.ended = ended
        self.trailers: Headers | None = None
        self.retryable = True
        self.started = False
        """Given to an owner once already: a replay reports ``h2_moved``, not ``h2_ready``."""
        self.attempts = 0
        self.left: tuple[H2Upstream, int] | None = None
        """The connection and stream it was taken from to be sent again, until it is: its owner
        still sends there (``H2Upstream.moved``)."""

    def keep(self, data: bytes) -> None:
        if self.retryable:
            self.size += len(data)
            if self.size > _REPLAY_LIMIT:
                self.retryable = False
                self.chunks = []
            else:
                self.chunks.append(data)

    def hold(self, data: bytes, end: bool) -> bool:
        """Body that came while the request waits to be sent again: all of it is kept (there is
        no other copy); False once that is a stream's buffer, so that its owner stops reading."""
        if data:
            self.chunks.append(data)
            self.size += len(data)
        self.ended = self.ended or end
        return self.size < _STREAM_BUFFER

    def settle(self) -> None:
        """Sent again, or given up: its owner stops sending to the stream it was taken from."""
        if self.left is not None:
            conn, stream_id = self.left
            self.left = None
            conn.moved.pop(stream_id, None)


class H2Upstream(asyncio.Protocol):
    """One h2c connection to an upstream, multiplexing the streams of many client streams."""

    def __init__(self, pool: H2Pool, key: Hashable) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.h2 = make_engine(
            True, max_header_list=1 << 16, stream_window=_WINDOW, connection_window=_WINDOW, engine=pool.engine
        )
        self.owners: dict[int, H2StreamOwner] = {}
        self.out: dict[int, _Out] = {}
        self.replays: dict[int, _Replay] = {}
        self.ready = False
        """The upstream's SETTINGS arrived: its stream limit is known."""
        self.closed = False
        self.write_paused = False
        self._flush_pending = False
        self.going_away = False
        """The upstream sent a graceful GOAWAY: streams in flight finish, no new ones start."""
        self.moved: dict[int, _Replay] = {}
        """Requests taken from here to be sent again whose owners have not yet heard where
        (``h2_moved``): what an owner sends here meanwhile is added to its request, else it is
        lost, and the upstream waits for the rest of a request that never comes. Kept after the
        connection closes (the owners still send here)."""

    # -- asyncio protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pool.connected(self)
        self._flush()  # the client preface and our SETTINGS

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive(data)
        except ProtocolError:
            self._fail(Answer.BAD_RESPONSE)
            return
        owners = self.owners
        for event in events:
            kind = type(event)
            if kind is ev.DataReceived:
                data_event = cast(ev.DataReceived, event)
                owner = owners.get(data_event.stream_id)
                if owner is not None:
                    owner.h2_data(data_event.data, data_event.flow_length)
                    if data_event.ended and self._forget(data_event.stream_id) is not None:
                        owner.h2_end()
                elif data_event.flow_length:
                    self.h2.consume(data_event.stream_id, data_event.flow_length)
            elif kind is ev.ResponseReceived:
                response = cast(ev.ResponseReceived, event)
                self.replays.pop(response.stream_id, None)
                if response.ended:
                    # Trailers-only (a gRPC error): the head is the whole response.
                    owner = self._forget(response.stream_id)
                    if owner is not None:
                        owner.h2_response(response.headers, True)
                    continue
                owner = owners.get(response.stream_id)
                if owner is not None:
                    owner.h2_response(response.headers, False)
            elif kind is ev.TrailersReceived:
                owner = self._forget(event.stream_id)
                if owner is not None:
                    owner.h2_trailers(cast(ev.TrailersReceived, event).headers)
                    owner.h2_end()
            elif kind is ev.StreamEnded:
                owner = self._forget(event.stream_id)
                if owner is not None:
                    owner.h2_end()
            elif kind is ev.StreamReset:
                code = cast(ev.StreamReset, event).code
                replay = self.replays.get(event.stream_id)
                owner = self._forget(event.stream_id)
                if owner is None:
                    continue
                if code == ErrorCode.REFUSED_STREAM and replay is not None and replay.retryable:
                    # Refused: the upstream did not process it (RFC 9113 8.7), so it may go again
                    # (how nghttp2 reports the streams above a GOAWAY's last stream id, too).
                    self._requeue(event.stream_id, owner, replay)
                else:
                    owner.h2_reset(code)
            elif kind is ev.WindowUpdated:
                if event.stream_id:
                    self._pump(event.stream_id)
                else:
                    for stream_id in list(self.out):
                        self._pump(stream_id)
            elif kind is ev.RemoteSettingsChanged:
                if not self.ready:
                    self.ready = True
                    self.pool.became_ready(self)
                else:
                    for stream_id in list(self.out):
                        self._pump(stream_id)
                    self.pool.capacity_freed(self)
            elif kind is ev.ConnectionTerminated:
                terminated = cast(ev.ConnectionTerminated, event)
                if terminated.code != ErrorCode.NO_ERROR:
                    self._fail(Answer.UPSTREAM_RESET)
                    return
                # A graceful GOAWAY (nginx sends one every http2_max_requests): no new streams
                # here; those the upstream took finish, those above its last one were never seen
                # and go again elsewhere (or fail, when their request was too big to keep).
                self.going_away = True
                self.pool.forget(self)
                for stream_id in [sid for sid in owners if sid > terminated.last_stream_id]:
                    replay = self.replays.get(stream_id)
                    unseen = self._forget(stream_id)
                    if unseen is None:
                        continue
                    if replay is not None and replay.retryable:
                        self._requeue(stream_id, unseen, replay)  # never seen: safe to send again
                    else:
                        unseen.h2_failed(Answer.UPSTREAM_RESET)
                if not owners:
                    self.close()
                    return
        self._flush()

    def eof_received(self) -> bool | None:
        self._fail(Answer.UPSTREAM_RESET)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(Answer.UPSTREAM_RESET)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream_id in list(self.out):
            self._pump(stream_id)
        self._flush()

    # -- what the pool and the client streams call -------------------------------------------

    @property
    def capacity(self) -> int:
        if self.closed or not self.ready or self.going_away:
            return 0
        return self.h2.peer_max_streams - len(self.owners)

    def open(self, owner: H2StreamOwner, replay: _Replay) -> int:
        """Start a stream with the request so far; the owner receives what comes back."""
        replay.settle()
        sent_whole = replay.ended and not replay.chunks and replay.trailers is None
        stream_id = self.h2.request(replay.headers, sent_whole)
        self.owners[stream_id] = owner
        self.replays[stream_id] = replay
        if replay.chunks or (replay.ended and not sent_whole):
            out = self.out[stream_id] = _Out()
            out.chunks.extend(replay.chunks)
            out.size = replay.size
            out.end = replay.ended
            out.trailers = replay.trailers
            self._pump(stream_id)
        self.flush_soon()
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool) -> bool:
        """Queue request body bytes; False when the stream's buffer is over its limit (the
        owner stops reading its client until ``h2_drained``)."""
        out = self.out.get(stream_id)
        if out is None:
            waiting = self.moved.get(stream_id)
            if waiting is not None:
                return waiting.hold(data, end)
            out = self.out[stream_id] = _Out()
        if data:
            out.chunks.append(data)
            out.size += len(data)
        out.end = out.end or end
        replay = self.replays.get(stream_id)
        if replay is not None:
            replay.keep(data)
            replay.ended = replay.ended or end
        self._pump(stream_id)
        self.flush_soon()
        return out.size < _STREAM_BUFFER if stream_id in self.out else True

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        out = self.out.get(stream_id)
        if out is None:
            waiting = self.moved.get(stream_id)
            if waiting is not None:
                waiting.trailers = trailers
                waiting.ended = True
                return
            out = self.out[stream_id] = _Out()
        out.trailers = trailers
        out.end = True
        replay = self.replays.get(stream_id)
        if replay is not None:
            replay.trailers = trailers
            replay.ended = True
        self._pump(stream_id)
        self.flush_soon()

    def ack(self, stream_id: int, length: int) -> None:
        if length and not self.closed:
            self.h2.consume(stream_id, length)
            self.flush_soon()

    def cancel(self, stream_id: int) -> None:
        """The client gave up on the stream: reset it upstream (CANCEL)."""
        if self._forget(stream_id) is None or self.closed:
            return
        self.h2.reset(stream_id, ErrorCode.CANCEL)
        self.flush_soon()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.h2.goaway(ErrorCode.NO_ERROR)
            self.transport.write(self.h2.output())
            self.transport.close()
        self._fail(Answer.UPSTREAM_RESET)

    # -- inside ---------------------------------------------------------------------------------

    def _pump(self, stream_id: int) -> None:
        out = self.out.get(stream_id)
        if out is None or self.closed:
            return
        engine = self.h2
        was_over = out.size >= _STREAM_BUFFER
        while out.chunks:
            window = engine.send_window(stream_id)
            if window <= 0:
                break
            chunk = out.chunks[0]
            if len(chunk) <= window:
                out.chunks.popleft()
                engine.send_data(stream_id, chunk)
                out.size -= len(chunk)
            else:
                out.chunks[0] = chunk[window:]
                engine.send_data(stream_id, chunk[:window])
                out.size -= window
        if not out.chunks and out.end:
            del self.out[stream_id]
            if out.trailers is not None:
                engine.send_trailers(stream_id, out.trailers)
            else:
                engine.end_stream(stream_id)
        if was_over and out.size < _STREAM_BUFFER:
            owner = self.owners.get(stream_id)
            if owner is not None:
                owner.h2_drained()

    def _requeue(self, stream_id: int, owner: H2StreamOwner, replay: _Replay) -> None:
        """Send the request again elsewhere (the upstream never saw it); what its owner sends
        here until it hears where joins it."""
        self.moved[stream_id] = replay
        replay.left = (self, stream_id)
        self.pool.replay(self.key, owner, replay)

    def _forget(self, stream_id: int) -> H2StreamOwner | None:
        self.out.pop(stream_id, None)
        self.replays.pop(stream_id, None)
        owner = self.owners.pop(stream_id, None)
        if owner is not None:
            if self.going_away:
                if not self.owners:
                    self.pool.loop.call_soon(self.close)  # the last stream it took has ended
            else:
                self.pool.capacity_freed(self)
        return owner

    def flush_soon(self) -> None:
        """Write what the engine has queued once this turn of the loop is done: the heads and
        bodies of many client streams leave in one write."""
        if not self._flush_pending:
            self._flush_pending = True
            self.pool.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        transport = self.transport
        if transport is not None and not self.closed:
            data = self.h2.output()
            if data:
                transport.write(data)

    def _fail(self, failure: Answer) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        owners, self.owners = self.owners, {}
        self.out = {}
        self.replays = {}
        for owner in owners.values():
            owner.h2_failed(failure)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()  # (a close() already under way keeps its GOAWAY)


class _Address:
    __slots__ = ("conns", "connecting", "waiters")

    def __init__(self) -> None:
        self.conns: list[H2Upstream] = []
        self.connecting = 0
        self.waiters: collections.deque[tuple[H2StreamOwner, _Replay]] = collections.deque()


class H2Pool:
    """h2c connections per upstream address, opened on demand and shared by streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeouts: Timeouts) -> None:
        self.loop = loop
        self.timeouts = timeouts
        self.engine: str | None = None
        """The HTTP/2 engine to use (``RouterSettings.http2_engine``; None: the best available)."""
        self._addresses: dict[Hashable, _Address] = {}
        self._targets: dict[Hashable, Target] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self.opened = 0
        """Connections opened so far (each upstream's GOAWAY makes the next one open)."""

    def open(self, target: Target, owner: H2StreamOwner, headers: Headers, end_stream: bool) -> None:
        """Open a stream for ``owner`` on a connection with room, now or once one is ready;
        ``owner.h2_ready`` says which (or why not)."""
        key = target.pool_key
        if key not in self._addresses:
            self._addresses[key] = _Address()
            self._targets[key] = target
        self._start(key, owner, _Replay(headers, end_stream))

    def replay(self, key: Hashable, owner: H2StreamOwner, replay: _Replay) -> None:
        """Send a request the upstream never saw again, on another connection (three times at
        most: an upstream that refuses everything gets its failure reported)."""
        replay.attempts += 1
        if replay.attempts > 3:
            replay.settle()
            owner.h2_failed(Answer.UPSTREAM_RESET)
            return
        self._start(key, owner, replay)

    def _start(self, key: Hashable, owner: H2StreamOwner, replay: _Replay) -> None:
        address = self._addresses[key]
        for conn in address.conns:
            if conn.capacity > 0:
                self._hand(conn, owner, replay)
                return
        if len(address.waiters) >= _MAX_WAITERS:
            owner.h2_ready(None, 0, Answer.POOL_FULL)
            return
        address.waiters.append((owner, replay))
        if address.connecting == 0 and len(address.conns) < _MAX_CONNECTIONS:
            address.connecting += 1
            task = self.loop.create_task(self._connect(key, self._targets[key]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _hand(conn: H2Upstream, owner: H2StreamOwner, replay: _Replay) -> None:
        stream_id = conn.open(owner, replay)
        if replay.started:
            owner.h2_moved(conn, stream_id)
        else:
            replay.started = True
            owner.h2_ready(conn, stream_id, None)

    def withdraw(self, target: Target, owner: H2StreamOwner) -> None:
        """A waiting owner gave up (its client reset the stream)."""
        address = self._addresses.get(target.pool_key)
        if address is not None:
            for waiter in address.waiters:
                if waiter[0] is owner:
                    address.waiters.remove(waiter)
                    return

    async def _connect(self, key: Hashable, target: Target) -> None:
        address = self._addresses[key]
        try:
            try:
                _, protocol = await asyncio.wait_for(
                    self.loop.create_connection(lambda: H2Upstream(self, key), target.host, target.port),
                    self.timeouts.upstream_connect,
                )
            except TimeoutError:
                self._fail_waiters(address, Answer.UPSTREAM_TIMEOUT)
                return
            except OSError:
                self._fail_waiters(address, Answer.UPSTREAM_CONNECT)
                return
            conn: H2Upstream = protocol
            self.opened += 1
            if self._closing:
                conn.close()
                return
            # (Listed already, by ``connected``.) Streams are handed out once the upstream's
            # SETTINGS arrive (became_ready); an upstream that never sends them fails its
            # waiters at the connect deadline.
            self.loop.call_later(self.timeouts.upstream_connect, self._settings_deadline, conn)
        finally:
            address.connecting -= 1
        if conn.ready:
            # A busy loop runs the connection's callbacks before this task resumes: its SETTINGS,
            # and even its graceful GOAWAY, may have come already. The streams that GOAWAY sent
            # back queued behind this connect (``connecting``), and nothing else would open the
            # next connection for them.
            self.capacity_freed(conn)

    def _settings_deadline(self, conn: H2Upstream) -> None:
        if not conn.ready and not conn.closed:
            address = self._addresses.get(conn.key)
            conn.close()
            if address is not None:
                self._fail_waiters(address, Answer.UPSTREAM_TIMEOUT)

    def _fail_waiters(self, address: _Address, failure: Answer) -> None:
        waiters, address.waiters = address.waiters, collections.deque()
        for owner, replay in waiters:
            replay.settle()
            owner.h2_ready(None, 0, failure)

    def connected(self, conn: H2Upstream) -> None:
        """List a connection as soon as its socket is up (``connection_made``), not when
        ``_connect`` resumes: on a busy loop the upstream's SETTINGS can be read first, and
        ``became_ready`` then hands out only the streams waiting so far. A stream arriving between
        found no connection and queued behind a connect already done, with nothing left to hand
        it out (nor to open another connection once this one went away): it waited out its
        deadline."""
        address = self._addresses.get(conn.key)
        if address is not None:
            address.conns.append(conn)

    def became_ready(self, conn: H2Upstream) -> None:
        self.capacity_freed(conn)

    def capacity_freed(self, conn: H2Upstream) -> None:
        address = self._addresses.get(conn.key)
        if address is None:
            return
        while address.waiters and conn.capacity > 0:
            owner, replay = address.waiters.popleft()
            self._hand(conn, owner, replay)
        if address.waiters and address.connecting == 0 and len(address.conns) < _MAX_CONNECTIONS:
            # Every connection is at the upstream's stream limit: open one more.
            address.connecting += 1
            task = self.loop.create_task(self._connect(conn.key, self._targets[conn.key]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def forget(self, conn: H2Upstream) -> None:
        address = self._addresses.get(conn.key)
        if address is not None and conn in address.conns:
            address.conns.remove(conn)

    def close(self) -> None:
        self._closing = True
        for address in self._addresses.values():
            for conn in list(address.conns):
                conn.close()
            self._fail_waiters(address, Answer.UPSTREAM_RESET)
        for task in self._tasks:
            task.cancel()

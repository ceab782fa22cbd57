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
from collections.abc import Hashable
from typing import cast

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from router.errors import Answer
from router.settings import Limits, Timeouts
from router.table import Target

__all__ = ["H2Pool", "H2StreamOwner", "H2Upstream"]

Headers = list[tuple[bytes, bytes]]

_WINDOW = 1 << 20
"""Our receive window per upstream stream and for the connection (the default 64 KiB would
cap one stream's throughput at 64 KiB per round trip)."""
_MAX_CONNECTIONS = 8
"""Connections per upstream address: a new one only when every one is at its stream limit."""
_MAX_WAITERS = 1024


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


class _Out:
    """One stream's request body waiting for the upstream's window."""

    __slots__ = ("chunks", "size", "end", "trailers")

    def __init__(self) -> None:
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.end = False
        self.trailers: Headers | None = None


class H2Upstream(asyncio.Protocol):
    """One h2c connection to an upstream, multiplexing the streams of many client streams."""

    def __init__(self, pool: H2Pool, key: Hashable) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_inbound_headers=False,  # the front end already validated what it forwards
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config=config)
        self.owners: dict[int, H2StreamOwner] = {}
        self.out: dict[int, _Out] = {}
        self.ready = False
        """The upstream's SETTINGS arrived: its stream limit is known."""
        self.closed = False
        self.write_paused = False
        self.last_used = 0.0

    # -- asyncio protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        h2c = self.h2
        h2c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 1 << 16,
            },
        )
        h2c.initiate_connection()
        h2c.increment_flow_control_window(_WINDOW)
        self._flush()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except (h2.exceptions.ProtocolError, ValueError):
            self._fail(Answer.BAD_RESPONSE)
            return
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                if event.stream_ended is not None:
                    # Trailers-only (a gRPC error): the head is the whole response.
                    owner = self._forget(event.stream_id)
                    if owner is not None:
                        owner.h2_response(list(event.headers), True)
                    continue
                owner = self.owners.get(event.stream_id)
                if owner is not None:
                    owner.h2_response(list(event.headers), False)
            elif isinstance(event, h2.events.DataReceived):
                owner = self.owners.get(event.stream_id)
                if owner is not None:
                    owner.h2_data(event.data, event.flow_controlled_length)
                elif event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                owner = self.owners.get(event.stream_id)
                if owner is not None:
                    owner.h2_trailers(list(event.headers))
            elif isinstance(event, h2.events.StreamEnded):
                owner = self._forget(event.stream_id)  # (None after a trailers-only head)
                if owner is not None:
                    owner.h2_end()
            elif isinstance(event, h2.events.StreamReset):
                owner = self._forget(event.stream_id)
                if owner is not None:
                    owner.h2_reset(int(event.error_code or 0))
            elif isinstance(event, h2.events.WindowUpdated):
                if event.stream_id:
                    self._pump(event.stream_id)
                else:
                    for stream_id in list(self.out):
                        self._pump(stream_id)
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                if not self.ready:
                    self.ready = True
                    self.pool.became_ready(self)
                else:
                    for stream_id in list(self.out):
                        self._pump(stream_id)
                    self.pool.capacity_freed(self)
            elif isinstance(event, h2.events.ConnectionTerminated):
                # Streams above the last one the upstream took were never seen: fail them all
                # alike (none of them is retried: a request body may have been sent).
                self._fail(Answer.UPSTREAM_RESET)
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
        if self.closed or not self.ready:
            return 0
        limit = self.h2.remote_settings.max_concurrent_streams
        return int(limit) - len(self.owners)

    def open(self, owner: H2StreamOwner, headers: Headers, end_stream: bool) -> int:
        """Start a stream with ``headers``; the owner receives what comes back."""
        h2c = self.h2
        stream_id = h2c.get_next_available_stream_id()
        h2c.send_headers(stream_id, headers, end_stream=end_stream)
        self.owners[stream_id] = owner
        self.last_used = self.pool.loop.time()
        self._flush()
        return stream_id

    def send(self, stream_id: int, data: bytes, end: bool) -> bool:
        """Queue request body bytes; False when the stream's buffer is over its limit (the
        owner stops reading its client until ``h2_drained``)."""
        out = self.out.get(stream_id)
        if out is None:
            out = self.out[stream_id] = _Out()
        if data:
            out.chunks.append(data)
            out.size += len(data)
        out.end = out.end or end
        self._pump(stream_id)
        self._flush()
        return out.size < self.pool.limits.stream_buffer if stream_id in self.out else True

    def send_trailers(self, stream_id: int, trailers: Headers) -> None:
        out = self.out.get(stream_id)
        if out is None:
            out = self.out[stream_id] = _Out()
        out.trailers = trailers
        out.end = True
        self._pump(stream_id)
        self._flush()

    def ack(self, stream_id: int, length: int) -> None:
        if length and not self.closed:
            try:
                self.h2.acknowledge_received_data(length, stream_id)
            except h2.exceptions.StreamClosedError:
                return
            self._flush()

    def cancel(self, stream_id: int) -> None:
        """The client gave up on the stream: reset it upstream (CANCEL)."""
        if self._forget(stream_id) is None or self.closed:
            return
        try:
            self.h2.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        except h2.exceptions.StreamClosedError:
            pass
        self._flush()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            try:
                self.h2.close_connection()
                self.transport.write(self.h2.data_to_send())
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()
        self._fail(Answer.UPSTREAM_RESET)

    # -- inside ---------------------------------------------------------------------------------

    def _pump(self, stream_id: int) -> None:
        out = self.out.get(stream_id)
        if out is None or self.closed:
            return
        h2c = self.h2
        was_over = out.size >= self.pool.limits.stream_buffer
        try:
            while out.chunks:
                window = min(h2c.local_flow_control_window(stream_id), h2c.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = out.chunks[0]
                if len(chunk) <= window:
                    out.chunks.popleft()
                    h2c.send_data(stream_id, chunk)
                    out.size -= len(chunk)
                else:
                    out.chunks[0] = chunk[window:]
                    h2c.send_data(stream_id, chunk[:window])
                    out.size -= window
            if not out.chunks and out.end:
                del self.out[stream_id]
                if out.trailers is not None:
                    h2c.send_headers(stream_id, out.trailers, end_stream=True)
                else:
                    h2c.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.out.pop(stream_id, None)
            return
        if was_over and out.size < self.pool.limits.stream_buffer:
            owner = self.owners.get(stream_id)
            if owner is not None:
                owner.h2_drained()

    def _forget(self, stream_id: int) -> H2StreamOwner | None:
        self.out.pop(stream_id, None)
        owner = self.owners.pop(stream_id, None)
        if owner is not None:
            self.pool.capacity_freed(self)
        return owner

    def _flush(self) -> None:
        transport = self.transport
        if transport is not None and not self.closed:
            data = self.h2.data_to_send()
            if data:
                transport.write(data)

    def _fail(self, failure: Answer) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.forget(self)
        owners, self.owners = self.owners, {}
        self.out = {}
        for owner in owners.values():
            owner.h2_failed(failure)
        if self.transport is not None:
            self.transport.abort()


class _Address:
    __slots__ = ("conns", "connecting", "waiters")

    def __init__(self) -> None:
        self.conns: list[H2Upstream] = []
        self.connecting = 0
        self.waiters: collections.deque[tuple[H2StreamOwner, Headers, bool]] = collections.deque()


class H2Limits:
    """The per-stream buffer limit (bytes of request body held for a slow upstream)."""

    def __init__(self, stream_buffer: int = 256 * 1024) -> None:
        self.stream_buffer = stream_buffer


class H2Pool:
    """h2c connections per upstream address, opened on demand and shared by streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeouts: Timeouts, limits: Limits) -> None:
        self.loop = loop
        self.timeouts = timeouts
        self.limits = H2Limits()
        self._addresses: dict[Hashable, _Address] = {}
        self._targets: dict[Hashable, Target] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    def open(self, target: Target, owner: H2StreamOwner, headers: Headers, end_stream: bool) -> None:
        """Open a stream for ``owner`` on a connection with room, now or once one is ready;
        ``owner.h2_ready`` says which (or why not)."""
        key = target.pool_key
        address = self._addresses.get(key)
        if address is None:
            address = self._addresses[key] = _Address()
            self._targets[key] = target
        for conn in address.conns:
            if conn.capacity > 0:
                owner.h2_ready(conn, conn.open(owner, headers, end_stream), None)
                return
        if len(address.waiters) >= _MAX_WAITERS:
            owner.h2_ready(None, 0, Answer.POOL_FULL)
            return
        address.waiters.append((owner, headers, end_stream))
        if address.connecting == 0 and len(address.conns) < _MAX_CONNECTIONS:
            address.connecting += 1
            task = self.loop.create_task(self._connect(key, target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

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
            if self._closing:
                conn.close()
                return
            address.conns.append(conn)
            # Streams are handed out once the upstream's SETTINGS arrive (became_ready); an
            # upstream that never sends them fails its waiters at the connect deadline.
            self.loop.call_later(self.timeouts.upstream_connect, self._settings_deadline, conn)
        finally:
            address.connecting -= 1

    def _settings_deadline(self, conn: H2Upstream) -> None:
        if not conn.ready and not conn.closed:
            address = self._addresses.get(conn.key)
            conn.close()
            if address is not None:
                self._fail_waiters(address, Answer.UPSTREAM_TIMEOUT)

    def _fail_waiters(self, address: _Address, failure: Answer) -> None:
        waiters, address.waiters = address.waiters, collections.deque()
        for owner, _, _ in waiters:
            owner.h2_ready(None, 0, failure)

    def became_ready(self, conn: H2Upstream) -> None:
        self.capacity_freed(conn)

    def capacity_freed(self, conn: H2Upstream) -> None:
        address = self._addresses.get(conn.key)
        if address is None:
            return
        while address.waiters and conn.capacity > 0:
            owner, headers, end_stream = address.waiters.popleft()
            owner.h2_ready(conn, conn.open(owner, headers, end_stream), None)
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

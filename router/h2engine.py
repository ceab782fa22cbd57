"""The HTTP/2 protocol engine: one connection's framing, HPACK and stream states, behind one interface.

The router's HTTP/2 code (``router.http2`` for clients, ``router.h2upstream`` for h2c upstreams)
talks to an ``Engine`` and never to a library: bytes go in (``receive``) and come out
(``output``), requests and responses are submitted by stream, and what the peer did comes back
as the small events below. Two engines implement it: ``H2Engine`` over the pure-Python ``h2``
state machine (always available) and ``router.nghttp2.NgEngine`` over libnghttp2 (the C library
curl uses), four to eight times cheaper per exchange here and the default wherever the library
loads. Both are held to the same events for the same bytes (tests/test_h2engine.py), and the
HTTP/2 tests run under both.
"""

from __future__ import annotations

import enum
import os
from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "Engine",
    "ErrorCode",
    "Event",
    "H2Engine",
    "Headers",
    "PingReceived",
    "ProtocolError",
    "RemoteSettingsChanged",
    "RequestReceived",
    "ResponseReceived",
    "StreamEnded",
    "StreamReset",
    "TrailersReceived",
    "WindowUpdated",
    "make_engine",
]

Headers = list[tuple[bytes, bytes]]


class ErrorCode(enum.IntEnum):
    """HTTP/2 error codes (RFC 9113 7)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


class ProtocolError(Exception):
    """The peer broke the protocol: a GOAWAY with ``code`` is queued in the output already."""

    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or ErrorCode(code).name)
        self.code = code


class Event:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int = 0) -> None:
        self.stream_id = stream_id


class RequestReceived(Event):
    """A request head (server side); ``ended``: the request has no body."""

    __slots__ = ("headers", "ended")

    def __init__(self, stream_id: int, headers: Headers, ended: bool) -> None:
        super().__init__(stream_id)
        self.headers = headers
        self.ended = ended


class ResponseReceived(Event):
    """A final response head (client side; 1xx heads are not reported); ``ended``: it is the
    whole response (gRPC's trailers-only form)."""

    __slots__ = ("headers", "ended")

    def __init__(self, stream_id: int, headers: Headers, ended: bool) -> None:
        super().__init__(stream_id)
        self.headers = headers
        self.ended = ended


class TrailersReceived(Event):
    """Trailers: the stream's last frame from the peer (no StreamEnded follows)."""

    __slots__ = ("headers",)

    def __init__(self, stream_id: int, headers: Headers) -> None:
        super().__init__(stream_id)
        self.headers = headers


class DataReceived(Event):
    """Body bytes; ``flow_length`` (payload plus padding) is what ``consume`` must give back.
    ``ended``: the stream's last frame from the peer (no StreamEnded follows)."""

    __slots__ = ("data", "flow_length", "ended")

    def __init__(self, stream_id: int, data: bytes, flow_length: int, ended: bool) -> None:
        super().__init__(stream_id)
        self.data = data
        self.flow_length = flow_length
        self.ended = ended


class StreamEnded(Event):
    """The peer ended the stream with a frame that made no other event (an empty DATA frame)."""

    __slots__ = ()


class StreamReset(Event):
    """The stream ended abnormally: the peer reset it (RST_STREAM), or, for a stream already
    reported, the engine reset it because of what the peer sent (NgEngine; H2Engine only counts
    those in ``stream_errors``)."""

    __slots__ = ("code",)

    def __init__(self, stream_id: int, code: int) -> None:
        super().__init__(stream_id)
        self.code = code


class WindowUpdated(Event):
    """More send window for ``stream_id`` (0: the whole connection)."""

    __slots__ = ()


class RemoteSettingsChanged(Event):
    """The peer's SETTINGS arrived (the engine acknowledged them)."""

    __slots__ = ()


class PingReceived(Event):
    """A PING (the engine answered it)."""

    __slots__ = ()


class ConnectionTerminated(Event):
    """The peer sent GOAWAY; streams above ``last_stream_id`` were never processed."""

    __slots__ = ("code", "last_stream_id")

    def __init__(self, code: int, last_stream_id: int) -> None:
        super().__init__(0)
        self.code = code
        self.last_stream_id = last_stream_id


class Engine:
    """One side of one HTTP/2 connection (``client``: we opened it), with our settings sent.

    Every method that submits something for a stream that is gone (reset, closed) does nothing:
    the streams' owners learn of the end from the events, and a late submission must not fail.
    """

    client: bool
    stream_errors: int = 0
    """Streams the engine reset on its own because of what the peer sent (a stream error, a
    stream over our concurrency limit): the caller counts them against the peer's reset budget,
    like the resets the peer sends itself (MadeYouReset, CVE-2025-8671)."""

    def receive(self, data: bytes) -> list[Event]:
        """What the peer's bytes did. Raises ``ProtocolError`` (its GOAWAY queued) on a
        connection error. A stream error resets the stream and counts in ``stream_errors``, except
        that NgEngine reports a stream already reported as a ``StreamReset`` instead."""
        raise NotImplementedError

    def output(self) -> bytes:
        """Bytes to write to the peer now (frames queued by everything above)."""
        raise NotImplementedError

    def request(self, headers: Headers, end_stream: bool) -> int:
        """Client side: open a stream with a request head; its stream id."""
        raise NotImplementedError

    def respond(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        """Server side: the response head (with ``end_stream``, the whole response)."""
        raise NotImplementedError

    def send_data(self, stream_id: int, data: bytes) -> None:
        """Body bytes, at most ``send_window(stream_id)`` of them."""
        raise NotImplementedError

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        """Trailers, ending the stream."""
        raise NotImplementedError

    def end_stream(self, stream_id: int) -> None:
        raise NotImplementedError

    def reset(self, stream_id: int, code: int) -> None:
        raise NotImplementedError

    def consume(self, stream_id: int, length: int) -> None:
        """Give ``length`` received bytes back to the peer's windows (stream and connection;
        only the connection's when the stream is gone)."""
        raise NotImplementedError

    def send_window(self, stream_id: int) -> int:
        """Body bytes that may be sent on ``stream_id`` now (its window, the connection's, and the
        peer's frame size; 0 for a stream that is gone)."""
        raise NotImplementedError

    def goaway(self, code: int, last_stream_id: int | None = None) -> None:
        """Send GOAWAY (``last_stream_id``: the highest stream we will still serve)."""
        raise NotImplementedError

    @property
    def peer_max_streams(self) -> int:
        """The peer's SETTINGS_MAX_CONCURRENT_STREAMS (unlimited until its SETTINGS arrive)."""
        raise NotImplementedError


_H2_SETTINGS: Final = h2.settings.SettingCodes


class _Connection(h2.connection.H2Connection):
    """h2's connection, except that a graceful GOAWAY received leaves it open.

    h2 closes the whole connection on any GOAWAY, so the streams the peer promised to finish
    (those up to its last stream id, RFC 9113 6.8) fail on their next frame; nginx sends one every
    ``http2_max_requests`` streams, gRPC clients one when a channel closes. The callers open no
    new stream after a GOAWAY.
    """

    def _receive_goaway_frame(self, frame: Any) -> tuple[list[Any], list[h2.events.Event]]:
        unsent = bytes(self._data_to_send)  # h2 drops what is queued; a graceful GOAWAY must not
        frames, events = super()._receive_goaway_frame(frame)
        if frame.error_code == 0:
            states = h2.connection.ConnectionState
            self.state_machine.state = states.CLIENT_OPEN if self.config.client_side else states.SERVER_OPEN
            self._data_to_send[:0] = unsent
        return frames, events


class H2Engine(Engine):
    """The ``h2`` state machine (pure Python) behind the engine interface."""

    def __init__(
        self, client: bool, *, max_streams: int, max_header_list: int, stream_window: int, connection_window: int
    ) -> None:
        self.client = client
        config = h2.config.H2Configuration(
            client_side=client,
            header_encoding=None,
            # What the router receives from clients is validated; what upstreams send it was
            # already validated by their own stacks, and the router re-checks what it forwards.
            validate_inbound_headers=not client,
            normalize_inbound_headers=not client,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = self.h2 = _Connection(config=config)
        initial: dict[h2.settings.SettingCodes, int] = {
            _H2_SETTINGS.MAX_HEADER_LIST_SIZE: max_header_list,
            _H2_SETTINGS.INITIAL_WINDOW_SIZE: stream_window,
            _H2_SETTINGS.ENABLE_PUSH: 0,
        }
        if not client:
            initial[_H2_SETTINGS.MAX_CONCURRENT_STREAMS] = max_streams
        conn.local_settings = h2.settings.Settings(client=client, initial_values=initial)
        # Until the peer acknowledges our SETTINGS, h2 holds it to the protocol's defaults;
        # the HPACK decoder's list limit is ours from the first header block.
        conn.decoder.max_header_list_size = max_header_list
        conn.initiate_connection()
        self.max_streams = max_streams
        self.stream_errors = 0
        if not client:
            # h2 holds a peer to our MAX_CONCURRENT_STREAMS with a connection error, where RFC
            # 9113 5.1.2 refuses the stream: h2 gets a higher ceiling (not sent), receive()
            # refuses what is above the advertised limit.
            initial[_H2_SETTINGS.MAX_CONCURRENT_STREAMS] = 2 * max_streams
            conn.local_settings = h2.settings.Settings(client=client, initial_values=initial)
        if connection_window > 65535:
            conn.increment_flow_control_window(connection_window - 65535)

    def receive(self, data: bytes) -> list[Event]:
        try:
            raw = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            code = getattr(exc, "error_code", None) or ErrorCode.PROTOCOL_ERROR
            raise ProtocolError(int(code), str(exc)) from None
        events: list[Event] = []
        append = events.append
        marked = {
            event.stream_id  # type: ignore[attr-defined]
            for event in raw
            if getattr(event, "stream_ended", None) is not None
        }
        for event in raw:
            kind = type(event)
            if kind is h2.events.DataReceived:
                data_event: h2.events.DataReceived = event  # type: ignore[assignment]
                append(
                    DataReceived(
                        data_event.stream_id,
                        data_event.data,
                        data_event.flow_controlled_length,
                        data_event.stream_ended is not None,
                    )
                )
            elif kind is h2.events.RequestReceived:
                request: h2.events.RequestReceived = event  # type: ignore[assignment]
                if self.h2.open_inbound_streams > self.max_streams:
                    self.reset(request.stream_id, ErrorCode.REFUSED_STREAM)
                    self.stream_errors += 1
                    marked.discard(request.stream_id)
                    continue
                append(RequestReceived(request.stream_id, request.headers, request.stream_ended is not None))
            elif kind is h2.events.ResponseReceived:
                response: h2.events.ResponseReceived = event  # type: ignore[assignment]
                append(ResponseReceived(response.stream_id, response.headers, response.stream_ended is not None))
            elif kind is h2.events.TrailersReceived:
                trailers: h2.events.TrailersReceived = event  # type: ignore[assignment]
                append(TrailersReceived(trailers.stream_id, trailers.headers))
            elif kind is h2.events.StreamEnded:
                # END_STREAM is reported on the event of the frame that carried it; a
                # StreamEnded of its own only when that frame made no event.
                if event.stream_id not in marked:  # type: ignore[attr-defined]
                    append(StreamEnded(event.stream_id))  # type: ignore[attr-defined]
            elif kind is h2.events.StreamReset:
                reset: h2.events.StreamReset = event  # type: ignore[assignment]
                if reset.remote_reset:
                    append(StreamReset(reset.stream_id, int(reset.error_code or 0)))
                else:
                    self.stream_errors += 1
            elif kind is h2.events.WindowUpdated:
                append(WindowUpdated(event.stream_id))  # type: ignore[attr-defined]
            elif kind is h2.events.RemoteSettingsChanged:
                append(RemoteSettingsChanged())
            elif kind is h2.events.PingReceived:
                append(PingReceived())
            elif kind is h2.events.ConnectionTerminated:
                terminated: h2.events.ConnectionTerminated = event  # type: ignore[assignment]
                append(ConnectionTerminated(int(terminated.error_code or 0), terminated.last_stream_id or 0))
            elif kind is h2.events.InformationalResponseReceived:
                continue
        return events

    def output(self) -> bytes:
        return self.h2.data_to_send()

    def request(self, headers: Headers, end_stream: bool) -> int:
        stream_id = self.h2.get_next_available_stream_id()
        self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        return stream_id

    def respond(self, stream_id: int, headers: Headers, end_stream: bool) -> None:
        try:
            self.h2.send_headers(stream_id, headers, end_stream=end_stream)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def send_data(self, stream_id: int, data: bytes) -> None:
        try:
            self.h2.send_data(stream_id, data)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def send_trailers(self, stream_id: int, headers: Headers) -> None:
        self.respond(stream_id, headers, True)

    def end_stream(self, stream_id: int) -> None:
        try:
            self.h2.end_stream(stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def reset(self, stream_id: int, code: int) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass

    def consume(self, stream_id: int, length: int) -> None:
        if length <= 0:
            return
        try:
            self.h2.acknowledge_received_data(length, stream_id)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            # The stream is gone; the connection's window still needs the bytes back.
            self.h2.increment_flow_control_window(length)

    def send_window(self, stream_id: int) -> int:
        try:
            return min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
        except (h2.exceptions.StreamClosedError, h2.exceptions.NoSuchStreamError, h2.exceptions.ProtocolError):
            return 0

    def goaway(self, code: int, last_stream_id: int | None = None) -> None:
        try:
            self.h2.close_connection(error_code=code, last_stream_id=last_stream_id)
        except h2.exceptions.ProtocolError:
            pass

    @property
    def peer_max_streams(self) -> int:
        return int(self.h2.remote_settings.max_concurrent_streams)


def make_engine(
    client: bool,
    *,
    max_streams: int = 128,
    max_header_list: int = 1 << 16,
    stream_window: int = 1 << 20,
    connection_window: int = 4 << 20,
    engine: str | None = None,
) -> Engine:
    """The engine for one connection: libnghttp2's (``engine`` "nghttp2", the default when the
    library loads) or h2's ("h2"). With ``engine`` None, ``DEVSTACK_HTTP2_ENGINE`` may name one
    (the test suite runs the HTTP/2 tests under both)."""
    if engine is None:
        engine = os.environ.get("DEVSTACK_HTTP2_ENGINE") or None
    if engine is None:
        try:
            from router import nghttp2  # noqa: PLC0415 - loads libnghttp2 on first use, not at import
        except ImportError:
            engine = "h2"
        else:
            engine = "nghttp2" if nghttp2.AVAILABLE else "h2"
    if engine == "nghttp2":
        try:
            from router import nghttp2  # noqa: PLC0415 - loads libnghttp2 only when asked for
        except ImportError as exc:
            raise RuntimeError(f"libnghttp2 is not available: {exc}") from None
        if not nghttp2.AVAILABLE:
            raise RuntimeError(f"libnghttp2 is not available: {nghttp2.MISSING}")
        return nghttp2.NgEngine(
            client,
            max_streams=max_streams,
            max_header_list=max_header_list,
            stream_window=stream_window,
            connection_window=connection_window,
        )
    return H2Engine(
        client,
        max_streams=max_streams,
        max_header_list=max_header_list,
        stream_window=stream_window,
        connection_window=connection_window,
    )

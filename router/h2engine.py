"""The HTTP/2 protocol engine: one connection's framing, HPACK and stream states, behind one interface.

The router's HTTP/2 code (``router.http2`` for clients, ``router.h2upstream`` for h2c upstreams)
talks to an ``Engine`` and never to a library: bytes go in (``receive``) and come out
(``output``), requests and responses are submitted by stream, and what the peer did comes back
as the small events below. Two engines implement it: ``router.h2lib.H2Engine`` over the
pure-Python ``h2`` state machine (always available) and ``router.nghttp2.NgEngine`` over
libnghttp2 (the C library curl uses), four to eight times cheaper per exchange here and the
default wherever the library loads. Both are held to the same events for the same bytes
(tests/test_h2engine.py), and the HTTP/2 tests run under both. This module imports neither
library: ``make_engine`` loads the chosen engine's module on first use, so a router on
libnghttp2 never imports ``h2``.
"""

from __future__ import annotations

import enum
import os

__all__ = [
    "ConnectionTerminated",
    "DataReceived",
    "Engine",
    "ErrorCode",
    "Event",
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
    from router.h2lib import H2Engine  # noqa: PLC0415 - h2 (1.5 MiB resident) only for the engine that runs on it

    return H2Engine(
        client,
        max_streams=max_streams,
        max_header_list=max_header_list,
        stream_window=stream_window,
        connection_window=connection_window,
    )

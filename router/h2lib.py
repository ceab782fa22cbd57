"""``H2Engine``: the pure-Python ``h2`` state machine behind the HTTP/2 engine interface.

The fallback of ``router.h2engine`` (whose ``make_engine`` imports this module only when the h2
engine is asked for or libnghttp2 does not load), and the reference ``NgEngine`` is held to in
tests/test_h2engine.py. ``h2`` with ``hpack`` and ``hyperframe`` is about 1.5 MiB resident, which
a router on libnghttp2 (every small sidecar) never pays. It must never be imported by a module
that every router loads.
"""

from __future__ import annotations

from typing import Any, Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from router.h2engine import (
    ConnectionTerminated,
    DataReceived,
    Engine,
    ErrorCode,
    Event,
    Headers,
    PingReceived,
    ProtocolError,
    RemoteSettingsChanged,
    RequestReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)

__all__ = ["H2Engine"]

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

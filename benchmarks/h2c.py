"""gRPC unary calls over h2c for the correctness checks: the harness's only HTTP/2 client.

The ``h2`` library frames (sans-I/O) over a blocking loopback socket: one connection per call,
every wait bounded by a timeout. ``unary_call`` reports what came back, ``http2_refusal`` whether a
listener speaks HTTP/2 with prior knowledge at all; neither judges an answer (``correctness``
does) nor retries. Load is h2load's job, never this module's.
"""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Mapping, Sequence
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions

from benchmarks.configs import GRPC_CONTENT_TYPE, GRPC_METHOD, GRPC_REQUEST

__all__ = ["H2cError", "UnaryAnswer", "http2_refusal", "unary_call"]

_READ: Final = 65536


class H2cError(RuntimeError):
    """No complete answer: the connection failed, closed early, broke HTTP/2, or timed out."""


@dataclasses.dataclass(frozen=True, slots=True)
class UnaryAnswer:
    """What one call got back; header names are lower-case (HTTP/2 has no other kind)."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    trailers: Mapping[str, str]
    reset: int | None = None
    """The RST_STREAM error code when the stream was reset instead of ended."""


def _connection() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    return conn


def unary_call(
    port: int,
    *,
    authority: str,
    metadata: Sequence[tuple[str, str]] = (),
    path: str = GRPC_METHOD,
    body: bytes = GRPC_REQUEST,
    timeout: float = 5.0,
) -> UnaryAnswer:
    """POST one gRPC request (headers, one DATA frame ending the stream) and read its answer."""
    conn = _connection()
    stream = conn.get_next_available_stream_id()
    request = [
        (":method", "POST"), (":scheme", "http"), (":authority", authority), (":path", path),
        ("content-type", GRPC_CONTENT_TYPE), ("te", "trailers"), *metadata,
    ]  # fmt: skip
    conn.send_headers(stream, request)
    conn.send_data(stream, body, end_stream=True)
    status = 0
    headers: dict[str, str] = {}
    trailers: dict[str, str] = {}
    data = bytearray()
    deadline = time.monotonic() + timeout
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(conn.data_to_send())
            while True:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                received = sock.recv(_READ)
                if not received:
                    raise H2cError("connection closed before the stream ended")
                for event in conn.receive_data(received):
                    if isinstance(event, h2.events.ResponseReceived):
                        fields = {str(k): str(v) for k, v in event.headers or ()}
                        status = int(fields.pop(":status", "0"))
                        headers = fields
                    elif isinstance(event, h2.events.DataReceived):
                        data += event.data or b""
                        conn.acknowledge_received_data(event.flow_controlled_length or 0, stream)
                    elif isinstance(event, h2.events.TrailersReceived):
                        trailers = {str(k): str(v) for k, v in event.headers or ()}
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                        return UnaryAnswer(status, headers, bytes(data), trailers)
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                        return UnaryAnswer(status, headers, bytes(data), trailers, int(event.error_code or 0))
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        raise H2cError(f"GOAWAY ({event.error_code!r}) before the stream ended")
                sock.sendall(conn.data_to_send())
    except h2.exceptions.ProtocolError as exc:
        raise H2cError(f"not HTTP/2: {type(exc).__name__}: {exc}") from exc
    except OSError as exc:
        raise H2cError(f"{type(exc).__name__}: {exc}") from exc


def http2_refusal(port: int, *, timeout: float = 5.0) -> str | None:
    """None when the listener answers the HTTP/2 connection preface with HTTP/2 (its SETTINGS);
    otherwise what it did instead, in a few words (an HTTP/1.1 server answers ``400``)."""
    conn = _connection()
    deadline = time.monotonic() + timeout
    seen = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(conn.data_to_send())
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                received = sock.recv(_READ)
                if not received:
                    return "closed the connection after the HTTP/2 preface" + (f" ({seen[:60]!r})" if seen else "")
                seen += received
                if any(isinstance(e, h2.events.RemoteSettingsChanged) for e in conn.receive_data(received)):
                    return None
    except h2.exceptions.ProtocolError:
        return f"answered the HTTP/2 preface with {seen[:60]!r}"
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}" + (f" after {seen[:60]!r}" if seen else "")
    return f"no HTTP/2 SETTINGS within {timeout:g}s"

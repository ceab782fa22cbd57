"""The HTTP/2 engines' own CPU cost per exchange, without sockets: ``H2Engine`` (h2) against
``NgEngine`` (libnghttp2 through ctypes).

One exchange is a small GET (seven fields with the pseudo-headers) answered by a 200 with five
fields and a five-byte body in one DATA frame. Server side: the engine under test receives the
request's HEADERS frame, submits the head, the body and the end, and serializes them. Client
side: it submits the request, serializes it, receives the response's HEADERS and DATA frames and
gives the body's bytes back. The peer's frames are made before the clock starts, by h2.

``python -m benchmarks.h2engine``: microseconds per exchange, best of five runs of ``--count``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import h2.config
import h2.connection

from router import nghttp2
from router.h2engine import DataReceived, Engine, Headers, RequestReceived
from router.h2lib import H2Engine

REQUEST: Headers = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"web"),
    (b":path", b"/"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
    (b"baggage", b"devstack=alice"),
    (b"accept", b"*/*"),
]
BODY = b"base\n"


def response(stream_id: int) -> Headers:
    return [
        (b":status", b"200"),
        (b"server", b"nginx/1.22.1"),
        (b"date", b"Mon, 30 Nov 2026 00:%02d:%02d GMT" % (stream_id % 60, stream_id % 59)),
        (b"content-type", b"text/plain"),
        (b"content-length", b"%d" % len(BODY)),
    ]


def make(kind: str, client: bool) -> Engine:
    engine = H2Engine if kind == "h2" else nghttp2.NgEngine
    return engine(client, max_streams=128, max_header_list=1 << 16, stream_window=1 << 20, connection_window=4 << 20)


def _peer(client: bool) -> h2.connection.H2Connection:
    peer = h2.connection.H2Connection(h2.config.H2Configuration(client_side=client, header_encoding=None))
    peer.initiate_connection()
    peer.increment_flow_control_window((1 << 31) - 1 - 65535)  # never the bottleneck
    return peer


def _forget(peer: h2.connection.H2Connection, stream_id: int) -> None:
    """Close a stream the frame maker will never hear about again (h2 counts its open streams
    on each new one: thousands left open make the set-up quadratic)."""
    peer.reset_stream(stream_id)
    peer.data_to_send()


def server_side(kind: str, count: int) -> Callable[[], None]:
    """A server engine and ``count`` requests from an h2 client; returns the timed loop."""
    engine = make(kind, False)
    peer = _peer(True)
    engine.receive(peer.data_to_send())
    engine.output()  # not shown to the peer: it would hold its requests to our 128 streams at a time
    frames = []
    for _ in range(count):
        stream_id = peer.get_next_available_stream_id()
        peer.send_headers(stream_id, REQUEST, end_stream=True)
        frames.append(peer.data_to_send())
        _forget(peer, stream_id)

    def run() -> None:
        receive, respond, send_data, end_stream, output = (
            engine.receive,
            engine.respond,
            engine.send_data,
            engine.end_stream,
            engine.output,
        )
        for frame in frames:
            for event in receive(frame):
                if type(event) is RequestReceived:
                    stream_id = event.stream_id
                    respond(stream_id, response(stream_id), False)
                    send_data(stream_id, BODY)
                    end_stream(stream_id)
            output()

    return run


def client_side(kind: str, count: int) -> Callable[[], None]:
    """A client engine and ``count`` responses from an h2 server; returns the timed loop."""
    engine = make(kind, True)
    upstream = _peer(False)
    driver = _peer(True)  # opens the streams the upstream answers on (the engine's ids: 1, 3, ...)
    upstream.receive_data(driver.data_to_send())
    engine.output()
    engine.receive(upstream.data_to_send())  # the upstream's SETTINGS and window
    frames = []
    for _ in range(count):
        stream_id = driver.get_next_available_stream_id()
        driver.send_headers(stream_id, REQUEST, end_stream=True)
        upstream.receive_data(driver.data_to_send())
        upstream.send_headers(stream_id, response(stream_id))
        upstream.send_data(stream_id, BODY, end_stream=True)
        frames.append(upstream.data_to_send())
        _forget(driver, stream_id)

    def run() -> None:
        request, receive, consume, output = engine.request, engine.receive, engine.consume, engine.output
        for frame in frames:
            request(REQUEST, True)
            output()
            for event in receive(frame):
                if type(event) is DataReceived:
                    consume(event.stream_id, event.flow_length)
            output()

    return run


def measure(setup: Callable[[str, int], Callable[[], None]], kind: str, count: int) -> float:
    """Microseconds per exchange, best of five fresh connections."""
    best = float("inf")
    for _ in range(5):
        run = setup(kind, count)
        start = time.perf_counter()
        run()
        best = min(best, (time.perf_counter() - start) / count)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="exchanges per run (default 5000)")
    args = parser.parse_args()
    kinds = ["h2"] + (["nghttp2"] if nghttp2.AVAILABLE else [])
    if not nghttp2.AVAILABLE:
        print(f"nghttp2: not available ({nghttp2.MISSING})")
    for side, setup in (("server", server_side), ("client", client_side)):
        for kind in kinds:
            print(f"{side} side, {kind:8}: {measure(setup, kind, args.count):7.1f} us per exchange")


if __name__ == "__main__":
    main()

"""Test support for gRPC: real grpcio services on loopback that name themselves and record calls.

Services are registered with generic handlers and bytes in, bytes out (no protoc step): the
method names below are what the tests call. Every answer names the instance that served it, so
a test can tell the baseline from an override, and every call's metadata is recorded. Nothing
is mocked: these are grpcio servers on 127.0.0.1, reached through real routers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc

SERVICE = "devstack.test.Echo"


def identity(data: bytes) -> bytes:
    return data


class EchoService:
    """One grpcio server: unary, server-streaming, client-streaming and bidi echo methods,
    plus ones that fail, sleep, or stream without end (to test cancellation and backpressure)."""

    def __init__(self, name: str, interceptors: list[Any] | None = None, options: list[tuple[str, Any]] = ()) -> None:  # type: ignore[assignment]
        self.name = name
        self.calls: list[dict[str, Any]] = []
        """Each call's method and metadata (keys lowercased, -bin values as bytes)."""
        self.cancelled = threading.Event()
        self.streamed = 0
        """Messages the endless stream has produced (grpcio blocks the generator on flow control)."""
        self.next_hop: Callable[[bytes, grpc.ServicerContext], bytes] | None = None
        """Called by the ``Chain`` method to reach the next service."""
        self.server = grpc.server(
            futures.ThreadPoolExecutor(16),
            interceptors=interceptors or [],
            options=[
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20),
                *options,
            ],
        )
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary, identity, identity),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream, identity, identity),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream, identity, identity),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi, identity, identity),
            "Endless": grpc.unary_stream_rpc_method_handler(self._endless, identity, identity),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow, identity, identity),
            "Chain": grpc.unary_unary_rpc_method_handler(self._chain, identity, identity),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> EchoService:
        self.server.start()
        return self

    def stop(self) -> None:
        self.server.stop(grace=None)

    def _record(self, method: str, context: grpc.ServicerContext) -> None:
        self.calls.append({"method": method, "metadata": {k: v for k, v in context.invocation_metadata()}})

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Unary", context)
        context.set_trailing_metadata((("served-by", self.name), ("blob-bin", b"\x00\x01\xfe\xff")))
        if request.startswith(b"abort:"):
            context.abort(grpc.StatusCode.NOT_FOUND, request[6:].decode())
        return self.name.encode() + b"|" + request[:64] + b"|%d" % len(request)

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("ServerStream", context)
        context.set_trailing_metadata((("served-by", self.name),))
        for i in range(int(request or b"3")):
            yield b"%s:%d" % (self.name.encode(), i)

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._record("ClientStream", context)
        total = count = 0
        for message in requests:
            total += len(message)
            count += 1
        return b"%s|%d|%d" % (self.name.encode(), count, total)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("Bidi", context)
        for message in requests:
            yield self.name.encode() + b":" + message

    def _endless(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("Endless", context)
        context.add_callback(self.cancelled.set)
        size = int(request or b"65536")
        chunk = b"x" * size
        while context.is_active():
            self.streamed += 1
            yield chunk

    def _slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Slow", context)
        context.add_callback(self.cancelled.set)
        deadline = time.monotonic() + float(request or b"5")
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.name.encode()

    def _chain(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Chain", context)
        below = self.next_hop(request, context) if self.next_hop is not None else b""
        return self.name.encode() + (b">" + below if below else b"")


def method(channel: grpc.Channel, name: str, kind: str = "unary_unary") -> Any:
    """A bytes-in, bytes-out callable for ``/devstack.test.Echo/<name>``."""
    return getattr(channel, kind)(f"/{SERVICE}/{name}", request_serializer=identity, response_deserializer=identity)


def channel(port: int, authority: str, **options: Any) -> grpc.Channel:
    """A cleartext channel to a router on ``port`` whose calls name ``authority``."""
    opts = [("grpc.default_authority", authority), ("grpc.max_receive_message_length", 64 << 20)]
    opts += list(options.items())
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=opts)


def key_metadata(key: str | None) -> tuple[tuple[str, str], ...]:
    return (("baggage", f"devstack={key}"),) if key else ()

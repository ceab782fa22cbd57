"""gRPC end to end: a three-service chain, each hop through its own sidecar router.

Services a -> b -> c are real grpcio servers using the SDK's interceptors (``propagation.grpc``):
the server interceptor makes the caller's baggage current, the client interceptor sends it on.
Every hop reaches the next through its own sidecar router (a real ``RouterServer`` in sidecar
mode) with grpc-core's HTTP proxy support, the same ``CONNECT`` a ``grpc_proxy`` environment
variable makes it send; alice has overrides of b and c. For keys alice, bob and none, and for
all four call types, on one client connection, every hop must reach the right instance, and
trailers and status codes must come back intact. A mixed chain (HTTP/1.1 -> gRPC -> HTTP/1.1)
checks that the key crosses the protocol boundaries both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from typing import Any

import aiohttp
import grpc
import pytest
from aiohttp import web

from propagation import grpc as sdk
from propagation.aiohttp import client_session
from propagation.aiohttp import middleware as sdk_middleware
from propagation.routing import current_routing_key, with_routing_key
from router.server import RouterServer
from router.settings import Mode, RouterSettings
from tests.grpc_support import SERVICE, identity
from tests.support import in_thread, make_table, running_router

pytestmark = pytest.mark.timeout(120)
NAME = web.AppKey("name", str)


class Hop:
    """One service instance of the chain: all four call types, each calling the next service
    (through this hop's sidecar) with the same call type, and reporting the path taken."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.next: grpc.Channel | None = None
        self.keys_seen: list[str | None] = []
        self.server = grpc.server(futures.ThreadPoolExecutor(16), interceptors=[sdk.server_interceptor()])
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary, identity, identity),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream, identity, identity),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream, identity, identity),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi, identity, identity),
        }
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def call(self, name: str, kind: str) -> Any:
        assert self.next is not None
        return getattr(self.next, kind)(
            f"/{SERVICE}/{name}", request_serializer=identity, response_deserializer=identity
        )

    def _seen(self, context: grpc.ServicerContext) -> None:
        self.keys_seen.append(current_routing_key())
        context.set_trailing_metadata((("hop", self.name), ("hop-bin", self.name.encode() + b"\x00\xff")))

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._seen(context)
        if self.next is None:
            if request == b"fail":
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.name} says no")
            return self.name.encode()
        try:
            below: bytes = self.call("Unary", "unary_unary")(request, timeout=10)
        except grpc.RpcError as exc:  # pass the status on, as a real service would
            context.abort(exc.code(), exc.details())
        return self.name.encode() + b">" + below

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(context)
        if self.next is None:
            yield from (b"%s:%d" % (self.name.encode(), i) for i in range(2))
            return
        for below in self.call("ServerStream", "unary_stream")(request, timeout=10):
            yield self.name.encode() + b">" + below

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._seen(context)
        messages = list(requests)
        if self.next is None:
            return b"%s|%d" % (self.name.encode(), len(messages))
        below: bytes = self.call("ClientStream", "stream_unary")(iter(messages), timeout=10)
        return self.name.encode() + b">" + below

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._seen(context)
        for message in requests:
            if self.next is None:
                yield self.name.encode() + b":" + message
            else:
                (below,) = list(self.call("Bidi", "stream_stream")(iter([message]), timeout=10))
                yield self.name.encode() + b">" + below

    def stop(self) -> None:
        if self.next is not None:
            self.next.close()
        self.server.stop(grace=None)


def _proxied_channel(target: str, sidecar: RouterServer) -> grpc.Channel:
    """A channel to ``target`` (a service name) through ``sidecar``, with the SDK's injection."""
    options = [("grpc.http_proxy", f"http://127.0.0.1:{sidecar.address[1]}")]
    return grpc.intercept_channel(grpc.insecure_channel(target, options=options), *sdk.client_interceptors())


@contextlib.asynccontextmanager
async def _sidecars(table: Any, count: int) -> AsyncIterator[list[RouterServer]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_router(table, RouterSettings(mode=Mode.SIDECAR)))
            for _ in range(count)
        ]


@pytest.fixture
def hops() -> Iterator[dict[str, Hop]]:
    made = {name: Hop(name) for name in ("a", "b", "b-alice", "c", "c-alice")}
    yield made
    for hop in made.values():
        hop.stop()


def _chain_table(hops: dict[str, Hop]) -> Any:
    def url(name: str) -> str:
        return f"http://127.0.0.1:{hops[name].port}"

    return make_table(
        {
            "a": {"baseline": url("a"), "hosts": ["a"], "protocol": "h2c"},
            "b": {"baseline": url("b"), "overrides": {"alice": url("b-alice")}, "hosts": ["b"], "protocol": "h2c"},
            "c": {"baseline": url("c"), "overrides": {"alice": url("c-alice")}, "hosts": ["c"], "protocol": "h2c"},
        }
    )


def _run_client(channel: grpc.Channel) -> dict[str, Any]:
    results: dict[str, Any] = {}

    def stub(name: str, kind: str) -> Any:
        return getattr(channel, kind)(f"/{SERVICE}/{name}", request_serializer=identity, response_deserializer=identity)

    for key in ("alice", "bob", None):
        # The key set in the client's context, injected by the SDK's client interceptor.
        with with_routing_key(key) if key else contextlib.nullcontext():
            reply, call = stub("Unary", "unary_unary").with_call(b"go", timeout=20)
            results[f"unary-{key}"] = (reply, dict(call.trailing_metadata()))
            results[f"server-{key}"] = list(stub("ServerStream", "unary_stream")(b"go", timeout=20))
            results[f"client-{key}"] = stub("ClientStream", "stream_unary")(iter([b"1", b"2", b"3"]), timeout=20)
            results[f"bidi-{key}"] = list(stub("Bidi", "stream_stream")(iter([b"x", b"y"]), timeout=20))
            try:
                stub("Unary", "unary_unary")(b"fail", timeout=20)
            except grpc.RpcError as exc:
                results[f"fail-{key}"] = (exc.code(), exc.details())
    return results


async def test_three_service_grpc_chain_routes_every_key_at_every_hop(hops: dict[str, Hop]) -> None:
    table = _chain_table(hops)
    async with _sidecars(table, 4) as (client_side, sidecar_a, sidecar_b, sidecar_b_alice):
        # Each instance calls the next service through its own sidecar; c is the last hop.
        hops["a"].next = _proxied_channel("b:50051", sidecar_a)
        hops["b"].next = _proxied_channel("c:50051", sidecar_b)
        hops["b-alice"].next = _proxied_channel("c:50051", sidecar_b_alice)
        channel = _proxied_channel("a:50051", client_side)
        try:
            results = await in_thread(_run_client, channel)
        finally:
            channel.close()
        # The client's calls all went over one connection to its sidecar, multiplexed.
        assert client_side.stats.h2_connections == 1
    for key, path in (("alice", b"a>b-alice>c-alice"), ("bob", b"a>b>c"), (None, b"a>b>c")):
        reply, trailers = results[f"unary-{key}"]
        assert reply == path, key
        assert trailers["hop"] == "a" and trailers["hop-bin"] == b"a\x00\xff"  # trailers intact, binary too
        assert results[f"server-{key}"] == [path + b":0", path + b":1"]
        assert results[f"client-{key}"] == path + b"|3"
        assert results[f"bidi-{key}"] == [path + b":x", path + b":y"]
        last = "c-alice" if key == "alice" else "c"
        assert results[f"fail-{key}"] == (grpc.StatusCode.FAILED_PRECONDITION, f"{last} says no")
    # Every hop's handler saw the key the client set (or none).
    assert set(hops["b-alice"].keys_seen) == {"alice"} and set(hops["c-alice"].keys_seen) == {"alice"}
    assert set(hops["c"].keys_seen) == {"bob", None}
    assert hops["a"].keys_seen.count("alice") == hops["a"].keys_seen.count("bob") == hops["a"].keys_seen.count(None)


# -- a mixed chain: HTTP/1.1 -> gRPC -> HTTP/1.1 --------------------------------------------------


async def test_mixed_chain_http1_grpc_http1_keeps_the_key(hops: dict[str, Hop]) -> None:
    """front (aiohttp, SDK middleware) -> b (gRPC, SDK interceptors) -> back (aiohttp): the key
    set by the caller of the front reaches the last HTTP/1.1 service through two sidecars."""
    seen_back: list[tuple[str, str | None]] = []

    async def back(request: web.Request) -> web.Response:
        seen_back.append((request.app[NAME], request.headers.get("baggage")))
        return web.Response(text=request.app[NAME])

    async def start_app(name: str, handler: Any) -> tuple[web.AppRunner, int]:
        app = web.Application(middlewares=[sdk_middleware])
        app[NAME] = name
        app.router.add_get("/{tail:.*}", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    runners = []
    back_base, back_port = await start_app("back", back)
    back_alice, back_alice_port = await start_app("back-alice", back)
    runners += [back_base, back_alice]
    grpc_hop = EchoToHttp("mid")
    table = make_table(
        {
            "mid": {"baseline": f"http://127.0.0.1:{grpc_hop.port}", "hosts": ["mid"], "protocol": "h2c"},
            "back": {
                "baseline": f"http://127.0.0.1:{back_port}",
                "overrides": {"alice": f"http://127.0.0.1:{back_alice_port}"},
                "hosts": ["back"],
            },
        }
    )
    try:
        async with _sidecars(table, 2) as (front_sidecar, mid_sidecar):
            grpc_hop.sidecar = f"http://127.0.0.1:{mid_sidecar.address[1]}"
            mid_channel = _proxied_channel("mid:50051", front_sidecar)

            async def front(request: web.Request) -> web.Response:
                call = mid_channel.unary_unary(
                    f"/{SERVICE}/Unary", request_serializer=identity, response_deserializer=identity
                )
                # in_thread copies the context, where the middleware made the caller's key current.
                reply = await in_thread(call, b"go")
                return web.Response(body=reply)

            front_runner, front_port = await start_app("front", front)
            runners.append(front_runner)
            async with aiohttp.ClientSession() as session:
                answers = {}
                for key in ("alice", "bob", None):
                    headers = {"baggage": f"devstack={key}"} if key else {}
                    async with session.get(f"http://127.0.0.1:{front_port}/", headers=headers) as response:
                        answers[key] = await response.read()
            mid_channel.close()
    finally:
        grpc_hop.stop()
        for runner in runners:
            await runner.cleanup()
    assert answers == {"alice": b"mid>back-alice", "bob": b"mid>back", None: b"mid>back"}
    assert [name for name, _ in seen_back] == ["back-alice", "back", "back"]
    assert seen_back[0][1] is not None and "devstack=alice" in seen_back[0][1]


class EchoToHttp:
    """A gRPC service whose one method calls the HTTP/1.1 service ``back`` through a sidecar
    (as an HTTP proxy), with the SDK's aiohttp client session injecting the key."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.sidecar = ""
        self.server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[sdk.server_interceptor()])
        handler = grpc.unary_unary_rpc_method_handler(self._unary, identity, identity)
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Unary": handler}),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        async def fetch() -> bytes:
            async with client_session() as session:
                async with session.get("http://back/", proxy=self.sidecar) as response:
                    return await response.read()

        # The handler runs in grpc's thread with the caller's context current (the SDK's
        # interceptor); a fresh loop in this thread inherits it.
        below = asyncio.run(fetch())
        return self.name.encode() + b">" + below

    def stop(self) -> None:
        self.server.stop(grace=None)

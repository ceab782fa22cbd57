"""The gRPC interceptors, sync and grpc.aio, on real servers and channels on loopback.

Services are generic handlers on raw bytes (no protoc): each handler answers with what it saw, the
routing key and trace the interceptor made current and the propagation metadata as it arrived, one
report per response message, so a streamed response shows the context at every step of the stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc
import grpc.aio
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from propagation import current_routing_key, with_routing_key
from propagation.grpc import (
    METADATA_SETTER,
    Metadatum,
    aio_client_interceptors,
    aio_server_interceptor,
    client_interceptors,
    server_interceptor,
)
from tests.test_propagation_routing import run_python

SERVICE = "devstack.test.Probe"
CALL_TYPES = ("UnaryUnary", "UnaryStream", "StreamUnary", "StreamStream")
REPORTED = ("baggage", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-tenant")
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{SPAN_ID}-01"
INBOUND: tuple[Metadatum, ...] = (("baggage", "devstack=alice;ttl=5,team=a"), ("traceparent", TRACEPARENT))

Report = dict[str, Any]


def report(servicer_context: Any) -> bytes:
    """What a handler sees: the routing key, the current span, the propagation metadata received."""
    span = trace.get_current_span().get_span_context()
    received: dict[str, list[str]] = {}
    for key, value in servicer_context.invocation_metadata():
        received.setdefault(key, []).append(value)
    seen = {
        "key": current_routing_key(),
        "trace_id": f"{span.trace_id:032x}",
        "span_id": f"{span.span_id:016x}",
        "metadata": {name: received.get(name, []) for name in REPORTED},
    }
    return json.dumps(seen).encode()


def client_span(span_id: int = int(SPAN_ID, 16)) -> trace.NonRecordingSpan:
    context = trace.SpanContext(int(TRACE_ID, 16), span_id, is_remote=False, trace_flags=trace.TraceFlags(1))
    return trace.NonRecordingSpan(context)


# The services. Streaming ones report once per message; the stream-request ones read every request.


def sync_unary_unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    return report(context)


def sync_unary_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield report(context)
    yield report(context)


def sync_stream_unary(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
    assert list(requests) == [b"a", b"b"]
    return report(context)


def sync_stream_stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    for _ in requests:
        yield report(context)


async def aio_unary_unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return report(context)


async def aio_unary_stream(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield report(context)
    yield report(context)


async def aio_stream_unary(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    assert [request async for request in requests] == [b"a", b"b"]
    return report(context)


async def aio_stream_stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield report(context)


async def aio_unary_stream_writer(request: bytes, context: grpc.aio.ServicerContext) -> None:
    """grpc.aio's other streaming style: a coroutine writing its responses."""
    await context.write(report(context))
    await context.write(report(context))


def probe(
    unary_unary: Callable[..., Any] = sync_unary_unary,
    unary_stream: Callable[..., Any] = sync_unary_stream,
    stream_unary: Callable[..., Any] = sync_stream_unary,
    stream_stream: Callable[..., Any] = sync_stream_stream,
    **more_unary_stream: Callable[..., Any],
) -> grpc.GenericRpcHandler:
    """The probe service; messages are bytes as they are (no serializers)."""
    handlers = {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
    }
    handlers |= {name: grpc.unary_stream_rpc_method_handler(h) for name, h in more_unary_stream.items()}
    return grpc.method_handlers_generic_handler(SERVICE, handlers)


AIO_PROBE = probe(
    aio_unary_unary, aio_unary_stream, aio_stream_unary, aio_stream_stream, UnaryStreamWriter=aio_unary_stream_writer
)
RESPONSES = {"UnaryUnary": 1, "UnaryStream": 2, "StreamUnary": 1, "StreamStream": 2, "UnaryStreamWriter": 2}
"""How many responses, so reports, each call type of the probe answers with."""


@contextmanager
def sync_server(service: grpc.GenericRpcHandler, *interceptors: Any) -> Iterator[str]:
    """A grpcio server on an ephemeral loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1), handlers=[service], interceptors=interceptors)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


@asynccontextmanager
async def aio_server(service: grpc.GenericRpcHandler, *interceptors: Any) -> AsyncIterator[str]:
    """A grpc.aio server on an ephemeral loopback port. Sync handlers run on its one pool thread, which
    grpc.aio gives no context of the call's: anything left attached there shows in the next call."""
    pool = futures.ThreadPoolExecutor(max_workers=1)
    server = grpc.aio.server(interceptors=interceptors, migration_thread_pool=pool)
    server.add_generic_rpc_handlers((service,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        pool.shutdown(wait=False)


def sync_call(channel: grpc.Channel, call_type: str, metadata: Any = None) -> list[Report]:
    """Makes a call of ``call_type`` (two requests when streaming); the reports it got back."""
    path = f"/{SERVICE}/{call_type}"
    if call_type == "UnaryUnary":
        responses = [channel.unary_unary(path)(b"x", metadata=metadata)]
    elif call_type == "UnaryStream":
        responses = list(channel.unary_stream(path)(b"x", metadata=metadata))
    elif call_type == "StreamUnary":
        responses = [channel.stream_unary(path)(iter([b"a", b"b"]), metadata=metadata)]
    else:
        responses = list(channel.stream_stream(path)(iter([b"a", b"b"]), metadata=metadata))
    return [json.loads(response) for response in responses]


async def aio_call(channel: grpc.aio.Channel, call_type: str, metadata: Any = None) -> list[Report]:
    path = f"/{SERVICE}/{call_type}"
    if call_type == "UnaryUnary":
        responses = [await channel.unary_unary(path)(b"x", metadata=metadata)]
    elif call_type in ("UnaryStream", "UnaryStreamWriter"):
        responses = [r async for r in channel.unary_stream(path)(b"x", metadata=metadata)]
    elif call_type == "StreamUnary":
        responses = [await channel.stream_unary(path)(iter([b"a", b"b"]), metadata=metadata)]
    else:
        responses = [r async for r in channel.stream_stream(path)(iter([b"a", b"b"]), metadata=metadata)]
    return [json.loads(response) for response in responses]


def keys_and_traces(reports: list[Report]) -> list[tuple[str | None, str]]:
    return [(r["key"], r["trace_id"]) for r in reports]


# Servers: sync


@pytest.mark.parametrize("call_type", CALL_TYPES)
def test_each_call_type_runs_in_the_context_the_metadata_carries(call_type: str) -> None:
    with sync_server(probe(), server_interceptor()) as target, grpc.insecure_channel(target) as channel:
        reports = sync_call(channel, call_type, INBOUND)
    assert keys_and_traces(reports) == [("alice", TRACE_ID)] * RESPONSES[call_type]


class Observer(grpc.ServerInterceptor):
    """Sits outside ours, as a tracing instrumentation would, and records the routing key its own code
    sees once the handler has returned (or raised) and after each message of a streamed response."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = continuation(details)
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        method = getattr(handler, kind)

        def observed(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                response = method(request, context)
            finally:
                self.keys.append(current_routing_key())
            return self.each(response) if handler.response_streaming else response

        return handler._replace(**{kind: observed})

    def each(self, responses: Iterator[bytes]) -> Iterator[bytes]:
        for response in responses:
            self.keys.append(current_routing_key())
            yield response


@pytest.mark.parametrize("call_type", CALL_TYPES)
def test_the_context_is_detached_when_the_handler_returns_and_between_messages(call_type: str) -> None:
    observer = Observer()
    with sync_server(probe(), observer, server_interceptor()) as target, grpc.insecure_channel(target) as channel:
        reports = sync_call(channel, call_type, INBOUND)
    assert keys_and_traces(reports) == [("alice", TRACE_ID)] * RESPONSES[call_type]
    streamed = RESPONSES[call_type] if call_type.endswith("Stream") else 0
    assert observer.keys == [None] * (1 + streamed)


def test_an_aborted_call_keeps_its_status_and_detaches() -> None:
    def not_found(request: bytes, context: grpc.ServicerContext) -> None:
        assert current_routing_key() == "alice"
        context.abort(grpc.StatusCode.NOT_FOUND, "no such order")

    observer = Observer()
    with sync_server(probe(unary_unary=not_found), observer, server_interceptor()) as target:
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as failed:
            sync_call(channel, "UnaryUnary", INBOUND)
    assert (failed.value.code(), failed.value.details()) == (grpc.StatusCode.NOT_FOUND, "no such order")
    assert observer.keys == [None]


def test_an_unknown_method_is_still_unimplemented() -> None:
    with sync_server(probe(), server_interceptor()) as target, grpc.insecure_channel(target) as channel:
        with pytest.raises(grpc.RpcError) as failed:
            channel.unary_unary(f"/{SERVICE}/Missing")(b"x", metadata=INBOUND)
    assert failed.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize(
    "metadata",
    [
        (("baggage", "devstack=%zz"),),
        (("baggage", ";,=%" * 1000),),
        (("baggage", "devstack=Alice"),),
        (("traceparent", "garbage"), ("tracestate", "=,=,="), ("b3", "-")),
        (("traceparent", f"00-{'0' * 32}-{SPAN_ID}-01"),),  # (gRPC itself keeps one traceparent of several)
    ],
)
def test_bad_metadata_never_fails_the_call(metadata: tuple[Metadatum, ...]) -> None:
    with sync_server(probe(), server_interceptor()) as target, grpc.insecure_channel(target) as channel:
        assert keys_and_traces(sync_call(channel, "UnaryUnary", metadata)) == [(None, "0" * 32)]


def test_a_span_an_outer_interceptor_made_current_stays_the_parent() -> None:
    local = client_span(0x1234)

    class SpanFirst(grpc.ServerInterceptor):  # what a tracing instrumentation does: wraps the method
        def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
            method = continuation(details).unary_unary

            def in_span(request: bytes, context: grpc.ServicerContext) -> Any:
                with trace.use_span(local):
                    return method(request, context)

            return grpc.unary_unary_rpc_method_handler(in_span)

    with sync_server(probe(), SpanFirst(), server_interceptor()) as target, grpc.insecure_channel(target) as channel:
        [seen] = sync_call(channel, "UnaryUnary", INBOUND)
    assert (seen["key"], seen["trace_id"], seen["span_id"]) == ("alice", TRACE_ID, f"{0x1234:016x}")


# Clients: sync


def expected_injection(key: str, span_id: str = SPAN_ID) -> dict[str, list[str]]:
    return {
        "baggage": [f"devstack={key}"],
        "traceparent": [f"00-{TRACE_ID}-{span_id}-01"],
        "tracestate": [],
        "b3": [f"{TRACE_ID}-{span_id}-1"],
        "x-b3-traceid": [TRACE_ID],
        "x-tenant": [],
    }


@pytest.mark.parametrize("call_type", CALL_TYPES)
def test_the_client_sends_the_callers_context(call_type: str) -> None:
    with sync_server(probe()) as target, grpc.insecure_channel(target) as plain:
        channel = grpc.intercept_channel(plain, *client_interceptors())
        with with_routing_key("bob"), trace.use_span(client_span()):
            reports = sync_call(channel, call_type)
    assert [r["metadata"] for r in reports] == [expected_injection("bob")] * len(reports)


def test_the_client_keeps_the_callers_metadata_and_replaces_the_fields_it_owns() -> None:
    theirs = [("x-tenant", "blue"), ("baggage", "devstack=eve"), ("Baggage", "team=a"), ("b3", "0")]
    with sync_server(probe()) as target, grpc.insecure_channel(target) as plain:
        channel = grpc.intercept_channel(plain, *client_interceptors())
        with with_routing_key("bob"), trace.use_span(client_span()):
            [seen] = sync_call(channel, "UnaryUnary", theirs)
    assert seen["metadata"] == {**expected_injection("bob"), "x-tenant": ["blue"]}
    assert theirs == [("x-tenant", "blue"), ("baggage", "devstack=eve"), ("Baggage", "team=a"), ("b3", "0")]


def test_the_client_leaves_metadata_alone_when_there_is_nothing_to_send() -> None:
    with sync_server(probe()) as target, grpc.insecure_channel(target) as plain:
        channel = grpc.intercept_channel(plain, *client_interceptors())
        [seen] = sync_call(channel, "UnaryUnary", (("baggage", "devstack=eve"),))
    assert seen["metadata"]["baggage"] == ["devstack=eve"]
    assert seen["metadata"]["traceparent"] == []


def test_the_key_the_client_sets_reaches_the_third_hop() -> None:
    tracer = TracerProvider().get_tracer(__name__)
    a_spans: list[trace.SpanContext] = []

    with sync_server(probe(), server_interceptor()) as b_target, grpc.insecure_channel(b_target) as to_b:
        to_b_traced = grpc.intercept_channel(to_b, *client_interceptors())

        def service_a(request: bytes, context: grpc.ServicerContext) -> bytes:
            with tracer.start_as_current_span("a") as span:
                a_spans.append(span.get_span_context())
                response: bytes = to_b_traced.unary_unary(f"/{SERVICE}/UnaryUnary")(request)
                return response

        with sync_server(probe(unary_unary=service_a), server_interceptor()) as a_target:
            with grpc.insecure_channel(a_target) as to_a:
                to_a_traced = grpc.intercept_channel(to_a, *client_interceptors())
                with with_routing_key("alice"), trace.use_span(client_span()):
                    [seen_by_b] = sync_call(to_a_traced, "UnaryUnary", (("x-tenant", "blue"),))

    [a_span] = a_spans
    a_span_id = f"{a_span.span_id:016x}"
    assert (a_span.trace_id, a_span_id != SPAN_ID) == (int(TRACE_ID, 16), True)
    assert (seen_by_b["key"], seen_by_b["trace_id"], seen_by_b["span_id"]) == ("alice", TRACE_ID, a_span_id)
    assert seen_by_b["metadata"] == expected_injection("alice", a_span_id)  # A's own x-tenant: none


def test_the_setter_writes_lower_case_keys_once_and_leaves_out_what_grpc_refuses() -> None:
    metadata: list[Metadatum] = [("Baggage", "a=1"), ("x-id", "7"), ("baggage", "b=2"), ("trace-bin", b"\x00")]
    METADATA_SETTER.set(metadata, "Baggage", "devstack=alice")
    assert metadata == [("x-id", "7"), ("trace-bin", b"\x00"), ("baggage", "devstack=alice")]
    METADATA_SETTER.set(metadata, "baggage", "devstack=caf\u00e9")
    METADATA_SETTER.set(metadata, "x-id", "a\nb")
    assert metadata == [("trace-bin", b"\x00")]


# grpc.aio: servers and clients


@pytest.mark.parametrize("call_type", [*CALL_TYPES, "UnaryStreamWriter"])
async def test_each_aio_call_type_runs_in_the_context_the_metadata_carries(call_type: str) -> None:
    async with aio_server(AIO_PROBE, aio_server_interceptor()) as target:
        async with grpc.aio.insecure_channel(target) as channel:
            reports = await aio_call(channel, call_type, INBOUND)
    assert keys_and_traces(reports) == [("alice", TRACE_ID)] * RESPONSES[call_type]


class AioObserver(grpc.aio.ServerInterceptor):
    """The Observer for grpc.aio servers with async handlers (coroutines and async generators)."""

    def __init__(self) -> None:
        self.keys: list[str | None] = []

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        kind = ("stream_" if handler.request_streaming else "unary_") + (
            "stream" if handler.response_streaming else "unary"
        )
        method = getattr(handler, kind)

        async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                return await method(request, context)
            finally:
                self.keys.append(current_routing_key())

        async def observed_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
            async for response in method(request, context):
                self.keys.append(current_routing_key())
                yield response
            self.keys.append(current_routing_key())

        return handler._replace(**{kind: observed_stream if handler.response_streaming else observed})


@pytest.mark.parametrize("call_type", CALL_TYPES)
async def test_the_aio_context_is_detached_when_the_handler_returns_and_between_messages(call_type: str) -> None:
    observer = AioObserver()
    async with aio_server(AIO_PROBE, observer, aio_server_interceptor()) as target:
        async with grpc.aio.insecure_channel(target) as channel:
            reports = await aio_call(channel, call_type, INBOUND)
    assert keys_and_traces(reports) == [("alice", TRACE_ID)] * RESPONSES[call_type]
    streamed = RESPONSES[call_type] if call_type.endswith("Stream") else 0
    assert observer.keys == [None] * (1 + streamed)


@pytest.mark.parametrize("call_type", CALL_TYPES)
async def test_sync_handlers_on_an_aio_server_run_in_the_context_too(call_type: str) -> None:
    # grpc.aio runs them in its thread pool: unary ones whole, streaming ones one step at a time.
    async with aio_server(probe(), aio_server_interceptor()) as target:
        async with grpc.aio.insecure_channel(target) as channel:
            reports = await aio_call(channel, call_type, INBOUND)
            after = await aio_call(channel, "UnaryUnary")
    assert keys_and_traces(reports) == [("alice", TRACE_ID)] * RESPONSES[call_type]
    assert keys_and_traces(after) == [(None, "0" * 32)]


@pytest.mark.parametrize("call_type", CALL_TYPES)
async def test_the_aio_client_sends_the_callers_context_and_keeps_their_metadata(call_type: str) -> None:
    theirs = grpc.aio.Metadata(("x-tenant", "blue"), ("baggage", "devstack=eve"))
    async with aio_server(AIO_PROBE) as target:
        async with grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors()) as channel:
            with with_routing_key("bob"), trace.use_span(client_span()):
                reports = await aio_call(channel, call_type, theirs)
            untraced = await aio_call(channel, call_type, theirs)
    assert [r["metadata"] for r in reports] == [{**expected_injection("bob"), "x-tenant": ["blue"]}] * len(reports)
    assert [r["metadata"]["baggage"] for r in untraced] == [["devstack=eve"]] * len(untraced)
    assert theirs == grpc.aio.Metadata(("x-tenant", "blue"), ("baggage", "devstack=eve"))


async def test_the_key_the_aio_client_sets_reaches_the_third_hop() -> None:
    tracer = TracerProvider().get_tracer(__name__)
    a_spans: list[trace.SpanContext] = []

    async with aio_server(AIO_PROBE, aio_server_interceptor()) as b_target:
        async with grpc.aio.insecure_channel(b_target, interceptors=aio_client_interceptors()) as to_b:

            async def service_a(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
                with tracer.start_as_current_span("a") as span:
                    a_spans.append(span.get_span_context())
                    response: bytes = await to_b.unary_unary(f"/{SERVICE}/UnaryUnary")(request)
                    return response

            async with aio_server(probe(unary_unary=service_a), aio_server_interceptor()) as a_target:
                async with grpc.aio.insecure_channel(a_target, interceptors=aio_client_interceptors()) as to_a:
                    with with_routing_key("alice"), trace.use_span(client_span()):
                        [seen_by_b] = await aio_call(to_a, "UnaryUnary")

    [a_span] = a_spans
    a_span_id = f"{a_span.span_id:016x}"
    assert (a_span.trace_id, a_span_id != SPAN_ID) == (int(TRACE_ID, 16), True)
    assert (seen_by_b["key"], seen_by_b["trace_id"], seen_by_b["span_id"]) == ("alice", TRACE_ID, a_span_id)
    assert seen_by_b["metadata"] == expected_injection("alice", a_span_id)


def test_importing_the_package_does_not_import_grpcio() -> None:
    out = run_python(
        """
        import sys, propagation
        print("grpc" in sys.modules)
        print(callable(propagation.grpc.server_interceptor), "grpc" in sys.modules)
        """
    )
    assert out.splitlines() == ["False", "True True"]

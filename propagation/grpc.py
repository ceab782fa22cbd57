"""gRPC adapters: server interceptors that extract, and client interceptors that inject, for grpcio
and grpc.aio.

This module binds the shared propagator to gRPC metadata in both directions, for all four call types,
and does nothing else; it must never change a call beyond the propagation metadata, and never fail
one because of them.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, MutableSequence
from typing import Any, Final

import grpc
import grpc.aio
from opentelemetry.context import Context, attach, detach
from opentelemetry.propagators import textmap

from propagation.carriers import HEADERS_GETTER, inbound_context
from propagation.propagators import PROPAGATOR

__all__ = [
    "METADATA_SETTER",
    "MetadataSetter",
    "Metadatum",
    "aio_client_interceptors",
    "aio_server_interceptor",
    "client_interceptors",
    "server_interceptor",
]

_log = logging.getLogger(__name__)

Metadatum = tuple[str, str | bytes]
"""One metadata entry as grpcio takes it: bytes values only under ``-bin`` keys."""
Behavior = Callable[..., Any]
"""A servicer method: ``(request or request iterator, servicer context)``, sync or async."""
Continuation = Callable[..., Any]
"""What an interceptor hands the call on to: the next interceptor, or grpcio itself."""


class MetadataSetter(textmap.Setter[MutableSequence[Metadatum]]):
    """Writes one entry under its lower-case key (gRPC refuses any other), first removing every entry
    of that key under any capitalisation.

    A value gRPC would refuse (text metadata is printable ASCII) is left out rather than written:
    grpcio fails the whole call with INTERNAL "Invalid metadata" for one bad value.
    """

    def set(self, carrier: MutableSequence[Metadatum], key: str, value: str) -> None:
        name = key.lower()
        carrier[:] = [(k, v) for k, v in carrier if not (isinstance(k, str) and k.lower() == name)]
        if value.isascii() and value.isprintable():
            carrier.append((name, value))


METADATA_SETTER: Final = MetadataSetter()


def _outgoing(metadata: Iterable[Metadatum] | None) -> list[Metadatum]:
    """A copy of the caller's metadata with the current context's fields written in (theirs is left
    untouched: grpc.aio hands interceptors the very Metadata object the caller passed)."""
    pairs: list[Metadatum] = list(metadata or ())
    PROPAGATOR.inject(pairs, None, METADATA_SETTER)
    return pairs


@dataclasses.dataclass(frozen=True, slots=True)
class _CallDetails(grpc.ClientCallDetails):  # type: ignore[misc]  # grpcio ships no type information
    """grpc.ClientCallDetails names these attributes but has no constructor."""

    method: str
    timeout: float | None
    metadata: tuple[Metadatum, ...]
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


def _with_context(details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
    try:
        return _CallDetails(
            method=details.method,
            timeout=getattr(details, "timeout", None),
            metadata=tuple(_outgoing(getattr(details, "metadata", None))),
            credentials=getattr(details, "credentials", None),
            wait_for_ready=getattr(details, "wait_for_ready", None),
            compression=getattr(details, "compression", None),
        )
    except Exception:  # noqa: BLE001 - propagation must never fail a call
        _log.debug("injection failed; calling without propagation metadata", exc_info=True)
        return details


def _aio_with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    try:
        metadata = grpc.aio.Metadata(*_outgoing(details.metadata))
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )
    except Exception:  # noqa: BLE001 - propagation must never fail a call
        _log.debug("injection failed; calling without propagation metadata", exc_info=True)
        return details


class _ClientInterceptor(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]  # grpcio ships no type information
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Sends every call, of all four types, with the caller's context in its metadata.

    grpcio runs the interceptor in the caller's thread when the call is made, so the current context
    is the caller's.
    """

    def intercept_unary_unary(self, continuation: Continuation, client_call_details: Any, request: Any) -> Any:
        return continuation(_with_context(client_call_details), request)

    def intercept_unary_stream(self, continuation: Continuation, client_call_details: Any, request: Any) -> Any:
        return continuation(_with_context(client_call_details), request)

    def intercept_stream_unary(self, continuation: Continuation, client_call_details: Any, requests: Any) -> Any:
        return continuation(_with_context(client_call_details), requests)

    def intercept_stream_stream(self, continuation: Continuation, client_call_details: Any, requests: Any) -> Any:
        return continuation(_with_context(client_call_details), requests)


# grpc.aio files each interceptor under the first call type it implements, so it takes one per type.
# Each runs in a task grpc.aio creates when the call is made, which copies the caller's context.


class _AioUnaryUnaryInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Continuation, client_call_details: Any, request: Any) -> Any:
        return await continuation(_aio_with_context(client_call_details), request)


class _AioUnaryStreamInterceptor(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Continuation, client_call_details: Any, request: Any) -> Any:
        return await continuation(_aio_with_context(client_call_details), request)


class _AioStreamUnaryInterceptor(grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Continuation, client_call_details: Any, requests: Any) -> Any:
        return await continuation(_aio_with_context(client_call_details), requests)


class _AioStreamStreamInterceptor(grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Continuation, client_call_details: Any, requests: Any) -> Any:
        return await continuation(_aio_with_context(client_call_details), requests)


def client_interceptors() -> list[Any]:
    """For ``grpc.intercept_channel(channel, *client_interceptors())``: every call on the channel, of
    all four types, carries the caller's trace context, baggage and B3 in its metadata."""
    return [_ClientInterceptor()]


def aio_client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """For ``grpc.aio.insecure_channel(target, interceptors=aio_client_interceptors())`` (or
    ``secure_channel``): the same, for grpc.aio channels."""
    return [
        _AioUnaryUnaryInterceptor(),
        _AioUnaryStreamInterceptor(),
        _AioStreamUnaryInterceptor(),
        _AioStreamStreamInterceptor(),
    ]


# The server side. Every wrapper is of the same kind as the servicer method it wraps (coroutine
# function, async generator function or plain function), because grpc.aio decides by that kind whether
# to await it, iterate it, or run it in its thread pool. The context is extracted when the method is
# called, not when the interceptor runs, so a span an outer interceptor made current stays the parent.


def _response_in_context(behavior: Behavior, metadata: object) -> Behavior:
    """``behavior`` (a unary response, or grpc.aio's reader/writer streaming) run in the context the
    call's ``metadata`` carries."""
    if inspect.iscoroutinefunction(behavior):

        @functools.wraps(behavior)
        async def respond_async(*args: Any) -> Any:
            token = attach(inbound_context(metadata, HEADERS_GETTER))
            try:
                return await behavior(*args)
            finally:
                detach(token)

        return respond_async

    @functools.wraps(behavior)
    def respond(*args: Any) -> Any:
        token = attach(inbound_context(metadata, HEADERS_GETTER))
        try:
            return behavior(*args)
        finally:
            detach(token)

    return respond


def _stream_in_context(behavior: Behavior, metadata: object) -> Behavior:
    """``behavior`` returning a response stream, with the stream produced in the context the call's
    ``metadata`` carries: a generator's body runs while gRPC iterates it, after the call returned."""
    if inspect.iscoroutinefunction(behavior):
        return _response_in_context(behavior, metadata)
    if inspect.isasyncgenfunction(behavior):

        @functools.wraps(behavior)
        async def stream_async(*args: Any) -> AsyncIterator[Any]:
            context = inbound_context(metadata, HEADERS_GETTER)
            responses = behavior(*args)  # an async generator's body only runs when iterated
            try:
                while True:
                    token = attach(context)
                    try:
                        response = await anext(responses)
                    except StopAsyncIteration:
                        return
                    finally:
                        detach(token)
                    yield response
            finally:
                token = attach(context)
                try:
                    await responses.aclose()
                finally:
                    detach(token)

        return stream_async

    @functools.wraps(behavior)
    def stream(*args: Any) -> Iterator[Any]:
        context = inbound_context(metadata, HEADERS_GETTER)
        token = attach(context)
        try:
            responses = behavior(*args)
        finally:
            detach(token)
        return _iterate_in(context, responses)

    return stream


def _iterate_in(context: Context, responses: Iterable[Any]) -> Iterator[Any]:
    """``responses`` with ``context`` attached around each step and the closing, never across a yield:
    grpc.aio takes each step of a sync stream in whichever pool thread is free."""
    token = attach(context)
    try:
        iterator = iter(responses)
    finally:
        detach(token)
    try:
        while True:
            token = attach(context)
            try:
                response = next(iterator)
            except StopIteration:
                return
            finally:
                detach(token)
            yield response
    finally:
        close = getattr(iterator, "close", None)
        if callable(close):
            token = attach(context)
            try:
                close()
            finally:
                detach(token)


_HANDLER_KINDS: Final[dict[tuple[bool, bool], tuple[str, Callable[..., Any]]]] = {
    (False, False): ("unary_unary", grpc.unary_unary_rpc_method_handler),
    (False, True): ("unary_stream", grpc.unary_stream_rpc_method_handler),
    (True, False): ("stream_unary", grpc.stream_unary_rpc_method_handler),
    (True, True): ("stream_stream", grpc.stream_stream_rpc_method_handler),
}
"""(request streaming, response streaming) -> the handler's servicer method and its factory."""


def _handler_in_context(handler: grpc.RpcMethodHandler, metadata: object) -> grpc.RpcMethodHandler:
    streams = bool(handler.response_streaming)
    name, make_handler = _HANDLER_KINDS[bool(handler.request_streaming), streams]
    wrap = _stream_in_context if streams else _response_in_context
    return make_handler(
        wrap(getattr(handler, name), metadata),
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class _ServerInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Runs every handler, and the iteration of a streamed response, in the context its call carries."""

    def intercept_service(self, continuation: Continuation, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None:  # no such method: gRPC answers UNIMPLEMENTED
            return None
        return _handler_in_context(handler, handler_call_details.invocation_metadata)


class _AioServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The same for grpc.aio servers, whose handlers may be coroutines, async generators or plain
    functions (run in the server's thread pool)."""

    async def intercept_service(self, continuation: Continuation, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        return _handler_in_context(handler, handler_call_details.invocation_metadata)


def server_interceptor() -> grpc.ServerInterceptor:
    """For ``grpc.server(executor, interceptors=[server_interceptor()])``: handlers of all four call
    types run in the context their call's metadata carries (trace context, baggage, B3)."""
    return _ServerInterceptor()


def aio_server_interceptor() -> grpc.aio.ServerInterceptor:
    """For ``grpc.aio.server(interceptors=[aio_server_interceptor()])``: the same, for grpc.aio."""
    return _AioServerInterceptor()

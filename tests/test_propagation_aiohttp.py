"""The aiohttp server middleware and client session, on real loopback sockets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import pytest
from aiohttp import ClientSession, TraceConfig, TraceRequestStartParams, web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request
from opentelemetry import baggage, trace
from opentelemetry.context import get_current

from propagation import current_routing_key, with_routing_key
from propagation.aiohttp import client_session, middleware

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]


def header_lines(request: web.Request, name: str) -> list[str]:
    return [v.decode("latin-1") for k, v in request.raw_headers if k.decode("latin-1").lower() == name]


async def echo(request: web.Request) -> web.Response:
    """The downstream service: answers with the propagation headers exactly as they arrived."""
    names = ("baggage", "traceparent", "b3", "x-b3-traceid")
    return web.json_response({name: header_lines(request, name) for name in names})


async def seen(request: web.Request) -> web.Response:
    """A handler that answers with what the middleware made current."""
    span = trace.get_current_span().get_span_context()
    return web.json_response(
        {"key": current_routing_key(), "trace_id": f"{span.trace_id:032x}", "baggage": dict(baggage.get_all())}
    )


def app_with(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    app = web.Application(middlewares=[middleware])
    app.router.add_get("/", handler)
    return app


async def test_the_handler_runs_in_the_context_the_request_carries(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(app_with(seen))
    response = await client.get("/", headers={"Baggage": "devstack=alice;ttl=5,team=a+b", "traceparent": TRACEPARENT})
    assert response.status == 200
    expected = {"key": "alice", "trace_id": TRACE_ID, "baggage": {"devstack": "alice", "team": "a+b"}}
    assert await response.json() == expected


async def test_baggage_lines_are_combined(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(app_with(seen))
    response = await client.get("/", headers=[("baggage", "team=a"), ("baggage", "devstack=alice")])
    assert (await response.json())["baggage"] == {"team": "a", "devstack": "alice"}


async def test_a_duplicated_traceparent_is_ignored(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(app_with(seen))
    response = await client.get("/", headers=[("traceparent", TRACEPARENT), ("traceparent", TRACEPARENT)])
    assert (await response.json())["trace_id"] == "0" * 32


@pytest.mark.parametrize(
    "headers",
    [
        [("baggage", "devstack=%zz")],
        [("baggage", ";,=%" * 1000)],
        [("baggage", "devstack=ålice")],
        [("traceparent", "garbage"), ("tracestate", "=,=,="), ("b3", "-")],
    ],
)
async def test_bad_headers_never_fail_the_request(
    aiohttp_client: ClientFactory, headers: list[tuple[str, str]]
) -> None:
    client = await aiohttp_client(app_with(seen))
    response = await client.get("/", headers=headers)
    assert response.status == 200
    assert (await response.json())["key"] is None


async def test_the_key_and_trace_reach_the_next_hop(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory
) -> None:
    downstream = web.Application()
    downstream.router.add_get("/", echo)
    downstream_server = await aiohttp_server(downstream)

    async def call_downstream(request: web.Request) -> web.Response:
        async with client_session() as session, session.get(downstream_server.make_url("/")) as response:
            return web.json_response(await response.json())

    client = await aiohttp_client(app_with(call_downstream))
    response = await client.get("/", headers={"baggage": "team=a,devstack=alice;ttl=5", "traceparent": TRACEPARENT})
    forwarded = await response.json()
    assert forwarded["baggage"] == ["devstack=alice;ttl=5,team=a"]
    assert forwarded["traceparent"] == [TRACEPARENT]
    assert forwarded["b3"] == [f"{TRACE_ID}-b7ad6b7169203331-1"]
    assert forwarded["x-b3-traceid"] == [TRACE_ID]


async def test_the_client_session_injects_the_callers_context(aiohttp_server: ServerFactory) -> None:
    downstream = web.Application()
    downstream.router.add_get("/", echo)
    server = await aiohttp_server(downstream)
    async with client_session() as session:
        with with_routing_key("bob"):
            async with session.get(server.make_url("/"), headers={"Baggage": "devstack=eve"}) as response:
                assert (await response.json())["baggage"] == ["devstack=bob"]
        async with session.get(server.make_url("/"), headers={"baggage": "devstack=eve"}) as response:
            assert (await response.json())["baggage"] == ["devstack=eve"]  # nothing to inject: left alone


async def test_the_client_session_keeps_the_callers_trace_configs(aiohttp_server: ServerFactory) -> None:
    downstream = web.Application()
    downstream.router.add_get("/", echo)
    server = await aiohttp_server(downstream)
    started: list[str] = []

    async def on_start(session: ClientSession, ctx: SimpleNamespace, params: TraceRequestStartParams) -> None:
        started.append(params.method)

    theirs = TraceConfig()
    theirs.on_request_start.append(on_start)
    async with client_session(trace_configs=[theirs], raise_for_status=True) as session:
        with with_routing_key("alice"):
            async with session.get(server.make_url("/")) as response:
                assert (await response.json())["baggage"] == ["devstack=alice"]
    assert started == ["GET"]


async def test_the_middleware_detaches_the_context_when_the_handler_raises() -> None:
    async def failing(request: web.Request) -> web.StreamResponse:
        assert current_routing_key() == "alice"
        raise RuntimeError("handler failed")

    before = get_current()
    request = make_mocked_request("GET", "/", headers={"baggage": "devstack=alice"})
    with pytest.raises(RuntimeError, match="handler failed"):
        await middleware(request, failing)
    assert get_current() == before


async def test_the_middleware_keeps_a_span_a_server_instrumentation_already_started() -> None:
    local = trace.NonRecordingSpan(
        trace.SpanContext(trace_id=int(TRACE_ID, 16), span_id=0x1234, is_remote=False, trace_flags=trace.TraceFlags(1))
    )
    parents: list[int] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        parents.append(trace.get_current_span().get_span_context().span_id)
        return web.Response()

    request = make_mocked_request("GET", "/", headers={"traceparent": TRACEPARENT, "baggage": "devstack=alice"})
    with trace.use_span(local):
        await middleware(request, handler)
    assert parents == [0x1234]

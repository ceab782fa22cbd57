"""The ASGI middleware, driven with real scope/receive/send callables and no framework."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.context import get_current

from propagation import current_routing_key
from propagation.asgi import Message, PropagationMiddleware, Scope

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


class Recorder:
    """An ASGI app that answers 200 and records what its handler saw."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.scopes: list[Scope] = []
        self.keys: list[str | None] = []
        self.trace_ids: list[int] = []
        self.baggage: list[dict[str, object]] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        self.keys.append(current_routing_key())
        self.trace_ids.append(trace.get_current_span().get_span_context().trace_id)
        self.baggage.append(dict(baggage.get_all()))
        if self.fail:
            raise RuntimeError("handler failed")
        if scope["type"] == "http":
            await receive()
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"ok"})


def http_scope(headers: Any) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: PropagationMiddleware, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def test_the_handler_runs_in_the_context_the_request_carries() -> None:
    inner = Recorder()
    headers = [(b"Baggage", b"devstack=alice;ttl=5"), (b"traceparent", TRACEPARENT.encode()), (b"host", b"x")]
    sent = await call(PropagationMiddleware(inner), http_scope(headers))
    assert inner.keys == ["alice"]
    assert inner.trace_ids == [int(TRACE_ID, 16)]
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_baggage_lines_are_combined() -> None:
    inner = Recorder()
    await call(PropagationMiddleware(inner), http_scope([(b"baggage", b"team=a"), (b"BAGGAGE", b"devstack=alice")]))
    assert inner.baggage == [{"team": "a", "devstack": "alice"}]


async def test_a_duplicated_traceparent_is_ignored() -> None:
    inner = Recorder()
    headers = [(b"traceparent", TRACEPARENT.encode()), (b"traceparent", TRACEPARENT.encode())]
    await call(PropagationMiddleware(inner), http_scope(headers))
    assert inner.trace_ids == [0]


async def test_a_websocket_connection_runs_in_the_context_its_handshake_carries() -> None:
    inner = Recorder()
    scope = {**http_scope([(b"baggage", b"devstack=bob")]), "type": "websocket", "scheme": "ws", "subprotocols": []}
    await call(PropagationMiddleware(inner), scope)
    assert inner.keys == ["bob"]


async def test_lifespan_passes_through_untouched() -> None:
    inner = Recorder()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    before = get_current()
    await call(PropagationMiddleware(inner), scope)
    assert inner.scopes == [scope]
    assert inner.scopes[0] is scope
    assert get_current() == before


async def test_the_context_is_detached_when_the_app_raises() -> None:
    before = get_current()
    with pytest.raises(RuntimeError, match="handler failed"):
        await call(PropagationMiddleware(Recorder(fail=True)), http_scope([(b"baggage", b"devstack=alice")]))
    assert get_current() == before
    assert current_routing_key() is None


@pytest.mark.parametrize(
    "headers",
    [None, [], [(b"baggage",)], [(b"baggage", None)], [(b"baggage", b"\xff\x00;,=%")], "garbage", [(1, 2)]],
)
async def test_bad_headers_never_fail_the_request(headers: Any) -> None:
    inner = Recorder()
    sent = await call(PropagationMiddleware(inner), http_scope(headers))
    assert inner.keys == [None]
    assert sent[0]["status"] == 200


async def test_a_scope_without_headers_is_served() -> None:
    inner = Recorder()
    scope = http_scope([])
    del scope["headers"]
    await call(PropagationMiddleware(inner), scope)
    assert inner.keys == [None]

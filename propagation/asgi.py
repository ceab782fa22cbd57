"""ASGI adapter: a pure ASGI middleware that runs each HTTP or WebSocket connection in the context
its headers carry.

This module only attaches and detaches context around the wrapped application; it must never read
or alter messages, and passes lifespan and any other scope type through untouched. Works with
Starlette, FastAPI and any ASGI 3 server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Final

from opentelemetry.context import attach, detach

from propagation.carriers import HEADERS_GETTER, inbound_context

__all__ = ["ASGIApp", "PropagationMiddleware", "Receive", "Scope", "Send"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_CONNECTION_SCOPES: Final = frozenset({"http", "websocket"})


class PropagationMiddleware:
    """Wraps an ASGI app; its handlers see the caller's trace context and baggage."""

    __slots__ = ("app",)

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") not in _CONNECTION_SCOPES:
            await self.app(scope, receive, send)
            return
        # scope["headers"] is the ASGI list of (bytes, bytes) pairs the shared getter reads as is.
        token = attach(inbound_context(scope.get("headers", ()), HEADERS_GETTER))
        try:
            await self.app(scope, receive, send)
        finally:
            detach(token)

"""aiohttp adapters: a server middleware that extracts, and a client session that injects.

This module binds the shared propagator to aiohttp's request headers in both directions and does
nothing else; it must never change a request or response beyond the propagation headers, and
never fail one because of them.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiohttp import ClientSession, TraceConfig, TraceRequestStartParams, web
from aiohttp.typedefs import Handler
from opentelemetry.context import attach, detach

from propagation.carriers import HEADERS_GETTER, inbound_context, inject

__all__ = ["client_session", "middleware", "trace_config"]


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Runs the handler in the context the request carries (trace context, baggage, B3)."""
    token = attach(inbound_context(request.headers, HEADERS_GETTER))
    try:
        return await handler(request)
    finally:
        detach(token)


async def _inject_on_request_start(
    session: ClientSession, trace_config_ctx: SimpleNamespace, params: TraceRequestStartParams
) -> None:
    # The signal runs in the caller's task, so the current context is the caller's.
    inject(params.headers)


def trace_config() -> TraceConfig:
    """A TraceConfig that injects the current context into every request of a session."""
    config = TraceConfig()
    config.on_request_start.append(_inject_on_request_start)
    return config


def client_session(**kw: Any) -> ClientSession:
    """A ``ClientSession(**kw)`` whose every request carries the caller's context downstream."""
    configs = [*(kw.pop("trace_configs", None) or ()), trace_config()]
    return ClientSession(trace_configs=configs, **kw)

"""WSGI adapter: a middleware that runs each request, and the iteration of its body, in the context
the request's headers carry.

This module only attaches and detaches context around the wrapped application (Flask, Django, any
PEP 3333 app); it must never alter the environ, the status, the headers or the body.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from opentelemetry.context import Context, attach, detach
from opentelemetry.propagators import textmap

from propagation.carriers import inbound_context

__all__ = ["PropagationMiddleware", "WsgiEnvironGetter"]


class WsgiEnvironGetter(textmap.Getter[WSGIEnvironment]):
    """Reads request headers from a WSGI environ (``HTTP_*`` keys, already combined by the server)."""

    def get(self, carrier: WSGIEnvironment, key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        if not isinstance(value, str):
            return None
        # PEP 3333 servers decode header bytes as latin-1; recover the bytes so that every carrier
        # hands the propagators the same text for the same wire bytes.
        try:
            return [value.encode("latin-1").decode("utf-8", "surrogateescape")]
        except UnicodeEncodeError:  # not a PEP 3333 string; use it as it is
            return [value]

    def keys(self, carrier: WSGIEnvironment) -> list[str]:
        return [k[5:].replace("_", "-").lower() for k in carrier if isinstance(k, str) and k.startswith("HTTP_")]


ENVIRON_GETTER = WsgiEnvironGetter()


class _BodyInContext:
    """The app's response body, iterated and closed with the request's context attached.

    Streaming responses (generators, Flask ``stream_with_context``) run handler code while the
    server iterates the body, after the app callable has returned.
    """

    __slots__ = ("_body", "_context")

    def __init__(self, body: Iterable[bytes], context: Context) -> None:
        self._body = body
        self._context = context

    def __iter__(self) -> Iterator[bytes]:
        chunks = iter(self._body)
        while True:
            token = attach(self._context)
            try:
                chunk = next(chunks)
            except StopIteration:
                return
            finally:
                detach(token)
            yield chunk

    def close(self) -> None:
        close = getattr(self._body, "close", None)
        if callable(close):
            token = attach(self._context)
            try:
                close()
            finally:
                detach(token)


class PropagationMiddleware:
    """Wraps a WSGI app; its handlers see the caller's trace context and baggage."""

    __slots__ = ("app",)

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        context = inbound_context(environ, ENVIRON_GETTER)
        token = attach(context)
        try:
            body = self.app(environ, start_response)
        finally:
            detach(token)
        if isinstance(body, list | tuple) or _is_file_wrapper(environ, body):
            return body  # no app code runs while these are sent; keeps the server's sendfile path
        return _BodyInContext(body, context)


def _is_file_wrapper(environ: WSGIEnvironment, body: object) -> bool:
    wrapper = environ.get("wsgi.file_wrapper")
    return isinstance(wrapper, type) and isinstance(body, wrapper)

"""The WSGI middleware, driven with wsgiref environs and no framework."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment
from wsgiref.util import FileWrapper, setup_testing_defaults

import pytest
from opentelemetry import trace
from opentelemetry.context import get_current

from propagation import current_routing_key, inject
from propagation.wsgi import PropagationMiddleware

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def environ(**headers: str) -> WSGIEnvironment:
    env: WSGIEnvironment = {f"HTTP_{name}": value for name, value in headers.items()}
    setup_testing_defaults(env)
    return env


def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return lambda data: None


def key_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
    start_response("200 OK", [("content-type", "text/plain")])
    trace_id = trace.get_current_span().get_span_context().trace_id
    return [f"{current_routing_key()} {trace_id:032x}".encode()]


def body(result: Iterable[bytes]) -> bytes:
    try:
        return b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()


def test_the_handler_runs_in_the_context_the_request_carries() -> None:
    app = PropagationMiddleware(key_app)
    assert body(app(environ(BAGGAGE="devstack=alice;ttl=5", TRACEPARENT=TRACEPARENT), start_response)) == (
        f"alice {TRACE_ID}".encode()
    )


def test_combined_baggage_lines_are_all_read() -> None:
    # wsgiref and other PEP 3333 servers join repeated header lines with commas.
    app = PropagationMiddleware(key_app)
    assert body(app(environ(BAGGAGE="team=a,devstack=bob"), start_response)).startswith(b"bob ")


def test_a_duplicated_traceparent_is_ignored() -> None:
    app = PropagationMiddleware(key_app)
    result = body(app(environ(TRACEPARENT=f"{TRACEPARENT},{TRACEPARENT}"), start_response))
    assert result == b"None " + b"0" * 32


def test_a_streamed_body_is_produced_in_the_requests_context() -> None:
    seen: list[str | None] = []

    def streaming_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [])
        seen.append(current_routing_key())
        yield b"a"
        seen.append(current_routing_key())
        yield inject({}).get("baggage", "").encode()

    result = PropagationMiddleware(streaming_app)(environ(BAGGAGE="devstack=alice"), start_response)
    assert current_routing_key() is None  # the app has returned: nothing stays attached
    assert body(result) == b"adevstack=alice"
    assert seen == ["alice", "alice"]
    assert current_routing_key() is None


def test_closing_the_body_runs_in_the_requests_context() -> None:
    closed_with: list[str | None] = []

    class Body:
        def __iter__(self) -> Iterator[bytes]:
            yield b"x"

        def close(self) -> None:
            closed_with.append(current_routing_key())

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return Body()

    body(PropagationMiddleware(app)(environ(BAGGAGE="devstack=alice"), start_response))
    assert closed_with == ["alice"]


def test_a_file_body_is_returned_as_is_for_the_servers_sendfile() -> None:
    import io

    file_body = FileWrapper(io.BytesIO(b"data"))

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [])
        return file_body

    env = environ()
    env["wsgi.file_wrapper"] = FileWrapper
    assert PropagationMiddleware(app)(env, start_response) is file_body


def test_the_context_is_detached_when_the_app_raises() -> None:
    def failing(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raise RuntimeError("handler failed")

    before = get_current()
    with pytest.raises(RuntimeError, match="handler failed"):
        PropagationMiddleware(failing)(environ(BAGGAGE="devstack=alice"), start_response)
    assert get_current() == before


@pytest.mark.parametrize(
    "headers",
    [
        {"BAGGAGE": "devstack=%zz"},
        {"BAGGAGE": "\xff\xfe;,=%" * 3000},
        {"TRACEPARENT": "garbage", "TRACESTATE": "=" * 10_000, "B3": "-"},
        {"BAGGAGE": "devstack=\u0100lice"},
    ],
)
def test_bad_headers_never_fail_the_request(headers: dict[str, str]) -> None:
    app = PropagationMiddleware(key_app)
    assert body(app(environ(**headers), start_response)).startswith(b"None ")


def test_a_non_string_environ_value_is_ignored() -> None:
    env = environ()
    env["HTTP_BAGGAGE"] = b"devstack=alice"
    assert body(PropagationMiddleware(key_app)(env, start_response)).startswith(b"None ")

"""router.tracing: the router as a traced hop, checked against the real OpenTelemetry SDK."""

from __future__ import annotations

import importlib.util

import pytest
from opentelemetry.sdk.resources import SERVICE_NAME
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import SpanKind, StatusCode

from router.tracing import RequestTracer, exporters_from_env, make_tracer_from_env

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01".encode()


@pytest.fixture
def exported() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer(exported: InMemorySpanExporter) -> RequestTracer:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return RequestTracer(provider)


def only_span(exported: InMemorySpanExporter) -> ReadableSpan:
    spans = exported.get_finished_spans()
    assert len(spans) == 1
    return spans[0]


def parse_traceparent(value: bytes) -> tuple[str, str, str, str]:
    version, trace_id, span_id, flags = value.decode().split("-")
    return version, trace_id, span_id, flags


def test_continues_the_callers_trace_and_names_its_own_span_downstream(
    tracer: RequestTracer, exported: InMemorySpanExporter
) -> None:
    headers = [(b"Host", b"payments"), (b"TraceParent", TRACEPARENT), (b"tracestate", b"vendor=x")]
    handle, traceparent, _ = tracer.start(
        b"GET", b"/pay?x=1", headers, "payments", "alice", "override", "http://127.0.0.1:9102"
    )
    assert traceparent is not None
    tracer.finish(handle, 200)
    span = only_span(exported)
    ctx = span.get_span_context()
    assert ctx is not None and span.parent is not None
    assert span.parent.trace_id == int(TRACE_ID, 16) and span.parent.span_id == int(PARENT_ID, 16)
    assert span.parent.is_remote
    assert ctx.trace_id == int(TRACE_ID, 16)
    assert parse_traceparent(traceparent) == ("00", TRACE_ID, f"{ctx.span_id:016x}", "01")
    assert ctx.span_id != int(PARENT_ID, 16)
    assert ctx.trace_state.get("vendor") == "x"
    assert span.kind is SpanKind.SERVER
    assert span.name == "GET payments"
    assert dict(span.attributes or {}) == {
        "http.request.method": "GET",
        "url.path": "/pay",
        "devstack.service": "payments",
        "devstack.routing_key": "alice",
        "devstack.target": "override",
        "devstack.upstream": "http://127.0.0.1:9102",
        "http.response.status_code": 200,
    }
    assert span.status.status_code is StatusCode.UNSET


def test_b3_parent_when_no_traceparent(tracer: RequestTracer, exported: InMemorySpanExporter) -> None:
    headers = [(b"X-B3-TraceId", TRACE_ID.encode()), (b"X-B3-SpanId", PARENT_ID.encode()), (b"X-B3-Sampled", b"1")]
    handle, traceparent, _ = tracer.start(b"POST", b"/", headers, "orders", None, "baseline", "http://127.0.0.1:9001")
    tracer.finish(handle, 201)
    span = only_span(exported)
    assert span.parent is not None and span.parent.span_id == int(PARENT_ID, 16)
    assert traceparent is not None and parse_traceparent(traceparent)[1] == TRACE_ID
    attributes = dict(span.attributes or {})
    assert "devstack.routing_key" not in attributes
    assert attributes["devstack.target"] == "baseline"


def test_single_header_b3_parent(tracer: RequestTracer, exported: InMemorySpanExporter) -> None:
    headers = [(b"b3", f"{TRACE_ID}-{PARENT_ID}-1".encode())]
    handle, traceparent, _ = tracer.start(b"GET", b"/", headers, "orders", None, "baseline", None)
    tracer.finish(handle, 200)
    assert only_span(exported).parent is not None
    assert traceparent is not None and parse_traceparent(traceparent)[1] == TRACE_ID


def test_w3c_wins_over_b3(tracer: RequestTracer, exported: InMemorySpanExporter) -> None:
    other = "a" * 32
    headers = [(b"x-b3-traceid", other.encode()), (b"x-b3-spanid", b"b" * 16), (b"traceparent", TRACEPARENT)]
    handle, _, _ = tracer.start(b"GET", b"/", headers, "orders", None, "baseline", None)
    tracer.finish(handle, 200)
    parent = only_span(exported).parent
    assert parent is not None and parent.trace_id == int(TRACE_ID, 16)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"traceparent", b"garbage")],
        [(b"traceparent", b"00-" + b"0" * 32 + b"-" + PARENT_ID.encode() + b"-01")],  # all-zero trace id
        [(b"traceparent", TRACEPARENT), (b"traceparent", TRACEPARENT)],  # repeated: ambiguous, invalid
        [(b"traceparent", b"\xff\xfe")],
    ],
    ids=["none", "garbage", "zero-trace-id", "repeated", "non-ascii"],
)
def test_no_or_bad_parent_starts_a_new_trace(
    tracer: RequestTracer, exported: InMemorySpanExporter, headers: list[tuple[bytes, bytes]]
) -> None:
    handle, traceparent, _ = tracer.start(b"GET", b"/", headers, "orders", None, "baseline", None)
    tracer.finish(handle, 200)
    span = only_span(exported)
    assert span.parent is None
    ctx = span.get_span_context()
    assert ctx is not None and traceparent is not None
    version, trace_id, span_id, flags = parse_traceparent(traceparent)
    assert (version, trace_id, span_id) == ("00", f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert int(flags, 16) & 1  # sampled (the SDK may also set the W3C level 2 "random" flag)
    assert trace_id != TRACE_ID


@pytest.mark.parametrize(
    ("target", "path"),
    [
        (b"/a/b?q=1#f", "/a/b"),
        (b"http://payments/a?q", "/a"),
        (b"http://payments:8080", "/"),
        (b"HTTP://payments/x", "/x"),
        (b"*", "*"),
    ],
)
def test_url_path(tracer: RequestTracer, exported: InMemorySpanExporter, target: bytes, path: str) -> None:
    handle, _, _ = tracer.start(b"OPTIONS", target, [], "payments", None, "baseline", None)
    tracer.finish(handle, 204)
    assert (only_span(exported).attributes or {})["url.path"] == path


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (200, StatusCode.UNSET, None),
        (404, StatusCode.UNSET, None),
        (499, StatusCode.UNSET, None),
        (500, StatusCode.ERROR, "500"),
        (503, StatusCode.ERROR, "503"),
        (0, StatusCode.ERROR, "no-response"),
    ],
)
def test_status(
    tracer: RequestTracer, exported: InMemorySpanExporter, status: int, code: StatusCode, error_type: str | None
) -> None:
    handle, _, _ = tracer.start(b"GET", b"/", [(b"traceparent", TRACEPARENT)], "payments", "carol", "override", None)
    tracer.finish(handle, status)
    span = only_span(exported)
    attributes = dict(span.attributes or {})
    assert span.status.status_code is code
    assert attributes.get("error.type") == error_type
    assert attributes.get("http.response.status_code") == (status or None)


def test_unsampled_parent_is_honoured(tracer: RequestTracer, exported: InMemorySpanExporter) -> None:
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00".encode()
    handle, traceparent, _ = tracer.start(b"GET", b"/", [(b"traceparent", unsampled)], "orders", None, "baseline", None)
    tracer.finish(handle, 200)
    assert exported.get_finished_spans() == ()  # parent-based sampling: not recorded
    assert traceparent is not None
    _, trace_id, _, flags = parse_traceparent(traceparent)
    assert (trace_id, flags) == (TRACE_ID, "00")


def test_sampler_off_still_propagates_the_trace(exported: InMemorySpanExporter) -> None:
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exported))
    tracer = RequestTracer(provider)
    headers = [(b"traceparent", TRACEPARENT)]
    handle, traceparent, _ = tracer.start(b"GET", b"/", headers, "orders", None, "baseline", None)
    tracer.finish(handle, 200)
    assert exported.get_finished_spans() == ()
    assert traceparent is not None and parse_traceparent(traceparent)[1] == TRACE_ID


def test_finish_ignores_what_start_did_not_make(tracer: RequestTracer, exported: InMemorySpanExporter) -> None:
    tracer.finish(None, 200)
    tracer.finish(object(), 500)
    assert exported.get_finished_spans() == ()


def test_start_never_raises(tracer: RequestTracer) -> None:
    bad: list[tuple[bytes, bytes]] = [(1, b"x")]  # type: ignore[list-item]
    assert tracer.start(b"GET", b"/", bad, "orders", None, "baseline", None) == (None, None, None)


def test_exporters_from_env() -> None:
    assert exporters_from_env({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert [type(e) for e in exporters_from_env({"OTEL_TRACES_EXPORTER": "console"})] == [ConsoleSpanExporter]
    assert [type(e) for e in exporters_from_env({"OTEL_TRACES_EXPORTER": " console , none"})] == []
    with pytest.raises(ValueError, match="no installed package"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "nosuch"})
    with pytest.raises(ValueError, match="not one of"):
        exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"})


def test_otlp_only_when_installed() -> None:
    if importlib.util.find_spec("opentelemetry.exporter") is None:
        with pytest.raises(ValueError, match="opentelemetry-exporter-otlp"):
            exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp"})
        # Unset means the OpenTelemetry default (otlp); without it installed, the console.
        assert [type(e) for e in exporters_from_env({})] == [ConsoleSpanExporter]
    else:  # pragma: no cover - the exporter is not a dependency
        assert len(exporters_from_env({"OTEL_TRACES_EXPORTER": "otlp"})) == 1


def test_make_tracer_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    tracer = make_tracer_from_env()
    assert tracer is not None
    try:
        assert tracer.provider.resource.attributes[SERVICE_NAME] == "devstack-router"
        headers = [(b"traceparent", TRACEPARENT)]
        handle, traceparent, _ = tracer.start(b"GET", b"/", headers, "a", None, "baseline", None)
        assert traceparent is not None and parse_traceparent(traceparent)[1] == TRACE_ID
        tracer.finish(handle, 200)
    finally:
        tracer.shutdown()

    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-router")
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    tracer = make_tracer_from_env()
    assert tracer is not None
    try:
        assert tracer.provider.resource.attributes[SERVICE_NAME] == "edge-router"
    finally:
        tracer.shutdown()

    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert make_tracer_from_env() is None


async def test_router_with_tracing_starts_a_server_span_and_continues_the_trace() -> None:
    import aiohttp
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from router.server import RouterServer
    from router.tracing import RequestTracer
    from tests.support import Origin, make_table

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    origin = Origin("alice")
    await origin.start()
    table = make_table({"payments": {"baseline": "http://127.0.0.1:9", "overrides": {"alice": origin.url}}})
    server = RouterServer(table=table, tracer=RequestTracer(provider))
    await server.start(("127.0.0.1", 0))
    incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Host": "payments", "baggage": "devstack=alice", "traceparent": incoming}
            async with session.get(f"http://127.0.0.1:{server.address[1]}/pay", headers=headers) as resp:
                assert resp.status == 200
    finally:
        await server.close(drain=0.1)
        await origin.close()
    (span,) = exporter.get_finished_spans()
    assert f"{span.context.trace_id:032x}" == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.parent is not None and f"{span.parent.span_id:016x}" == "00f067aa0ba902b7"
    assert span.attributes is not None
    assert span.attributes["devstack.routing_key"] == "alice"
    assert span.attributes["devstack.target"] == "override"
    (seen,) = origin.seen
    (forwarded,) = seen.header("traceparent")
    assert forwarded.split("-")[1] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert forwarded.split("-")[2] == f"{span.context.span_id:016x}"


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"traceparent", TRACEPARENT), (b"tracestate", b"vendor=x,t@sys=1")], b"vendor=x,t@sys=1"),
        ([(b"tracestate", b"vendor=x")], None),  # no traceparent: a new trace, no state of a lost one
        ([(b"traceparent", b"00-" + b"0" * 32 + b"-" + PARENT_ID.encode() + b"-01"), (b"tracestate", b"a=1")], None),
        ([(b"traceparent", TRACEPARENT), (b"tracestate", b"Bad Key=1")], None),  # invalid: discarded whole
    ],
    ids=["continued", "no-traceparent", "invalid-traceparent", "invalid-tracestate"],
)
def test_tracestate_goes_with_the_trace_it_belongs_to(
    tracer: RequestTracer, headers: list[tuple[bytes, bytes]], expected: bytes | None
) -> None:
    handle, traceparent, tracestate = tracer.start(b"GET", b"/", headers, "orders", None, "baseline", None)
    tracer.finish(handle, 200)
    assert traceparent is not None
    assert tracestate == expected

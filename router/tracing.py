"""Optional tracing: the router as a traced hop, one server span per proxied request.

When tracing is on (``devstack router --trace``), the hot path calls :meth:`RequestTracer.start`
once the routing decision is made and :meth:`RequestTracer.finish` when the exchange ends. The
span continues the caller's trace (W3C ``traceparent``/``tracestate``, or B3 when no
``traceparent`` came), and the ``traceparent`` returned by ``start`` names the router's span so the
upstream's spans become its children; the ``tracestate`` returned with it is the one the trace
carries (none when the router starts a new trace: a caller's tracestate without a valid
traceparent belongs to no trace, W3C Trace Context 3.3). Both are parsed and written by the
SDK's strict W3C propagator, so a traced router is a conforming trace-context participant.
Nothing here runs when tracing is off, and nothing here may fail a request: both methods
swallow and log their own errors.

The tracer provider follows the standard OpenTelemetry environment: ``OTEL_SERVICE_NAME`` and
``OTEL_RESOURCE_ATTRIBUTES`` (default service name ``devstack-router``), ``OTEL_TRACES_SAMPLER``
and ``OTEL_TRACES_SAMPLER_ARG``, ``OTEL_BSP_*`` for the batch processor, ``OTEL_SDK_DISABLED``,
and ``OTEL_TRACES_EXPORTER`` (``console``, ``none``, ``otlp``/``otlp_proto_grpc``/
``otlp_proto_http`` when an OTLP exporter package is installed, or any exporter registered under
the ``opentelemetry_traces_exporter`` entry point group; comma-separated for several).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from importlib.metadata import entry_points
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators import textmap
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from propagation.tracecontext import TRACEPARENT_HEADER, TRACESTATE_HEADER, DevstackTraceContextPropagator

__all__ = [
    "DEFAULT_SERVICE_NAME",
    "TRACE_HEADERS",
    "RequestTracer",
    "exporters_from_env",
    "make_tracer_from_env",
]

_log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME: Final = "devstack-router"
INSTRUMENTATION_NAME: Final = "devstack.router"

TRACE_HEADERS: Final = frozenset(
    {b"traceparent", b"tracestate", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
     b"x-b3-flags"}
)  # fmt: skip
"""Lower-case names of the request headers the parent context is read from."""

_EXPORTER_GROUP: Final = "opentelemetry_traces_exporter"
_OTLP_BY_PROTOCOL: Final = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}


class _LinesGetter(textmap.Getter[Mapping[str, list[str]]]):
    def get(self, carrier: Mapping[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key.lower())

    def keys(self, carrier: Mapping[str, list[str]]) -> list[str]:
        return list(carrier)


_GETTER: Final = _LinesGetter()
# Later propagators win on extract: W3C trace context over B3, as in the propagation SDK.
_EXTRACTOR: Final = CompositePropagator([B3MultiFormat(), B3SingleFormat(), DevstackTraceContextPropagator()])
_W3C: Final = DevstackTraceContextPropagator()


def _path_of(target: bytes) -> bytes:
    """The path of an origin-form (``/a?b``) or absolute-form (``http://host/a?b``) target."""
    if target[:1] != b"/" and b"://" in target[:16]:
        rest = target[target.index(b"://") + 3 :]
        slash = rest.find(b"/")
        target = rest[slash:] if slash >= 0 else b"/"
    for sep in (b"?", b"#"):
        end = target.find(sep)
        if end >= 0:
            target = target[:end]
    return target or b"/"


class RequestTracer:
    """Starts and ends the router's server span for each proxied request.

    ``provider`` is an SDK ``TracerProvider`` already given its span processors (tests pass one
    with an in-memory exporter); :func:`make_tracer_from_env` builds one from ``OTEL_*``.
    """

    __slots__ = ("provider", "tracer")

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer(INSTRUMENTATION_NAME)

    def start(
        self,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        service: str,
        key: str | None,
        kind: str,
        upstream: str | None,
    ) -> tuple[object, bytes | None, bytes | None]:
        """Starts the span; returns (handle for :meth:`finish`, ``traceparent`` value to send
        upstream in place of the client's, or None to forward headers unchanged, and the
        ``tracestate`` to send with it, or None for none).

        ``headers`` are the request's raw header pairs (any name case); ``kind`` is the routing
        decision (``baseline`` or ``override``); ``upstream`` the chosen upstream URL, if any.
        """
        try:
            carrier: dict[str, list[str]] = {}
            for name, value in headers:
                lower = name.lower()
                if lower in TRACE_HEADERS:
                    carrier.setdefault(lower.decode("latin-1"), []).append(value.decode("latin-1"))
            # Repeated lines are combined (RFC 9110 5.3): a repeated traceparent is then invalid.
            combined = {name: [",".join(lines)] for name, lines in carrier.items()}
            parent = _EXTRACTOR.extract(combined, Context(), _GETTER) if combined else Context()
            method_text = method.decode("latin-1")
            attributes: dict[str, AttributeValue] = {
                "http.request.method": method_text,
                "url.path": _path_of(target).decode("latin-1"),
                "devstack.service": service,
                "devstack.target": kind,
            }
            if key is not None:
                attributes["devstack.routing_key"] = key
            if upstream is not None:
                attributes["devstack.upstream"] = upstream
            span = self.tracer.start_span(
                f"{method_text} {service}", context=parent, kind=SpanKind.SERVER, attributes=attributes
            )
            out: dict[str, str] = {}
            _W3C.inject(out, trace.set_span_in_context(span, Context()))
            traceparent = out.get(TRACEPARENT_HEADER)
            if traceparent is None:
                return span, None, None
            tracestate = out.get(TRACESTATE_HEADER)
            return span, traceparent.encode("ascii"), tracestate.encode("ascii") if tracestate else None
        except Exception:  # noqa: BLE001 - tracing must never fail a request
            _log.debug("could not start a span; forwarding untraced", exc_info=True)
            return None, None, None

    def finish(self, handle: object, status: int) -> None:
        """Ends the span ``start`` returned. ``status`` is the response status sent to the client,
        or 0 when none was (client gone, upstream failed mid-response): an error either way.
        Statuses from 500 up mark the span as an error; 4xx do not (the server span rule)."""
        if not isinstance(handle, trace.Span):
            return
        try:
            if status > 0:
                handle.set_attribute("http.response.status_code", status)
            if status >= 500:
                handle.set_status(Status(StatusCode.ERROR))
                handle.set_attribute("error.type", str(status))
            elif status <= 0:
                handle.set_status(Status(StatusCode.ERROR, "no response sent"))
                handle.set_attribute("error.type", "no-response")
            handle.end()
        except Exception:  # noqa: BLE001 - tracing must never fail a request
            _log.debug("could not end a span", exc_info=True)

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        return self.provider.force_flush(timeout_millis)

    def shutdown(self) -> None:
        """Exports what is pending and stops the exporters; call once when the router stops."""
        self.provider.shutdown()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _exporter_names(environ: Mapping[str, str]) -> list[str]:
    configured = environ.get("OTEL_TRACES_EXPORTER")
    if configured is None or not configured.strip():
        # The OpenTelemetry default is otlp; without an OTLP package we say so and print instead.
        if _find_exporter(_otlp_name("otlp", environ)) is None:
            _log.warning("OTEL_TRACES_EXPORTER is unset and no OTLP exporter is installed: using console")
            return ["console"]
        return ["otlp"]
    names = [name.strip() for name in configured.split(",") if name.strip()]
    return [] if any(name.lower() == "none" for name in names) else names


def _otlp_name(name: str, environ: Mapping[str, str]) -> str:
    if name != "otlp":
        return name
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    if protocol not in _OTLP_BY_PROTOCOL:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL {protocol!r} is not one of {sorted(_OTLP_BY_PROTOCOL)}")
    return _OTLP_BY_PROTOCOL[protocol]


def _find_exporter(name: str) -> type[SpanExporter] | None:
    if name == "console":  # the SDK's own; resolved without metadata so a bare checkout works
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter  # noqa: PLC0415

        return ConsoleSpanExporter
    for entry in entry_points(group=_EXPORTER_GROUP, name=name):
        try:
            loaded = entry.load()
        except ImportError:
            return None
        return loaded if isinstance(loaded, type) and issubclass(loaded, SpanExporter) else None
    return None


def exporters_from_env(environ: Mapping[str, str] | None = None) -> list[SpanExporter]:
    """The span exporters ``OTEL_TRACES_EXPORTER`` names (``none``: no exporter).

    Raises ``ValueError`` for a name no installed package provides (e.g. ``otlp`` without
    ``opentelemetry-exporter-otlp``): a tracing flag that silently exported nothing would be worse
    than a router that refuses to start.
    """
    env = os.environ if environ is None else environ
    exporters: list[SpanExporter] = []
    for name in _exporter_names(env):
        resolved = _otlp_name(name, env)
        found = _find_exporter(resolved)
        if found is None:
            hint = " (install opentelemetry-exporter-otlp)" if resolved.startswith("otlp") else ""
            raise ValueError(f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides{hint}")
        exporters.append(found())
    return exporters


def make_tracer_from_env() -> RequestTracer | None:
    """A :class:`RequestTracer` configured from ``OTEL_*`` (see the module docstring), each
    exporter behind a ``BatchSpanProcessor``; None when ``OTEL_SDK_DISABLED=true``.

    With ``OTEL_TRACES_EXPORTER=none`` spans are still made (so upstreams see the router's span
    as their parent) but exported nowhere. The sampler comes from ``OTEL_TRACES_SAMPLER``
    (default ``parentbased_always_on``), read by the ``TracerProvider`` itself.
    """
    if _truthy(os.environ.get("OTEL_SDK_DISABLED")):
        return None
    exporters = exporters_from_env(os.environ)
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    provider = TracerProvider(resource=resource, shutdown_on_exit=True)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return RequestTracer(provider)

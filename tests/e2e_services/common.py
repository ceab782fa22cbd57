"""What every e2e service reports about the request it is serving, read from the current context."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import baggage, trace

from propagation import baggage_properties, current_routing_key

SERVICE = os.environ.get("SERVICE", "unnamed")
VERSION = os.environ.get("VERSION", "baseline")
DOWNSTREAM = os.environ.get("DOWNSTREAM", "")


def inherited_socket() -> socket.socket:
    """The listening socket the test bound on 127.0.0.1 and passed down as ``LISTEN_FD``."""
    return socket.socket(fileno=int(os.environ["LISTEN_FD"]))


def report(inbound: Mapping[str, Sequence[str]], downstream: Any = None) -> dict[str, Any]:
    """This hop as the test checks it: who served, the context the SDK extracted and the raw
    propagation headers that arrived (all lines of each)."""
    span = trace.get_current_span().get_span_context()
    return {
        "service": SERVICE,
        "version": VERSION,
        "routing_key": current_routing_key(),
        "trace_id": f"{span.trace_id:032x}" if span.is_valid else None,
        "members": {name: [str(value), list(baggage_properties(name))] for name, value in baggage.get_all().items()},
        "headers": {name: list(lines) for name, lines in inbound.items()},
        "downstream": downstream,
    }


REPORTED_HEADERS = ("baggage", "traceparent", "tracestate", "x-forwarded-host")

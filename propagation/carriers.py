"""Header carriers: the getter and setter for every header shape, and the inject/extract helpers.

This module adapts the header containers Python code passes around (dicts, multidicts, requests/
httpx/urllib headers, ASGI and Kafka lists of pairs) to the one propagator, with names compared
case-insensitively and repeated lines combined. It never raises on what a carrier holds and never
decides anything about baggage or trace context itself: the propagators do.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, MutableSequence
from typing import Any, Protocol, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context, get_current
from opentelemetry.propagators import textmap

from propagation.propagators import PROPAGATOR

__all__ = [
    "HEADERS_GETTER",
    "HEADERS_SETTER",
    "HeaderMap",
    "HeaderPairs",
    "HeadersGetter",
    "HeadersSetter",
    "ReadableHeaders",
    "extract",
    "inbound_context",
    "inject",
]

_log = logging.getLogger(__name__)


class _HasItems(Protocol):
    def items(self) -> Iterable[tuple[Any, Any]]: ...


class HeaderMap(Protocol):
    """Anything headers can be written into by name: dict, CIMultiDict, requests/httpx headers."""

    def __setitem__(self, name: str, value: str, /) -> None: ...


HeaderPairs = MutableSequence[tuple[str, bytes]]
"""Kafka-style headers: a list of (name, bytes value); written as such."""
ReadableHeaders = _HasItems | Iterable[tuple[Any, Any]]
WritableHeaders = TypeVar("WritableHeaders", bound=HeaderMap | HeaderPairs)


def _text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        # As aiohttp does: never fails, and encoding back with surrogateescape gives the exact bytes,
        # so the W3C byte limits are counted on what was on the wire.
        return bytes(value).decode("utf-8", "surrogateescape")
    return None


def _pairs(carrier: object) -> Iterator[tuple[str, object]]:
    items = getattr(carrier, "items", None)
    source = items() if callable(items) else carrier
    if isinstance(source, str | bytes | bytearray) or not isinstance(source, Iterable):
        return
    for pair in source:
        if isinstance(pair, tuple | list) and len(pair) == 2:
            name = _text(pair[0])
            if name is not None:
                yield name.lower(), pair[1]


def header_lines(carrier: object, name: str) -> list[str]:
    """Every line of header ``name`` (lower-case) in ``carrier``, in order; [] if none or unreadable."""
    lines: list[str] = []
    try:
        for key, value in _pairs(carrier):
            if key != name:
                continue
            if isinstance(value, list | tuple):
                lines.extend(t for t in map(_text, value) if t is not None)
            elif (text := _text(value)) is not None:
                lines.append(text)
    except Exception:  # noqa: BLE001 - a carrier that breaks while read carries nothing
        return []
    return lines


class HeadersGetter(textmap.Getter[object]):
    """Reads any header container; returns a header's lines combined into one value.

    Combining (RFC 9110 5.3) makes a repeated singleton such as ``traceparent`` fail its grammar, so
    a duplicated trace parent is treated as invalid, as the W3C trace-context test suite expects.
    """

    def get(self, carrier: object, key: str) -> list[str] | None:
        lines = header_lines(carrier, key.lower())
        return [",".join(lines)] if lines else None

    def keys(self, carrier: object) -> list[str]:
        try:
            return list(dict.fromkeys(name for name, _ in _pairs(carrier)))
        except Exception:  # noqa: BLE001 - a carrier that breaks while read carries nothing
            return []


class HeadersSetter(textmap.Setter[object]):
    """Writes one header, first removing every line of it under any capitalisation."""

    def set(self, carrier: object, key: str, value: str) -> None:
        name = key.lower()
        if isinstance(carrier, MutableSequence):
            carrier[:] = [pair for pair in carrier if _first_lower(pair) != name]
            carrier.append((name, value.encode("utf-8", "surrogateescape")))
            return
        keys = getattr(carrier, "keys", None)
        pop = getattr(carrier, "pop", None)
        if callable(keys) and callable(pop):
            for existing in [k for k in keys() if (_text(k) or "").lower() == name]:
                pop(existing, None)
        else:
            # email.message.Message (urllib): deleting removes every line, and a missing one is fine.
            try:
                del carrier[key]  # type: ignore[attr-defined]
            except (KeyError, TypeError, AttributeError):
                pass
        carrier[name] = value  # type: ignore[index]


def _first_lower(pair: object) -> str | None:
    if isinstance(pair, tuple | list) and pair:
        text = _text(pair[0])
        return text.lower() if text is not None else None
    return None


HEADERS_GETTER = HeadersGetter()
HEADERS_SETTER = HeadersSetter()


def inject(headers: WritableHeaders, context: Context | None = None) -> WritableHeaders:
    """Writes the trace context, baggage and B3 headers of ``context`` (default: current) into
    ``headers`` and returns it, replacing any existing line of those headers. Never raises."""
    try:
        PROPAGATOR.inject(headers, context, HEADERS_SETTER)
    except Exception:  # noqa: BLE001 - propagation must never fail a request
        _log.debug("injection failed; sending without propagation headers", exc_info=True)
    return headers


def extract(headers: ReadableHeaders, context: Context | None = None) -> Context:
    """The context ``headers`` carry, on top of ``context`` (default: an empty one, so nothing of
    the caller's leaks into e.g. a queued message's context). Never raises."""
    base = Context() if context is None else context
    try:
        return PROPAGATOR.extract(headers, base, HEADERS_GETTER)
    except Exception:  # noqa: BLE001 - propagation must never fail a request
        _log.debug("extraction failed; carrying on without propagation", exc_info=True)
        return base


def inbound_context(carrier: textmap.CarrierT, getter: textmap.Getter[textmap.CarrierT]) -> Context:
    """The context a server middleware attaches: the current one plus what the request carries.

    If a server instrumentation ran first and already holds a span continuing the remote trace,
    that span stays current: it, not the remote caller's, is the parent of outgoing calls.
    """
    current = get_current()
    try:
        extracted = PROPAGATOR.extract(carrier, current, getter)
    except Exception:  # noqa: BLE001 - propagation must never fail a request
        _log.debug("extraction failed; serving without propagation", exc_info=True)
        return current
    span = trace.get_current_span(current)
    if span.get_span_context().is_valid:
        return trace.set_span_in_context(span, extracted)
    return extracted

"""The propagators: a W3C-exact baggage propagator and the one composite every carrier uses.

This module turns ``baggage`` header text into OpenTelemetry baggage and back, by the rules in
DESIGN.md "Which key" (all lines combined, properties kept apart from values, RFC 3986
percent-coding, first duplicate wins, whole members dropped at the W3C limits), and builds the
process-wide composite of W3C trace context (ours, from ``propagation.tracecontext``), that baggage
and B3, honouring ``OTEL_PROPAGATORS``.
It must never raise on anything a carrier holds and never touches a carrier's shape itself:
getters and setters do that.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from importlib.metadata import entry_points
from typing import Final
from urllib.parse import quote

from opentelemetry import baggage
from opentelemetry.context import Context, create_key, get_current, get_value, set_value
from opentelemetry.propagators import textmap
from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
from opentelemetry.propagators.composite import CompositePropagator

from propagation.tracecontext import DevstackTraceContextPropagator

__all__ = [
    "BAGGAGE_HEADER",
    "ENTRY_POINT_GROUP",
    "MAX_BAGGAGE_BYTES",
    "MAX_BAGGAGE_MEMBERS",
    "PROPAGATOR",
    "PROPAGATOR_NAME",
    "ROUTING_MEMBER",
    "TRACECONTEXT_PROPAGATOR_NAME",
    "BaggageMember",
    "DevstackBaggagePropagator",
    "baggage_properties",
    "build_propagator",
    "format_baggage",
    "parse_baggage",
    "percent_decode",
]

_log = logging.getLogger(__name__)

BAGGAGE_HEADER: Final = "baggage"
ROUTING_MEMBER: Final = "devstack"
"""The baggage member that carries the routing key (DESIGN.md "Which key")."""
MAX_BAGGAGE_BYTES: Final = 8192
"""W3C Baggage: at least 8192 bytes must be propagated; reading exactly that bounds the work."""
MAX_BAGGAGE_MEMBERS: Final = 180
"""W3C requires at least 64 members; 180 matches the router so both agree on which members count."""
PROPAGATOR_NAME: Final = "devstack_baggage"
"""The name ``OTEL_PROPAGATORS`` uses for :class:`DevstackBaggagePropagator`."""
TRACECONTEXT_PROPAGATOR_NAME: Final = "devstack_tracecontext"
"""The entry-point name of our trace context, for OpenTelemetry's own ``OTEL_PROPAGATORS`` reading
(``opentelemetry.propagate``), where ``tracecontext`` still means OpenTelemetry's."""
ENTRY_POINT_GROUP: Final = "opentelemetry_propagator"

_OWS: Final = " \t"
_TCHARS: Final = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_BAGGAGE_OCTETS: Final = frozenset(
    chr(c) for c in (0x21, *range(0x23, 0x2C), *range(0x2D, 0x3B), *range(0x3C, 0x5C), *range(0x5D, 0x7F))
)
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_PROPERTIES_KEY: Final = create_key("devstack-baggage-properties")


@dataclasses.dataclass(frozen=True, slots=True)
class BaggageMember:
    """One list-member: ``name=value;property;...`` with ``value`` percent-decoded.

    ``properties`` are kept verbatim (``ttl=5``, ``flag``): W3C gives them no meaning, so they are
    carried, not interpreted.
    """

    name: str
    value: str
    properties: tuple[str, ...] = ()


def percent_decode(value: str) -> str | None:
    """RFC 3986 percent-decoding of ASCII ``value`` into UTF-8 text; None for a malformed escape.

    ``+`` stays ``+`` (it means space only in HTML forms); octets that are not UTF-8 become U+FFFD
    as W3C Baggage requires.
    """
    if "%" not in value:
        return value
    head, *escaped = value.split("%")
    out = bytearray(head.encode("ascii"))
    for part in escaped:
        if len(part) < 2 or not _HEX.issuperset(part[:2]):
            return None
        out.append(int(part[:2], 16))
        out += part[2:].encode("ascii")
    return out.decode("utf-8", "replace")


def _is_token(text: str) -> bool:
    return bool(text) and _TCHARS.issuperset(text)


def _property(text: str) -> str | None:
    key, eq, value = text.partition("=")
    key = key.strip(_OWS)
    if not _is_token(key):
        return None
    if not eq:
        return key
    value = value.strip(_OWS)
    return f"{key}={value}" if _BAGGAGE_OCTETS.issuperset(value) else None


def _member(text: str) -> tuple[str | None, BaggageMember | None]:
    """(name, member) for one comma-separated chunk; member is None when the chunk is invalid.

    The name is returned even for an invalid value so that the first occurrence of a name decides,
    as in the router: ``devstack=%zz,devstack=alice`` is ambiguous and carries no key.
    """
    name, eq, rest = text.partition("=")
    name = name.strip(_OWS)
    if not eq or not _is_token(name):
        return None, None
    value, *properties = rest.split(";")
    value = value.strip(_OWS)
    if not _BAGGAGE_OCTETS.issuperset(value):
        return name, None
    decoded = percent_decode(value)
    if decoded is None:
        return name, None
    # A malformed property is dropped alone: properties are opaque, and the router ignores them.
    kept = tuple(p for p in map(_property, properties) if p is not None)
    return name, BaggageMember(name, decoded, kept)


def _wire_len(text: str) -> int:
    """Bytes ``text`` took on the wire: carriers decode header bytes as UTF-8 with surrogateescape."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # a lone surrogate no carrier of ours produced; count it, never fail
        return len(text.encode("utf-8", "surrogatepass"))


def parse_baggage(lines: Iterable[str]) -> tuple[BaggageMember, ...]:
    """The valid members of the ``baggage`` header ``lines``, in order, first duplicate winning.

    Lines are combined as one comma-separated list (RFC 9110 5.3). Only members that end within the
    first ``MAX_BAGGAGE_BYTES`` bytes of that combined list and the first ``MAX_BAGGAGE_MEMBERS``
    members are read; a member cut by the limit is dropped whole. Never raises for ``str`` lines;
    anything else is ignored.
    """
    decided: dict[str, BaggageMember | None] = {}
    # Every member is charged one comma after it: between members of a line that is their comma,
    # after a line's last member it is the comma that joins it to the next line.
    budget = MAX_BAGGAGE_BYTES
    members = 0
    for line in lines:
        if not isinstance(line, str):
            continue
        # One char is at least one byte, so a chunk cut here would have failed the budget anyway;
        # the cut only bounds the work on huge carriers (dicts have no header size limit).
        for chunk in line[: max(budget, 0) + 1].split(","):
            budget -= _wire_len(chunk)
            if budget < 0 or members >= MAX_BAGGAGE_MEMBERS:
                return tuple(m for m in decided.values() if m is not None)
            budget -= 1
            members += 1
            name, member = _member(chunk)
            if name is not None and name not in decided:
                decided[name] = member
    return tuple(m for m in decided.values() if m is not None)


def _formatted(member: BaggageMember) -> str | None:
    if not _is_token(member.name):
        return None
    # Everything but RFC 3986 unreserved characters is escaped: a literal '+' would be read as a
    # space by form decoders such as OpenTelemetry Python's own baggage propagator.
    value = quote(member.value, safe="", errors="surrogatepass")
    properties = "".join(f";{p}" for p in member.properties if _property(p) == p)
    return f"{member.name}={value}{properties}"


def format_baggage(members: Iterable[BaggageMember]) -> str:
    """A ``baggage`` header value for ``members``; members that do not fit the W3C limits or cannot
    be written (a name that is not a token) are left out whole."""
    parts: list[str] = []
    size = -1  # no comma before the first member
    for member in members:
        if len(parts) >= MAX_BAGGAGE_MEMBERS:
            break
        text = _formatted(member)
        if text is None or size + len(text) + 1 > MAX_BAGGAGE_BYTES:
            continue
        parts.append(text)
        size += len(text) + 1
    return ",".join(parts)


def _recorded_properties(context: Context | None) -> Mapping[str, BaggageMember]:
    recorded = get_value(_PROPERTIES_KEY, context)
    return recorded if isinstance(recorded, Mapping) else {}


def baggage_properties(name: str, context: Context | None = None) -> tuple[str, ...]:
    """The properties that arrived with baggage member ``name``, while its value is unchanged."""
    recorded = _recorded_properties(context).get(name)
    if recorded is None or baggage.get_baggage(name, context) != recorded.value:
        return ()
    return recorded.properties


def _members_of(context: Context | None) -> Iterator[BaggageMember]:
    entries = baggage.get_all(context)
    # The routing member goes first so that any hop truncating at the W3C limits still sees it.
    names = sorted(entries, key=lambda name: name != ROUTING_MEMBER)
    for name in names:
        text = _value_text(entries[name])
        if text is not None:
            yield BaggageMember(name, text, baggage_properties(name, context))


def _value_text(value: object) -> str | None:
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:  # noqa: BLE001 - a value whose __str__ fails is dropped, not propagated
        return None


def _with_members(context: Context, members: Iterable[BaggageMember]) -> Context:
    recorded = dict(_recorded_properties(context))
    for member in members:
        context = baggage.set_baggage(member.name, member.value, context)
        if member.properties:
            recorded[member.name] = member
        else:
            recorded.pop(member.name, None)
    return set_value(_PROPERTIES_KEY, recorded, context)


class DevstackBaggagePropagator(textmap.TextMapPropagator):
    """W3C Baggage, exactly: a drop-in for OpenTelemetry's ``W3CBaggagePropagator``.

    Differs from it in reading every ``baggage`` line, keeping properties out of values, RFC 3986
    percent-coding (``+`` is a plus), dropping only the members past the W3C limits, and letting the
    first of duplicate members win. Values go into OpenTelemetry baggage; properties are recorded
    beside them and re-emitted while the value is unchanged.
    """

    def extract(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        getter: textmap.Getter[textmap.CarrierT] = textmap.default_getter,
    ) -> Context:
        base = get_current() if context is None else context
        try:
            lines = getter.get(carrier, BAGGAGE_HEADER)
            if not lines:
                return base
            members = parse_baggage([lines] if isinstance(lines, str) else lines)
            return _with_members(base, members) if members else base
        except Exception:  # noqa: BLE001 - propagation must never fail a request
            _log.debug("baggage extraction failed; carrying on without it", exc_info=True)
            return base

    def inject(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        setter: textmap.Setter[textmap.CarrierT] = textmap.default_setter,
    ) -> None:
        try:
            header = format_baggage(_members_of(context))
            if header:
                setter.set(carrier, BAGGAGE_HEADER, header)
        except Exception:  # noqa: BLE001 - propagation must never fail a request
            _log.debug("baggage injection failed; carrying on without it", exc_info=True)

    @property
    def fields(self) -> set[str]:
        return {BAGGAGE_HEADER}


def _default_propagators() -> list[textmap.TextMapPropagator]:
    # Later propagators win on extract, so W3C trace context overrides B3 when both are present.
    return [B3MultiFormat(), B3SingleFormat(), DevstackTraceContextPropagator(), DevstackBaggagePropagator()]


_OWN_PROPAGATORS: Final[Mapping[str, type[textmap.TextMapPropagator]]] = {
    PROPAGATOR_NAME: DevstackBaggagePropagator,
    TRACECONTEXT_PROPAGATOR_NAME: DevstackTraceContextPropagator,
    # Ours replaces OpenTelemetry's under its own name: same headers and the same SpanContext, only
    # the current W3C grammar. ``baggage`` keeps OpenTelemetry's, whose values ours would read
    # differently ('+', properties).
    "tracecontext": DevstackTraceContextPropagator,
}
"""Names resolved without entry points, so a source checkout works before installing."""


def _named_propagator(name: str) -> textmap.TextMapPropagator:
    own = _OWN_PROPAGATORS.get(name)
    if own is not None:
        return own()
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        raise ValueError(f"OTEL_PROPAGATORS names {name!r}, which no installed package provides")
    made = next(iter(found)).load()()
    if not isinstance(made, textmap.TextMapPropagator):
        raise TypeError(f"OTEL_PROPAGATORS entry {name!r} is not a TextMapPropagator")
    return made


def build_propagator(configured: str | None = None) -> CompositePropagator:
    """The composite named by an ``OTEL_PROPAGATORS`` value, or ours when it is unset or empty.

    Unset means W3C trace context, our baggage and B3 (single and multi header). ``tracecontext``
    names our W3C trace context, ``devstack_baggage`` our baggage, and ``none`` no propagation at
    all, as in OpenTelemetry. An unknown name raises ``ValueError``: a typo that
    silently dropped trace context would be worse than a service that refuses to start.
    """
    if configured is None or not configured.strip():
        return CompositePropagator(_default_propagators())
    names = [name.strip() for name in configured.split(",") if name.strip()]
    if any(name.lower() == "none" for name in names):
        return CompositePropagator([])
    return CompositePropagator([_named_propagator(name) for name in names])


PROPAGATOR: Final = build_propagator(os.environ.get("OTEL_PROPAGATORS"))
"""The process-wide propagator, built once at import; every carrier in this package uses it."""

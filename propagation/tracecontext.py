"""W3C Trace Context, exactly: ``traceparent`` and ``tracestate`` text to an OpenTelemetry span context and back.

This module reads and writes the two trace-context headers by the W3C specification as its test
suite checks it at ``STRICT_LEVEL=2`` (Level 2 trace flags; the ``tracestate`` key grammar of
w3c/trace-context#386): an invalid ``traceparent`` restarts the trace and takes ``tracestate``
with it, an invalid ``tracestate`` member discards the whole ``tracestate``, the first of
duplicated keys wins. It must never raise on anything a carrier holds, and never touches a
carrier's shape itself: getters and setters do that.

Why our own, rather than OpenTelemetry Python's ``TraceContextTextMapPropagator``: its
``TraceState`` checks keys against the grammar W3C replaced in 2020 (a simple key starting with a
letter, or ``tenant@system`` of at most 241 and 14 characters), in ``from_header`` and again in its
constructor and in ``add``/``update``/``delete``, and ``from_header`` discards the whole header on
a duplicated key. The W3C key is ``(lcalpha / DIGIT) 0*255(keychar)`` with ``@`` a keychar, and a
duplicate may be dropped or kept but must not take the rest with it, so the suite's strict cases
``test_tracestate_duplicated_keys``, ``test_tracestate_key_illegal_vendor_format`` and
``test_tracestate_key_length_limit`` fail through it. Wrapping its propagator cannot help, because
every ``TraceState`` it builds re-applies the old grammar; hence :class:`W3CTraceState`.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Sequence, ValuesView
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators import textmap
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

__all__ = [
    "KNOWN_TRACE_FLAGS",
    "MAX_TRACEPARENT_CHARS",
    "MAX_TRACESTATE_CHARS",
    "MAX_TRACESTATE_MEMBERS",
    "TRACEPARENT_HEADER",
    "TRACESTATE_HEADER",
    "DevstackTraceContextPropagator",
    "TraceParent",
    "W3CTraceState",
    "format_tracestate",
    "is_valid_tracestate_member",
    "parse_traceparent",
    "parse_tracestate",
]

_log = logging.getLogger(__name__)

TRACEPARENT_HEADER: Final = "traceparent"
TRACESTATE_HEADER: Final = "tracestate"
KNOWN_TRACE_FLAGS: Final = TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID
"""The flags Level 2 defines; W3C says to send every other bit as zero, whatever arrived."""
MAX_TRACEPARENT_CHARS: Final = 512
"""Longer is refused unread: later versions may append fields, but none needs this much (the same
bound as OpenTelemetry's)."""
MAX_TRACESTATE_MEMBERS: Final = 32
"""W3C's limit; a ``tracestate`` with more non-empty members is invalid and discarded whole."""
MAX_TRACESTATE_CHARS: Final = 4096
"""The longest ``tracestate`` we send, entries cut whole as W3C says. W3C asks every hop to pass at
least 512 characters; 4096 keeps the header well inside the 8190-byte field limit of aiohttp and
Apache, beside a full 8192-byte baggage header."""
_LONG_ENTRY: Final = 128
"""W3C: when ``tracestate`` must be cut, entries longer than this go first."""
_VERSION_00_CHARS: Final = 55
_OWS: Final = " \t"
_LOWER_HEX: Final = frozenset("0123456789abcdef")
_KEY: Final = re.compile(r"[a-z0-9][a-z0-9_\-*/@]{0,255}")
# Printable ASCII but ',' and '=', never ending in a space (leading spaces belong to the value).
_VALUE: Final = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")


def _is_lower_hex(text: str) -> bool:
    return bool(text) and _LOWER_HEX.issuperset(text)


@dataclasses.dataclass(frozen=True, slots=True)
class TraceParent:
    """A valid ``traceparent``: the caller's trace, its span (our parent) and the known flags."""

    trace_id: int
    parent_id: int
    trace_flags: int

    def __post_init__(self) -> None:
        if not 0 < self.trace_id < 1 << 128 or not 0 < self.parent_id < 1 << 64:
            raise ValueError("trace-id and parent-id must be non-zero and fit 16 and 8 bytes")
        if self.trace_flags & ~KNOWN_TRACE_FLAGS:
            raise ValueError(f"trace-flags {self.trace_flags:#04x} set bits Level 2 does not define")

    def to_header(self) -> str:
        """The version-00 ``traceparent`` value: the only version this module writes."""
        return f"00-{self.trace_id:032x}-{self.parent_id:016x}-{self.trace_flags:02x}"


def parse_traceparent(value: str) -> TraceParent | None:
    """The ``traceparent`` in ``value`` (one header line, OWS around it allowed), or None if invalid.

    Version 00 must match its grammar exactly, lower-case hex only. A later version (any but the
    forbidden ``ff``) is read as far as version 00 goes, provided only ``-``-led fields follow.
    All-zero ids are invalid. Flags Level 2 does not define are cleared.
    """
    text = value.strip(_OWS)
    if not _VERSION_00_CHARS <= len(text) <= MAX_TRACEPARENT_CHARS:
        return None
    version = text[:2]
    if not _is_lower_hex(version) or version == "ff":
        return None
    if len(text) > _VERSION_00_CHARS and (version == "00" or text[_VERSION_00_CHARS] != "-"):
        return None
    trace_id, parent_id, flags = text[3:35], text[36:52], text[53:55]
    if text[2] != "-" or text[35] != "-" or text[52] != "-":
        return None
    if not (_is_lower_hex(trace_id) and _is_lower_hex(parent_id) and _is_lower_hex(flags)):
        return None
    trace_number, parent_number = int(trace_id, 16), int(parent_id, 16)
    if not trace_number or not parent_number:
        return None
    return TraceParent(trace_number, parent_number, int(flags, 16) & KNOWN_TRACE_FLAGS)


def is_valid_tracestate_member(key: str, value: str) -> bool:
    """True when ``key=value`` is a list-member by the W3C grammar (key and value as sent, unstripped)."""
    return (
        isinstance(key, str)
        and isinstance(value, str)
        and len(key) <= 256
        and len(value) <= 256
        and _KEY.fullmatch(key) is not None
        and _VALUE.fullmatch(value) is not None
    )


def _members(text: str) -> Iterator[str]:
    """The non-empty comma-separated members of ``text``, OWS stripped, read lazily so that a huge
    carrier costs only what is read before the verdict."""
    start = 0
    while start <= len(text):
        end = text.find(",", start)
        if end < 0:
            end = len(text)
        member = text[start:end].strip(_OWS)
        if member:
            yield member
        start = end + 1


def parse_tracestate(lines: Iterable[str]) -> tuple[tuple[str, str], ...]:
    """The (key, value) entries of the ``tracestate`` header ``lines``, in order; () for none or invalid.

    Lines are combined as one list (RFC 9110 5.3); empty and whitespace-only members are skipped.
    More than ``MAX_TRACESTATE_MEMBERS`` members, or any member that breaks the grammar, discards
    the whole header, as the W3C suite's strict cases expect. Of duplicated keys the first (left-most,
    so by W3C's mutation rules the most recent) is kept. Never raises for ``str`` lines; anything else
    is ignored.
    """
    text = ",".join(line for line in lines if isinstance(line, str))
    entries: dict[str, str] = {}
    for count, member in enumerate(_members(text), start=1):
        key, eq, value = member.partition("=")
        if count > MAX_TRACESTATE_MEMBERS or not eq or not is_valid_tracestate_member(key, value):
            return ()
        entries.setdefault(key, value)
    return tuple(entries.items())


def format_tracestate(entries: Iterable[tuple[str, str]]) -> str:
    """A ``tracestate`` header value for ``entries``: invalid ones and repeated keys left out, at
    most ``MAX_TRACESTATE_MEMBERS``, cut to ``MAX_TRACESTATE_CHARS`` by W3C's rule (entries longer
    than 128 characters first, then from the end)."""
    seen: set[str] = set()
    members: list[str] = []
    for key, value in entries:
        if len(members) >= MAX_TRACESTATE_MEMBERS:
            break
        if key not in seen and is_valid_tracestate_member(key, value):
            seen.add(key)
            members.append(f"{key}={value}")
    size = sum(map(len, members)) + len(members) - 1
    for index in reversed(range(len(members))):
        if size <= MAX_TRACESTATE_CHARS:
            break
        if len(members[index]) > _LONG_ENTRY:
            size -= len(members.pop(index)) + 1
    while members and size > MAX_TRACESTATE_CHARS:
        size -= len(members.pop()) + 1
    return ",".join(members)


class W3CTraceState(TraceState):
    """OpenTelemetry's ``TraceState`` with the current W3C key grammar.

    It is a ``TraceState``, so ``SpanContext``, samplers and the SDK carry it unchanged to child
    spans; every public method is our own, because each of OpenTelemetry's re-validates with its old
    grammar (a test checks that none is left inherited). Semantics are OpenTelemetry's otherwise:
    immutable, at most 32 entries (more: empty), invalid entries and repeated keys dropped, ``add``
    and ``update`` put the entry first. ``from_header`` parses as :func:`parse_tracestate` does.
    """

    def __init__(self, entries: Sequence[tuple[str, str]] | None = None) -> None:
        super().__init__()
        self._entries: dict[str, str] = {}
        if entries is None or len(entries) > MAX_TRACESTATE_MEMBERS:
            return
        for key, value in entries:
            if is_valid_tracestate_member(key, value):
                self._entries.setdefault(key, value)

    def __contains__(self, item: object) -> bool:
        return item in self._entries

    def __getitem__(self, key: str) -> str:
        return self._entries[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"W3CTraceState({list(self._entries.items())!r})"

    def add(self, key: str, value: str) -> W3CTraceState:
        """A new state with ``key=value`` first; self if the key exists, is invalid, or 32 are held."""
        if key in self._entries or len(self._entries) >= MAX_TRACESTATE_MEMBERS:
            return self
        if not is_valid_tracestate_member(key, value):
            return self
        return W3CTraceState([(key, value), *self._entries.items()])

    def update(self, key: str, value: str) -> W3CTraceState:
        """A new state with ``key=value`` first (added if absent and room is left); self if invalid."""
        if not is_valid_tracestate_member(key, value):
            return self
        if key not in self._entries and len(self._entries) >= MAX_TRACESTATE_MEMBERS:
            return self
        rest = [(k, v) for k, v in self._entries.items() if k != key]
        return W3CTraceState([(key, value), *rest])

    def delete(self, key: str) -> W3CTraceState:
        """A new state without ``key``; self if it is absent."""
        if key not in self._entries:
            return self
        return W3CTraceState([(k, v) for k, v in self._entries.items() if k != key])

    def to_header(self) -> str:
        return format_tracestate(self._entries.items())

    @classmethod
    def from_header(cls, header_list: list[str]) -> W3CTraceState:
        return cls(parse_tracestate(header_list))

    @classmethod
    def get_default(cls) -> W3CTraceState:
        return cls()

    def keys(self) -> KeysView[str]:
        return self._entries.keys()

    def items(self) -> ItemsView[str, str]:
        return self._entries.items()

    def values(self) -> ValuesView[str]:
        return self._entries.values()


def _lines(found: object) -> list[str]:
    """What a getter returned, as header lines: None, a string or a sequence of strings."""
    if isinstance(found, str):
        return [found]
    if isinstance(found, Sequence):
        return [line for line in found if isinstance(line, str)]
    return []


class DevstackTraceContextPropagator(textmap.TextMapPropagator):
    """W3C Trace Context, exactly: a drop-in for OpenTelemetry's ``TraceContextTextMapPropagator``.

    Differs from it in the ``tracestate`` key grammar (W3C's current one, see the module docstring),
    in keeping the first of duplicated ``tracestate`` keys instead of discarding the header, in
    treating more than one ``traceparent`` value from the getter as invalid, in clearing trace
    flags Level 2 does not define, and in cutting what it sends to ``MAX_TRACESTATE_CHARS``.
    """

    def extract(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        getter: textmap.Getter[textmap.CarrierT] = textmap.default_getter,
    ) -> Context:
        base = Context() if context is None else context  # as OpenTelemetry's own does
        try:
            # Two traceparent fields are two claims to be the parent: W3C makes that invalid.
            lines = _lines(getter.get(carrier, TRACEPARENT_HEADER))
            parent = parse_traceparent(lines[0]) if len(lines) == 1 else None
            if parent is None:
                return base
            state = W3CTraceState(parse_tracestate(_lines(getter.get(carrier, TRACESTATE_HEADER))))
            span_context = SpanContext(
                trace_id=parent.trace_id,
                span_id=parent.parent_id,
                is_remote=True,
                trace_flags=TraceFlags(parent.trace_flags),
                trace_state=state,
            )
            return trace.set_span_in_context(NonRecordingSpan(span_context), base)
        except Exception:  # noqa: BLE001 - propagation must never fail a request
            _log.debug("trace context extraction failed; starting a new trace", exc_info=True)
            return base

    def inject(
        self,
        carrier: textmap.CarrierT,
        context: Context | None = None,
        setter: textmap.Setter[textmap.CarrierT] = textmap.default_setter,
    ) -> None:
        try:
            span_context = trace.get_current_span(context).get_span_context()
            if not span_context.is_valid:
                return
            parent = TraceParent(
                span_context.trace_id, span_context.span_id, span_context.trace_flags & KNOWN_TRACE_FLAGS
            )
            setter.set(carrier, TRACEPARENT_HEADER, parent.to_header())
            # Any TraceState works here, ours or one a sampler or another library made.
            state = format_tracestate(span_context.trace_state.items())
            if state:
                setter.set(carrier, TRACESTATE_HEADER, state)
        except Exception:  # noqa: BLE001 - propagation must never fail a request
            _log.debug("trace context injection failed; sending without it", exc_info=True)

    @property
    def fields(self) -> set[str]:
        return {TRACEPARENT_HEADER, TRACESTATE_HEADER}

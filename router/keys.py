"""Routing-key extraction: from raw request header lines to a validated key, or None.

This module decides which developer a request belongs to, by the rules in DESIGN.md "Which
key". It is pure and standard-library only, works on the bytes the parser hands over, and must
never raise on any input, never allocate more than the W3C limits allow, and never return a value
that is not a DNS-1123 label (the key is only ever used as a dictionary key, but a label can go
nowhere unexpected even if someone forgets that).

Key sources are small objects with the header they read and a pure ``key_from(lines)``; the
proxy collects the lines of each source's header and asks the sources in precedence order.
Baggage is the first (and today the only) source; a cookie or preview-host source plugs in the
same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Final

__all__ = [
    "DEFAULT_MEMBER",
    "MAX_BAGGAGE_BYTES",
    "MAX_BAGGAGE_MEMBERS",
    "BaggageKeySource",
    "KeySource",
    "is_valid_key",
    "percent_decode",
    "routing_key_from_baggage",
]

DEFAULT_MEMBER: Final = "devstack"
MAX_BAGGAGE_BYTES: Final = 8192
"""W3C Baggage: a propagator must handle at least 8192 bytes; we read exactly that much."""
MAX_BAGGAGE_MEMBERS: Final = 180
"""W3C requires at least 64 members; 180 (the earlier draft's cap) bounds work per request."""

_MAX_LABEL: Final = 63
_LABEL_BYTES: Final = b"abcdefghijklmnopqrstuvwxyz0123456789-"
_TOKEN_BYTES: Final = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_OWS: Final = b" \t"
_HEX: Final = {c: int(chr(c), 16) for c in b"0123456789abcdefABCDEF"}


class KeySource:
    """Finds a routing key in the lines of one request header; the router asks each configured
    source in turn. A base class rather than a Protocol so that, compiled, the router's call to
    ``key_from`` is a native one."""

    header: ClassVar[bytes] = b""
    """The lower-case header name whose lines this source reads."""

    def key_from(self, lines: Sequence[bytes]) -> str | None:
        """A validated key, or None. Must never raise."""
        raise NotImplementedError


def is_valid_key(value: bytes) -> bool:
    """True for a DNS-1123 label: 1-63 of ``[a-z0-9-]``, starting and ending alphanumeric."""
    return (
        0 < len(value) <= _MAX_LABEL
        and not value.translate(None, _LABEL_BYTES)
        and value[0] != 0x2D
        and value[-1] != 0x2D
    )


def percent_decode(value: bytes) -> bytes | None:
    """RFC 3986 percent-decoding; None for a malformed escape. ``+`` stays ``+``."""
    if b"%" not in value:
        return value
    out = bytearray()
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == 0x25:
            if i + 2 >= n:
                return None
            hi, lo = _HEX.get(value[i + 1]), _HEX.get(value[i + 2])
            if hi is None or lo is None:
                return None
            out.append(hi * 16 + lo)
            i += 3
        else:
            out.append(c)
            i += 1
    return bytes(out)


def _member_value(member: bytes, names: Sequence[bytes]) -> tuple[int, bytes] | None:
    """(index of the matching name, raw value) if ``member`` is ``name=value[;props]``."""
    eq = member.find(b"=")
    if eq <= 0:
        return None
    name = member[:eq].strip(_OWS)
    try:
        index = names.index(name)
    except ValueError:
        return None
    value = member[eq + 1 :]
    semi = value.find(b";")
    if semi >= 0:
        value = value[:semi]
    return index, value.strip(_OWS)


def _first_member_value(line: bytes, name: bytes) -> bytes | None:
    """Raw value (properties and OWS stripped) of the first member of ``line`` named ``name``.

    Scans with ``bytes.find`` instead of splitting every member: a name occurrence is a member
    only if nothing but OWS stands between it and the line start or a comma, and only OWS
    between it and ``=``. Values cannot contain commas, so the next comma ends the member.
    """
    size = len(name)
    start = line.find(name)
    while start >= 0:
        before = start - 1
        while before >= 0 and line[before] in _OWS:
            before -= 1
        after = start + size
        end_name = after
        while after < len(line) and line[after] in _OWS:
            after += 1
        if (before < 0 or line[before] == 0x2C) and after < len(line) and line[after] == 0x3D:
            end = line.find(b",", after)
            value = line[after + 1 :] if end < 0 else line[after + 1 : end]
            semi = value.find(b";")
            if semi >= 0:
                value = value[:semi]
            return value.strip(_OWS)
        start = line.find(name, end_name)
    return None


def routing_key_from_baggage(lines: Sequence[bytes], names: Sequence[bytes] = (DEFAULT_MEMBER.encode(),)) -> str | None:
    """The routing key carried in ``baggage`` header ``lines``, or None.

    ``names`` are member names in precedence order (the configured name, then aliases). For
    each name the first member carrying it decides, even if its value is invalid: a request
    that says ``devstack=%zz,devstack=alice`` is ambiguous and goes to the baseline. Lines are
    combined in order as one list (RFC 9110 5.3); only members that end within the first
    ``MAX_BAGGAGE_BYTES`` bytes and the first ``MAX_BAGGAGE_MEMBERS`` members are read.
    """
    total = len(lines) - 1
    count = 0
    for line in lines:
        total += len(line)
        count += line.count(b",") + 1
    if total <= MAX_BAGGAGE_BYTES and count <= MAX_BAGGAGE_MEMBERS:
        # Everything is within the W3C limits, so no member needs its own budget check.
        for name in names:
            for line in lines:
                raw = _first_member_value(line, name)
                if raw is not None:
                    decoded = percent_decode(raw)
                    if decoded is not None and is_valid_key(decoded):
                        return decoded.decode("ascii")
                    return None
        return None
    found: list[bytes | None] = [None] * len(names)
    decided = [False] * len(names)
    budget = MAX_BAGGAGE_BYTES
    members = 0
    for line in lines:
        # Each member is charged its length plus one separator; the last member of a line is
        # followed by the comma that joins it to the next line, so joins need no extra charge.
        for member in line.split(b","):
            budget -= len(member)
            if budget < 0 or members >= MAX_BAGGAGE_MEMBERS:
                break
            budget -= 1
            members += 1
            hit = _member_value(member, names)
            if hit is None or decided[hit[0]]:
                continue
            index, raw = hit
            decided[index] = True
            decoded = percent_decode(raw)
            found[index] = decoded if decoded is not None and is_valid_key(decoded) else None
        else:
            continue
        break
    for index, was_decided in enumerate(decided):
        if was_decided:
            value = found[index]
            return value.decode("ascii") if value is not None else None
    return None


def has_member(lines: Sequence[bytes], names: Sequence[bytes]) -> bool:
    """Whether any of ``lines`` carries a member called one of ``names``, valid or not: such a
    member decides the key (first wins), so nothing at the edge may add another."""
    return any(_first_member_value(line, name) is not None for name in names for line in lines)


class BaggageKeySource(KeySource):
    """Reads the routing key from W3C ``baggage`` members named ``names`` (in precedence)."""

    __slots__ = ("_cache", "_names")
    header: ClassVar[bytes] = b"baggage"
    cache_size: ClassVar[int] = 4096
    """Distinct single-line baggage values remembered; the same few values arrive again and
    again (one per developer session), and a hit costs a dict lookup instead of a parse. The
    cache is emptied when full, so hostile variety costs memory bounded by size x 8 KiB."""

    def __init__(self, names: Sequence[str] = (DEFAULT_MEMBER,)) -> None:
        encoded = []
        for name in names:
            raw = name.encode("ascii")
            if not raw or raw.translate(None, _TOKEN_BYTES):
                raise ValueError(f"baggage member name {name!r} is not an HTTP token")
            encoded.append(raw)
        self._names: tuple[bytes, ...] = tuple(encoded)
        self._cache: dict[bytes, str | None] = {}

    @property
    def names(self) -> tuple[bytes, ...]:
        return self._names

    def key_from(self, lines: Sequence[bytes]) -> str | None:
        single = lines[0] if len(lines) == 1 else None
        if single is not None:
            try:
                return self._cache[single]
            except KeyError:
                pass
        try:
            key = routing_key_from_baggage(lines, self._names)
        except Exception:  # noqa: BLE001 - extraction must never fail a request
            key = None
        if single is not None and len(single) <= MAX_BAGGAGE_BYTES:
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[single] = key
        return key

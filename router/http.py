"""HTTP/1.1 rules both sides of the hot path share, written once and free of I/O.

The field names that never cross a hop (hop-by-hop, and framing the router re-renders) and those
a ``Connection`` header may not strip; authority (Host) validation; ``Connection`` tokens; the
one-pass scan of an upstream's response head (framing, and whether it can be forwarded as
received). The router's own answers are ``router.errors``. It touches no socket and keeps no
state, so every rule here is testable without a connection. Framing fields are never copied through: the
scan reports Content-Length and Transfer-Encoding so the proxy renders its own from those values.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

__all__ = [
    "HOP_BY_HOP",
    "head_fields",
    "scan_response_head",
    "status_reason",
    "PROTECTED",
    "connection_tokens",
    "is_valid_authority",
]

HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",  # not hop-by-hop, but re-rendered by our writer, never copied
    }
)
"""Header names (lower case) never copied from one side to the other."""

PROTECTED: Final = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"baggage",
        b"traceparent",
        b"tracestate",
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)
"""Names a ``Connection`` header may not strip: framing we render and routing context every
downstream hop needs (a client listing ``baggage`` in Connection must not cut the chain)."""

_AUTHORITY_BYTES: Final = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:[]%"

_REASONS: Final = {s.value: s.phrase.encode() for s in HTTPStatus}


def connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """Lower-case tokens of all ``Connection`` header lines combined."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip(b" \t").lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def is_valid_authority(value: bytes) -> bool:
    """A Host value whole (RFC 9112 3.2, RFC 3986 3.2.2-3.2.3): a reg-name or a bracketed IP
    literal, then an optional ``:port`` that is empty or a number from 1 to 65535; no userinfo,
    no spaces. ``svc:evil.com``, ``svc:+80`` or ``svc:99999`` would otherwise reach the
    upstream and ``X-Forwarded-Host`` as if they named a host."""
    # strip() removes allowed bytes from both ends: anything left is a byte that is not allowed.
    if not 0 < len(value) <= 255 or value.strip(_AUTHORITY_BYTES):
        return False
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 0 or b"[" in value[1:] or b"]" in value[end + 1 :]:
            return False
        rest = value[end + 1 :]
        if not rest:
            return True
        if rest[:1] != b":":
            return False
        port = rest[1:]
    else:
        colon = value.find(b":")
        host = value if colon < 0 else value[:colon]
        if not host or b"[" in value or b"]" in value:
            return False
        if colon < 0:
            return True
        port = value[colon + 1 :]
    return not port or (port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535)


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


_CUT_CONNECTION: Final = frozenset({b"close", b""})


def head_fields(head: bytes) -> list[tuple[bytes, bytes]]:
    """(name, value) pairs of a head llhttp already accepted (so the syntax is known good)."""
    fields = []
    for line in head.split(b"\r\n")[1:]:
        if line:
            name, _, value = line.partition(b":")
            fields.append((name, value.strip(b" \t")))
    return fields


def status_reason(head: bytes) -> bytes:
    """The reason phrase of a status line llhttp accepted (may be empty)."""
    line = head[: head.find(b"\r\n")]
    parts = line.split(b" ", 2)
    return parts[2] if len(parts) > 2 else b""


TE_NONE: Final = 0
TE_CHUNKED: Final = 1
"""Transfer-Encoding present with chunked as its last coding."""
TE_OTHER: Final = 2
"""Transfer-Encoding present without chunked last: the body runs until the upstream closes."""

_SPLIT_WHOLE: Final = 1024
"""Buffers up to this size are split whole: a small response's head and body cost one pass."""

_HOP_OTHER: Final = HOP_BY_HOP - {b"connection", b"keep-alive", b"transfer-encoding", b"content-length"}
"""Hop-by-hop fields the response scan has no rule of its own for: their presence alone sends a
head down the rebuilding path. ``_speedups.c`` spells the same names (tests/test_http_rules.py)."""


def scan_response_head(buf: bytes) -> tuple[int, int, int, bytes | None]:
    """One pass over the response head llhttp accepted at the start of ``buf``.

    Returns ``(end, content_length, coding, passthrough)``: the offset just past the blank line
    (-1 if there is none yet); the Content-Length value or -1; TE_NONE, TE_CHUNKED or TE_OTHER;
    and the head ready to forward as received to a client whose connection stays open, or None
    when it needs rebuilding field by field. Passthrough is offered for HTTP/1.1 heads whose
    only hop-by-hop fields are ``Keep-Alive`` and a plain ``Connection: keep-alive|close``:
    ``Keep-Alive`` and ``Connection: close`` lines are cut, ``Connection: keep-alive`` is kept
    (for a persistent client connection it is the router's own option too, RFC 9110 7.6.1), and
    everything else is byte for byte. Other hop-by-hop fields, Connection naming fields,
    Transfer-Encoding or HTTP/1.0 take the rebuilding path. The response side's hot path: one
    split of the head into lines; canonical Content-Length, Content-Type and Connection:
    keep-alive lines are decided without allocating, and only lines whose name starts like a
    field of interest (c, k, p, t, u) are looked at further.
    """
    # A short buffer (a small response read whole) is split in one pass, the blank line marking
    # the head's end. A longer one is searched for the end first, so a large body read along
    # with its head is never scanned.
    if len(buf) <= _SPLIT_WHOLE:
        lines = buf.split(b"\r\n")
        blank = 1
        while blank < len(lines) - 1 and lines[blank]:
            blank += 1
        if blank >= len(lines) - 1:
            return -1, -1, TE_NONE, None  # no blank line yet
    else:
        cut = buf.find(b"\r\n\r\n")
        if cut < 0:
            return -1, -1, TE_NONE, None
        lines = buf[:cut].split(b"\r\n")
        blank = len(lines)
    passthrough_ok = buf.startswith(b"HTTP/1.1 ")
    content_length = -1
    coding = TE_NONE
    cuts: list[int] = []
    offset = len(lines[0]) + 2
    for i in range(1, blank):
        line = lines[i]
        first = line[0] | 0x20
        if first == 99 and line.startswith(b"Con"):
            if line == b"Connection: keep-alive":
                offset += len(line) + 2
                continue
            if line.startswith(b"Content-Length:"):
                content_length = int(line[15:])  # llhttp checked: digits and whitespace only
                offset += len(line) + 2
                continue
            if line.startswith(b"Content-Type:"):
                offset += len(line) + 2
                continue
        if first in (99, 107, 112, 116, 117):  # c k p t u: first letters of every name we look at
            colon = line.find(b":")
            name = line[:colon].lower()
            if name == b"content-length":
                content_length = int(line[colon + 1 :])  # llhttp checked: digits and whitespace only
            elif name == b"connection":
                option = line[colon + 1 :].strip(b" \t").lower()
                if option in _CUT_CONNECTION:
                    cuts += (offset - 2, offset + len(line))
                elif option != b"keep-alive":
                    passthrough_ok = False
            elif name == b"keep-alive":
                cuts += (offset - 2, offset + len(line))
            elif name == b"transfer-encoding":
                chunked = line[colon + 1 :].rstrip(b" \t").lower().endswith(b"chunked")
                coding = TE_CHUNKED if chunked else TE_OTHER
                passthrough_ok = False
            elif name in _HOP_OTHER:
                passthrough_ok = False
        offset += len(line) + 2
    end = offset + 2
    if not passthrough_ok:
        return end, content_length, coding, None
    if not cuts:
        return end, content_length, coding, buf[:end] if end < len(buf) else buf
    pieces = [buf[: cuts[0]]]
    for i in range(1, len(cuts) - 1, 2):
        pieces.append(buf[cuts[i] : cuts[i + 1]])
    pieces.append(buf[cuts[-1] : end])
    return end, content_length, coding, b"".join(pieces)

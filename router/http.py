"""HTTP/1.1 message rules the proxy applies: header classification and head rendering.

This module is the sans-I/O half of the hot path: it turns parsed header lists into the exact
bytes the router forwards, and renders the router's own error responses. It touches no socket
and keeps no state, so every rule here is testable without a connection. It must never copy a
framing header through unchanged: framing is always rendered by ``render_*`` from parsed values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Final

__all__ = [
    "HOP_BY_HOP",
    "head_fields",
    "passthrough_head",
    "status_reason",
    "PROTECTED",
    "connection_tokens",
    "error_response",
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
    """A Host value: reg-name or IP literal with optional port; no userinfo, no spaces."""
    return 0 < len(value) <= 255 and not value.translate(None, _AUTHORITY_BYTES)


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def error_response(
    status: int,
    reason: str,
    *,
    service: str | None = None,
    key: str | None = None,
    target: str | None = None,
    close: bool = False,
    route_header: bytes | None = None,
) -> bytes:
    """A complete response the router answers itself, with a small JSON body.

    ``service`` and ``key`` come from the route table and the validated key (labels), so they
    cannot inject anything; the JSON encoder escapes them regardless.
    """
    body = json.dumps(
        {
            "error": reason_phrase(status).decode(),
            "service": service,
            "key": key,
            "target": target,
            "reason": reason,
        },
        separators=(",", ":"),
    ).encode()
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, reason_phrase(status)),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    if route_header is not None:
        head.append(b"x-devstack-route: " + route_header + b"\r\n")
    if close:
        head.append(b"connection: close\r\n")
    head.append(b"\r\n")
    head.append(body)
    return b"".join(head)


_RESPONSE_HOP: Final = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|proxy-authenticate|proxy-authorization|te|trailer"
    rb"|transfer-encoding|upgrade)[ \t]*:([^\r]*)"
)
_SIMPLE_CONNECTION: Final = frozenset({b"keep-alive", b"close", b""})


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


def passthrough_head(head: bytes, lower: bytes) -> bytes | None:
    """``head`` ready to forward as-is, or None when it needs rebuilding field by field.

    The fast path of the response side: an HTTP/1.1 head whose only hop-by-hop fields are a
    plain ``Connection: keep-alive|close`` or ``Keep-Alive`` is forwarded without those lines
    and otherwise byte for byte (llhttp has validated every byte of it). Anything else (other
    hop-by-hop fields, Connection naming headers, HTTP/1.0) takes the rebuilding path.
    """
    if not head.startswith(b"HTTP/1.1 "):
        return None
    cuts = []
    for match in _RESPONSE_HOP.finditer(lower):
        name = match.group(1)
        if name == b"keep-alive" or (name == b"connection" and match.group(2).strip(b" \t") in _SIMPLE_CONNECTION):
            cuts.append(match.span())
        else:
            return None
    if not cuts:
        return head
    pieces = []
    start = 0
    for begin, end in cuts:
        pieces.append(head[start:begin])
        start = end
    pieces.append(head[start:])
    return b"".join(pieces)

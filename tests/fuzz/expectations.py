"""What an origin must have received for a request the reference parse accepted, by the README's
forwarding rules: the same method, origin-form target and body, every end-to-end header (all but
the hop-by-hop names, those the request's Connection lists and the router's own), Host and
X-Forwarded-Host (``compare``), at the origin its baggage routes to (``expected_origin``).
HOP_BY_HOP is written here independently of the router's table, on purpose: a reference that
borrowed it would agree with any mistake in it.
"""

from __future__ import annotations

import re

from tests.fuzz.origins import Record
from tests.fuzz.reference import Message

HOP_BY_HOP = frozenset(
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
        b"content-length",
    }
)
NEVER_STRIPPED = frozenset({b"host", b"content-length", b"transfer-encoding", b"baggage", b"traceparent", b"tracestate",
                            b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid", b"x-b3-sampled",
                            b"x-b3-flags"})  # fmt: skip
"""README "Forwarding": names a Connection header may not strip."""


def split_target(url: bytes) -> tuple[bytes | None, bytes]:
    """(authority from an absolute-form target or None, the origin-form path to forward)."""
    if url[:7].lower() != b"http://":
        return None, url
    rest = url[7:]
    m = re.search(rb"[/?#]", rest)
    end = m.start() if m else len(rest)
    path = rest[end:]
    return rest[:end], path if path.startswith(b"/") else b"/" + path


ROUTER_OWNED = HOP_BY_HOP | {b"host", b"forwarded", b"traceparent", b"baggage", b"expect", b"http2-settings"}
"""Names the router sets, reads or drops itself: a client's underscore spelling of one (which
CGI-style backends fold into it) is dropped too (README "Forwarding")."""


def end_to_end(headers: list[tuple[bytes, bytes]], dropped: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in headers
        if (lower := name.lower()) not in dropped
        and lower not in HOP_BY_HOP
        and lower not in (b"forwarded", b"http2-settings")
        and not (folded := lower.replace(b"_", b"-")).startswith((b"x-forwarded-", b"x-devstack-"))
        and not (b"_" in lower and folded in ROUTER_OWNED)
    ]


def connection_listed(req: Message) -> frozenset[bytes]:
    tokens = {t.strip(b" \t").lower() for v in req.header(b"connection") for t in v.split(b",")}
    return frozenset(tokens - {b""} - NEVER_STRIPPED)


def expected_origin(req: Message) -> str | None:
    """Where a request's baggage should take it, by the README's rules; None when not obvious."""
    lines = req.header(b"baggage")
    if not lines:
        return "baseline"
    joined = b",".join(lines)
    if len(joined) > 4096:
        return None
    for member in joined.split(b","):
        name, eq, value = member.partition(b"=")
        if not eq or name.strip(b" \t") != b"devstack":
            continue
        value = value.split(b";", 1)[0].strip(b" \t")
        if b"%" in value:
            return None
        return "alice" if value == b"alice" else "baseline"
    return "baseline"


def compare(req: Message, rec: Record, index: int) -> list[str]:
    """Differences between the reference's request and what the origin parsed from the router."""
    problems = []
    authority, path = split_target(req.url)
    if rec.method != req.method:
        problems.append(f"method {req.method!r} arrived as {rec.method!r}")
    if rec.url != path:
        problems.append(f"target {req.url!r} arrived as {rec.url!r} (expected {path!r})")
    if rec.body != req.body:
        problems.append(f"body {req.body[:80]!r} ({len(req.body)} B) arrived as {rec.body[:80]!r} ({len(rec.body)} B)")
    dropped = connection_listed(req) | ({b"host"} if authority is not None else frozenset())
    sent, seen = end_to_end(req.headers, dropped), end_to_end(rec.headers, dropped)
    if sent != seen:
        problems.append(f"end-to-end headers differ: sent {sent!r}, origin saw {seen!r}")
    if authority is not None and rec.header(b"host") != [authority]:
        problems.append(f"absolute-form {req.url!r} arrived with Host {rec.header(b'host')!r}")
    expected_host = authority if authority is not None else (req.header(b"host") or [b""])[0]
    if rec.header(b"x-forwarded-host") != [expected_host]:
        problems.append(f"X-Forwarded-Host {rec.header(b'x-forwarded-host')!r}, expected {expected_host!r}")
    return [f"request #{index}: {p}" for p in problems]

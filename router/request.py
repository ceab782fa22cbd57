"""The request policy: every decision the router makes about one request head, with no I/O.

:func:`decide` takes a parsed head (method, target, HTTP version, header lines as bytes pairs),
the listener's facts (``Policy``), what the connection remembers between its requests
(``HeadCache``: the peer, the last valid Host, the last routing lookup) and the current table
(``TableSlot``), and fills a ``Plan``: either a refusal from the catalogue in ``router.errors``,
or how to forward the request (the routing decision, the head to send upstream, the body's
framing, whether it asks for a tunnel). Every rule lives here once: the version, CONNECT, Host,
framing fields, target forms, which fields cross the hop and which the router owns, the key, the
route, X-Forwarded-*, tracing and the forwarded framing. No socket, parser or event loop is
touched, so the HTTP/1.1 connection (``router.proxy``), later front ends and the socket-free
tests (tests/test_request_policy.py) call the same function. Compiled with the hot path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from router import COMPILED
from router.errors import Answer
from router.http import HOP_BY_HOP, PROTECTED, connection_tokens, is_valid_authority
from router.keys import BaggageKeySource, KeySource
from router.settings import Mode, RouterSettings
from router.table import Decision, Routes, RouteTable

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is switched on
    from router.tracing import RequestTracer

__all__ = ["HeadCache", "Plan", "Policy", "TableSlot", "decide"]

_CRLF: Final = b"\r\n"
_COLON_SP: Final = b": "

_join: Callable[[list[bytes]], bytes] = b"".join
if COMPILED:
    # The same join without a buffer acquire and release per piece (tests/test_speedups.py).
    from router import _speedups

    _join = _speedups.join_bytes

# Request fields the single classification pass treats specially.
_F_KEY: Final = 1
_F_HOST: Final = 2
_F_CONTENT_LENGTH: Final = 3
_F_TRANSFER_ENCODING: Final = 4
_F_CONNECTION: Final = 5
_F_UPGRADE: Final = 6
_F_FORWARDED_FOR: Final = 7
_F_DEBUG: Final = 8
_F_FORWARDED: Final = 9
_F_TRACEPARENT: Final = 10
_F_DROP: Final = 11
_F_EXPECT: Final = 12
_REQUEST_FIELDS: Final = {
    b"host": _F_HOST,
    b"content-length": _F_CONTENT_LENGTH,
    b"transfer-encoding": _F_TRANSFER_ENCODING,
    b"connection": _F_CONNECTION,
    b"upgrade": _F_UPGRADE,
    b"x-forwarded-for": _F_FORWARDED_FOR,
    b"x-devstack-debug": _F_DEBUG,
    b"x-forwarded-proto": _F_FORWARDED,
    b"x-forwarded-host": _F_FORWARDED,
    b"forwarded": _F_FORWARDED,
    b"traceparent": _F_TRACEPARENT,
    b"expect": _F_EXPECT,
    # HTTP2-Settings belongs to an h2c upgrade, which is never tunnelled (RFC 9113 3.1).
    b"http2-settings": _F_DROP,
    **{name: _F_DROP for name in HOP_BY_HOP - {b"content-length", b"transfer-encoding", b"connection", b"upgrade"}},
}
_CONNECTION_OPTIONS: Final = frozenset({b"close", b"keep-alive", b"upgrade"})
_TRACE_FIELDS: Final = frozenset({b"traceparent", b"tracestate"})


class TableSlot:
    """The one mutable reference to the current table; the controller side swaps it whole."""

    __slots__ = ("generation", "table")

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        self.generation = 0
        """Bumped by every swap: connections remember lookups made in one generation."""

    def swap(self, table: RouteTable) -> None:
        self.table = table
        self.generation += 1


class Policy:
    """The facts of one listener that every request's decision reads; fixed at start."""

    def __init__(
        self,
        settings: RouterSettings,
        key_sources: Sequence[KeySource] | None = None,
        tracer: RequestTracer | None = None,
    ) -> None:
        self.key_sources: tuple[KeySource, ...] = tuple(
            key_sources if key_sources is not None else (BaggageKeySource(settings.key_members),)
        )
        key_headers = frozenset(source.header for source in self.key_sources)
        self.fields: dict[bytes, int] = {**_REQUEST_FIELDS, **dict.fromkeys(key_headers, _F_KEY)}
        self.trust_forwarded = settings.trust_forwarded
        self.upgrade_protocols = settings.upgrade_protocols
        self.max_body = settings.limits.max_body_bytes
        self.small_body = settings.limits.small_body
        self.no_route = Answer.NO_ROUTE_SIDECAR if settings.mode is Mode.SIDECAR else Answer.NO_ROUTE
        self.tracer = tracer
        """Off (None) by default: then tracing costs one attribute check per request."""


class HeadCache:
    """What one client connection remembers between its requests. A connection nearly always
    names one authority, so Host validation, the routing lookup and the X-Forwarded-* lines
    are done once per connection and table rather than once per request."""

    def __init__(self, peer: bytes = b"") -> None:
        self.peer = peer
        self.valid_host: bytes | None = None
        """The last Host value that passed validation, as received."""
        self.host_padded = False
        """Whether that value ends in whitespace, which is not part of it (RFC 9110 5.5): llhttp
        keeps it, so it is trimmed here rather than per field for every header."""
        self.route_authority: bytes | None = None
        self.route_generation = -1
        self.routes: Routes | None = None
        self.forwarded_authority: bytes | None = None
        self.forwarded = b""
        """X-Forwarded-* lines for ``forwarded_authority`` and the peer."""


class Plan:
    """What :func:`decide` made of one request: a refusal, or how to forward it."""

    def __init__(self) -> None:
        self.refusal: Answer | None = None
        """Set when the router answers itself; nothing is forwarded."""
        self.detail: str | None = None
        """The parser's own words for a malformed request (refusals found by the front end)."""
        self.method = b""
        self.target = b""
        """The request target as received (the access log's path)."""
        self.authority = b""
        """The authority routed on (Host, or an absolute-form target's), once known."""
        self.http11 = True
        self.keep_alive = False
        self.upgrade = False
        """A tunnel is asked for with protocols the router allows (the rest were dropped)."""
        self.chunked = False
        self.has_body = False
        self.small_body = False
        """A body small enough to read whole before taking an upstream connection."""
        self.debug = False
        self.key: str | None = None
        self.decision: Decision | None = None
        self.head = b""
        """The request head to send upstream, kept for a single safe retry."""
        self.span: object = None


def _add_field(out: list[bytes], name: bytes, value: bytes) -> None:
    # Four appends, not `out += (name, b": ", value, _CRLF)`: no tuple per field (compiled, the
    # call itself is a direct C call).
    out.append(name)
    out.append(_COLON_SP)
    out.append(value)
    out.append(_CRLF)


def _forges_owned_field(lower: bytes, fields: dict[bytes, int]) -> bool:
    """A name with underscores that CGI-style backends (PHP, WSGI's environ, nginx's
    ``$http_*``) fold into one the router owns: ``X_Forwarded_For`` would arrive as
    ``X-Forwarded-For`` past our cleaning, ``Content_Length`` as a second framing header."""
    folded = lower.replace(b"_", b"-")
    return folded in fields or folded.startswith(b"x-devstack-")


def _tunnel_protocols(upgrade: bytes, allowed: frozenset[bytes]) -> bytes:
    """The tokens of an ``Upgrade`` value the router may tunnel, as sent; empty when none."""
    kept = []
    for token in upgrade.split(b","):
        token = token.strip(b" \t")
        if token and token.partition(b"/")[0].lower() in allowed:
            kept.append(token)
    return b", ".join(kept)


def _without_fields(out: list[bytes], names: frozenset[bytes]) -> list[bytes]:
    """The rendered head pieces minus the fields called ``names`` (rare: Connection-listed
    fields, a traceparent the router replaces). Pieces after the request line come in fours."""
    kept = out[:4]
    for i in range(4, len(out), 4):
        if out[i].lower() not in names:
            kept += out[i : i + 4]
    return kept


def decide(
    policy: Policy,
    cache: HeadCache,
    slot: TableSlot,
    method: bytes,
    target: bytes,
    version: str,
    keep_alive: bool,
    parser_upgrade: bool,
    headers: list[tuple[bytes, bytes]],
    plan: Plan,
) -> Plan:
    """Decide what to do with one request head, filling and returning ``plan``.

    ``version`` is the HTTP version as the request line said it (``"1.1"``); ``keep_alive`` and
    ``parser_upgrade`` are the front end's reading of the connection (for HTTP/1.1, llhttp's:
    whether the connection persists, and whether the parser hands what follows the head to a
    tunnel). A refusal leaves ``plan.refusal`` set and ``plan.keep_alive`` false when the answer
    closes the connection; otherwise ``plan.decision`` and ``plan.head`` say where and what to
    send (a decision without a target is a refusal too, from the table).
    """
    plan.method = method  # first, so even a refusal of a HEAD request is sent without a body
    plan.target = target
    plan.keep_alive = keep_alive
    refusal = _decide(policy, cache, slot, method, target, version, parser_upgrade, headers, plan)
    if refusal is not None:
        plan.refusal = refusal
        if refusal.closes:
            plan.keep_alive = False
    return plan


def _decide(
    policy: Policy,
    cache: HeadCache,
    slot: TableSlot,
    method: bytes,
    target: bytes,
    version: str,
    parser_upgrade: bool,
    headers: list[tuple[bytes, bytes]],
    plan: Plan,
) -> Answer | None:
    if version == "1.1":
        plan.http11 = True
    elif version == "1.0":
        plan.http11 = False
    elif version == "0.9":
        return Answer.HTTP_09
    else:
        return Answer.VERSION
    if method == b"CONNECT":
        return Answer.CONNECT

    # Only absolute-form names its own authority; origin-form and OPTIONS' asterisk-form
    # forward the client's Host line where it stood.
    absolute = target[:1] != b"/" and target != b"*"
    fields = policy.fields
    host: bytes | None = None
    content_length = -1
    transfer_encoding: bytes | None = None
    connection: list[bytes] | None = None
    upgrade = b""
    # The routing-key fields: the first one as a name and value (the usual case is exactly
    # one baggage line), any further ones in a list made only when they occur.
    key_name: bytes | None = None
    key_value = b""
    more_key_fields: list[tuple[bytes, bytes]] | None = None
    forwarded_for = b""
    expect = False
    # One pass classifies every field and renders the forwarded ones; the rare cases that
    # need a second look (Connection naming fields, tracing) re-render afterwards.
    out: list[bytes] = [method, b" ", b"", b" HTTP/1.1\r\n"]
    for name, value in headers:
        lower = name.lower()
        code = fields.get(lower)
        if code is None:
            # The router's own fields are its to set, in any spelling a backend might fold.
            if not lower.startswith(b"x-devstack-") and not (b"_" in lower and _forges_owned_field(lower, fields)):
                _add_field(out, name, value)
        elif code is _F_KEY:
            if key_name is None:
                key_name = lower
                key_value = value
            elif more_key_fields is None:
                more_key_fields = [(lower, value)]
            else:
                more_key_fields.append((lower, value))
            _add_field(out, name, value)
        elif code is _F_HOST:
            if host is not None:
                return Answer.HOST_REPEATED
            host = value
            if not absolute:
                _add_field(out, name, value)
        elif code is _F_CONTENT_LENGTH:
            # The front end's parser accepted exactly one value of digits (llhttp for HTTP/1.1).
            content_length = int(value)
        elif code is _F_TRANSFER_ENCODING:
            if transfer_encoding is not None:
                return Answer.TE_REPEATED
            transfer_encoding = value
        elif code is _F_CONNECTION:
            connection = [value] if connection is None else [*connection, value]
        elif code is _F_UPGRADE:
            upgrade = value if not upgrade else upgrade + b", " + value
        elif code is _F_FORWARDED_FOR:
            forwarded_for = value if not forwarded_for else forwarded_for + b", " + value
        elif code is _F_DEBUG:
            plan.debug = value.strip() == b"1"
        elif code is _F_FORWARDED:
            if policy.trust_forwarded:
                _add_field(out, name, value)
        elif code is _F_TRACEPARENT:
            _add_field(out, name, value)
        elif code is _F_EXPECT:
            expect = True
            _add_field(out, name, value)
        # _F_DROP: hop-by-hop, never forwarded

    if host is None and plan.http11:
        return Answer.NO_HOST
    if host is not None:
        if host != cache.valid_host:
            trimmed = host.rstrip(b" \t")
            if not is_valid_authority(trimmed):
                return Answer.HOST_INVALID
            cache.valid_host = host
            cache.host_padded = len(trimmed) != len(host)
        if cache.host_padded:
            padded, host = host, host.rstrip(b" \t")
            for i in range(6, len(out), 4):  # field values sit at 6, 10, ... (see _add_field)
                if out[i] is padded:  # this very object: no other field can be mistaken for it
                    out[i] = host
                    break
    if transfer_encoding is not None:
        if not plan.http11:
            return Answer.TE_IN_HTTP10
        if transfer_encoding.strip(b" \t").lower() != b"chunked":
            return Answer.TE_UNSUPPORTED
        plan.chunked = True
        plan.has_body = True
    elif content_length > 0:
        plan.has_body = True
        # A client that sent Expect: 100-continue waits for the upstream before its body.
        plan.small_body = content_length <= policy.small_body and not expect
    if parser_upgrade:
        # Only allowed protocols open a tunnel, and only from HTTP/1.1 (RFC 9110 7.8); any
        # other Upgrade is dropped and the request goes on as a plain one.
        upgrade = _tunnel_protocols(upgrade, policy.upgrade_protocols) if plan.http11 else b""
        plan.upgrade = bool(upgrade)
        if plan.has_body:
            # llhttp hands everything after an Upgrade head to the tunnel, so a body here
            # would be forwarded as tunnel bytes under a framing header that promises otherwise.
            return Answer.UPGRADE_WITH_BODY
    max_body = policy.max_body
    if max_body and content_length > max_body:
        return Answer.BODY_TOO_LARGE

    authority = host
    if target[:1] == b"/":
        path = target
    elif absolute and target[:7].lower() == b"http://":
        rest = target[7:]
        end = len(rest)
        for sep in (b"/", b"?", b"#"):
            found = rest.find(sep)
            if 0 <= found < end:
                end = found
        authority = rest[:end]
        path = rest[end:]
        if not path.startswith(b"/"):
            path = b"/" + path
        if b"@" in authority or not is_valid_authority(authority):
            return Answer.TARGET_AUTHORITY
        out += (b"Host", b": ", authority, _CRLF)
    elif target == b"*" and method == b"OPTIONS":
        path = target
    else:
        return Answer.TARGET_FORM
    if authority is None:
        return Answer.NO_AUTHORITY
    plan.authority = authority

    if authority == cache.route_authority and slot.generation == cache.route_generation:
        routes = cache.routes
    else:
        routes = slot.table.routes_for_authority(authority.decode("latin-1"))
        cache.route_authority = authority
        cache.route_generation = slot.generation
        cache.routes = routes
    if routes is None:
        return policy.no_route
    key: str | None = None
    if key_name is not None:
        for source in policy.key_sources:
            lines = [key_value] if source.header == key_name else []
            if more_key_fields is not None:
                lines += [value for field, value in more_key_fields if field == source.header]
            if lines:
                key = source.key_from(lines)
                if key is not None:
                    break
    plan.key = key
    decision = routes.resolve(key)
    plan.decision = decision
    if decision.target is None:
        return decision.answer

    out[2] = path
    if connection is not None:
        stripped = connection_tokens(connection) - PROTECTED - _CONNECTION_OPTIONS
        if stripped:
            out = _without_fields(out, stripped)
    tracer = policy.tracer
    if tracer is not None:
        plan.span, traceparent, tracestate = tracer.start(
            method, target, headers, routes.service, key, decision.kind.value, decision.target.url
        )
        if traceparent is not None:
            # The router's span is the parent now; the tracestate goes with the trace it
            # belongs to (none when the client's traceparent was missing or invalid).
            out = _without_fields(out, _TRACE_FIELDS)
            out += (b"traceparent: ", traceparent, _CRLF)
            if tracestate is not None:
                out += (b"tracestate: ", tracestate, _CRLF)
    peer = cache.peer
    if not forwarded_for and not policy.trust_forwarded:
        # The usual case, rendered once per connection and authority rather than per request.
        if authority != cache.forwarded_authority:
            cache.forwarded_authority = authority
            cache.forwarded = (
                b"X-Forwarded-For: " + peer + b"\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: " + authority + _CRLF
            )
        out.append(cache.forwarded)
    else:
        out += (b"X-Forwarded-For: ", forwarded_for + b", " + peer if forwarded_for else peer, _CRLF)
        if not policy.trust_forwarded:
            out += (b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: ", authority, _CRLF)
    if plan.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length >= 0 and (content_length > 0 or method not in (b"GET", b"HEAD")):
        out.append(b"Content-Length: %d\r\n" % content_length)
    if plan.upgrade and upgrade:
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, _CRLF)
    out.append(_CRLF)
    plan.head = _join(out)
    return None

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

import ipaddress
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final

from router import COMPILED
from router.errors import Answer
from router.http import HOP_BY_HOP, PROTECTED, connection_tokens, is_valid_authority
from router.keys import BaggageKeySource, KeySource, has_member, is_valid_key, percent_decode
from router.scope import RouteScope
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
_F_EDGE_HEADER: Final = 13
_F_COOKIE: Final = 14
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
KEY_HEADER: Final = b"x-devstack-key"
"""The browser extension's private header (a page never sends it; the router merges it into
``baggage``, which an extension cannot append to)."""
KEY_COOKIE: Final = b"devstack-key"
KEY_PARAM: Final = b"devstack"
"""``?devstack=KEY`` on a navigation sets the key cookie; ``?devstack=`` clears it."""
_TRACE_FIELDS: Final = frozenset({b"traceparent", b"tracestate"})


class TableSlot:
    """The one mutable reference to the current table; the controller side swaps it whole."""

    __slots__ = ("generation", "scope", "table")

    def __init__(self, table: RouteTable) -> None:
        self.table = table
        self.generation = 0
        """Bumped by every swap: connections remember lookups made in one generation."""
        self.scope: RouteScope | None = None
        """A scoped sidecar's names (``--services``, ``--learn-services``); None follows everything."""

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
        self.edge = settings.mode is Mode.INGRESS and bool(
            settings.preview_domain or settings.key_header or settings.key_cookie
        )
        """Any edge key source on: browsers may choose a key here (ingress mode only)."""
        self.preview_suffix = (
            b"." + settings.preview_domain.lower().strip(".").encode("ascii")
            if self.edge and settings.preview_domain
            else b""
        )
        self.key_header = self.edge and settings.key_header
        self.key_cookie = self.edge and settings.key_cookie
        if self.key_header:
            self.fields[KEY_HEADER] = _F_EDGE_HEADER
        if self.key_cookie:
            self.fields[b"cookie"] = _F_COOKIE
        self.key_member = settings.key_members[0].encode("ascii")
        """The baggage member an edge key is written into."""
        self.baggage_names: tuple[bytes, ...] = next(
            (source.names for source in self.key_sources if isinstance(source, BaggageKeySource)),
            (self.key_member,),
        )
        cookie = b"; Path=/; HttpOnly; SameSite=Lax"
        if settings.key_cookie_domain:
            cookie += b"; Domain=" + settings.key_cookie_domain.encode("ascii")
        self.cookie_attributes = cookie
        self.cookie_max_age = settings.key_cookie_max_age
        self.edge_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in settings.edge_key_clients
        )
        self.tracer = tracer
        """Off (None) by default: then tracing costs one attribute check per request."""
        self.forwarded_proto = b"https" if settings.tls_cert else b"http"
        """The X-Forwarded-Proto the router writes: what the client spoke to this listener."""


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
        self.preview_key: str | None = None
        """The key a preview host named (with ``routes``: both come from one authority)."""
        self.edge_allowed = -1
        """Whether this peer may choose a key at the edge: -1 not yet decided, 0 no, 1 yes."""


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
        self.key_source = b""
        """Where the key came from when edge sources are on: baggage, preview-host, header or cookie."""
        self.overruled = b""
        """Edge sources that named another key and lost (``cookie=bob``), for the debug header."""
        self.extra_head = b""
        """Fields the router's own answer carries (the key cookie's Location and Set-Cookie)."""
        self.connect = False
        """A sidecar's ``CONNECT`` to a service in the table: answered 200, then the connection
        is served as if the client had connected to the router for that service."""

    def route_header(self) -> bytes:
        """The ``x-devstack-route`` value (debug requests only)."""
        decision = self.decision
        assert decision is not None
        rendered = decision.route_header(self.key)
        if self.key_source:
            rendered += b"; source=" + self.key_source
        if self.overruled:
            rendered += b"; overruled=" + self.overruled
        return rendered


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
        return _connect(policy, slot, target, plan)

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
    baggage_index = -1
    """Where the last baggage value sits in ``out`` (an edge key is appended to it)."""
    header_key: bytes | None = None
    cookie_indices: list[int] | None = None
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
            if lower == b"baggage":
                baggage_index = len(out) - 2
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
        elif code is _F_EDGE_HEADER:
            header_key = value  # the extension's header: read, never forwarded
        elif code is _F_COOKIE:
            _add_field(out, name, value)
            if cookie_indices is None:
                cookie_indices = [len(out) - 2]
            else:
                cookie_indices.append(len(out) - 2)
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
        preview_key: str | None = None
        routes = None
        if policy.preview_suffix:
            routes, preview_key = _preview(slot.table, authority, policy.preview_suffix)
        if routes is None:
            routes = slot.table.routes_for_authority(authority.decode("latin-1"))
        cache.route_authority = authority
        cache.route_generation = slot.generation
        cache.routes = routes
        cache.preview_key = preview_key
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
    if policy.edge:
        baggage_lines = [out[baggage_index]] if baggage_index >= 0 else []
        if more_key_fields is not None or (key_name is not None and key_name != b"baggage"):
            baggage_lines = [value for field, value in headers if field.lower() == b"baggage"]
        refusal = _edge(policy, cache, plan, key, baggage_lines, header_key, cookie_indices, out, baggage_index,
                        method, path)  # fmt: skip
        if refusal is not None:
            return refusal
        key = plan.key
    else:
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
                b"X-Forwarded-For: " + peer + b"\r\nX-Forwarded-Proto: " + policy.forwarded_proto
                + b"\r\nX-Forwarded-Host: " + authority + _CRLF
            )
        out.append(cache.forwarded)
    else:
        out += (b"X-Forwarded-For: ", forwarded_for + b", " + peer if forwarded_for else peer, _CRLF)
        if not policy.trust_forwarded:
            out += (b"X-Forwarded-Proto: ", policy.forwarded_proto, b"\r\nX-Forwarded-Host: ", authority, _CRLF)
    if plan.chunked:
        out.append(b"Transfer-Encoding: chunked\r\n")
    elif content_length >= 0 and (content_length > 0 or method not in (b"GET", b"HEAD")):
        out.append(b"Content-Length: %d\r\n" % content_length)
    if plan.upgrade and upgrade:
        out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, _CRLF)
    out.append(_CRLF)
    plan.head = _join(out)
    return None


def _connect(policy: Policy, slot: TableSlot, target: bytes, plan: Plan) -> Answer | None:
    """``CONNECT host:port`` (what gRPC and other clients send through ``grpc_proxy`` or
    ``http_proxy``): a sidecar accepts it only for a service in its table, so the router never
    becomes an open proxy; an ingress refuses it outright."""
    if policy.no_route is not Answer.NO_ROUTE_SIDECAR:
        return Answer.CONNECT
    if b"@" in target or target[:1] == b"/" or not is_valid_authority(target):
        return Answer.TARGET_AUTHORITY
    plan.authority = target  # a learning sidecar subscribes to it when it names no service yet
    if slot.table.routes_for_authority(target.decode("latin-1")) is None:
        return Answer.NO_ROUTE_SIDECAR
    plan.connect = True
    return None


def _preview(table: RouteTable, authority: bytes, suffix: bytes) -> tuple[Routes | None, str | None]:
    """``KEY--SERVICE<suffix>[:port]``: the service's routes and the key, or (None, None).
    ``--`` cannot start or end a DNS-1123 label, so the first ``--`` splits key from service."""
    host = authority.lower()
    if host[:1] == b"[":
        return None, None
    colon = host.rfind(b":")
    if colon > 0:
        host = host[:colon]
    if not host.endswith(suffix):
        return None, None
    label = host[: len(host) - len(suffix)]
    split = label.find(b"--")
    if split <= 0 or b"." in label:
        return None, None
    key, service = label[:split], label[split + 2 :]
    if not is_valid_key(key) or not is_valid_key(service):
        return None, None
    routes = table.services.get(service.decode("ascii"))
    return (routes, key.decode("ascii")) if routes is not None else (None, None)


def _edge(
    policy: Policy,
    cache: HeadCache,
    plan: Plan,
    key: str | None,
    baggage_lines: list[bytes],
    header_key: bytes | None,
    cookie_indices: list[int] | None,
    out: list[bytes],
    baggage_index: int,
    method: bytes,
    path: bytes,
) -> Answer | None:
    """The edge key sources (ingress mode, when any is on). A ``devstack`` member already in
    ``baggage`` wins, valid or not; then a preview host, the extension's header, the cookie. The
    chosen key is written into the forwarded ``baggage`` so every hop downstream sees it; the
    extension's header and the cookie pair are never forwarded. Sets ``plan.key``."""
    allowed = cache.edge_allowed
    if allowed < 0:
        allowed = cache.edge_allowed = _edge_allowed(policy, cache.peer)
    cookie_key: bytes | None = None
    if cookie_indices is not None:
        cookie_key = _take_cookie(out, cookie_indices)
    plan.key = key
    if not allowed:
        return None  # a client outside --edge-key-clients: its edge sources count for nothing
    if policy.key_cookie and method in (b"GET", b"HEAD") and KEY_PARAM + b"=" in path:
        answer = _cookie_answer(policy, plan, path)
        if answer is not None:
            return answer
    candidates: list[tuple[bytes, str]] = []
    if cache.preview_key is not None:
        candidates.append((b"preview-host", cache.preview_key))
    if header_key is not None and is_valid_key(header_key.strip(b" \t")):
        candidates.append((b"header", header_key.strip(b" \t").decode("ascii")))
    if cookie_key is not None:
        candidates.append((b"cookie", cookie_key.decode("ascii")))
    if key is not None or (baggage_lines and has_member(baggage_lines, policy.baggage_names)):
        plan.key_source = b"baggage"
        chosen = key
    elif candidates:
        source, chosen = candidates[0]
        plan.key_source = source
        plan.key = chosen
        member = policy.key_member + b"=" + chosen.encode("ascii")
        if baggage_index >= 0:
            out[baggage_index] = out[baggage_index] + b"," + member  # the client's members stay as sent
        else:
            _add_field(out, b"baggage", member)
    else:
        return None
    lost = [source + b"=" + other.encode("ascii") for source, other in candidates if other != chosen]
    if lost:
        plan.overruled = b",".join(lost)
    return None


def _edge_allowed(policy: Policy, peer: bytes) -> int:
    networks = policy.edge_networks
    if not networks:
        return 1
    try:
        address = ipaddress.ip_address(peer.decode("ascii"))
    except ValueError:
        return 0
    return 1 if any(address in network for network in networks) else 0


def _take_cookie(out: list[bytes], indices: list[int]) -> bytes | None:
    """Remove every ``devstack-key`` pair from the forwarded Cookie lines (a line left empty is
    dropped); the first valid value found, or None."""
    found: bytes | None = None
    for index in reversed(indices):
        value = out[index]
        if KEY_COOKIE not in value:
            continue
        kept = []
        for pair in value.split(b";"):
            name, _, raw = pair.strip(b" \t").partition(b"=")
            if name == KEY_COOKIE:
                if is_valid_key(raw):
                    found = raw  # lines are walked backwards: the first line's value is kept last
                continue
            kept.append(pair.strip(b" \t"))
        if kept:
            out[index] = b"; ".join(kept)
        else:
            del out[index - 2 : index + 2]  # the whole field: name, ": ", value, CRLF
    return found


def _cookie_answer(policy: Policy, plan: Plan, path: bytes) -> Answer | None:
    """``?devstack=KEY`` on a navigation: 302 to the same URL without it, setting (or with an
    empty value clearing) the key cookie. None when the query has no such parameter."""
    question = path.find(b"?")
    if question < 0:
        return None
    params = path[question + 1 :].split(b"&")
    for i, param in enumerate(params):
        name, _, raw = param.partition(b"=")
        if name != KEY_PARAM:
            continue
        value = percent_decode(raw)
        if value is None or (value and not is_valid_key(value)):
            return Answer.EDGE_KEY_INVALID
        rest = params[:i] + params[i + 1 :]
        location = path[:question] + (b"?" + b"&".join(rest) if rest else b"")
        location = b"/" + location.lstrip(b"/")  # never "//host": the redirect stays on this site
        max_age = policy.cookie_max_age if value else 0
        plan.extra_head = (
            b"location: " + location + b"\r\nset-cookie: " + KEY_COOKIE + b"=" + value
            + b"; Max-Age=%d" % max_age + policy.cookie_attributes + b"\r\ncache-control: no-store\r\n"
        )  # fmt: skip
        return Answer.KEY_COOKIE
    return None

"""Router settings: every limit and timeout, grouped, each default with the reason it is that.

This module only describes configuration; it reads no files and opens no sockets. The CLI fills
it from flags, tests construct it directly.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress

from router.keys import DEFAULT_MEMBER


class Mode(enum.Enum):
    INGRESS = "ingress"
    """Edge proxy: unknown authorities get 404, like any virtual-host server."""
    SIDECAR = "sidecar"
    """HTTP_PROXY for one pod: unknown authorities get 403, the answer of a closed forward proxy."""


@dataclasses.dataclass(frozen=True, slots=True)
class Timeouts:
    header_read: float = 15.0
    """Seconds a client has to send a complete request head: slowloris dies here, and 15 s is
    longer than any honest client on a congested link needs for a few KiB."""
    keepalive_idle: float = 75.0
    """Idle seconds before a client keep-alive connection is closed; above the 60 s idle
    timeouts of common load balancers, so they close first and never race us."""
    body_idle: float = 60.0
    """Seconds a request body may stall between reads before the exchange is abandoned; also
    the grace period before ``Limits.body_min_rate`` is enforced."""
    upstream_connect: float = 5.0
    """Seconds to establish an upstream TCP connection; a pod that takes longer is not there."""
    upstream_response: float = 60.0
    """Seconds from the request being sent to the response head, and the longest silence
    allowed between response body reads: long enough for slow handlers, short enough that a
    wedged override is reported (504) rather than hanging its developer's client."""
    upstream_pool_idle: float = 30.0
    """Seconds an idle pooled upstream connection is kept; below the 60 s keep-alive of most
    servers, so we close idle connections before they do (the reuse race shrinks)."""
    drain: float = 10.0
    """Seconds in-flight requests get to finish after SIGTERM."""
    tunnel_idle: float = 3600.0
    """Seconds an upgraded (WebSocket) tunnel may carry no bytes either way before both ends
    are closed: generous, because chat and dashboard sockets idle for minutes between messages
    and most send pings well within an hour; a forgotten tunnel still gives back its pool slot."""
    linger: float = 30.0
    """Seconds, at most, the router keeps reading and discarding a request body it answered
    early (a 401 or 413 before the upload ended), so the client reads the answer instead of a
    reset; nginx's ``lingering_time`` default."""
    linger_pause: float = 5.0
    """Longest pause while lingering before the connection is closed; nginx's
    ``lingering_timeout`` default."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) <= 0:
                raise ValueError(f"timeout {field.name} must be positive")


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    max_request_line: int = 16384
    """Bytes of method + target + version; 16 KiB covers long query strings (nginx uses 8 KiB)."""
    max_header_bytes: int = 32768
    """Bytes of all header lines; must stay above the W3C 8192-byte baggage plus ordinary
    headers, so a maximal but legal baggage is propagated."""
    max_headers: int = 100
    """Header lines per request or response; 100 is Go's and aiohttp's order of magnitude."""
    max_body_bytes: int = 0
    """Largest request body accepted (413 beyond); 0 means unlimited since bodies stream."""
    max_client_connections: int = 10000
    """Open client connections; beyond it new ones are closed at once, before file
    descriptors run out (the default ulimit is often 1024; raise it or this)."""
    upstream_pool_size: int = 256
    """Connections per upstream address (in use plus idle)."""
    upstream_pool_queue: int = 1024
    """Requests that may wait for a pooled connection; beyond it the router answers 503."""
    body_min_rate: int = 1024
    """Bytes per second a request body must average, once ``Timeouts.body_idle`` has passed
    since it began (time the router itself paused the client for backpressure does not count),
    or it is abandoned with 408 and its upstream connection released. A pause timer alone lets
    a client hold an upstream connection forever with one byte a minute; an average rate does
    not, and 1 KiB/s is far below any real link (a phone on EDGE uploads a few KiB/s), so an
    honest slow upload passes. 0 turns the rate check off."""
    small_body: int = 8192
    """Request bodies declared (Content-Length) up to this size are read whole before an
    upstream connection is taken, as nginx and Envoy buffer them: a client dripping a small
    body holds only its own connection, never a pool slot."""
    linger_bytes: int = 64 << 20
    """Most bytes discarded while lingering (see ``Timeouts.linger``)."""

    def __post_init__(self) -> None:
        if self.max_header_bytes < 9000:
            raise ValueError("max_header_bytes must allow an 8192-byte W3C baggage header")
        if self.upstream_pool_size < 1:
            raise ValueError("upstream_pool_size must be at least 1")
        if self.body_min_rate < 0:
            raise ValueError("body_min_rate must not be negative")


@dataclasses.dataclass(frozen=True, slots=True)
class RouterSettings:
    mode: Mode = Mode.INGRESS
    key_members: tuple[str, ...] = (DEFAULT_MEMBER,)
    """Baggage member names carrying the routing key, in precedence order (aliases after)."""
    timeouts: Timeouts = dataclasses.field(default_factory=Timeouts)
    limits: Limits = dataclasses.field(default_factory=Limits)
    trust_forwarded: bool = False
    """Keep a client's X-Forwarded-Proto/Host and Forwarded instead of replacing or dropping
    them: only behind a trusted load balancer, otherwise any client can claim to be on HTTPS."""
    upgrade_protocols: frozenset[bytes] = frozenset({b"websocket"})
    """Upgrade tokens (lower case, version stripped) the router tunnels after a 101. Anything
    else is stripped and the request forwarded plainly: a tunnel skips every check the router
    makes on requests, so only protocols meant to be tunnelled may open one. ``h2c`` never can
    (the h2c smuggling attack: the tunnel would carry HTTP/2 requests past routing)."""
    access_log: str | None = None
    """Where one line per exchange goes: ``"-"`` for stdout, a file path, or None for nowhere
    (the ``devstack router`` command defaults to stdout; embedding code opts in)."""
    access_log_format: str = "json"
    """``json`` (one object per line) or ``text`` (a readable line)."""
    access_log_sample: int = 1
    """Log one successful exchange in this many; answers of 400 and above are always logged."""
    access_log_query: bool = False
    """Log the path with its query string. Off by default: queries carry tokens and personal data."""

    preview_domain: str | None = None
    """Edge key source (ingress mode): ``alice--checkout.<domain>`` means service ``checkout``,
    key ``alice``. None: off."""
    key_header: bool = False
    """Edge key source (ingress mode): the browser extension's private ``x-devstack-key`` header."""
    key_cookie: bool = False
    """Edge key source (ingress mode): the ``devstack-key`` cookie, set by a navigation with
    ``?devstack=KEY`` (answered 302 without the parameter) and cleared by ``?devstack=``."""
    key_cookie_domain: str | None = None
    """``Domain`` of that cookie, so one cookie covers every preview host; None: host-only."""
    key_cookie_max_age: int = 8 * 3600
    """Seconds the cookie lives: a working day, so a forgotten key does not route tomorrow."""
    edge_key_clients: tuple[str, ...] = ()
    """Networks (CIDR) whose clients may choose a key at the edge; empty: every client."""
    tls_cert: str | None = None
    """PEM certificate chain for TLS on the proxy listener (with ``tls_key``); None: cleartext.
    ALPN offers ``h2`` and ``http/1.1``; upstreams stay cleartext inside the cluster."""
    tls_key: str | None = None
    http2_engine: str | None = None
    """The HTTP/2 protocol engine: ``"nghttp2"`` (libnghttp2 through ctypes) or ``"h2"`` (pure
    Python, four to eight times the CPU per exchange); None: ``DEVSTACK_HTTP2_ENGINE``, else
    nghttp2 when the library loads, else h2."""

    def __post_init__(self) -> None:
        for cidr in self.edge_key_clients:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"--edge-key-clients {cidr}: not a network (e.g. 10.0.0.0/8)") from None
        if self.preview_domain is not None and not self.preview_domain.strip("."):
            raise ValueError("--preview-domain: empty")
        if self.key_cookie_max_age < 0:
            raise ValueError(f"--key-cookie-max-age {self.key_cookie_max_age}: must not be negative")
        if self.access_log_sample < 1:
            raise ValueError(f"--access-log-sample {self.access_log_sample}: must be 1 or more")
        if self.access_log_format not in ("json", "text"):
            raise ValueError(f"--access-log-format {self.access_log_format}: must be json or text")
        if self.http2_engine not in (None, "nghttp2", "h2"):
            raise ValueError(f"--http2-engine {self.http2_engine}: must be h2 or nghttp2")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if b"h2c" in self.upgrade_protocols:
            raise ValueError("--upgrade h2c: h2c is never tunnelled, it would carry requests past the router's checks")

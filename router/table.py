"""The immutable, versioned route table and the routing decision made from it.

This module owns one decision: given a service and a routing key, which upstream serves the
request (or why none does). It is pure and imports only the standard library and the catalogue
of answers (``router.errors``), so the controller can build tables and the hot path can read
them without either knowing the other. It must never perform I/O or mutate a table after
construction: the router swaps whole tables atomically."""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Hashable, Iterable, Mapping
from types import MappingProxyType
from typing import Final
from urllib.parse import urlsplit

from router.errors import Answer

__all__ = [
    "H2C",
    "HTTP1",
    "PROTOCOLS",
    "Decision",
    "Fallback",
    "Override",
    "RouteTable",
    "Routes",
    "Target",
    "TargetKind",
    "TableError",
    "check_protocol",
]


class TableError(ValueError):
    """A route definition is invalid; the message says which service and field."""


HTTP1: Final = "http1"
"""HTTP/1.1 to the upstream, pooled keep-alive connections: the default, what every service speaks."""
H2C: Final = "h2c"
"""HTTP/2 over cleartext with prior knowledge (gRPC): a few multiplexed connections per upstream."""
PROTOCOLS: Final = (HTTP1, H2C)
"""Every upstream protocol a service may declare, default first (route file, feed, Kubernetes)."""


def check_protocol(value: object) -> str:
    """``value`` when it is one of ``PROTOCOLS``; otherwise TableError saying what it must be."""
    if isinstance(value, str) and value in PROTOCOLS:
        return value
    raise TableError(f"{value!r} must be " + " or ".join(repr(p) for p in PROTOCOLS))


class Fallback(enum.Enum):
    """What an unusable override (not ready, expired) does with its traffic."""

    ERROR = "error"
    """Answer 503: the developer asked for their version, so silently serving another is a lie."""
    BASELINE = "baseline"
    """Serve the shared baseline instead, for owners who prefer availability over fidelity."""


class TargetKind(enum.Enum):
    BASELINE = "baseline"
    OVERRIDE = "override"
    ERROR = "error"


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """One upstream address: where a baseline or an override listens, and how to speak to it."""

    url: str
    protocol: str = HTTP1
    """How the router speaks to this upstream: ``"http1"`` or ``"h2c"`` (``PROTOCOLS``). It is the
    service's, so every Target of one service (baseline and overrides) carries the same."""
    host: str = dataclasses.field(init=False)
    port: int = dataclasses.field(init=False)
    pool_key: Hashable = dataclasses.field(init=False, repr=False, compare=False)
    """``(host, port)`` for HTTP/1.1 and ``(host, port, "h2c")`` for h2c: the upstream pool's key, so
    an HTTP/1.1 and an h2c pool to one address never share a connection. Typed ``Hashable`` so
    that, compiled, it stays one tuple object instead of a C struct re-boxed on every pool lookup."""

    def __post_init__(self) -> None:
        try:
            check_protocol(self.protocol)
        except TableError as refused:  # not ``exc``: compiled, one name keeps the type it first had
            raise TableError(f"upstream {self.url!r}: protocol {refused}") from None
        parts = urlsplit(self.url)
        if parts.scheme != "http":
            raise TableError(f"upstream {self.url!r}: only http:// upstreams are supported")
        if not parts.hostname:
            raise TableError(f"upstream {self.url!r}: no host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise TableError(f"upstream {self.url!r}: must be scheme://host:port with no path")
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise TableError(f"upstream {self.url!r}: {exc}") from None
        object.__setattr__(self, "host", parts.hostname)
        object.__setattr__(self, "port", port)
        pool_key: Hashable = (parts.hostname, port) if self.protocol == HTTP1 else (parts.hostname, port, H2C)
        object.__setattr__(self, "pool_key", pool_key)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of routing one request; precomputed so the hot path allocates none."""

    service: str
    key: str | None
    kind: TargetKind
    target: Target | None
    reason: str
    answer: Answer | None = None
    """What the router answers itself when ``target`` is None (from the catalogue in router.errors)."""
    via: str | None = None
    """For a route group's key: the member whose override this is."""

    stats_key: tuple[str, ...] = dataclasses.field(init=False, repr=False, compare=False)
    """(service, target kind): the request counter's label, made once rather than per request.
    Typed variable-length so that, compiled, it stays one tuple object (a fixed-length tuple
    attribute is stored unboxed and would be re-boxed for every counter update)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "stats_key", (self.service, self.kind.value))

    def route_header(self, key: str | None) -> bytes:
        """The ``x-devstack-route`` value for a request with ``key``, rendered on demand because
        only debug requests ask. Shared decisions (no key, no override) carry no key of their
        own, so the request's is passed in."""
        via = f"; via={self.via}" if self.via is not None else ""
        rendered = f"service={self.service}; key={key or '-'}{via}; target={self.kind.value}; reason={self.reason}"
        return rendered.encode("ascii", "replace")


@dataclasses.dataclass(frozen=True, slots=True)
class Override:
    """A developer's version of one service, selected by a routing key."""

    key: str
    target: Target
    ready: bool = True
    expires_at: float | None = None
    """Unix time after which the override receives no traffic, whatever its readiness."""
    fallback: Fallback = Fallback.ERROR
    namespace: str | None = None
    workload: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class _OverrideDecisions:
    """The decisions an override can produce, rendered once when the table is built."""

    override: Override
    serve: Decision
    not_ready: Decision
    expired: Decision


@dataclasses.dataclass(frozen=True, slots=True)
class Routes:
    """Everything the router knows about one service: its baseline and its overrides."""

    service: str
    baseline: Target
    overrides: Mapping[str, Override] = dataclasses.field(default_factory=dict)
    hosts: tuple[str, ...] = ()
    groups: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    """Route groups: a name that resolves, here, to the first of its keys with an override."""
    # The fields below are derived from those above, so equality ignores them: comparing two
    # 10,000-service tables (the aggregator's and the feed's "did anything change") costs half.
    baseline_decision: Decision = dataclasses.field(init=False, compare=False)
    no_override_decision: Decision = dataclasses.field(init=False, repr=False, compare=False)
    _by_key: dict[str, _OverrideDecisions] = dataclasses.field(init=False, repr=False, compare=False)
    """Private, so a plain dict: the hot path reads it natively (a MappingProxyType would cost a
    generic method call per request)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))
        base = Decision(self.service, None, TargetKind.BASELINE, self.baseline, "no-key")
        object.__setattr__(self, "baseline_decision", base)
        no_override = Decision(self.service, None, TargetKind.BASELINE, self.baseline, "no-override")
        object.__setattr__(self, "no_override_decision", no_override)
        by_key: dict[str, _OverrideDecisions] = {}
        for key, ov in self.overrides.items():
            if key != ov.key:
                raise TableError(f"service {self.service!r}: override filed under {key!r} names {ov.key!r}")
            if ov.target.protocol != self.baseline.protocol:
                raise TableError(
                    f"service {self.service!r}: override {key!r} speaks {ov.target.protocol!r} but the service "
                    f"speaks {self.baseline.protocol!r}: the protocol is the service's"
                )
            by_key[key] = _OverrideDecisions(
                override=ov,
                serve=Decision(self.service, key, TargetKind.OVERRIDE, ov.target, "override"),
                not_ready=self._unusable(ov, Answer.OVERRIDE_NOT_READY),
                expired=self._unusable(ov, Answer.OVERRIDE_EXPIRED),
            )
        object.__setattr__(self, "groups", MappingProxyType({g: tuple(keys) for g, keys in self.groups.items()}))
        for group, members in self.groups.items():
            # Resolved now, so routing a group's key is the same one lookup as any key's.
            if group in by_key:
                raise TableError(f"service {self.service!r}: {group!r} is both a route group and an override's key")
            for member in members:
                if member in self.groups:
                    raise TableError(f"route group {group!r} lists the group {member!r}: groups do not nest")
            chosen = next((m for m in members if m in self.overrides), None)
            if chosen is None:
                continue  # no member has an override of this service: the baseline serves the group
            ov = self.overrides[chosen]
            by_key[group] = _OverrideDecisions(
                override=ov,
                serve=Decision(self.service, group, TargetKind.OVERRIDE, ov.target, "override", via=chosen),
                not_ready=self._unusable(ov, Answer.OVERRIDE_NOT_READY, group),
                expired=self._unusable(ov, Answer.OVERRIDE_EXPIRED, group),
            )
        object.__setattr__(self, "_by_key", by_key)

    @property
    def protocol(self) -> str:
        """The service's upstream protocol, which its baseline and every override carry."""
        return self.baseline.protocol

    def _unusable(self, ov: Override, answer: Answer, group: str | None = None) -> Decision:
        key, via = (ov.key, None) if group is None else (group, ov.key)
        if ov.fallback is Fallback.BASELINE:
            return Decision(self.service, key, TargetKind.BASELINE, self.baseline, answer.reason + "-fallback", via=via)
        return Decision(self.service, key, TargetKind.ERROR, None, answer.reason, answer, via=via)

    def resolve(self, key: str | None, now: float | None = None) -> Decision:
        """Pick the upstream for ``key`` (already validated) at Unix time ``now`` (default:
        the clock, read only when the override has an expiry)."""
        if key is None:
            return self.baseline_decision
        entry = self._by_key.get(key)
        if entry is None:
            # Most keys have no override on most services: the rest of the stack is shared.
            return self.no_override_decision
        ov = entry.override
        if ov.expires_at is not None and (time.time() if now is None else now) >= ov.expires_at:
            return entry.expired
        if not ov.ready:
            return entry.not_ready
        return entry.serve

    def to_json(self) -> dict[str, object]:
        """This service as the route table's JSON carries it under ``services`` (its groups are the
        table's, written once at the table's level). ``protocol`` is written only when it is not
        ``http1``, so an HTTP/1.1 service reads as it did before protocols existed and routers
        that predate them still accept it."""
        return {
            "hosts": list(self.hosts),
            "baseline": self.baseline.url,
            **({} if self.protocol == HTTP1 else {"protocol": self.protocol}),
            "overrides": {
                key: {
                    "url": ov.target.url,
                    "ready": ov.ready,
                    "expires": ov.expires_at,
                    "fallback": ov.fallback.value,
                    "namespace": ov.namespace,
                    "workload": ov.workload,
                }
                for key, ov in self.overrides.items()
            },
        }


@dataclasses.dataclass(frozen=True, slots=True)
class RouteTable:
    """A complete, immutable snapshot of every service's routes.

    ``_by_host`` maps lower-case host names to their services' routes: a plain dict, because
    the hot path does exactly one lookup per request (natively, when compiled) and must not scan.
    """

    services: Mapping[str, Routes]
    version: int = 0
    sources: tuple[str, ...] = ()
    _by_host: dict[str, Routes] = dataclasses.field(init=False, repr=False, compare=False)
    _index: dict[str, Routes] | None = dataclasses.field(default=None, repr=False, compare=False, kw_only=True)
    """``with_changes`` only: the host index, already made (and checked) from the table before."""

    def __post_init__(self) -> None:
        if self._index is not None:
            # with_changes made this dict for this table alone: no copy.
            object.__setattr__(self, "services", MappingProxyType(self.services))
            object.__setattr__(self, "_by_host", self._index)
            object.__setattr__(self, "_index", None)
            return
        services = MappingProxyType(dict(self.services))
        by_host: dict[str, Routes] = {}
        for name, routes in services.items():
            if name != routes.service:
                raise TableError(f"service filed under {name!r} is named {routes.service!r}")
            for host in (name, *routes.hosts):
                host = host.lower()
                owner = by_host.get(host)
                if owner is not None and owner.service != name:
                    raise TableError(f"host {host!r} is claimed by both {owner.service!r} and {name!r}")
                by_host[host] = routes
        object.__setattr__(self, "services", services)
        object.__setattr__(self, "_by_host", by_host)

    def routes_for_authority(self, authority: str) -> Routes | None:
        """The routes a Host header or absolute-form authority names, port optional."""
        authority = authority.lower()
        by_host = self._by_host
        found = by_host.get(authority)
        if found is not None:
            return found
        if authority.startswith("["):
            end = authority.find("]")
            return by_host.get(authority[: end + 1]) if end > 0 else None
        colon = authority.rfind(":")
        if colon > 0:
            return by_host.get(authority[:colon])
        return None

    def service_for_authority(self, authority: str) -> str | None:
        """Map a Host header or absolute-form authority to a service name, port optional."""
        routes = self.routes_for_authority(authority)
        return None if routes is None else routes.service

    def resolve(self, service: str, key: str | None, now: float | None = None) -> Decision | None:
        """Dry-run entry point: the decision for ``service`` and ``key``, or None if unknown."""
        routes = self.services.get(service)
        if routes is None:
            return None
        return routes.resolve(key, now)

    def with_version(self, version: int, sources: tuple[str, ...] | None = None) -> RouteTable:
        return RouteTable(self.services, version, self.sources if sources is None else sources)

    def same_routes(self, other: RouteTable) -> bool:
        """True when two tables route identically, ignoring version and provenance."""
        return dict(self.services) == dict(other.services)

    def with_changes(
        self,
        changed: Mapping[str, Routes],
        removed: Iterable[str] = (),
        *,
        version: int,
        sources: tuple[str, ...] | None = None,
    ) -> RouteTable:
        """A new table: this one with ``changed`` services set (added or replaced) and ``removed``
        ones dropped. Every other service is the same ``Routes`` object as here (structural
        sharing), so applying a one-service change builds one service, not the whole table; the
        host index is this table's, copied, with the touched services' hosts taken out and put
        back (rebuilding it was 15 ms for 10,000 services; this is the two dict copies, about
        half a millisecond). Raises TableError as the constructor does (a conflict found here is
        reported by a full rebuild, for the constructor's own message), and for a removal of a
        service this table does not have: a change meant for another table must never half-apply."""
        held = self.services
        # The proxy's own copy is the dict's (a C-level copy); dict(proxy) goes item by item, 4x slower.
        services = held.copy() if isinstance(held, MappingProxyType) else dict(held)
        for name in removed:
            if services.pop(name, None) is None:
                raise TableError(f"cannot remove service {name!r}: the table does not have it")
        services.update(changed)
        sources = self.sources if sources is None else sources
        by_host = dict(self._by_host)
        before = self.services
        for name in (*removed, *changed):
            old = before.get(name)
            if old is not None:
                for host in (name, *old.hosts):
                    host = host.lower()
                    if by_host.get(host) is old:
                        del by_host[host]
        for name, routes in changed.items():
            if name != routes.service:
                return RouteTable(services, version, sources)  # raises, as the constructor words it
            for host in (name, *routes.hosts):
                host = host.lower()
                owner = by_host.get(host)
                if owner is not None and owner.service != name:
                    return RouteTable(services, version, sources)  # raises: two services claim it
                by_host[host] = routes
        return RouteTable(services, version, sources, _index=by_host)

    def groups_json(self) -> dict[str, list[str]]:
        """The route groups as the table's JSON lists them: each group once, as the first
        service that knows it defines it (every service of one source carries the same)."""
        groups: dict[str, list[str]] = {}
        for routes in self.services.values():
            for group, members in routes.groups.items():
                groups.setdefault(group, list(members))
        return groups

    def to_json(self) -> dict[str, object]:
        """The table as the admin ``/routes`` and the controller feed (``/v1/routes``) send it: the
        route file's shape, which ``controller.sources.remote.routes_from_json`` reads back."""
        return {
            "version": self.version,
            "sources": list(self.sources),
            "groups": self.groups_json(),
            "services": {name: routes.to_json() for name, routes in self.services.items()},
        }


EMPTY_TABLE: Final = RouteTable({}, version=0, sources=())

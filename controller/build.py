"""Pure table building: route specifications in, validated ``Routes`` out.

This module turns the route file's parsed document (or any source's equivalent mapping) into
``router.table.Routes`` values and merges the snapshots of several sources into one
``RouteTable``. It performs no I/O and keeps no state; every error names where the bad value
came from (file and line when the source knows them), and nothing here ever half-applies: a
build either returns a complete table or raises ``BuildError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from router.keys import is_valid_key
from router.table import HTTP1, Fallback, Override, Routes, RouteTable, TableError, Target, check_protocol

__all__ = [
    "BuildError",
    "LineDict",
    "LineList",
    "iter_routes",
    "merge_snapshots",
    "routes_from_spec",
    "table_fields",
    "table_spec",
]


class BuildError(ValueError):
    """A specification is invalid. ``str()`` names the origin, line and field."""

    def __init__(self, message: str, *, origin: str = "", line: int | None = None) -> None:
        where = origin + (f":{line}" if line is not None else "")
        super().__init__(f"{where}: {message}" if where else message)
        self.origin = origin
        self.line = line


class LineDict(dict[str, Any]):
    """A mapping that remembers the 1-based source line of itself and of each key."""

    line: int | None = None
    key_lines: dict[str, int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.key_lines = {}

    def line_of(self, key: str) -> int | None:
        return self.key_lines.get(key, self.line)


class LineList(list[Any]):
    """A sequence that remembers the 1-based source line of itself and of each item."""

    line: int | None = None
    item_lines: list[int]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.item_lines = []

    def line_of(self, index: int) -> int | None:
        return self.item_lines[index] if index < len(self.item_lines) else self.line


_SERVICE_KEYS = frozenset({"hosts", "baseline", "overrides", "protocol"})
_OVERRIDE_KEYS = frozenset({"url", "ready", "expires", "fallback", "namespace", "workload"})


def _line(obj: object, key: str | None = None) -> int | None:
    if isinstance(obj, LineDict):
        return obj.line_of(key) if key is not None else obj.line
    if isinstance(obj, LineList):
        return obj.line
    return None


def _item_line(seq: object, index: int, fallback: int | None) -> int | None:
    return seq.line_of(index) if isinstance(seq, LineList) else fallback


def _dns_label(name: str) -> bool:
    return is_valid_key(name.encode("ascii", "replace"))


def _expiry(value: object, err: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        raise err("expires must be a timestamp, not a boolean")
    if isinstance(value, int | float):
        return float(value)  # what feeds send: a router following one never imports datetime
    import datetime as dt  # noqa: PLC0415 - 0.6 MiB resident, for timestamps written in route files

    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
        return moment.timestamp()
    if isinstance(value, str):
        try:
            moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise err(f"expires {value!r} is not an ISO 8601 timestamp") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=dt.timezone.utc)
        return moment.timestamp()
    raise err(f"expires must be an ISO 8601 timestamp or Unix seconds, not {type(value).__name__}")


def routes_from_spec(spec: object, *, origin: str = "") -> dict[str, Routes]:
    """Validate a ``{"services": {...}}`` document (the route file schema) into ``Routes``."""
    return {routes.service: routes for routes in iter_routes(spec, origin=origin)}


def iter_routes(spec: object, *, origin: str = "") -> Iterator[Routes]:
    """``routes_from_spec`` one service at a time, in the spec's order, with the same checks and
    messages: a caller can interleave a large table's build with other work (the router's event
    loop). Each error is raised when the service that has it is reached (the spec's own fields
    before the first), so a caller that stops there has nothing it should keep."""

    def fail(message: str, at: object = None, key: str | None = None) -> BuildError:
        return BuildError(message, origin=origin, line=_line(at, key) if at is not None else None)

    if not isinstance(spec, Mapping):
        raise fail("the route file must be a mapping with a 'services' key", spec)
    unknown = set(spec) - {"services", "groups"}
    if unknown:
        raise fail(f"unknown top-level key {sorted(unknown)[0]!r}", spec, sorted(unknown)[0])
    groups = _groups(spec.get("groups"), spec, fail)
    services = spec.get("services")
    if services is None:
        services = {}
    if not isinstance(services, Mapping):
        raise fail("'services' must be a mapping of service name to routes", spec, "services")

    claimed: dict[str, tuple[str, int | None]] = {}  # host (lower case) → (first claimant, its line)
    for name, body in services.items():
        if not isinstance(name, str) or not _dns_label(name):
            raise fail(f"service name {name!r} must be a DNS-1123 label", services, str(name))
        if not isinstance(body, Mapping):
            raise fail(f"service {name!r}: expected a mapping with 'baseline'", services, name)
        extra = set(body) - _SERVICE_KEYS
        if extra:
            key = sorted(extra)[0]
            raise fail(f"service {name!r}: unknown key {key!r}", body, key)
        hosts_raw = body.get("hosts", [])
        if not isinstance(hosts_raw, list) or not all(isinstance(h, str) and h for h in hosts_raw):
            raise fail(f"service {name!r}: 'hosts' must be a list of host names", body, "hosts")
        try:
            protocol = check_protocol(body.get("protocol", HTTP1))
        except TableError as exc:
            raise fail(f"service {name!r}: protocol {exc}", body, "protocol") from None
        baseline_raw = body.get("baseline")
        if isinstance(baseline_raw, Mapping):
            baseline_raw = baseline_raw.get("url")
        if not isinstance(baseline_raw, str):
            raise fail(
                f"service {name!r}: 'baseline' must be an upstream URL",
                body,
                "baseline" if "baseline" in body else None,
            )
        try:
            baseline = Target(baseline_raw, protocol)
        except TableError as exc:
            raise fail(f"service {name!r}: baseline {exc}", body, "baseline") from None

        overrides_raw = body.get("overrides") or {}
        if not isinstance(overrides_raw, Mapping):
            raise fail(f"service {name!r}: 'overrides' must be a mapping of key to override", body, "overrides")
        overrides: dict[str, Override] = {}
        for key, ov in overrides_raw.items():
            where = f"service {name!r} override {key!r}"
            if not isinstance(key, str) or not _dns_label(key):
                raise fail(f"{where}: a routing key must be a DNS-1123 label", overrides_raw, str(key))
            if isinstance(ov, str):
                short = LineDict(url=ov)
                short.line = _line(overrides_raw, key)  # so errors in the short form still name its line
                ov = short
            if not isinstance(ov, Mapping):
                raise fail(f"{where}: expected a mapping with 'url'", overrides_raw, key)
            extra = set(ov) - _OVERRIDE_KEYS
            if extra:
                bad = sorted(extra)[0]
                raise fail(f"{where}: unknown key {bad!r}", ov, bad)
            url = ov.get("url")
            if not isinstance(url, str):
                raise fail(f"{where}: 'url' must be an upstream URL", ov, "url" if "url" in ov else None)
            ready = ov.get("ready", True)
            if not isinstance(ready, bool):
                raise fail(f"{where}: 'ready' must be true or false", ov, "ready")
            fallback_raw = ov.get("fallback", "error")
            try:
                fallback = Fallback(fallback_raw)
            except ValueError:
                raise fail(f"{where}: 'fallback' must be 'error' or 'baseline'", ov, "fallback") from None
            for meta in ("namespace", "workload"):
                if ov.get(meta) is not None and not isinstance(ov.get(meta), str):
                    raise fail(f"{where}: {meta!r} must be a string", ov, meta)

            def expiry_error(message: str, ov: object = ov, where: str = where) -> BuildError:
                return fail(f"{where}: {message}", ov, "expires")

            try:
                overrides[key] = Override(
                    key=key,
                    target=Target(url, protocol),  # the service's protocol, as every override's
                    ready=ready,
                    expires_at=_expiry(ov.get("expires"), expiry_error),
                    fallback=fallback,
                    namespace=ov.get("namespace"),
                    workload=ov.get("workload"),
                )
            except TableError as exc:
                raise fail(f"{where}: {exc}", ov, "url") from None
        _claim_hosts(claimed, name, hosts_raw, services, body, origin)
        for key in overrides:
            if key in groups:
                message = f"service {name!r}: override key {key!r} is also a route group's name"
                raise fail(message, overrides_at(body), key)
        yield Routes(service=name, baseline=baseline, overrides=overrides, hosts=tuple(hosts_raw), groups=groups)


def overrides_at(body: Mapping[str, Any]) -> object:
    """Where a service's overrides are written (for the line of a message about one of them)."""
    return body.get("overrides", body)


def _groups(raw: object, spec: object, fail: Any) -> dict[str, tuple[str, ...]]:
    """``groups: {team-checkout: [alice, bob]}``: names and ordered keys, checked whole."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise fail("'groups' must be a mapping of group name to a list of keys", spec, "groups")
    groups: dict[str, tuple[str, ...]] = {}
    for group, members in raw.items():
        if not isinstance(group, str) or not _dns_label(group):
            raise fail(f"route group name {group!r} must be a DNS-1123 label", raw, str(group))
        if not isinstance(members, list) or not members:
            raise fail(f"route group {group!r}: expected a non-empty list of keys", raw, group)
        for member in members:
            if not isinstance(member, str) or not _dns_label(member):
                raise fail(f"route group {group!r}: key {member!r} must be a DNS-1123 label", raw, group)
            if member in raw:
                raise fail(f"route group {group!r} lists the group {member!r}: groups do not nest", raw, group)
        groups[group] = tuple(members)
    return groups


def _claim_hosts(
    claimed: dict[str, tuple[str, int | None]],
    name: str,
    hosts: list[str],
    services: object,
    body: object,
    origin: str,
) -> None:
    """Record the names service ``name`` answers to; a name another service claimed is an error.

    ``RouteTable`` refuses such a table too, but only a parsed document knows lines: checking
    here lets the message point at the second claim (the line to fix) and name the first.
    """
    hosts_line = _line(body, "hosts")
    claims = [(name, _line(services, name))]
    claims += [(host, _item_line(hosts, index, hosts_line)) for index, host in enumerate(hosts)]
    for host, line in claims:
        host = host.lower()
        owner = claimed.get(host)
        if owner is None:
            claimed[host] = (name, line)
        elif owner[0] != name:
            first = f" (line {owner[1]})" if owner[1] is not None else ""
            raise BuildError(
                f"host {host!r} is claimed by both {owner[0]!r}{first} and {name!r}", origin=origin, line=line
            )


def table_spec(document: object, *, origin: str = "") -> tuple[int, dict[str, object]]:
    """A ``RouteTable.to_json()`` document → its version and the route spec it carries (``services``,
    and ``groups`` when it has any) for ``routes_from_spec``; the table's own fields checked here."""
    if not isinstance(document, Mapping):
        raise BuildError("a route table must be a JSON object", origin=origin)
    version = document.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise BuildError("'version' must be a non-negative integer", origin=origin)
    services = document.get("services")
    if not isinstance(services, Mapping):
        raise BuildError("'services' must be an object", origin=origin)
    spec: dict[str, object] = {"services": services}
    if document.get("groups"):
        spec["groups"] = document["groups"]
    return version, spec


def table_fields(document: Mapping[str, Any], *, origin: str = "") -> tuple[tuple[str, ...], dict[str, object]]:
    """A table document's (or a /v2 feed line's) ``sources`` and ``groups``, checked."""
    sources = document.get("sources", [])
    if not isinstance(sources, list) or not all(isinstance(source, str) for source in sources):
        raise BuildError("'sources' must be a list of names", origin=origin)
    groups = document.get("groups") or {}
    if not isinstance(groups, Mapping):
        raise BuildError("'groups' must be an object", origin=origin)
    return tuple(sources), dict(groups)


def merge_snapshots(snapshots: Mapping[str, Mapping[str, Routes]], version: int) -> RouteTable:
    """One table from each source's latest snapshot; a service claimed twice is an error."""
    services: dict[str, Routes] = {}
    owners: dict[str, str] = {}
    for source in sorted(snapshots):
        for name, routes in snapshots[source].items():
            if name in services:
                raise BuildError(f"service {name!r} is defined by both {owners[name]!r} and {source!r}")
            services[name] = routes
            owners[name] = source
    try:
        return RouteTable(services, version=version, sources=tuple(sorted(snapshots)))
    except TableError as exc:
        raise BuildError(str(exc)) from None

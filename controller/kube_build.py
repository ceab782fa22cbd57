"""Pure translation of labelled Kubernetes Deployments and route-group ConfigMaps (raw API JSON) into ``Routes``.

This module owns the Kubernetes contract (README, "Kubernetes"): which labels make a Deployment
a baseline or an override, where its address comes from, which protocol its service speaks (from
annotations and the Service port's ``appProtocol``), when it is ready, when it expires, and
which Deployments conflict; and which ConfigMaps declare route groups (label
``devstack.io/route-group``, data ``group`` and ``keys``), which of those are unusable, and which
clash with a routing key, declare one group twice, or nest. It also finds overrides whose pods a
baseline Service would select (traffic leaks). It takes plain JSON dicts and the time, and returns
values; it never talks to the API server, never imports the ``kubernetes`` client and never
resolves a conflict by order: both claimants are dropped and the conflict is reported.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Final, NewType, TypedDict

from router.keys import is_valid_key
from router.table import H2C, HTTP1, Fallback, Override, Routes, TableError, Target, check_protocol

__all__ = [
    "FALLBACK_ANNOTATION",
    "GROUP_DATA",
    "GROUP_LABEL",
    "H2C_APP_PROTOCOLS",
    "HOSTS_ANNOTATION",
    "JANITOR_EXPIRES_ANNOTATION",
    "JANITOR_TTL_ANNOTATION",
    "KEYS_DATA",
    "KEY_LABEL",
    "PORT_ANNOTATION",
    "PROTOCOL_ANNOTATION",
    "SERVICE_LABEL",
    "TTL_ANNOTATION",
    "UPSTREAM_ANNOTATION",
    "ConfigMap",
    "Deployment",
    "Expiry",
    "GroupClaim",
    "GroupVerdict",
    "KubeRoutes",
    "Leak",
    "ObjectMeta",
    "Service",
    "WorkloadRef",
    "find_leaks",
    "parse_duration",
    "read_group",
    "routes_from_deployments",
    "settle_groups",
    "split_keys",
]

SERVICE_LABEL: Final = "devstack.io/service"
KEY_LABEL: Final = "devstack.io/routing-key"
PORT_ANNOTATION: Final = "devstack.io/port"
UPSTREAM_ANNOTATION: Final = "devstack.io/upstream"
TTL_ANNOTATION: Final = "devstack.io/ttl"
FALLBACK_ANNOTATION: Final = "devstack.io/fallback"
HOSTS_ANNOTATION: Final = "devstack.io/hosts"
PROTOCOL_ANNOTATION: Final = "devstack.io/protocol"
"""On the baseline Deployment or its Service: ``http1`` or ``h2c``, the service's upstream protocol;
it wins over the Service port's ``appProtocol``."""
H2C_APP_PROTOCOLS: Final = frozenset({"kubernetes.io/h2c", "grpc"})
"""Service port ``appProtocol`` values that make a service h2c: the standard name of HTTP/2 with
prior knowledge, and the unprefixed name gRPC services (and Istio) use."""
JANITOR_TTL_ANNOTATION: Final = "janitor/ttl"
JANITOR_EXPIRES_ANNOTATION: Final = "janitor/expires"
GROUP_LABEL: Final = "devstack.io/route-group"
"""On a ConfigMap: it declares a route group. Selected by existence; ``devstack group create`` sets
its value to the group's name (for ``kubectl get cm -l devstack.io/route-group=NAME``), but the
name routers use is the data's ``group``."""
GROUP_DATA: Final = "group"
"""The route group's name (a DNS-1123 label), in the ConfigMap's data."""
KEYS_DATA: Final = "keys"
"""Its keys in order, in the ConfigMap's data: separated by commas, spaces or newlines."""

CLUSTER_DOMAIN: Final = "svc.cluster.local"


# --- Raw API JSON, typed. ``total=False`` because the API server omits empty fields. -------------


class ObjectMeta(TypedDict, total=False):
    name: str
    namespace: str
    uid: str
    resourceVersion: str
    creationTimestamp: str
    deletionTimestamp: str
    labels: dict[str, str]
    annotations: dict[str, str]


class ContainerPort(TypedDict, total=False):
    name: str
    containerPort: int
    protocol: str


class Container(TypedDict, total=False):
    name: str
    image: str
    ports: list[ContainerPort]


class PodSpec(TypedDict, total=False):
    containers: list[Container]


class PodTemplateSpec(TypedDict, total=False):
    metadata: ObjectMeta
    spec: PodSpec


class DeploymentSpec(TypedDict, total=False):
    replicas: int
    template: PodTemplateSpec


class DeploymentStatus(TypedDict, total=False):
    replicas: int
    readyReplicas: int
    availableReplicas: int


class Deployment(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: DeploymentSpec
    status: DeploymentStatus


class ServicePort(TypedDict, total=False):
    name: str
    port: int
    targetPort: int | str
    protocol: str
    appProtocol: str


class ServiceSpec(TypedDict, total=False):
    selector: dict[str, str]
    type: str
    ports: list[ServicePort]


class Service(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    spec: ServiceSpec


class ConfigMap(TypedDict, total=False):
    apiVersion: str
    kind: str
    metadata: ObjectMeta
    data: dict[str, str]
    binaryData: dict[str, str]


WorkloadRef = NewType("WorkloadRef", str)
"""``namespace/name`` of a Deployment: how every message names one."""


def _ref(meta: ObjectMeta) -> WorkloadRef:
    return WorkloadRef(f"{meta.get('namespace', '')}/{meta.get('name', '')}")


# --- Results ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Expiry:
    """An override that stops receiving traffic at ``expires_at`` (and may then be deleted)."""

    expires_at: float
    service: str
    key: str
    namespace: str
    name: str
    uid: str
    """Delete preconditions: never delete a same-named Deployment created after this one."""


@dataclasses.dataclass(frozen=True, slots=True)
class Leak:
    """An override whose pods the baseline Service also selects: it gets baseline traffic."""

    service: str
    key: str
    namespace: str
    deployment: str
    selector: tuple[tuple[str, str], ...]

    @property
    def message(self) -> str:
        rendered = ",".join(f"{k}={v}" for k, v in self.selector)
        return (
            f"override {self.namespace}/{self.deployment} (service {self.service!r}, key {self.key!r}): "
            f"its pods match Service {self.namespace}/{self.service} selector {rendered}, "
            f"so it also receives traffic meant for the baseline"
        )

    def to_json(self) -> dict[str, object]:
        return {
            "service": self.service,
            "key": self.key,
            "namespace": self.namespace,
            "deployment": self.deployment,
            "selector": dict(self.selector),
            "message": self.message,
        }


@dataclasses.dataclass(frozen=True, slots=True)
class KubeRoutes:
    """What a set of Deployments means for routing, plus everything that could not be used."""

    services: Mapping[str, Routes]
    conflicts: tuple[str, ...] = ()
    """Two Deployments claim the same baseline, override or host; neither is routed. (The baseline
    Deployment and its Service annotated with different protocols: the service is routed as http1.)"""
    invalid: tuple[str, ...] = ()
    """A labelled Deployment whose labels or annotations cannot be used; it is not routed. (A bad
    ``devstack.io/protocol`` only makes its service http1, and an override's own is ignored.)"""
    expiries: tuple[Expiry, ...] = ()
    """Every routed override with an expiry, soonest first."""
    groups: tuple[GroupVerdict, ...] = ()
    """Every labelled ConfigMap, read and judged: routed or why not (``devstack group ls``)."""

    def next_expiry(self, now: float) -> float | None:
        """The first expiry strictly after ``now``: when the next rebuild is due."""
        for expiry in self.expiries:
            if expiry.expires_at > now:
                return expiry.expires_at
        return None

    def expired(self, now: float) -> tuple[Expiry, ...]:
        return tuple(e for e in self.expiries if e.expires_at <= now)


# --- Parsing helpers --------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NO_EXPIRY: Final = frozenset({"forever", "unlimited"})
"""kube-janitor's spellings of "never expires"."""


class _Invalid(ValueError):
    """A Deployment cannot be used; the message says which label or annotation and why."""


def parse_duration(text: str) -> float:
    """``30m``, ``6h``, ``1h30m``, ``2d``, ``1w`` → seconds; ValueError otherwise."""
    value = text.strip()
    pos = 0
    total = 0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += int(match.group(1)) * _DURATION_UNITS[match.group(2)]
        pos = match.end()
    if not value or pos != len(value):
        raise ValueError(f"{text!r} is not a duration like 30m, 6h or 1h30m")
    return float(total)


def _timestamp(text: str) -> float:
    """RFC 3339 or kube-janitor's ``2024-05-01T10:00``/``2024-05-01``; naive means UTC."""
    moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def _dns_label(value: str) -> bool:
    return is_valid_key(value.encode("ascii", "replace"))


def _expiry(meta: ObjectMeta) -> float | None:
    """The earliest of every expiry annotation present; None if there is none."""
    annotations = meta.get("annotations") or {}
    moments: list[float] = []
    for name in (TTL_ANNOTATION, JANITOR_TTL_ANNOTATION):
        raw = annotations.get(name)
        if raw is None or raw.strip() in _NO_EXPIRY:
            continue
        try:
            ttl = parse_duration(raw)
        except ValueError as exc:
            raise _Invalid(f"annotation {name}: {exc}") from None
        created = meta.get("creationTimestamp")
        if not created:
            raise _Invalid(f"annotation {name} needs metadata.creationTimestamp to count from")
        try:
            moments.append(_timestamp(created) + ttl)
        except ValueError:
            raise _Invalid(f"creationTimestamp {created!r} is not a timestamp") from None
    raw_expires = annotations.get(JANITOR_EXPIRES_ANNOTATION)
    if raw_expires is not None:
        try:
            moments.append(_timestamp(raw_expires))
        except ValueError:
            raise _Invalid(
                f"annotation {JANITOR_EXPIRES_ANNOTATION}: {raw_expires!r} is not a timestamp like 2024-05-01T18:00:00Z"
            ) from None
    return min(moments) if moments else None


def _port(deployment: Deployment) -> int:
    annotations = deployment.get("metadata", {}).get("annotations") or {}
    raw = annotations.get(PORT_ANNOTATION)
    if raw is not None:
        if not raw.strip().isdigit() or not 0 < int(raw) < 65536:
            raise _Invalid(f"annotation {PORT_ANNOTATION}: {raw!r} is not a port number")
        return int(raw)
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers") or []
    for container in containers:
        for port in container.get("ports") or []:
            number = port.get("containerPort")
            if isinstance(number, int):
                return number
    raise _Invalid(f"no port: set annotation {PORT_ANNOTATION} or give a container a containerPort")


def _target(deployment: Deployment, host_name: str, protocol: str = HTTP1) -> Target:
    meta = deployment.get("metadata", {})
    annotations = meta.get("annotations") or {}
    explicit = annotations.get(UPSTREAM_ANNOTATION)
    try:
        if explicit is not None:
            return Target(explicit.strip(), protocol)
        address = f"http://{host_name}.{meta.get('namespace', 'default')}.{CLUSTER_DOMAIN}:{_port(deployment)}"
        return Target(address, protocol)
    except TableError as exc:
        raise _Invalid(f"annotation {UPSTREAM_ANNOTATION}: {exc}") from None


def _fallback(meta: ObjectMeta) -> Fallback:
    raw = (meta.get("annotations") or {}).get(FALLBACK_ANNOTATION, Fallback.ERROR.value)
    try:
        return Fallback(raw.strip())
    except ValueError:
        raise _Invalid(f"annotation {FALLBACK_ANNOTATION}: {raw!r} must be 'error' or 'baseline'") from None


def _app_protocol(service: Service, port: int) -> str | None:
    """The ``appProtocol`` of the Service port an address with ``port`` reaches: the port with that
    number, else the one targeting it (the contract's address uses the container's port), else the
    Service's only port."""
    ports = service.get("spec", {}).get("ports") or []
    chosen = next((p for p in ports if p.get("port") == port), None)
    chosen = chosen or next((p for p in ports if p.get("targetPort") == port), None)
    if chosen is None and len(ports) == 1:
        chosen = ports[0]
    return None if chosen is None else chosen.get("appProtocol")


def _protocol(
    name: str, claim: _Claim, target: Target, service: Service | None, invalid: list[str], conflicts: list[str]
) -> str:
    """Service ``name``'s upstream protocol: ``devstack.io/protocol`` on its baseline Deployment or
    its Service, else h2c when the Service port's ``appProtocol`` says so, else http1. A bad value,
    or two annotations that disagree, is reported and the service is routed as http1."""
    declared: list[tuple[str, str]] = []  # (which object, the protocol its annotation names)
    sources = [(f"deployment {claim.ref}", claim.deployment.get("metadata", {}))]
    if service is not None:
        sources.append((f"Service {_ref(service.get('metadata', {}))}", service.get("metadata", {})))
    for where, meta in sources:
        raw = (meta.get("annotations") or {}).get(PROTOCOL_ANNOTATION)
        if raw is None:
            continue
        try:
            declared.append((where, check_protocol(raw.strip())))
        except TableError as exc:
            invalid.append(f"{where}: annotation {PROTOCOL_ANNOTATION}: {exc}; service {name!r} routed as {HTTP1}")
            return HTTP1
    if len({protocol for _, protocol in declared}) > 1:
        said = " but ".join(f"{protocol!r} on {where}" for where, protocol in declared)
        conflicts.append(f"service {name!r}: annotation {PROTOCOL_ANNOTATION} is {said}; routed as {HTTP1}")
        return HTTP1
    if declared:
        return declared[0][1]
    if service is not None and _app_protocol(service, target.port) in H2C_APP_PROTOCOLS:
        return H2C
    return HTTP1


def _default_hosts(service: str, namespace: str) -> tuple[str, ...]:
    """The names cluster DNS gives the Service: what clients in the cluster actually dial."""
    return (service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.{CLUSTER_DOMAIN}")


@dataclasses.dataclass(frozen=True, slots=True)
class _Claim:
    """One usable labelled Deployment, before conflicts are settled."""

    ref: WorkloadRef
    service: str
    key: str | None
    deployment: Deployment


def _claim(deployment: Deployment) -> _Claim | None:
    meta = deployment.get("metadata", {})
    labels = meta.get("labels") or {}
    service = labels.get(SERVICE_LABEL)
    if service is None:
        return None
    if not _dns_label(service):
        raise _Invalid(f"label {SERVICE_LABEL}: {service!r} must be a DNS-1123 label (a Service name)")
    key = labels.get(KEY_LABEL)
    if key is not None and not _dns_label(key):
        raise _Invalid(f"label {KEY_LABEL}: {key!r} must be a DNS-1123 label: lower-case, digits and '-'")
    return _Claim(_ref(meta), service, key, deployment)


def _sorted(deployments: Iterable[Deployment]) -> list[Deployment]:
    # Sorting makes messages and results independent of the API server's (or the cache's) order.
    return sorted(deployments, key=lambda d: _ref(d.get("metadata", {})))


# --- Route groups -----------------------------------------------------------------------------

_KEY_SEPARATORS = re.compile(r"[\s,]+")


def split_keys(text: str) -> list[str]:
    """``"alice,bob"``, ``"alice, bob"`` or one key per line → ``["alice", "bob"]``."""
    return [key for key in _KEY_SEPARATORS.split(text) if key]


@dataclasses.dataclass(frozen=True, slots=True)
class GroupClaim:
    """One ConfigMap labelled ``devstack.io/route-group``, read; ``problem`` says why it is unusable."""

    ref: WorkloadRef
    """``namespace/name`` of the ConfigMap."""
    name: str | None
    """The group's name, when its data names a valid one."""
    keys: tuple[str, ...] = ()
    problem: str | None = None
    created: str | None = None

    @property
    def usable(self) -> bool:
        return self.problem is None and self.name is not None


def read_group(config_map: ConfigMap) -> GroupClaim:
    """The route group a labelled ConfigMap declares: ``data.group`` and ``data.keys``, checked whole."""
    meta = config_map.get("metadata", {})
    ref = _ref(meta)
    created = meta.get("creationTimestamp")
    data = config_map.get("data") or {}
    raw_name = data.get(GROUP_DATA)
    name = raw_name.strip() if isinstance(raw_name, str) and _dns_label(raw_name.strip()) else None

    def unusable(problem: str) -> GroupClaim:
        return GroupClaim(ref, name, problem=problem, created=created)

    extra = sorted(set(data) - {GROUP_DATA, KEYS_DATA}) + sorted(config_map.get("binaryData") or {})
    if extra:
        return unusable(f"unknown data key {extra[0]!r} (a route group has only {GROUP_DATA!r} and {KEYS_DATA!r})")
    if raw_name is None:
        return unusable(f"labelled {GROUP_LABEL} but its data has no {GROUP_DATA!r} naming the group")
    if name is None:
        return unusable(f"data {GROUP_DATA!r}: {raw_name!r} must be a DNS-1123 label: lower-case, digits and '-'")
    keys = split_keys(data.get(KEYS_DATA) or "")
    if not keys:
        return unusable(f"route group {name!r}: data {KEYS_DATA!r} lists no keys (e.g. 'alice,bob')")
    for key in keys:
        if not _dns_label(key):
            return unusable(f"route group {name!r}: key {key!r} must be a DNS-1123 label: lower-case, digits and '-'")
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        return unusable(f"route group {name!r}: key {repeated[0]!r} is listed twice")
    if name in keys:
        return unusable(f"route group {name!r} lists its own name: groups do not nest")
    return GroupClaim(ref, name, tuple(keys), created=created)


@dataclasses.dataclass(frozen=True, slots=True)
class GroupVerdict:
    """One group ConfigMap and what became of it: routed, or flagged with the sentences why not."""

    claim: GroupClaim
    status: tuple[str, ...]
    """``Routed``, or what stops it: Invalid, Conflict (the group is declared twice), KeyClash (a
    routing key has its name), Nested (it lists another group)."""
    problems: tuple[str, ...] = ()

    @property
    def routed(self) -> bool:
        return not self.problems


def settle_groups(
    config_maps: Iterable[ConfigMap], keys: Mapping[str, Iterable[str]]
) -> tuple[tuple[GroupVerdict, ...], frozenset[str]]:
    """Judge every group ConfigMap against the others and against the routing keys in use.

    ``keys`` maps each routing key of an override Deployment to the Deployments that carry it.
    A group's name and the keys are one namespace, so a group named like a key is a conflict:
    neither the group nor that key's overrides are routed (the second value: the keys to drop).
    A name declared by two ConfigMaps routes neither; a group listing another group's name does
    not nest and is not routed (the group it lists still is, if nothing else is wrong with it). A
    group listing a name in a clash stays routed: that member has no override left to reach.
    """
    claims = sorted((read_group(cm) for cm in config_maps), key=lambda c: c.ref)
    declared: dict[str, list[GroupClaim]] = {}
    for claim in claims:
        if claim.usable:
            assert claim.name is not None
            declared.setdefault(claim.name, []).append(claim)
    clashing = frozenset(name for name in declared if name in keys)
    verdicts: list[GroupVerdict] = []
    for claim in claims:
        if not claim.usable:
            verdicts.append(GroupVerdict(claim, ("Invalid",), (f"configmap {claim.ref}: {claim.problem}; not routed",)))
            continue
        assert claim.name is not None
        flags: list[str] = []
        problems: list[str] = []
        rivals = declared[claim.name]
        if len(rivals) > 1:
            flags.append("Conflict")
            refs = ", ".join(c.ref for c in rivals)
            problems.append(
                f"route group {claim.name!r} is declared by {len(rivals)} ConfigMaps ({refs}); none is routed"
            )
        if claim.name in clashing:
            flags.append("KeyClash")
            owners = ", ".join(sorted(keys[claim.name]))
            problems.append(
                f"route group {claim.name!r} (configmap {claim.ref}) has the name of the routing key of {owners}: "
                "a group and a key share one namespace; neither is routed"
            )
        # A member named like a group is nesting, unless that name is also a key: then the name is
        # in conflict (reported above, its overrides dropped) and the member simply reaches nothing.
        nested = [key for key in claim.keys if key in declared and key not in clashing]
        if nested:
            flags.append("Nested")
            inner = ", ".join(c.ref for c in declared[nested[0]])
            problems.append(
                f"route group {claim.name!r} (configmap {claim.ref}) lists {nested[0]!r}, a route group "
                f"(configmap {inner}): groups do not nest; {claim.name!r} is not routed"
            )
        verdicts.append(GroupVerdict(claim, tuple(flags) or ("Routed",), tuple(problems)))
    return tuple(verdicts), clashing


# --- The build --------------------------------------------------------------------------------


def routes_from_deployments(
    deployments: Iterable[Deployment], config_maps: Iterable[ConfigMap] = (), services: Iterable[Service] = ()
) -> KubeRoutes:
    """Every labelled Deployment → ``Routes`` per service, with the route groups of the labelled
    ConfigMaps resolved in each, each service's protocol from its baseline and its Service (the
    Service named like it in the baseline's namespace), and conflicts and problems listed."""
    invalid: list[str] = []
    conflicts: list[str] = []
    baselines: dict[str, list[_Claim]] = {}
    overrides: dict[tuple[str, str], list[_Claim]] = {}
    for deployment in _sorted(deployments):
        ref = _ref(deployment.get("metadata", {}))
        try:
            claim = _claim(deployment)
        except _Invalid as exc:
            invalid.append(f"deployment {ref}: {exc}")
            continue
        if claim is None:
            continue
        if claim.key is None:
            baselines.setdefault(claim.service, []).append(claim)
        else:
            overrides.setdefault((claim.service, claim.key), []).append(claim)

    service_objects = {_ref(svc.get("metadata", {})): svc for svc in services}
    routed_baselines: dict[str, tuple[_Claim, Target]] = {}
    for service, claims in sorted(baselines.items()):
        if len(claims) > 1:
            names = ", ".join(c.ref for c in claims)
            conflicts.append(f"service {service!r}: {len(claims)} baseline Deployments ({names}); none is routed")
            continue
        claim = claims[0]
        try:
            address = _target(claim.deployment, service)
        except _Invalid as exc:
            invalid.append(f"deployment {claim.ref}: {exc}")
            continue
        namespace = claim.ref.split("/", 1)[0]
        service_object = service_objects.get(WorkloadRef(f"{namespace}/{service}"))
        protocol = _protocol(service, claim, address, service_object, invalid, conflicts)
        routed_baselines[service] = (claim, Target(address.url, protocol))

    key_owners: dict[str, list[str]] = {}
    for (_, key), claims in overrides.items():
        key_owners.setdefault(key, []).extend(f"deployment {c.ref}" for c in claims)
    verdicts, clashing = settle_groups(config_maps, key_owners)
    for verdict in verdicts:
        found = invalid if "Invalid" in verdict.status else conflicts
        found.extend(problem for problem in verdict.problems if problem not in found)
    groups = {v.claim.name: v.claim.keys for v in verdicts if v.routed and v.claim.name is not None}

    by_service: dict[str, dict[str, Override]] = {}
    expiries: list[Expiry] = []
    for (service, key), claims in sorted(overrides.items()):
        if key in clashing:
            continue  # A route group has this name: reported with the group, neither is routed.
        if len(claims) > 1:
            names = ", ".join(c.ref for c in claims)
            conflicts.append(
                f"service {service!r} key {key!r}: {len(claims)} override Deployments ({names}); none is routed"
            )
            continue
        claim = claims[0]
        meta = claim.deployment.get("metadata", {})
        if service not in routed_baselines:
            if service not in baselines:
                invalid.append(f"deployment {claim.ref}: service {service!r} has no baseline Deployment; not routed")
            # Otherwise the baseline's own conflict or problem is already reported for the service.
            continue
        protocol = routed_baselines[service][1].protocol  # the service's, which every override speaks
        try:
            target = _target(claim.deployment, meta.get("name", ""), protocol)
            expires_at = _expiry(meta)
            fallback = _fallback(meta)
        except _Invalid as exc:
            invalid.append(f"deployment {claim.ref}: {exc}")
            continue
        own = (meta.get("annotations") or {}).get(PROTOCOL_ANNOTATION)
        if own is not None and own.strip() != protocol:
            invalid.append(
                f"deployment {claim.ref}: annotation {PROTOCOL_ANNOTATION}: {own!r} ignored: service {service!r} "
                f"speaks {protocol!r}, set on its baseline Deployment or Service"
            )
        ready = (claim.deployment.get("status", {}).get("readyReplicas") or 0) > 0
        by_service.setdefault(service, {})[key] = Override(
            key=key,
            target=target,
            ready=ready,
            expires_at=expires_at,
            fallback=fallback,
            namespace=meta.get("namespace"),
            workload=meta.get("name"),
        )
        if expires_at is not None:
            expiries.append(
                Expiry(expires_at, service, key, meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", ""))
            )

    hosts = _settle_hosts(routed_baselines, conflicts)
    routed: dict[str, Routes] = {}
    for service, (_, target) in routed_baselines.items():
        mine = by_service.get(service, {})
        try:
            routed[service] = Routes(service, target, mine, hosts[service], groups=groups)
        except TableError as exc:  # settle_groups leaves nothing for Routes to refuse; never lose a service
            conflicts.append(f"service {service!r}: {exc}; its route groups are not routed")
            routed[service] = Routes(service, target, mine, hosts[service])
    expiries.sort(key=lambda e: (e.expires_at, e.service, e.key))
    return KubeRoutes(routed, tuple(conflicts), tuple(invalid), tuple(expiries), verdicts)


def _settle_hosts(baselines: Mapping[str, tuple[_Claim, Target]], conflicts: list[str]) -> dict[str, tuple[str, ...]]:
    """Each service's host names; an extra host claimed twice is dropped from every claimant.

    Cluster DNS names win over ``devstack.io/hosts`` extras because they are what the Service
    really answers to; two extras naming the same host are both dropped and reported, since
    picking one would route by whichever Deployment sorts first.
    """
    defaults = {
        service: _default_hosts(service, claim.ref.split("/", 1)[0]) for service, (claim, _) in baselines.items()
    }
    owner_of_default = {host: service for service, names in defaults.items() for host in names}
    extras: dict[str, list[str]] = {}
    for service, (claim, _) in baselines.items():
        raw = (claim.deployment.get("metadata", {}).get("annotations") or {}).get(HOSTS_ANNOTATION, "")
        for host in (h.strip().lower() for h in raw.split(",")):
            if host and host not in defaults[service]:
                extras.setdefault(host, []).append(service)
    result = {service: list(names) for service, names in defaults.items()}
    for host, claimants in extras.items():  # annotation order: deployments are already sorted
        owner = owner_of_default.get(host)
        if owner is not None:
            conflicts.append(
                f"host {host!r} ({HOSTS_ANNOTATION} of {sorted(claimants)}) is service {owner!r}'s name; ignored"
            )
        elif len(claimants) > 1:
            conflicts.append(f"host {host!r} is claimed by services {sorted(claimants)}; routed to none of them")
        else:
            result[claimants[0]].append(host)
    return {service: tuple(names) for service, names in result.items()}


def find_leaks(deployments: Iterable[Deployment], services: Iterable[Service]) -> tuple[Leak, ...]:
    """Overrides whose pod template labels the baseline's Service selector matches.

    The baseline Service is the Service named after ``devstack.io/service`` in the baseline
    Deployment's namespace; only overrides in that namespace can match it, because a Service
    selects pods in its own namespace only. An empty selector selects nothing (it is a Service
    with manually managed endpoints), so it never leaks.
    """
    selectors: dict[tuple[str, str], dict[str, str]] = {}
    for svc in services:
        meta = svc.get("metadata", {})
        selector = svc.get("spec", {}).get("selector") or {}
        if selector:
            selectors[(meta.get("namespace", ""), meta.get("name", ""))] = selector
    baseline_namespaces: dict[str, set[str]] = {}
    candidates: list[_Claim] = []
    for deployment in _sorted(deployments):
        try:
            claim = _claim(deployment)
        except _Invalid:
            continue
        if claim is None:
            continue
        if claim.key is None:
            baseline_namespaces.setdefault(claim.service, set()).add(claim.ref.split("/", 1)[0])
        else:
            candidates.append(claim)
    leaks: list[Leak] = []
    for claim in candidates:
        namespace, name = claim.ref.split("/", 1)
        if namespace not in baseline_namespaces.get(claim.service, set()):
            continue
        baseline_selector = selectors.get((namespace, claim.service))
        if baseline_selector is None:
            continue
        selector = baseline_selector
        pod_labels = claim.deployment.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or {}
        if all(pod_labels.get(k) == v for k, v in selector.items()):
            assert claim.key is not None
            leaks.append(Leak(claim.service, claim.key, namespace, name, tuple(sorted(selector.items()))))
    return tuple(leaks)

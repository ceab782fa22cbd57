"""What ``devstack fork`` makes of a baseline, and what ``devstack ls`` says of overrides: pure.

An override made by ``fork`` is the baseline's pod template under a new name, ``SERVICE-KEY``,
in a Deployment labelled per the contract of ``kube_build`` (``devstack.io/service``,
``devstack.io/routing-key``, a TTL) and a Service with the baseline Service's ports. Its pods
must never be selected by the baseline Service, or they would take baseline traffic (a leak):
the selector that decides is the Service's own, read from the cluster, and exactly one of its
labels is changed in the pod template (``track`` if it has one, the README's convention, else
its first label in alphabetical order), so NetworkPolicies and monitors that select on the
other labels still apply to the override. The override's own Deployment and Service select its
pods by the two devstack labels, which no baseline pod and no other key's pod carries.

This module builds those objects, checks names and keys, and turns labelled Deployments into
the rows of ``devstack ls``, from plain JSON dicts and the time. It never talks to the API
server and never imports the ``kubernetes`` client (``controller.override_api`` does). Every
problem is an ``OverrideError`` whose text is the whole sentence the user reads.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, cast

from controller.kube_build import (
    FALLBACK_ANNOTATION,
    KEY_LABEL,
    PORT_ANNOTATION,
    SERVICE_LABEL,
    TTL_ANNOTATION,
    ConfigMap,
    Deployment,
    ObjectMeta,
    Service,
    find_leaks,
    parse_duration,
    routes_from_deployments,
)

# The contract's own expiry rule (every expiry annotation, the earliest wins), not a second copy of it.
from controller.kube_build import _expiry as expiry_of
from controller.startup import StartupError
from router.keys import is_valid_key

__all__ = [
    "DEFAULT_TTL",
    "FIELD_MANAGER",
    "FORKED_FROM_ANNOTATION",
    "MANAGED_BY_LABEL",
    "ForkRequest",
    "OverrideError",
    "OverrideRow",
    "build_override",
    "check_key",
    "expiry_of",
    "format_duration",
    "disjoint_labels",
    "human_duration",
    "is_override_of",
    "object_ref",
    "override_name",
    "override_rows",
    "owned_by",
    "pair",
    "parse_ttl",
    "pick_baseline",
    "rfc3339",
    "timestamp",
    "ttl_from_now",
]

FIELD_MANAGER: Final = "devstack"
"""The server-side apply field manager of everything ``devstack`` writes."""
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
FORKED_FROM_ANNOTATION: Final = "devstack.io/forked-from"
"""``namespace/name`` of the baseline Deployment an override was forked from."""
DEFAULT_CONTAINER_ANNOTATION: Final = "kubectl.kubernetes.io/default-container"
TRACK_LABEL: Final = "track"
DEFAULT_TTL: Final = "8h"
"""An override's TTL when neither ``--ttl`` nor the baseline's ``devstack.io/ttl`` says one."""
MAX_NAME: Final = 63
"""A Service name is a DNS-1035 label: at most 63 characters."""
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


class OverrideError(StartupError):
    """Something the user can fix; ``str()`` is the whole sentence, printed as ``devstack: ...``."""


# --- names, keys, durations ---------------------------------------------------------------------


def check_key(key: str) -> None:
    if not is_valid_key(key.encode("ascii", "replace")):
        raise OverrideError(
            f"key {key!r} is not a DNS-1123 label: 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )


def override_name(service: str, key: str) -> str:
    """``SERVICE-KEY``: the Deployment's and the Service's name."""
    check_key(key)
    name = f"{service}-{key}"
    if len(name) > MAX_NAME:
        raise OverrideError(
            f"the override's name {name!r} would be {len(name)} characters, over the {MAX_NAME} a Service "
            f"name may have; use a key of at most {MAX_NAME - len(service) - 1} characters"
        )
    return name


def timestamp(text: str) -> float:
    """An RFC 3339 timestamp of the API server (``2024-05-01T10:00:00Z``) → Unix time."""
    moment = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


def rfc3339(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_duration(seconds: float) -> str:
    """Seconds → ``8h``, ``9h12m``, ``45s``: what ``parse_duration`` (and a TTL annotation) reads."""
    total = max(0, math.ceil(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return text or "0s"


def human_duration(seconds: float) -> str:
    """kubectl's ``HumanDuration`` (AGE column): ``90s``, ``5m30s``, ``45m``, ``7h59m``, ``12h``, ``3d4h``."""
    secs = int(seconds)
    if secs < -1:
        return "<invalid>"
    if secs < 0:
        return "0s"
    if secs < 120:
        return f"{secs}s"
    minutes = secs // 60
    if minutes < 10:
        return f"{minutes}m{secs % 60}s" if secs % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    hours = minutes // 60
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{hours // 24}d{hours % 24}h" if hours % 24 else f"{hours // 24}d"
    if hours < 24 * 365 * 2:
        return f"{hours // 24}d"
    years, days = divmod(hours // 24, 365)
    return f"{years}y{days}d" if days and hours < 24 * 365 * 8 else f"{years}y"


def parse_ttl(text: str, what: str) -> float:
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise OverrideError(f"{what}: {exc}") from None
    if seconds <= 0:
        raise OverrideError(f"{what}: {text!r} is no time at all; give a duration like 30m, 6h or 1h30m")
    return seconds


def ttl_from_now(created: str | None, ttl: float, now: float) -> str:
    """The ``devstack.io/ttl`` that makes an object created at ``created`` expire ``ttl`` from ``now``.

    A TTL counts from creation (the contract), so replacing or extending an older override
    must add its age; a new object's is just ``ttl``."""
    age = 0.0 if not created else max(0.0, now - timestamp(created))
    return format_duration(age + ttl)


def object_ref(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


# --- finding the baseline -----------------------------------------------------------------------


def _labels(obj: Mapping[str, Any]) -> dict[str, str]:
    return dict((obj.get("metadata") or {}).get("labels") or {})


def pick_baseline(service: str, baselines: Sequence[Mapping[str, Any]], scope: str) -> dict[str, Any]:
    """The one Deployment labelled ``devstack.io/service=SERVICE`` without a routing key.

    ``baselines`` are every baseline in ``scope`` (``all namespaces`` or ``namespace X``), so
    that "none" can list the services there are."""
    mine = [dict(d) for d in baselines if _labels(d).get(SERVICE_LABEL) == service and KEY_LABEL not in _labels(d)]
    if not mine:
        known = sorted({_labels(d).get(SERVICE_LABEL, "") for d in baselines} - {""})
        listed = ", ".join(known) if known else "none"
        raise OverrideError(
            f"no baseline for {service!r} in {scope}: no Deployment is labelled {SERVICE_LABEL}={service} "
            f"without {KEY_LABEL} (services with a baseline: {listed})"
        )
    if len(mine) > 1:
        names = ", ".join(sorted(object_ref(d) for d in mine))
        raise OverrideError(
            f"more than one baseline for {service!r} ({names}): routers route none of them; "
            f"remove the {SERVICE_LABEL} label from all but one"
        )
    return mine[0]


# --- building the override -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class ForkRequest:
    """What ``devstack fork`` was asked for, flags parsed."""

    service: str
    key: str
    image: str | None = None
    containers: tuple[tuple[str, str], ...] = ()
    """``--container NAME=IMAGE``, in order."""
    env: tuple[tuple[str, str], ...] = ()
    """``--env NAME=VALUE``, in order; later ones win."""
    replicas: int = 1
    fallback: str | None = None


def pair(text: str, what: str) -> tuple[str, str]:
    """``NAME=VALUE`` → (NAME, VALUE); the value may be empty or contain ``=``."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise OverrideError(f"{what} {text!r}: expected NAME=VALUE")
    return name, value


def _main_container(service: str, pod: Mapping[str, Any], annotations: Mapping[str, str]) -> str:
    """The container ``--image`` and ``--env`` change: kubectl's default container, the one
    named after the service, or the only one; several and none of those is a question to ask."""
    names = [str(c.get("name", "")) for c in pod.get("containers") or []]
    for wanted in (annotations.get(DEFAULT_CONTAINER_ANNOTATION), service):
        if wanted in names:
            return wanted
    if len(names) == 1:
        return names[0]
    raise OverrideError(
        f"the baseline's pods have containers {', '.join(names)}: say which gets the image with "
        "--container NAME=IMAGE (and mark the main one with the kubectl.kubernetes.io/default-container annotation)"
    )


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [e for e in container.get("env") or [] if e.get("name") != name]
    env.append({"name": name, "value": value})
    container["env"] = env


def disjoint_labels(
    template_labels: Mapping[str, str], selector: Mapping[str, str], key: str, *, fixed: Mapping[str, str]
) -> dict[str, str]:
    """``template_labels`` plus ``fixed``, with one label of ``selector`` changed if they would match it.

    The label changed is ``track`` if the selector has it, else its first in alphabetical order
    that ``fixed`` does not pin; None of them left to change is an ``OverrideError``."""
    labels = {**template_labels, **fixed}
    if not selector or not all(labels.get(k) == v for k, v in selector.items()):
        return labels  # An empty selector selects nothing; one label already differs.
    free = sorted(k for k in selector if k not in fixed)
    if not free:
        rendered = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        raise OverrideError(
            f"the baseline Service selects its pods by {rendered} only, which every override's pods carry; "
            "add a label of its own (e.g. track: baseline) to its selector and its pods"
        )
    label = TRACK_LABEL if TRACK_LABEL in free else free[0]
    value = key if label == TRACK_LABEL else f"{selector[label]}-{key}"
    if len(value) > MAX_NAME or not _LABEL_VALUE.fullmatch(value):
        value = key
    labels[label] = value
    return labels


def build_override(
    request: ForkRequest,
    baseline: Mapping[str, Any],
    baseline_service: Mapping[str, Any],
    *,
    ttl: str,
    namespace: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The override's Deployment and Service, as server-side apply configurations.

    The Service has no ``ownerReferences`` yet: they need the Deployment's uid, known once it
    is applied (``owned_by``)."""
    service, key = request.service, request.key
    name = override_name(service, key)
    baseline_meta = cast(ObjectMeta, baseline.get("metadata") or {})
    template = copy.deepcopy((baseline.get("spec") or {}).get("template") or {})
    pod = template.get("spec") or {}
    template_meta = template.get("metadata") or {}
    template_annotations = dict(template_meta.get("annotations") or {})

    all_containers = {c.get("name"): c for c in [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]}
    if request.image is not None or request.env:
        main = all_containers[_main_container(service, pod, template_annotations)]
        if request.image is not None:
            main["image"] = request.image
        for env_name, value in request.env:
            if not _ENV_NAME.fullmatch(env_name):
                raise OverrideError(f"--env {env_name}={value}: {env_name!r} is not an environment variable name")
            _set_env(main, env_name, value)
    for container_name, image in request.containers:
        if container_name not in all_containers:
            raise OverrideError(
                f"--container {container_name}={image}: the baseline's pods have no container {container_name!r} "
                f"(they have {', '.join(str(n) for n in all_containers)})"
            )
        all_containers[container_name]["image"] = image

    selector = dict((baseline_service.get("spec") or {}).get("selector") or {})
    own = {SERVICE_LABEL: service, KEY_LABEL: key}
    pod_labels = disjoint_labels(template_meta.get("labels") or {}, selector, key, fixed=own)
    assert not selector or not all(pod_labels.get(k) == v for k, v in selector.items())
    new_template_meta: dict[str, Any] = {"labels": pod_labels}
    if template_annotations:
        new_template_meta["annotations"] = template_annotations
    template = {"metadata": new_template_meta, "spec": pod}

    annotations = {TTL_ANNOTATION: ttl, FORKED_FROM_ANNOTATION: object_ref(baseline)}
    if request.fallback is not None:
        annotations[FALLBACK_ANNOTATION] = request.fallback
    port = (baseline_meta.get("annotations") or {}).get(PORT_ANNOTATION)
    if port is not None:
        annotations[PORT_ANNOTATION] = port
    labels = {**own, MANAGED_BY_LABEL: FIELD_MANAGER}
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"replicas": request.replicas, "selector": {"matchLabels": dict(own)}, "template": template},
    }
    ports = []
    for port_spec in (baseline_service.get("spec") or {}).get("ports") or []:
        # nodePort is the baseline's own (two Services cannot share one); the rest describes the pods.
        ports.append(
            {k: v for k, v in port_spec.items() if k in ("name", "port", "targetPort", "protocol", "appProtocol")}
        )
    if not ports:
        raise OverrideError(f"Service {object_ref(baseline_service)} has no ports to copy")
    service_obj: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": dict(labels)},
        "spec": {"type": "ClusterIP", "selector": dict(own), "ports": ports},
    }
    return deployment, service_obj


def owned_by(service: Mapping[str, Any], deployment: Mapping[str, Any]) -> dict[str, Any]:
    """``service`` with an owner reference to ``deployment`` (applied, so it has a uid): deleting
    the Deployment, by ``devstack rm``, ``kubectl`` or ``--delete-expired``, deletes the Service."""
    meta = deployment.get("metadata") or {}
    owned = copy.deepcopy(dict(service))
    owned["metadata"]["ownerReferences"] = [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": meta["name"], "uid": meta["uid"]}
    ]
    return owned


def is_override_of(obj: Mapping[str, Any], service: str, key: str) -> bool:
    labels = _labels(obj)
    return labels.get(SERVICE_LABEL) == service and labels.get(KEY_LABEL) == key


# --- devstack ls -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class OverrideRow:
    """One override Deployment as ``devstack ls`` shows it."""

    service: str
    key: str
    namespace: str
    name: str
    ready: int
    replicas: int
    created: float | None
    expires_at: float | None
    status: tuple[str, ...]
    """``Routed``, or what stops or spoils it: Conflict, BaselineConflict, NoBaseline, Invalid,
    GroupClash, Leak, Expired, NotReady."""
    problems: tuple[str, ...]
    """The sentences behind the flags."""
    target: str | None
    images: tuple[str, ...]
    fallback: str

    def to_json(self, now: float) -> dict[str, object]:
        return {
            "service": self.service,
            "key": self.key,
            "namespace": self.namespace,
            "deployment": self.name,
            "ready": self.ready,
            "replicas": self.replicas,
            "status": list(self.status),
            "created": rfc3339(self.created) if self.created is not None else None,
            "age_seconds": None if self.created is None else max(0, int(now - self.created)),
            "expires": rfc3339(self.expires_at) if self.expires_at is not None else None,
            "expires_in_seconds": None if self.expires_at is None else int(self.expires_at - now),
            "target": self.target,
            "images": list(self.images),
            "fallback": self.fallback,
            "problems": list(self.problems),
        }


def override_rows(
    overrides: Iterable[Mapping[str, Any]],
    baselines: Iterable[Mapping[str, Any]],
    services: Iterable[Mapping[str, Any]],
    now: float,
    config_maps: Iterable[Mapping[str, Any]] = (),
) -> list[OverrideRow]:
    """Rows for ``overrides`` (labelled Deployments with a routing key), judged with every baseline
    of their services, those baselines' Services (for leaks) and the route-group ConfigMaps (a
    group named like a key), sorted by service, key, namespace."""
    overrides = [dict(o) for o in overrides]
    baselines = [dict(b) for b in baselines]
    deployments = cast(list[Deployment], [*baselines, *overrides])
    built = routes_from_deployments(deployments, cast(list[ConfigMap], list(config_maps)))
    clashes: dict[str, list[str]] = {}
    for verdict in built.groups:
        if "KeyClash" in verdict.status and verdict.claim.name is not None:
            clashes.setdefault(verdict.claim.name, []).append(verdict.claim.ref)
    leaks = {(leak.namespace, leak.deployment): leak for leak in find_leaks(deployments, cast(list[Service], services))}
    per_baseline: dict[str, list[str]] = {}
    for baseline in baselines:
        per_baseline.setdefault(_labels(baseline).get(SERVICE_LABEL, ""), []).append(object_ref(baseline))
    per_key: dict[tuple[str, str], list[str]] = {}
    for override in overrides:
        labels = _labels(override)
        per_key.setdefault((labels.get(SERVICE_LABEL, ""), labels.get(KEY_LABEL, "")), []).append(object_ref(override))

    rows = []
    for override in overrides:
        meta = cast(ObjectMeta, override.get("metadata") or {})
        labels, ref = _labels(override), object_ref(override)
        service, key = labels.get(SERVICE_LABEL, ""), labels.get(KEY_LABEL, "")
        flags: list[str] = []
        problems: list[str] = []
        claimants = per_key[(service, key)]
        if len(claimants) > 1:
            flags.append("Conflict")
            problems.append(
                f"{len(claimants)} overrides of {service!r} for key {key!r} ({', '.join(claimants)}): none is routed"
            )
        bases = per_baseline.get(service, [])
        if not bases:
            flags.append("NoBaseline")
            problems.append(f"service {service!r} has no baseline Deployment: not routed")
        elif len(bases) > 1:
            flags.append("BaselineConflict")
            problems.append(f"service {service!r} has {len(bases)} baselines ({', '.join(bases)}): none is routed")
        invalid = [m.split(": ", 1)[1] for m in built.invalid if m.startswith(f"deployment {ref}: ")]
        if invalid and not bases:
            invalid = [m for m in invalid if "has no baseline" not in m]
        if invalid:
            flags.append("Invalid")
            problems.extend(invalid)
        if key in clashes:
            flags.append("GroupClash")
            problems.append(
                f"route group {key!r} (ConfigMap {', '.join(clashes[key])}) has the name of this key: a group "
                "and a key share one namespace; neither is routed"
            )
        leak = leaks.get((meta.get("namespace", ""), meta.get("name", "")))
        if leak is not None:
            flags.append("Leak")
            problems.append(leak.message)
        try:
            expires_at = expiry_of(meta)
        except ValueError:
            expires_at = None
        status = override.get("status") or {}
        ready = int(status.get("readyReplicas") or 0)
        if expires_at is not None and expires_at <= now:
            flags.append("Expired")
        if ready == 0:
            flags.append("NotReady")
        routed = built.services.get(service)
        chosen = routed.overrides.get(key) if routed is not None else None
        target = chosen.target.url if chosen is not None and chosen.workload == meta.get("name") else None
        pod = ((override.get("spec") or {}).get("template") or {}).get("spec") or {}
        created = meta.get("creationTimestamp")
        rows.append(
            OverrideRow(
                service=service,
                key=key,
                namespace=meta.get("namespace", ""),
                name=meta.get("name", ""),
                ready=ready,
                replicas=int((override.get("spec") or {}).get("replicas", 1)),
                created=timestamp(created) if created else None,
                expires_at=expires_at,
                status=tuple(flags) or ("Routed",),
                problems=tuple(problems),
                target=target,
                images=tuple(str(c.get("image", "")) for c in pod.get("containers") or []),
                fallback=(meta.get("annotations") or {}).get(FALLBACK_ANNOTATION, "error"),
            )
        )
    rows.sort(key=lambda r: (r.service, r.key, r.namespace, r.name))
    return rows

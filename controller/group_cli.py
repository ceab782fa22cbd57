"""``devstack group create``, ``ls`` and ``rm``: route groups declared in ConfigMaps, from a developer's shell.

A route group in a cluster is a ConfigMap labelled ``devstack.io/route-group`` whose data names
the group (``group``) and lists its keys, first choice first (``keys``, comma-separated); the
controller watches them (``controller.sources.kubernetes``) and resolves each group per service at
table build. ``create`` writes ``devstack-group-NAME`` with server-side apply (field manager
``devstack``) after refusing what routers would refuse: a name or key that is not a DNS-1123 label,
a group named like a routing key in use (a group and a key share one namespace), a group declared
twice, and nesting either way. ``ls`` judges every group ConfigMap by the controller's own rules
(``kube_build.routes_from_deployments``) and says, per service, which member a group reaches.
``rm`` deletes the ConfigMaps declaring a group, after a confirmation. Every failure is an
``OverrideError``: one sentence, printed as ``devstack: ...`` with a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final, TypedDict, cast

import yaml

from controller.fork import FIELD_MANAGER, MANAGED_BY_LABEL, OverrideError, check_key, human_duration, object_ref
from controller.fork import timestamp as parse_timestamp
from controller.kube_build import (
    GROUP_DATA,
    GROUP_LABEL,
    KEY_LABEL,
    KEYS_DATA,
    SERVICE_LABEL,
    ConfigMap,
    Deployment,
    GroupVerdict,
    KubeRoutes,
    read_group,
    routes_from_deployments,
)
from controller.override_api import KubeApi
from controller.override_cli import Terminal, confirm, find_objects
from router.keys import is_valid_key

__all__ = ["CONFIG_MAP_PREFIX", "check_group_name", "config_map_name", "group_config_map", "run"]

CONFIG_MAP_PREFIX: Final = "devstack-group-"
"""``devstack group create NAME`` writes ConfigMap ``devstack-group-NAME``."""


def run(args: argparse.Namespace, terminal: Terminal | None = None) -> int:
    """Run ``devstack group create|ls|rm``; raises ``OverrideError`` with the sentence to print."""
    term = terminal or Terminal()
    command = {"create": _create, "ls": _ls, "rm": _rm}[args.group_command]
    _check_flags(args)
    api = term.connect(args.kubeconfig, args.context)
    try:
        return command(args, api, term)
    finally:
        api.close()


# --- pure: names and the ConfigMap ----------------------------------------------------------------


def check_group_name(name: str) -> None:
    if not is_valid_key(name.encode("ascii", "replace")):
        raise OverrideError(
            f"group name {name!r} is not a DNS-1123 label: 1-63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )


def config_map_name(group: str) -> str:
    return CONFIG_MAP_PREFIX + group


def group_config_map(group: str, keys: Sequence[str], namespace: str) -> dict[str, Any]:
    """The ConfigMap that declares ``group`` with ``keys`` in order: exactly what ``create`` applies."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": config_map_name(group),
            "namespace": namespace,
            # The label's value is for `kubectl get cm -l devstack.io/route-group=NAME`; routers read the data.
            "labels": {GROUP_LABEL: group, MANAGED_BY_LABEL: FIELD_MANAGER},
        },
        "data": {GROUP_DATA: group, KEYS_DATA: ",".join(keys)},
    }


def _check_flags(args: argparse.Namespace) -> None:
    """What can be wrong with the arguments alone, said before anything is asked of the API server."""
    if getattr(args, "name", None) is not None:
        check_group_name(args.name)
    if args.group_command == "create":
        seen: set[str] = set()
        for key in args.keys:
            check_key(key)
            if key in seen:
                raise OverrideError(f"key {key!r} is listed twice")
            seen.add(key)
        if args.name in seen:
            raise OverrideError(f"route group {args.name!r} cannot list its own name: groups do not nest")


def _data_group(config_map: Mapping[str, Any]) -> str:
    """The group a ConfigMap's data names, valid or not (``rm`` removes broken declarations too)."""
    raw = (config_map.get("data") or {}).get(GROUP_DATA)
    return raw.strip() if isinstance(raw, str) else ""


# --- devstack group create --------------------------------------------------------------------------


def _create(args: argparse.Namespace, api: KubeApi, term: Terminal) -> int:
    name, keys = args.name, list(args.keys)
    namespace = args.namespace or api.default_namespace or "default"
    target = f"{namespace}/{config_map_name(name)}"
    found, _ = find_objects(api, GROUP_LABEL, None, fallback=namespace, config_maps=True)
    claims = [read_group(cast(ConfigMap, cm)) for cm in found]
    same = [c for c in claims if c.name == name]
    others = sorted(c.ref for c in same if c.ref != target and c.usable)
    if others:
        raise OverrideError(
            f"route group {name!r} is already declared by ConfigMap {', '.join(others)}; with a second "
            f"declaration routers would route neither (devstack group rm {name} removes it)"
        )
    mine = next((c for c in same if c.ref == target), None)
    if mine is not None and not args.replace:
        listed = ", ".join(mine.keys) or "no valid keys"
        raise OverrideError(f"route group {name!r} exists (ConfigMap {target}: {listed}); --replace to change its keys")
    groups = {c.name: c for c in claims if c.usable and c.name is not None and c.name != name}
    for key in keys:
        if key in groups:
            raise OverrideError(
                f"key {key!r} is itself a route group (ConfigMap {groups[key].ref}): groups do not nest; "
                "list its keys instead"
            )
    for other in sorted(groups.values(), key=lambda c: c.ref):
        if name in other.keys:
            raise OverrideError(
                f"route group {other.name!r} (ConfigMap {other.ref}) lists {name!r} as a key: groups do not "
                f"nest, so {name!r} cannot be a group"
            )
    owners, _ = find_objects(api, f"{SERVICE_LABEL},{KEY_LABEL}={name}", None, fallback=namespace)
    if owners:
        refs = ", ".join(sorted(object_ref(o) for o in owners))
        raise OverrideError(
            f"{name!r} is already a routing key (overrides {refs}): a group and a key share one namespace; "
            "choose another name"
        )
    current = api.get("configmaps", namespace, config_map_name(name))
    if current is not None and mine is None:
        raise OverrideError(
            f"ConfigMap {target} exists and does not declare route group {name!r}; group create leaves it alone"
        )
    api.apply(group_config_map(name, keys, namespace), force=args.replace)
    verb = "updated" if mine is not None else "created"
    order = ", then ".join(keys)
    print(f"{verb} route group {name}: {', '.join(keys)} (ConfigMap {target})", file=term.out)
    print(
        f"Requests with baggage devstack={name} go, per service, to the override of {order}, the first "
        f"that has one there, else to the baseline; devstack group rm {name} removes it.",
        file=term.out,
    )
    return 0


# --- devstack group ls -----------------------------------------------------------------------------


class _Row(TypedDict):
    """One group ConfigMap as ``group ls -o json`` shows it."""

    group: str | None
    keys: list[str]
    namespace: str
    configmap: str
    created: str | None
    age_seconds: int | None
    status: list[str]
    problems: list[str]
    routes: dict[str, str]
    """Service → the member whose override the group reaches there."""


def _routes_of(name: str | None, verdict: GroupVerdict, built: KubeRoutes, now: float) -> dict[str, str]:
    """Service → the member whose override the group reaches there (services where one does)."""
    if name is None or not verdict.routed:
        return {}
    reached: dict[str, str] = {}
    for service, routes in sorted(built.services.items()):
        via = routes.resolve(name, now).via
        if via is not None:
            reached[service] = via
    return reached


def _ls(args: argparse.Namespace, api: KubeApi, term: Terminal) -> int:
    # Judged against everything routers see (duplicates elsewhere, keys in use), shown for -n only.
    every, scope = find_objects(api, GROUP_LABEL, None, fallback=args.namespace, config_maps=True)
    if args.namespace is not None:
        scope = f"namespace {args.namespace}"
    try:
        deployments, _ = find_objects(api, SERVICE_LABEL, None, fallback=args.namespace)
    except OverrideError as exc:
        print(f"devstack group ls: clashes with keys and routes not checked: {exc}", file=term.err)
        deployments = []
    built = routes_from_deployments(cast(list[Deployment], deployments), cast(list[ConfigMap], every))
    shown = [v for v in built.groups if args.namespace is None or v.claim.ref.split("/", 1)[0] == args.namespace]
    now = term.clock()
    if not shown and args.output not in ("json", "yaml"):
        print(f"No route groups found in {scope}.", file=term.err)
        return 0
    rows: list[_Row] = []
    for verdict in shown:
        claim = verdict.claim
        namespace, config_map = claim.ref.split("/", 1)
        stamp = claim.created
        born = parse_timestamp(stamp) if stamp else None
        rows.append(
            _Row(
                group=claim.name,
                keys=list(claim.keys),
                namespace=namespace,
                configmap=config_map,
                created=stamp,
                age_seconds=None if born is None else max(0, int(now - born)),
                status=list(verdict.status),
                problems=list(verdict.problems),
                routes=_routes_of(claim.name, verdict, built, now),
            )
        )
    if args.output in ("json", "yaml"):
        document = {"groups": rows}
        if args.output == "json":
            print(json.dumps(document, indent=2), file=term.out)
        else:
            term.out.write(yaml.safe_dump(document, sort_keys=False))
        return 0
    headings = ["GROUP", "KEYS", "NAMESPACE", "CONFIGMAP", "AGE", "STATUS"]
    if args.output == "wide":
        headings.append("ROUTES")
    table = [headings]
    for row in rows:
        age = row["age_seconds"]
        cells = [
            row["group"] or "<invalid>",
            ",".join(row["keys"]) or "<none>",
            row["namespace"],
            row["configmap"],
            "<unknown>" if age is None else human_duration(age),
            ",".join(row["status"]),
        ]
        if args.output == "wide":
            cells.append(",".join(f"{s}:{m}" for s, m in row["routes"].items()) or "<none>")
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(headings))]
    print("\n".join("   ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in table), file=term.out)
    for row in rows:
        for problem in row["problems"]:
            print(problem, file=term.err)
    return 0


# --- devstack group rm -----------------------------------------------------------------------------


def _rm(args: argparse.Namespace, api: KubeApi, term: Terminal) -> int:
    name = args.name
    every, scope = find_objects(api, GROUP_LABEL, args.namespace, config_maps=True)
    mine = sorted((cm for cm in every if _data_group(cm) == name), key=object_ref)
    if not mine:
        raise OverrideError(f"no route group {name!r} in {scope}")
    if not args.yes:
        described = "; ".join(
            f"ConfigMap {object_ref(cm)}, keys {(cm.get('data') or {}).get(KEYS_DATA, '')}" for cm in mine
        )
        question = f"Delete route group {name!r} ({described})?"
        confirm(term, question)
    for cm in mine:
        meta = cm.get("metadata") or {}
        gone = api.delete("configmaps", meta.get("namespace", "default"), meta.get("name", ""), meta.get("uid"))
        state = "deleted" if gone else "was already gone:"
        print(f"{state} route group {name} (ConfigMap {object_ref(cm)})", file=term.out)
    return 0

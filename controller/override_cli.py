"""``devstack fork``, ``ls``, ``rm`` and ``extend``: overrides made and managed from a developer's shell.

This module composes the pure rules of ``controller.fork`` with the requests of
``controller.override_api`` and talks to the terminal: the YAML of ``--dry-run``, progress while
a rollout becomes ready (a spinner line on a terminal, a line per change otherwise), the
``kubectl get``-like table of ``ls``, the confirmation of ``rm --key``, and how to use a key once
its override exists. Every failure is an ``OverrideError``: one sentence, printed by the command
as ``devstack: ...`` with a non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TextIO, cast
from urllib.parse import urlsplit

import yaml

from controller.fork import (
    DEFAULT_TTL,
    FIELD_MANAGER,
    ForkRequest,
    OverrideError,
    OverrideRow,
    build_override,
    check_key,
    expiry_of,
    human_duration,
    is_override_of,
    object_ref,
    override_name,
    override_rows,
    owned_by,
    pair,
    parse_ttl,
    pick_baseline,
    rfc3339,
    ttl_from_now,
)
from controller.kube_build import (
    GROUP_LABEL,
    JANITOR_EXPIRES_ANNOTATION,
    JANITOR_TTL_ANNOTATION,
    KEY_LABEL,
    SERVICE_LABEL,
    TTL_ANNOTATION,
    ConfigMap,
    Deployment,
    ObjectMeta,
    read_group,
    routes_from_deployments,
)
from controller.override_api import Forbidden, KubeApi, connect

__all__ = ["Terminal", "find_objects", "run"]

SPINNER: Final = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
ENV_INGRESS: Final = "DEVSTACK_INGRESS"
ENV_PREVIEW: Final = "DEVSTACK_PREVIEW_DOMAIN"
ENV_DASHBOARD: Final = "DEVSTACK_DASHBOARD"


@dataclasses.dataclass
class Terminal:
    """Where a command reads and writes, and its clocks: the process's own unless a test says otherwise."""

    out: TextIO = dataclasses.field(default_factory=lambda: sys.stdout)
    err: TextIO = dataclasses.field(default_factory=lambda: sys.stderr)
    stdin: TextIO = dataclasses.field(default_factory=lambda: sys.stdin)
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    poll: float = 0.5
    """Seconds between two reads of a Deployment while waiting for its rollout."""
    connect: Callable[[str | None, str | None], KubeApi] = connect


def confirm(term: Terminal, question: str) -> None:
    """Ask ``question`` on the terminal before deleting; raises unless the answer is yes (and
    when there is no terminal to ask on: scripts pass --yes)."""
    if not term.stdin.isatty():
        raise OverrideError(f"{question[:-1]} needs a confirmation: run it on a terminal, or pass --yes")
    term.err.write(f"{question} [y/N] ")
    term.err.flush()
    if term.stdin.readline().strip().lower() not in ("y", "yes"):
        raise OverrideError("nothing deleted")


def run(args: argparse.Namespace, terminal: Terminal | None = None) -> int:
    """Run ``devstack fork|ls|rm|extend``; raises ``OverrideError`` with the sentence to print."""
    term = terminal or Terminal()
    command = {"fork": _fork, "ls": _ls, "rm": _rm, "extend": _extend}[args.command]
    _check_flags(args)
    api = term.connect(args.kubeconfig, args.context)
    try:
        return command(args, api, term)
    finally:
        api.close()


def _check_flags(args: argparse.Namespace) -> None:
    """What can be wrong with the flags alone, said before anything is asked of the API server."""
    if getattr(args, "key", None) is not None:
        check_key(args.key)
    if args.command == "fork":
        override_name(args.service, args.key)
        if args.replicas < 0:
            raise OverrideError(f"--replicas {args.replicas}: must be 0 or more")
        if args.ttl is not None:
            parse_ttl(args.ttl, "--ttl")
        parse_ttl(args.timeout, "--timeout")
        for text in args.container:
            pair(text, "--container")
        for text in args.env:
            pair(text, "--env")
    if args.command == "extend":
        parse_ttl(args.ttl, "--ttl")


# --- finding things ----------------------------------------------------------------------------------


def find_objects(
    api: KubeApi, selector: str, namespace: str | None, *, fallback: str | None = None, config_maps: bool = False
) -> tuple[list[dict[str, Any]], str]:
    """Deployments (or, with ``config_maps``, ConfigMaps) matching ``selector`` in ``namespace`` or,
    with None, in every namespace, and where that was. A cluster-wide list that RBAC refuses is made
    again in ``fallback`` or the kubeconfig context's namespace, as a developer with a namespaced
    Role would expect."""
    list_objects = api.list_config_maps if config_maps else api.list_deployments
    if namespace is not None:
        return list_objects(selector, namespace), f"namespace {namespace}"
    try:
        return list_objects(selector, None), "all namespaces"
    except Forbidden as exc:
        ns = fallback or api.default_namespace
        if ns is None:
            raise OverrideError(f"{exc}; --namespace NS looks in one namespace") from None
        return list_objects(selector, ns), f"namespace {ns}"


def _selector(service: str | None, key: str | None) -> str:
    """Labelled overrides, of one service and one key if given."""
    return ",".join(
        [f"{SERVICE_LABEL}={service}" if service else SERVICE_LABEL, f"{KEY_LABEL}={key}" if key else KEY_LABEL]
    )


def _meta(obj: Mapping[str, Any]) -> dict[str, Any]:
    return dict(obj.get("metadata") or {})


# --- devstack fork ------------------------------------------------------------------------------------


def _fork(args: argparse.Namespace, api: KubeApi, term: Terminal) -> int:
    service, key = args.service, args.key
    name = override_name(service, key)
    request = ForkRequest(
        service=service,
        key=key,
        image=args.image,
        containers=tuple(pair(text, "--container") for text in args.container),
        env=tuple(pair(text, "--env") for text in args.env),
        replicas=args.replicas,
        fallback=args.fallback,
    )
    baselines, scope = find_objects(api, f"{SERVICE_LABEL},!{KEY_LABEL}", None, fallback=args.namespace)
    baseline = pick_baseline(service, baselines, scope)
    base_ns = _meta(baseline).get("namespace", "default")
    namespace = args.namespace or base_ns
    baseline_service = api.get("services", base_ns, service)
    if baseline_service is None:
        raise OverrideError(
            f"the baseline's Service {base_ns}/{service} does not exist: fork copies its ports "
            "and keeps the override's pods out of its selector"
        )
    ttl_text = args.ttl or (_meta(baseline).get("annotations") or {}).get(TTL_ANNOTATION) or DEFAULT_TTL
    what = "--ttl" if args.ttl else f"annotation {TTL_ANNOTATION} of {object_ref(baseline)}"
    ttl = parse_ttl(ttl_text, what)

    others, _ = find_objects(api, _selector(service, key), None, fallback=namespace)
    rivals = [o for o in others if object_ref(o) != f"{namespace}/{name}"]
    if rivals:
        names = ", ".join(sorted(object_ref(o) for o in rivals))
        raise OverrideError(
            f"{service!r} already has an override for key {key!r}: {names}; with a second one routers would route "
            f"neither (devstack rm {service} --key {key} removes it)"
        )
    _check_no_group_named(api, key, namespace, term)
    current = api.get("deployments", namespace, name)
    if current is not None and not is_override_of(current, service, key):
        raise OverrideError(
            f"Deployment {namespace}/{name} exists and is not an override of {service!r} for key {key!r}; "
            "fork leaves it alone"
        )
    if current is not None and not args.replace:
        raise OverrideError(f"the override {namespace}/{name} exists; --replace to update it")
    current_service = api.get("services", namespace, name)
    if current_service is not None and not is_override_of(current_service, service, key):
        raise OverrideError(
            f"Service {namespace}/{name} exists and is not labelled as the override of {service!r} for key "
            f"{key!r}; fork leaves it alone"
        )
    now = term.clock()
    annotation = ttl_from_now(_meta(current).get("creationTimestamp"), ttl, now) if current else ttl_text
    deployment, service_obj = build_override(request, baseline, baseline_service, ttl=annotation, namespace=namespace)

    if args.dry_run:
        _print_dry_run(term.out, deployment, service_obj, args)
        return 0
    applied = api.apply(deployment, force=args.replace)
    api.apply(owned_by(service_obj, applied), force=args.replace)
    verb = "updated" if current is not None else "created"
    print(
        f"{verb} override {namespace}/{name} (Deployment and Service) from {object_ref(baseline)}, "
        f"expires in {human_duration(ttl)}",
        file=term.out,
    )
    if args.wait:
        _wait(api, namespace, name, parse_ttl(args.timeout, "--timeout"), term, hint=f"{service} --key {key}")
    _print_usage(term.out, args, baseline, namespace, ttl)
    return 0


def _check_no_group_named(api: KubeApi, key: str, namespace: str, term: Terminal) -> None:
    """A route group named like ``key`` would take both out of routing: refuse it, where RBAC lets us look."""
    try:
        found, _ = find_objects(api, GROUP_LABEL, None, fallback=namespace, config_maps=True)
    except OverrideError as exc:
        print(f"devstack fork: route groups not checked: {exc}", file=term.err)
        return
    claims = [read_group(cast(ConfigMap, cm)) for cm in found]
    groups = sorted(c.ref for c in claims if c.usable and c.name == key)
    if groups:
        raise OverrideError(
            f"key {key!r} is the name of a route group (ConfigMap {', '.join(groups)}): a group and a key share "
            "one namespace, so routers would route neither; choose another key"
        )


def _print_dry_run(out: TextIO, deployment: dict[str, Any], service: dict[str, Any], args: argparse.Namespace) -> None:
    print(
        f"# devstack fork {args.service} --key {args.key} --dry-run: what would be applied with server-side "
        f"apply (field manager {FIELD_MANAGER}); nothing was sent.\n"
        "# The Service also gets an ownerReference to the Deployment once the Deployment exists (it needs its uid).",
        file=out,
    )
    for obj in (deployment, service):
        out.write("---\n")
        out.write(yaml.safe_dump(obj, sort_keys=False, default_flow_style=False))


def _rollout(obj: Mapping[str, Any]) -> tuple[bool, str]:
    """(done, what it is waiting for): kubectl rollout status's reading of a Deployment's status."""
    meta, spec, status = _meta(obj), obj.get("spec") or {}, obj.get("status") or {}
    wanted = int(spec.get("replicas", 1))
    if int(status.get("observedGeneration") or 0) < int(meta.get("generation") or 1):
        return False, "waiting for the deployment controller to pick up the new spec"
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise OverrideError(
                f"the rollout of {object_ref(obj)} exceeded its progress deadline: {condition.get('message', '')}"
            )
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    available = int(status.get("availableReplicas") or 0)
    ready = int(status.get("readyReplicas") or 0)
    if updated < wanted:
        return False, f"{updated} of {wanted} new replicas updated, {ready} ready"
    if total > updated:
        return False, f"{total - updated} old replicas pending termination"
    if available < updated:
        return False, f"{available} of {updated} updated replicas available, {ready} ready"
    return True, f"{available} of {wanted} replicas available"


def _wait(api: KubeApi, namespace: str, name: str, timeout: float, term: Terminal, *, hint: str) -> None:
    """Read the Deployment until its rollout is done, showing progress on ``term.err``."""
    stream = term.err
    live = stream.isatty()
    started = time.monotonic()
    last_read = -1.0
    shown = ""
    frame = 0
    try:
        while True:
            elapsed = time.monotonic() - started
            if last_read < 0 or elapsed - last_read >= term.poll:
                last_read = elapsed
                obj = api.get("deployments", namespace, name)
                if obj is None:
                    raise OverrideError(f"the override {namespace}/{name} was deleted while waiting for it")
                done, state = _rollout(obj)
                if done:
                    if live:
                        stream.write("\r\x1b[K")
                    print(f"{namespace}/{name} is ready: {state}", file=term.out)
                    return
                if not live and state != shown:
                    print(f"waiting for {namespace}/{name}: {state}", file=stream)
                shown = state
                if elapsed >= timeout:
                    raise OverrideError(
                        f"{namespace}/{name} is not ready after {human_duration(timeout)}: {shown}; see "
                        f"kubectl describe deployment -n {namespace} {name} (the override stays: "
                        f"devstack rm {hint} removes it)"
                    )
            if live:
                stream.write(f"\r{SPINNER[frame % len(SPINNER)]} {namespace}/{name}: {shown} ({int(elapsed)}s)\x1b[K")
                stream.flush()
                frame += 1
                term.sleep(0.1)
            else:
                term.sleep(term.poll)
    except KeyboardInterrupt:
        if live:
            stream.write("\r\x1b[K")
        raise OverrideError(
            f"stopped waiting; the override {namespace}/{name} stays (devstack rm {hint} removes it)"
        ) from None


def _setting(flag: str | None, env: str) -> str | None:
    value = flag if flag is not None else os.environ.get(env)
    return value.strip() or None if value else None


def _print_usage(
    out: TextIO, args: argparse.Namespace, baseline: Mapping[str, Any], namespace: str, ttl: float
) -> None:
    service, key = args.service, args.key
    baggage = f"-H 'baggage: devstack={key}'"
    lines = ["", f"Use key {key}:"]
    ingress = _setting(args.ingress, ENV_INGRESS)
    if ingress is not None:
        lines.append(f"  curl -H 'Host: {service}' {baggage} {ingress.rstrip('/')}/")
    else:
        built = routes_from_deployments([cast(Deployment, baseline)])
        routes = built.services.get(service)
        address = routes.baseline.url if routes is not None else f"http://{service}.{namespace}.svc.cluster.local"
        lines.append(f"  curl {baggage} {address}/    # from a pod whose requests pass a devstack router")
        lines.append(f"  (--ingress URL or {ENV_INGRESS} prints the line for your ingress)")
    preview = _setting(args.preview_domain, ENV_PREVIEW)
    if preview is not None:
        parts = urlsplit(preview if "://" in preview else f"http://{preview}")
        port = f":{parts.port}" if parts.port else ""
        lines.append(f"  preview:   {parts.scheme}://{key}--{service}.{parts.hostname}{port}/")
    dashboard = _setting(args.dashboard, ENV_DASHBOARD)
    if dashboard is not None:
        lines.append(f"  dashboard: {dashboard.rstrip('/')}/?q={key}")
    lines.append(
        f"It expires in {human_duration(ttl)} (devstack extend --key {key} --ttl 4h); "
        f"devstack rm {service} --key {key} removes it."
    )
    print("\n".join(lines), file=out)


# --- devstack ls -------------------------------------------------------------------------------------


def _ls(args: argparse.Namespace, api: KubeApi, term: Terminal) -> int:
    overrides, scope = find_objects(api, _selector(args.service, args.key), args.namespace)
    now = term.clock()
    if not overrides and args.output not in ("json", "yaml"):
        print(f"No overrides found in {scope}.", file=term.err)
        return 0
    wanted = {(_meta(o).get("labels") or {}).get(SERVICE_LABEL) for o in overrides}
    # Baselines anywhere: an override in another namespace than its baseline's is still routed.
    every_baseline, _ = find_objects(api, f"{SERVICE_LABEL},!{KEY_LABEL}", None, fallback=args.namespace)
    baselines = [b for b in every_baseline if (_meta(b).get("labels") or {}).get(SERVICE_LABEL) in wanted]
    services = []
    for baseline in baselines:
        meta = _meta(baseline)
        name = (meta.get("labels") or {}).get(SERVICE_LABEL, "")
        try:
            found = api.get("services", meta.get("namespace", "default"), name)
        except Forbidden as exc:
            print(f"devstack ls: leaks not checked: {exc}", file=term.err)
            continue
        if found is not None:
            services.append(found)
    try:
        groups, _ = find_objects(api, GROUP_LABEL, None, fallback=args.namespace, config_maps=True)
    except OverrideError as exc:
        print(f"devstack ls: route groups not checked: {exc}", file=term.err)
        groups = []
    rows = override_rows(overrides, baselines, services, now, groups)
    if args.output in ("json", "yaml"):
        document = {"overrides": [row.to_json(now) for row in rows]}
        if args.output == "json":
            print(json.dumps(document, indent=2), file=term.out)
        else:
            term.out.write(yaml.safe_dump(document, sort_keys=False))
        return 0
    print(_table(rows, now, wide=args.output == "wide"), file=term.out)
    for row in rows:
        for problem in row.problems:
            print(f"{row.namespace}/{row.name}: {problem}", file=term.err)
    return 0


def _expires(row: OverrideRow, now: float) -> str:
    if row.expires_at is None:
        return "never"
    left = row.expires_at - now
    return human_duration(left) if left > 0 else f"expired {human_duration(-left)} ago"


def _table(rows: Sequence[OverrideRow], now: float, *, wide: bool) -> str:
    """kubectl's layout: upper-case headings, left-aligned columns three spaces apart."""
    headings = ["SERVICE", "KEY", "READY", "EXPIRES", "AGE", "NAMESPACE", "STATUS"]
    if wide:
        headings += ["DEPLOYMENT", "FALLBACK", "TARGET", "IMAGES"]
    table = [headings]
    for row in rows:
        cells = [
            row.service,
            row.key,
            f"{row.ready}/{row.replicas}",
            _expires(row, now),
            human_duration(now - row.created) if row.created is not None else "<unknown>",
            row.namespace,
            ",".join(row.status),
        ]
        if wide:
            cells += [row.name, row.fallback, row.target or "<none>", ",".join(row.images) or "<none>"]
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(headings))]
    return "\n".join("   ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table)


# --- devstack rm -------------------------------------------------------------------------------------


def _describe(overrides: Iterable[Mapping[str, Any]]) -> str:
    return ", ".join(
        sorted(f"{object_ref(o)} ({(_meta(o).get('labels') or {}).get(SERVICE_LABEL)})" for o in overrides)
    )


def _rm(args: argparse.Namespace, api: KubeApi, term: Terminal) -> int:
    service, key = args.service, args.key
    found, _ = find_objects(api, _selector(service, key), args.namespace)
    if not found:
        which = f"of {service!r} for key {key!r}" if service else f"for key {key!r}"
        raise OverrideError(f"no override {which}" + (f" in namespace {args.namespace}" if args.namespace else ""))
    if service is None and not args.yes:
        question = f"Delete {len(found)} override(s) of key {key!r}: {_describe(found)}?"
        confirm(term, question)
    for override in found:
        meta = _meta(override)
        namespace, name, uid = meta.get("namespace", "default"), meta.get("name", ""), meta.get("uid")
        labels = meta.get("labels") or {}
        gone = api.delete("deployments", namespace, name, uid)
        svc = api.get("services", namespace, name)
        owners = {ref.get("uid") for ref in (_meta(svc).get("ownerReferences") or [])} if svc else set()
        if svc is not None and (uid in owners or is_override_of(svc, labels.get(SERVICE_LABEL, ""), key)):
            api.delete("services", namespace, name, _meta(svc).get("uid"))
        state = "deleted" if gone else "was already gone:"
        print(f"{state} override {namespace}/{name} ({labels.get(SERVICE_LABEL)}, key {key})", file=term.out)
    return 0


# --- devstack extend ---------------------------------------------------------------------------------


def _extend(args: argparse.Namespace, api: KubeApi, term: Terminal) -> int:
    ttl = parse_ttl(args.ttl, "--ttl")
    found, _ = find_objects(api, _selector(args.service, args.key), args.namespace)
    if not found:
        which = f"of {args.service!r} for key {args.key!r}" if args.service else f"for key {args.key!r}"
        raise OverrideError(f"no override {which}")
    now = term.clock()
    for override in sorted(found, key=object_ref):
        meta = _meta(override)
        annotations = dict(meta.get("annotations") or {})
        ttl_text = ttl_from_now(meta.get("creationTimestamp"), ttl, now)
        # Every expiry annotation present moves: the earliest one wins, so one left behind would still expire it.
        changes = {TTL_ANNOTATION: ttl_text}
        if JANITOR_TTL_ANNOTATION in annotations:
            changes[JANITOR_TTL_ANNOTATION] = ttl_text
        if JANITOR_EXPIRES_ANNOTATION in annotations:
            changes[JANITOR_EXPIRES_ANNOTATION] = rfc3339(now + ttl)
        patch = {"metadata": {"resourceVersion": meta.get("resourceVersion"), "annotations": changes}}
        updated = api.merge_patch("deployments", meta.get("namespace", "default"), meta.get("name", ""), patch)
        expires = expiry_of(cast(ObjectMeta, _meta(updated)))
        label = (meta.get("labels") or {}).get(SERVICE_LABEL)
        when = f"expires in {human_duration(expires - now)}, at {rfc3339(expires)}" if expires else "never expires"
        print(f"{object_ref(override)} ({label}, key {args.key}): {when}", file=term.out)
    return 0

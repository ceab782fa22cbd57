"""The controller's RBAC grants exactly the API requests its code makes: no more, no less.

The requests are derived from the source, not listed by hand: every method of the official
client's API classes that ``controller/sources/kubernetes.py`` names is looked up in the client
itself, whose generated code says which HTTP method and path it sends; method and path give the
RBAC verb and resource the API server will check, as its request-info resolver does. So a new
call (a ``read_``, ``patch_``, ``create_`` ...) without a grant fails here, and so does a grant
that no call needs any more.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client as k8s

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "controller" / "sources" / "kubernetes.py"
MANIFESTS = ROOT / "manifests"

Grant = tuple[str, str, str]
"""(API group, resource, verb), one per verb: how RBAC rules are compared here."""


def _request(api: type, method_name: str) -> tuple[str, str]:
    """The HTTP method and path template the client's ``api.method_name`` sends."""
    source = inspect.getsource(getattr(api, f"_{method_name}_serialize"))
    [http_method] = re.findall(r"method='([A-Z]+)'", source)
    [path] = re.findall(r"resource_path='([^']+)'", source)
    return http_method, path


def _grant(http_method: str, path: str, *, watch: bool) -> set[Grant]:
    """The verbs the API server checks for this request, as its request-info resolver decides."""
    parts = path.strip("/").split("/")
    group, rest = ("", parts[2:]) if parts[0] == "api" else (parts[1], parts[3:])
    if not rest:
        return set()  # API discovery (get_api_resources): allowed to every account, no grant needed
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]  # namespaces/{namespace}/<resource>...: a namespaced resource
    named = len(rest) > 1
    resource = f"{rest[0]}/{rest[2]}" if len(rest) > 2 else rest[0]
    if http_method == "GET":
        verbs = {"get"} if named else ({"list", "watch"} if watch else {"list"})
    elif http_method == "DELETE":
        verbs = {"delete" if named else "deletecollection"}
    else:
        verbs = {{"POST": "create", "PUT": "update", "PATCH": "patch"}[http_method]}
    return {(group, resource, verb) for verb in verbs}


def grants_used_by(source: str) -> set[Grant]:
    """Every (group, resource, verb) that the client calls named in ``source`` need."""
    tree = ast.parse(source)
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    apis = [getattr(k8s, name) for name in sorted(names) if re.fullmatch(r"[A-Z]\w*V\d\w*Api", name)]
    # The watcher calls its list method again with watch=True: that is the `watch` verb.
    watches = any(
        keyword.arg == "watch" and isinstance(keyword.value, ast.Constant) and keyword.value.value is True
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for keyword in node.keywords
    )
    grants: set[Grant] = set()
    for api in apis:
        for name in names:
            if not name.startswith("_") and hasattr(api, f"_{name}_serialize"):
                grants |= _grant(*_request(api, name), watch=watches)
    return grants


def _rules(rules: list[dict[str, Any]]) -> set[Grant]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _base_grants() -> set[Grant]:
    docs = yaml.safe_load_all((MANIFESTS / "rbac.yaml").read_text())
    [role] = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "devstack-controller"]
    return _rules(role["rules"])


def _delete_expired_grants() -> set[Grant]:
    component = yaml.safe_load((MANIFESTS / "delete-expired" / "kustomization.yaml").read_text())
    added = [
        op["value"]
        for patch in component["patches"]
        if "Role" in patch["target"]["kind"]
        for op in yaml.safe_load(patch["patch"])
    ]
    return _rules(added)


USED = grants_used_by(SOURCE.read_text())
DELETE_EXPIRED = {("apps", "deployments", "delete")}
"""What only ``--delete-expired`` calls: the delete-expired component grants it, the base does not."""


def test_the_derivation_sees_the_calls_we_know_of() -> None:
    # If the scan found nothing, every comparison below would pass vacuously.
    assert {
        ("apps", "deployments", "list"),
        ("apps", "deployments", "watch"),
        ("", "services", "list"),
        ("", "services", "watch"),
        ("", "configmaps", "list"),
        ("", "configmaps", "watch"),
        ("apps", "deployments", "delete"),
    } <= USED
    assert ("", "configmaps", "get") not in USED, "route groups are listed and watched, never read one by one"


def test_the_derivation_catches_a_new_call() -> None:
    extra = "core = k8s.CoreV1Api(api)\ncore.read_namespaced_config_map('x', 'ns')\ncore.patch_namespaced_pod_status()"
    assert grants_used_by(extra) == {("", "configmaps", "get"), ("", "pods/status", "patch")}
    apps = "k8s.AppsV1Api(api).list_namespaced_replica_set('ns', watch=True)\n"
    assert grants_used_by(apps) == {("apps", "replicasets", "list"), ("apps", "replicasets", "watch")}
    assert grants_used_by("k8s.AppsV1Api(api).delete_collection_namespaced_deployment('ns')\n") == {
        ("apps", "deployments", "deletecollection")
    }
    assert grants_used_by("k8s.AppsV1Api(api).get_api_resources()\n") == set()


def test_controller_rbac_grants_exactly_what_the_code_calls() -> None:
    # With --delete-expired (the component): every call has its grant and every grant a call.
    assert _base_grants() | _delete_expired_grants() == USED
    # Without it: everything but the delete, which stays an opt-in.
    assert _base_grants() == USED - DELETE_EXPIRED
    assert _delete_expired_grants() == DELETE_EXPIRED

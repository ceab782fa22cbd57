"""Every manifest validates offline against the Kubernetes schemas and keeps our deployment rules."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from controller.kube_build import find_leaks, routes_from_deployments

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
KUSTOMIZATIONS = {"kustomization.yaml"}
VERSIONS = ["1.29", kubernetes_validate.latest_version()]
"""The oldest Kubernetes we support and the newest the validator knows."""


def _files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name not in KUSTOMIZATIONS)


def _objects() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in _files():
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((f"{path.relative_to(MANIFESTS)}:{doc['kind']}/{doc['metadata']['name']}", doc))
    return found


OBJECTS = _objects()


def _of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for _, obj in OBJECTS if obj["kind"] == kind}


def _containers(deployment: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every container of the pod by name, init containers (native sidecars) included."""
    pod = deployment["spec"]["template"]["spec"]
    return {c["name"]: c for c in [*pod.get("initContainers", []), *pod["containers"]]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "obj"), OBJECTS, ids=[name for name, _ in OBJECTS])
def test_manifest_is_valid_kubernetes(name: str, obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


COMPONENTS = ("delete-expired", "namespaced", "plain-sidecar")


def _component(name: str) -> dict[str, Any]:
    return yaml.safe_load((MANIFESTS / name / "kustomization.yaml").read_text())


def _patch_ops(component: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The JSON 6902 operations a component applies to objects of ``kind`` (a regex in kustomize)."""
    return [
        op
        for patch in component["patches"]
        if re.fullmatch(patch["target"]["kind"], kind)
        for op in yaml.safe_load(patch["patch"])
    ]


def test_kustomization_lists_every_manifest_and_component() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    top_level = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name not in KUSTOMIZATIONS)
    assert sorted(kustomization["resources"]) == top_level
    assert sorted(p.parent.name for p in MANIFESTS.glob("*/kustomization.yaml")) == sorted(COMPONENTS)
    text = (MANIFESTS / "kustomization.yaml").read_text()
    for name in COMPONENTS:
        component = _component(name)
        assert component["kind"] == "Component", name
        assert all((MANIFESTS / name / r).is_file() for r in component.get("resources", [])), name
        assert f"#   - {name}" in text, f"{name} is not offered in kustomization.yaml"
    assert {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": "--delete-expired"} in (
        _patch_ops(_component("delete-expired"), "Deployment")
    )


@pytest.mark.parametrize("name", sorted(_of_kind("Deployment")))
def test_every_pod_is_locked_down_and_bounded(name: str) -> None:
    deployment = _of_kind("Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in _containers(deployment).values():
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert {"requests", "limits"} <= set(container["resources"]), container["name"]
        assert {"cpu", "memory"} <= set(container["resources"]["limits"]), container["name"]


def _probe_paths(container: dict[str, Any]) -> tuple[str, str, Any]:
    ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
    assert ready["port"] == live["port"]
    return ready["path"], live["path"], ready["port"]


def test_devstack_containers_use_the_image_entrypoint_and_health_endpoints() -> None:
    deployments = _of_kind("Deployment")
    controller = _containers(deployments["devstack-controller"])["controller"]
    assert controller["image"] == "devstack:latest"
    assert controller["args"][:2] == ["controller", "--kubernetes"]
    assert _probe_paths(controller) == ("/readyz", "/healthz", "feed")
    assert controller["ports"][0] == {"name": "feed", "containerPort": 9902}
    for name, mode in (("devstack-router", "ingress"), ("checkout-client", "sidecar")):
        router = _containers(deployments[name])["router"]
        assert router["image"] == "devstack:latest" and router["args"][0] == "router"
        assert f"--mode={mode}" in router["args"]
        assert "--routes-from=http://devstack-controller.devstack.svc.cluster.local:9902" in router["args"]
        assert "--admin=0.0.0.0:9901" in router["args"]
        assert _probe_paths(router) == ("/readyz", "/healthz", "admin")


def test_sidecar_app_sends_its_traffic_through_the_local_router() -> None:
    pod = _containers(_of_kind("Deployment")["checkout-client"])
    env = {e["name"]: e["value"] for e in pod["app"]["env"]}
    assert env["HTTP_PROXY"] == env["http_proxy"] == "http://127.0.0.1:8080"
    assert "--listen=127.0.0.1:8080" in pod["router"]["args"]


def test_controller_rbac_is_read_only_and_delete_is_a_component() -> None:
    # That these are exactly the calls the code makes is test_kube_rbac.py's job; here, the shape.
    roles = _of_kind("ClusterRole")
    assert sorted(roles) == ["devstack-controller"]
    watch = roles["devstack-controller"]["rules"]
    assert {(tuple(r["apiGroups"]), tuple(r["resources"])) for r in watch} == {
        (("apps",), ("deployments",)),
        (("",), ("services",)),
        (("",), ("configmaps",)),
    }
    assert all(sorted(r["verbs"]) == ["list", "watch"] for r in watch)
    [add_rule] = _patch_ops(_component("delete-expired"), "ClusterRole")
    assert add_rule["path"] == "/rules/-"
    assert add_rule["value"] == {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["delete"]}
    # The same patch reaches the Role that the namespaced component makes of the ClusterRole.
    assert _patch_ops(_component("delete-expired"), "Role") == [add_rule]
    bindings = _of_kind("ClusterRoleBinding")
    assert sorted(bindings) == ["devstack-controller"]
    assert bindings["devstack-controller"]["subjects"] == [
        {"kind": "ServiceAccount", "name": "devstack-controller", "namespace": "devstack"}
    ]
    assert _of_kind("ServiceAccount")["devstack-router"]["automountServiceAccountToken"] is False


def test_demo_is_labelled_per_the_contract_and_does_not_leak() -> None:
    # As the API server returns them: with a creationTimestamp for devstack.io/ttl to count from.
    deployments = [
        {**obj, "metadata": {**obj["metadata"], "creationTimestamp": "2024-05-01T10:00:00Z"}}
        for _, obj in OBJECTS
        if obj["kind"] == "Deployment"
    ]
    services = [obj for _, obj in OBJECTS if obj["kind"] == "Service"]
    result = routes_from_deployments(deployments)
    assert sorted(result.services) == ["orders", "payments"]
    payments = result.services["payments"]
    assert payments.baseline.url == "http://payments.devstack-demo.svc.cluster.local:8080"
    assert payments.overrides["alice"].target.url == "http://payments-alice.devstack-demo.svc.cluster.local:8080"
    assert payments.overrides["alice"].expires_at is not None
    assert result.conflicts == () and result.invalid == ()
    assert find_leaks(deployments, services) == ()


def test_sidecar_is_a_native_sidecar_that_starts_before_the_app() -> None:
    pod = _of_kind("Deployment")["checkout-client"]["spec"]["template"]["spec"]
    [router] = pod["initContainers"]
    assert router["name"] == "router" and router["restartPolicy"] == "Always"
    # The kubelet starts the app only once the sidecar's startup probe passes: the proxy listens.
    assert router["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert [c["name"] for c in pod["containers"]] == ["app"]
    assert "restartPolicy" not in pod["containers"][0]


def test_plain_sidecar_component_moves_the_router_back_among_the_containers() -> None:
    ops = _patch_ops(_component("plain-sidecar"), "Deployment")
    assert ops[0] == {"op": "remove", "path": "/spec/template/spec/initContainers/0/restartPolicy"}
    assert ops[-1] == {
        "op": "move",
        "from": "/spec/template/spec/initContainers/0",
        "path": "/spec/template/spec/containers/-",
    }
    [target] = {p["target"]["name"] for p in _component("plain-sidecar")["patches"]}
    assert _of_kind("Deployment")[target]["spec"]["template"]["spec"]["initContainers"][0]["name"] == "router"


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("name", ["devstack-router", "devstack-controller"])
def test_router_and_controller_survive_drains(name: str) -> None:
    deployment = _of_kind("Deployment")[name]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [budget] = [b for b in _of_kind("PodDisruptionBudget").values() if _selects(b["spec"]["selector"], labels)]
    assert budget["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    # A budget that lets every replica go protects nothing; one that lets none go blocks drains.
    assert 0 < budget["spec"]["maxUnavailable"] < deployment["spec"]["replicas"]
    assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    terms = deployment["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    spread = {
        t["podAffinityTerm"]["topologyKey"]
        for t in terms["preferredDuringSchedulingIgnoredDuringExecution"]
        if _selects(t["podAffinityTerm"]["labelSelector"], labels)
    }
    assert "kubernetes.io/hostname" in spread


def test_public_router_service_does_not_expose_the_admin_port() -> None:
    service = _of_kind("Service")["devstack-router"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert all(p["port"] != 9901 for p in service["spec"]["ports"])


def _policy_for(deployment: dict[str, Any]) -> dict[str, Any]:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    [policy] = [p for p in _of_kind("NetworkPolicy").values() if _selects(p["spec"]["podSelector"], labels)]
    assert policy["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    return policy


def test_network_policy_keeps_the_admin_port_inside_the_namespace() -> None:
    router = _of_kind("Deployment")["devstack-router"]
    ingress = _policy_for(router)["spec"]["ingress"]
    sources = {port["port"]: rule.get("from") for rule in ingress for port in rule["ports"]}
    assert sources == {
        "admin": [{"podSelector": {}}],  # pods of this namespace, nothing else
        "http": None,  # the proxy port: from anywhere
    }
    ports = {p["name"]: p["containerPort"] for p in _containers(router)["router"]["ports"]}
    assert ports == {"http": 8080, "admin": 9901}
    # The controller's feed: every router in the cluster (sidecars included), nothing outside it.
    feed = _policy_for(_of_kind("Deployment")["devstack-controller"])["spec"]["ingress"]
    assert feed == [{"from": [{"namespaceSelector": {}}], "ports": [{"protocol": "TCP", "port": "feed"}]}]

"""Every manifest validates offline against the Kubernetes schemas and keeps our deployment rules."""

from __future__ import annotations

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
    return {c["name"]: c for c in deployment["spec"]["template"]["spec"]["containers"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(("name", "obj"), OBJECTS, ids=[name for name, _ in OBJECTS])
def test_manifest_is_valid_kubernetes(name: str, obj: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(obj, version, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    top_level = sorted(p.name for p in MANIFESTS.glob("*.yaml") if p.name not in KUSTOMIZATIONS)
    assert sorted(kustomization["resources"]) == top_level
    component = yaml.safe_load((MANIFESTS / "delete-expired" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"
    assert all((MANIFESTS / "delete-expired" / r).is_file() for r in component["resources"])
    assert "--delete-expired" in component["patches"][0]["patch"]


@pytest.mark.parametrize("name", sorted(_of_kind("Deployment")))
def test_every_pod_is_locked_down_and_bounded(name: str) -> None:
    deployment = _of_kind("Deployment")[name]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    for container in pod["containers"]:
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


def test_controller_rbac_is_read_only_and_delete_is_separate() -> None:
    roles = _of_kind("ClusterRole")
    watch = roles["devstack-controller"]["rules"]
    assert {(tuple(r["apiGroups"]), tuple(r["resources"])) for r in watch} == {
        (("apps",), ("deployments",)),
        (("",), ("services",)),
    }
    assert all(sorted(r["verbs"]) == ["get", "list", "watch"] for r in watch)
    [delete] = roles["devstack-controller-delete-expired"]["rules"]
    assert (delete["apiGroups"], delete["resources"], delete["verbs"]) == (["apps"], ["deployments"], ["delete"])
    bindings = _of_kind("ClusterRoleBinding")
    for binding in bindings.values():
        assert binding["subjects"] == [
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

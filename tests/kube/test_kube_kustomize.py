"""The manifests as `kubectl apply -k` sends them: rendered by `kubectl kustomize`, with each
combination of components a platform team would pick, validated offline against the Kubernetes
schemas, and checked for what each component promises (RBAC, --namespace, the sidecar's form).

Needs a kubectl whose kustomize knows components (kustomize 4+, kubectl 1.21+); skipped without
one. test_kube_manifests.py checks the same files one by one without kubectl.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.kube.test_kube_rbac import DELETE_EXPIRED, USED, Grant

MANIFESTS = Path(__file__).resolve().parents[2] / "manifests"
VERSIONS = ["1.29", kubernetes_validate.latest_version()]
"""The oldest Kubernetes the base supports (native sidecars) and the newest the validator knows."""
OLDEST = min(kubernetes_validate.utils.all_versions(), key=lambda v: tuple(map(int, v.split("."))))
"""The oldest schema the validator has: the plain-sidecar form must validate there too."""

VARIANTS: dict[str, tuple[str, ...]] = {
    "base": (),
    "delete-expired": ("delete-expired",),
    "namespaced": ("namespaced",),
    "namespaced+delete-expired": ("namespaced", "delete-expired"),
    "delete-expired+namespaced": ("delete-expired", "namespaced"),  # components compose in any order
    "plain-sidecar": ("plain-sidecar",),
    "all": ("delete-expired", "namespaced", "plain-sidecar"),
}
CONTROLLER_SA = {"kind": "ServiceAccount", "name": "devstack-controller", "namespace": "devstack"}


@functools.cache
def _kubectl() -> tuple[str | None, str]:
    """kubectl's path, or None and why it cannot render these manifests."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None, "kubectl is not installed"
    try:
        out = subprocess.run(
            [kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60, check=True
        ).stdout
        version = json.loads(out).get("kustomizeVersion", "")
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return None, f"cannot tell kubectl's kustomize version: {exc}"
    if major < 4:
        return None, f"kubectl's kustomize {version} predates components (needs 4+, kubectl 1.21+)"
    return kubectl, ""


@pytest.fixture(scope="module")
def kubectl() -> str:
    path, why = _kubectl()
    if path is None:
        pytest.skip(why)
    return path


@functools.cache
def _render(components: tuple[str, ...]) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize` of the manifests with these components, from a throwaway overlay."""
    kubectl, _ = _kubectl()
    assert kubectl is not None
    with tempfile.TemporaryDirectory() as overlay:
        base = os.path.relpath(MANIFESTS, overlay)  # kustomize refuses absolute paths
        kustomization = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [base],
            "components": [f"{base}/{name}" for name in components],
        }
        Path(overlay, "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
        result = subprocess.run(
            [kubectl, "kustomize", overlay],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, "KUBECONFIG": os.devnull},  # rendering needs no cluster
        )
    assert result.returncode == 0, result.stderr
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(components: tuple[str, ...]) -> list[dict[str, Any]]:
    return list(_render(components))


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def _key(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_manifests_are_valid_kubernetes(kubectl: str, variant: str, version: str) -> None:
    objects = render(VARIANTS[variant])
    assert len({_key(o) for o in objects}) == len(objects), "an object is rendered twice"
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{variant}: {_key(obj)} on Kubernetes {version}: {exc.message} at {list(exc.path)}")


def test_base_renders_exactly_the_files(kubectl: str) -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = [doc for name in kustomization["resources"] for doc in yaml.safe_load_all((MANIFESTS / name).read_text())]
    rendered = {_key(o): o for o in render(())}
    assert rendered == {_key(o): o for o in files if o}


def _controller_grants(objects: list[dict[str, Any]]) -> set[Grant]:
    """Every (group, resource, verb) the rendered bindings give the controller's ServiceAccount."""
    grants: set[Grant] = set()
    for binding in objects:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding") or CONTROLLER_SA not in binding["subjects"]:
            continue
        ref = binding["roleRef"]
        [role] = [
            o
            for o in objects
            if o["kind"] == ref["kind"]
            and o["metadata"]["name"] == ref["name"]
            and o["metadata"].get("namespace") == binding["metadata"].get("namespace")
        ]
        grants |= {
            (group, resource, verb)
            for rule in role["rules"]
            for group in rule["apiGroups"]
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
    return grants


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_grants_exactly_what_its_controller_calls(kubectl: str, variant: str) -> None:
    components = VARIANTS[variant]
    objects = render(components)
    args = _one(objects, "Deployment", "devstack-controller")["spec"]["template"]["spec"]["containers"][0]["args"]
    deletes = "delete-expired" in components
    assert ("--delete-expired" in args) == deletes
    assert _controller_grants(objects) == (USED if deletes else USED - DELETE_EXPIRED)
    namespaces = [arg.removeprefix("--namespace=") for arg in args if arg.startswith("--namespace")]
    cluster_wide = [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    if "namespaced" in components:
        # Nothing cluster-wide is left, and the Role sits where the controller watches.
        assert cluster_wide == []
        roles = [o for o in objects if o["kind"] in ("Role", "RoleBinding")]
        assert {o["metadata"]["namespace"] for o in roles} == set(namespaces) == {"devstack-demo"}
        assert any(o["kind"] == "Deployment" and o["metadata"]["namespace"] == "devstack-demo" for o in objects)
    else:
        assert namespaces == []
        assert sorted(o["kind"] for o in cluster_wide) == ["ClusterRole", "ClusterRoleBinding"]


def _sidecar_pod(components: tuple[str, ...]) -> dict[str, Any]:
    return _one(render(components), "Deployment", "checkout-client")


@pytest.mark.parametrize("variant", ["plain-sidecar", "all"])
def test_plain_sidecar_runs_on_clusters_older_than_1_29(kubectl: str, variant: str) -> None:
    deployment = _sidecar_pod(VARIANTS[variant])
    pod = deployment["spec"]["template"]["spec"]
    assert not pod.get("initContainers")
    containers = {c["name"]: c for c in pod["containers"]}
    assert list(containers) == ["app", "router"]
    assert "restartPolicy" not in containers["router"]
    assert containers["router"]["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    # Otherwise the same router: image, args, probes, limits, security context.
    [native] = _sidecar_pod(())["spec"]["template"]["spec"]["initContainers"]
    assert {k: v for k, v in containers["router"].items() if k != "lifecycle"} == {
        k: v for k, v in native.items() if k != "restartPolicy"
    }
    kubernetes_validate.validate(deployment, OLDEST, strict=True)


def test_native_sidecar_needs_the_newer_schema() -> None:
    # Why plain-sidecar exists: before 1.28 the API has no restartPolicy on a container at all.
    [native] = [d for d in yaml.safe_load_all((MANIFESTS / "sidecar-example.yaml").read_text()) if d]
    kubernetes_validate.validate(native, "1.29", strict=True)
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(native, OLDEST, strict=True)

"""``devstack fork``, ``ls``, ``rm`` and ``extend`` against the fake API server, through the real command.

Each command runs as ``devstack.cli.main`` with ``KUBECONFIG`` naming the fake, in a worker thread so
the fake keeps answering on the test's event loop (two run as real subprocesses, the way a user runs
them). The objects ``fork`` writes are read back from the fake and checked field by field, judged by
the controller's own rules (``routes_from_deployments``, ``find_leaks``), and followed by a router
watching the fake: alice reaches her override within a second of it becoming ready, and the baseline
again once ``rm`` deletes it. ``--dry-run`` output is validated against the Kubernetes schemas.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from controller.aggregator import Aggregator
from controller.fork import OverrideError, expiry_of, human_duration, timestamp
from controller.kube_build import find_leaks, routes_from_deployments
from controller.override_api import connect
from controller.override_cli import Terminal, run
from controller.sources.kubernetes import kubernetes_source
from devstack.cli import build_parser, main
from router.server import RouterServer
from router.table import TargetKind
from tests.cli_support import run_devstack, user_error
from tests.kube.kube_fake_apiserver import APPLY_PATCH, MERGE_PATCH, FakeApiServer, deployment, reserve_port
from tests.kube.kube_support import eventually, start_upstream
from tests.kube.test_kube_source import FAST

SELECTOR = {"app": "payments", "track": "baseline"}
OWN = {"devstack.io/service": "payments", "devstack.io/routing-key": "alice"}
VERSIONS = ["1.29", kubernetes_validate.latest_version()]


def baseline(
    name: str = "payments", *, service: str = "payments", namespace: str = "shop", **options: Any
) -> dict[str, Any]:
    """A baseline as a team would deploy it: two containers, the main one named after the service."""
    obj = deployment(
        name, service=service, namespace=namespace, pod_labels={"app": service, "track": "baseline"}, **options
    )
    obj["metadata"]["labels"]["app.kubernetes.io/instance"] = "shop-prod"  # an Argo CD app's: never copied
    template = obj["spec"]["template"]
    template["metadata"]["annotations"] = {"prometheus.io/scrape": "true"}
    template["spec"]["containers"] = [
        {
            "name": service,
            "image": f"registry.example.com/{service}:1.0",
            "ports": [{"name": "http", "containerPort": 8080}],
            "env": [{"name": "LOG_LEVEL", "value": "info"}, {"name": "FEATURE_X", "value": "0"}],
        },
        {"name": "proxy", "image": "registry.example.com/proxy:2.1"},
    ]
    return obj


def baseline_service(name: str = "payments", *, namespace: str = "shop") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app": name}},
        "spec": {
            "type": "NodePort",
            "selector": {"app": name, "track": "baseline"},
            "ports": [
                {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP", "nodePort": 30080},
                {"name": "admin", "port": 9000, "targetPort": 9000, "protocol": "TCP", "appProtocol": "http"},
            ],
        },
    }


@pytest.fixture
def shop(fake_api: FakeApiServer) -> FakeApiServer:
    """payments (the baseline alice forks) and orders, each with its Service, in namespace shop."""
    for name in ("payments", "orders"):
        fake_api.apply(baseline(name, service=name))
        fake_api.apply(baseline_service(name))
    return fake_api


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "dev", "user": {"token": "not-checked"}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "dev", "namespace": "shop"}},
                    {"name": "cluster-wide", "context": {"cluster": "fake", "user": "dev"}},
                ],
                "current-context": "fake",
            }
        )
    )
    return path


@pytest.fixture
def kubeconfig(tmp_path: Path, fake_api: FakeApiServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG names the fake, as it would name a cluster; no ingress, preview or dashboard is known."""
    path = _kubeconfig(tmp_path / "kubeconfig", fake_api.url)
    monkeypatch.setenv("KUBECONFIG", str(path))
    for name in ("DEVSTACK_INGRESS", "DEVSTACK_PREVIEW_DOMAIN", "DEVSTACK_DASHBOARD"):
        monkeypatch.delenv(name, raising=False)
    return path


def _main(args: tuple[str, ...]) -> subprocess.CompletedProcess[str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors
            code = int(exc.code or 0)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


async def devstack(*args: str) -> subprocess.CompletedProcess[str]:
    """``devstack ARGS`` in this process, in a thread: the fake answers on this loop meanwhile."""
    return await asyncio.to_thread(_main, args)


async def fork_ok(*args: str) -> subprocess.CompletedProcess[str]:
    result = await devstack("fork", *args)
    assert result.returncode == 0, result.stderr
    return result


def _selected_by(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# --- fork: the objects, field by field ---------------------------------------------------------------


async def test_fork_writes_a_deployment_and_service_checked_field_by_field(
    shop: FakeApiServer, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEVSTACK_PREVIEW_DOMAIN", "preview.example.com")
    monkeypatch.setenv("DEVSTACK_DASHBOARD", "http://devstack.example.com/")
    before = time.time()
    result = await fork_ok(
        "payments", "--key", "alice", "--image", "registry.example.com/payments:alice",
        "--env", "FEATURE_X=1", "--env", "DEBUG=true", "--ttl", "6h", "--fallback", "baseline", "--no-wait",
    )  # fmt: skip

    made = shop.objects["deployments"][("shop", "payments-alice")]
    meta = made["metadata"]
    assert meta["labels"] == {**OWN, "app.kubernetes.io/managed-by": "devstack"}, "ours only: no Argo CD label"
    assert meta["annotations"] == {
        "devstack.io/ttl": "6h",
        "devstack.io/fallback": "baseline",
        "devstack.io/forked-from": "shop/payments",
    }
    assert meta["creationTimestamp"] and before - 2 <= timestamp(meta["creationTimestamp"]) <= time.time() + 2
    assert [(e["manager"], e["operation"]) for e in meta["managedFields"]] == [("devstack", "Apply")]
    spec = made["spec"]
    assert spec["replicas"] == 1
    assert spec["selector"] == {"matchLabels": OWN}
    pod_labels = spec["template"]["metadata"]["labels"]
    assert pod_labels == {"app": "payments", "track": "alice", **OWN}
    assert spec["template"]["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}
    main_container, proxy = spec["template"]["spec"]["containers"]
    assert main_container == {
        "name": "payments",
        "image": "registry.example.com/payments:alice",
        "ports": [{"name": "http", "containerPort": 8080}],
        "env": [
            {"name": "LOG_LEVEL", "value": "info"},
            {"name": "FEATURE_X", "value": "1"},
            {"name": "DEBUG", "value": "true"},
        ],
    }
    assert proxy == {"name": "proxy", "image": "registry.example.com/proxy:2.1"}, "other containers as they were"

    svc = shop.objects["services"][("shop", "payments-alice")]
    assert svc["metadata"]["labels"] == {**OWN, "app.kubernetes.io/managed-by": "devstack"}
    assert svc["metadata"]["ownerReferences"] == [
        {"apiVersion": "apps/v1", "kind": "Deployment", "name": "payments-alice", "uid": meta["uid"]}
    ]
    assert svc["spec"] == {
        "type": "ClusterIP",
        "selector": OWN,
        "ports": [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
            {"name": "admin", "port": 9000, "targetPort": 9000, "protocol": "TCP", "appProtocol": "http"},
        ],
    }, "the baseline Service's ports, without its nodePort"

    # Disjoint from the baseline Service's real selector; the override's own selects only its pods.
    real_selector = shop.objects["services"][("shop", "payments")]["spec"]["selector"]
    assert not _selected_by(real_selector, pod_labels)
    baseline_pods = shop.objects["deployments"][("shop", "payments")]["spec"]["template"]["metadata"]["labels"]
    assert not _selected_by(svc["spec"]["selector"], baseline_pods)

    patches = shop.patches()
    assert [(p.collection, p.name, p.content_type, p.query["fieldManager"]) for p in patches] == [
        ("deployments", "payments-alice", APPLY_PATCH, "devstack"),
        ("services", "payments-alice", APPLY_PATCH, "devstack"),
    ]
    assert not shop.deletes()

    # The controller's own rules: routed, with our fallback, and no leak.
    deployments, services = list(shop.objects["deployments"].values()), list(shop.objects["services"].values())
    assert find_leaks(deployments, services) == ()
    built = routes_from_deployments(deployments)
    assert built.conflicts == () and built.invalid == ()
    override = built.services["payments"].overrides["alice"]
    assert override.target.url == "http://payments-alice.shop.svc.cluster.local:8080"
    assert override.fallback.value == "baseline"
    # ...which would see a leak if there were one: the same override with the baseline's pod labels.
    leaky = {
        **made,
        "spec": {**made["spec"], "template": {**made["spec"]["template"], "metadata": {"labels": SELECTOR}}},
    }
    assert [leak.deployment for leak in find_leaks([*deployments, leaky], services)] == ["payments-alice"]

    assert "created override shop/payments-alice" in result.stdout
    assert "curl -H 'baggage: devstack=alice' http://payments.shop.svc.cluster.local:8080/" in result.stdout
    assert "preview:   http://alice--payments.preview.example.com/" in result.stdout
    assert "dashboard: http://devstack.example.com/?q=alice" in result.stdout
    assert "devstack rm payments --key alice" in result.stdout


async def test_fork_ttl_comes_from_the_flag_else_the_baseline_else_8h(shop: FakeApiServer, kubeconfig: Path) -> None:
    shop.apply(baseline(annotations={"devstack.io/ttl": "2h", "devstack.io/port": "8080"}))
    await fork_ok("payments", "--key", "alice", "--no-wait")
    await fork_ok("orders", "--key", "alice", "--no-wait")
    await fork_ok("orders", "--key", "bob", "--ttl", "45m", "--no-wait")
    notes = {name: obj["metadata"]["annotations"] for (_, name), obj in shop.objects["deployments"].items()}
    assert notes["payments-alice"]["devstack.io/ttl"] == "2h"
    assert notes["payments-alice"]["devstack.io/port"] == "8080", "the baseline's port annotation is copied"
    assert notes["orders-alice"]["devstack.io/ttl"] == "8h"
    assert notes["orders-bob"]["devstack.io/ttl"] == "45m"


async def test_fork_with_an_upstream_annotation_drops_it_and_containers_by_name(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    shop.apply(baseline(upstream="http://10.1.2.3:8080"))
    await fork_ok("payments", "--key", "alice", "--container", "proxy=registry.example.com/proxy:dev", "--no-wait")
    made = shop.objects["deployments"][("shop", "payments-alice")]
    assert "devstack.io/upstream" not in made["metadata"]["annotations"], "it addresses the baseline, not the fork"
    images = [c["image"] for c in made["spec"]["template"]["spec"]["containers"]]
    assert images == ["registry.example.com/payments:1.0", "registry.example.com/proxy:dev"]


async def test_a_selector_without_track_gets_one_of_its_labels_changed(shop: FakeApiServer, kubeconfig: Path) -> None:
    svc = baseline_service()
    svc["spec"]["selector"] = {"app": "payments"}
    shop.apply(svc)
    await fork_ok("payments", "--key", "alice", "--no-wait")
    labels = shop.objects["deployments"][("shop", "payments-alice")]["spec"]["template"]["metadata"]["labels"]
    assert labels == {"app": "payments-alice", "track": "baseline", **OWN}
    assert find_leaks(list(shop.objects["deployments"].values()), list(shop.objects["services"].values())) == ()


async def test_replace_updates_the_override_and_takes_over_fields_others_changed(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    await fork_ok("payments", "--key", "alice", "--no-wait")
    api = connect(str(kubeconfig), None)
    try:
        # `kubectl set image` by someone else: a merge patch by another field manager.
        current = shop.objects["deployments"][("shop", "payments-alice")]
        containers = [dict(c) for c in current["spec"]["template"]["spec"]["containers"]]
        containers[0]["image"] = "registry.example.com/payments:hotfix"
        patch = {"spec": {"template": {"spec": {"containers": containers}}}}
        await asyncio.to_thread(shop_patch, kubeconfig, patch)
        # A plain apply of different values now conflicts (the fake's server-side apply semantics).
        desired = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "payments-alice", "namespace": "shop"},
            "spec": {"template": {"spec": {"containers": [{"name": "payments", "image": "x:1"}]}}},
        }
        with pytest.raises(OverrideError, match="conflict"):
            await asyncio.to_thread(api.apply, desired)
    finally:
        api.close()

    result = await devstack(
        "fork", "payments", "--key", "alice", "--image", "registry.example.com/payments:a2", "--no-wait"
    )
    assert result.returncode == 1
    assert user_error(result) == "devstack: the override shop/payments-alice exists; --replace to update it"

    generation = shop.objects["deployments"][("shop", "payments-alice")]["metadata"]["generation"]
    result = await fork_ok(
        "payments", "--key", "alice", "--image", "registry.example.com/payments:a2", "--replace", "--no-wait"
    )
    assert "updated override shop/payments-alice" in result.stdout
    made = shop.objects["deployments"][("shop", "payments-alice")]
    assert made["spec"]["template"]["spec"]["containers"][0]["image"] == "registry.example.com/payments:a2"
    assert made["metadata"]["generation"] == generation + 1
    assert shop.patches()[-2].query["force"] == "true"
    owners = {e["manager"] for e in made["metadata"]["managedFields"] if "f:spec" in e["fieldsV1"]}
    assert owners == {"devstack"}, made["metadata"]["managedFields"]


def shop_patch(kubeconfig: Path, patch: dict[str, Any]) -> None:
    """A merge patch by field manager ``kubectl-set``, through the official client (blocking)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config

    configuration = k8s.Configuration()
    k8s_config.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    with k8s.ApiClient(configuration) as api_client:
        k8s.AppsV1Api(api_client).patch_namespaced_deployment(
            "payments-alice", "shop", patch, field_manager="kubectl-set", _content_type=MERGE_PATCH
        )


# --- --dry-run -----------------------------------------------------------------------------------------


async def test_dry_run_prints_valid_yaml_of_what_fork_applies_and_sends_nothing(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    args = ("payments", "--key", "alice", "--image", "registry.example.com/payments:alice", "--env", "A=1")
    dry = await fork_ok(*args, "--dry-run")
    assert not shop.patches() and not shop.deletes(), "nothing sent"
    assert ("shop", "payments-alice") not in shop.objects["deployments"]
    documents = [doc for doc in yaml.safe_load_all(dry.stdout) if doc is not None]
    assert [doc["kind"] for doc in documents] == ["Deployment", "Service"]
    for doc in documents:
        for version in VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)

    await fork_ok(*args, "--no-wait")
    applied = [p.body for p in shop.patches()]
    assert applied[0] == documents[0], "the dry run shows exactly what is applied"
    assert {k: v for k, v in applied[1]["metadata"].items() if k != "ownerReferences"} == documents[1]["metadata"]
    assert applied[1]["spec"] == documents[1]["spec"]


# --- fork → router → rm ---------------------------------------------------------------------------------


@pytest.fixture
async def router(shop: FakeApiServer, kube_config: Any) -> AsyncIterator[tuple[RouterServer, str]]:
    """A router watching the fake (``devstack router --kubernetes``); the baseline answers 'baseline'."""
    runner, url = await start_upstream("baseline")
    shop.apply(baseline(upstream=url))
    server = RouterServer()
    aggregator = Aggregator(["kubernetes"], server.swap)
    task = asyncio.create_task(kubernetes_source(configuration=kube_config, settings=FAST)(aggregator))
    await server.start(("127.0.0.1", 0), admin=None)
    try:
        await eventually(lambda: server.table.resolve("payments", None) is not None, timeout=3.0, what="router fed")
        yield server, "http://{}:{}/".format(*server.address)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.close(drain=0)
        await runner.cleanup()


async def test_fork_is_routed_within_a_second_once_ready_and_rm_returns_alice_to_the_baseline(
    shop: FakeApiServer, kubeconfig: Path, router: tuple[RouterServer, str]
) -> None:
    server, url = router
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def ask(key: str) -> tuple[int, str, str]:
            headers = {"Host": "payments", "baggage": f"devstack={key}", "x-devstack-debug": "1"}
            async with session.get(url, headers=headers) as response:
                return response.status, await response.text(), response.headers.get("x-devstack-route", "")

        assert (await ask("alice"))[:2] == (200, "baseline")

        forking = asyncio.create_task(devstack("fork", "payments", "--key", "alice", "--timeout", "30s"))
        await eventually(lambda: ("shop", "payments-alice") in shop.objects["deployments"], timeout=10, what="applied")
        # Created, not ready: the key gets a 503 (fallback error), not the baseline.
        await eventually(
            lambda: (d := server.table.resolve("payments", "alice")) is not None and d.reason == "override-not-ready",
            timeout=2,
            what="alice's override known, not ready",
        )
        assert (await ask("alice"))[0] == 503
        assert not forking.done(), "--wait waits for the rollout"

        shop.set_ready("shop", "payments-alice")
        ready_at = time.monotonic()

        def routed() -> bool:
            d = server.table.resolve("payments", "alice")
            return d is not None and d.kind is TargetKind.OVERRIDE

        await eventually(routed, timeout=1.0, interval=0.01, what="alice routed to her override within 1 s")
        assert time.monotonic() - ready_at < 1.0
        decision = server.table.resolve("payments", "alice")
        assert decision is not None and decision.target is not None
        assert decision.target.url == "http://payments-alice.shop.svc.cluster.local:8080"
        # Through the router: the override's cluster address does not resolve here, but the router's
        # own account of the request says where it sent it.
        status, _, route = await ask("alice")
        assert "target=override" in route, (status, route)
        assert (await ask("bob"))[:2] == (200, "baseline"), "other keys are untouched"

        result = await asyncio.wait_for(forking, 15)
        assert result.returncode == 0, result.stderr
        assert "shop/payments-alice is ready" in result.stdout
        assert "waiting for shop/payments-alice:" in result.stderr, "plain progress lines when not on a terminal"

        removed = await devstack("rm", "payments", "--key", "alice")
        assert removed.returncode == 0, removed.stderr
        assert removed.stdout.strip() == "deleted override shop/payments-alice (payments, key alice)"
        assert ("shop", "payments-alice") not in shop.objects["deployments"]
        assert ("shop", "payments-alice") not in shop.objects["services"], "its Service goes with it"
        started = time.monotonic()
        while (await ask("alice"))[:2] != (200, "baseline"):
            assert time.monotonic() - started < 1.0, "alice back on the baseline within 1 s"
            await asyncio.sleep(0.02)


async def test_on_a_terminal_progress_is_one_line_redrawn_and_a_timeout_is_a_sentence(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    args = build_parser().parse_args(["fork", "payments", "--key", "alice", "--timeout", "20s"])
    term = Terminal(out=io.StringIO(), err=_Tty(), poll=0.05)
    forking = asyncio.create_task(asyncio.to_thread(run, args, term))
    await eventually(lambda: ("shop", "payments-alice") in shop.objects["deployments"], timeout=10, what="applied")
    await eventually(lambda: "\r" in term.err.getvalue(), timeout=5, what="a spinner")
    shop.set_ready("shop", "payments-alice")
    assert await asyncio.wait_for(forking, 10) == 0
    shown = term.err.getvalue()
    assert "\r⠋ shop/payments-alice: waiting for the deployment controller to pick up the new spec (0s)" in shown
    assert shown.endswith("\r\x1b[K"), "the progress line is cleared at the end"
    assert "\n" not in shown, "one line, redrawn"
    assert "shop/payments-alice is ready: 1 of 1 replicas available" in term.out.getvalue()

    result = await devstack("fork", "orders", "--key", "alice", "--timeout", "1s")
    assert result.returncode == 1
    assert user_error(result) == (
        "devstack: shop/orders-alice is not ready after 1s: waiting for the deployment controller to pick up the "
        "new spec; see kubectl describe deployment -n shop orders-alice (the override stays: devstack rm orders "
        "--key alice removes it)"
    )
    assert ("shop", "orders-alice") in shop.objects["deployments"]


async def test_fork_into_another_namespace(shop: FakeApiServer, kubeconfig: Path) -> None:
    await fork_ok("payments", "--key", "alice", "-n", "team", "--no-wait")
    assert ("team", "payments-alice") in shop.objects["deployments"]
    assert ("team", "payments-alice") in shop.objects["services"]
    built = routes_from_deployments(list(shop.objects["deployments"].values()))
    assert (
        built.services["payments"].overrides["alice"].target.url == "http://payments-alice.team.svc.cluster.local:8080"
    )
    result = await devstack("rm", "payments", "--key", "alice")
    assert result.stdout.strip() == "deleted override team/payments-alice (payments, key alice)"


async def test_without_a_kubeconfig_the_pods_service_account_is_used(
    tmp_path: Path, fake_api: FakeApiServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubernetes.config import incluster_config

    token, cert = tmp_path / "token", tmp_path / "ca.crt"
    token.write_text("a-service-account-token")
    cert.write_text("not a certificate")
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(cert))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    port = fake_api.url.rsplit(":", 1)[1]
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
    monkeypatch.setenv("KUBERNETES_SERVICE_PORT", port)
    result = await devstack("ls")
    # The in-cluster configuration speaks TLS to the API server; the fake speaks plain HTTP, so the
    # attempt fails, but it shows which configuration was chosen.
    assert result.returncode == 1
    assert user_error(result).startswith(f"devstack: cannot reach the API server at https://127.0.0.1:{port}: ")


# --- extend ---------------------------------------------------------------------------------------------


async def test_extend_moves_the_expiry_of_every_override_of_the_key(shop: FakeApiServer, kubeconfig: Path) -> None:
    await fork_ok("payments", "--key", "alice", "--ttl", "1h", "--no-wait")
    await fork_ok("orders", "--key", "alice", "--ttl", "1h", "--no-wait")
    # payments-alice was made 50 minutes ago and kube-janitor also watches it.
    aged = shop.objects["deployments"][("shop", "payments-alice")]
    created = time.time() - 50 * 60
    aged["metadata"]["creationTimestamp"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created))
    aged["metadata"]["annotations"]["janitor/expires"] = "2020-01-01T00:00:00Z"
    assert expiry_of(aged["metadata"]) < time.time(), "expired already, by the janitor's annotation"

    result = await devstack("extend", "--key", "alice", "--ttl", "4h")
    assert result.returncode == 0, result.stderr
    now = time.time()
    for name in ("payments-alice", "orders-alice"):
        meta = shop.objects["deployments"][("shop", name)]["metadata"]
        assert abs(expiry_of(meta) - (now + 4 * 3600)) < 5, (name, meta["annotations"])
    notes = shop.objects["deployments"][("shop", "payments-alice")]["metadata"]["annotations"]
    assert notes["devstack.io/ttl"].startswith("4h50m"), notes
    assert timestamp(notes["janitor/expires"]) == pytest.approx(now + 4 * 3600, abs=5)
    patches = [p for p in shop.patches() if p.content_type == MERGE_PATCH]
    assert len(patches) == 2 and all(p.body["metadata"]["resourceVersion"] for p in patches)
    assert "shop/orders-alice (orders, key alice): expires in 4h" in result.stdout

    listed = await devstack("ls", "--key", "alice")
    assert listed.returncode == 0, listed.stderr
    assert all(" 3h59m " in line or " 4h " in line for line in listed.stdout.splitlines()[1:]), listed.stdout


# --- ls -------------------------------------------------------------------------------------------------


async def test_ls_lists_overrides_like_kubectl_get_with_leaks_and_conflicts(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    await fork_ok("payments", "--key", "alice", "--no-wait")
    shop.set_ready("shop", "payments-alice")
    # bob's hand-made override copies the baseline's pod labels: a leak.
    shop.apply(deployment("payments-bob", service="payments", key="bob", pod_labels=SELECTOR))
    # carol has two overrides of orders: a conflict, neither routed.
    shop.apply(deployment("orders-carol", service="orders", key="carol"))
    shop.apply(deployment("orders-carol2", service="orders", key="carol", namespace="team"))
    # dave overrides a service that has no baseline.
    shop.apply(deployment("ghost-dave", service="ghost", key="dave", ready=0))

    result = await devstack("ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["SERVICE", "KEY", "READY", "EXPIRES", "AGE", "NAMESPACE", "STATUS"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[-2], r[-1]) for r in rows] == [
        ("ghost", "dave", "0/1", "shop", "NoBaseline,NotReady"),
        ("orders", "carol", "1/1", "shop", "Conflict"),
        ("orders", "carol", "1/1", "team", "Conflict"),
        ("payments", "alice", "1/1", "shop", "Routed"),
        ("payments", "bob", "1/1", "shop", "Leak"),
    ]
    alice = rows[3]
    assert alice[3] in ("7h59m", "8h") and alice[4].endswith("s"), alice
    assert rows[4][3] == "never", "bob has no TTL"
    assert (
        "shop/payments-bob: override shop/payments-bob (service 'payments', key 'bob'): its pods match" in result.stderr
    )
    assert "2 overrides of 'orders' for key 'carol' (shop/orders-carol, team/orders-carol2)" in result.stderr
    starts = [lines[0].index(heading) for heading in lines[0].split()]
    for line in lines[1:]:  # every cell starts under its heading
        assert all(line[i] != " " and (i == 0 or line[i - 1] == " ") for i in starts), line

    wide = await devstack("ls", "-o", "wide", "--key", "alice")
    headings = wide.stdout.splitlines()[0].split()
    assert headings[-4:] == ["DEPLOYMENT", "FALLBACK", "TARGET", "IMAGES"]
    assert "http://payments-alice.shop.svc.cluster.local:8080" in wide.stdout
    assert len(wide.stdout.splitlines()) == 2

    as_json = await devstack("ls", "-o", "json", "--service", "payments")
    document = yaml.safe_load(as_json.stdout)  # JSON is YAML
    assert [(o["key"], o["status"]) for o in document["overrides"]] == [("alice", ["Routed"]), ("bob", ["Leak"])]
    alice_json = document["overrides"][0]
    assert alice_json["deployment"] == "payments-alice" and alice_json["ready"] == 1 and alice_json["replicas"] == 1
    assert 8 * 3600 - 60 < alice_json["expires_in_seconds"] <= 8 * 3600
    assert alice_json["target"] == "http://payments-alice.shop.svc.cluster.local:8080"
    as_yaml = await devstack("ls", "-o", "yaml", "--key", "carol")
    assert [o["namespace"] for o in yaml.safe_load(as_yaml.stdout)["overrides"]] == ["shop", "team"]

    nothing = await devstack("ls", "--key", "zed")
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert nothing.stderr.strip() == "No overrides found in all namespaces."


# --- rm --key (every override of a key) -------------------------------------------------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_rm_every_override_of_a_key_asks_first(shop: FakeApiServer, kubeconfig: Path) -> None:
    await fork_ok("payments", "--key", "alice", "--no-wait")
    await fork_ok("orders", "--key", "alice", "--no-wait")

    refused = await devstack("rm", "--key", "alice")
    assert refused.returncode == 1
    assert user_error(refused) == (
        "devstack: Delete 2 override(s) of key 'alice': shop/orders-alice (orders), shop/payments-alice (payments) "
        "needs a confirmation: run it on a terminal, or pass --yes"
    )
    assert not shop.deletes()

    args = build_parser().parse_args(["rm", "--key", "alice"])
    said_no = Terminal(out=io.StringIO(), err=io.StringIO(), stdin=_Tty("n\n"))
    with pytest.raises(OverrideError, match="nothing deleted"):
        await asyncio.to_thread(run, args, said_no)
    assert not shop.deletes()
    said_yes = Terminal(out=io.StringIO(), err=io.StringIO(), stdin=_Tty("y\n"))
    assert await asyncio.to_thread(run, args, said_yes) == 0
    assert "Delete 2 override(s) of key 'alice'" in said_yes.err.getvalue()
    assert not [name for (_, name) in shop.objects["deployments"] if name.endswith("-alice")]
    assert not [name for (_, name) in shop.objects["services"] if name.endswith("-alice")]

    await fork_ok("payments", "--key", "alice", "--no-wait")
    result = await devstack("rm", "--key", "alice", "--yes")
    assert result.returncode == 0, result.stderr
    assert ("shop", "payments-alice") not in shop.objects["deployments"]


async def test_rm_leaves_a_same_named_service_that_is_not_the_overrides(shop: FakeApiServer, kubeconfig: Path) -> None:
    shop.apply(deployment("payments-alice", service="payments", key="alice"))
    foreign = baseline_service("payments-alice")
    shop.apply(foreign)
    result = await devstack("rm", "payments", "--key", "alice")
    assert result.returncode == 0, result.stderr
    assert ("shop", "payments-alice") not in shop.objects["deployments"]
    assert ("shop", "payments-alice") in shop.objects["services"]


# --- errors: one sentence, non-zero ------------------------------------------------------------------------


def _second_baseline(api: FakeApiServer) -> None:
    api.apply(baseline(namespace="team"))


def _forbid_patch(api: FakeApiServer) -> None:
    api.forbid("patch", "deployments", "shop")


def _override_exists(api: FakeApiServer) -> None:
    api.apply(deployment("payments-alice", service="payments", key="alice"))


def _other_override(api: FakeApiServer) -> None:
    api.apply(deployment("payments-al", service="payments", key="alice", namespace="team"))


def _foreign_deployment(api: FakeApiServer) -> None:
    api.apply(deployment("payments-alice", service="billing", namespace="shop"))


def _no_service(api: FakeApiServer) -> None:
    api.delete("services", "shop", "payments")


def _two_containers_no_main(api: FakeApiServer) -> None:
    obj = baseline()
    obj["spec"]["template"]["spec"]["containers"][0]["name"] = "app"
    api.apply(obj)


def _selects_by_devstack_label_only(api: FakeApiServer) -> None:
    svc = baseline_service()
    svc["spec"]["selector"] = {"devstack.io/service": "payments"}
    api.apply(svc)


FORK = ("fork", "payments", "--key", "alice", "--no-wait")
ERRORS: list[tuple[str, tuple[str, ...], Any, str]] = [
    (
        "no-baseline",
        ("fork", "billing", "--key", "alice"),
        None,
        "devstack: no baseline for 'billing' in all namespaces: no Deployment is labelled "
        "devstack.io/service=billing without devstack.io/routing-key (services with a baseline: orders, payments)",
    ),
    (
        "two-baselines",
        FORK,
        _second_baseline,
        "devstack: more than one baseline for 'payments' (shop/payments, team/payments): routers route none of "
        "them; remove the devstack.io/service label from all but one",
    ),
    (
        "key-not-dns-1123",
        ("fork", "payments", "--key", "Alice_1"),
        None,
        "devstack: key 'Alice_1' is not a DNS-1123 label: 1-63 lower-case letters, digits and '-', "
        "starting and ending with a letter or digit",
    ),
    (
        "name-too-long",
        ("fork", "payments", "--key", "a" * 60),
        None,
        "devstack: the override's name 'payments-" + "a" * 60 + "' would be 69 characters, over the 63 a Service "
        "name may have; use a key of at most 54 characters",
    ),
    (
        "exists",
        FORK,
        _override_exists,
        "devstack: the override shop/payments-alice exists; --replace to update it",
    ),
    (
        "another-override-of-the-key",
        FORK,
        _other_override,
        "devstack: 'payments' already has an override for key 'alice': team/payments-al; with a second one "
        "routers would route neither (devstack rm payments --key alice removes it)",
    ),
    (
        "name-taken",
        FORK,
        _foreign_deployment,
        "devstack: Deployment shop/payments-alice exists and is not an override of 'payments' for key 'alice'; "
        "fork leaves it alone",
    ),
    (
        "rbac",
        FORK,
        _forbid_patch,
        "devstack: RBAC forbids patch on deployments.apps in namespace shop for alice@example.com",
    ),
    (
        "no-service",
        FORK,
        _no_service,
        "devstack: the baseline's Service shop/payments does not exist: fork copies its ports and keeps the "
        "override's pods out of its selector",
    ),
    (
        "which-container",
        ("fork", "payments", "--key", "alice", "--image", "x:1"),
        _two_containers_no_main,
        "devstack: the baseline's pods have containers app, proxy: say which gets the image with --container "
        "NAME=IMAGE (and mark the main one with the kubectl.kubernetes.io/default-container annotation)",
    ),
    (
        "unknown-container",
        ("fork", "payments", "--key", "alice", "--container", "db=x:1"),
        None,
        "devstack: --container db=x:1: the baseline's pods have no container 'db' (they have payments, proxy)",
    ),
    (
        "bad-ttl",
        ("fork", "payments", "--key", "alice", "--ttl", "soon"),
        None,
        "devstack: --ttl: 'soon' is not a duration like 30m, 6h or 1h30m",
    ),
    (
        "selector-of-devstack-labels-only",
        FORK,
        _selects_by_devstack_label_only,
        "devstack: the baseline Service selects its pods by devstack.io/service=payments only, which every "
        "override's pods carry; add a label of its own (e.g. track: baseline) to its selector and its pods",
    ),
    ("rm-nothing", ("rm", "payments", "--key", "zed"), None, "devstack: no override of 'payments' for key 'zed'"),
    ("extend-nothing", ("extend", "--key", "zed", "--ttl", "1h"), None, "devstack: no override for key 'zed'"),
    (
        "unknown-context",
        ("ls", "--context", "nope"),
        None,
        "devstack: kubeconfig {kubeconfig}: no context 'nope' (it has: cluster-wide, fake)",
    ),
]


@pytest.mark.parametrize(("args", "setup", "sentence"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
async def test_every_error_is_one_sentence_and_a_non_zero_exit(
    shop: FakeApiServer, kubeconfig: Path, args: tuple[str, ...], setup: Any, sentence: str
) -> None:
    await assert_refused(shop, args, setup, sentence.format(kubeconfig=kubeconfig))


async def assert_refused(shop: FakeApiServer, args: tuple[str, ...], setup: Any, sentence: str) -> None:
    """``devstack ARGS`` after ``setup(shop)`` says ``sentence``, exits 1 and changes nothing."""
    if setup is not None:
        setup(shop)
    version = shop.rv
    result = await devstack(*args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert user_error(result) == sentence
    assert result.stdout == ""
    assert shop.rv == version, "nothing was changed"


async def test_rbac_refusing_the_cluster_wide_list_falls_back_to_the_context_namespace(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    shop.forbid("list", "deployments", "*")  # a developer with a Role in namespace shop only
    # The kubeconfig's current context has namespace shop: fork and ls look there.
    await fork_ok("payments", "--key", "alice", "--no-wait")
    assert ("shop", "payments-alice") in shop.objects["deployments"]
    listed = await devstack("ls")
    assert listed.returncode == 0 and "alice" in listed.stdout, listed.stderr

    result = await devstack("ls", "--context", "cluster-wide")  # a context without a namespace
    assert result.returncode == 1
    assert user_error(result) == (
        "devstack: RBAC forbids list on deployments.apps in all namespaces (cluster-wide) for alice@example.com; "
        "--namespace NS looks in one namespace"
    )
    ok = await devstack("ls", "--context", "cluster-wide", "-n", "shop")
    assert ok.returncode == 0 and "alice" in ok.stdout


async def test_an_unreachable_api_server_and_no_configuration_are_one_sentence(
    tmp_path: Path, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = reserve_port()  # bound, not listening: connections are refused
    try:
        port = sock.getsockname()[1]
        monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "dead", f"http://127.0.0.1:{port}")))
        result = await devstack("ls")
        assert result.returncode == 1
        assert (
            user_error(result)
            == f"devstack: cannot reach the API server at http://127.0.0.1:{port}: connection refused"
        )
    finally:
        sock.close()
    missing = tmp_path / "missing"
    monkeypatch.setenv("KUBECONFIG", str(missing))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    result = await devstack("rm", "payments", "--key", "alice")
    assert result.returncode == 1
    assert user_error(result) == (
        f"devstack: no Kubernetes configuration: no kubeconfig ({missing}; set KUBECONFIG or --kubeconfig) "
        "and not running in a pod"
    )


async def test_the_real_command_in_a_subprocess(shop: FakeApiServer, kubeconfig: Path) -> None:
    env = {"KUBECONFIG": str(kubeconfig)}
    result = await asyncio.to_thread(run_devstack, "fork", "billing", "--key", "alice", env=env)
    assert result.returncode == 1
    assert user_error(result).startswith("devstack: no baseline for 'billing' in all namespaces")
    shop.forbid("delete", "deployments")
    shop.apply(deployment("payments-alice", service="payments", key="alice"))
    result = await asyncio.to_thread(run_devstack, "rm", "payments", "--key", "alice", env=env)
    assert result.returncode == 1
    assert (
        user_error(result)
        == "devstack: RBAC forbids delete on deployments.apps in namespace shop for alice@example.com"
    )
    result = await asyncio.to_thread(run_devstack, "fork", "orders", "--key", "bob", "--no-wait", env=env)
    assert result.returncode == 0, result.stderr
    assert "created override shop/orders-bob" in result.stdout
    assert human_duration(8 * 3600) in result.stdout

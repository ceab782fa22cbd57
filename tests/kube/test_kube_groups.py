"""Route groups from Kubernetes: ConfigMaps labelled ``devstack.io/route-group``, against the fake API server.

The ConfigMap format (``kube_build.read_group``) checked case by case; the Kubernetes source
listing and watching group ConfigMaps beside Deployments (a group routes to its first member with
an override, per service; a watch event adding or removing a member, or deleting the ConfigMap,
changes routing within a second; a 410 relist finds a group added meanwhile; nothing is published
before the ConfigMaps are listed); clashes with keys, groups declared twice, nesting and unusable
ConfigMaps reported in the controller's ``/v1/routes`` while the rest of the table keeps serving;
a real router's debug header naming the member; and ``devstack group create|ls|rm`` through the
real command, checked on the fake's objects, with its error sentences.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from controller.aggregator import Aggregator
from controller.cli import Controller
from controller.fork import OverrideError
from controller.group_cli import run
from controller.kube_build import read_group, routes_from_deployments
from controller.override_cli import Terminal
from controller.sources.kubernetes import KubernetesSource, kubernetes_source
from devstack.cli import build_parser
from router.server import RouterServer
from router.table import RouteTable, TargetKind
from tests.cli_support import user_error
from tests.kube.kube_fake_apiserver import (
    APPLY_PATCH,
    FakeApiServer,
    ListScript,
    deployment,
    group_config_map,
    service_object,
)
from tests.kube.kube_support import eventually, start_upstream
from tests.kube.test_kube_fork import _kubeconfig, _Tty, assert_refused, devstack
from tests.kube.test_kube_source import FAST, Harness

ALICE_URL, BOB_URL = "http://10.0.0.2:8080", "http://10.0.0.3:8080"
PAYMENTS = deployment("payments", service="payments", upstream="http://10.0.0.1:8080")
PAYMENTS_ALICE = deployment("payments-alice", service="payments", key="alice", upstream=ALICE_URL)
PAYMENTS_BOB = deployment("payments-bob", service="payments", key="bob", upstream=BOB_URL)
ORDERS = deployment("orders", service="orders", upstream="http://10.0.1.1:8080")
ORDERS_BOB = deployment("orders-bob", service="orders", key="bob", upstream="http://10.0.1.3:8080")
TEAM = group_config_map("team-checkout", ["alice", "bob"])


def _shop(api: FakeApiServer) -> None:
    """payments with alice's and bob's overrides, orders with bob's only."""
    for obj in (PAYMENTS, PAYMENTS_ALICE, PAYMENTS_BOB, ORDERS, ORDERS_BOB):
        api.apply(obj)


def _via(table: RouteTable, service: str, key: str = "team-checkout") -> str | None:
    """The member whose override ``key`` reaches on ``service``; None for the baseline."""
    decision = table.resolve(service, key)
    return None if decision is None else decision.via


# --- the ConfigMap format ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "keys", "problem"),
    [
        ({"group": "team", "keys": "alice,bob"}, ("alice", "bob"), None),
        ({"group": "team", "keys": "alice, bob , carol"}, ("alice", "bob", "carol"), None),
        ({"group": "team", "keys": "alice\nbob\n"}, ("alice", "bob"), None),
        ({"group": " team\n", "keys": "alice"}, ("alice",), None),
        ({"keys": "alice"}, (), "labelled devstack.io/route-group but its data has no 'group' naming the group"),
        ({"group": "Team", "keys": "alice"}, (), "data 'group': 'Team' must be a DNS-1123 label"),
        ({"group": "team"}, (), "route group 'team': data 'keys' lists no keys (e.g. 'alice,bob')"),
        ({"group": "team", "keys": " , "}, (), "data 'keys' lists no keys"),
        ({"group": "team", "keys": "alice;bob"}, (), "route group 'team': key 'alice;bob' must be a DNS-1123 label"),
        ({"group": "team", "keys": "alice,alice"}, (), "route group 'team': key 'alice' is listed twice"),
        ({"group": "team", "keys": "alice,team"}, (), "route group 'team' lists its own name: groups do not nest"),
        ({"group": "team", "keys": "a", "members": "b"}, (), "unknown data key 'members' (a route group has only"),
    ],
    ids=[
        "commas", "commas-and-spaces", "one-per-line", "name-trimmed", "no-group", "bad-name", "no-keys",
        "only-separators", "bad-key", "twice", "itself", "unknown-data",
    ],
)  # fmt: skip
def test_a_group_config_map_names_the_group_and_lists_its_keys(
    data: dict[str, str], keys: tuple[str, ...], problem: str | None
) -> None:
    claim = read_group(group_config_map("team", [], data=data))
    assert claim.ref == "shop/devstack-group-team"
    if problem is None:
        assert (claim.usable, claim.name, claim.keys) == (True, "team", keys)
    else:
        assert not claim.usable and claim.problem is not None and problem in claim.problem, claim.problem


def test_binary_data_is_refused() -> None:
    cm = group_config_map("team", ["alice"])
    cm["binaryData"] = {"blob": "AA=="}
    assert read_group(cm).problem == "unknown data key 'blob' (a route group has only 'group' and 'keys')"


def test_the_build_resolves_groups_per_service_and_reports_every_problem_once() -> None:
    deployments = [PAYMENTS, PAYMENTS_ALICE, PAYMENTS_BOB, ORDERS, ORDERS_BOB]
    config_maps = [
        TEAM,
        group_config_map("bob", ["alice"]),  # named like bob's key: neither is routed
        group_config_map("outer", ["team-checkout", "carol"]),  # lists a group: not routed
        group_config_map("twice", ["alice"]),
        group_config_map("twice", ["bob"], namespace="team"),  # declared twice: neither is routed
        group_config_map("broken", "Alice"),
    ]
    built = routes_from_deployments(deployments, config_maps)
    table = RouteTable(built.services)
    assert _via(table, "payments") == "alice" and _via(table, "orders") is None, "bob's key is in the clash"
    assert table.resolve("payments", "bob").reason == "no-override"
    assert table.resolve("orders", "bob").reason == "no-override"
    for key in ("outer", "twice", "broken"):
        assert table.resolve("payments", key).reason == "no-override", key
    assert dict(table.services["payments"].groups) == {"team-checkout": ("alice", "bob")}
    assert built.conflicts == (
        "route group 'bob' (configmap shop/devstack-group-bob) has the name of the routing key of deployment "
        "shop/orders-bob, deployment shop/payments-bob: a group and a key share one namespace; neither is routed",
        "route group 'outer' (configmap shop/devstack-group-outer) lists 'team-checkout', a route group "
        "(configmap shop/devstack-group-team-checkout): groups do not nest; 'outer' is not routed",
        "route group 'twice' is declared by 2 ConfigMaps (shop/devstack-group-twice, team/devstack-group-twice); "
        "none is routed",
    )
    assert built.invalid == (
        "configmap shop/devstack-group-broken: route group 'broken': key 'Alice' must be a DNS-1123 label: "
        "lower-case, digits and '-'; not routed",
    )
    assert {v.claim.ref: v.status for v in built.groups} == {
        "shop/devstack-group-bob": ("KeyClash",),
        "shop/devstack-group-broken": ("Invalid",),
        "shop/devstack-group-outer": ("Nested",),
        "shop/devstack-group-team-checkout": ("Routed",),
        "shop/devstack-group-twice": ("Conflict",),
        "team/devstack-group-twice": ("Conflict",),
    }


# --- the Kubernetes source ------------------------------------------------------------------------------


@pytest.fixture
async def source(kube_config: Any) -> AsyncIterator[Any]:
    started: list[tuple[Harness, asyncio.Task[None]]] = []

    async def start(**options: Any) -> Harness:
        h = Harness(kube_config, **options)
        started.append((h, asyncio.create_task(h.source.run(), name="test-groups-source")))
        return h

    yield start
    for _, task in started:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_group_config_map_routes_its_key_to_the_first_member_with_an_override(
    fake_api: FakeApiServer, source: Any
) -> None:
    _shop(fake_api)
    fake_api.apply(TEAM)
    h = await source()
    await eventually(lambda: _via(h.table, "payments") == "alice", what="team-checkout reaches alice on payments")
    decision = h.decide("team-checkout")
    assert decision is not None and decision.target is not None and decision.target.url == ALICE_URL
    assert decision.kind is TargetKind.OVERRIDE
    assert _via(h.table, "orders") == "bob", "alice has no orders override: the next member's"
    assert h.table.to_json()["groups"] == {"team-checkout": ["alice", "bob"]}
    # Listed and watched like Deployments: by label, with bookmarks, from the list's resourceVersion.
    await eventually(lambda: fake_api.watches("configmaps"), what="a ConfigMap watch is open")
    listed, watched = fake_api.lists("configmaps")[0], fake_api.watches("configmaps")[0]
    assert listed.query["labelSelector"] == watched.query["labelSelector"] == "devstack.io/route-group"
    assert watched.query["allowWatchBookmarks"] == "true"
    assert h.source.status()["conflicts"] == [] and h.source.status()["invalid"] == []


async def test_a_watch_event_adding_or_removing_a_member_changes_routing_within_a_second(
    fake_api: FakeApiServer, source: Any
) -> None:
    _shop(fake_api)
    fake_api.apply(group_config_map("team-checkout", ["alice"]))
    h = await source()
    await eventually(lambda: fake_api.open_watches == 3 and _via(h.table, "payments") == "alice", what="watching")
    assert _via(h.table, "orders") is None, "alice has no orders override: the baseline"

    fake_api.apply(group_config_map("team-checkout", ["alice", "bob"]))  # bob added
    added = time.monotonic()
    await eventually(lambda: _via(h.table, "orders") == "bob", timeout=1.0, what="bob reached within 1 s")
    assert time.monotonic() - added < 1.0
    assert _via(h.table, "payments") == "alice", "alice still comes first where she has an override"

    fake_api.apply(group_config_map("team-checkout", "bob"))  # alice removed
    removed = time.monotonic()
    await eventually(lambda: _via(h.table, "payments") == "bob", timeout=1.0, what="alice gone within 1 s")
    assert time.monotonic() - removed < 1.0

    fake_api.delete("configmaps", "shop", "devstack-group-team-checkout")
    decision = await eventually(
        lambda: (d := h.decide("team-checkout")) is not None and d.reason == "no-override" and d,
        timeout=1.0,
        what="the group gone within 1 s",
    )
    assert decision.kind is TargetKind.BASELINE and decision.via is None
    assert h.table.to_json()["groups"] == {}
    assert h.routed_to("alice") == ALICE_URL, "the members' own keys are untouched"


async def test_a_group_added_while_disconnected_is_found_by_the_410_relist(
    fake_api: FakeApiServer, source: Any
) -> None:
    _shop(fake_api)
    h = await source()
    await eventually(lambda: fake_api.open_watches == 3 and h.table.version > 0, what="watching")
    fake_api.apply(TEAM, notify=False)  # compacted away: no watch will ever see this event
    fake_api.expire_watches()
    await eventually(lambda: _via(h.table, "payments") == "alice", timeout=2.0, what="found by the relist")
    assert len(fake_api.lists("configmaps")) >= 2
    assert "resourceVersionMatch" not in fake_api.lists("configmaps")[1].query, "a consistent relist after 410"


async def test_nothing_is_published_before_the_group_config_maps_are_listed(
    fake_api: FakeApiServer, kube_config: Any
) -> None:
    _shop(fake_api)
    fake_api.apply(TEAM)
    fake_api.list_scripts["configmaps"].extend([ListScript(500)] * 3)
    published: list[RouteTable] = []
    aggregator = Aggregator(["kubernetes"], published.append)
    src = KubernetesSource(aggregator.update, aggregator.report_error, configuration=kube_config, settings=FAST)
    task = asyncio.create_task(src.run())
    try:
        await eventually(lambda: published, timeout=3.0, what="a table once the ConfigMaps are listed")
        assert len(fake_api.lists("configmaps")) == 4
        assert _via(published[0], "payments") == "alice", "the very first table has the group"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- conflicts in the controller's status; the table keeps serving ------------------------------------------


@pytest.fixture
async def controller(kube_config: Any) -> AsyncIterator[Controller]:
    made = Controller(listen="127.0.0.1:0", configuration=kube_config, settings=FAST)
    await made.start()
    try:
        yield made
    finally:
        await made.close()


async def _get(controller: Controller, path: str) -> tuple[int, Any]:
    url = "http://{}:{}".format(*controller.address) + path
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_a_clash_and_a_nested_group_are_conflicts_while_the_table_keeps_serving(
    fake_api: FakeApiServer, controller: Controller
) -> None:
    _shop(fake_api)
    fake_api.apply(TEAM)
    await eventually(lambda: _via(controller.publisher.table, "payments") == "alice", what="serving the group")
    before = controller.publisher.table.version

    fake_api.apply(group_config_map("alice", ["bob"]))  # named like alice's key
    fake_api.apply(group_config_map("outer", ["team-checkout", "carol"]))  # a group listing a group
    fake_api.apply(group_config_map("broken", "Bob"))  # not a key

    def reported() -> Any:
        status = controller.source.status()
        return len(status["conflicts"]) == 2 and len(status["invalid"]) == 1 and status

    status = await eventually(reported, timeout=1.0, what="reported within 1 s")
    table = controller.publisher.table
    assert table.version > before, "a new table is published: the rest keeps moving"
    assert [c.split(" (")[0] for c in status["conflicts"]] == ["route group 'alice'", "route group 'outer'"]
    assert "a group and a key share one namespace; neither is routed" in status["conflicts"][0]
    assert "groups do not nest" in status["conflicts"][1]
    assert status["invalid"][0].startswith("configmap shop/devstack-group-broken: route group 'broken': key 'Bob'")
    # Neither alice's overrides nor the group 'alice' are routed; team-checkout reaches bob now.
    assert table.resolve("payments", "alice").reason == "no-override"
    assert _via(table, "payments") == "bob" and _via(table, "orders") == "bob"
    assert table.resolve("payments", "outer").reason == "no-override"
    assert table.resolve("payments", None).target.url == "http://10.0.0.1:8080"

    code, body = await _get(controller, "/v1/routes")
    assert code == 200 and body["conflicts"] == status["conflicts"] and body["invalid"] == status["invalid"]
    assert body["groups"] == {"team-checkout": ["alice", "bob"]}
    code, ready = await _get(controller, "/readyz")
    assert code == 200 and ready["conflicts"] == status["conflicts"]

    fake_api.delete("configmaps", "shop", "devstack-group-alice")
    await eventually(lambda: _via(controller.publisher.table, "payments") == "alice", what="alice's back")
    await eventually(lambda: len(controller.source.status()["conflicts"]) == 1)


# --- through a real router: the debug header names the member ------------------------------------------------


async def test_a_router_routes_the_group_and_its_debug_header_names_the_member(
    fake_api: FakeApiServer, kube_config: Any
) -> None:
    runners = {}
    urls = {}
    for name in ("baseline", "alice", "bob"):
        runners[name], urls[name] = await start_upstream(name)
    fake_api.apply(deployment("payments", service="payments", upstream=urls["baseline"]))
    fake_api.apply(deployment("payments-alice", service="payments", key="alice", upstream=urls["alice"]))
    fake_api.apply(deployment("payments-bob", service="payments", key="bob", upstream=urls["bob"]))
    fake_api.apply(TEAM)
    server = RouterServer()
    aggregator = Aggregator(["kubernetes"], server.swap)
    task = asyncio.create_task(kubernetes_source(configuration=kube_config, settings=FAST)(aggregator))
    await server.start(("127.0.0.1", 0), admin=None)
    url = "http://{}:{}/".format(*server.address)
    try:
        await eventually(lambda: _via(server.table, "payments") == "alice", timeout=3.0, what="router fed")
        async with aiohttp.ClientSession() as session:

            async def ask(key: str) -> tuple[str, str]:
                headers = {"Host": "payments", "baggage": f"devstack={key}", "x-devstack-debug": "1"}
                async with session.get(url, headers=headers) as response:
                    return await response.text(), response.headers.get("x-devstack-route", "")

            assert await ask("team-checkout") == (
                "alice",
                "service=payments; key=team-checkout; via=alice; target=override; reason=override",
            )
            fake_api.apply(group_config_map("team-checkout", ["bob", "alice"]))
            await eventually(lambda: _via(server.table, "payments") == "bob", what="reordered")
            assert await ask("team-checkout") == (
                "bob",
                "service=payments; key=team-checkout; via=bob; target=override; reason=override",
            )
            assert (await ask("alice"))[0] == "alice"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.close(drain=0)
        for runner in runners.values():
            await runner.cleanup()


# --- devstack group create | ls | rm ------------------------------------------------------------------------------


@pytest.fixture
def shop(fake_api: FakeApiServer) -> FakeApiServer:
    _shop(fake_api)
    return fake_api


@pytest.fixture
def kubeconfig(tmp_path: Path, fake_api: FakeApiServer, monkeypatch: pytest.MonkeyPatch) -> Path:
    """KUBECONFIG names the fake; the current context's namespace is shop."""
    path = _kubeconfig(tmp_path / "kubeconfig", fake_api.url)
    monkeypatch.setenv("KUBECONFIG", str(path))
    return path


def _groups_in(api: FakeApiServer) -> dict[tuple[str, str], dict[str, Any]]:
    return dict(api.objects["configmaps"])


async def test_create_applies_the_config_map_and_a_router_follows_create_and_rm(
    shop: FakeApiServer, kubeconfig: Path, kube_config: Any
) -> None:
    aggregator = Aggregator(["kubernetes"], lambda table: None)
    task = asyncio.create_task(kubernetes_source(configuration=kube_config, settings=FAST)(aggregator))
    try:
        await eventually(lambda: shop.open_watches == 3, timeout=3.0, what="watching")
        result = await devstack("group", "create", "team-checkout", "alice", "bob")
        assert result.returncode == 0, result.stderr
        created = time.monotonic()
        assert result.stdout.splitlines() == [
            "created route group team-checkout: alice, bob (ConfigMap shop/devstack-group-team-checkout)",
            "Requests with baggage devstack=team-checkout go, per service, to the override of alice, then bob, the "
            "first that has one there, else to the baseline; devstack group rm team-checkout removes it.",
        ]
        cm = shop.objects["configmaps"][("shop", "devstack-group-team-checkout")]
        assert cm["metadata"]["labels"] == {
            "devstack.io/route-group": "team-checkout",
            "app.kubernetes.io/managed-by": "devstack",
        }
        assert cm["data"] == {"group": "team-checkout", "keys": "alice,bob"}
        assert [(e["manager"], e["operation"]) for e in cm["metadata"]["managedFields"]] == [("devstack", "Apply")]
        [patch] = shop.patches()
        assert (patch.collection, patch.content_type, patch.query["fieldManager"]) == (
            "configmaps",
            APPLY_PATCH,
            "devstack",
        )
        await eventually(lambda: _via(aggregator.table, "payments") == "alice", timeout=1.0, what="routed in 1 s")
        assert time.monotonic() - created < 1.0
        assert _via(aggregator.table, "orders") == "bob"

        removed = await devstack("group", "rm", "team-checkout", "--yes")
        assert removed.returncode == 0, removed.stderr
        assert (
            removed.stdout.strip() == "deleted route group team-checkout (ConfigMap shop/devstack-group-team-checkout)"
        )
        assert _groups_in(shop) == {}
        await eventually(lambda: _via(aggregator.table, "payments") is None, timeout=1.0, what="gone in 1 s")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_create_replace_changes_the_keys_and_takes_over_a_hand_edit(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    assert (await devstack("group", "create", "team-checkout", "alice", "bob")).returncode == 0
    edited = group_config_map("team-checkout", "bob\ncarol")
    shop.apply(edited, manager="kubectl-edit")
    result = await devstack("group", "create", "team-checkout", "carol", "alice", "--replace")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("updated route group team-checkout: carol, alice")
    cm = shop.objects["configmaps"][("shop", "devstack-group-team-checkout")]
    assert cm["data"] == {"group": "team-checkout", "keys": "carol,alice"}
    assert shop.patches()[-1].query["force"] == "true"


async def test_ls_lists_groups_with_their_status_and_where_they_route(shop: FakeApiServer, kubeconfig: Path) -> None:
    shop.apply(TEAM)
    shop.apply(group_config_map("bob", ["alice"]))
    shop.apply(group_config_map("outer", ["team-checkout"], namespace="team"))
    shop.apply(group_config_map("broken", "Alice"))

    result = await devstack("group", "ls")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["GROUP", "KEYS", "NAMESPACE", "CONFIGMAP", "AGE", "STATUS"]
    rows = [line.split() for line in lines[1:]]
    assert [(r[0], r[1], r[2], r[3], r[-1]) for r in rows] == [
        ("bob", "alice", "shop", "devstack-group-bob", "KeyClash"),
        ("broken", "<none>", "shop", "devstack-group-broken", "Invalid"),
        ("team-checkout", "alice,bob", "shop", "devstack-group-team-checkout", "Routed"),
        ("outer", "team-checkout", "team", "devstack-group-outer", "Nested"),
    ]
    problems = result.stderr.splitlines()
    assert len(problems) == 3
    assert problems[0].startswith("route group 'bob' (configmap shop/devstack-group-bob) has the name of the routing")
    assert problems[1].startswith("configmap shop/devstack-group-broken: route group 'broken': key 'Alice'")
    assert "groups do not nest; 'outer' is not routed" in problems[2]

    wide = await devstack("group", "ls", "-o", "wide", "-n", "shop")
    assert wide.stdout.splitlines()[0].split()[-1] == "ROUTES"
    [team] = [line.split() for line in wide.stdout.splitlines() if line.startswith("team-checkout")]
    assert team[-1] == "payments:alice", "bob's key clashes with a group: orders has no member's override"
    assert len(wide.stdout.splitlines()) == 4, "only namespace shop"

    as_json = json.loads((await devstack("group", "ls", "-o", "json")).stdout)
    by_name = {g["group"]: g for g in as_json["groups"]}
    assert by_name["team-checkout"]["keys"] == ["alice", "bob"]
    assert by_name["team-checkout"]["routes"] == {"payments": "alice"}
    assert by_name["team-checkout"]["status"] == ["Routed"] and by_name["team-checkout"]["problems"] == []
    assert by_name["outer"]["namespace"] == "team" and by_name["outer"]["status"] == ["Nested"]
    assert by_name["outer"]["routes"] == {}
    assert isinstance(by_name["bob"]["age_seconds"], int)
    as_yaml = yaml.safe_load((await devstack("group", "ls", "-o", "yaml", "-n", "team")).stdout)
    assert [g["group"] for g in as_yaml["groups"]] == ["outer"]

    shop.objects["configmaps"].clear()
    nothing = await devstack("group", "ls")
    assert nothing.returncode == 0 and nothing.stdout == ""
    assert nothing.stderr.strip() == "No route groups found in all namespaces."


async def test_rm_asks_first_unless_yes(shop: FakeApiServer, kubeconfig: Path) -> None:
    shop.apply(TEAM)
    refused = await devstack("group", "rm", "team-checkout")
    assert refused.returncode == 1
    assert user_error(refused) == (
        "devstack: Delete route group 'team-checkout' (ConfigMap shop/devstack-group-team-checkout, keys alice,bob) "
        "needs a confirmation: run it on a terminal, or pass --yes"
    )
    args = build_parser().parse_args(["group", "rm", "team-checkout"])
    said_no = Terminal(out=io.StringIO(), err=io.StringIO(), stdin=_Tty("n\n"))
    with pytest.raises(OverrideError, match="nothing deleted"):
        await asyncio.to_thread(run, args, said_no)
    assert not shop.deletes()
    said_yes = Terminal(out=io.StringIO(), err=io.StringIO(), stdin=_Tty("y\n"))
    assert await asyncio.to_thread(run, args, said_yes) == 0
    assert "Delete route group 'team-checkout'" in said_yes.err.getvalue()
    assert _groups_in(shop) == {}
    [delete] = shop.deletes()
    assert delete.collection == "configmaps" and delete.body["preconditions"]["uid"]


async def test_rbac_refusing_the_cluster_wide_list_falls_back_to_the_context_namespace(
    shop: FakeApiServer, kubeconfig: Path
) -> None:
    shop.forbid("list", "configmaps", "*")
    shop.forbid("list", "deployments", "*")
    result = await devstack("group", "create", "team-checkout", "alice", "bob")
    assert result.returncode == 0, result.stderr
    listed = await devstack("group", "ls")
    assert listed.returncode == 0 and "team-checkout" in listed.stdout, listed.stderr
    refused = await devstack("group", "ls", "--context", "cluster-wide")
    assert user_error(refused) == (
        "devstack: RBAC forbids list on configmaps in all namespaces (cluster-wide) for alice@example.com; "
        "--namespace NS looks in one namespace"
    )


async def test_override_commands_see_groups_named_like_keys(shop: FakeApiServer, kubeconfig: Path) -> None:
    shop.apply(group_config_map("bob", ["alice"]))
    listed = await devstack("ls", "--key", "bob")
    assert listed.returncode == 0, listed.stderr
    assert [line.split()[-1] for line in listed.stdout.splitlines()[1:]] == ["GroupClash", "GroupClash"]
    assert (
        "shop/payments-bob: route group 'bob' (ConfigMap shop/devstack-group-bob) has the name of this key: a group "
        "and a key share one namespace; neither is routed" in listed.stderr
    )
    alice = await devstack("ls", "--key", "alice")
    assert alice.stdout.splitlines()[1].split()[-1] == "Routed"

    shop.apply(service_object("orders", selector={"app": "orders"}))
    version = shop.rv
    refused = await devstack("fork", "orders", "--key", "bob", "--no-wait", "--replace")
    assert refused.returncode == 1
    assert user_error(refused) == (
        "devstack: key 'bob' is the name of a route group (ConfigMap shop/devstack-group-bob): a group and a key "
        "share one namespace, so routers would route neither; choose another key"
    )
    assert shop.rv == version

    shop.forbid("list", "configmaps")  # a developer who may not read ConfigMaps: not checked, said so
    listed = await devstack("ls", "--key", "bob")
    assert listed.returncode == 0 and "devstack ls: route groups not checked: RBAC forbids list on configmaps" in (
        listed.stderr
    )


def _declared_elsewhere(api: FakeApiServer) -> None:
    api.apply(group_config_map("team-checkout", ["carol"], namespace="team", name="checkout-group"))


def _exists(api: FakeApiServer) -> None:
    api.apply(TEAM)


def _other_group(api: FakeApiServer) -> None:
    api.apply(group_config_map("frontend", ["carol", "dave"]))


def _lists_the_new_one(api: FakeApiServer) -> None:
    api.apply(group_config_map("everyone", ["team-checkout", "dave"], namespace="team"))


def _foreign_config_map(api: FakeApiServer) -> None:
    meta = {"name": "devstack-group-team-checkout", "namespace": "shop"}
    api.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"a": "b"}})


def _forbid_patch(api: FakeApiServer) -> None:
    api.forbid("patch", "configmaps", "shop")


CREATE = ("group", "create", "team-checkout", "alice", "bob")
ERRORS: list[tuple[str, tuple[str, ...], Any, str]] = [
    (
        "bad-name",
        ("group", "create", "Team_1", "alice"),
        None,
        "devstack: group name 'Team_1' is not a DNS-1123 label: 1-63 lower-case letters, digits and '-', starting "
        "and ending with a letter or digit",
    ),
    (
        "bad-key",
        ("group", "create", "team", "alice", "Bob"),
        None,
        "devstack: key 'Bob' is not a DNS-1123 label: 1-63 lower-case letters, digits and '-', starting and ending "
        "with a letter or digit",
    ),
    ("key-twice", ("group", "create", "team", "alice", "alice"), None, "devstack: key 'alice' is listed twice"),
    (
        "itself",
        ("group", "create", "team", "alice", "team"),
        None,
        "devstack: route group 'team' cannot list its own name: groups do not nest",
    ),
    (
        "named-like-a-key",
        ("group", "create", "alice", "bob"),
        None,
        "devstack: 'alice' is already a routing key (overrides shop/payments-alice): a group and a key share one "
        "namespace; choose another name",
    ),
    (
        "nests-a-group",
        ("group", "create", "team-checkout", "alice", "frontend"),
        _other_group,
        "devstack: key 'frontend' is itself a route group (ConfigMap shop/devstack-group-frontend): groups do not "
        "nest; list its keys instead",
    ),
    (
        "nested-in-a-group",
        CREATE,
        _lists_the_new_one,
        "devstack: route group 'everyone' (ConfigMap team/devstack-group-everyone) lists 'team-checkout' as a key: "
        "groups do not nest, so 'team-checkout' cannot be a group",
    ),
    (
        "exists",
        CREATE,
        _exists,
        "devstack: route group 'team-checkout' exists (ConfigMap shop/devstack-group-team-checkout: alice, bob); "
        "--replace to change its keys",
    ),
    (
        "declared-elsewhere",
        CREATE,
        _declared_elsewhere,
        "devstack: route group 'team-checkout' is already declared by ConfigMap team/checkout-group; with a second "
        "declaration routers would route neither (devstack group rm team-checkout removes it)",
    ),
    (
        "foreign-config-map",
        CREATE,
        _foreign_config_map,
        "devstack: ConfigMap shop/devstack-group-team-checkout exists and does not declare route group "
        "'team-checkout'; group create leaves it alone",
    ),
    (
        "rbac",
        CREATE,
        _forbid_patch,
        "devstack: RBAC forbids patch on configmaps in namespace shop for alice@example.com",
    ),
    ("rm-nothing", ("group", "rm", "zed", "--yes"), None, "devstack: no route group 'zed' in all namespaces"),
    (
        "rm-nothing-here",
        ("group", "rm", "team-checkout", "-n", "team", "--yes"),
        _exists,
        "devstack: no route group 'team-checkout' in namespace team",
    ),
]


@pytest.mark.parametrize(("args", "setup", "sentence"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
async def test_every_group_error_is_one_sentence_and_a_non_zero_exit(
    shop: FakeApiServer, kubeconfig: Path, args: tuple[str, ...], setup: Any, sentence: str
) -> None:
    await assert_refused(shop, args, setup, sentence)

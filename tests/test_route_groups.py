"""Route groups (a name resolving, per service, to the first of its keys with an override): how a
table resolves them when it is built, what a route file may say about them, and a group's key
routed through a real router with the debug header naming the member."""

from __future__ import annotations

import textwrap

import pytest

from controller.build import BuildError
from controller.sources.file import parse_route_yaml
from controller.sources.remote import routes_from_json
from router import dashboard
from router.settings import RouterSettings
from router.table import Fallback, Override, Routes, RouteTable, TableError, Target, TargetKind
from tests.support import Origin, exchange, running_router, split_responses

BASE = Target("http://127.0.0.1:9001")
ALICE = Target("http://127.0.0.1:9101")
BOB = Target("http://127.0.0.1:9102")
GROUPS = {"team-checkout": ("alice", "bob")}


def _routes(groups: dict[str, tuple[str, ...]] = GROUPS, **overrides: Override) -> Routes:
    return Routes("payments", BASE, overrides, groups=groups)


@pytest.mark.parametrize(
    ("case", "overrides", "kind", "target", "via", "reason"),
    [
        ("first-member-wins", {"alice": Override("alice", ALICE), "bob": Override("bob", BOB)},
         TargetKind.OVERRIDE, ALICE, "alice", "override"),
        ("next-member-when-the-first-has-none", {"bob": Override("bob", BOB)},
         TargetKind.OVERRIDE, BOB, "bob", "override"),
        ("baseline-when-no-member-has-one", {}, TargetKind.BASELINE, BASE, None, "no-override"),
        ("a-not-ready-member-still-decides", {"alice": Override("alice", ALICE, ready=False),
                                              "bob": Override("bob", BOB)},
         TargetKind.ERROR, None, "alice", "override-not-ready"),
        ("its-fallback-applies", {"alice": Override("alice", ALICE, ready=False, fallback=Fallback.BASELINE),
                                  "bob": Override("bob", BOB)},
         TargetKind.BASELINE, BASE, "alice", "override-not-ready-fallback"),
        ("an-expired-member", {"alice": Override("alice", ALICE, expires_at=10.0)},
         TargetKind.ERROR, None, "alice", "override-expired"),
    ],
)  # fmt: skip
def test_a_group_resolves_to_its_first_member_with_an_override(
    case: str,
    overrides: dict[str, Override],
    kind: TargetKind,
    target: Target | None,
    via: str | None,
    reason: str,
) -> None:
    decision = _routes(**overrides).resolve("team-checkout", now=1000.0)
    assert (decision.kind, decision.target, decision.via, decision.reason) == (kind, target, via, reason), case
    if decision.target is not None or kind is TargetKind.ERROR:
        assert decision.key in ("team-checkout", None)
    if kind is TargetKind.ERROR:
        assert decision.answer is not None and decision.answer.status == 503


def test_the_debug_header_names_the_group_and_the_member() -> None:
    decision = _routes(alice=Override("alice", ALICE)).resolve("team-checkout")
    assert decision.route_header("team-checkout") == (
        b"service=payments; key=team-checkout; via=alice; target=override; reason=override"
    )
    assert _routes(alice=Override("alice", ALICE)).resolve("alice").via is None  # a member's own key: no group


def test_a_group_named_like_a_key_or_listing_a_group_is_refused() -> None:
    with pytest.raises(TableError, match="both a route group and an override's key"):
        _routes({"alice": ("bob",)}, alice=Override("alice", ALICE))
    with pytest.raises(TableError, match="groups do not nest"):
        _routes({"team": ("other",), "other": ("alice",)})


ROUTE_FILE = """\
groups:
  team-checkout: [alice, bob]
services:
  payments:
    baseline: http://127.0.0.1:9001
    overrides:
      bob: http://127.0.0.1:9102
"""


def test_the_route_file_declares_groups_and_the_feed_carries_them() -> None:
    services = parse_route_yaml(ROUTE_FILE, "routes.yaml")
    decision = services["payments"].resolve("team-checkout")
    assert (decision.target, decision.via) == (BOB, "bob")
    table = RouteTable(services, version=3)
    document = table.to_json()
    assert document["groups"] == {"team-checkout": ["alice", "bob"]}
    _, followed = routes_from_json(document)  # what a router following a controller builds
    assert followed["payments"].resolve("team-checkout").via == "bob"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("groups:\n  team: [alice, team2]\n  team2: [bob]\nservices: {}\n",
         "routes.yaml:2: route group 'team' lists the group 'team2': groups do not nest"),
        ("groups:\n  Team: [alice]\nservices: {}\n", "routes.yaml:2: route group name 'Team' must be a DNS-1123 label"),
        ("groups:\n  team: []\nservices: {}\n", "routes.yaml:2: route group 'team': expected a non-empty list of keys"),
        ("groups:\n  team: [Alice]\nservices: {}\n",
         "routes.yaml:2: route group 'team': key 'Alice' must be a DNS-1123 label"),
        ("groups:\n  alice: [bob]\nservices:\n  payments:\n    baseline: http://127.0.0.1:9001\n"
         "    overrides:\n      alice: http://127.0.0.1:9101\n",
         "routes.yaml:7: service 'payments': override key 'alice' is also a route group's name"),
    ],
)  # fmt: skip
def test_a_bad_group_in_a_route_file_names_its_line(text: str, message: str) -> None:
    with pytest.raises(BuildError) as caught:
        parse_route_yaml(text, "routes.yaml")
    assert str(caught.value) == message


async def test_a_groups_key_is_routed_by_a_real_router_to_the_members_override(origins: dict[str, Origin]) -> None:
    text = textwrap.dedent(f"""\
        groups:
          team-checkout: [carol, bob]
        services:
          a:
            baseline: {origins["baseline"].url}
            overrides:
              bob: {origins["bob"].url}
        """)
    table = RouteTable(parse_route_yaml(text, "routes.yaml"), version=1)
    async with running_router(table, RouterSettings()) as server:
        raw = (
            b"GET / HTTP/1.1\r\nHost: a\r\nbaggage: devstack=team-checkout\r\nx-devstack-debug: 1\r\n"
            b"Connection: close\r\n\r\n"
        )
        data, _ = await exchange(server.address[1], raw)
    status, head, _ = split_responses(data)[0]
    assert status == 200
    assert head["x-devstack-route"] == "service=a; key=team-checkout; via=bob; target=override; reason=override"
    assert origins["bob"].seen[-1].header("baggage") == ["devstack=team-checkout"]  # forwarded as sent
    assert not origins["baseline"].seen


def test_the_dashboard_shows_which_member_a_group_resolves_to() -> None:
    table = RouteTable(parse_route_yaml(ROUTE_FILE, "routes.yaml"), version=2)
    page = dashboard.render_page(dashboard.Snapshot(table, now=1000.0))
    assert "team-checkout \u2192 bob</span>" in page

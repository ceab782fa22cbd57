"""The route table's decision: DESIGN.md's four rows, fallbacks, expiry, hosts, validation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.table import Fallback, Override, Routes, RouteTable, TableError, Target, TargetKind

BASE = Target("http://127.0.0.1:9001")
ALICE = Target("http://127.0.0.1:9101")


def routes(**overrides: Override) -> Routes:
    return Routes("payments", BASE, overrides, hosts=("payments.default.svc.cluster.local",))


@pytest.mark.parametrize(
    ("key", "override", "kind", "target", "reason", "status"),
    [
        (None, None, TargetKind.BASELINE, BASE, "no-key", 200),
        ("alice", None, TargetKind.BASELINE, BASE, "no-override", 200),
        ("alice", Override("alice", ALICE), TargetKind.OVERRIDE, ALICE, "override", 200),
        ("alice", Override("alice", ALICE, ready=False), TargetKind.ERROR, None, "override-not-ready", 503),
        ("alice", Override("alice", ALICE, expires_at=100.0), TargetKind.ERROR, None, "override-expired", 503),
        (
            "alice",
            Override("alice", ALICE, ready=False, fallback=Fallback.BASELINE),
            TargetKind.BASELINE,
            BASE,
            "override-not-ready-fallback",
            200,
        ),
        (
            "alice",
            Override("alice", ALICE, expires_at=100.0, fallback=Fallback.BASELINE),
            TargetKind.BASELINE,
            BASE,
            "override-expired-fallback",
            200,
        ),
    ],
)
def test_resolve_rows(
    key: str | None,
    override: Override | None,
    kind: TargetKind,
    target: Target | None,
    reason: str,
    status: int,
) -> None:
    r = routes(**({override.key: override} if override else {}))
    decision = r.resolve(key, now=1000.0)
    answered = decision.answer.status if decision.answer is not None else 200
    assert (decision.kind, decision.target, decision.reason, answered) == (kind, target, reason, status)
    assert decision.service == "payments"
    # Shared decisions (no key, no override for this key) carry no key; override decisions do.
    assert decision.key == (key if override is not None else None)


def test_expiry_is_checked_at_request_time() -> None:
    r = routes(alice=Override("alice", ALICE, expires_at=2000.0))
    assert r.resolve("alice", now=1999.9).kind is TargetKind.OVERRIDE
    assert r.resolve("alice", now=2000.0).reason == "override-expired"


def test_authorities_map_with_and_without_port() -> None:
    table = RouteTable({"payments": routes()}, version=3)
    assert table.service_for_authority("payments") == "payments"
    assert table.service_for_authority("PAYMENTS:8080") == "payments"
    assert table.service_for_authority("payments.default.svc.cluster.local:80") == "payments"
    assert table.service_for_authority("[::1]:80") is None
    assert table.service_for_authority("other") is None


def test_two_services_claiming_one_host_is_an_error() -> None:
    other = Routes("orders", BASE, {}, hosts=("payments",))
    with pytest.raises(TableError, match="claimed by both"):
        RouteTable({"payments": routes(), "orders": other})


@pytest.mark.parametrize(
    "url", ["https://x:1", "http://", "http://x:1/path", "http://x:99999", "ftp://x", "http://x:1?q"]
)
def test_targets_validate_themselves(url: str) -> None:
    with pytest.raises(TableError):
        Target(url)


def test_default_port_and_ipv6() -> None:
    assert Target("http://svc").address == ("svc", 80)
    assert Target("http://[::1]:8080").address == ("::1", 8080)


def test_debug_header_rendering() -> None:
    decision = routes(alice=Override("alice", ALICE)).resolve("alice", 0.0)
    assert decision.route_header("alice") == b"service=payments; key=alice; target=override; reason=override"
    shared = routes().resolve("bob", 0.0)
    assert shared.route_header("bob") == b"service=payments; key=bob; target=baseline; reason=no-override"


def test_tables_are_immutable_and_compare_by_routes() -> None:
    table = RouteTable({"payments": routes()}, version=1)
    with pytest.raises(AttributeError):
        table.version = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        table.services["x"] = routes()  # type: ignore[index]
    assert table.same_routes(table.with_version(9))
    assert table.with_version(9).version == 9


def test_large_tables_resolve_by_lookup() -> None:
    services = {
        f"svc-{i}": Routes(f"svc-{i}", BASE, {f"dev-{j}": Override(f"dev-{j}", ALICE) for j in range(10)})
        for i in range(2000)
    }
    table = RouteTable(services, version=1)
    assert table.resolve("svc-1999", "dev-9", 0.0).kind is TargetKind.OVERRIDE  # type: ignore[union-attr]
    assert table.resolve("svc-0", "nobody", 0.0).kind is TargetKind.BASELINE  # type: ignore[union-attr]


def test_targets_speak_http1_unless_told_and_pool_by_address() -> None:
    assert (BASE.protocol, BASE.pool_key) == ("http1", ("127.0.0.1", 9001))


def test_an_h2c_target_pools_apart_from_http1_to_the_same_address() -> None:
    h2c = Target("http://127.0.0.1:9001", "h2c")
    assert h2c.address == BASE.address
    assert h2c.pool_key == ("127.0.0.1", 9001, "h2c")
    assert h2c.pool_key != BASE.pool_key
    assert h2c != BASE, "a protocol change is a routing change: the table is republished"


@pytest.mark.parametrize("protocol", ["h2", "HTTP1", "H2C", "grpc", "http2", ""])
def test_an_unknown_protocol_is_refused_naming_it(protocol: str) -> None:
    with pytest.raises(TableError, match=f"protocol '{protocol}' must be 'http1' or 'h2c'"):
        Target("http://127.0.0.1:9001", protocol)


def test_every_decision_of_an_h2c_service_speaks_h2c() -> None:
    base, alice, bob = (Target(f"http://127.0.0.1:{port}", "h2c") for port in (9001, 9101, 9102))
    r = Routes(
        "users",
        base,
        {
            "alice": Override("alice", alice),
            "bob": Override("bob", bob, ready=False, fallback=Fallback.BASELINE),
        },
        groups={"team": ("alice", "bob")},
    )
    assert r.protocol == "h2c"
    decisions = [r.resolve(key, now=0.0) for key in (None, "nobody", "alice", "bob", "team")]
    assert [d.target.url for d in decisions if d.target] == [base.url, base.url, alice.url, base.url, alice.url]
    assert {d.target.protocol for d in decisions if d.target} == {"h2c"}


def test_an_override_speaking_another_protocol_than_its_service_is_refused() -> None:
    with pytest.raises(TableError, match="override 'alice' speaks 'http1' but the service speaks 'h2c'"):
        Routes("users", Target("http://127.0.0.1:9001", "h2c"), {"alice": Override("alice", ALICE)})


def test_the_json_names_a_services_protocol_only_when_it_is_h2c() -> None:
    users = Routes("users", Target("http://127.0.0.1:9002", "h2c"))
    services = RouteTable({"payments": routes(), "users": users}).to_json()["services"]
    assert services["users"]["protocol"] == "h2c"  # type: ignore[index]
    assert "protocol" not in services["payments"]  # type: ignore[operator]


# --- with_changes: the host index carried over, differential against a full rebuild -----------

_NAMES = [f"s{i}" for i in range(6)]
_HOSTS = ["a", "b", "c", "A", "s1", "x.svc"]


@st.composite
def _routes(draw: st.DrawFn, name: str) -> Routes:
    hosts = tuple(draw(st.lists(st.sampled_from(_HOSTS), max_size=3, unique=True)))
    port = draw(st.integers(1, 3))
    return Routes(name, Target(f"http://10.0.0.{port}"), hosts=hosts)


@st.composite
def _table_and_change(draw: st.DrawFn) -> tuple[dict[str, Routes], dict[str, Routes], list[str]]:
    names = draw(st.lists(st.sampled_from(_NAMES), max_size=5, unique=True))
    services = {name: draw(_routes(name)) for name in names}
    changed_names = draw(st.lists(st.sampled_from(_NAMES), max_size=3, unique=True))
    changed = {name: draw(_routes(name)) for name in changed_names}
    removable = [name for name in names if name not in changed]
    removed = draw(st.lists(st.sampled_from(removable), max_size=2, unique=True)) if removable else []
    return services, changed, removed


@settings(max_examples=400, deadline=None)
@given(_table_and_change())
def test_with_changes_equals_a_full_rebuild(case: tuple[dict[str, Routes], dict[str, Routes], list[str]]) -> None:
    services, changed, removed = case
    try:
        table = RouteTable(services, 1)
    except TableError:
        return  # the starting table must be valid
    expected_services = {name: routes for name, routes in services.items() if name not in removed} | changed
    try:
        expected: RouteTable | None = RouteTable(expected_services, 2)
    except TableError as exc:
        expected, error = None, str(exc)
    if expected is None:
        with pytest.raises(TableError) as raised:
            table.with_changes(changed, removed, version=2)
        assert str(raised.value) == error  # the constructor's own words
        return
    result = table.with_changes(changed, removed, version=2)
    assert result == expected and dict(result.services) == expected_services
    for host in {h.lower() for h in _HOSTS} | set(_NAMES):
        assert result.routes_for_authority(host) is expected.routes_for_authority(host), host
    for name, routes in result.services.items():
        if name not in changed:
            assert routes is table.services[name]  # shared, not rebuilt

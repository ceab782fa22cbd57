"""The Kubernetes contract, table-driven: one YAML fixture per case in tests/fixtures/kube/."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.kube_build import find_leaks, parse_duration, routes_from_deployments
from router.table import RouteTable

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kube"
CASES = sorted(FIXTURES.glob("*.yaml"))


def _unix(value: str | None) -> float | None:
    return None if value is None else dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _assert_messages(actual: tuple[str, ...], expected: list[str], what: str) -> None:
    """Each expected text appears in exactly one message, and there are no others."""
    assert len(actual) == len(expected), f"{what}: {list(actual)}"
    for text in expected:
        assert sum(text in message for message in actual) == 1, f"{what}: {text!r} not in {list(actual)}"


def test_there_are_contract_cases() -> None:
    assert len(CASES) >= 12


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_contract_case(path: Path) -> None:
    case: dict[str, Any] = yaml.safe_load(path.read_text())
    expect = case["expect"]
    result = routes_from_deployments(case["deployments"], services=case.get("services", []))
    services = RouteTable(result.services).to_json()["services"]
    assert isinstance(services, dict)
    assert sorted(services) == sorted(expect.get("services", {}))
    for name, wanted in (expect.get("services") or {}).items():
        got = services[name]
        for field in ("baseline", "hosts"):
            if field in wanted:
                assert got[field] == wanted[field], f"{name}.{field}"
        if "protocol" in wanted:
            assert got.get("protocol", "http1") == wanted["protocol"], f"{name}.protocol"
            routes = result.services[name]
            targets = [routes.baseline, *(ov.target for ov in routes.overrides.values())]
            assert {t.protocol for t in targets} == {wanted["protocol"]}, f"{name}: every target speaks it"
        if "overrides" in wanted:
            assert sorted(got["overrides"]) == sorted(wanted["overrides"]), f"{name} overrides"
            for key, fields in wanted["overrides"].items():
                for field, value in fields.items():
                    expected_value = _unix(value) if field == "expires" else value
                    assert got["overrides"][key][field] == expected_value, f"{name}.{key}.{field}"
    _assert_messages(result.conflicts, expect.get("conflicts", []), "conflicts")
    _assert_messages(result.invalid, expect.get("invalid", []), "invalid")
    if "expiries" in expect:
        assert [e.name for e in result.expiries] == expect["expiries"]
    leaks = find_leaks(case["deployments"], case.get("services", []))
    assert [leak.deployment for leak in leaks] == expect.get("leaks", [])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("30m", 1800), ("6h", 21600), ("1h30m", 5400), ("2d", 172800), ("1w", 604800), (" 5m ", 300)],
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "6", "h", "6x", "-1h", "1.5h", "6h 30m", "m30"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_next_expiry_and_expired_are_relative_to_now() -> None:
    case = yaml.safe_load((FIXTURES / "ttl_counts_from_creation.yaml").read_text())
    result = routes_from_deployments(case["deployments"])
    bob, alice = _unix("2024-05-01T11:30:00Z"), _unix("2024-05-01T16:00:00Z")
    assert bob is not None and alice is not None
    assert result.next_expiry(bob - 1) == bob
    assert result.next_expiry(bob) == alice
    assert [e.name for e in result.expired(bob)] == ["payments-bob"]
    assert result.next_expiry(alice) is None


def test_build_does_not_depend_on_input_order() -> None:
    case = yaml.safe_load((FIXTURES / "conflict_two_overrides_same_key.yaml").read_text())
    forward = routes_from_deployments(case["deployments"])
    backward = routes_from_deployments(list(reversed(case["deployments"])))
    assert forward == backward


def test_leak_message_names_override_and_selector() -> None:
    case = yaml.safe_load((FIXTURES / "leak_override_selected_by_baseline_service.yaml").read_text())
    [leak] = find_leaks(case["deployments"], case["services"])
    assert leak.message.startswith("override shop/payments-alice (service 'payments', key 'alice')")
    assert "selector app=payments" in leak.message
    assert leak.to_json()["selector"] == {"app": "payments"}

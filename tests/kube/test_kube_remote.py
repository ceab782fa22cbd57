"""The pure half of the remote source: a controller's table JSON back into ``Routes``, and feed URLs."""

from __future__ import annotations

import json

import pytest

from controller.build import BuildError
from controller.sources.remote import feed_url, routes_from_json
from router.table import Fallback, Override, Routes, RouteTable, Target


def _table() -> RouteTable:
    payments = Routes(
        service="payments",
        baseline=Target("http://payments.shop.svc.cluster.local:8080"),
        overrides={
            "alice": Override(
                "alice",
                Target("http://10.0.0.2:8080"),
                ready=True,
                expires_at=1714572000.0,
                namespace="shop",
                workload="payments-alice",
            ),
            "bob": Override("bob", Target("http://10.0.0.3:8080"), ready=False, fallback=Fallback.BASELINE),
        },
        hosts=("payments", "payments.shop"),
    )
    return RouteTable({"payments": payments}, version=7, sources=("kubernetes",))


def test_a_table_survives_the_json_round_trip() -> None:
    table = _table()
    version, services = routes_from_json(table.to_json())
    assert version == 7
    assert services == dict(table.services)


def test_an_h2c_service_survives_the_json_round_trip_with_its_overrides() -> None:
    users = Routes(
        "users",
        Target("http://users.shop.svc.cluster.local:9090", "h2c"),
        {"alice": Override("alice", Target("http://10.0.0.4:9090", "h2c"))},
    )
    table = RouteTable({"users": users, **_table().services}, version=8)
    document = table.to_json()
    assert document["services"]["users"]["protocol"] == "h2c"  # type: ignore[index]
    assert "protocol" not in document["services"]["payments"]  # type: ignore[index]
    _, services = routes_from_json(json.loads(json.dumps(document)))
    assert services == dict(table.services)
    assert services["users"].resolve("alice").target.pool_key == ("10.0.0.4", 9090, "h2c")  # type: ignore[union-attr]


def test_a_table_without_protocols_reads_as_http1() -> None:
    """What a controller that predates protocols sends: every service is HTTP/1.1."""
    document = {
        "version": 3,
        "services": {
            "payments": {
                "hosts": ["payments"],
                "baseline": "http://10.0.0.1:8080",
                "overrides": {"alice": {"url": "http://10.0.0.2:8080", "ready": True, "fallback": "error"}},
            }
        },
    }
    _, services = routes_from_json(document)
    payments = services["payments"]
    assert (payments.baseline.protocol, payments.overrides["alice"].target.protocol) == ("http1", "http1")


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a JSON object"),
        ({"version": 1, "services": {"users": {"baseline": "http://x:1", "protocol": "h2"}}}, "protocol 'h2'"),
        ({"services": {}}, "'version'"),
        ({"version": True, "services": {}}, "'version'"),
        ({"version": 1, "services": []}, "'services'"),
        ({"version": 1, "services": {"payments": {"baseline": "ftp://x"}}}, "only http://"),
    ],
)
def test_bad_documents_are_rejected_with_the_reason(document: object, message: str) -> None:
    with pytest.raises(BuildError, match=message):
        routes_from_json(document, origin="http://controller:9902")


@pytest.mark.parametrize(
    ("base", "expected"),
    [
        ("http://controller:9902", "http://controller:9902/v1/routes?watch=1"),
        ("http://controller:9902/", "http://controller:9902/v1/routes?watch=1"),
        ("http://controller:9902/v1/routes", "http://controller:9902/v1/routes?watch=1"),
    ],
)
def test_feed_url(base: str, expected: str) -> None:
    assert feed_url(base) == expected


def test_feed_url_carries_since_and_instance() -> None:
    assert feed_url("http://c:1", since=5, instance="ab") == "http://c:1/v1/routes?watch=1&since=5&instance=ab"


@pytest.mark.parametrize("base", ["controller:9902", "ftp://controller", "http://"])
def test_feed_url_rejects_non_http(base: str) -> None:
    with pytest.raises(ValueError):
        feed_url(base)

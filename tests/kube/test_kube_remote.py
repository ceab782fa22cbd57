"""The pure half of the remote source: a controller's table JSON back into ``Routes``, and feed URLs."""

from __future__ import annotations

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


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ([], "must be a JSON object"),
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

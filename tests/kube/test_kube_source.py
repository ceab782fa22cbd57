"""The Kubernetes source against the fake API server: list, watch, relist, throttling, coalescing, expiry, leaks."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import itertools
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from controller.aggregator import Aggregator
from controller.sources.kubernetes import KubernetesSource, KubeSettings, WatchSettings, kubernetes_source
from router.errors import Answer
from router.table import Decision, RouteTable, TargetKind
from tests.kube.kube_fake_apiserver import (
    FakeApiServer,
    ListScript,
    WatchScript,
    deployment,
    service_object,
    watch_event,
)
from tests.kube.kube_support import eventually

FAST = KubeSettings(
    watch=WatchSettings(connect_timeout=1.0, read_timeout=2.0, backoff_initial=0.05, backoff_max=0.2, healthy_after=60),
    coalesce=0.02,
    delete_retry=0.5,
    join_timeout=1.0,
)

BASELINE = deployment("payments", service="payments", upstream="http://10.0.0.1:8080")
ALICE = deployment("payments-alice", service="payments", key="alice", upstream="http://10.0.0.2:8080")
BOB = deployment("payments-bob", service="payments", key="bob", upstream="http://10.0.0.3:8080")

# --- scripted event streams -----------------------------------------------------------------------

GHOST = deployment("payments-ghost", service="payments", key="ghost", upstream="http://10.0.0.9:8080")
GHOST_THEN_GONE = WatchScript(events=[watch_event("ADDED", GHOST, 5001)], then="gone")
"""An event for an object the server no longer has, then 410: after the relist it must be gone."""

BOOKMARK_THEN_CLOSE = WatchScript(
    events=[
        {
            "type": "BOOKMARK",
            "object": {"kind": "Deployment", "apiVersion": "apps/v1", "metadata": {"resourceVersion": "7777"}},
        }
    ],
    then="close",
)
"""A bookmark moves the resourceVersion forward even though no object changed."""

BURST = WatchScript(
    events=[
        watch_event(
            "MODIFIED",
            deployment(
                "payments-alice",
                service="payments",
                key="alice",
                ready=i % 2,
                upstream=f"http://10.0.{i // 250}.{i % 250 + 1}:8080",
            ),
            6000 + i,
        )
        for i in range(1000)
    ],
)
"""1000 MODIFIED events for one override in one go; the last one (i=999) is ready at 10.0.3.250."""


class Harness:
    """A source feeding an aggregator, as the router and controller wire it."""

    def __init__(self, configuration: Any, **options: Any) -> None:
        self.aggregator = Aggregator(["kubernetes"], lambda table: None)
        self.source = KubernetesSource(
            self.aggregator.update,
            self.aggregator.report_error,
            configuration=configuration,
            **{"settings": FAST, **options},
        )
        self.task: asyncio.Task[None] | None = None

    @property
    def table(self) -> RouteTable:
        return self.aggregator.table

    def decide(self, key: str | None, service: str = "payments") -> Decision | None:
        return self.table.resolve(service, key)

    def routed_to(self, key: str | None) -> str | None:
        decision = self.decide(key)
        return decision.target.url if decision is not None and decision.target is not None else None


@pytest.fixture
async def harness(kube_config: Any) -> AsyncIterator[Any]:
    started: list[Harness] = []

    async def start(**options: Any) -> Harness:
        h = Harness(kube_config, **options)
        h.task = asyncio.create_task(h.source.run(), name="test-kubernetes-source")
        started.append(h)
        return h

    yield start
    for h in started:
        assert h.task is not None
        h.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await h.task


async def test_initial_list_routes_baseline_and_override(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    h = await harness()
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080", what="alice routed")
    assert h.routed_to(None) == "http://10.0.0.1:8080"
    assert h.table.service_for_authority("payments.shop.svc.cluster.local") == "payments"


async def test_list_and_watch_ask_for_labelled_deployments_with_bookmarks(
    fake_api: FakeApiServer, harness: Any
) -> None:
    fake_api.apply(BASELINE)
    await harness()
    await eventually(lambda: fake_api.watches(), what="a watch is open")
    listed, watched = fake_api.lists()[0], fake_api.watches()[0]
    assert listed.query["labelSelector"] == "devstack.io/service"
    assert watched.query["labelSelector"] == "devstack.io/service"
    assert watched.query["allowWatchBookmarks"] == "true"
    assert watched.query["resourceVersion"] == str(fake_api.rv)
    assert 300 <= int(watched.query["timeoutSeconds"]) <= 600


async def test_added_override_is_routed_within_one_second(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    h = await harness()
    await eventually(lambda: fake_api.open_watches and h.routed_to("alice") == "http://10.0.0.1:8080", what="watching")
    fake_api.apply(ALICE)
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080", timeout=1.0, what="alice within 1 s")


async def test_override_scaled_to_zero_answers_503(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    h = await harness()
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080")
    fake_api.apply(
        deployment("payments-alice", service="payments", key="alice", ready=0, upstream="http://10.0.0.2:8080")
    )
    not_ready = Answer.OVERRIDE_NOT_READY
    decision = await eventually(lambda: (d := h.decide("alice")) is not None and d.answer is not_ready and d)
    assert decision.reason == "override-not-ready"


async def test_override_scaled_to_zero_with_fallback_baseline_goes_to_baseline(
    fake_api: FakeApiServer, harness: Any
) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(
        deployment(
            "payments-alice",
            service="payments",
            key="alice",
            ready=0,
            upstream="http://10.0.0.2:8080",
            annotations={"devstack.io/fallback": "baseline"},
        )
    )
    h = await harness()
    decision = await eventually(lambda: h.decide("alice"))
    assert (decision.kind, decision.reason) == (TargetKind.BASELINE, "override-not-ready-fallback")


async def test_deleted_override_falls_back_to_baseline(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    h = await harness()
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080")
    fake_api.delete("deployments", "shop", "payments-alice")
    decision = await eventually(lambda: (d := h.decide("alice")) is not None and d.reason == "no-override" and d)
    assert decision.target is not None and decision.target.url == "http://10.0.0.1:8080"


async def test_in_stream_410_relists_consistently_and_loses_nothing(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    h = await harness()
    await eventually(lambda: fake_api.open_watches and h.routed_to("alice"))
    fake_api.apply(BOB, notify=False)  # Compacted away: no watch will ever see this event.
    fake_api.expire_watches()
    await eventually(lambda: h.routed_to("bob") == "http://10.0.0.3:8080", what="bob after relist")
    assert h.routed_to("alice") == "http://10.0.0.2:8080"
    assert sorted(h.table.services["payments"].overrides) == ["alice", "bob"]
    relist = fake_api.lists()[1]
    assert "resourceVersion" not in relist.query, "after a 410 the relist must be a consistent read"


async def test_events_before_a_410_do_not_survive_the_relist(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    fake_api.watch_scripts["deployments"].append(GHOST_THEN_GONE)
    h = await harness()
    await eventually(lambda: len(fake_api.lists()) >= 2 and fake_api.open_watches, what="relisted after 410")
    await eventually(lambda: h.source.rebuilds and "ghost" not in h.table.services["payments"].overrides)
    assert sorted(h.table.services["payments"].overrides) == ["alice"]


async def test_http_410_on_watch_relists(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.watch_scripts["deployments"].append(WatchScript(status=410))
    h = await harness()
    await eventually(lambda: len(fake_api.lists()) == 2 and fake_api.open_watches, what="relisted")
    fake_api.apply(ALICE)
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080")


async def test_deployment_deleted_while_disconnected_is_gone_after_relist(
    fake_api: FakeApiServer, harness: Any
) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    h = await harness()
    await eventually(lambda: fake_api.open_watches and h.routed_to("alice") == "http://10.0.0.2:8080")
    fake_api.watch_scripts["deployments"].append(WatchScript(status=500))  # Stay away a little longer.
    fake_api.delete("deployments", "shop", "payments-alice", notify=False)
    fake_api.drop_watches()
    await eventually(lambda: "alice" not in h.table.services["payments"].overrides, timeout=2.0, what="alice gone")


async def test_bookmark_resource_version_is_used_for_the_next_list(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.watch_scripts["deployments"].append(BOOKMARK_THEN_CLOSE)
    await harness()
    await eventually(lambda: len(fake_api.lists()) >= 2, what="relisted after the stream closed")
    relist = fake_api.lists()[1]
    assert relist.query["resourceVersion"] == "7777"
    assert relist.query["resourceVersionMatch"] == "NotOlderThan"


async def test_abrupt_close_mid_event_relists_and_keeps_state(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    fake_api.watch_scripts["deployments"].append(WatchScript(then="abrupt"))
    h = await harness()
    await eventually(lambda: len(fake_api.lists()) >= 2 and fake_api.open_watches, what="relisted after the cut")
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080", what="state kept")
    assert h.source.watches["deployments/*"].last_outcome == "failed"


async def test_silent_watch_hits_the_read_timeout_and_relists(fake_api: FakeApiServer, kube_config: Any) -> None:
    import dataclasses

    settings = dataclasses.replace(FAST, watch=dataclasses.replace(FAST.watch, read_timeout=0.3))
    fake_api.apply(BASELINE)
    fake_api.watch_scripts["deployments"].append(WatchScript(then="silence"))
    h = Harness(kube_config, settings=settings)
    task = asyncio.create_task(h.source.run(), name="silent-source")
    try:
        await eventually(lambda: len(fake_api.lists()) >= 2, timeout=2.0, what="relisted after silence")
        await eventually(lambda: h.source.watches["deployments/*"].last_outcome == "timeout", timeout=1.0)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- Retry-After: the source's backoff decides every retry, urllib3 none -----------------------------

THROTTLED = 1000
"""A Retry-After far beyond FAST's backoff_max (0.2 s): the source must wait the cap, never this."""
CAPPED = f"relisting in {FAST.watch.backoff_max:.2f}s"
"""How the source logs a wait of exactly backoff_max."""
SLACK = 0.01
"""Timer granularity: a wait of d seconds may end this much before the next request is stamped d later."""


def _failures(caplog: pytest.LogCaptureFixture, detail: str) -> list[str]:
    """The source's log lines for failed cycles whose detail starts with ``detail``."""
    messages = (r.getMessage() for r in caplog.records if r.name == "controller.sources.kubernetes")
    return [m for m in messages if f": failed ({detail}" in m]


async def test_429_on_a_list_is_retried_by_the_source_after_retry_after_capped_at_backoff_max(
    fake_api: FakeApiServer, harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.sources.kubernetes")
    fake_api.apply(BASELINE)
    throttled = fake_api.list_scripts["deployments"]
    throttled.extend(ListScript(429, retry_after=THROTTLED) for _ in range(20))
    h = await harness()
    # Three lists in about 0.4 s; had urllib3 honoured the header itself, the first would still be waiting.
    await eventually(lambda: len(fake_api.lists()) >= 3, timeout=2.0, what="three throttled lists")
    assert h.table.version == 0, "nothing published while throttled"
    assert "deployments/*: list: HTTP 429" in h.aggregator.errors["kubernetes"], "the wait is reported, not hidden"
    assert h.source.watches["deployments/*"].last_outcome == "failed"

    answered_429 = 20 - len(throttled)
    throttled.clear()
    await eventually(lambda: h.routed_to(None), timeout=2.0, what="routes once the server stops throttling")
    assert "kubernetes" not in h.aggregator.errors
    failures = _failures(caplog, "list: HTTP 429")
    assert len(failures) == answered_429, "one request per retry the source decided, none underneath"
    assert all(CAPPED in failure for failure in failures), failures
    times = [r.at for r in fake_api.lists()[: answered_429 + 1]]
    for gap in (b - a for a, b in itertools.pairwise(times)):
        # Even the backoff's first retry, otherwise immediate, waits for Retry-After, up to the cap.
        assert FAST.watch.backoff_max - SLACK <= gap < 1.0, times


async def test_503_on_a_watch_is_retried_by_the_source_after_retry_after_capped_at_backoff_max(
    fake_api: FakeApiServer, harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.sources.kubernetes")
    fake_api.apply(BASELINE)
    fake_api.watch_scripts["deployments"].extend(WatchScript(status=503, retry_after=THROTTLED) for _ in range(3))
    h = await harness()
    # Open: the Deployments' watch, the route-group ConfigMaps' and the Services' (not scripted).
    await eventually(lambda: fake_api.open_watches == 3, timeout=3.0, what="watching after three 503s")
    watches, lists = fake_api.watches(), fake_api.lists()
    assert (len(watches), len(lists)) == (4, 4), "one watch request per cycle; each 503 leads to a relist"
    for refused, relist in zip(watches[:3], lists[1:], strict=True):
        assert FAST.watch.backoff_max - SLACK <= relist.at - refused.at < 1.0
    failures = _failures(caplog, "watch: HTTP 503")
    assert len(failures) == 3 and all(CAPPED in failure for failure in failures), failures
    assert h.routed_to(None) == "http://10.0.0.1:8080"


async def test_an_http_date_retry_after_leaves_the_wait_to_the_backoff(
    fake_api: FakeApiServer, harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.sources.kubernetes")
    an_hour_later = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(hours=1), usegmt=True)
    fake_api.apply(BASELINE)
    fake_api.list_scripts["deployments"].extend(ListScript(503, retry_after=an_hour_later) for _ in range(3))
    h = await harness()
    await eventually(lambda: h.routed_to(None), timeout=2.0, what="routes after three 503s")
    times = [r.at for r in fake_api.lists()]
    assert len(times) == 4, "one request per retry the source decided, none underneath"
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] < 0.1, "the API server only sends seconds; a date is not waited for, and the first retry is now"
    assert all(gap < 1.0 for gap in gaps), gaps
    assert len(_failures(caplog, "list: HTTP 503")) == 3


async def test_retry_after_below_backoff_max_is_waited_in_full(fake_api: FakeApiServer, kube_config: Any) -> None:
    import dataclasses

    settings = dataclasses.replace(FAST, watch=dataclasses.replace(FAST.watch, backoff_max=5.0))
    fake_api.apply(BASELINE)
    fake_api.list_scripts["deployments"].append(ListScript(429, retry_after=1))
    h = Harness(kube_config, settings=settings)
    task = asyncio.create_task(h.source.run(), name="retry-after-source")
    try:
        await eventually(lambda: h.routed_to(None), timeout=3.0, what="routes after the retry")
        first, second = fake_api.lists()
        assert second.at - first.at >= 1.0 - SLACK
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_500s_back_off_then_recover_and_clear_the_error(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.list_scripts["deployments"].extend([ListScript(500), ListScript(500), ListScript(500)])
    h = await harness()
    await eventually(lambda: "kubernetes" in h.aggregator.errors, what="error reported")
    await eventually(lambda: h.routed_to(None) and "kubernetes" not in h.aggregator.errors, timeout=2.0)
    times = [r.at for r in fake_api.lists()[:4]]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] < 0.05, "the first retry is immediate"
    assert gaps[2] >= 0.05, "later retries back off"


async def test_burst_of_1000_events_is_coalesced_into_few_rebuilds(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    fake_api.watch_scripts["deployments"].append(BURST)
    h = await harness()
    await eventually(lambda: h.routed_to("alice") == "http://10.0.3.250:8080", timeout=2.0, what="last event applied")
    await asyncio.sleep(FAST.coalesce * 3)  # Let any rebuild already scheduled run, so the count is final.
    assert h.source.rebuilds <= 10, h.source.rebuilds


async def test_each_namespace_is_listed_and_watched_separately(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(deployment("orders", service="orders", namespace="team", upstream="http://10.0.1.1:80"))
    fake_api.apply(deployment("search", service="search", namespace="elsewhere", upstream="http://10.0.2.1:80"))
    h = await harness(namespaces=["shop", "team"])
    await eventually(lambda: set(h.table.services) == {"payments", "orders"}, what="two namespaces")
    assert {r.namespace for r in fake_api.lists()} == {"shop", "team"}
    assert {r.namespace for r in fake_api.lists("configmaps")} == {"shop", "team"}
    assert {r.namespace for r in fake_api.lists("services")} == {"shop", "team"}
    await eventually(lambda: fake_api.open_watches == 6, what="Deployments, ConfigMaps and Services of each namespace")


async def test_large_lists_are_paged(fake_api: FakeApiServer, kube_config: Any) -> None:
    import dataclasses

    settings = dataclasses.replace(FAST, watch=dataclasses.replace(FAST.watch, page_size=2))
    for i in range(5):
        fake_api.apply(deployment(f"svc{i}", service=f"svc{i}", upstream=f"http://10.0.0.{i + 1}:80"))
    h = Harness(kube_config, settings=settings)
    task = asyncio.create_task(h.source.run(), name="paged-source")
    try:
        await eventually(lambda: len(h.table.services) == 5, what="all five services")
        assert len(fake_api.lists()) == 3
        assert "continue" in fake_api.lists()[1].query
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _created_for_expiry_in(seconds: float, ttl_seconds: int) -> tuple[str, float]:
    """A creationTimestamp (whole seconds, as the API server writes it) and the resulting expiry."""
    expires = math.ceil(time.time() + seconds)
    created = expires - ttl_seconds
    stamp = dt.datetime.fromtimestamp(created, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return stamp, float(expires)


def _apply_expiring_override(
    fake_api: FakeApiServer, in_seconds: float = -10, ttl_annotation: str = "devstack.io/ttl"
) -> tuple[dict[str, Any], float]:
    """The baseline and alice's override of payments, whose 1m TTL runs out ``in_seconds`` from
    now (already ran out, by default); the stored override and its expiry."""
    created, expires = _created_for_expiry_in(in_seconds, 60)
    fake_api.apply(BASELINE)
    stored = fake_api.apply(
        deployment(
            "payments-alice",
            service="payments",
            key="alice",
            upstream="http://10.0.0.2:8080",
            annotations={ttl_annotation: "1m"},
            created=created,
        )
    )
    return stored, expires


async def test_expired_override_stops_receiving_traffic_without_any_event(
    fake_api: FakeApiServer, harness: Any
) -> None:
    _, expires = _apply_expiring_override(fake_api, 0.3)
    h = await harness()
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080", what="alice before expiry")
    rebuilds, events = h.source.rebuilds, len(fake_api.history["deployments"])
    decision = await eventually(
        lambda: (d := h.decide("alice")) is not None and d.reason == "override-expired" and d, timeout=2.0
    )
    assert decision.answer is not None and decision.answer.status == 503
    assert time.time() - expires < 1.0
    await eventually(lambda: h.source.rebuilds > rebuilds, timeout=1.5, what="a rebuild at the expiry time")
    assert len(fake_api.history["deployments"]) == events, "no watch event was needed"
    assert [e["deployment"] for e in h.source.status()["expired"]] == ["payments-alice"]


async def test_delete_expired_deletes_with_a_uid_precondition(fake_api: FakeApiServer, harness: Any) -> None:
    stored, _ = _apply_expiring_override(fake_api, ttl_annotation="janitor/ttl")
    h = await harness(delete_expired=True)
    await eventually(lambda: fake_api.deletes(), what="a DELETE")
    delete = fake_api.deletes()[0]
    assert (delete.namespace, delete.query["name"]) == ("shop", "payments-alice")
    assert delete.body["preconditions"] == {"uid": stored["metadata"]["uid"]}
    assert delete.body["propagationPolicy"] == "Background"
    await eventually(lambda: h.decide("alice") is not None and h.decide("alice").reason == "no-override")
    assert len(fake_api.deletes()) == 1


async def test_429_on_a_delete_is_retried_by_the_source_after_delete_retry(
    fake_api: FakeApiServer, harness: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="controller.sources.kubernetes")
    _apply_expiring_override(fake_api)
    # Longer than this test waits, shorter than its teardown bound: urllib3 sleeping on it would fail it.
    fake_api.delete_scripts.append(ListScript(429, retry_after=5))
    await harness(delete_expired=True)
    await eventually(lambda: len(fake_api.deletes()) >= 2, timeout=2.0, what="the delete retried by the source")
    first, second = fake_api.deletes()
    assert FAST.delete_retry - SLACK <= second.at - first.at < 2.0
    assert ("shop", "payments-alice") not in fake_api.objects["deployments"]
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("cannot delete expired")]
    assert warnings == ["cannot delete expired shop/payments-alice: HTTP 429 Too Many Requests"]


async def test_without_delete_expired_nothing_is_deleted(fake_api: FakeApiServer, harness: Any) -> None:
    _apply_expiring_override(fake_api)
    h = await harness()
    await eventually(lambda: h.decide("alice") is not None and h.decide("alice").reason == "override-expired")
    assert fake_api.deletes() == []


async def test_conflicting_overrides_are_reported_and_not_routed(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    fake_api.apply(deployment("payments-alice-2", service="payments", key="alice", upstream="http://10.0.0.5:80"))
    h = await harness()
    await eventually(lambda: h.source.published)
    assert h.routed_to("alice") == "http://10.0.0.1:8080"
    [conflict] = h.source.status()["conflicts"]
    assert "shop/payments-alice" in conflict and "shop/payments-alice-2" in conflict


async def test_leaking_override_is_reported_from_the_services_watch(fake_api: FakeApiServer, harness: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(service_object("payments", selector={"app": "payments"}))
    leaky = deployment(
        "payments-alice",
        service="payments",
        key="alice",
        upstream="http://10.0.0.2:8080",
        pod_labels={"app": "payments", "track": "alice"},
    )
    fake_api.apply(leaky)
    h = await harness(detect_leaks=True)
    await eventually(lambda: h.source.leaks, what="leak found")
    assert [leak.deployment for leak in h.source.leaks] == ["payments-alice"]
    fake_api.apply(service_object("payments", selector={"app": "payments", "track": "stable"}))
    await eventually(lambda: not h.source.leaks, what="leak cleared by the Service change")


# --- the service's protocol: its Service port's appProtocol, devstack.io/protocol ------------------------

GRPC_PORT = ({"name": "grpc", "port": 80, "targetPort": 8080, "appProtocol": "grpc"},)
"""The Service port the baselines' addresses (port 8080) reach, declared gRPC."""


def _protocols(h: Harness) -> set[str]:
    """How the router would speak to payments, for no key and for alice's override."""
    decisions = [h.decide(None), h.decide("alice")]
    return {d.target.protocol for d in decisions if d is not None and d.target is not None}


async def test_a_service_port_declared_grpc_makes_the_service_and_its_overrides_h2c(
    fake_api: FakeApiServer, harness: Any
) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    fake_api.apply(service_object("payments", selector={"app": "payments"}, ports=GRPC_PORT))
    h = await harness()
    await eventually(lambda: h.routed_to("alice") == "http://10.0.0.2:8080", what="alice routed")
    assert _protocols(h) == {"h2c"}, "the first table published already speaks h2c"
    assert h.table.to_json()["services"]["payments"]["protocol"] == "h2c"
    # Services are matched by name, so they are listed whole (no label selector), like for leaks.
    assert "labelSelector" not in fake_api.lists("services")[0].query


async def test_service_changes_change_the_protocol_and_a_bad_annotation_is_reported(
    fake_api: FakeApiServer, harness: Any
) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    h = await harness()
    await eventually(lambda: fake_api.open_watches == 3 and h.routed_to("alice"), what="watching")
    assert _protocols(h) == {"http1"}, "no Service: HTTP/1.1"

    fake_api.apply(service_object("payments", selector={"app": "payments"}, ports=GRPC_PORT))
    await eventually(lambda: _protocols(h) == {"h2c"}, timeout=1.0, what="h2c within 1 s of the Service")

    bad = {"devstack.io/protocol": "grpc"}  # an appProtocol value, not one of the annotation's
    fake_api.apply(service_object("payments", selector={"app": "payments"}, ports=GRPC_PORT, annotations=bad))
    await eventually(lambda: _protocols(h) == {"http1"}, timeout=1.0, what="a bad annotation: HTTP/1.1")
    [problem] = h.source.status()["invalid"]
    assert problem == (
        "Service shop/payments: annotation devstack.io/protocol: 'grpc' must be 'http1' or 'h2c'; "
        "service 'payments' routed as http1"
    )
    assert h.routed_to("alice") == "http://10.0.0.2:8080", "the service and its overrides keep routing"

    fake_api.apply(service_object("payments", selector={"app": "payments"}, ports=GRPC_PORT, annotations={}))
    await eventually(lambda: _protocols(h) == {"h2c"}, timeout=1.0, what="the annotation removed")
    assert h.source.status()["invalid"] == []


async def test_nothing_is_published_before_the_services_are_listed(fake_api: FakeApiServer, kube_config: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(service_object("payments", selector={"app": "payments"}, ports=GRPC_PORT))
    fake_api.list_scripts["services"].extend([ListScript(500)] * 3)
    published: list[RouteTable] = []
    aggregator = Aggregator(["kubernetes"], published.append)
    source = KubernetesSource(aggregator.update, aggregator.report_error, configuration=kube_config, settings=FAST)
    task = asyncio.create_task(source.run(), name="test-kubernetes-source")
    try:
        await eventually(lambda: published, timeout=3.0, what="a table once the Services are listed")
        assert len(fake_api.lists("services")) == 4
        assert published[0].services["payments"].protocol == "h2c", "the very first table speaks h2c"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_iterations_hook_stops_the_watchers(fake_api: FakeApiServer, kube_config: Any) -> None:
    fake_api.apply(BASELINE)
    fake_api.watch_scripts["deployments"].append(WatchScript(then="close"))
    h = Harness(kube_config)
    await asyncio.wait_for(h.source.run(_iterations=1), timeout=5)
    assert len(fake_api.lists()) == 1
    assert h.routed_to(None) == "http://10.0.0.1:8080"


async def test_router_factory_feeds_an_aggregator(fake_api: FakeApiServer, kube_config: Any) -> None:
    """``devstack router --kubernetes`` path: ``kubernetes_source(namespaces=...)(aggregator)``."""
    fake_api.apply(BASELINE)
    aggregator = Aggregator(["kubernetes"], lambda table: None)
    factory = kubernetes_source(namespaces=["shop"], configuration=kube_config, settings=FAST)
    task = asyncio.create_task(factory(aggregator), name="router-kubernetes-source")
    try:
        await eventually(lambda: "payments" in aggregator.table.services, what="published through the factory")
        assert aggregator.ready
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

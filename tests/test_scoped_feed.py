"""Scoped feeds (issue #17, item 2): a sidecar that follows only the services its app calls.

The controller's side (``/v2/routes?services=``, controller/feed.py) sends a scoped subscriber
only the services its names cover, by service name or by host; the router's side follows a fixed
list (``--services``) or learns names from requests without a route (``--learn-services``,
router/scope.py), holding such a request until the feed has answered for its authority, for at
most ``--first-use-wait``. Real controllers (the publish app) and real routers on loopback, real
aiohttp origins; the controller that is down is a closed port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controller.aggregator import Aggregator
from controller.feed import RouteFeed
from controller.publish import RoutePublisher
from controller.sources.remote import DELTA_PATH, RemoteSettings, RemoteSource
from router.errors import Answer
from router.scope import MAX_LEARNED, RouteScope
from router.server import RouterServer
from router.settings import Mode, RouterSettings
from router.table import Override, Routes, RouteTable, Target
from tests.kube.kube_support import eventually
from tests.support import Origin, exchange, free_port, status_of
from tests.support import serve_controller as _controller

TIMEOUT = 10.0
QUICK = RemoteSettings(backoff_initial=0.05, backoff_max=0.2)


def _service(name: str, url: str = "http://10.0.0.1:80", alice: str | None = None, host: str | None = None) -> Routes:
    overrides = {"alice": Override("alice", Target(alice))} if alice else {}
    return Routes(name, Target(url), overrides, hosts=(host or f"{name}.shop.svc",))


def _table(services: dict[str, Routes], version: int) -> RouteTable:
    return RouteTable(services, version=version, sources=("kubernetes",))


def _many(count: int) -> dict[str, Routes]:
    return {f"svc{i}": _service(f"svc{i}", f"http://10.0.{i // 250}.{i % 250}:80") for i in range(count)}


def _line(frame_line: bytes) -> dict[str, Any]:
    return json.loads(frame_line)  # type: ignore[no-any-return]


# --- the controller side ---------------------------------------------------------------------------


def test_a_scope_covers_services_by_name_or_by_an_authority_they_answer() -> None:
    feed = RouteFeed("i1")
    feed.publish(_table(_many(100), 1))
    scope = frozenset({"svc1", "svc2.shop.svc:8080", "nowhere"})
    assert feed.covered(scope) == {"svc1", "svc2"}
    snapshot = _line(feed.frame(None, scope).line)
    assert sorted(snapshot["services"]) == ["svc1", "svc2"]
    assert snapshot["services"]["svc2"] == feed.table.services["svc2"].to_json()
    whole = feed.frame(None).line
    assert len(feed.frame(None, scope).line) * 20 < len(whole)  # the point: bytes grow with the scope


def test_a_scoped_delta_sets_what_changed_in_scope_and_moves_the_version_for_the_rest() -> None:
    feed = RouteFeed("i1")
    services = _many(100)
    feed.publish(_table(services, 1))
    scope = frozenset({"svc1", "svc2.shop.svc"})
    # In scope: set. Out of scope: nothing but the version.
    feed.publish(_table({**services, "svc1": _service("svc1", "http://10.9.9.9:80")}, 2))
    delta = _line(feed.frame(1, scope).line)
    assert (delta["kind"], delta["from"], delta["version"]) == ("delta", 1, 2)
    assert list(delta["set"]) == ["svc1"] and delta["removed"] == []
    services = dict(feed.table.services)
    feed.publish(_table({**services, "svc50": _service("svc50", "http://10.9.9.9:80")}, 3))
    quiet = _line(feed.frame(2, scope).line)
    assert (quiet["set"], quiet["removed"], quiet["version"]) == ({}, [], 3)
    # svc2 gives its host up to svc60: the scope (by host) now covers svc60, and svc2, which a
    # subscriber may hold, is listed as removed.
    services = dict(feed.table.services)
    services["svc2"] = _service("svc2", host="svc2-old.shop.svc")
    services["svc60"] = _service("svc60", host="svc2.shop.svc")
    feed.publish(_table(services, 4))
    moved = _line(feed.frame(3, scope).line)
    assert list(moved["set"]) == ["svc60"] and moved["removed"] == ["svc2"]
    # The same (start, scope) is encoded once, whoever asks.
    assert feed.frame(3, scope) is feed.frame(3, frozenset(scope))


async def _stream_lines(session: aiohttp.ClientSession, url: str, count: int) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    async with session.get(url) as response:
        assert response.status == 200
        async with asyncio.timeout(TIMEOUT):
            while len(lines) < count:
                line = await response.content.readline()
                if line.strip():
                    lines.append(json.loads(line))
    return lines




async def test_the_controller_answers_a_scoped_subscription_over_http() -> None:
    publisher = RoutePublisher()
    publisher.publish(_table(_many(50), 1))
    async with _controller(publisher) as base, aiohttp.ClientSession() as session:
        (snapshot,) = await _stream_lines(session, f"{base}{DELTA_PATH}?services=SVC3,svc4.shop.svc", 1)
        assert sorted(snapshot["services"]) == ["svc3", "svc4"]  # names are matched as hosts are: any case
        (empty,) = await _stream_lines(session, f"{base}{DELTA_PATH}?services=", 1)
        assert (empty["services"], empty["version"]) == ({}, 1)  # a learning sidecar before its first request
        # A scope travels in the request line, which the controller bounds (8 KiB): a router with
        # more names than that follows everything instead (controller.sources.remote).
        too_many = ",".join(f"s{i}" for i in range(2000))
        async with session.get(f"{base}{DELTA_PATH}", params={"services": too_many}) as refused:
            assert refused.status == 400


# --- the router side ---------------------------------------------------------------------------------


async def test_a_router_with_a_fixed_scope_holds_only_those_services_and_follows_every_version() -> None:
    publisher = RoutePublisher()
    services = _many(200)
    publisher.publish(_table(services, 1))
    scope = RouteScope(["svc7", "svc8.shop.svc"])
    received: list[dict[str, Routes]] = []
    async with _controller(publisher) as base:
        source = RemoteSource(
            base, lambda _, s: received.append(dict(s)), lambda name, exc: None, settings=QUICK, scope=scope
        )
        task = asyncio.create_task(source.run())
        try:
            await eventually(lambda: source.version == 1, timeout=TIMEOUT)
            assert sorted(received[-1]) == ["svc7", "svc8"]
            publisher.publish(_table({**services, "svc7": _service("svc7", "http://10.7.7.7:80")}, 2))
            await eventually(lambda: source.version == 2, timeout=TIMEOUT)
            assert received[-1]["svc7"].baseline.url == "http://10.7.7.7:80"
            publisher.publish(_table({**dict(publisher.table.services), "svc99": _service("svc99")}, 3))
            await eventually(lambda: source.version == 3, timeout=TIMEOUT)
            assert source.table is not None and sorted(source.table.services) == ["svc7", "svc8"]
            assert scope.answered == {"svc7", "svc8.shop.svc"}
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@contextlib.asynccontextmanager
async def _learning_sidecar(url: str, wait: float = 5.0) -> AsyncIterator[tuple[RouterServer, RouteScope]]:
    """A sidecar router that learns its scope, following ``url`` (as ``--learn-services`` runs it)."""
    server = RouterServer(RouterSettings(mode=Mode.SIDECAR))
    scope = RouteScope(learn=True, wait=wait)
    server.slot.scope = scope
    aggregator = Aggregator(["remote"], server.swap)
    source = RemoteSource(url, aggregator.update, aggregator.report_error, settings=QUICK, scope=scope)
    await server.start(("127.0.0.1", 0))
    task = asyncio.create_task(source.run())
    try:
        yield server, scope
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.close(drain=0.5)


@pytest.fixture
async def origins() -> AsyncIterator[tuple[Origin, Origin]]:
    base, alice = Origin("base"), Origin("alice")
    await base.start()
    await alice.start()
    yield base, alice
    await base.close()
    await alice.close()


def _get(authority: str, key: str | None = None) -> bytes:
    baggage = f"baggage: devstack={key}\r\n" if key else ""
    return f"GET http://{authority}/x HTTP/1.1\r\nHost: {authority}\r\n{baggage}Connection: close\r\n\r\n".encode()


async def test_a_learning_sidecar_holds_the_first_request_until_its_routes_arrive(
    origins: tuple[Origin, Origin],
) -> None:
    base, alice = origins
    publisher = RoutePublisher()
    others = _many(500)
    publisher.publish(_table({**others, "payments": _service("payments", base.url, alice.url, "payments")}, 1))
    async with _controller(publisher) as url, _learning_sidecar(url) as (server, scope):
        await eventually(lambda: server.table.version == 1, timeout=TIMEOUT)
        assert server.table.services == {}  # nothing used yet: nothing held
        started = time.monotonic()
        first, _ = await exchange(server.address[1], _get("payments", "alice"), timeout=TIMEOUT)
        first_latency = time.monotonic() - started
        assert status_of(first) == 200 and json.loads(first.split(b"\r\n\r\n", 1)[1])["origin"] == "alice"
        assert list(server.table.services) == ["payments"] and server.stats.scope_holds == 1
        second, _ = await exchange(server.address[1], _get("payments"), timeout=TIMEOUT)
        assert status_of(second) == 200 and server.stats.scope_holds == 1  # known now: not held again
        # A name that covers nothing is answered by the feed too: refused without waiting out the bound.
        started = time.monotonic()
        missing, _ = await exchange(server.address[1], _get("nowhere.example"), timeout=TIMEOUT)
        assert status_of(missing) == Answer.NO_ROUTE_SIDECAR.status
        assert time.monotonic() - started < scope.wait
        assert scope.answered == {"payments", "nowhere.example"} and scope.waiting == 0
        # Changes to a learned service reach it; the other 500 never do.
        publisher.publish(
            _table({**others, "payments": _service("payments", alice.url, None, "payments"), "new": _service("new")}, 2)
        )
        await eventually(lambda: server.table.version == 2, timeout=TIMEOUT)
        assert list(server.table.services) == ["payments"]
    print(f"first-use latency {first_latency * 1000:.1f} ms (feed on loopback, 501 services)")


async def test_a_learning_sidecar_learns_a_grpc_clients_connect_authority(origins: tuple[Origin, Origin]) -> None:
    base, alice = origins
    publisher = RoutePublisher()
    publisher.publish(_table({"payments": _service("payments", base.url, alice.url, "payments")}, 1))
    async with _controller(publisher) as url, _learning_sidecar(url) as (server, _):
        await eventually(lambda: server.table.version == 1, timeout=TIMEOUT)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
        try:
            writer.write(b"CONNECT payments:80 HTTP/1.1\r\nHost: payments:80\r\n\r\n")
            async with asyncio.timeout(TIMEOUT):
                assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
                writer.write(b"GET /y HTTP/1.1\r\nHost: payments\r\nbaggage: devstack=alice\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["origin"] == "alice"


async def test_with_the_controller_down_the_first_request_waits_at_most_the_bound() -> None:
    async with _learning_sidecar(f"http://127.0.0.1:{free_port()}", wait=0.3) as (server, scope):
        started = time.monotonic()
        answer, _ = await exchange(server.address[1], _get("payments"), timeout=TIMEOUT)
        held = time.monotonic() - started
        assert status_of(answer) == Answer.NO_ROUTE_SIDECAR.status
        assert held >= scope.wait  # it did wait for the feed ...
        assert scope.waiting == 0 and "payments" in scope.names  # ... and gave up, still subscribed to it
        # A client that goes away while held is forgotten: nothing resumes into a closed connection.
        _, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
        writer.write(_get("ledger"))
        await eventually(lambda: scope.waiting == 1, timeout=TIMEOUT)
        writer.close()
        await eventually(lambda: scope.waiting == 0, timeout=TIMEOUT)


def test_a_scope_stops_learning_at_its_bound() -> None:
    scope = RouteScope(learn=True)
    grown: list[int] = []
    scope.on_grow = lambda: grown.append(len(scope.names))
    for i in range(MAX_LEARNED):
        assert scope.first_use(f"s{i}", lambda: None)
    assert not scope.first_use("one-too-many", lambda: None)
    assert len(grown) == MAX_LEARNED and "one-too-many" not in scope.names
    fixed = RouteScope(["a"])
    assert not fixed.first_use("b", lambda: None) and fixed.names == {"a"}  # --services alone never learns

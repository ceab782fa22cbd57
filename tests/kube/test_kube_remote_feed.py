"""The remote source over real HTTP: following a controller, staleness, reconnects, bad lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from controller.aggregator import Aggregator
from controller.cli import Controller
from controller.publish import PublishSettings
from controller.sources.remote import RemoteSettings, RemoteSource
from router.table import Routes, RouteTable, Target
from tests.kube.kube_fake_apiserver import FakeApiServer, deployment, service_object
from tests.kube.kube_support import eventually
from tests.kube.test_kube_source import FAST

BEATING = PublishSettings(heartbeat=0.1)
"""Heartbeats well inside the followers' idle timeout, as in production (15 s vs 45 s)."""
QUICK = RemoteSettings(connect_timeout=0.5, idle_timeout=0.3, backoff_initial=0.05, backoff_max=0.2)

BASELINE = deployment("payments", service="payments", upstream="http://10.0.0.1:8080")
ALICE = deployment("payments-alice", service="payments", key="alice", upstream="http://10.0.0.2:8080")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Follower:
    """A router's side of the feed, without the proxy: remote source → aggregator."""

    def __init__(self, url: str, settings: RemoteSettings = QUICK) -> None:
        self.aggregator = Aggregator(["remote"], lambda table: None)
        self.source = RemoteSource(url, self.aggregator.update, self.aggregator.report_error, settings=settings)
        self.task = asyncio.create_task(self.source.run(), name="test-remote-source")

    def overrides(self) -> list[str]:
        routes = self.aggregator.table.services.get("payments")
        return sorted(routes.overrides) if routes else []

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def followers() -> AsyncIterator[list[Follower]]:
    made: list[Follower] = []
    yield made
    for follower in made:
        await follower.close()


async def test_follower_keeps_its_table_while_the_controller_is_away_and_catches_up(
    fake_api: FakeApiServer, kube_config: Any, followers: list[Follower]
) -> None:
    fake_api.apply(BASELINE)
    listen = f"127.0.0.1:{_free_port()}"
    controllers: list[Controller] = []

    async def start_controller() -> Controller:
        made = Controller(listen=listen, configuration=kube_config, settings=FAST, publish_settings=BEATING)
        controllers.append(made)
        await made.start()
        return made

    try:
        first = await start_controller()
        follower = Follower("http://" + listen)
        followers.append(follower)
        await eventually(lambda: "payments" in follower.aggregator.table.services, timeout=2.0)
        served = follower.aggregator.table

        await first.close()
        await eventually(lambda: not follower.source.connected, what="noticed the controller left")
        error = await eventually(lambda: follower.aggregator.errors.get("remote"), what="staleness reported")
        assert "unreachable" in error and f"v{follower.source.version}" in error
        assert follower.aggregator.table is served, "the last table keeps serving"

        fake_api.apply(ALICE)
        second = await start_controller()
        await eventually(lambda: follower.overrides() == ["alice"], timeout=2.0, what="caught up after restart")
        await eventually(lambda: "remote" not in follower.aggregator.errors, what="staleness cleared")
        assert follower.source.instance == second.publisher.instance
    finally:
        for made in controllers:
            await made.close()


async def test_a_followed_controller_hands_on_each_services_protocol(
    fake_api: FakeApiServer, kube_config: Any, followers: list[Follower]
) -> None:
    grpc = [{"name": "grpc", "port": 8080, "appProtocol": "grpc"}]
    fake_api.apply(deployment("users", service="users", upstream="http://10.0.0.7:8080"))
    fake_api.apply(deployment("users-alice", service="users", key="alice", upstream="http://10.0.0.8:8080"))
    fake_api.apply(service_object("users", selector={"app": "users"}, ports=grpc))
    fake_api.apply(BASELINE)
    controller = Controller(
        listen=f"127.0.0.1:{_free_port()}", configuration=kube_config, settings=FAST, publish_settings=BEATING
    )
    await controller.start()
    try:
        follower = Follower(f"http://127.0.0.1:{controller.address[1]}")
        followers.append(follower)
        await eventually(lambda: {"users", "payments"} <= set(follower.aggregator.table.services), timeout=2.0)
        table = follower.aggregator.table
        users = table.resolve("users", "alice")
        assert users is not None and users.target is not None
        assert (users.target.url, users.target.protocol) == ("http://10.0.0.8:8080", "h2c")
        assert table.services["users"].baseline.protocol == "h2c"
        assert table.services["payments"].protocol == "http1"

        fake_api.apply(service_object("users", selector={"app": "users"}, ports=[{"port": 8080}]))
        await eventually(
            lambda: follower.aggregator.table.services["users"].protocol == "http1",
            timeout=2.0,
            what="a Service change reaches the follower",
        )
    finally:
        await controller.close()


async def _feed_server(lines_per_connection: list[list[bytes]]) -> tuple[web.AppRunner, str, list[int]]:
    """A stand-in controller that writes scripted lines per connection, then stays silent."""
    connections: list[int] = []

    async def feed(request: web.Request) -> web.StreamResponse:
        connections.append(len(connections))
        lines = lines_per_connection[min(len(connections) - 1, len(lines_per_connection) - 1)]
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for line in lines:
            await response.write(line)
        with contextlib.suppress(asyncio.CancelledError):
            while request.transport is not None and not request.transport.is_closing():
                await asyncio.sleep(0.02)  # Silent: no heartbeats, like a controller that hung.
        return response

    app = web.Application()
    app.router.add_get("/v1/routes", feed)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.2)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}", connections


def _line(table: RouteTable) -> bytes:
    return json.dumps(table.to_json()).encode() + b"\n"


GOOD = RouteTable({"payments": Routes("payments", Target("http://10.0.0.1:8080"))}, version=3)


async def test_a_silent_controller_is_detected_by_the_idle_timeout(followers: list[Follower]) -> None:
    runner, url, connections = await _feed_server([[_line(GOOD)]])
    try:
        follower = Follower(url)
        followers.append(follower)
        await eventually(lambda: follower.source.version == 3)
        await eventually(lambda: len(connections) >= 2, timeout=2.0, what="reconnected after silence")
        assert "TimeoutError" in follower.aggregator.errors.get("remote", "") or follower.source.connected
    finally:
        await runner.cleanup()


async def test_an_invalid_table_is_rejected_and_the_last_good_one_kept(followers: list[Follower]) -> None:
    bad = b'{"version": 4, "services": {"payments": {"baseline": "ftp://nope"}}}\n'
    runner, url, _ = await _feed_server([[_line(GOOD), b"not json\n", bad]])
    try:
        follower = Follower(url)
        followers.append(follower)
        error = await eventually(
            lambda: "ftp" in follower.aggregator.errors.get("remote", "") and follower.aggregator.errors["remote"]
        )
        assert "rejected table" in error
        assert follower.source.version == 3
        assert follower.aggregator.table.services["payments"].baseline.url == "http://10.0.0.1:8080"
    finally:
        await runner.cleanup()

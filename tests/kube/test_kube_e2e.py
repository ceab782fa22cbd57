"""End to end on loopback: fake API server → controller → two routers (remote source) → real upstreams.

A change made in the API server must be served by both routers within 1 s. Every assertion is a
real HTTP request through a router to an aiohttp upstream that answers with its own name; the
upstream addresses come from the ``devstack.io/upstream`` annotation.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controller.aggregator import Aggregator
from controller.cli import Controller
from controller.sources.remote import remote_source
from router.server import RouterServer
from tests.kube.kube_fake_apiserver import FakeApiServer, deployment
from tests.kube.kube_support import eventually, start_upstream
from tests.kube.test_kube_source import FAST, _created_for_expiry_in


class Stack:
    def __init__(self) -> None:
        self.upstreams: dict[str, str] = {}
        self.routers: list[RouterServer] = []
        self.controller: Controller | None = None
        self.session: aiohttp.ClientSession | None = None

    async def ask(self, router: RouterServer, key: str | None) -> str:
        """One real request through ``router``: the answering upstream's name, or the status."""
        assert self.session is not None
        headers = {"Host": "payments"}
        if key is not None:
            headers["baggage"] = f"devstack={key}"
        async with self.session.get("http://{}:{}/checkout".format(*router.address), headers=headers) as resp:
            return await resp.text() if resp.status == 200 else str(resp.status)

    async def all_answer(self, key: str | None, expected: str) -> bool:
        answers = [await self.ask(router, key) for router in self.routers]
        return all(answer == expected for answer in answers)


@pytest.fixture
async def stack(fake_api: FakeApiServer, kube_config: Any) -> AsyncIterator[Stack]:
    made = Stack()
    runners = []
    for name in ("baseline", "alice"):
        runner, url = await start_upstream(name)
        runners.append(runner)
        made.upstreams[name] = url
    fake_api.apply(deployment("payments", service="payments", upstream=made.upstreams["baseline"]))
    made.controller = Controller(listen="127.0.0.1:0", configuration=kube_config, settings=FAST)
    await made.controller.start()
    feed = "http://{}:{}".format(*made.controller.address)
    tasks = []
    for index in range(2):
        router = RouterServer()
        aggregator = Aggregator(["remote"], router.swap)
        tasks.append(asyncio.create_task(remote_source(feed)(aggregator), name=f"router-{index}-remote"))
        await router.start(("127.0.0.1", 0), admin=None)
        made.routers.append(router)
    made.session = aiohttp.ClientSession()
    try:
        await eventually(lambda: all(r.table.version > 0 for r in made.routers), timeout=3.0, what="routers fed")
        yield made
    finally:
        await made.session.close()
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for router in made.routers:
            await router.close(drain=0)
        await made.controller.close()
        for runner in runners:
            await runner.cleanup()


async def _within_one_second(stack: Stack, key: str | None, expected: str, what: str) -> float:
    started = time.monotonic()
    await eventually(lambda: stack.all_answer(key, expected), timeout=1.0, interval=0.02, what=what)
    return time.monotonic() - started


async def test_override_lifecycle_reaches_both_routers_within_one_second(fake_api: FakeApiServer, stack: Stack) -> None:
    assert await stack.all_answer(None, "baseline")
    assert await stack.all_answer("alice", "baseline"), "no override yet: the rest of the stack is shared"

    alice = deployment("payments-alice", service="payments", key="alice", upstream=stack.upstreams["alice"])
    fake_api.apply(alice)
    await _within_one_second(stack, "alice", "alice", "alice's override served by both routers")
    assert await stack.all_answer(None, "baseline"), "requests without the key are untouched"
    assert await stack.all_answer("bob", "baseline")

    fake_api.apply(
        deployment("payments-alice", service="payments", key="alice", ready=0, upstream=stack.upstreams["alice"])
    )
    await _within_one_second(stack, "alice", "503", "scaled to zero: 503 from both routers")

    fake_api.apply(
        deployment(
            "payments-alice",
            service="payments",
            key="alice",
            ready=0,
            upstream=stack.upstreams["alice"],
            annotations={"devstack.io/fallback": "baseline"},
        )
    )
    await _within_one_second(stack, "alice", "baseline", "fallback: baseline")

    fake_api.delete("deployments", "shop", "payments-alice")
    fake_api.apply(alice)
    await _within_one_second(stack, "alice", "alice", "re-created")
    fake_api.delete("deployments", "shop", "payments-alice")
    await _within_one_second(stack, "alice", "baseline", "deleted: back to baseline")


async def test_a_410_at_the_api_server_does_not_disturb_the_routers(fake_api: FakeApiServer, stack: Stack) -> None:
    fake_api.apply(deployment("payments-alice", service="payments", key="alice", upstream=stack.upstreams["alice"]))
    await _within_one_second(stack, "alice", "alice", "alice routed")
    fake_api.expire_watches()
    await eventually(lambda: len(fake_api.lists()) >= 2, what="controller relisted")
    assert await stack.all_answer("alice", "alice")
    assert await stack.all_answer(None, "baseline")


async def test_expired_override_stops_at_both_routers_without_any_event(fake_api: FakeApiServer, stack: Stack) -> None:
    created, expires = _created_for_expiry_in(0.6, 60)
    fake_api.apply(
        deployment(
            "payments-alice",
            service="payments",
            key="alice",
            upstream=stack.upstreams["alice"],
            annotations={"devstack.io/ttl": "1m"},
            created=created,
        )
    )
    await _within_one_second(stack, "alice", "alice", "alice routed before expiry")
    events = len(fake_api.history["deployments"])
    await eventually(lambda: stack.all_answer("alice", "503"), timeout=2.0, interval=0.02, what="expired: 503")
    assert time.time() - expires < 1.0
    assert len(fake_api.history["deployments"]) == events

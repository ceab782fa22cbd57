"""The controller process against the fake API server: /v1/routes (plain, long-poll, stream), health, metrics."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.cli import Controller, run_controller
from controller.publish import PublishSettings
from tests.kube.kube_fake_apiserver import FakeApiServer, ListScript, deployment, service_object
from tests.kube.kube_support import eventually
from tests.kube.test_kube_source import FAST

BASELINE = deployment("payments", service="payments", upstream="http://10.0.0.1:8080")
ALICE = deployment("payments-alice", service="payments", key="alice", upstream="http://10.0.0.2:8080")

StartController = Callable[..., Awaitable[Controller]]


@pytest.fixture
async def controller(kube_config: Any) -> AsyncIterator[StartController]:
    started: list[Controller] = []

    async def start(**options: Any) -> Controller:
        made = Controller(listen="127.0.0.1:0", configuration=kube_config, settings=FAST, **options)
        await made.start()
        started.append(made)
        return made

    yield start
    for made in started:
        await made.close()


def base_url(controller: Controller) -> str:
    return "http://{}:{}".format(*controller.address)


async def get_json(url: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


async def test_v1_routes_serves_the_table_with_version_and_reports(
    fake_api: FakeApiServer, controller: StartController
) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(ALICE)
    ctl = await controller()
    await eventually(lambda: ctl.publisher.table.version > 0)
    status, body = await get_json(base_url(ctl) + "/v1/routes")
    assert status == 200
    assert body["version"] == ctl.publisher.table.version
    assert body["sources"] == ["kubernetes"]
    assert body["services"]["payments"]["baseline"] == "http://10.0.0.1:8080"
    assert body["services"]["payments"]["overrides"]["alice"]["url"] == "http://10.0.0.2:8080"
    assert body["leaks"] == [] and body["conflicts"] == [] and body["instance"] == ctl.publisher.instance


async def test_readyz_is_503_until_the_first_snapshot(fake_api: FakeApiServer, controller: StartController) -> None:
    fake_api.apply(BASELINE)
    fake_api.list_scripts["deployments"].extend([ListScript(500)] * 4)
    ctl = await controller()
    status, body = await get_json(base_url(ctl) + "/readyz")
    assert status == 503 and body["ready"] is False
    await eventually(lambda: ctl.publisher.table.version > 0, timeout=3.0)
    status, body = await get_json(base_url(ctl) + "/readyz")
    assert status == 200 and body["watches"]["deployments/*"]["connected"] in (True, False)
    status, _ = await get_json(base_url(ctl) + "/healthz")
    assert status == 200


async def test_watch_stream_sends_a_line_per_new_table(fake_api: FakeApiServer, controller: StartController) -> None:
    fake_api.apply(BASELINE)
    ctl = await controller()
    await eventually(lambda: ctl.publisher.table.version > 0)
    async with aiohttp.ClientSession() as session, session.get(base_url(ctl) + "/v1/routes?watch=1&since=0") as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        first = json.loads(await resp.content.readline())
        assert first["version"] == ctl.publisher.table.version
        fake_api.apply(ALICE)
        second = json.loads(await asyncio.wait_for(resp.content.readline(), 1.0))
        assert second["version"] > first["version"]
        assert "alice" in second["services"]["payments"]["overrides"]


async def test_watch_from_the_current_version_waits_for_a_change(
    fake_api: FakeApiServer, controller: StartController
) -> None:
    fake_api.apply(BASELINE)
    ctl = await controller(publish_settings=PublishSettings(heartbeat=0.05))
    await eventually(lambda: ctl.publisher.table.version > 0)
    current = ctl.publisher.table.version
    url = f"{base_url(ctl)}/v1/routes?watch=1&since={current}&instance={ctl.publisher.instance}"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert await asyncio.wait_for(resp.content.readline(), 1.0) == b"\n", "a heartbeat, not a table"
        fake_api.apply(ALICE)
        line = b"\n"
        while line == b"\n":
            line = await asyncio.wait_for(resp.content.readline(), 1.0)
        assert json.loads(line)["version"] == current + 1


async def test_a_since_from_another_controller_run_gets_the_current_table(
    fake_api: FakeApiServer, controller: StartController
) -> None:
    fake_api.apply(BASELINE)
    ctl = await controller()
    await eventually(lambda: ctl.publisher.table.version > 0)
    for query in ("since=1&instance=someone-else", "since=9999"):
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{base_url(ctl)}/v1/routes?watch=1&{query}") as resp,
        ):
            line = await asyncio.wait_for(resp.content.readline(), 1.0)
            assert json.loads(line)["version"] == ctl.publisher.table.version


async def test_long_poll_answers_when_a_newer_table_exists(
    fake_api: FakeApiServer, controller: StartController
) -> None:
    fake_api.apply(BASELINE)
    ctl = await controller()
    await eventually(lambda: ctl.publisher.table.version > 0)
    current = ctl.publisher.table.version
    poll = asyncio.create_task(get_json(f"{base_url(ctl)}/v1/routes?since={current}&instance={ctl.publisher.instance}"))
    await asyncio.sleep(0.05)  # The request is parked server-side; nothing has changed yet.
    assert not poll.done()
    fake_api.apply(ALICE)
    status, body = await asyncio.wait_for(poll, 1.0)
    assert status == 200 and body["version"] == current + 1


async def test_metrics_expose_leaks_as_gauges(fake_api: FakeApiServer, controller: StartController) -> None:
    fake_api.apply(BASELINE)
    fake_api.apply(service_object("payments", selector={"app": "payments"}))
    fake_api.apply(
        deployment(
            "payments-alice",
            service="payments",
            key="alice",
            upstream="http://10.0.0.2:8080",
            pod_labels={"app": "payments"},
        )
    )
    ctl = await controller()
    await eventually(lambda: ctl.source.leaks)
    async with aiohttp.ClientSession() as session, session.get(base_url(ctl) + "/metrics") as resp:
        text = await resp.text()
    assert "devstack_controller_leaking_overrides 1.0" in text
    labels = 'deployment="payments-alice",key="alice",namespace="shop",service="payments"'
    assert f"devstack_controller_override_leak{{{labels}}} 1.0" in text
    _, body = await get_json(base_url(ctl) + "/v1/routes")
    assert [leak["deployment"] for leak in body["leaks"]] == ["payments-alice"]


async def test_run_controller_uses_the_standard_kubeconfig(
    fake_api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": fake_api.url}}],
                "users": [{"name": "dev", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "dev"}}],
                "current-context": "fake",
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    fake_api.apply(BASELINE)
    args = argparse.Namespace(kubernetes=True, namespace=["shop"], listen="127.0.0.1:0", delete_expired=False)
    stop = asyncio.Event()
    running: list[Controller] = []
    task = asyncio.create_task(run_controller(args, on_started=running.append, stop=stop))
    await eventually(lambda: running, timeout=2.0)
    await eventually(lambda: running[0].publisher.table.version > 0, timeout=2.0)
    status, body = await get_json(base_url(running[0]) + "/v1/routes")
    assert status == 200 and "payments" in body["services"]
    assert fake_api.lists()[0].namespace == "shop"
    stop.set()
    assert await asyncio.wait_for(task, 5.0) == 0

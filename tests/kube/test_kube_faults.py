"""Controller faults: an API server that is not there yet, one that flaps, a controller that is killed.

The processes under test are real: ``python -m devstack router --kubernetes`` and ``python -m devstack
controller --kubernetes`` run as subprocesses configured by a KUBECONFIG file, exactly as an
operator starts them; the API server is the wire-protocol fake, bound to the port the kubeconfig
names. Every routing assertion is a real HTTP request through a router to an aiohttp upstream
that answers with its own name (addressed by the ``devstack.io/upstream`` annotation). Nothing
waits by sleeping except the flapping test's fixed observation window, which counts requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kubernetes import client as k8s

from controller.aggregator import Aggregator
from controller.sources.kubernetes import KubernetesSource, KubeSettings
from controller.sources.remote import remote_source
from router.server import RouterServer
from tests.kube.kube_fake_apiserver import FakeApiServer, Fault, FaultyApiServer, deployment, reserve_port
from tests.kube.kube_support import eventually, start_upstream

REPO = Path(__file__).resolve().parents[2]

STARTUP = 20.0
"""A cold ``python -m devstack`` imports the Kubernetes client (seconds of CPU); generous for shared CI."""
API_BACKOFF = 8.0
"""After a few failures the source waits 0.8 → 1.6 → 3.2 s (jittered 50-100 %) before the next list."""
FEED_BACKOFF = 12.0
"""A router retries a dead controller after 0 → 0.5 → 1 → 2 → 4 s (jittered), plus the restart itself."""


def _write_kubeconfig(directory: Path, server: str) -> Path:
    path = directory / "kubeconfig"
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "fake", "cluster": {"server": server}}],
                "users": [{"name": "dev", "user": {"token": "t0ken"}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "dev"}}],
                "current-context": "fake",
            }
        )
    )
    return path


class Process:
    """One ``python -m devstack ...`` subprocess, its output in a file the test can read."""

    def __init__(self, name: str, args: list[str], kubeconfig: Path, directory: Path) -> None:
        self.name = name
        self.args = args
        self.kubeconfig = kubeconfig
        self.log_path = directory / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
        env["KUBECONFIG"] = str(self.kubeconfig)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "devstack", *self.args, stdout=log, stderr=log, env=env, cwd=REPO
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def announced(self) -> list[str]:
        """The URLs of the listeners it announced at start-up (it is given port 0, so nothing can race it)."""

        def line() -> str | None:
            assert self.alive, f"{self.name} exited:\n{self.output()}"
            found = re.search(r"devstack (?:router|controller) .*", self.output())
            return found.group(0) if found else None

        announcement = await eventually(line, timeout=STARTUP, interval=0.05, what=f"{self.name} started")
        return [f"http://{address}" for address in re.findall(r"\d+\.\d+\.\d+\.\d+:\d+", announcement)]

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            await self.proc.wait()


class Processes:
    """Starts subprocesses for one test and kills every one of them at the end."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    async def start(self, name: str, args: list[str], kubeconfig: Path) -> Process:
        process = Process(name, args, kubeconfig, self.directory)
        self.started.append(process)
        await process.start()
        return process


@pytest.fixture
async def processes(tmp_path: Path) -> AsyncIterator[Processes]:
    made = Processes(tmp_path)
    try:
        yield made
    finally:
        for process in made.started:
            await process.kill()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # No keep-alive: the processes behind these URLs are killed and restarted under the test.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as made:
        yield made


@pytest.fixture
async def upstreams() -> AsyncIterator[dict[str, str]]:
    made: dict[str, str] = {}
    runners: list[web.AppRunner] = []
    for name in ("baseline", "alice", "alice-v2"):
        runner, url = await start_upstream(name)
        runners.append(runner)
        made[name] = url
    yield made
    for runner in runners:
        await runner.cleanup()


async def _get(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[int, str] | None:
    """(status, body) of one GET, or None while nothing answers on that address."""
    try:
        async with session.get(url, headers=headers or {}) as response:
            return response.status, await response.text()
    except (aiohttp.ClientError, OSError):
        return None


async def _get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any] | None:
    answer = await _get(session, url)
    return None if answer is None else (answer[0], json.loads(answer[1]))


async def _ask(session: aiohttp.ClientSession, proxy: str, key: str | None) -> str:
    """One request for service ``payments`` through the router at ``proxy``: the upstream's name, or the status."""
    headers = {"Host": "payments"}
    if key is not None:
        headers["baggage"] = f"devstack={key}"
    answer = await _get(session, f"{proxy}/checkout", headers)
    if answer is None:
        return "no answer"
    return answer[1] if answer[0] == 200 else str(answer[0])


async def _ready(session: aiohttp.ClientSession, admin: str) -> bool:
    got = await _get_json(session, f"{admin}/readyz")
    return got is not None and got[0] == 200


# --- 1. API server unreachable at start ------------------------------------------------------------


async def _unreachable_reported(session: aiohttp.ClientSession, process: Process, admin: str) -> dict[str, Any]:
    """Wait until ``process`` says in /readyz that its API server is unreachable; that 503 body.

    Also checks that it answers /healthz all along and keeps retrying (three failed lists).
    """

    async def healthy() -> tuple[int, str] | None:
        assert process.alive, f"{process.name} exited:\n{process.output()}"
        return await _get(session, f"{admin}/healthz")

    answer = await eventually(healthy, timeout=STARTUP, interval=0.05, what=f"{process.name} /healthz")
    assert answer[0] == 200, "alive and answering health checks with no API server"
    assert json.loads(answer[1])["status"] == "ok"

    async def not_ready_with_error() -> dict[str, Any] | None:
        got = await _get_json(session, f"{admin}/readyz")
        return got[1] if got is not None and got[0] == 503 and got[1].get("errors") else None

    body = await eventually(not_ready_with_error, timeout=5.0, interval=0.05, what="/readyz 503 with an error")
    # It keeps trying (the third list comes after the 0.4-0.8 s backoff) and stays up.
    await eventually(lambda: process.output().count(": failed (list:") >= 3, timeout=5.0, what="three failed lists")
    assert process.alive, process.output()
    assert await _get(session, f"{admin}/healthz") == answer
    return body


def _names(api: FaultyApiServer) -> str:
    """How the client's error names the API server's address (urllib3's connection pool)."""
    return f"host='127.0.0.1', port={api.port}"


@pytest.fixture
async def missing_api(upstreams: dict[str, str]) -> AsyncIterator[FaultyApiServer]:
    """An API server with one baseline, on a port that refuses connections until the test starts it."""
    api = FaultyApiServer(reserve_port())
    api.apply(deployment("payments", service="payments", upstream=upstreams["baseline"]))
    try:
        yield api
    finally:
        await api.close()


async def test_router_survives_an_unreachable_api_server_and_routes_once_it_appears(
    tmp_path: Path, processes: Processes, session: aiohttp.ClientSession, missing_api: FaultyApiServer
) -> None:
    args = ["router", "--kubernetes", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    router = await processes.start("router", args, _write_kubeconfig(tmp_path, missing_api.url))
    proxy, admin = await router.announced()
    before = await _unreachable_reported(session, router, admin)
    error = before["errors"]["kubernetes"]
    assert before["ready"] is False and before["version"] == 0
    # The last collection to fail is the one the error names: Deployments, route-group ConfigMaps or Services.
    assert re.match(r"(deployments|configmaps|services)/\*: list", error), error
    assert _names(missing_api) in error and "Connection refused" in error
    assert await _ask(session, proxy, None) == "404", "no table yet: nothing is routed"

    await missing_api.start()
    await eventually(lambda: _ready(session, admin), timeout=API_BACKOFF, interval=0.05, what="router ready")
    ready = await _get_json(session, f"{admin}/readyz")
    assert ready is not None and ready[1]["errors"] == {}, "the error clears once the list succeeds"
    answer = await _ask(session, proxy, None)
    assert answer == "baseline", f"{answer}; router output:\n{router.output()[-4000:]}"
    assert router.alive


async def test_controller_survives_an_unreachable_api_server_and_publishes_once_it_appears(
    tmp_path: Path,
    processes: Processes,
    session: aiohttp.ClientSession,
    missing_api: FaultyApiServer,
    upstreams: dict[str, str],
) -> None:
    args = ["controller", "--kubernetes", "--listen", "127.0.0.1:0"]
    controller = await processes.start("controller", args, _write_kubeconfig(tmp_path, missing_api.url))
    [base] = await controller.announced()
    before = await _unreachable_reported(session, controller, base)
    error = before["errors"]["kubernetes"]
    assert before["ready"] is False and before["version"] == 0
    assert _names(missing_api) in error and "Connection refused" in error
    assert before["watches"]["deployments/*"]["connected"] is False
    assert before["watches"]["deployments/*"]["last_outcome"] == "failed"

    await missing_api.start()
    await eventually(lambda: _ready(session, base), timeout=API_BACKOFF, interval=0.05, what="controller ready")
    got = await _get_json(session, f"{base}/v1/routes")
    assert got is not None and got[0] == 200
    assert got[1]["services"]["payments"]["baseline"] == upstreams["baseline"]
    assert controller.alive


# --- 2. API server flapping ------------------------------------------------------------------------

FLAPPING: tuple[Fault, ...] = ("close", "500", "close", "429")
"""Connections cut before any response byte, alternating with 500 and 429 that carry Retry-After: 1."""
WINDOW = 3.0
MIN_BACKOFF = KubeSettings().watch.backoff_initial / 2
"""The shortest non-immediate delay the production backoff can pick (jitter is 50-100 % of the base)."""


async def test_flapping_api_server_is_retried_with_backoff_and_recovers() -> None:
    api = FaultyApiServer(retry_after=1)
    upstream = "http://10.0.0.1:8080"
    api.apply(deployment("payments", service="payments", upstream=upstream))
    # Each collection (Deployments, route-group ConfigMaps, Services) flaps the same way and backs off on its own.
    kinds = ("deployments", "configmaps", "services")
    faults: dict[str, Iterator[Fault]] = {c: itertools.cycle(FLAPPING) for c in kinds}
    api.fault = lambda collection: next(faults[collection])
    await api.start()
    aggregator = Aggregator(["kubernetes"], lambda table: None)
    # The production settings: 0.8 s → 30 s jittered backoff; the Deployment collection's requests are counted.
    source = KubernetesSource(
        aggregator.update,
        aggregator.report_error,
        configuration=k8s.Configuration(host=api.url),
        settings=KubeSettings(),
    )
    task = asyncio.create_task(source.run(), name="flapping-source")
    try:
        # A fixed observation window, not a stand-in for a condition: we count what arrives in it.
        await asyncio.sleep(WINDOW)
        requests = [(at, fault) for at, fault, collection in api.faults if collection == "deployments"]
        assert aggregator.table.version == 0, "nothing is published from a server that never answered a list"
        assert re.match(r"(deployments|configmaps|services)/\*: list", aggregator.errors["kubernetes"])

        # No hot loop. The backoff allows attempts at 0, 0 (the one immediate retry), then after at
        # least 0.4, 0.8 and 1.6 s, and Retry-After stretches some of those to 1 s: at most 5
        # requests in 3 s. A refused or cut connection is never retried at once underneath.
        assert 3 <= len(requests) <= 5, requests
        for (before, fault), (after, _) in itertools.pairwise(requests[1:]):
            floor = 0.95 if fault != "close" else MIN_BACKOFF - 0.05
            assert after - before >= floor, f"{after - before:.2f}s after a {fault}: {requests}"
        assert requests[1][0] - requests[0][0] < 0.2, "the first retry is immediate"

        api.fault = None
        healthy_from = time.monotonic()
        await eventually(
            lambda: "payments" in aggregator.table.services and "kubernetes" not in aggregator.errors,
            timeout=API_BACKOFF,
            what="recovered once the server is healthy",
        )
        # The next attempt was already scheduled by the backoff; nothing after it waits longer.
        assert time.monotonic() - healthy_from < 6.4 + 0.5
        assert aggregator.table.services["payments"].baseline.url == upstream
        await eventually(lambda: api.open_watches == 3, what="watching again (Deployments, ConfigMaps, Services)")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await api.close()


# --- 3. the controller is killed ---------------------------------------------------------------------


class Router:
    """An in-process router composed as ``devstack router --routes-from URL`` composes it."""

    def __init__(self, feed: str) -> None:
        self.server = RouterServer(readiness=self._readiness)
        self.aggregator = Aggregator(["remote"], self.server.swap)
        self.task = asyncio.create_task(remote_source(feed)(self.aggregator), name="router-remote")

    def _readiness(self) -> tuple[bool, dict[str, Any]]:
        return (self.aggregator.ready and self.server.table.version > 0, {"errors": dict(self.aggregator.errors)})

    @property
    def proxy(self) -> str:
        return "http://{}:{}".format(*self.server.address)

    @property
    def admin(self) -> str:
        return "http://{}:{}".format(*self.server.admin_address)

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        await self.server.close(drain=0)


async def _all_answer(session: aiohttp.ClientSession, routers: list[Router], key: str | None, expected: str) -> bool:
    answers = [await _ask(session, router.proxy, key) for router in routers]
    return all(answer == expected for answer in answers)


async def test_routers_keep_serving_when_the_controller_is_killed_and_catch_up_after_restart(
    fake_api: FakeApiServer,
    tmp_path: Path,
    processes: Processes,
    session: aiohttp.ClientSession,
    upstreams: dict[str, str],
) -> None:
    fake_api.apply(deployment("payments", service="payments", upstream=upstreams["baseline"]))
    fake_api.apply(deployment("payments-alice", service="payments", key="alice", upstream=upstreams["alice"]))
    kubeconfig = _write_kubeconfig(tmp_path, fake_api.url)
    controller = await processes.start(
        "controller", ["controller", "--kubernetes", "--listen", "127.0.0.1:0"], kubeconfig
    )
    [feed] = await controller.announced()
    routers = [Router(feed) for _ in range(2)]
    try:
        for router in routers:
            await router.server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
        await eventually(
            lambda: _all_answer(session, routers, "alice", "alice"), timeout=STARTUP, interval=0.05, what="fed"
        )

        assert controller.proc is not None
        controller.proc.send_signal(signal.SIGKILL)
        assert await controller.proc.wait() == -signal.SIGKILL

        async def stale(router: Router) -> dict[str, Any] | None:
            got = await _get_json(session, f"{router.admin}/readyz")
            return got[1] if got is not None and "unreachable" in got[1]["errors"].get("remote", "") else None

        for router in routers:
            body = await eventually(lambda r=router: stale(r), timeout=5.0, what="staleness in /readyz")
            # Still ready: a sidecar that went unready whenever the controller restarts would take its
            # app out of service; the last table keeps working, and /readyz says how stale it is.
            assert body["ready"] is True
            assert feed in body["errors"]["remote"]
        assert await _all_answer(session, routers, "alice", "alice"), "the last table keeps routing the override"
        assert await _all_answer(session, routers, None, "baseline")
        assert await _all_answer(session, routers, "bob", "baseline")

        # A change while the controller is down, then a fresh controller on the same address.
        fake_api.apply(deployment("payments-alice", service="payments", key="alice", upstream=upstreams["alice-v2"]))
        # The same address: a Deployment's pod restarts behind the same Service.
        restarted = ["controller", "--kubernetes", "--listen", feed.removeprefix("http://")]
        await processes.start("controller-restarted", restarted, kubeconfig)
        await eventually(
            lambda: _all_answer(session, routers, "alice", "alice-v2"),
            timeout=STARTUP + FEED_BACKOFF,
            interval=0.05,
            what="both routers caught up with the change made while the controller was down",
        )

        async def fresh() -> bool:
            bodies = [await _get_json(session, f"{router.admin}/readyz") for router in routers]
            return all(got is not None and got[0] == 200 and got[1]["errors"] == {} for got in bodies)

        await eventually(fresh, what="staleness cleared")
        assert await _all_answer(session, routers, None, "baseline")
    finally:
        for router in routers:
            await router.close()

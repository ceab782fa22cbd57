"""``devstack router --workers N``: N proxy processes on one port, fed one table by one parent.

Each test runs the real command (``python -m devstack router --workers 2``) against aiohttp
origins on loopback and watches it only from outside: the proxy port, the admin listener
(``/readyz`` names each worker's pid and table version, ``/metrics`` counts each worker's
requests) and the command's stderr. Every wait is for a condition, bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from devstack.cli import _table_after_delta, _table_from_json, build_parser
from router.errors import Answer
from router.server import RouterServer
from router.stats import RouterStats
from router.table import EMPTY_TABLE, RouteTable
from router.workers import _Counts, _delta, _Follower, _frame, _report
from tests.cli_support import ROOT, occupied_port, run_devstack, user_error
from tests.support import Origin, free_port, make_table

WORKERS = 2
START_WITHIN = 30.0
"""Seconds for the parent and two fresh interpreters to import, bind and report on a busy host."""
FRESH_CONNECTIONS = 40
"""Requests sent each on its own connection; the kernel hashes each to a worker, so all of them
landing on one of two workers happens once in 2**39 runs."""
MANY_SERVICES = 2_000
"""A table whose whole JSON (about 200 kB) every change would otherwise cost, small enough to start fast."""


@dataclasses.dataclass
class Router:
    proc: asyncio.subprocess.Process
    port: int
    admin: int
    stderr: Path
    routes: Path
    session: aiohttp.ClientSession

    async def readyz(self) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"http://127.0.0.1:{self.admin}/readyz") as resp:
            body: dict[str, Any] = await resp.json()
            return resp.status, body

    async def pids(self) -> list[int]:
        _, body = await self.readyz()
        return [worker["pid"] for worker in body["workers"]]

    async def routes_version(self) -> int:
        async with self.session.get(f"http://127.0.0.1:{self.admin}/routes") as resp:
            version: int = (await resp.json())["version"]
            return version

    async def per_worker(self, metric: str) -> dict[str, float]:
        async with self.session.get(f"http://127.0.0.1:{self.admin}/metrics") as resp:
            text = await resp.text()
        pattern = rf'^{metric}\{{worker="(\d+)"\}} (\S+)$'
        return {worker: float(value) for worker, value in re.findall(pattern, text, re.MULTILINE)}

    async def table_updates(self) -> dict[tuple[str, str], float]:
        """(worker, "whole" or "delta") → route tables the parent sent that worker so."""
        async with self.session.get(f"http://127.0.0.1:{self.admin}/metrics") as resp:
            text = await resp.text()
        updates = {}
        for labels, value in re.findall(r"^devstack_worker_table_updates_total\{(.*)\} (\S+)$", text, re.MULTILINE):
            named = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            updates[(named["worker"], named["sent_as"])] = float(value)
        return updates

    async def ready_on(self, version: int) -> bool:
        status, body = await self.readyz()
        return status == 200 and body["version"] == version

    async def get(self, host: str, path: str = "/") -> tuple[int, dict[str, Any]]:
        """One request on a connection of its own, so the kernel picks a worker for it."""
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            url = f"http://127.0.0.1:{self.port}{path}"
            async with session.get(url, headers={"Host": host}) as resp:
                return resp.status, await resp.json()


async def until(condition: Callable[[], Any], timeout: float, what: str) -> None:
    """Poll an async ``condition`` until it holds; fail naming ``what`` after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError):
            if await condition():
                return
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


def route_file(services: dict[str, str]) -> str:
    lines = ["services:"]
    for name, url in services.items():
        lines += [f"  {name}:", f"    hosts: [{name}]", f"    baseline: {url}"]
    return "\n".join(lines) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Replace the route file as editors and ConfigMap updates do (a new inode, never half a file)."""
    staged = path.with_suffix(".new")
    staged.write_text(text)
    staged.replace(path)


@contextlib.asynccontextmanager
async def running_pool(tmp_path: Path, services: dict[str, str]) -> AsyncIterator[Router]:
    routes = tmp_path / "routes.yaml"
    routes.write_text(route_file(services))
    port, admin = free_port(), free_port()
    stderr = tmp_path / "stderr.log"
    with stderr.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devstack", "router", "--routes", str(routes), "--workers", str(WORKERS),
            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--log-level", "WARNING",
            "--access-log", "off", "--drain-timeout", "10",
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=log,
        )  # fmt: skip
    async with aiohttp.ClientSession() as session:
        router = Router(proc, port, admin, stderr, routes, session)
        try:

            async def ready() -> bool:
                status, _ = await router.readyz()
                return status == 200

            await until(ready, START_WITHIN, f"--workers {WORKERS} ready; stderr:\n{stderr.read_text()}")
            yield router
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)


@pytest.fixture
async def web_origin() -> AsyncIterator[Origin]:
    origin = Origin("web")
    await origin.start()
    yield origin
    await origin.close()


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")  # exited, not yet reaped


async def test_every_worker_is_a_child_of_the_router_and_serves(web_origin: Origin, tmp_path: Path) -> None:
    async with running_pool(tmp_path, {"web": web_origin.url}) as router:
        pids = await router.pids()
        assert len(set(pids)) == WORKERS
        assert all(parent_of(pid) == router.proc.pid for pid in pids)
        answers = await asyncio.gather(*(router.get("web") for _ in range(FRESH_CONNECTIONS)))
        assert {(status, body["origin"]) for status, body in answers} == {(200, "web")}
        served = await router.per_worker("devstack_worker_requests_total")
        assert sum(served.values()) == FRESH_CONNECTIONS
        assert len(served) == WORKERS and all(count > 0 for count in served.values()), served


async def test_a_table_change_reaches_every_worker_before_ready_says_so(web_origin: Origin, tmp_path: Path) -> None:
    second = Origin("second")
    await second.start()
    try:
        async with running_pool(tmp_path, {"web": web_origin.url}) as router:
            status, body = await router.readyz()
            assert status == 200 and body["version"] == 1
            held = body["workers"][1]["pid"]
            os.kill(held, signal.SIGSTOP)  # this worker cannot take the new table until it goes on
            try:
                write_atomically(router.routes, route_file({"web": web_origin.url, "second": second.url}))

                async def other_worker_has_v2() -> bool:
                    _, body = await router.readyz()
                    return bool(body["version"] == 2 and body["workers"][0]["version"] == 2)

                await until(other_worker_has_v2, 10, "the file change published and taken by worker 0")
                status, body = await router.readyz()
                assert (status, body["ready"]) == (503, False)
                assert [w["version"] for w in body["workers"]] == [2, 1]
            finally:
                os.kill(held, signal.SIGCONT)

            async def ready_on_v2() -> bool:
                status, body = await router.readyz()
                return status == 200 and body["version"] == 2

            await until(ready_on_v2, 10, "ready on v2 once the held worker took it")
            before = await router.per_worker("devstack_worker_requests_total")
            answers = await asyncio.gather(*(router.get("second") for _ in range(FRESH_CONNECTIONS)))
            assert {(status, body["origin"]) for status, body in answers} == {(200, "second")}
            after = await router.per_worker("devstack_worker_requests_total")
            assert all(after[w] > before[w] for w in before), (before, after)
            assert set((await router.per_worker("devstack_worker_route_table_version")).values()) == {2.0}
    finally:
        await second.close()


async def refused(port: int) -> bool:
    """Whether nothing accepts on ``port`` any more (every worker closed its listener)."""
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


async def test_sigterm_drains_every_worker_losing_no_request(tmp_path: Path) -> None:
    """A client loop's load, then every client with a request held by the origin; SIGTERM; the
    workers stop accepting; the origin answers; every held request completes. No client is left
    between requests when the signal comes, so each request either completed before it or was in
    flight through it: none may fail."""
    concurrency, before_term = 16, 200
    holding, release = asyncio.Event(), asyncio.Event()
    held = 0
    origin = Origin("web")

    async def maybe_held(_: web.Request) -> web.Response:
        nonlocal held
        if not holding.is_set():
            return web.json_response({"held": False})
        held += 1
        await release.wait()
        return web.json_response({"held": True})

    origin.handlers["/held"] = maybe_held
    await origin.start()
    completed: list[int] = []
    failures: list[BaseException] = []

    async def client(router: Router) -> None:
        while True:
            try:
                status, body = await router.get("web", "/held")
            except (TimeoutError, aiohttp.ClientError) as exc:
                failures.append(exc)
                return
            completed.append(status)
            if len(completed) >= before_term:
                holding.set()
            if body["held"]:
                return

    try:
        async with running_pool(tmp_path, {"web": origin.url}) as router:
            pids = await router.pids()
            clients = [asyncio.create_task(client(router), name=f"client-{i}") for i in range(concurrency)]

            async def every_client_held() -> bool:
                return held == concurrency or bool(failures)

            await until(every_client_held, 30, "every client's request held by the origin")
            assert failures == []
            router.proc.send_signal(signal.SIGTERM)
            await until(lambda: refused(router.port), 10, "every worker stopped accepting")
            release.set()
            await asyncio.wait_for(asyncio.gather(*clients), 10)
            assert failures == []
            assert len(completed) >= before_term + concurrency and set(completed) == {200}
            assert await asyncio.wait_for(router.proc.wait(), 20) == 0

            async def workers_gone() -> bool:
                return all(gone(pid) for pid in pids)

            await until(workers_gone, 5, "every worker exited with the parent")
    finally:
        release.set()
        await origin.close()


async def test_a_killed_worker_is_replaced_and_serves(web_origin: Origin, tmp_path: Path) -> None:
    async with running_pool(tmp_path, {"web": web_origin.url}) as router:
        killed = (await router.pids())[0]
        await asyncio.gather(*(router.get("web") for _ in range(FRESH_CONNECTIONS)))
        before = await router.per_worker("devstack_worker_requests_total")
        os.kill(killed, signal.SIGKILL)

        async def replaced_and_ready() -> bool:
            status, body = await router.readyz()
            pid = body["workers"][0]["pid"]
            return status == 200 and pid is not None and pid != killed

        await until(replaced_and_ready, START_WITHIN, "worker 0 replaced")
        answers = await asyncio.gather(*(router.get("web") for _ in range(FRESH_CONNECTIONS)))
        assert {status for status, _ in answers} == {200}
        after = await router.per_worker("devstack_worker_requests_total")
        # Counted before the kill stays counted, and the new process served some of the new ones.
        assert after["0"] > before["0"] and sum(after.values()) == 2 * FRESH_CONNECTIONS, (before, after)
        assert await router.per_worker("devstack_worker_restarts_total") == {"0": 1.0, "1": 0.0}
        lines = [line for line in router.stderr.read_text().splitlines() if "router worker" in line]
        assert len(lines) == 1 and f"pid {killed}" in lines[0] and "SIGKILL" in lines[0], lines


async def test_workers_do_not_outlive_a_killed_parent(web_origin: Origin, tmp_path: Path) -> None:
    async with running_pool(tmp_path, {"web": web_origin.url}) as router:
        pids = await router.pids()
        router.proc.kill()  # no drain message: each worker learns it from its channel's end
        await router.proc.wait()

        async def workers_gone() -> bool:
            return all(gone(pid) for pid in pids)

        await until(workers_gone, 10, "the orphaned workers exited")


def many_services(url: str) -> dict[str, str]:
    return {f"svc{number:04d}": url for number in range(MANY_SERVICES)}


def sent(whole: tuple[int, ...], delta: tuple[int, ...]) -> dict[tuple[str, str], float]:
    """What ``Router.table_updates`` reads when worker N was sent ``whole[N]`` and ``delta[N]`` tables."""
    return {
        **{(str(worker), "whole"): float(count) for worker, count in enumerate(whole)},
        **{(str(worker), "delta"): float(count) for worker, count in enumerate(delta)},
    }


async def test_a_one_service_change_reaches_every_worker_as_a_delta(web_origin: Origin, tmp_path: Path) -> None:
    second = Origin("second")
    await second.start()
    services = {**many_services(web_origin.url), "moved": web_origin.url, "doomed": web_origin.url}
    try:
        async with running_pool(tmp_path, services) as router:
            assert await router.table_updates() == sent(whole=(1, 1), delta=(0, 0))
            del services["doomed"]
            services["moved"] = second.url
            write_atomically(router.routes, route_file(services))
            await until(lambda: router.ready_on(2), 10, "every worker on v2")
            assert await router.table_updates() == sent(whole=(1, 1), delta=(1, 1))

            before = await router.per_worker("devstack_worker_requests_total")
            answers = await asyncio.gather(*(router.get("moved") for _ in range(FRESH_CONNECTIONS)))
            assert {(status, body["origin"]) for status, body in answers} == {(200, "second")}
            after = await router.per_worker("devstack_worker_requests_total")
            assert all(after[w] > before[w] for w in before), (before, after)
            answers = await asyncio.gather(*(router.get("doomed") for _ in range(FRESH_CONNECTIONS)))
            assert {(status, body["reason"]) for status, body in answers} == {(404, "no-route")}
    finally:
        await second.close()


async def test_a_restarted_worker_is_sent_the_whole_table_then_deltas(web_origin: Origin, tmp_path: Path) -> None:
    second = Origin("second")
    await second.start()
    services = {**many_services(web_origin.url), "moved": web_origin.url}
    try:
        async with running_pool(tmp_path, services) as router:
            services["added"] = web_origin.url
            write_atomically(router.routes, route_file(services))
            await until(lambda: router.ready_on(2), 10, "every worker on v2")
            killed = (await router.pids())[0]
            os.kill(killed, signal.SIGKILL)

            async def replaced_and_ready() -> bool:
                status, body = await router.readyz()
                pid = body["workers"][0]["pid"]
                return status == 200 and pid is not None and pid != killed

            await until(replaced_and_ready, START_WITHIN, "worker 0 replaced")
            assert await router.table_updates() == sent(whole=(2, 1), delta=(1, 1))
            services["moved"] = second.url
            write_atomically(router.routes, route_file(services))
            await until(lambda: router.ready_on(3), 10, "every worker on v3")
            assert await router.table_updates() == sent(whole=(2, 1), delta=(2, 2))

            before = await router.per_worker("devstack_worker_requests_total")
            answers = await asyncio.gather(*(router.get("moved") for _ in range(FRESH_CONNECTIONS)))
            assert {(status, body["origin"]) for status, body in answers} == {(200, "second")}
            after = await router.per_worker("devstack_worker_requests_total")
            assert all(after[w] > before[w] for w in before), (before, after)
    finally:
        await second.close()


def test_a_busy_port_is_one_line_naming_listen() -> None:
    with occupied_port() as port:
        result = run_devstack(
            "router", "--routes", str(ROOT / "examples" / "routes.yaml"), "--workers", "2",
            "--listen", f"127.0.0.1:{port}", "--admin", "127.0.0.1:0", "--access-log", "off",
        )  # fmt: skip
    assert result.returncode == 2
    assert user_error(result) == f"devstack: --listen 127.0.0.1:{port}: address already in use"


@pytest.mark.parametrize(("value", "expected"), [("1", 1), ("3", 3), ("auto", len(os.sched_getaffinity(0)))])
def test_workers_flag_counts_processes_or_usable_cpus(value: str, expected: int) -> None:
    args = build_parser().parse_args(["router", "--routes", "r.yaml", "--workers", value])
    assert args.workers == expected


def test_workers_flag_refuses_zero() -> None:
    result = run_devstack("router", "--routes", "r.yaml", "--workers", "0")
    assert result.returncode == 2
    assert "--workers: '0' is not a positive number or auto" in user_error(result)


def test_a_worker_reads_back_the_table_its_parent_sends() -> None:
    table = make_table(
        {
            "web": {
                "hosts": ["web.example"],
                "baseline": "http://127.0.0.1:9001",
                "overrides": {
                    "alice": "http://127.0.0.1:9101",
                    "bob": {"url": "http://127.0.0.1:9102", "ready": False},
                },
            }
        },
        version=7,
    )
    copy = _table_from_json(table.to_json())
    assert copy.version == 7 and copy.sources == table.sources and copy.same_routes(table)


def over_channel(message: dict[str, Any]) -> dict[str, Any]:
    """``message`` as the other end of a worker's channel reads it."""
    decoded: dict[str, Any] = json.loads(_frame(message)[4:])
    return decoded


def numbered(count: int, version: int, **moved: str) -> RouteTable:
    """Services ``svc0``… on ports 9000…, but for ``moved`` ones (name → baseline URL)."""
    specs = {f"svc{number}": {"baseline": f"http://127.0.0.1:{9000 + number}"} for number in range(count)}
    specs.update({name: {"baseline": url} for name, url in moved.items()})
    return make_table(specs, version=version)


def delta_read(previous: RouteTable, table: RouteTable) -> dict[str, Any]:
    """The parent's delta from ``previous`` to ``table`` as a worker reads it (failing if it sends the table whole)."""
    message = _delta(previous, table)
    assert message is not None
    return over_channel(message)


def following(table: RouteTable) -> tuple[RouterServer, _Follower]:
    """A worker's end of the table protocol, sent ``table`` whole as a new worker is."""
    server = RouterServer()
    follower = _Follower(server, _table_from_json, _table_after_delta)
    answer = follower.take(over_channel({"op": "table", "table": table.to_json()}))
    assert answer == {"op": "ack", "version": table.version}
    return server, follower


def test_a_worker_applies_a_delta_building_only_the_services_it_sets() -> None:
    before = numbered(10, 1)
    server, follower = following(before)
    held = server.table
    specs = {name: {"baseline": routes.baseline.url} for name, routes in before.services.items()}
    specs["svc3"] = {"baseline": "http://127.0.0.1:9999"}
    del specs["svc7"]
    specs["added"] = {"baseline": "http://127.0.0.1:9998", "hosts": ["added.example"]}
    after = make_table(specs, version=2)  # every Routes built again, as a route file's reload does
    delta = _delta(before, after)
    assert delta is not None and sorted(delta["set"]) == ["added", "svc3"] and delta["removed"] == ["svc7"]
    assert follower.take(over_channel(delta)) == {"op": "ack", "version": 2}
    table = server.table
    assert table.version == 2 and table.sources == after.sources and table.same_routes(after)
    assert table.service_for_authority("added.example") == "added"
    shared = [name for name in table.services if name not in ("svc3", "added")]
    assert all(table.services[name] is held.services[name] for name in shared)


def test_a_change_to_more_than_half_the_services_is_sent_whole() -> None:
    before = numbered(10, 1)
    half = {f"svc{number}": f"http://127.0.0.1:{8000 + number}" for number in range(5)}
    assert _delta(before, numbered(10, 2, **half)) is not None
    assert _delta(before, numbered(10, 2, **half, svc5="http://127.0.0.1:8005")) is None


def test_the_first_table_is_sent_whole() -> None:
    assert _delta(EMPTY_TABLE, numbered(1, 1)) is None


@pytest.mark.parametrize(
    ("start", "removed"), [(2, []), (1, ["nowhere"])], ids=["from-another-version", "removing-an-unknown-service"]
)
def test_a_delta_that_does_not_fit_the_held_table_asks_for_the_whole_table(start: int, removed: list[str]) -> None:
    server, follower = following(numbered(3, 1))
    held = server.table
    delta = {
        "op": "delta",
        "from": start,
        "version": 3,
        "sources": ["test"],
        "groups": {},
        "set": {},
        "removed": removed,
    }
    assert follower.take(over_channel(delta)) == {"op": "resync", "version": 1}
    assert server.table is held


def test_a_worker_that_asked_for_the_whole_table_drops_deltas_until_it_comes() -> None:
    server, follower = following(numbered(3, 1))
    v2, v3, v4, v5 = (numbered(3, version, svc0=f"http://127.0.0.1:{8000 + version}") for version in (2, 3, 4, 5))
    assert follower.take(delta_read(v2, v3)) == {"op": "resync", "version": 1}
    assert follower.take(delta_read(v3, v4)) is None  # sent before the parent read the resync
    assert server.table.version == 1
    assert follower.take(over_channel({"op": "table", "table": v4.to_json()})) == {"op": "ack", "version": 4}
    assert follower.take(delta_read(v4, v5)) == {"op": "ack", "version": 5}
    assert server.table.same_routes(v5)


def test_counters_added_over_reports_equal_the_sum_and_gauges_only_of_live_workers() -> None:
    stats = RouterStats()
    stats.requests[("web", "baseline")] = 3
    stats.rejected[Answer.NO_HOST] = 2
    stats.observe_duration(("web", "baseline"), 0.002)
    stats.open_connections = 5
    report = _report(stats, 4, 1, 0.5)
    total = _Counts()
    total.add(report, gauges=True)
    total.add(report, gauges=False)  # an exited worker's last report: counted, holding no connection
    assert total.stats.requests == {("web", "baseline"): 6}
    assert total.stats.rejected == {Answer.NO_HOST: 4}
    assert sum(total.stats.durations[("web", "baseline")].counts) == 2
    assert total.stats.open_connections == 5
    assert (total.access_log_lines, total.access_log_dropped, total.cpu_seconds) == (8, 2, 1.0)

"""End to end on loopback, every part a real process: the routing key and the trace survive a chain
of three services on three frameworks, each calling the next through its own sidecar router.

    test ──► edge router ──► hop1 (aiohttp) ──► sidecar ──► hop2 (WSGI) ──► sidecar ──► hop3 (ASGI)
             (ingress,        SDK middleware,    (router,     wsgiref,         (router,    uvicorn,
              Host: hop1)     client_session     --mode       urllib +         --mode      publishes a
                              trust_env=True     sidecar)     inject()         sidecar)    message
                                                                                                │
                                            baseline worker / alice's worker ◄── extract() ◄────┘

hop2 and hop3 each run as a baseline and as alice's override (the same app with ``VERSION=alice``);
hop1 has only a baseline. Services reach each other only by names the routers resolve (``hop2``,
``hop3``) through ``HTTP_PROXY``, as pods with a sidecar do. Each service reports its version, the
context the SDK extracted and the propagation headers it received, plus its downstream's report.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from propagation.propagators import parse_baggage
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]
STARTUP_DEADLINE = 20.0

CHAIN = (
    # (service, module in tests/e2e_services, downstream URL, versions)
    ("hop1", "aiohttp_service", "http://hop2/charge", ("baseline",)),
    ("hop2", "wsgi_service", "http://hop3/charge", ("baseline", "alice")),
    ("hop3", "asgi_service", "", ("baseline", "alice")),
)
OVERRIDE_KEYS = ("alice",)

# Proxy variables of the machine running the tests must not leak into the pods' environment.
_DROPPED_ENV = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "request_method"}


def pod_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() not in _DROPPED_ENV and not k.startswith("OTEL_")}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


class Stack:
    """Processes started for one test, with their logs; ``close`` ends every one of them."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: list[tuple[str, asyncio.subprocess.Process]] = []

    def log_of(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    async def spawn(
        self, name: str, args: Sequence[str], env: dict[str, str], *, fds: Sequence[int] = (), stdio: bool = False
    ) -> asyncio.subprocess.Process:
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, *args, env=env, pass_fds=tuple(fds), stderr=log,
                stdin=asyncio.subprocess.PIPE if stdio else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE if stdio else asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        self.procs.append((name, proc))
        return proc

    async def wait_ready(self, name: str, proc: asyncio.subprocess.Process, url: str) -> None:
        """Polls ``url`` until it answers 200; fails early, with the log, if the process exits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STARTUP_DEADLINE
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
            while True:
                assert proc.returncode is None, f"{name} exited with {proc.returncode}:\n{self.log_of(name)}"
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            return
                assert loop.time() < deadline, f"{name} not ready at {url}:\n{self.log_of(name)}"
                await asyncio.sleep(0.05)

    async def close(self) -> None:
        for _, proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()

        async def reap(proc: asyncio.subprocess.Process) -> None:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

        await asyncio.gather(*(reap(proc) for _, proc in self.procs))


def listening_socket() -> socket.socket:
    """A socket bound and listening on loopback, handed to a service process: no port race."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def routes_yaml(ports: dict[tuple[str, str], int]) -> str:
    lines = ["services:"]
    for service, _, _, versions in CHAIN:
        lines += [
            f"  {service}:",
            f"    hosts: [{service}]",
            f"    baseline: http://127.0.0.1:{ports[service, 'baseline']}",
        ]
        overrides = [v for v in versions if v != "baseline"]
        if overrides:
            lines.append("    overrides:")
            lines += [f"      {key}: {{url: http://127.0.0.1:{ports[service, key]}}}" for key in overrides]
    return "\n".join(lines) + "\n"


class Worker:
    """A queue consumer process fed one message per line."""

    def __init__(self, version: str, proc: asyncio.subprocess.Process) -> None:
        self.version = version
        self.proc = proc

    async def offer(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(message).encode() + b"\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 10)
        assert line, f"worker {self.version} exited"
        answer: dict[str, Any] = json.loads(line)
        return answer


@contextlib.asynccontextmanager
async def running_stack(tmp_path: Path) -> AsyncIterator[tuple[int, list[Worker]]]:
    """Starts routers, services and workers; yields (edge router port, workers) once all are ready."""
    stack = Stack(tmp_path)
    sockets = {(service, v): listening_socket() for service, _, _, versions in CHAIN for v in versions}
    ports = {name: sock.getsockname()[1] for name, sock in sockets.items()}
    routes = tmp_path / "routes.yaml"
    routes.write_text(routes_yaml(ports))
    workers: list[Worker] = []
    readiness: list[asyncio.Task[None]] = []
    try:

        async def router(name: str, mode: str) -> int:
            port, admin = free_port(), free_port()
            args = ["-m", "devstack", "router", "--routes", str(routes), "--mode", mode, "--log-level", "WARNING",
                    "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]  # fmt: skip
            proc = await stack.spawn(name, args, pod_env())
            readiness.append(asyncio.create_task(stack.wait_ready(name, proc, f"http://127.0.0.1:{admin}/readyz")))
            return port

        edge = await router("edge", "ingress")
        for service, module, downstream, versions in CHAIN:
            for version in versions:
                name = f"{service}-{version}"
                env = pod_env(SERVICE=service, VERSION=version, LISTEN_FD=str(sockets[service, version].fileno()))
                if downstream:
                    sidecar = await router(f"{name}-sidecar", "sidecar")
                    env.update(DOWNSTREAM=downstream, HTTP_PROXY=f"http://127.0.0.1:{sidecar}")
                proc = await stack.spawn(
                    name, ["-m", f"tests.e2e_services.{module}"], env, fds=[sockets[service, version].fileno()]
                )
                url = f"http://127.0.0.1:{ports[service, version]}/healthz"
                readiness.append(asyncio.create_task(stack.wait_ready(name, proc, url)))
        for sock in sockets.values():
            sock.close()  # the services hold their own copies
        for version in ("baseline", *OVERRIDE_KEYS):
            env = pod_env(SERVICE="worker", VERSION=version, OVERRIDE_KEYS=",".join(OVERRIDE_KEYS))
            proc = await stack.spawn(f"worker-{version}", ["-m", "tests.e2e_services.worker"], env, stdio=True)
            workers.append(Worker(version, proc))
        await asyncio.gather(*readiness)
        yield edge, workers
    finally:
        for task in readiness:
            task.cancel()
        await asyncio.gather(*readiness, return_exceptions=True)
        for sock in sockets.values():
            sock.close()
        for worker in workers:
            if worker.proc.stdin is not None:
                worker.proc.stdin.close()
        await stack.close()


def members(header_value: str) -> dict[str, list[Any]]:
    return {m.name: [m.value, list(m.properties)] for m in parse_baggage([header_value])}


ALICE_MEMBERS = {
    "userId": ["u1", []],
    "devstack": ["alice", ["ttl=30"]],
    "region": ["eu", []],
    "note": ["café au+lait", []],
}

CASES = [
    # (id, baggage lines sent, routing key at every hop, version of hop2/hop3, members at every hop)
    ("no-baggage", [], None, "baseline", {}),
    ("alice", ["devstack=alice"], "alice", "alice", {"devstack": ["alice", []]}),
    ("bob", ["devstack=bob"], "bob", "baseline", {"devstack": ["bob", []]}),
    (
        "alice-with-members",
        ["userId=u1,devstack=alice;ttl=30,region=eu,note=caf%C3%A9%20au+lait"],
        "alice",
        "alice",
        ALICE_MEMBERS,
    ),
    ("two-lines", ["userId=u1,region=eu", "devstack=alice;ttl=30,note=caf%C3%A9%20au+lait"], "alice", "alice",
     ALICE_MEMBERS),
    # The first duplicate wins, in the routers and in the SDK alike: bob, so baseline everywhere.
    ("duplicate-across-lines", ["devstack=bob,userId=u1", "devstack=alice"], "bob", "baseline",
     {"devstack": ["bob", []], "userId": ["u1", []]}),
]  # fmt: skip


def walk(report: dict[str, Any]) -> list[dict[str, Any]]:
    hops = []
    node: Any = report
    while node is not None:
        assert "service" in node, f"a hop failed: {node}"
        hops.append(node)
        node = node["downstream"]
    return hops


@pytest.mark.timeout(60)
async def test_key_and_trace_survive_three_frameworks_and_a_queue(tmp_path: Path) -> None:
    async with running_stack(tmp_path) as (edge, workers):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            for n, (case, lines, key, override_version, expected_members) in enumerate(CASES, start=1):
                trace_id = f"{n:032x}"
                traceparent = f"00-{trace_id}-{n:016x}-01"
                tracestate = f"vendor=v{n}"
                headers = [("Host", "hop1"), ("traceparent", traceparent), ("tracestate", tracestate)]
                headers += [("baggage", line) for line in lines]
                async with session.get(f"http://127.0.0.1:{edge}/checkout", headers=headers) as resp:
                    assert resp.status == 200, (case, await resp.text())
                    hops = walk(await resp.json())

                served = [(hop["service"], hop["version"]) for hop in hops]
                assert served == [("hop1", "baseline"), ("hop2", override_version), ("hop3", override_version)], case
                for hop in hops:
                    where = (case, hop["service"])
                    # The SDK extracted the same trace and the same key at every hop ...
                    assert hop["trace_id"] == trace_id, where
                    assert hop["routing_key"] == key, where
                    assert hop["members"] == expected_members, where
                    # ... from exactly one traceparent line naming that trace.
                    assert [tp.split("-")[1] for tp in hop["headers"]["traceparent"]] == [trace_id], where
                    assert hop["headers"]["tracestate"] == [tracestate], where
                # Every hop after the first was reached through a router, by the name only routers resolve.
                assert [hop["headers"]["x-forwarded-host"] for hop in hops[1:]] == [["hop2"], ["hop3"]], case
                # The raw baggage arriving at the last hop carries every member unchanged (the SDK puts
                # the routing member first and re-encodes, so compare the parsed members).
                last = hops[-1]["headers"]["baggage"]
                assert members(",".join(last)) == expected_members, (case, last)
                assert members(",".join(lines)) == expected_members, case  # what was sent, same reading

                # Queue hop: the message hop3 published goes to every worker; exactly the right one takes it.
                message = hops[-1]["published"]
                answers = {worker.version: await worker.offer(message) for worker in workers}
                taker = "alice" if key == "alice" else "baseline"
                assert {v for v, a in answers.items() if a["taken"]} == {taker}, (case, answers)
                taken = answers[taker]
                assert taken["routing_key"] == key, case
                assert taken["trace_id"] == trace_id, case
                assert taken["members"] == expected_members, case
                assert taken["body"] == {"event": "charged", "by": f"hop3 [{override_version}]"}, case

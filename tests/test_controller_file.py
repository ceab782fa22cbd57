"""The controller without a cluster: ``devstack controller --routes FILE`` feeds routers on a laptop.

Real processes on loopback: a controller serving a route file, a router following it with
``--routes-from``, and echo origins in the test. A request routes as the file says, and rewriting
the file changes routing through the controller, with no Kubernetes anywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import aiohttp

from tests.cli_support import devstack_env
from tests.kube.kube_support import eventually
from tests.support import Origin, free_port


def _routes(baseline: str, alice: str) -> str:
    return (
        f"services:\n  payments:\n    baseline: {baseline}\n    overrides:\n      alice: {{url: {alice}}}\n"
        "  users:\n    protocol: h2c\n    baseline: http://127.0.0.1:9\n"
    )


@contextlib.asynccontextmanager
async def _devstack(log: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``devstack ARGS`` running until the block ends; its stderr goes to ``log`` for diagnosis."""
    with log.open("wb") as sink:
        stderr: IO[bytes] = sink
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "devstack", *args,
            stdout=asyncio.subprocess.DEVNULL, stderr=stderr, env=devstack_env(),
        )  # fmt: skip
        try:
            yield proc
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)


async def _ready(session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process, log: Path) -> bool:
    assert proc.returncode is None, f"exited {proc.returncode}: {log.read_text()}"
    with contextlib.suppress(aiohttp.ClientError):
        async with session.get(url) as response:
            return response.status == 200
    return False


async def _origin_for(session: aiohttp.ClientSession, port: int, **headers: str) -> Any:
    async with session.get(f"http://127.0.0.1:{port}/", headers={"Host": "payments", **headers}) as response:
        assert response.status == 200, await response.text()
        return (await response.json())["origin"]


async def test_routers_follow_a_controller_serving_a_route_file(tmp_path: Path, origins: dict[str, Origin]) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text(_routes(origins["baseline"].url, origins["alice"].url))
    controller_port, proxy_port, admin_port = free_port(), free_port(), free_port()
    controller_log, router_log = tmp_path / "controller.log", tmp_path / "router.log"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
        _devstack(
            controller_log, "controller", "--routes", str(routes), "--listen", f"127.0.0.1:{controller_port}"
        ) as controller,
    ):
        await eventually(
            lambda: _ready(session, f"http://127.0.0.1:{controller_port}/readyz", controller, controller_log),
            timeout=30,
            interval=0.1,
            what="controller ready",
        )
        async with _devstack(
            router_log, "router", "--routes-from", f"http://127.0.0.1:{controller_port}",
            "--listen", f"127.0.0.1:{proxy_port}", "--admin", f"127.0.0.1:{admin_port}", "--access-log", "off",
        ) as router:  # fmt: skip
            await eventually(
                lambda: _ready(session, f"http://127.0.0.1:{admin_port}/readyz", router, router_log),
                timeout=30,
                interval=0.1,
                what="router ready",
            )
            assert await _origin_for(session, proxy_port, baggage="devstack=alice") == "alice"
            assert await _origin_for(session, proxy_port) == "baseline"
            async with session.get(f"http://127.0.0.1:{admin_port}/routes") as response:
                services = (await response.json())["services"]
            assert services["users"]["protocol"] == "h2c", "the router got the protocol through the feed"
            assert "protocol" not in services["payments"]

            routes.write_text(_routes(origins["baseline"].url, origins["bob"].url))

            async def alice_reaches_bob() -> bool:
                return bool(await _origin_for(session, proxy_port, baggage="devstack=alice") == "bob")

            await eventually(alice_reaches_bob, timeout=15, interval=0.1, what="the rewritten file routes")
            assert await _origin_for(session, proxy_port) == "baseline"
    assert "serving " + str(routes) in controller_log.read_text()

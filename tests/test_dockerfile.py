"""The Dockerfile lints clean with hadolint, keeps the promises the README makes, pins its base
image, and its one HEALTHCHECK works for both the router and the controller."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = shutil.which("hadolint") or str(Path(__file__).resolve().parents[1] / ".venv" / "bin" / "hadolint")


def run_hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([HADOLINT, "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_dockerfile_passes_hadolint() -> None:
    result = run_hadolint(ROOT / "Dockerfile")
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_reject_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get install curl\nRUN cd /tmp && ls\n")
    result = run_hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the 'latest' tag


@pytest.mark.parametrize(
    "promise",
    ["USER 10001", 'ENTRYPOINT ["devstack"]', "HEALTHCHECK", "/healthz", "EXPOSE 8080 9901"],
)
def test_dockerfile_promises(promise: str) -> None:
    assert promise in (ROOT / "Dockerfile").read_text()


def _instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_base_image_is_pinned_by_digest_with_the_reason_beside_it() -> None:
    images = [line.split()[1] for line in _instructions() if line.startswith("FROM ")]
    assert len(images) == 2 and len(set(images)) == 1, "both stages should build on the one pinned image"
    assert re.fullmatch(r"python:3\.11-slim-bookworm@sha256:[0-9a-f]{64}", images[0]), images[0]
    text = (ROOT / "Dockerfile").read_text()
    head = text[: text.index("FROM ")]
    assert "pinned by digest" in head and "reproducible" in head
    assert "docker buildx imagetools inspect python:3.11-slim-bookworm" in head


def _healthcheck() -> tuple[list[str], str]:
    """The HEALTHCHECK's exec-form command and the default of its port list (its ENV line)."""
    [line] = [line for line in _instructions() if line.startswith("HEALTHCHECK ")]
    command = json.loads(line[line.index(" CMD ") + len(" CMD ") :])
    [env] = [line for line in _instructions() if line.startswith("ENV DEVSTACK_HEALTHCHECK_PORTS=")]
    return command, env.partition("=")[2].strip('"')


def test_healthcheck_defaults_to_the_router_and_controller_ports() -> None:
    from controller.cli import DEFAULT_LISTEN
    from devstack.cli import DEFAULT_ADMIN

    command, ports = _healthcheck()
    assert command[:2] == ["python", "-c"]  # no curl or wget in a slim image
    assert f"'{ports}'" in command[2], "the code's own default differs from the ENV line"
    assert ports.split() == [DEFAULT_ADMIN.rpartition(":")[2], DEFAULT_LISTEN.rpartition(":")[2]]
    # The image's default command (the router) puts its admin listener on the first of them.
    [cmd] = [line for line in _instructions() if line.startswith("CMD ")]
    assert "0.0.0.0:" + ports.split()[0] in json.loads(cmd[len("CMD ") :])


async def _serve(app: web.Application, stack: contextlib.AsyncExitStack) -> int:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return int(runner.addresses[0][1])


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("listening", "healthy"),
    [
        (["router"], True),
        (["controller"], True),
        (["closed", "controller"], True),  # a controller container: nothing on the router's port
        (["router", "controller"], True),
        (["closed"], False),
        (["unhealthy"], False),
        (["unhealthy", "controller"], True),  # any port that answers 200 will do
    ],
)
async def test_one_healthcheck_serves_the_router_and_the_controller(listening: list[str], healthy: bool) -> None:
    """The HEALTHCHECK's own code against the real router admin and controller apps on loopback."""
    from controller.publish import RoutePublisher, make_publish_app
    from router.admin import AdminState, make_admin_app
    from router.stats import RouterStats
    from router.table import EMPTY_TABLE

    async def unhealthy(_: web.Request) -> web.Response:
        return web.Response(status=503)

    sick = web.Application()
    sick.router.add_get("/healthz", unhealthy)
    apps = {
        # Not ready (no table yet) but alive: the Docker health check is liveness, like /healthz.
        "router": make_admin_app(AdminState(lambda: EMPTY_TABLE, RouterStats(), lambda: (False, {}))),
        "controller": make_publish_app(RoutePublisher(), readiness=lambda: (False, {})),
        "unhealthy": sick,
    }
    command, _ = _healthcheck()
    async with contextlib.AsyncExitStack() as stack:
        ports = [str(_closed_port() if name == "closed" else await _serve(apps[name], stack)) for name in listening]
        # A proxy in the environment (a dead one here) must not capture the loopback check.
        proxy = f"http://127.0.0.1:{_closed_port()}"
        env = {**os.environ, "HTTP_PROXY": proxy, "http_proxy": proxy, "DEVSTACK_HEALTHCHECK_PORTS": " ".join(ports)}
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        process = await asyncio.create_subprocess_exec(sys.executable, *command[1:], env=env)
        code = await asyncio.wait_for(process.wait(), timeout=30)
    assert (code == 0) is healthy, code

"""Logging that tells the truth, checked against real components.

Logger names follow the modules; a route file rewritten bad and then good logs the rejection and
then the recovery; a controller feed on a closed loopback port logs one warning per outage (with
its retry schedule), DEBUG for the retries, and how long it was down once a real controller
answers; the demo's start line names the hot-path mode exactly as the router's does.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import logging
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import router
from controller.aggregator import Aggregator
from controller.cli import Controller
from controller.sources.file import FileSource
from controller.sources.remote import RemoteSettings, RemoteSource
from tests.cli_support import LOOPBACK_ANY, ROOT, devstack_env
from tests.kube.kube_support import eventually
from tests.support import free_port

GOOD = "services:\n  payments:\n    baseline: http://127.0.0.1:9001\n"
QUICK = RemoteSettings(connect_timeout=0.5, idle_timeout=2.0, backoff_initial=0.05, backoff_max=0.2)


def _logger_arguments(package: str) -> list[tuple[str, str]]:
    """(module path, source text of the argument) for every ``logging.getLogger(...)`` in ``package``."""
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "getLogger"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "logging"
            ):
                argument = ast.unparse(node.args[0]) if node.args else "<root>"
                found.append((str(path.relative_to(ROOT)), argument))
    return found


@pytest.mark.parametrize("package", ["devstack", "controller", "examples"])
def test_logger_names_follow_the_modules(package: str) -> None:
    loggers = _logger_arguments(package)
    assert loggers, f"no logger found under {package}/"
    assert [(path, arg) for path, arg in loggers if arg != "__name__"] == []


async def test_a_rejected_route_file_that_is_fixed_logs_the_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="controller")
    path = tmp_path / "routes.yaml"
    path.write_text(GOOD)
    aggregator = Aggregator(["file"], lambda table: None)
    source = FileSource(path, aggregator.update, aggregator.report_error, interval=0.05)
    task = asyncio.create_task(source.run(), name="file-source-under-test")
    try:
        await eventually(lambda: aggregator.table.version == 1, timeout=5)
        for count, bad in enumerate(("services: [", "services:\n  payments: {baseline: ftp://x}\n"), 1):
            path.write_text(bad)
            source.reload()
            await eventually(lambda count=count: aggregator.rejected.get("file") == count, timeout=5)
        path.write_text(GOOD.replace("9001", "9002"))
        await eventually(lambda: aggregator.table.version == 2, timeout=5)
    finally:
        task.cancel()
    records = [r for r in caplog.records if r.name == "controller.aggregator"]
    assert [r.levelno for r in records].count(logging.ERROR) == 2
    recovery = [r.getMessage() for r in records if "accepted again" in r.getMessage()]
    assert recovery == ["file: update accepted again after 2 rejected (table v2)"]
    assert records[-1].getMessage() == recovery[0], "logged once the fixed table is in place"


@contextlib.asynccontextmanager
async def _following(url: str) -> AsyncIterator[tuple[RemoteSource, Aggregator]]:
    aggregator = Aggregator(["remote"], lambda table: None)
    source = RemoteSource(url, aggregator.update, aggregator.report_error, settings=QUICK)
    task = asyncio.create_task(source.run(), name="remote-source-under-test")
    try:
        yield source, aggregator
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_an_unreachable_feed_logs_once_per_outage_and_the_reconnection(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="controller")
    routes = tmp_path / "routes.yaml"
    routes.write_text(GOOD)
    listen = f"127.0.0.1:{free_port()}"  # nothing listens here until the controller starts
    async with _following(f"http://{listen}") as (source, aggregator):
        await eventually(lambda: source.failures >= 4, timeout=10)
        remote = [r for r in caplog.records if r.name == "controller.sources.remote"]
        warnings = [r.getMessage() for r in remote if r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert f"controller feed http://{listen} down (" in warnings[0]
        assert "no table received yet; retrying at once, backing off to 0.2s" in warnings[0]
        assert sum("still down" in r.getMessage() for r in remote if r.levelno == logging.DEBUG) >= 3
        assert "unreachable" in aggregator.errors["remote"], "still reported for /readyz"
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "an outage is no rejected update"

        controller = Controller(routes=routes, listen=listen)
        await controller.start()
        try:
            await eventually(lambda: "payments" in aggregator.table.services, timeout=10)
            back = [r.getMessage() for r in caplog.records if "back after" in r.getMessage()]
            assert len(back) == 1 and back[0].startswith(f"controller feed http://{listen} back after "), back
            assert re.search(r"back after \d+\.\ds down \(\d+ failed attempts\)$", back[0]), back[0]
            assert "remote" not in aggregator.errors
            warned = len([r for r in caplog.records if r.levelno == logging.WARNING])
        finally:
            await controller.close()

        await eventually(lambda: source.failures >= 3, timeout=10)
        second = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING][warned:]
        assert len(second) == 1, "one warning for the second outage too"
        assert "serving controller table v1 received" in second[0]


async def _start_line(*args: str, pattern: str) -> re.Match[str]:
    """Start ``devstack ARGS``, read stderr until ``pattern`` matches a line, then stop it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "devstack", *args,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, env=devstack_env(),
    )  # fmt: skip
    assert proc.stderr is not None
    seen = b""
    try:
        while True:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, f"exited before its start line: {seen.decode()}"
            seen += line
            found = re.search(pattern, line.decode())
            if found:
                return found
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)


async def test_the_demo_logs_its_hot_path_mode_like_the_router() -> None:
    routes = str(ROOT / "examples" / "routes.yaml")
    router_line = await _start_line(
        "router", "--routes", routes, "--listen", LOOPBACK_ANY, "--admin", LOOPBACK_ANY, "--access-log", "off",
        pattern=r"INFO devstack\.cli: devstack router .* table v1, hot path (.+)$",
    )  # fmt: skip
    demo_line = await _start_line(
        "demo", "--listen", LOOPBACK_ANY, "--admin", LOOPBACK_ANY,
        pattern=r"INFO devstack_examples\.demo: devstack demo: router on .* table v1, hot path (.+)$",
    )  # fmt: skip
    assert demo_line.group(1) == router_line.group(1) == router.HOT_PATH_MODE

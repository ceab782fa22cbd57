"""A small sidecar (issue #17): ``devstack router --mode sidecar --routes-from URL`` in its own
process, following a real ``devstack controller --routes FILE`` process on loopback.

It routes by key once the feed arrives and follows edits made on the controller's side, on uvloop
and on asyncio's own loop (``--loop asyncio``); its admin listener is the lite one
(``router.liteadmin``: readiness, Prometheus text) and the process never imports aiohttp,
prometheus_client, PyYAML, the Kubernetes client, OpenTelemetry or h2, nor the standard modules
it has no use for, which ``python -X importtime`` (one stderr line per module imported, at any
time) lets us see from outside; and it stays small while idle. The lite metrics are checked byte
for byte against what prometheus_client writes for the same counters, and the feed transport
against a real controller.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller.publish import RoutePublisher, make_publish_app
from controller.sources.feedhttp import FeedClient
from controller.sources.remote import DELTA_PATH, FEED_HEADERS, feed_url
from router.accesslog import AccessLog
from router.admin import AdminState, _RouterCollector
from router.errors import Answer
from router.liteadmin import exposition, router_families
from router.stats import RouterStats
from tests.cli_support import devstack_env, run_devstack, user_error
from tests.kube.kube_support import eventually
from tests.support import Origin, free_port, make_table, memory_kib

STARTUP = 20.0
"""Seconds for two interpreters to start and the feed to arrive, on a loaded two-core machine."""
FOLLOW = 10.0
"""The controller polls its file every second and the feed pushes at once: a few seconds at most."""
IDLE_RSS_MIB = {"asyncio": 25.5, "uvloop": 28.0}
"""What a lite sidecar following a one-service feed may keep resident (VmRSS) while idle, by
``--loop``. Issue #17 asks for 25 MiB. Measured here (x86-64, Python 3.11, OpenSSL 3.0, with -X
importtime): 27.4 MiB on uvloop (29.5 before h2, hashlib, datetime and random became lazy or
unused), 24.9 on asyncio's loop (uvloop's module, libuv and buffers are 2.5). Of the 24.9, about
21 is the interpreter with what asyncio imports in any program (ssl with OpenSSL alone is 4.8),
logging, argparse, ctypes and json; the rest is ours: the compiled hot path (1.4), httptools and
our modules. Each bound leaves half a MiB (2%) for another host's Python and OpenSSL builds."""
HEAVY = (
    "aiohttp", "prometheus_client", "yaml", "kubernetes", "opentelemetry", "multidict", "yarl",
    "h2", "hpack", "hyperframe",
)  # fmt: skip
"""Top-level packages a lite sidecar must not import (multidict and yarl come only with aiohttp;
h2 only with the h2 engine, loaded by the first HTTP/2 connection and only where libnghttp2 is
missing or ``--http2-engine h2``)."""
UNUSED_STDLIB = ("datetime", "hashlib", "_hashlib", "random")
"""Standard modules it has no use for, each 0.2-0.7 MiB resident: datetime parses expiry times
written in route files (a feed sends numbers), hashlib would load OpenSSL's digests for the
stale-build check, random would seed a generator for reconnect jitter."""
ASYNCIO_UNUSED = ("uvloop", "encodings.idna", "unicodedata")
"""On asyncio's loop, neither uvloop nor the idna codec (uvloop loads it binding a listener)."""


def _routes(origins: dict[str, Origin], alice: str) -> str:
    return (
        "services:\n"
        "  payments:\n"
        "    hosts: [payments]\n"
        f"    baseline: {origins['baseline'].url}\n"
        f"    overrides:\n"
        f"      alice: {{url: '{origins[alice].url}'}}\n"
    )


def _write(path: Path, text: str) -> None:
    """Replace the file whole, as an editor or a ConfigMap update does (never a half-written file)."""
    fresh = path.with_suffix(".tmp")
    fresh.write_text(text)
    os.replace(fresh, path)


@dataclasses.dataclass
class Sidecar:
    process: asyncio.subprocess.Process
    proxy: str
    admin: str
    routes: Path
    imported: set[str]
    """Every module the router process imported so far (from its ``-X importtime`` lines)."""
    loop: str
    """Its ``--loop``."""


async def _ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


async def _collect_imports(stream: asyncio.StreamReader, imported: set[str]) -> None:
    # "import time:       self |  cumulative | <indent>module.name"; other lines are logs.
    while line := await stream.readline():
        text = line.decode(errors="replace")
        if text.startswith("import time:") and "|" in text:
            imported.add(text.rsplit("|", 1)[1].strip())


@contextlib.asynccontextmanager
async def _process(*args: str, stderr: int | None = None) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, *args, env=devstack_env(), stdout=asyncio.subprocess.DEVNULL, stderr=stderr
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


LOOPS = pytest.mark.parametrize("sidecar", ["uvloop", "asyncio"], indirect=True)
"""Runs a test against a sidecar on each ``--loop`` (without it, the fixture's is the default)."""


@pytest.fixture
async def sidecar(tmp_path: Path, origins: dict[str, Origin], request: pytest.FixtureRequest) -> AsyncIterator[Sidecar]:
    loop: str = getattr(request, "param", "uvloop")
    routes = tmp_path / "routes.yaml"
    _write(routes, _routes(origins, "alice"))
    controller = f"127.0.0.1:{free_port()}"
    proxy, admin = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    imported: set[str] = set()
    async with (
        aiohttp.ClientSession() as session,
        _process(
            "-m", "devstack", "controller", "--routes", str(routes), "--listen", controller, "--log-level", "WARNING"
        ),
    ):
        await eventually(
            lambda: _ready(session, f"http://{controller}/readyz"), timeout=STARTUP, interval=0.05, what="controller"
        )
        async with _process(
            "-X", "importtime", "-m", "devstack", "router", "--mode", "sidecar",
            "--routes-from", f"http://{controller}", "--listen", proxy, "--admin", admin,
            "--access-log", "off", "--log-level", "WARNING", "--loop", loop,
            stderr=asyncio.subprocess.PIPE,
        ) as router:  # fmt: skip
            assert router.stderr is not None
            reader = asyncio.create_task(_collect_imports(router.stderr, imported), name="router-stderr")
            try:
                await eventually(
                    lambda: _ready(session, f"http://{admin}/readyz"), timeout=STARTUP, interval=0.05, what="router"
                )
                yield Sidecar(router, f"http://{proxy}", f"http://{admin}", routes, imported, loop)
            finally:
                if router.returncode is None:
                    router.terminate()
                await router.wait()
                await reader  # stderr ends with the process


async def _origin_for(session: aiohttp.ClientSession, sidecar: Sidecar, key: str | None) -> str:
    """Which origin answers ``GET http://payments/`` sent through the sidecar as an app would."""
    headers = {"baggage": f"devstack={key}"} if key else {}
    async with session.get("http://payments/checkout", proxy=sidecar.proxy, headers=headers) as response:
        assert response.status == 200, await response.text()
        origin: str = (await response.json())["origin"]
        return origin


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str, str]:
    async with session.get(url) as response:
        return response.status, response.headers.get("Content-Type", ""), await response.text()


# --- the sidecar process ---------------------------------------------------------------------------


@LOOPS
async def test_a_sidecar_routes_by_key_from_the_feed_and_follows_edits_on_the_controller(
    sidecar: Sidecar, origins: dict[str, Origin]
) -> None:
    async with aiohttp.ClientSession() as session:
        assert await _origin_for(session, sidecar, "alice") == "alice"
        assert await _origin_for(session, sidecar, None) == "baseline"
        assert await _origin_for(session, sidecar, "carol") == "baseline"

        _write(sidecar.routes, _routes(origins, "bob"))  # alice's override now runs at bob's address

        async def moved() -> bool:
            return await _origin_for(session, sidecar, "alice") == "bob"

        await eventually(moved, timeout=FOLLOW, interval=0.05, what="the edit reaching the sidecar")
        status, _, body = await _get(session, f"{sidecar.admin}/routes")
        assert status == 200
        assert json.loads(body)["services"]["payments"]["overrides"]["alice"]["url"] == origins["bob"].url


async def test_the_lite_admin_answers_readiness_health_routes_and_prometheus_metrics(sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as session:
        assert await _origin_for(session, sidecar, "alice") == "alice"
        status, content_type, body = await _get(session, f"{sidecar.admin}/readyz")
        assert (status, content_type) == (200, "application/json; charset=utf-8")
        assert json.loads(body) == {"ready": True, "version": 1, "errors": {}}
        status, _, body = await _get(session, f"{sidecar.admin}/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"

        status, content_type, text = await _get(session, f"{sidecar.admin}/metrics")
        assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
        families = {family.name: family for family in text_string_to_metric_families(text)}
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in families.values()
            for sample in family.samples
        }
        assert families["devstack_requests"].type == "counter"
        assert samples["devstack_requests_total", (("service", "payments"), ("target", "override"))] == 1.0
        assert families["devstack_request_duration_seconds"].type == "histogram"
        assert (
            samples["devstack_request_duration_seconds_count", (("service", "payments"), ("target", "override"))] == 1
        )
        assert samples["devstack_route_table_version", ()] == 1.0
        assert samples["devstack_route_source_staleness_seconds", (("source", "remote"),)] < STARTUP
        assert 0 < samples["process_resident_memory_bytes", ()] < 64 << 20

        for path in ("/", "/dashboard/events", "/routes/resolve?service=payments"):
            status, _, _ = await _get(session, f"{sidecar.admin}{path}")
            assert status == 404, path


@LOOPS
async def test_the_sidecar_imports_no_http_client_metrics_yaml_kubernetes_tracing_or_h2_library(
    sidecar: Sidecar,
) -> None:
    async with aiohttp.ClientSession() as session:
        # Everything it serves, first, so that a library imported lazily on first use shows too.
        assert await _origin_for(session, sidecar, "alice") == "alice"
        for path in ("/metrics", "/routes", "/readyz", "/healthz"):
            assert (await _get(session, f"{sidecar.admin}{path}"))[0] == 200
    sidecar.process.terminate()  # its last import lines are all written once it has exited
    await sidecar.process.wait()
    assert "router.liteadmin" in sidecar.imported and "controller.sources.feedhttp" in sidecar.imported
    heavy = sorted(name for name in sidecar.imported if name.split(".")[0] in HEAVY)
    assert heavy == []
    unused = UNUSED_STDLIB + (ASYNCIO_UNUSED if sidecar.loop == "asyncio" else ())
    assert sorted(sidecar.imported.intersection(unused)) == []


@LOOPS
async def test_an_idle_sidecar_stays_small(sidecar: Sidecar) -> None:
    async with aiohttp.ClientSession() as session:
        assert await _origin_for(session, sidecar, "alice") == "alice"
        assert (await _get(session, f"{sidecar.admin}/metrics"))[0] == 200
    resident = memory_kib(sidecar.process.pid)["VmRSS"] / 1024
    assert resident <= IDLE_RSS_MIB[sidecar.loop], f"{resident:.1f} MiB resident on {sidecar.loop}"


def test_admin_lite_is_refused_with_workers(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("services: {}\n")
    result = run_devstack("router", "--routes", str(routes), "--admin-lite", "--workers", "2")
    assert result.returncode == 2
    assert user_error(result) == "devstack: --admin-lite: not with --workers; their admin listener is the full one"


# --- what the lite admin writes, and how the feed arrives --------------------------------------------


def _busy_stats() -> RouterStats:
    stats = RouterStats()
    stats.requests["payments", "override"] = 3
    stats.requests['odd "name"\\', "baseline"] = 1
    stats.upstream_errors["connect"] = 2
    stats.rejected[next(iter(Answer))] = 4
    stats.observe_duration(("payments", "override"), 0.0004)
    stats.observe_duration(("payments", "override"), 3.5)
    stats.observe_duration(("payments", "override"), 99.0)
    stats.upstream_connect.observe(0.002)
    stats.h2_goaway["ENHANCE_YOUR_CALM"] = 1
    stats.table_failures["remote"] = 5
    stats.source_confirmed["remote"] = 0.0
    stats.open_connections = 12_345_678
    return stats


def test_lite_metrics_are_byte_for_byte_what_prometheus_client_writes(tmp_path: Path) -> None:
    stats = _busy_stats()
    table = make_table({"payments": {"baseline": "http://127.0.0.1:1"}}, version=42)
    access_log = AccessLog(str(tmp_path / "access.log"), "json", query=False, sample=1)
    try:
        registry = CollectorRegistry(auto_describe=True)
        registry.register(_RouterCollector(AdminState(lambda: table, stats, lambda: (True, {}), access_log)))
        full = generate_latest(registry).decode()
        # Both read the clock for staleness: compare with that one value cut out.
        lite = exposition(router_families(stats, table, access_log, _staleness_clock(full))).decode()
    finally:
        access_log.close()
    assert lite == full


def _staleness_clock(text: str) -> float:
    """The ``time.monotonic()`` the full exporter used, read back from its staleness of a source
    confirmed at 0.0 (so the lite exporter can be asked about that same instant)."""
    match = re.search(r'^devstack_route_source_staleness_seconds\{source="remote"\} (\S+)$', text, re.MULTILINE)
    assert match is not None, text
    return float(match.group(1))


async def test_the_feed_transport_reads_a_gzipped_chunked_stream_from_a_real_controller() -> None:
    publisher = RoutePublisher()
    publisher.publish(make_table({"payments": {"baseline": "http://127.0.0.1:1"}}, version=1))
    encodings: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        response: web.StreamResponse = await handler(request)
        encodings.append(f"{request.headers.get('Accept-Encoding')} -> {response.headers.get('Content-Encoding')}")
        return response

    app = make_publish_app(publisher, readiness=lambda: (True, {}))
    app.middlewares.append(record)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    client = FeedClient(connect_timeout=5, idle_timeout=5)
    lines: list[dict[str, Any]] = []
    try:
        async with client.get(feed_url(f"http://127.0.0.1:{port}", path=DELTA_PATH), FEED_HEADERS) as response:
            assert response.status == 200
            buffer = b""
            async for piece in response.body():
                buffer += piece
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        lines.append(json.loads(line))
                if not lines:
                    continue
                if len(lines) == 1:
                    # A delta, written on the open stream.
                    publisher.publish(make_table({"payments": {"baseline": "http://127.0.0.1:2"}}, version=2))
                else:
                    break
        async with client.get(f"http://127.0.0.1:{port}/v3/routes", FEED_HEADERS) as missing:
            assert missing.status == 404
    finally:
        await runner.cleanup()
    assert [(line["kind"], line["version"]) for line in lines] == [("snapshot", 1), ("delta", 2)]
    assert encodings[0] == "gzip -> gzip", encodings


_RESOLVE_BY_NAME = """
import asyncio, sys
from controller.sources.feedhttp import FeedClient

async def answer(reader, writer):
    await reader.readuntil(b"\\r\\n\\r\\n")
    writer.write(b"HTTP/1.1 404 Not Found\\r\\nContent-Length: 0\\r\\n\\r\\n")
    await writer.drain()
    writer.close()

async def main():
    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FeedClient(connect_timeout=5, idle_timeout=5).get(f"http://localhost:{port}/v2/routes", {}) as response:
        print(response.status, "encodings.idna" in sys.modules, "unicodedata" in sys.modules)
    server.close()

asyncio.run(main())
"""


def test_the_feed_transport_resolves_a_host_name_without_loading_the_idna_codec() -> None:
    # asyncio's own connect would encode the name with the idna codec, which brings unicodedata
    # (0.4 MiB resident) into a sidecar on asyncio's loop. "localhost" may resolve to ::1 first,
    # where nothing listens: the next address is tried.
    run = subprocess.run(
        [sys.executable, "-c", _RESOLVE_BY_NAME],
        env=devstack_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["404", "False", "False"]

"""``devstack demo``: the embedded default stack on loopback, for a first look in one command.

It starts a router on ``examples/routes.yaml`` and a chain of small aiohttp services,
``checkout → orders → payments``, with alice's override of ``payments`` and bob's override of
``orders``, then prints curl lines to try. Each service calls the next back through the router,
as a pod calls through its sidecar (``proxy=`` the router, absolute-form ``http://orders/``), and
passes the caller's baggage and trace context on with the propagation SDK (server middleware +
client session): no service copies a header by hand. Every service answers one line naming the
version that served each hop, e.g. ``checkout [baseline] -> orders [baseline] -> payments
[override: alice]``. Like the router, it logs at start whether the hot path runs compiled. Nothing
here is used by the router itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from aiohttp import ClientError, ClientSession, ClientTimeout, web

import router
from controller.aggregator import Aggregator
from controller.build import BuildError
from controller.sources.file import FileSource
from controller.startup import StartupError, bind_failure, start_router
from propagation.aiohttp import client_session, middleware
from router.server import RouterServer

log = logging.getLogger(__name__)

ROUTES = Path(__file__).with_name("routes.yaml")

DEMO_SERVICES: Final = (
    # (service, version label, port): ports must match routes.yaml.
    ("checkout", "baseline", 9003),
    ("orders", "baseline", 9001),
    ("orders", "override: bob", 9101),
    ("payments", "baseline", 9002),
    ("payments", "override: alice", 9102),
)
DOWNSTREAM: Final = {"checkout": "orders", "orders": "payments"}
"""Who each service calls: the chain a request to ``checkout`` walks."""

_SESSION: Final = web.AppKey("session", ClientSession)


async def _call(session: ClientSession, service: str) -> str:
    """The downstream's own line, or ``service [STATUS reason]`` when the router answered instead."""
    try:
        async with session.get(f"http://{service}/") as resp:
            text = (await resp.text()).strip()
            if resp.status == 200:
                return text
            try:
                reason = json.loads(text).get("reason") or resp.reason
            except (ValueError, AttributeError):
                reason = resp.reason
            return f"{service} [{resp.status} {reason}]"
    except (ClientError, TimeoutError) as exc:
        return f"{service} [unreachable: {type(exc).__name__}]"


def demo_app(service: str, version: str, router_url: str) -> web.Application:
    """One demo service; calls its downstream, if any, through the router at ``router_url``."""
    downstream = DOWNSTREAM.get(service)

    async def handle(request: web.Request) -> web.Response:
        line = f"{service} [{version}]"
        if downstream is not None:
            # The middleware attached the request's baggage and trace context; the session injects them.
            line += " -> " + await _call(request.app[_SESSION], downstream)
        return web.Response(text=line + "\n")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with client_session(proxy=router_url, timeout=ClientTimeout(total=10)) as session:
            app[_SESSION] = session
            yield

    app = web.Application(middlewares=[middleware])
    if downstream is not None:
        app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_demo_services(router_url: str, runners: list[web.AppRunner]) -> None:
    """Start every demo service, appending each to ``runners`` (so the caller can clean up even
    when a later one fails); a port in use raises ``StartupError`` naming the service."""
    for service, version, port in DEMO_SERVICES:
        runner = web.AppRunner(demo_app(service, version, router_url), access_log=None)
        await runner.setup()
        runners.append(runner)
        try:
            await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        except OSError as exc:
            # The ports are fixed by routes.yaml, so the user can only free them, not pick others.
            what = f"demo service {service} [{version}] on 127.0.0.1:{port} (fixed in {ROUTES.name})"
            raise bind_failure(what, exc) from None


def _instructions(host: str, port: int, admin_host: str, admin_port: int) -> str:
    base = f"http://{host}:{port}"
    return f"""
devstack demo is running: router on {base}, admin on http://{admin_host}:{admin_port}
Services: checkout -> orders -> payments; alice overrides payments, bob overrides orders.

Try:
  curl -H 'Host: payments' {base}/                                   # payments [baseline]
  curl -H 'Host: payments' -H 'baggage: devstack=alice' {base}/      # payments [override: alice]
  curl -H 'Host: payments' -H 'baggage: devstack=bob' {base}/        # payments [baseline]: bob has no payments override
  curl -H 'Host: orders' -H 'baggage: devstack=alice' {base}/        # orders [baseline] -> payments [override: alice]
  curl -H 'Host: checkout' -H 'baggage: devstack=alice' {base}/      # checkout [baseline] -> orders [baseline] -> payments [override: alice]
  curl -H 'Host: checkout' -H 'baggage: devstack=bob' {base}/        # checkout [baseline] -> orders [override: bob] -> payments [baseline]
  curl -H 'Host: checkout' -H 'baggage: userId=u1,devstack=alice;ttl=30' {base}/   # the key is found among other members
  curl -i -H 'Host: payments' -H 'baggage: devstack=carol' {base}/   # 503: carol's override is not ready
  curl -i -H 'Host: payments' -H 'baggage: devstack=alice' -H 'x-devstack-debug: 1' {base}/
  curl http://{admin_host}:{admin_port}/routes
  curl 'http://{admin_host}:{admin_port}/routes/resolve?service=payments&key=alice'

Ctrl-C to stop.
""".rstrip()  # noqa: E501 - the curl lines are meant to be copied whole


async def run_demo(args: argparse.Namespace) -> int:
    """Serve the demo until SIGINT/SIGTERM; raises ``StartupError`` for a bad route file or a busy port."""
    server = RouterServer()
    aggregator = Aggregator([FileSource.name], server.swap)
    source = FileSource(ROUTES, aggregator.update, aggregator.report_error)
    try:
        source.load_first()
    except BuildError as exc:
        raise StartupError(str(exc)) from None
    await start_router(server, args.listen, args.admin)
    log.info(
        "devstack demo: router on %s:%d, admin on %s:%d, table v%d, hot path %s",
        *server.address,
        *server.admin_address,
        server.table.version,
        router.HOT_PATH_MODE,
    )
    runners: list[web.AppRunner] = []
    watcher = asyncio.create_task(source.run(), name="demo-file-source")
    try:
        await start_demo_services(f"http://{server.address[0]}:{server.address[1]}", runners)
        print(_instructions(*server.address, *server.admin_address), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        watcher.cancel()
        await server.close(drain=2.0)
        for runner in runners:
            await runner.cleanup()
    return 0

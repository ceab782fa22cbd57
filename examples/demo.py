"""``devstack demo``: the embedded default stack on loopback, for a first look in one command.

It starts a router on ``examples/routes.yaml`` and a chain of small aiohttp services,
``checkout → orders → payments``, with alice's override of ``payments`` and bob's override of
``orders``, then prints curl lines to try. Each service calls the next back through the router,
as a pod calls through its sidecar (``proxy=`` the router, absolute-form ``http://orders/``), and
passes the caller's baggage and trace context on with the propagation SDK (server middleware +
client session): no service copies a header by hand. Every service answers one line naming the
version that served each hop, e.g. ``checkout [baseline] -> orders [baseline] -> payments
[override: alice]``. Nothing here is used by the router itself.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from controller.aggregator import Aggregator
from controller.sources.file import FileSource
from propagation.aiohttp import client_session, middleware
from router.server import RouterServer, parse_hostport

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


async def start_demo_services(router_url: str) -> list[web.AppRunner]:
    runners = []
    for service, version, port in DEMO_SERVICES:
        runner = web.AppRunner(demo_app(service, version, router_url), access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
    return runners


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
    listen = parse_hostport(args.listen)
    admin = parse_hostport(args.admin)
    server = RouterServer()
    aggregator = Aggregator(["file"], server.swap)
    source = FileSource(ROUTES, aggregator.update, aggregator.report_error)
    if not source.load_once():
        print(aggregator.errors.get("file"))
        return 2
    await server.start(listen, admin)
    runners: list[web.AppRunner] = []
    watcher = asyncio.create_task(source.run(), name="demo-file-source")
    try:
        runners = await start_demo_services(f"http://{server.address[0]}:{server.address[1]}")
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

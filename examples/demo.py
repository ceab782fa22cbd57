"""``devstack demo``: the embedded default stack on loopback, for a first look in one command.

It starts small aiohttp services (orders, the payments baseline and alice's payments override),
a router on ``examples/routes.yaml``, and prints curl lines to try. ``orders`` calls ``payments``
back through the router, passing the caller's ``baggage`` on, so one request shows routing at
two hops. Nothing here is used by the router itself.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path

from aiohttp import ClientSession, web

from controller.aggregator import Aggregator
from controller.sources.file import FileSource
from router.server import RouterServer, parse_hostport

ROUTES = Path(__file__).with_name("routes.yaml")

DEMO_SERVICES = (
    # (service, version label, port) — ports must match routes.yaml.
    ("orders", "baseline", 9001),
    ("payments", "baseline", 9002),
    ("payments", "override: alice", 9102),
)


def demo_app(service: str, version: str, router_url: str) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        line = f"{service} [{version}]"
        if service == "orders":
            headers = {"Host": "payments"}
            baggage = request.headers.getall("baggage", [])
            if baggage:
                headers["baggage"] = ",".join(baggage)
            async with ClientSession() as session, session.get(router_url + "/pay", headers=headers) as resp:
                line += " -> " + (await resp.text()).strip()
        return web.Response(text=line + "\n")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def start_demo_services(router_url: str) -> list[web.AppRunner]:
    runners = []
    for service, version, port in DEMO_SERVICES:
        runner = web.AppRunner(demo_app(service, version, router_url), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, reuse_address=True).start()
        runners.append(runner)
    return runners


def _instructions(host: str, port: int, admin_host: str, admin_port: int) -> str:
    base = f"http://{host}:{port}"
    return f"""
devstack demo is running: router on {base}, admin on http://{admin_host}:{admin_port}

Try:
  curl -H 'Host: payments' {base}/                                   # payments [baseline]
  curl -H 'Host: payments' -H 'baggage: devstack=alice' {base}/      # payments [override: alice]
  curl -H 'Host: payments' -H 'baggage: devstack=bob' {base}/        # payments [baseline]: bob has no override
  curl -H 'Host: orders' -H 'baggage: devstack=alice' {base}/        # orders [baseline] -> payments [override: alice]
  curl -i -H 'Host: payments' -H 'baggage: devstack=carol' {base}/   # 503: carol's override is not ready
  curl -i -H 'Host: payments' -H 'baggage: devstack=alice' -H 'x-devstack-debug: 1' {base}/
  curl http://{admin_host}:{admin_port}/routes
  curl 'http://{admin_host}:{admin_port}/routes/resolve?service=payments&key=alice'

Ctrl-C to stop.
""".rstrip()


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
    runners = await start_demo_services(f"http://{server.address[0]}:{server.address[1]}")
    watcher = asyncio.create_task(source.run(), name="demo-file-source")
    print(_instructions(*server.address, *server.admin_address), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    watcher.cancel()
    await server.close(drain=2.0)
    for runner in runners:
        await runner.cleanup()
    return 0

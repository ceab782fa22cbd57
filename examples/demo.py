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

For a browser, the router runs with the edge key sources on (preview hosts under ``localhost``,
the extension's ``x-devstack-key`` header, the ``?devstack=KEY`` cookie), and ``checkout``
answers a browser's ``GET /`` with a small page (``CHECKOUT_PAGE``) that probes the chain three
ways: a same-origin ``fetch('/chain')``, a cross-origin ``fetch`` of ``payments`` and a WebSocket
to ``payments``' ``/ws``, all through the router. Every service answers with
``Access-Control-Allow-Origin: *`` so the page may read the cross-origin answer, and answers each
WebSocket message with its own version. Other clients (curl, the services themselves) get the text
line at every path.
"""

from __future__ import annotations

import argparse
import asyncio
import html
import json
import logging
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

from aiohttp import ClientError, ClientSession, ClientTimeout, WSMsgType, web

import router
from controller.aggregator import Aggregator
from controller.build import BuildError
from controller.sources.file import FileSource
from controller.startup import StartupError, bind_failure, start_router
from propagation.aiohttp import client_session, middleware
from router.server import RouterServer
from router.settings import RouterSettings

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

PAGE_SERVICE: Final = "checkout"
"""The service whose ``GET /`` is a web page for a browser."""
PEER_SERVICE: Final = "payments"
"""The other origin the page calls (cross-origin fetch and WebSocket): where alice's override lives."""
PREVIEW_DOMAIN: Final = "localhost"
"""``alice--checkout.localhost``: browsers resolve every ``*.localhost`` name to loopback."""

_SESSION: Final = web.AppKey("session", ClientSession)


def demo_settings() -> RouterSettings:
    """The demo router's settings: ingress with every edge key source on, so a browser can choose a
    key with a preview host, the extension's header or the ``?devstack=`` cookie."""
    return RouterSettings(preview_domain=PREVIEW_DOMAIN, key_header=True, key_cookie=True)


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
        if service == PAGE_SERVICE and request.path == "/" and _wants_html(request):
            return web.Response(text=_page(service, version), content_type="text/html")
        line = f"{service} [{version}]"
        if downstream is not None:
            # The middleware attached the request's baggage and trace context; the session injects them.
            line += " -> " + await _call(request.app[_SESSION], downstream)
        return web.Response(text=line + "\n")

    async def websocket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(heartbeat=30)
        if not ws.can_prepare(request).ok:
            return await handle(request)  # a plain GET /ws: the text line, like any other path
        await ws.prepare(request)
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                await ws.send_str(f"{service} [{version}]")
        return ws

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with client_session(proxy=router_url, timeout=ClientTimeout(total=10)) as session:
            app[_SESSION] = session
            yield

    app = web.Application(middlewares=[middleware])
    if downstream is not None:
        app.cleanup_ctx.append(session_ctx)
    app.on_response_prepare.append(_browser_headers)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def _wants_html(request: web.Request) -> bool:
    return request.method in ("GET", "HEAD") and "text/html" in request.headers.get("Accept", "")


async def _browser_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Any page may read a demo answer (the checkout page reads payments' from another origin; it
    sends no custom header, so no preflight), and no answer is cached: the next key must show."""
    response.headers["Access-Control-Allow-Origin"] = "*"
    response.headers["Cache-Control"] = "no-store"


def _page(service: str, version: str) -> str:
    return CHECKOUT_PAGE.replace("__SERVED_BY__", html.escape(f"{service} [{version}]")).replace(
        "__PEER__", PEER_SERVICE
    )


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
    site = f"{PREVIEW_DOMAIN}:{port}"
    return f"""
devstack demo is running: router on {base}, admin on http://{admin_host}:{admin_port}
Services: checkout -> orders -> payments; alice overrides payments, bob overrides orders.

In a browser (every *.localhost name is this machine), the checkout page shows which version
served each hop, through a same-origin fetch, a cross-origin fetch and a WebSocket:
  http://checkout.{site}/                  # no key in the URL: baselines (unless the cookie or the extension names one)
  http://alice--checkout.{site}/           # preview host: alice's key (payments [override: alice])
  http://bob--checkout.{site}/             # preview host: bob's key (orders [override: bob])
  http://checkout.{site}/?devstack=alice   # sets the devstack-key cookie for this host; ?devstack= clears it
  With the devstack browser extension (make extension; load extension/ unpacked), set a key in
  its popup and open http://checkout.{site}/: every request, WebSocket included, carries it.
Dashboard: http://{admin_host}:{admin_port}/

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
    server = RouterServer(demo_settings())
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


# The checkout page: self-contained (inline CSS and script are fine here, it is the demo app, not
# the extension). Every address is derived from the page's own host, so it works on any preview
# host and port: on ``alice--checkout.localhost:8080`` the peer is ``alice--payments.localhost:8080``.
# Each probe's <output> gets ``data-state`` pending/ok/error, and <html> gets ``data-probes="done"``
# once all three have settled, for a browser test to wait on.
CHECKOUT_PAGE: Final = """<!doctype html>
<html lang="en" data-probes="running">
<head>
<meta charset="utf-8">
<title>devstack demo: checkout</title>
<style>
  body { font: 15px/1.5 system-ui, sans-serif; margin: 2rem auto; max-width: 52rem; padding: 0 1rem; color: #1d2327; }
  h1 { font-size: 1.4rem; margin-bottom: .2rem; }
  .sub { color: #5c656d; margin-top: 0; }
  table { border-collapse: collapse; width: 100%; margin: 1rem 0; }
  th, td { text-align: left; padding: .45rem .6rem; border-bottom: 1px solid #dee2e6; vertical-align: top; }
  th { width: 11rem; }
  code, output { font-family: ui-monospace, monospace; font-size: .9em; }
  output[data-state="ok"] { color: #0b7285; font-weight: 600; }
  output[data-state="error"] { color: #c92a2a; }
  output[data-state="pending"] { color: #868e96; }
  ul { padding-left: 1.2rem; }
  button { font: inherit; padding: .2rem .9rem; }
</style>
</head>
<body>
<h1>checkout</h1>
<p class="sub">Page served by <b id="served-by">__SERVED_BY__</b> on <code id="origin"></code></p>
<table>
  <tr><th>same-origin fetch</th><td><code id="chain-url">/chain</code></td>
      <td><output id="chain" data-state="pending">…</output></td></tr>
  <tr><th>cross-origin fetch</th><td><code id="cors-url">–</code></td>
      <td><output id="cors" data-state="pending">…</output></td></tr>
  <tr><th>WebSocket</th><td><code id="ws-url">–</code></td>
      <td><output id="ws" data-state="pending">…</output></td></tr>
</table>
<button id="again" type="button">Probe again</button>
<p>Choose a key:</p>
<ul id="links"></ul>
<p class="sub">Every request goes through the devstack router, which picks each hop's version by the
key: from a preview host (<code>KEY--checkout</code>), the browser extension's
<code>x-devstack-key</code> header, or the <code>devstack-key</code> cookie (host-only, so the
cross-origin probes do not carry it). The services pass it on in <code>baggage</code>.</p>
<script>
"use strict";
const PEER = "__PEER__";
const [label, ...rest] = location.hostname.split(".");
const split = label.indexOf("--");
const prefix = split > 0 ? label.slice(0, split + 2) : "";     // "alice--" on a preview host
const domain = rest.length ? "." + rest.join(".") : "";
const port = location.port ? ":" + location.port : "";
const onCheckout = label.slice(prefix.length) === "checkout";
const peerHost = onCheckout ? prefix + PEER + domain + port : null;
const wsScheme = location.protocol === "https:" ? "wss:" : "ws:";
const corsUrl = peerHost && location.protocol + "//" + peerHost + "/";
const wsUrl = peerHost && wsScheme + "//" + peerHost + "/ws";
document.getElementById("origin").textContent = location.origin;
document.getElementById("cors-url").textContent = corsUrl || "–";
document.getElementById("ws-url").textContent = wsUrl || "–";

const site = onCheckout ? domain + port : ".localhost:8080";  // off the router: the demo's default
const links = [
  ["checkout" + site, "/", "plain host: no key, or the cookie's, or the extension's"],
  ["alice--checkout" + site, "/", "preview host, key alice"],
  ["bob--checkout" + site, "/", "preview host, key bob"],
  ["checkout" + site, "/?devstack=alice", "cookie, key alice"],
  ["checkout" + site, "/?devstack=", "clear the cookie"],
];
for (const [host, path, what] of links) {
  const a = document.createElement("a");
  a.href = location.protocol + "//" + host + path;
  a.textContent = a.href;
  const li = document.createElement("li");
  li.append(a, " — " + what);
  document.getElementById("links").append(li);
}

async function text(response) {
  const body = (await response.text()).trim();
  if (!response.ok) throw new Error(response.status + " " + body);
  return body;
}

function socket(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url);
    const timer = setTimeout(() => { ws.close(); reject(new Error("no answer in 5 s")); }, 5000);
    ws.onopen = () => ws.send("which version?");
    ws.onmessage = (event) => { clearTimeout(timer); ws.close(); resolve(String(event.data)); };
    ws.onerror = () => { clearTimeout(timer); reject(new Error("WebSocket failed")); };
  });
}

const skipped = () => Promise.reject(new Error("open this page through the router, e.g. http://checkout.localhost:8080/"));
const PROBES = {
  chain: () => fetch("/chain", { cache: "no-store" }).then(text),
  // No custom header and a simple GET: no preflight; the answer's Access-Control-Allow-Origin lets us read it.
  cors: () => corsUrl ? fetch(corsUrl, { cache: "no-store" }).then(text) : skipped(),
  ws: () => wsUrl ? socket(wsUrl) : skipped(),
};

async function probe() {
  document.documentElement.dataset.probes = "running";
  await Promise.all(Object.entries(PROBES).map(async ([id, run]) => {
    const out = document.getElementById(id);
    out.dataset.state = "pending";
    out.textContent = "…";
    try {
      out.textContent = await run();
      out.dataset.state = "ok";
    } catch (error) {
      out.textContent = "failed: " + (error.message || error);
      out.dataset.state = "error";
    }
  }));
  document.documentElement.dataset.probes = "done";
}
document.getElementById("again").addEventListener("click", probe);
probe();
</script>
</body>
</html>
"""

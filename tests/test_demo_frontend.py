"""The demo's browser side: the checkout page, its three probes, and what the demo prints.

The demo's services and a router with the demo's settings run in-process on free ports (the real
``devstack demo`` binds fixed ports; tests/test_demo.py runs that one), with the route table of
``examples/routes.yaml`` pointed at them. A browser is not needed: an aiohttp client sends what a
browser would (``Accept: text/html``, a preview host, the extension's header, the cookie, an
``Origin``, a WebSocket handshake), and the page's own script runs in ``node`` against stand-ins of
``fetch``, ``WebSocket`` and the DOM to show which addresses it probes and what it shows.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Middleware
from devstack_examples.demo import (
    CHECKOUT_PAGE,
    DEMO_SERVICES,
    ROUTES,
    _instructions,
    _page,
    demo_app,
    demo_settings,
)

from controller.build import merge_snapshots
from controller.sources.file import parse_route_yaml
from router.server import RouterServer
from router.settings import RouterSettings
from router.table import EMPTY_TABLE
from tests.support import running_router

NODE = shutil.which("node")
ALICE = "checkout [baseline] -> orders [baseline] -> payments [override: alice]"
BOB = "checkout [baseline] -> orders [override: bob] -> payments [baseline]"
NOBODY = "checkout [baseline] -> orders [baseline] -> payments [baseline]"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}


@contextlib.asynccontextmanager
async def demo_stack(
    settings: RouterSettings | None = None, middleware: Callable[[str, str], Middleware] | None = None
) -> AsyncIterator[RouterServer]:
    """The demo's router (``settings``, default the demo's) and services, on free ports, routed by
    the demo's route file; ``middleware(service, version)`` wraps each service outermost."""
    async with running_router(EMPTY_TABLE, settings or demo_settings()) as server:
        router_url = f"http://127.0.0.1:{server.address[1]}"
        runners: list[web.AppRunner] = []
        text = ROUTES.read_text()
        try:
            for service, version, port in DEMO_SERVICES:
                app = demo_app(service, version, router_url)
                if middleware is not None:
                    app.middlewares.insert(0, middleware(service, version))
                runner = web.AppRunner(app, access_log=None)
                await runner.setup()
                runners.append(runner)
                await web.TCPSite(runner, "127.0.0.1", 0).start()
                text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{runner.addresses[0][1]}")
            server.swap(merge_snapshots({"file": parse_route_yaml(text, ROUTES.name)}, version=1))
            yield server
        finally:
            for runner in runners:
                await runner.cleanup()


def host(server: RouterServer, name: str) -> dict[str, str]:
    return {"Host": f"{name}:{server.address[1]}"}


async def get(server: RouterServer, name: str, path: str = "/", **headers: str) -> tuple[int, str, Any]:
    url = f"http://127.0.0.1:{server.address[1]}{path}"
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={**host(server, name), **headers}, allow_redirects=False) as resp,
    ):
        return resp.status, (await resp.text()).strip(), resp.headers


def test_the_demo_router_has_the_edge_key_sources_on() -> None:
    settings = demo_settings()
    assert (settings.preview_domain, settings.key_header, settings.key_cookie) == ("localhost", True, True)


async def test_checkout_serves_a_browser_a_page_with_the_three_probes() -> None:
    async with demo_stack() as server:
        status, page, headers = await get(server, "checkout.localhost", **HTML)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert page.startswith("<!doctype html>")
    assert 'id="served-by">checkout [baseline]<' in page
    assert 'fetch("/chain"' in page  # (a) same origin
    assert "fetch(corsUrl" in page and 'const PEER = "payments"' in page  # (b) cross-origin, through the router
    assert "new WebSocket(url)" in page and '"/ws"' in page  # (c) a WebSocket, through the router
    for probe in ("chain", "cors", "ws"):
        assert f'<output id="{probe}" data-state="pending">' in page
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//""", page)  # self-contained
    assert headers["Cache-Control"] == "no-store"


async def test_non_browsers_still_get_the_text_line() -> None:
    async with demo_stack() as server:
        assert (await get(server, "checkout"))[:2] == (200, NOBODY)
        assert (await get(server, "checkout", Accept="*/*"))[:2] == (200, NOBODY)
        # Only checkout's / is a page; everything else answers the line to a browser too.
        assert (await get(server, "payments.localhost", **HTML))[:2] == (200, "payments [baseline]")
        assert (await get(server, "checkout.localhost", "/favicon.ico", **HTML))[:2] == (200, NOBODY)
        assert (await get(server, "checkout", "/ws"))[:2] == (200, NOBODY)  # no upgrade: the line


async def test_chain_names_the_version_of_every_hop_for_each_key_source() -> None:
    async with demo_stack() as server:
        assert (await get(server, "checkout.localhost", "/chain"))[:2] == (200, NOBODY)
        assert (await get(server, "checkout", "/chain", baggage="devstack=alice"))[:2] == (200, ALICE)
        # What a browser sends: a preview host, the extension's header, the cookie.
        assert (await get(server, "alice--checkout.localhost", "/chain"))[:2] == (200, ALICE)
        assert (await get(server, "bob--checkout.localhost", "/chain"))[:2] == (200, BOB)
        assert (await get(server, "checkout.localhost", "/chain", **{"x-devstack-key": "alice"}))[:2] == (200, ALICE)
        assert (await get(server, "checkout.localhost", "/chain", Cookie="devstack-key=bob"))[:2] == (200, BOB)


async def test_the_cross_origin_answer_is_readable_by_the_page() -> None:
    async with demo_stack() as server:
        origin = f"http://alice--checkout.localhost:{server.address[1]}"
        status, text, headers = await get(server, "alice--payments.localhost", Origin=origin)
        assert (status, text) == (200, "payments [override: alice]")
        assert headers["Access-Control-Allow-Origin"] == "*"
        status, text, headers = await get(server, "payments.localhost", Origin=origin, **{"x-devstack-key": "alice"})
        assert (status, text, headers["Access-Control-Allow-Origin"]) == (200, "payments [override: alice]", "*")
        _, text, headers = await get(server, "checkout.localhost", "/chain", Origin=origin)
        assert headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize(
    ("name", "headers", "answer"),
    [
        ("payments.localhost", {}, "payments [baseline]"),
        ("alice--payments.localhost", {}, "payments [override: alice]"),
        ("payments.localhost", {"x-devstack-key": "alice"}, "payments [override: alice]"),
        ("bob--orders.localhost", {}, "orders [override: bob]"),
        ("checkout.localhost", {"baggage": "devstack=alice"}, "checkout [baseline]"),
    ],
)
async def test_ws_answers_each_message_with_the_version(name: str, headers: dict[str, str], answer: str) -> None:
    async with demo_stack() as server, aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.address[1]}/ws"
        async with session.ws_connect(url, headers={**host(server, name), **headers}) as ws:
            for message in ("which version?", "again"):
                await ws.send_str(message)
                assert await ws.receive_str(timeout=5) == answer


def test_the_demo_prints_the_browser_urls_and_the_dashboard() -> None:
    text = _instructions("127.0.0.1", 8080, "127.0.0.1", 9901)
    for url in (
        "http://checkout.localhost:8080/",
        "http://alice--checkout.localhost:8080/",
        "http://bob--checkout.localhost:8080/",
        "http://checkout.localhost:8080/?devstack=alice",
        "Dashboard: http://127.0.0.1:9901/",
    ):
        assert url in text
    assert "make extension" in text
    assert "curl -H 'Host: checkout' -H 'baggage: devstack=alice' http://127.0.0.1:8080/" in text
    assert text.rstrip().endswith("Ctrl-C to stop.")
    # The ports are the router's own, not fixed.
    assert "http://alice--checkout.localhost:18080/" in _instructions("127.0.0.1", 18080, "127.0.0.1", 19901)


# The page's script in node, with just enough of a browser: a location, a DOM of the ids it uses,
# and fetch/WebSocket stand-ins that record where they were sent and answer like the router would.
PAGE_HARNESS = """
const calls = [];
const elements = {};
const element = (id) => elements[id] ??= {
  id, dataset: {}, textContent: '', children: [], href: '',
  append(...items) { this.children.push(...items.map((i) => (typeof i === 'string' ? i : i.href || i.children))); },
  addEventListener() {},
};
globalThis.location = new URL(PAGE_URL);
globalThis.document = {
  documentElement: { dataset: {} },
  getElementById: element,
  createElement: () => element('new-' + Object.keys(elements).length),
};
const ANSWERS = {'/chain': CHAIN, '/': 'payments [override: alice]'};
globalThis.fetch = async (url, init) => {
  const u = new URL(url, location.href);
  calls.push({ kind: 'fetch', url: u.href, init: init ?? null });
  return { ok: true, status: 200, text: async () => ANSWERS[u.pathname] + '\\n' };
};
globalThis.WebSocket = class {
  constructor(url) {
    calls.push({ kind: 'ws', url });
    setTimeout(() => this.onopen(), 0);
  }
  send(data) {
    calls.push({ kind: 'ws-send', data });
    setTimeout(() => this.onmessage({ data: 'payments [override: alice]' }), 0);
  }
  close() {}
};
{ SCRIPT }  // a block: the page's names stay its own
while (document.documentElement.dataset.probes !== 'done') await new Promise((r) => setTimeout(r, 5));
const shown = (id) => ({ text: element(id).textContent, state: element(id).dataset.state ?? null });
const out = Object.fromEntries(['chain', 'cors', 'ws', 'cors-url', 'ws-url', 'origin'].map((id) => [id, shown(id)]));
const links = Object.values(elements).filter((e) => e.id.startsWith('new-') && e.href).map((e) => e.href);
console.log(JSON.stringify({ calls, out, links }));
"""


def run_page(page_url: str) -> dict[str, Any]:
    assert NODE is not None
    page = _page("checkout", "baseline")
    [script] = re.findall(r"<script>(.*?)</script>", page, re.S)
    fill = {"PAGE_URL": json.dumps(page_url), "CHAIN": json.dumps(ALICE), "SCRIPT": script}  # the script last
    harness = PAGE_HARNESS
    for name, value in fill.items():
        harness = harness.replace(name, value)
    done = subprocess.run(
        [NODE, "--input-type=module", "-e", harness], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_page_probes_its_peer_on_the_same_preview_host_and_shows_each_answer() -> None:
    result = run_page("http://alice--checkout.localhost:8080/")
    fetches = [c for c in result["calls"] if c["kind"] == "fetch"]
    assert [c["url"] for c in fetches] == [
        "http://alice--checkout.localhost:8080/chain",
        "http://alice--payments.localhost:8080/",
    ]
    # Simple requests: no custom header (the extension adds its own below the page), so no preflight.
    assert all(set(c["init"]) == {"cache"} for c in fetches)
    assert [c["url"] for c in result["calls"] if c["kind"] == "ws"] == ["ws://alice--payments.localhost:8080/ws"]
    out = result["out"]
    assert out["chain"] == {"text": ALICE, "state": "ok"}
    assert out["cors"] == {"text": "payments [override: alice]", "state": "ok"}
    assert out["ws"] == {"text": "payments [override: alice]", "state": "ok"}
    assert out["origin"]["text"] == "http://alice--checkout.localhost:8080"
    assert "http://bob--checkout.localhost:8080/" in result["links"]
    assert "http://checkout.localhost:8080/?devstack=alice" in result["links"]


@pytest.mark.skipif(NODE is None, reason="node is not installed")
def test_the_page_on_a_plain_host_probes_the_plain_peer_and_says_when_it_cannot() -> None:
    plain = run_page("http://checkout.localhost:8080/")
    urls = [c["url"] for c in plain["calls"] if c["kind"] in ("fetch", "ws")]
    assert urls == [
        "http://checkout.localhost:8080/chain",
        "http://payments.localhost:8080/",
        "ws://payments.localhost:8080/ws",
    ]
    direct = run_page("http://127.0.0.1:9003/")  # the service itself, not through the router
    assert direct["out"]["chain"]["state"] == "ok"
    for probe in ("cors", "ws"):
        assert direct["out"][probe]["state"] == "error"
        assert "through the router" in direct["out"][probe]["text"]


def test_page_template_has_no_unfilled_placeholders() -> None:
    page = _page("checkout", "baseline")
    assert "__" not in page.replace("--", "")
    assert CHECKOUT_PAGE.count("__SERVED_BY__") == 1 and CHECKOUT_PAGE.count("__PEER__") == 1

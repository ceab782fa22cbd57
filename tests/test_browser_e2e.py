"""Issue 14's acceptance, end to end in a real browser: headless Chromium (new headless mode) driven
over the raw DevTools protocol, through a real router in ingress mode and the real demo services.

The stack is the demo's (``examples/demo.py``): a router with ``demo_settings()`` (preview hosts
under ``localhost``, the extension's ``x-devstack-key`` header, the ``?devstack=`` cookie) and the
services ``checkout -> orders -> payments`` (alice overrides payments, bob overrides orders), all
in-process on free ports with the table of ``examples/routes.yaml`` pointed at them, so a running
``make run`` is never in the way. Chromium resolves every ``*.localhost`` name to loopback, so the
browser reaches the router as ``http://checkout.localhost:PORT/``, ``alice--checkout.localhost``...

Each test proves every hop: the checkout page's three probes (a same-origin ``fetch('/chain')``, a
cross-origin ``fetch`` of payments and a WebSocket to payments' ``/ws``) show which version served
each hop; a navigation to ``/chain`` shows it as the document; every demo service records what it
received (method, ``Sec-Fetch-Mode``, the ``baggage`` and ``Cookie`` lines as raw bytes), so the
navigation's and the WebSocket's key, the page's own ``baggage`` members arriving intact at every
hop, and the absence of any ``OPTIONS`` (CORS preflight) are asserted on what the services got, and
the router's JSON access log confirms no ``OPTIONS`` reached the router either.

- With the extension (``--load-extension``): key ``alice`` set through the popup page's
  ``devstack.setKey``, badge checked, then everything; ``devstack.clearKey()`` and all baselines.
- Without it: a preview host (``alice--checkout.localhost``, ``bob--checkout.localhost``), then the
  ``?devstack=alice`` cookie (302 to the same URL without the parameter) and ``?devstack=`` clearing.

The driver is ``tests/browser.py`` (raw CDP over aiohttp's websocket client), chosen over Selenium
or Playwright with the Debian binary because it needs no new dependency (neither package nor a
driver binary; Playwright would also want its own node driver process) and it is fast enough not to
matter, measured on the 2-core development machine with Chromium 156: 0.34-0.41 s from launch to a
connected DevTools socket, 0.1-0.25 s more until the extension's service worker is up, 0.4-0.45 s
for the first checkout page with its three probes settled and 0.15-0.3 s for the next, 0.12 s to
close; each test below takes 1.3-2.9 s (browser included), the module 5.5-7 s. Skipped when no
Chromium is installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from devstack_examples.demo import demo_settings

from tests import test_demo_frontend as demo_frontend
from tests.browser import Browser, Session, chromium_binary


def _chromium() -> str | None:
    found = chromium_binary()
    if found is None and os.access("/usr/bin/chromium", os.X_OK):
        found = "/usr/bin/chromium"
    return found


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium: install the chromium package (or set $CHROMIUM) for the browser tests"
)

EXTENSION = Path(__file__).resolve().parents[1] / "extension"

ALICE = "checkout [baseline] -> orders [baseline] -> payments [override: alice]"
BOB = "checkout [baseline] -> orders [override: bob] -> payments [baseline]"
NOBODY = "checkout [baseline] -> orders [baseline] -> payments [baseline]"
PAY_ALICE = "payments [override: alice]"
PAY_BASE = "payments [baseline]"
HOPS_ALICE = ("checkout [baseline]", "orders [baseline]", "payments [override: alice]")
HOPS_NOBODY = ("checkout [baseline]", "orders [baseline]", "payments [baseline]")

OWN_BAGGAGE = "userId=u-1,theme=dark"
"""The page's own baggage members, sent on a same-origin fetch (so no preflight)."""

TEST_BUDGET = 90.0
"""Seconds one test may take in all (it takes a few); every single wait has a smaller bound."""
PROBES_BUDGET = 15.0
"""Seconds for the checkout page's three probes to settle (its WebSocket probe gives up after 5)."""

PROBES_DONE = "document.documentElement.dataset.probes === 'done'"
PROBE_RESULTS = """Object.fromEntries(['chain', 'cors', 'ws'].map((id) => {
  const out = document.getElementById(id);
  return [id, out.dataset.state === 'ok' ? out.textContent : out.dataset.state + ': ' + out.textContent];
}))"""
SEND_OWN_BAGGAGE = (
    f"fetch('/chain', {{cache: 'no-store', headers: {{baggage: '{OWN_BAGGAGE}'}}}})"
    ".then(async (r) => r.status + ' ' + (await r.text()).trim())"
)


# -- the stack: the demo's router and services, each service recording what it received -----------


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request as a demo service received it."""

    served_by: str
    """The service's own label, e.g. ``payments [override: alice]``."""
    method: str
    path: str
    mode: str | None
    """``websocket`` for a WebSocket handshake, else ``Sec-Fetch-Mode`` (``navigate``; ``cors`` for
    every ``fetch``, same-origin too; ``no-cors`` for the favicon); None from a service (the SDK)."""
    baggage: tuple[bytes, ...]
    """Every ``baggage`` line, as raw bytes."""
    cookie: tuple[bytes, ...]
    key_header: bool
    """Whether the extension's ``x-devstack-key`` got through (it must not)."""


@dataclasses.dataclass
class Stack:
    port: int
    access_log: Path
    seen: list[Seen] = dataclasses.field(default_factory=list)

    def url(self, host: str, path: str = "/") -> str:
        return f"http://{host}.localhost:{self.port}{path}"

    def hops(self, carrying: str) -> list[tuple[str, tuple[bytes, ...]]]:
        """(served by, baggage lines) of each request whose baggage carries ``carrying``, in order."""
        needle = carrying.encode()
        return [(s.served_by, s.baggage) for s in self.seen if any(needle in line for line in s.baggage)]

    def first(self, served_by: str, mode: str, path: str = "/") -> Seen:
        """The first request ``served_by`` received with this ``Sec-Fetch-Mode`` and path."""
        for s in self.seen:
            if (s.served_by, s.mode, s.path) == (served_by, mode, path):
                return s
        raise AssertionError(f"{served_by} got no {mode} request for {path}: {self.seen}")


def _recorder(stack: Stack, served_by: str) -> Any:
    """A middleware that records each request as it arrives (so a chain's hops are in call order)."""

    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        raw = request.raw_headers
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        stack.seen.append(
            Seen(
                served_by=served_by,
                method=request.method,
                path=request.path,
                mode="websocket" if upgrade else request.headers.get("Sec-Fetch-Mode"),
                baggage=tuple(value for name, value in raw if name.lower() == b"baggage"),
                cookie=tuple(value for name, value in raw if name.lower() == b"cookie"),
                key_header=any(name.lower() == b"x-devstack-key" for name, _ in raw),
            )
        )
        response: web.StreamResponse = await handler(request)
        return response

    return record


@contextlib.asynccontextmanager
async def demo_stack(access_log: Path) -> AsyncIterator[Stack]:
    """The demo's router settings (plus a JSON access log) and services, on free ports."""
    settings = dataclasses.replace(demo_settings(), access_log=str(access_log))
    stack = Stack(port=0, access_log=access_log)
    def record(service: str, version: str) -> Any:
        return _recorder(stack, f"{service} [{version}]")

    async with demo_frontend.demo_stack(settings, record) as server:
        stack.port = server.address[1]
        yield stack


def router_methods(access_log: Path) -> list[str]:
    """The method of every exchange in the router's access log (complete once the router closed)."""
    return [json.loads(line)["method"] for line in access_log.read_text().splitlines() if line.strip()]


# -- the browser -------------------------------------------------------------------------------------

_SESSION_WRAPPER = """#!{python}
# Chromium in a session (and process group) of its own, so the test can end all of its processes.
import os, sys
os.setsid()
with open({pidfile!r}, "w") as f:
    f.write(str(os.getpid()))
os.execv({binary!r}, [{binary!r}, *sys.argv[1:]])
"""


@contextlib.asynccontextmanager
async def chromium(extension: bool) -> AsyncIterator[Browser]:
    """``tests/browser.py``'s ``Browser`` (temporary profile, new headless mode), with or without the
    extension loaded unpacked; its whole process group is killed at the end, whatever happened."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory(prefix="devstack-e2e-") as tmp:
        pidfile = Path(tmp, "pid")
        wrapper = Path(tmp, "chromium")
        wrapper.write_text(_SESSION_WRAPPER.format(python=sys.executable, pidfile=str(pidfile), binary=CHROMIUM))
        wrapper.chmod(0o755)
        args = [f"--load-extension={EXTENSION}", f"--disable-extensions-except={EXTENSION}"] if extension else []
        try:
            async with Browser.launch(args=args, binary=str(wrapper)) as browser:
                yield browser
        finally:
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(pidfile.read_text()), signal.SIGKILL)


async def extension_id(browser: Browser, timeout: float = 10.0) -> str:
    """The loaded extension's id, from its service worker's URL (chrome-extension://ID/background.js)."""
    async with asyncio.timeout(timeout):
        while True:
            for target in await browser.targets():
                url = target["url"]
                if target["type"] == "service_worker" and url.startswith("chrome-extension://"):
                    return str(url.split("/")[2])
            await asyncio.sleep(0.05)


async def checkout_page(page: Session, url: str) -> dict[str, str]:
    """Open the checkout page and wait for its three probes: {probe: what it showed}."""
    await page.navigate(url)
    await page.wait_for(PROBES_DONE, timeout=PROBES_BUDGET)
    results: dict[str, str] = await page.evaluate(PROBE_RESULTS)
    return results


async def document_text(page: Session, url: str) -> str:
    """Navigate to ``url`` and return the document's text (a plain-text answer: the chain line)."""
    await page.navigate(url)
    return str(await page.evaluate("document.body.innerText")).strip()


def probes(chain: str, peer: str) -> dict[str, str]:
    return {"chain": chain, "cors": peer, "ws": peer}


def assert_page_traffic(stack: Stack, key: bytes | None, peer: str) -> None:
    """What the services got for one checkout page: the navigation (served by checkout) carries the
    key in ``baggage``, as does each hop of the same-origin probe; the cross-origin fetch and the
    WebSocket reach ``peer`` with it; nothing else is forwarded and nothing is preflighted."""
    member = () if key is None else (b"devstack=" + key,)
    assert stack.first("checkout [baseline]", "navigate").baggage == member
    assert stack.first("checkout [baseline]", "cors", "/chain").baggage == member
    assert stack.first(peer, "cors").baggage == member
    assert stack.first(peer, "websocket", "/ws").baggage == member
    assert {s.method for s in stack.seen} == {"GET"}, "a CORS preflight (OPTIONS) reached a service"
    assert not any(s.key_header for s in stack.seen), "x-devstack-key was forwarded to a service"


async def assert_own_baggage_intact(
    stack: Stack, page: Session, chain: str, hops: tuple[str, ...], key: str | None
) -> None:
    """The page's own ``baggage`` (a same-origin fetch from a checkout page: no preflight) arrives at
    every hop. The router forwards it to the first hop byte for byte with its ``devstack`` member
    appended (none without a key); the services pass it on with the propagation SDK, which re-emits
    the same members with the routing member first (``propagation/propagators.py``, ``_members_of``:
    so that a hop truncating at the W3C limits still sees the key)."""
    assert await page.evaluate(SEND_OWN_BAGGAGE) == f"200 {chain}"
    if key is None:
        first = onward = OWN_BAGGAGE.encode()
    else:
        first, onward = f"{OWN_BAGGAGE},devstack={key}".encode(), f"devstack={key},{OWN_BAGGAGE}".encode()
    assert stack.hops(OWN_BAGGAGE) == [(hops[0], (first,)), *((hop, (onward,)) for hop in hops[1:])]
    assert {s.method for s in stack.seen} == {"GET"}


# -- the tests -----------------------------------------------------------------------------------------


async def test_extension_key_reaches_each_override_and_clearing_returns_the_baselines(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_BUDGET):
        async with demo_stack(tmp_path / "access.jsonl") as stack, chromium(extension=True) as browser:
            popup = await browser.new_page(f"chrome-extension://{await extension_id(browser)}/popup.html")
            await popup.wait_for("typeof window.devstack === 'object'")
            state = await popup.evaluate("devstack.setKey('alice', ['*.localhost', 'localhost'])")
            assert (state["key"], state["permitted"]) == ("alice", True)
            assert state["rule"]["action"]["requestHeaders"] == [
                {"header": "x-devstack-key", "operation": "set", "value": "alice"}
            ]
            assert await popup.evaluate("chrome.action.getBadgeText({})") == "alic"

            page = await browser.new_page()
            stack.seen.clear()
            assert await checkout_page(page, stack.url("checkout")) == probes(ALICE, PAY_ALICE)
            assert await page.evaluate("document.getElementById('served-by').textContent") == "checkout [baseline]"
            assert_page_traffic(stack, b"alice", PAY_ALICE)
            # A navigation straight to a chain: the document names every hop's version.
            assert await document_text(page, stack.url("checkout", "/chain")) == ALICE
            await assert_own_baggage_intact(stack, page, ALICE, HOPS_ALICE, "alice")
            assert await document_text(page, stack.url("payments")) == PAY_ALICE

            state = await popup.evaluate("devstack.clearKey()")
            assert (state["key"], state["rule"]) == (None, None)
            assert await popup.evaluate("chrome.action.getBadgeText({})") == ""

            stack.seen.clear()
            assert await checkout_page(page, stack.url("checkout")) == probes(NOBODY, PAY_BASE)
            assert_page_traffic(stack, None, PAY_BASE)
            assert await document_text(page, stack.url("checkout", "/chain")) == NOBODY
            await assert_own_baggage_intact(stack, page, NOBODY, HOPS_NOBODY, None)
            assert await document_text(page, stack.url("payments")) == PAY_BASE
        methods = router_methods(stack.access_log)
        assert methods and set(methods) == {"GET"}, "the router saw something else than GETs (a preflight?)"


async def test_preview_host_without_the_extension(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_BUDGET):
        async with demo_stack(tmp_path / "access.jsonl") as stack, chromium(extension=False) as browser:
            page = await browser.new_page()
            stack.seen.clear()
            # The page derives its peer from its own host: alice--payments.localhost, over fetch and ws.
            assert await checkout_page(page, stack.url("alice--checkout")) == probes(ALICE, PAY_ALICE)
            assert await page.evaluate("document.getElementById('cors-url').textContent") == stack.url(
                "alice--payments"
            )
            assert await page.evaluate("document.getElementById('ws-url').textContent") == (
                f"ws://alice--payments.localhost:{stack.port}/ws"
            )
            assert_page_traffic(stack, b"alice", PAY_ALICE)
            assert await document_text(page, stack.url("alice--checkout", "/chain")) == ALICE
            await assert_own_baggage_intact(stack, page, ALICE, HOPS_ALICE, "alice")
            assert await document_text(page, stack.url("alice--payments")) == PAY_ALICE

            # bob's override is of orders, one hop down: his page's payments probes reach the baseline.
            stack.seen.clear()
            assert await checkout_page(page, stack.url("bob--checkout")) == probes(BOB, PAY_BASE)
            assert_page_traffic(stack, b"bob", PAY_BASE)

            # Leaving the preview host is the way back: the plain host is the baseline everywhere.
            stack.seen.clear()
            assert await checkout_page(page, stack.url("checkout")) == probes(NOBODY, PAY_BASE)
            assert_page_traffic(stack, None, PAY_BASE)
            await assert_own_baggage_intact(stack, page, NOBODY, HOPS_NOBODY, None)
        methods = router_methods(stack.access_log)
        assert methods and set(methods) == {"GET"}, "the router saw something else than GETs (a preflight?)"


async def test_key_cookie_without_the_extension(tmp_path: Path) -> None:
    async with asyncio.timeout(TEST_BUDGET):
        async with demo_stack(tmp_path / "access.jsonl") as stack, chromium(extension=False) as browser:
            page = await browser.new_page()
            home = stack.url("checkout")
            stack.seen.clear()
            shown = await checkout_page(page, stack.url("checkout", "/?devstack=alice"))
            # The router answered 302 to the same URL without the parameter; the browser followed it.
            assert await page.evaluate("location.href") == home
            assert await page.evaluate("performance.getEntriesByType('navigation')[0].redirectCount") == 1
            [cookie] = (await browser.send("Storage.getCookies"))["cookies"]
            assert (cookie["name"], cookie["value"], cookie["path"]) == ("devstack-key", "alice", "/")
            assert (cookie["domain"], cookie["httpOnly"], cookie["sameSite"]) == ("checkout.localhost", True, "Lax")
            # The cookie is host-only (checkout.localhost) and the cross-origin fetch is not credentialed,
            # so neither it nor the WebSocket to payments.localhost carries a key: both get the baseline.
            # Only the same-origin probe (and the navigation) reach alice's override. Nor can one cookie
            # cover every *.localhost host: Chromium drops a cookie with Domain=localhost (measured with
            # --key-cookie-domain localhost: no cookie stored, every probe on the baseline).
            assert shown == {"chain": ALICE, "cors": PAY_BASE, "ws": PAY_BASE}
            assert stack.first("checkout [baseline]", "navigate").baggage == (b"devstack=alice",)
            assert stack.first("checkout [baseline]", "cors", "/chain").baggage == (b"devstack=alice",)
            assert stack.first(PAY_BASE, "cors").baggage == ()
            assert stack.first(PAY_BASE, "websocket", "/ws").baggage == ()
            assert await document_text(page, stack.url("checkout", "/chain")) == ALICE
            await assert_own_baggage_intact(stack, page, ALICE, HOPS_ALICE, "alice")
            # The browser sent the cookie every time, the router took the pair out of what it forwarded.
            assert not any(b"devstack-key" in line for s in stack.seen for line in s.cookie)

            # ?devstack= clears it: the baseline again, everywhere, and no cookie left.
            stack.seen.clear()
            shown = await checkout_page(page, stack.url("checkout", "/?devstack="))
            assert await page.evaluate("location.href") == home
            assert shown == probes(NOBODY, PAY_BASE)
            assert (await browser.send("Storage.getCookies"))["cookies"] == []
            assert_page_traffic(stack, None, PAY_BASE)
            await assert_own_baggage_intact(stack, page, NOBODY, HOPS_NOBODY, None)
        methods = router_methods(stack.access_log)
        assert methods and set(methods) == {"GET"}, "the router saw something else than GETs (a preflight?)"

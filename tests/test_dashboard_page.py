"""The dashboard page at ``/`` of the router's admin listener and of the controller.

Without a browser: the page of a real router and of a real controller holds every service and
override, their states, the preview and "use this key" links, filters with ``?q=``/``?status=``,
escapes what it shows, loads nothing from elsewhere, and renders a big table fast. In headless
Chromium (skipped when there is none): the page renders a realistic table (screenshots are
written to the test's tmp folder and copied to ``build/screenshots/``), filters as you type, reads
the same with JavaScript off, and follows a table swap live.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controller.cli import Controller
from controller.publish import RoutePublisher, make_publish_app
from controller.sources.file import load_route_file
from router import dashboard
from router.admin import ADMIN_STATE
from router.server import RouterServer
from router.settings import RouterSettings
from router.table import Fallback, Override, Routes, RouteTable, Target
from tests.browser import Browser, Session, chromium_binary, png_size
from tests.support import Origin, running_router

ROOT = Path(__file__).resolve().parents[1]
SCREENSHOTS = ROOT / "build" / "screenshots"
HOSTILE = 'file:/srv/<script>alert("x")</script>&routes.yaml'

# fmt: off
SERVICES = (
    "accounts", "audit", "billing", "cart", "catalog", "checkout", "coupons", "currency", "delivery", "discovery",
    "email", "experiments", "feature-flags", "fraud", "gateway", "geo", "identity", "images", "inventory", "invoices",
    "ledger", "loyalty", "media", "messaging", "notifications", "orders", "payments", "payouts", "pricing",
    "profiles", "promotions", "ratings", "recommendations", "refunds", "reporting", "returns", "reviews", "risk",
    "search", "sessions", "shipping", "sms", "storefront", "subscriptions", "tax", "tickets", "translations",
    "uploads", "users", "wallet", "warehouse",
)
DEVELOPERS = (
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "mallory", "niaj", "olivia",
    "peggy", "rupert", "sybil", "trent", "victor", "walter", "yasmin", "zoe", "arjun", "mei", "sofia", "liam",
    "noah", "emma",
)
# fmt: on


def realistic_table(now: float, version: int = 412, services: int = 50, seed: int = 14) -> RouteTable:
    """``services`` services (hosts, in-cluster baselines) and a few hundred overrides: most ready,
    some not ready, some expiring within the hour, some expired, some with baseline fallback."""
    rng = random.Random(seed)
    built: dict[str, Routes] = {}
    for index, name in enumerate(SERVICES[:services]):
        overrides: dict[str, Override] = {}
        keys = rng.sample(DEVELOPERS, rng.choice((0, 1, 2, 3, 4, 6, 8, 10, 14)))
        if index % 7 == 0:
            keys.append(f"pr-{rng.randint(1000, 9999)}")
        for key in keys:
            roll = rng.random()
            expires: float | None = None
            if roll < 0.06:
                expires = now - rng.randint(60, 20 * 3600)  # expired
            elif roll < 0.14:
                expires = now + rng.randint(120, 3500)  # expiring within the hour
            elif roll < 0.75:
                expires = now + rng.randint(2 * 3600, 3 * 86400)
            overrides[key] = Override(
                key=key,
                target=Target(f"http://{name}-{key}.dev-{key}.svc.cluster.local:8080"),
                ready=rng.random() > 0.1,
                expires_at=expires,
                fallback=Fallback.BASELINE if rng.random() < 0.2 else Fallback.ERROR,
                namespace=f"dev-{key}",
                workload=f"{name}-{key}",
            )
        hosts = (name, f"{name}.localhost", f"{name}.shop.svc.cluster.local")
        built[name] = Routes(name, Target(f"http://{name}.shop.svc.cluster.local:8080"), overrides, hosts)
    return RouteTable(built, version=version, sources=("remote",))


def _small_table(origins: dict[str, Origin], now: float, sources: tuple[str, ...] = (HOSTILE,)) -> RouteTable:
    def ov(key: str, url: str, **extra: Any) -> Override:
        return Override(key=key, target=Target(url), namespace=f"dev-{key}", workload=f"payments-{key}", **extra)

    payments = Routes(
        "payments",
        Target(origins["baseline"].url),
        {
            "alice": ov("alice", origins["alice"].url),
            "bob": ov("bob", origins["bob"].url, ready=False),
            "carol": ov("carol", origins["bob"].url, expires_at=now + 20 * 60),
            "dave": ov("dave", origins["bob"].url, expires_at=now - 3600, fallback=Fallback.BASELINE),
            "erin": ov("erin", origins["bob"].url, expires_at=now + 5 * 3600 + 14 * 60),
        },
        ("payments", "payments.localhost"),
    )
    orders = Routes("orders", Target(origins["baseline"].url), {"bob": ov("bob", origins["bob"].url)}, ("orders",))
    quiet = Routes("ledger", Target(origins["baseline"].url))
    return RouteTable({"payments": payments, "orders": orders, "ledger": quiet}, version=9, sources=sources)


def _links_for(server: RouterServer, preview_domain: str) -> dashboard.Links:
    """What the router's composition root should hand the admin listener (``AdminState.links``)."""
    links = dashboard.Links.for_router(preview_domain, server.address)
    runner = server._admin_runner  # the admin app is built inside RouterServer.start
    assert runner is not None
    runner.app[ADMIN_STATE].links = links
    return links


def _assert_self_contained(page: str) -> None:
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link\b", page, re.I)
    assert not re.search(r"<img\b|<iframe\b", page, re.I)
    assert "@import" not in page
    assert "url(" not in page


def _rows(page: str) -> set[str]:
    return set(re.findall(r'<tr class="ov [^"]*" data-key="([^"]+)"', page))


async def _first_event(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        assert response.status == 200
        assert response.content_type == "text/event-stream"
        async for line in response.content:
            if line.startswith(b"data: "):
                payload: dict[str, Any] = json.loads(line[6:])
                return payload
    raise AssertionError("the event stream ended without an event")


# -- without a browser ------------------------------------------------------------------------------


async def test_router_dashboard(origins: dict[str, Origin]) -> None:
    now = time.time()
    table = _small_table(origins, now)
    async with running_router(table, RouterSettings(), admin=True) as server, aiohttp.ClientSession() as session:
        port = server.address[1]
        links = _links_for(server, "preview.test")
        proxy = f"http://127.0.0.1:{port}/"
        for baggage in ("devstack=alice", "devstack=alice", "devstack=bob", "x=1"):
            async with session.get(proxy, headers={"Host": "payments", "baggage": baggage}) as response:
                await response.read()
        admin = f"http://127.0.0.1:{server.admin_address[1]}"
        async with session.get(admin + "/") as response:
            assert response.status == 200
            assert response.content_type == "text/html"
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            page = await response.text()

        _assert_self_contained(page)
        for service in ("payments", "orders", "ledger"):
            assert f'data-service="{service}"' in page
        assert _rows(page) == {"alice", "bob", "carol", "dave", "erin"}
        assert f'href="http://alice--payments.preview.test:{port}/"' in page
        assert links.preview("orders", "bob") == f"http://bob--orders.preview.test:{port}/"
        # On loopback the links use the service's *.localhost host and the router's own port.
        assert f'href="http://payments.localhost:{port}/?devstack=alice"' in page
        assert f'href="http://orders:{port}/?devstack=bob"' in page  # no better host of its own
        for word in ("\u2713 ready", "\u25cf not ready", "\u25f7 expiring soon", "\u2715 expired", "no overrides"):
            assert word in page, word
        assert "20m left" in page or "19m left" in page
        assert "5h 14m left" in page or "5h 13m left" in page
        assert "1h ago" in page or "59m ago" in page
        assert re.search(r'<td class="fb fb-base" title="[^"]+">baseline</td>', page)
        assert re.search(r'<td class="fb" title="[^"]+">503 error</td>', page)
        assert "dev-alice / payments-alice" in page
        assert "table <b>v9</b>" in page
        # Requests per (service, target) from the router's own counters.
        assert '<span class="n baseline">1 baseline</span>' in page  # x=1; bob is not ready: 503
        assert '<span class="n override">2 override</span>' in page
        assert '<span class="n error">1 error</span>' in page
        assert "<b>1</b> not ready</a>" in page and "<b>1</b> expiring within 1 h</a>" in page
        assert "<b>1</b> expired</a>" in page
        # The hostile source name is shown escaped, never as markup.
        assert "<script>alert" not in page
        assert "file:/srv/&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;routes.yaml" in page

        async with session.get(admin + "/", params={"q": "alice"}) as response:
            filtered = await response.text()
        assert _rows(filtered) == {"alice"}
        assert 'data-service="orders"' not in filtered
        assert "1 of 6 overrides" in filtered
        assert 'value="alice"' in filtered
        async with session.get(admin + "/", params={"q": "orders"}) as response:
            assert _rows(await response.text()) == {"bob"}  # a service name selects all its overrides
        async with session.get(admin + "/", params={"status": "attention"}) as response:
            assert _rows(await response.text()) == {"bob", "carol", "dave"}
        async with session.get(admin + "/", params={"q": "<nobody>", "status": "expired"}) as response:
            nothing = await response.text()
        assert _rows(nothing) == set() and "No service or override matches" in nothing
        assert 'value="&lt;nobody&gt;"' in nothing

        event = await _first_event(session, admin + "/dashboard/events")
        assert event["version"] == 9
        assert event["order"] == ["ledger", "orders", "payments"]
        assert set(event["services"]) == {"ledger", "orders", "payments"}
        assert 'data-key="alice"' in event["services"]["payments"]
        assert "table <b>v9</b>" in event["status"]


async def test_controller_dashboard(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    shutil.copy(ROOT / "examples" / "routes.yaml", routes)
    controller = Controller(routes=routes, listen="127.0.0.1:0")
    await controller.start()
    try:
        async with aiohttp.ClientSession() as session:
            base = f"http://127.0.0.1:{controller.address[1]}"
            async with session.get(base + "/") as response:
                assert response.status == 200
                assert response.content_type == "text/html"
                page = await response.text()
            event = await _first_event(session, base + "/dashboard/events")
    finally:
        await controller.close()
    _assert_self_contained(page)
    for service in ("checkout", "orders", "payments"):
        assert f'data-service="{service}"' in page
    assert _rows(page) == {"alice", "bob", "carol", "dave"}
    assert 'devstack<span class="role">controller</span>' in page
    # No ingress given: use-this-key links on the service's host, and no preview links.
    assert 'href="http://payments/?devstack=alice"' in page
    assert "preview \u2197" not in page
    assert "\u25cf not ready" in page and "\u2713 ready" in page
    assert 'href="v1/routes"' in page
    assert event["version"] == 1 and set(event["services"]) == {"checkout", "orders", "payments"}


async def test_controller_dashboard_links_problems_and_live_events() -> None:
    now = time.time()
    publisher = RoutePublisher()
    publisher.publish(realistic_table(now, version=3, services=5).with_version(3, (HOSTILE,)))
    status = {
        "conflicts": ["service 'orders': 2 baseline Deployments (a, b); none is routed"],
        "leaks": [{"service": "payments", "key": "<b>x</b>", "namespace": "dev-x", "deployment": "payments-x"}],
        "watches": {"deployments": {"connected": False, "last_error": "403 Forbidden"}},
    }
    confirmed = {HOSTILE: time.monotonic() - 75}
    app = make_publish_app(
        publisher,
        readiness=lambda: (True, {"errors": {}}),
        status=lambda: status,
        links=dashboard.Links(preview_domain="preview.example.com"),
        confirmed=confirmed,
        failures={HOSTILE: 2},
    )
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(base + "/") as response:
                page = await response.text()
            _assert_self_contained(page)
            some = next(r for r in publisher.table.services.values() if r.overrides)
            key = sorted(some.overrides)[0]
            assert f'href="http://{key}--{some.service}.preview.example.com/"' in page
            # Not on loopback: neither *.localhost nor cluster-internal names, so the service's name.
            assert f'href="http://{some.service}/?devstack={key}"' in page
            assert "3 problems" in page
            assert "leak: override payments/&lt;b&gt;x&lt;/b&gt;" in page
            assert "watch deployments disconnected: 403 Forbidden" in page
            assert "<b>x</b>" not in page and "<script>alert" not in page
            assert "1m ago" in page and "2\u2717" in page  # the source's age and failures

            # The event stream sends the current fragments at once, then a newly published table
            # as soon as it is published, with only what changed.
            async with session.get(base + "/dashboard/events") as response:
                lines = response.content
                first = await _next_data(lines)
                assert first["version"] == 3 and len(first["services"]) == 5
                grown = dict(publisher.table.services)
                grown["zz-new"] = Routes("zz-new", Target("http://zz-new.shop:8080"))
                publisher.publish(RouteTable(grown, version=4, sources=publisher.table.sources))
                second = await _next_data(lines)
                assert second["version"] == 4
                assert list(second["services"]) == ["zz-new"]
                assert second["order"][-1] == "zz-new"
    finally:
        await runner.cleanup()


async def _next_data(lines: aiohttp.StreamReader) -> dict[str, Any]:
    async for line in lines:
        if line.startswith(b"data: "):
            payload: dict[str, Any] = json.loads(line[6:])
            return payload
    raise AssertionError("the event stream ended")


def test_render_time_with_fifty_services_and_hundreds_of_overrides() -> None:
    now = time.time()
    table = realistic_table(now)
    overrides = sum(len(r.overrides) for r in table.services.values())
    assert len(table.services) == 50 and overrides >= 200
    requests: dict[tuple[str, ...], int] = {
        (n, kind): 1000 for n in table.services for kind in ("baseline", "override")
    }
    snap = dashboard.Snapshot(table, now, "router", dashboard.Links.for_router("preview.test", ("127.0.0.1", 8080)))
    snap = dashboard.Snapshot(table, now, "router", snap.links, requests, (dashboard.SourceState("remote", 3.0),), True)
    timings = []
    for _ in range(7):
        started = time.perf_counter()
        page = dashboard.render_page(snap)
        timings.append(time.perf_counter() - started)
    best, median = min(timings) * 1000, statistics.median(timings) * 1000
    print(f"dashboard render: {len(table.services)} services, {overrides} overrides, {len(page) / 1024:.0f} KiB: "
          f"best {best:.1f} ms, median {median:.1f} ms")  # fmt: skip
    assert best < 100, f"rendering took {best:.1f} ms"
    assert len(_rows(page)) > 0 and page.count('<tr class="ov ') == overrides


def test_statuses_and_durations() -> None:
    now = 1_000_000.0
    target = Target("http://x:1")
    assert dashboard.override_status(Override("a", target), now) == ("ready", False)
    assert dashboard.override_status(Override("a", target, ready=False), now) == ("not-ready", False)
    assert dashboard.override_status(Override("a", target, expires_at=now + 60), now) == ("expiring", True)
    assert dashboard.override_status(Override("a", target, ready=False, expires_at=now + 60), now) == (
        "not-ready",
        True,
    )
    assert dashboard.override_status(Override("a", target, ready=False, expires_at=now), now) == ("expired", False)
    assert dashboard.override_status(Override("a", target, expires_at=now + 7200), now) == ("ready", False)
    assert [dashboard.duration(s) for s in (5, 59, 60, 3599, 3600, 8040, 86400, 97200)] == [
        "5s",
        "59s",
        "1m",
        "59m",
        "1h",
        "2h 14m",
        "1d",
        "1d 3h",
    ]
    assert dashboard.Links.for_router(None, ("0.0.0.0", 8080)) == dashboard.Links()
    assert dashboard.Links.for_router("p.test", ("::1", 8080)).port == 8080
    routes = Routes("pay", target, {}, ("pay", "pay.localhost", "pay.ns.svc", "pay.example.com", "pay.p.test"))
    assert dashboard.Links(loopback=True).service_host(routes) == "pay.localhost"
    assert dashboard.Links(preview_domain="p.test").service_host(routes) == "pay.p.test"
    assert dashboard.Links().service_host(routes) == "pay.example.com"
    assert dashboard.Links().service_host(Routes("pay", target, {}, ("pay.ns.svc.cluster.local",))) == (
        "pay.ns.svc.cluster.local"
    )
    assert dashboard.Links(port=8080).use_key(routes, "alice") == "http://pay.example.com:8080/?devstack=alice"
    assert dashboard.Links("p.test", 443, "https").preview("pay", "alice") == "https://alice--pay.p.test/"


def test_an_h2c_service_is_marked_and_an_http1_one_is_not() -> None:
    users = Routes("users", Target("http://10.0.0.7:9090", "h2c"))
    table = RouteTable({"users": users, "payments": Routes("payments", Target("http://10.0.0.1:8080"))}, version=1)
    page = dashboard.render_page(dashboard.Snapshot(table, time.time(), "router", dashboard.Links()))
    bodies = re.finditer(r'<tbody class="svc" data-service="([^"]+)">(.*?)</tbody>', page)
    service = {m.group(1): m.group(2) for m in bodies}
    assert '<span class="lbl" title="protocol">h2c</span>' in service["users"]
    assert 'title="protocol"' not in service["payments"]


# -- in headless Chromium ---------------------------------------------------------------------------

needs_chromium = pytest.mark.skipif(
    chromium_binary() is None, reason="no Chromium binary (apt-get install chromium, or set $CHROMIUM)"
)


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with Browser.launch() as launched:
        yield launched


def _keep(data: bytes, tmp_path: Path, name: str) -> Path:
    """Write a screenshot under the test's tmp folder and copy it to build/screenshots/."""
    width, height = png_size(data)
    assert width >= 1000 and height >= 300, (width, height)
    assert len(data) > 20_000, len(data)
    path = tmp_path / name
    path.write_bytes(data)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SCREENSHOTS / name)
    return path


async def _open(browser: Browser, url: str, rows: int, live: bool = True) -> Session:
    page = await browser.new_page()
    await page.navigate(url)
    await page.wait_for(f"document.querySelectorAll('tr.ov').length >= {rows}")
    if live:
        await page.wait_for("document.getElementById('live').classList.contains('on')")
    return page


@needs_chromium
async def test_dashboard_in_chromium_renders_filters_and_follows_a_swap(browser: Browser, tmp_path: Path) -> None:
    now = time.time()
    table = realistic_table(now)
    overrides = sum(len(r.overrides) for r in table.services.values())
    async with running_router(table, RouterSettings(), admin=True) as server:
        _links_for(server, "preview.test")
        server.stats.source_confirmed["remote"] = time.monotonic() - 4
        for index, name in enumerate(table.services):
            server.stats.requests[(name, "baseline")] += 40 * index + 7
            server.stats.requests[(name, "override")] += 3 * index
        server.stats.requests[("payments", "error")] += 12
        url = f"http://127.0.0.1:{server.admin_address[1]}/"
        page = await _open(browser, url, overrides)

        assert await page.evaluate("document.querySelectorAll('tbody.svc').length") == 50
        assert await page.evaluate("document.getElementById('count').textContent") == f"{overrides} overrides"
        shot = _keep(await page.screenshot(), tmp_path, "dashboard-router.png")
        assert png_size(shot.read_bytes())[1] > 2000  # the whole page, far beyond the 900 px viewport
        _keep(await page.screenshot(full_page=False), tmp_path, "dashboard-router-top.png")

        # Filtering as you type hides the rest and says how many are shown.
        shown = await page.evaluate(
            "(() => { const q = document.getElementById('q'); q.value = 'alice';"
            " q.dispatchEvent(new Event('input')); return [...document.querySelectorAll('tr.ov')]"
            ".filter(tr => !tr.hidden).map(tr => tr.dataset.key); })()"
        )
        alice = [routes for routes in table.services.values() if "alice" in routes.overrides]
        assert shown == ["alice"] * len(alice)
        assert await page.evaluate("location.search") == "?q=alice"
        _keep(await page.screenshot(), tmp_path, "dashboard-router-filtered.png")
        await page.evaluate(
            "(() => { const q = document.getElementById('q'); q.value = ''; q.dispatchEvent(new Event('input')); })()"
        )

        # A swapped table reaches the open page without a reload.
        grown = dict(table.services)
        payments = grown["payments"]
        fresh = Override("zz-live", Target("http://payments-zz.dev:8080"), ready=False, namespace="dev-zz")
        grown["payments"] = Routes(
            "payments", payments.baseline, {**payments.overrides, "zz-live": fresh}, payments.hosts
        )
        del grown["wallet"]
        server.swap(RouteTable(grown, version=table.version + 1, sources=table.sources))
        await page.wait_for('!!document.querySelector(\'tbody[data-service="payments"] tr[data-key="zz-live"]\')', 5)
        assert await page.evaluate("document.querySelector('tr[data-key=\"zz-live\"]').dataset.s") == "not-ready"
        assert await page.evaluate("!document.querySelector('tbody[data-service=\"wallet\"]')")
        assert await page.evaluate("document.querySelector('.ver b').textContent") == f"v{table.version + 1}"
        assert str(await page.evaluate("document.title")).endswith(f"v{table.version + 1}")
        await page.close()

        # With JavaScript off, the server-rendered page is the whole table.
        plain = await browser.new_page()
        await plain.send("Emulation.setScriptExecutionDisabled", value=True)
        await plain.navigate(url + "?status=attention")
        attention = await plain.evaluate("document.querySelectorAll('tr.ov').length")
        assert 0 < attention < overrides
        assert "snapshot" in await plain.evaluate("document.getElementById('live').textContent")
        _keep(await plain.screenshot(), tmp_path, "dashboard-router-nojs-attention.png")
        await plain.close()


@needs_chromium
async def test_demo_table_in_chromium(browser: Browser, tmp_path: Path) -> None:
    services = load_route_file(ROOT / "examples" / "routes.yaml")
    table = RouteTable(services, version=1, sources=("file",))
    async with running_router(table, RouterSettings(), admin=True) as server:
        _links_for(server, "localhost")
        server.stats.source_confirmed["file"] = time.monotonic() - 2
        for (service, kind), n in {
            ("checkout", "baseline"): 42,
            ("orders", "override"): 7,
            ("payments", "error"): 2,
        }.items():
            server.stats.requests[(service, kind)] = n
        page = await _open(browser, f"http://127.0.0.1:{server.admin_address[1]}/", 4)
        port = server.address[1]
        links = await page.evaluate("[...document.querySelectorAll('tr[data-key=\"alice\"] a')].map(a => a.href)")
        assert links == [
            f"http://alice--payments.localhost:{port}/",
            f"http://payments.localhost:{port}/?devstack=alice",
        ]
        _keep(await page.screenshot(), tmp_path, "dashboard-demo.png")
        await page.send("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
        assert await page.evaluate("matchMedia('(prefers-color-scheme: dark)').matches")
        _keep(await page.screenshot(), tmp_path, "dashboard-demo-dark.png")
        await page.close()

    # The same page on a controller serving the demo's route file.
    routes = tmp_path / "routes.yaml"
    shutil.copy(ROOT / "examples" / "routes.yaml", routes)
    controller = Controller(routes=routes, listen="127.0.0.1:0")
    await controller.start()
    try:
        page = await _open(browser, f"http://127.0.0.1:{controller.address[1]}/", 4)
        assert await page.evaluate("document.querySelector('.brand').textContent") == "devstackcontroller"
        _keep(await page.screenshot(), tmp_path, "dashboard-controller-demo.png")
        await page.close()
    finally:
        await controller.close()

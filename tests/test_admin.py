"""The admin listener: health, readiness, metrics, the table and the dry-run resolver."""

from __future__ import annotations

import aiohttp

from router.server import RouterServer
from router.table import EMPTY_TABLE
from tests.support import Origin, make_table, running_router


async def test_admin_endpoints(origins: dict[str, Origin]) -> None:
    table = make_table(
        {"payments": {"baseline": origins["baseline"].url, "overrides": {"alice": origins["alice"].url}}}, version=7
    )
    async with running_router(table, admin=True) as server, aiohttp.ClientSession() as session:
        admin = f"http://127.0.0.1:{server.admin_address[1]}"
        proxy = f"http://127.0.0.1:{server.address[1]}/"
        for baggage in ("devstack=alice", "devstack=alice", "x=1"):
            async with session.get(proxy, headers={"Host": "payments", "baggage": baggage}) as resp:
                assert resp.status == 200
        async with session.get(proxy, headers={"Host": "nowhere"}) as resp:
            assert resp.status == 404

        async with session.get(admin + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(admin + "/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["version"] == 7
        async with session.get(admin + "/routes") as resp:
            routes = await resp.json()
            assert routes["version"] == 7
            assert routes["services"]["payments"]["overrides"]["alice"]["url"] == origins["alice"].url
        async with session.get(admin + "/routes/resolve", params={"service": "payments", "key": "alice"}) as resp:
            decision = await resp.json()
            assert (decision["target"], decision["upstream"], decision["reason"]) == (
                "override",
                origins["alice"].url,
                "override",
            )
        async with session.get(admin + "/routes/resolve", params={"service": "payments", "key": "Not A Label"}) as resp:
            decision = await resp.json()
            assert (decision["target"], decision["key_valid"]) == ("baseline", False)
        async with session.get(admin + "/routes/resolve", params={"service": "nope"}) as resp:
            assert resp.status == 404
        async with session.get(admin + "/metrics") as resp:
            text = await resp.text()
        assert 'devstack_requests_total{service="payments",target="override"} 2.0' in text
        assert 'devstack_requests_total{service="payments",target="baseline"} 1.0' in text
        assert 'devstack_rejected_requests_total{reason="no-route",status="404"} 1.0' in text
        assert "devstack_route_table_version 7.0" in text
        assert 'devstack_request_duration_seconds_count{service="payments",target="override"} 2.0' in text
        assert 'devstack_request_duration_seconds_count{service="payments",target="baseline"} 1.0' in text
        assert 'devstack_request_duration_seconds_count{service="-",target="none"} 1.0' in text
        # One new connection per origin (alice's is reused), each with a response head timed.
        assert "devstack_upstream_connect_seconds_count 2.0" in text
        assert "devstack_upstream_response_head_seconds_count 3.0" in text
        for name in ("process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds"):
            assert f"\n{name} " in text, name
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
        async with session.get(admin + "/metrics", headers=openmetrics) as resp:
            assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
            body = await resp.text()
        assert body.endswith("# EOF\n")
        assert 'devstack_requests_total{service="payments",target="override"} 2.0' in body


async def test_not_ready_before_the_first_table() -> None:
    server = RouterServer(table=EMPTY_TABLE)
    await server.start(("127.0.0.1", 0), ("127.0.0.1", 0))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{server.admin_address[1]}/readyz") as resp:
                assert resp.status == 503
            server.swap(make_table({"a": {"baseline": "http://127.0.0.1:9"}}))
            async with session.get(f"http://127.0.0.1:{server.admin_address[1]}/readyz") as resp:
                assert resp.status == 200
    finally:
        await server.close(drain=0.1)

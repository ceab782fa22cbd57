"""The README's main job: `devstack demo` serves the embedded stack and routes as documented."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from tests.support import free_port

ROOT = Path(__file__).resolve().parents[1]


async def test_demo_routes_the_readme_curl_cases() -> None:
    port, admin = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "router", "demo", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        banner = b""
        while b"Ctrl-C" not in banner:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
            assert line, f"demo exited early: {banner.decode()}"
            banner += line
        assert b"curl -H 'Host: payments'" in banner
        assert b"checkout [baseline] -> orders [baseline] -> payments [override: alice]" in banner
        # What to open in a browser: preview hosts, the cookie link, the dashboard.
        for url in (
            f"http://alice--checkout.localhost:{port}/",
            f"http://bob--checkout.localhost:{port}/",
            f"http://checkout.localhost:{port}/?devstack=alice",
            f"http://127.0.0.1:{admin}/",
        ):
            assert url.encode() in banner, url

        base = f"http://127.0.0.1:{port}/"
        cases = [
            ({"Host": "payments"}, 200, "payments [baseline]"),
            ({"Host": "payments", "baggage": "devstack=alice"}, 200, "payments [override: alice]"),
            ({"Host": "payments", "baggage": "devstack=bob"}, 200, "payments [baseline]"),
            ({"Host": "orders", "baggage": "devstack=alice"}, 200, "orders [baseline] -> payments [override: alice]"),
            ({"Host": "orders"}, 200, "orders [baseline] -> payments [baseline]"),
            # Three hops, each service passing the baggage on with the propagation SDK.
            ({"Host": "checkout"}, 200, "checkout [baseline] -> orders [baseline] -> payments [baseline]"),
            (
                {"Host": "checkout", "baggage": "devstack=alice"},
                200,
                "checkout [baseline] -> orders [baseline] -> payments [override: alice]",
            ),
            (
                {"Host": "checkout", "baggage": "devstack=bob"},
                200,
                "checkout [baseline] -> orders [override: bob] -> payments [baseline]",
            ),
            (
                {"Host": "checkout", "baggage": "userId=u1,devstack=alice;ttl=30"},
                200,
                "checkout [baseline] -> orders [baseline] -> payments [override: alice]",
            ),
            (
                {"Host": "checkout", "baggage": "devstack=carol"},
                200,
                "checkout [baseline] -> orders [baseline] -> payments [503 override-not-ready]",
            ),
        ]
        async with aiohttp.ClientSession() as session:
            for headers, status, text in cases:
                async with session.get(base, headers=headers) as resp:
                    assert (resp.status, (await resp.text()).strip()) == (status, text), headers
            # Two baggage lines are read as one list, by the router and by the SDK in each service.
            two_lines = [("Host", "checkout"), ("baggage", "userId=u1"), ("baggage", "devstack=bob")]
            async with session.get(base, headers=two_lines) as resp:
                expected = "checkout [baseline] -> orders [override: bob] -> payments [baseline]"
                assert (await resp.text()).strip() == expected
            debug = {"Host": "payments", "baggage": "devstack=alice", "x-devstack-debug": "1"}
            async with session.get(base, headers=debug) as resp:
                assert resp.headers["x-devstack-route"].startswith("service=payments; key=alice; target=override")
            async with session.get(base, headers={"Host": "payments", "baggage": "devstack=carol"}) as resp:
                assert resp.status == 503
                assert (await resp.json())["reason"] == "override-not-ready"
            # The browser side (tests/test_demo_frontend.py has the rest): checkout's page, and a
            # preview host routing the page's fetch and WebSocket.
            page = {"Host": f"alice--checkout.localhost:{port}", "Accept": "text/html"}
            async with session.get(base, headers=page) as resp:
                assert resp.content_type == "text/html"
                assert 'fetch("/chain"' in await resp.text()
            async with session.get(base + "chain", headers=page) as resp:
                assert (await resp.text()).strip() == cases[6][2]  # alice's three hops
            ws_host = {"Host": f"alice--payments.localhost:{port}"}
            async with session.ws_connect(base + "ws", headers=ws_host) as ws:
                await ws.send_str("which version?")
                assert await ws.receive_str(timeout=5) == "payments [override: alice]"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 20)
    assert code == 0

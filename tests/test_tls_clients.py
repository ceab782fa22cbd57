"""The TLS ingress as real command-line clients see it: curl and h2load reach the right upstream.

A router in-process on loopback with ``--tls-cert``/``--tls-key`` (ALPN h2 and http/1.1) in front
of the echo origins, driven by the system's ``curl`` (``--http2`` and ``--http1.1``, verifying
the test certificate, SNI and authority the service's name) and ``h2load`` (HTTP/2 by ALPN, many
streams on a few connections), each routed by its baggage key. Then a renewal the way a
Kubernetes secret volume delivers one (an atomic swap of the ``..data`` symlink): the router's
own watcher reloads the pair while an HTTP/2 connection stays open with a stream in flight; that
stream finishes, the connection takes new requests, and a fresh curl handshake verifies only
against the new certificate. The clients block, so they run in threads while the router serves
on the test's loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from aiohttp import web

from benchmarks.h2load import parse_h2load
from router.settings import RouterSettings
from router.table import RouteTable
from tests.h2_client import H2Client
from tests.support import Origin, in_thread, make_table, running_router
from tests.test_http2 import _certificate

TOOL_TIMEOUT = 30.0
"""Seconds any one curl or h2load run may take before the test fails."""

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
needs_h2load = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load not installed (nghttp2-client)")


def _table(origins: dict[str, Origin]) -> RouteTable:
    overrides = {key: origins[key].url for key in ("alice", "bob")}
    return make_table({"web": {"baseline": origins["baseline"].url, "overrides": overrides, "hosts": ["web"]}})


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False)


async def _curl(port: int, cafile: Path, path: str, *options: str) -> tuple[int, str, str, str]:
    """One curl request to ``https://web:PORT/path`` resolved to loopback (so SNI and authority
    are the service's name), trusting only ``cafile``: (exit code, HTTP version, status, body)."""
    argv = [
        "curl", "-q", "-sS", "--noproxy", "*", "--max-time", str(TOOL_TIMEOUT - 5),
        "--cacert", str(cafile), "--resolve", f"web:{port}:127.0.0.1",
        "-w", "\n%{http_version} %{http_code}", *options, f"https://web:{port}{path}",
    ]  # fmt: skip
    done = await in_thread(_run, argv)
    body, _, tail = done.stdout.rpartition("\n")
    version, _, status = tail.partition(" ")
    return done.returncode, version, status, body + done.stderr


def _origin_of(body: str) -> str:
    origin: str = json.loads(body)["origin"]
    return origin


@needs_curl
async def test_curl_http2_and_http1_over_tls_reach_the_keys_upstream(
    tmp_path: Path, origins: dict[str, Origin]
) -> None:
    cert, key = await in_thread(_certificate, tmp_path, "ingress")
    settings = RouterSettings(tls_cert=str(cert), tls_key=str(key))
    async with running_router(_table(origins), settings) as router:
        port = router.address[1]
        h2_alice = await _curl(port, cert, "/h2/alice", "--http2", "-H", "baggage: devstack=alice")
        h2_bob = await _curl(port, cert, "/h2/bob", "--http2", "-H", "baggage: other=1,devstack=bob")
        h2_none = await _curl(port, cert, "/h2/none", "--http2")
        h1_alice = await _curl(port, cert, "/h1/alice", "--http1.1", "-H", "baggage: devstack=alice")
        h1_none = await _curl(port, cert, "/h1/none", "--http1.1")
    results = {
        name: (code, version, status, _origin_of(body) if code == 0 else body)
        for name, (code, version, status, body) in {
            "h2_alice": h2_alice, "h2_bob": h2_bob, "h2_none": h2_none, "h1_alice": h1_alice, "h1_none": h1_none,
        }.items()
    }  # fmt: skip
    assert results == {
        "h2_alice": (0, "2", "200", "alice"),
        "h2_bob": (0, "2", "200", "bob"),
        "h2_none": (0, "2", "200", "baseline"),
        "h1_alice": (0, "1.1", "200", "alice"),
        "h1_none": (0, "1.1", "200", "baseline"),
    }
    # Each origin saw its own requests, marked as having arrived over TLS.
    assert [(s.path, s.header("x-forwarded-proto")) for s in origins["alice"].seen] == [
        ("/h2/alice", ["https"]),
        ("/h1/alice", ["https"]),
    ]
    assert [s.path for s in origins["bob"].seen] == ["/h2/bob"]
    assert [s.path for s in origins["baseline"].seen] == ["/h2/none", "/h1/none"]


@needs_h2load
async def test_h2load_over_tls_completes_every_stream_on_the_keys_upstream(
    tmp_path: Path, origins: dict[str, Origin]
) -> None:
    cert, key = await in_thread(_certificate, tmp_path, "ingress")
    settings = RouterSettings(tls_cert=str(cert), tls_key=str(key))

    def h2load(port: int, path: str, *headers: str) -> str:
        argv = ["h2load", "-n", "200", "-c", "4", "-m", "4", "-H", ":authority: web"]
        for header in headers:
            argv += ["-H", header]
        done = _run([*argv, f"https://127.0.0.1:{port}{path}"])
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    async with running_router(_table(origins), settings) as router:
        port = router.address[1]
        alice = await in_thread(h2load, port, "/load/alice", "baggage: devstack=alice")
        baseline = await in_thread(h2load, port, "/load/none")
        connections = router.stats.h2_connections
    for output in (alice, baseline):
        assert re.search(r"^Application protocol: h2$", output, re.MULTILINE), output
        result = parse_h2load(output)
        assert (result.done, result.requests, result.failed, result.timeouts, result.non_2xx) == (200, 200, 0, 0, 0)
        assert "status codes: 200 2xx, 0 3xx, 0 4xx, 0 5xx" in output
    assert connections == 8  # four connections a run, every request multiplexed on them
    assert [s.path for s in origins["alice"].seen] == ["/load/alice"] * 200
    assert [s.path for s in origins["baseline"].seen] == ["/load/none"] * 200
    assert not origins["bob"].seen


def _secret_volume(directory: Path, version: str, cert: Path, key: Path) -> None:
    """Publish a pair the way the kubelet updates a secret volume: the files in a new directory,
    then the ``..data`` symlink swapped to it in one rename (``tls.crt`` and ``tls.key`` point
    through ``..data``), so a reader never sees one new file with one old."""
    target = directory / f"..{version}"
    target.mkdir()
    shutil.copyfile(cert, target / "tls.crt")
    shutil.copyfile(key, target / "tls.key")
    staged = directory / "..data_tmp"
    staged.symlink_to(target.name)
    os.replace(staged, directory / "..data")
    for name in ("tls.crt", "tls.key"):
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")


@needs_curl
async def test_certificate_renewal_keeps_open_connections_and_new_handshakes_see_it(
    tmp_path: Path, origins: dict[str, Origin]
) -> None:
    first_cert, first_key = await in_thread(_certificate, tmp_path, "first")
    second_cert, second_key = await in_thread(_certificate, tmp_path, "second")
    volume = tmp_path / "secret"
    volume.mkdir()
    _secret_volume(volume, "v1", first_cert, first_key)
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> web.StreamResponse:
        arrived.set()
        await release.wait()
        return web.json_response({"origin": "alice", "held": True})

    origins["alice"].handlers["/held"] = held
    settings = RouterSettings(tls_cert=str(volume / "tls.crt"), tls_key=str(volume / "tls.key"))
    async with running_router(_table(origins), settings) as router:
        port = router.address[1]
        assert router.tls is not None
        before = [await _curl(port, cafile, "/before", "--http2") for cafile in (first_cert, second_cert)]

        trust = ssl.create_default_context(cafile=str(first_cert))
        trust.set_alpn_protocols(["h2"])
        client = await H2Client.connect(port, tls=trust, server_name="web")
        try:
            opened = await client.request("web", "/opened", [("baggage", "devstack=alice")])
            in_flight = client.start("web", "/held", [("baggage", "devstack=alice")])
            await asyncio.wait_for(arrived.wait(), 10)  # the stream is at the origin, waiting
            # The renewal; the router's watcher (no nudge from here) notices it within its poll.
            await in_thread(_secret_volume, volume, "v2", second_cert, second_key)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 3 * router.tls.POLL_SECONDS + 5
            while router.tls.loads < 2:
                assert loop.time() < deadline, "the renewed certificate was never loaded"
                await asyncio.sleep(0.05)
            # Fresh handshakes: only the new certificate verifies now.
            after = [await _curl(port, cafile, "/after", "--http2") for cafile in (first_cert, second_cert)]
            # The connection opened under the old certificate: its stream in flight finishes and
            # it takes new streams.
            release.set()
            await asyncio.wait_for(in_flight.done.wait(), 10)
            still = await client.request("web", "/still", [("baggage", "devstack=alice")])
            goaway = client.goaway
        finally:
            release.set()
            await client.close()
        loads = router.tls.loads
    # curl's exit code 60: the peer's certificate did not verify against the one CA it trusts.
    assert [code for code, *_ in before] == [0, 60] and before[0][1:3] == ("2", "200"), before
    assert [code for code, *_ in after] == [60, 0] and after[1][1:3] == ("2", "200"), after
    assert _origin_of(after[1][3]) == "baseline"
    assert (opened.status, in_flight.status, still.status) == (200, 200, 200)
    assert in_flight.reset is None and json.loads(in_flight.body) == {"origin": "alice", "held": True}
    assert _origin_of(still.body.decode()) == "alice"
    assert goaway is None
    assert loads == 2  # one atomic swap, one reload

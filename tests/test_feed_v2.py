"""The controller's delta feed, ``/v2/routes`` (controller/feed.py, controller/publish.py), and the
router side that follows it (controller/sources/remote.py): a snapshot then deltas, each line
encoded once and shared, gzip as shared segments, a bounded history, slow subscribers that skip
instead of queueing, deltas applied with structural sharing, and the /v1 fallback. Real
controllers on loopback and real HTTP streams; the feed that misbehaves is a scripted server."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import socket
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from controller.publish import PublishSettings, RoutePublisher
from controller.sources.remote import DELTA_PATH, ROUTES_PATH, RemoteSettings, RemoteSource, routes_from_json
from router.table import Override, Routes, RouteTable, Target
from tests.kube.kube_support import eventually
from tests.support import serve_controller as _controller

TIMEOUT = 10.0
QUICK = RemoteSettings(backoff_initial=0.05, backoff_max=0.2)
MAX_LINE = 64 * 1024 * 1024
GROUPS = {"team": ("alice", "bob")}


def _service(index: int, *, port: int = 9000, groups: dict[str, tuple[str, ...]] | None = None) -> Routes:
    name = f"svc{index}"
    octets = f"{index // 250 % 250}.{index % 250}"
    return Routes(
        name,
        Target(f"http://10.0.{octets}:{port}"),
        {"alice": Override("alice", Target(f"http://10.1.{octets}:{port}"), namespace="dev", workload=f"{name}-a")},
        hosts=(f"{name}.default.svc.cluster.local",),
        groups=GROUPS if groups is None else groups,
    )


def _services(count: int, *, port: int = 9000) -> dict[str, Routes]:
    return {f"svc{i}": _service(i, port=port) for i in range(count)}


def _table(services: dict[str, Routes], version: int) -> RouteTable:
    return RouteTable(services, version=version, sources=("kubernetes",))




async def _line(response: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next non-heartbeat line of a feed, parsed."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            line = await response.content.readuntil(b"\n", max_size=MAX_LINE)
            if line.strip():
                return json.loads(line)  # type: ignore[no-any-return]


async def _raw_line(response: aiohttp.ClientResponse) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        while True:
            line = await response.content.readuntil(b"\n", max_size=MAX_LINE)
            if line.strip():
                return line


@contextlib.asynccontextmanager
async def _following(url: str) -> AsyncIterator[RemoteSource]:
    """A router's remote source (as ``--routes-from URL`` runs it) following ``url``."""
    source = RemoteSource(url, lambda name, services: None, lambda name, exc: None, settings=QUICK)
    task = asyncio.create_task(source.run(), name="remote-source-under-test")
    try:
        yield source
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _at(source: RemoteSource, version: int) -> Callable[[], bool]:
    return lambda: source.table is not None and source.table.version == version


# --- the controller side ---------------------------------------------------------------------------


async def test_a_subscriber_gets_a_snapshot_then_deltas_that_carry_the_table_fields() -> None:
    publisher = RoutePublisher()
    first = _services(3)
    publisher.publish(_table(first, 1))
    async with _controller(publisher) as base, aiohttp.ClientSession() as session:
        async with session.get(base + DELTA_PATH) as stream:
            assert stream.headers["Content-Type"] == "application/x-ndjson"
            snapshot = await _line(stream)
            assert snapshot["kind"] == "snapshot" and snapshot["version"] == 1
            assert snapshot["instance"] == publisher.instance
            expected = publisher.table.to_json()
            assert {k: snapshot[k] for k in ("sources", "groups", "services")} == {
                k: expected[k] for k in ("sources", "groups", "services")
            }

            second = {**first, "svc1": _service(1, port=9100), "svc7": _service(7)}
            del second["svc2"]
            publisher.publish(_table(second, 2))
            delta = await _line(stream)
    assert delta["kind"] == "delta" and (delta["from"], delta["version"]) == (1, 2)
    assert delta["instance"] == publisher.instance
    assert delta["sources"] == ["kubernetes"] and delta["groups"] == {"team": ["alice", "bob"]}
    services = publisher.table.to_json()["services"]
    assert delta["set"] == {name: services[name] for name in ("svc1", "svc7")}  # type: ignore[index]
    assert delta["removed"] == ["svc2"]


async def test_a_one_service_change_on_a_10000_service_table_sends_each_subscriber_under_10_kb() -> None:
    services = await asyncio.to_thread(_services, 10_000)
    publisher = RoutePublisher()
    publisher.publish(_table(services, 1))
    async with _controller(publisher) as base, aiohttp.ClientSession(auto_decompress=False) as session:
        for encoding in ("identity", "gzip"):
            headers = {"Accept-Encoding": encoding}
            streams = [await session.get(base + DELTA_PATH, headers=headers) for _ in range(5)]
            decoders = [zlib.decompressobj(31) if encoding == "gzip" else None for _ in streams]
            snapshots = [await _wire_bytes_of_a_line(s, d) for s, d in zip(streams, decoders)]
            version = publisher.table.version + 1
            changed = dict(publisher.table.services)
            changed["svc4321"] = _service(4321, port=9100 + version)
            publisher.publish(_table(changed, version))
            sizes = [await _wire_bytes_of_a_line(s, d) for s, d in zip(streams, decoders)]
            for stream in streams:
                stream.close()
            assert all(size > 100_000 for size in snapshots), (encoding, snapshots)
            assert all(size < 10_000 for size in sizes), (encoding, sizes)


async def _wire_bytes_of_a_line(stream: aiohttp.ClientResponse, decoder: Any) -> int:
    """Bytes off the wire (chunked framing aside) until the next line has ended, decoded or not."""
    size = 0
    async with asyncio.timeout(TIMEOUT):
        while True:
            chunk = await stream.content.readany()
            assert chunk, "the stream ended before the line"
            size += len(chunk)
            text = decoder.decompress(chunk) if decoder is not None else chunk
            if text.endswith(b"\n"):
                return size


async def test_each_line_is_encoded_once_and_the_same_bytes_go_to_every_subscriber() -> None:
    publisher = RoutePublisher()
    publisher.publish(_table(_services(50), 1))
    async with _controller(publisher) as base, aiohttp.ClientSession() as session:
        plain = [await session.get(base + DELTA_PATH, headers={"Accept-Encoding": "identity"}) for _ in range(10)]
        zipped = [await session.get(base + DELTA_PATH, headers={"Accept-Encoding": "gzip"}) for _ in range(10)]
        assert {s.headers.get("Content-Encoding") for s in zipped} == {"gzip"}  # aiohttp decodes it
        snapshots = [await _raw_line(stream) for stream in plain + zipped]
        publisher.publish(_table({**publisher.table.services, "svc3": _service(3, port=9100)}, 2))
        deltas = [await _raw_line(stream) for stream in plain + zipped]
        for stream in plain + zipped:
            stream.close()
    assert len(set(snapshots)) == 1 and len(set(deltas)) == 1  # byte-identical, decoded or not
    assert json.loads(deltas[0])["set"].keys() == {"svc3"}
    assert publisher.feed.encodings == 2  # one snapshot and one delta for 20 streams
    assert publisher.feed.fragment_encodings == 51  # each service once, and the changed one again


async def test_a_gzip_stream_carries_heartbeats_and_ends_as_one_valid_gzip_member() -> None:
    publisher = RoutePublisher()
    publisher.publish(_table(_services(20), 1))
    async with (
        _controller(publisher, settings=PublishSettings(heartbeat=0.05)) as base,
        aiohttp.ClientSession(auto_decompress=False) as session,
    ):
        async with session.get(base + DELTA_PATH, headers={"Accept-Encoding": "gzip"}) as stream:
            assert stream.headers["Content-Encoding"] == "gzip"
            raw = bytearray()
            decoder = zlib.decompressobj(31)
            text = bytearray()

            async def until(condition: Callable[[bytes], bool]) -> None:
                async with asyncio.timeout(TIMEOUT):
                    while not condition(bytes(text)):
                        chunk = await stream.content.readany()
                        assert chunk, "the stream ended early"
                        raw.extend(chunk)
                        text.extend(decoder.decompress(chunk))

            await until(lambda seen: seen.count(b"\n") >= 1)
            publisher.publish(_table(_services(20, port=9100), 2))
            await until(lambda seen: b'"kind":"delta"' in seen and seen.endswith(b"\n\n"))  # a heartbeat after it
            publisher.close()
            async with asyncio.timeout(TIMEOUT):
                raw.extend(await stream.content.read())
    whole = gzip.decompress(bytes(raw))  # checks the trailer's CRC-32 and length
    lines = [json.loads(line) for line in whole.split(b"\n") if line]
    assert [(line["kind"], line["version"]) for line in lines] == [("snapshot", 1), ("delta", 2)]
    assert b"\n\n" in whole


async def test_a_subscriber_whose_version_is_forgotten_or_foreign_gets_a_snapshot() -> None:
    publisher = RoutePublisher()
    services = _services(5)
    for version in range(1, 71):  # more versions than the history keeps (64)
        services = {**services, "svc0": _service(0, port=9000 + version)}
        publisher.publish(_table(services, version))
    current = publisher.table.version
    instance = publisher.instance
    async with _controller(publisher) as base, aiohttp.ClientSession() as session:

        async def first_line(query: str) -> dict[str, Any]:
            async with session.get(f"{base}{DELTA_PATH}?{query}") as stream:
                return await _line(stream)

        recent = await first_line(f"since={current - 3}&instance={instance}")
        forgotten = await first_line(f"since=2&instance={instance}")
        foreign = await first_line(f"since={current}&instance=another-run")
        future = await first_line(f"since={current + 50}&instance={instance}")
        async with session.get(f"{base}{DELTA_PATH}?since={current}&instance={instance}") as up_to_date:
            publisher.publish(_table({**services, "svc1": _service(1, port=9500)}, current + 1))
            next_change = await _line(up_to_date)
    assert (recent["kind"], recent["from"], recent["set"].keys()) == ("delta", current - 3, {"svc0"})
    assert [line["kind"] for line in (forgotten, foreign, future)] == ["snapshot"] * 3
    assert (next_change["kind"], next_change["from"], next_change["set"].keys()) == ("delta", current, {"svc1"})


async def test_a_slow_subscriber_holds_about_one_line_and_skips_to_the_newest_version() -> None:
    """A subscriber that stops reading: the controller renders nothing more for it and buffers at
    most one line; when it reads again, one delta spans every version it missed."""
    tables = await asyncio.to_thread(lambda: (_services(5_000), _services(5_000, port=9100)))
    publisher = RoutePublisher()
    publisher.publish(_table(tables[0], 1))

    def small_receive_buffer(addr_info: Any) -> socket.socket:
        sock = socket.socket(addr_info[0], addr_info[1], addr_info[2])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        return sock

    connector = aiohttp.TCPConnector(socket_factory=small_receive_buffer)
    async with (
        _controller(publisher) as base,
        aiohttp.ClientSession(connector=connector, headers={"Accept-Encoding": "identity"}) as session,
        session.get(base + DELTA_PATH) as stream,
    ):
        assert (await _line(stream))["version"] == 1
        largest = 0
        version = 1
        # Every version replaces all 5,000 services (a 750 KB delta): kernel buffers fill within a few.
        while publisher.feed_buffered() == 0:
            version += 1
            assert version < 40, "the stream never blocked"
            encodings = publisher.feed.encodings
            publisher.publish(_table(tables[version % 2], version))
            await eventually(
                lambda: publisher.feed.encodings > encodings,  # noqa: B023 (read at once)
                timeout=TIMEOUT,
                what="the stream took the new version",
            )
            # The stream wrote this version's delta (synchronously, before awaiting the drain).
            largest = max(largest, len(publisher.feed.frame(version - 1).line))
        blocked_at, blocked_version = publisher.feed.encodings, version
        for _ in range(30):
            version += 1
            publisher.publish(_table(tables[version % 2], version))
            await asyncio.sleep(0)  # a loop turn for a stream that is not blocked to act; this one is
            assert publisher.feed_buffered() <= largest + 64 * 1024
        assert publisher.feed.encodings == blocked_at, "nothing rendered for a stream that cannot take it"
        caught_up = []
        while not caught_up or caught_up[-1]["version"] != version:
            line = await _line(stream)
            if line["version"] > blocked_version:
                caught_up.append(line)
    assert [(line["kind"], line["from"]) for line in caught_up] == [("delta", blocked_version)]


# --- the router side --------------------------------------------------------------------------------


async def test_deltas_applied_by_a_router_equal_a_full_rebuild_and_share_unchanged_services() -> None:
    publisher = RoutePublisher()
    publisher.publish(_table(_services(1_000), 1))
    async with _controller(publisher) as base, _following(base) as source:
        await eventually(_at(source, 1), timeout=TIMEOUT, what="the snapshot")
        before = source.table
        assert before is not None and source.feed_path == DELTA_PATH

        services = {**publisher.table.services, "svc5": _service(5, port=9100), "svc1000": _service(1000)}
        del services["svc6"]
        publisher.publish(_table(services, 2))
        await eventually(_at(source, 2), timeout=TIMEOUT, what="the delta")
        after = source.table
        assert after is not None
        rebuilt = RouteTable(routes_from_json(json.loads(json.dumps(publisher.table.to_json())))[1], 2, ("kubernetes",))
        assert after.to_json() == publisher.table.to_json() == rebuilt.to_json()
        shared = [name for name in after.services if name not in ("svc5", "svc1000")]
        assert all(after.services[name] is before.services[name] for name in shared)
        assert after.services["svc5"] is not before.services["svc5"]

        # A route group edited: every service carries groups, so every one is rebuilt with them.
        regrouped = {name: _regroup(routes, {"crew": ("bob", "alice")}) for name, routes in services.items()}
        publisher.publish(_table(regrouped, 3))
        await eventually(_at(source, 3), timeout=TIMEOUT, what="the regrouping delta")
        assert source.table is not None and source.table.to_json() == publisher.table.to_json()
        assert source.table.resolve("svc0", "crew").via == "alice"  # type: ignore[union-attr]
        assert source.table.resolve("svc0", "team").via is None  # type: ignore[union-attr]


def _regroup(routes: Routes, groups: dict[str, tuple[str, ...]]) -> Routes:
    return Routes(routes.service, routes.baseline, routes.overrides, routes.hosts, groups)


SNAPSHOT_V1 = {
    "kind": "snapshot",
    "version": 1,
    "instance": "scripted",
    "sources": ["file"],
    "groups": {},
    "services": {"payments": {"hosts": [], "baseline": "http://10.0.0.1:80", "overrides": {}}},
}
DELTA_FROM_ELSEWHERE = {
    "kind": "delta",
    "from": 5,
    "version": 6,
    "instance": "scripted",
    "sources": ["file"],
    "groups": {},
    "set": {"payments": {"hosts": [], "baseline": "http://10.9.9.9:80", "overrides": {}}},
    "removed": [],
}
SNAPSHOT_V6 = {
    **SNAPSHOT_V1,
    "version": 6,
    "services": {"payments": {"hosts": [], "baseline": "http://10.0.0.6:80", "overrides": {}}},
}


async def test_a_delta_from_a_version_the_router_does_not_hold_makes_it_resubscribe_for_a_snapshot() -> None:
    """A scripted feed: a snapshot of v1, then a delta from v5; the router must not apply it."""
    queries: list[dict[str, str]] = []
    script = [[SNAPSHOT_V1, DELTA_FROM_ELSEWHERE], [SNAPSHOT_V6]]
    release = asyncio.Event()

    async def feed(request: web.Request) -> web.StreamResponse:
        queries.append(dict(request.query))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        for document in script[min(len(queries), len(script)) - 1]:
            await response.write(json.dumps(document).encode() + b"\n")
        await release.wait()  # hold the stream open, as a controller does
        return response

    app = web.Application()
    app.router.add_get(DELTA_PATH, feed)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    held: list[str] = []
    source = RemoteSource(
        f"http://127.0.0.1:{port}",
        lambda name, services: held.append(services["payments"].baseline.url),
        lambda name, exc: None,
        settings=QUICK,
    )
    task = asyncio.create_task(source.run(), name="remote-source-under-test")
    try:
        await eventually(_at(source, 6), timeout=TIMEOUT, what="the second snapshot")
    finally:
        release.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await runner.cleanup()
    assert queries[:2] == [{}, {}], "the resubscription asks for a snapshot (no since)"
    assert "http://10.9.9.9:80" not in held and held[-1] == "http://10.0.0.6:80"


async def test_a_router_falls_back_to_v1_when_the_controller_has_no_v2() -> None:
    publisher = RoutePublisher()
    publisher.publish(_table(_services(10), 1))
    asked: list[str] = []

    @web.middleware
    async def predates_v2(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        asked.append(request.path)
        if request.path == DELTA_PATH:
            raise web.HTTPNotFound()
        return await handler(request)

    async with _controller(publisher, middlewares=(predates_v2,)) as base, _following(base) as source:
        await eventually(_at(source, 1), timeout=TIMEOUT, what="the table over /v1")
        publisher.publish(_table({**publisher.table.services, "svc2": _service(2, port=9100)}, 2))
        await eventually(_at(source, 2), timeout=TIMEOUT, what="the next table over /v1")
        assert source.table is not None and source.table.to_json() == publisher.table.to_json()
    assert source.feed_path == ROUTES_PATH
    assert asked[:2] == [DELTA_PATH, ROUTES_PATH]


@pytest.mark.parametrize("path", [ROUTES_PATH, DELTA_PATH])
async def test_a_feed_path_in_the_url_is_followed_as_written(path: str) -> None:
    publisher = RoutePublisher()
    publisher.publish(_table(_services(3), 1))
    async with _controller(publisher) as base, _following(base + path) as source:
        await eventually(_at(source, 1), timeout=TIMEOUT, what="the table")
    assert source.feed_path == path

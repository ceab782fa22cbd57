"""The access log (router/accesslog.py) through a real router: one valid line per exchange with
every documented field, the query only when asked, the text format, sampling that never hides an
error, and a destination that stops reading (a pipe nobody drains) never stalling a request.

Lines reach the file when the router closes (the writer's last flush), so each test reads the
log after its router has stopped: no waiting on the writer's timer.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from router.accesslog import AccessLog
from router.server import RouterServer
from router.settings import RouterSettings
from tests.support import Origin, exchange, make_table, reset, running_router, split_responses


def _table(origins: dict[str, Origin]) -> Any:
    return make_table({"a": {"baseline": origins["baseline"].url, "overrides": {"alice": origins["alice"].url}}})


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_every_exchange_is_one_json_line_with_its_fields(tmp_path: Path, origins: dict[str, Origin]) -> None:
    log = tmp_path / "access.log"
    async with running_router(_table(origins), RouterSettings(access_log=str(log))) as server:
        port = server.address[1]
        requests = (
            b"GET /x?token=secret HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\n\r\n"
            b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /z HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n"
        )
        data, _ = await exchange(port, requests)
        assert [status for status, _, _ in split_responses(data)] == [200, 200, 404]
        data, _ = await exchange(port, b'GET /"q" HTTP/1.1\r\nHost: a:99999\r\n\r\n')
        assert split_responses(data)[0][0] == 400
    alice, baseline, no_route, refused = _lines(log)
    assert set(alice) == {
        "time", "client", "method", "authority", "path", "status", "bytes", "duration_ms",
        "upstream", "service", "key", "target", "reason", "refusal",
    }  # fmt: skip
    assert alice["time"].endswith("Z") and alice["time"][10] == "T"
    assert alice["client"] == "127.0.0.1"
    assert (alice["method"], alice["authority"], alice["path"]) == ("GET", "a", "/x")  # no query by default
    assert (alice["status"], alice["service"], alice["key"], alice["target"], alice["reason"]) == (
        200, "a", "alice", "override", "override",
    )  # fmt: skip
    assert alice["upstream"] == origins["alice"].url
    assert alice["bytes"] > 0 and alice["duration_ms"] > 0
    assert alice["refusal"] is None
    assert (baseline["key"], baseline["target"], baseline["reason"]) == (None, "baseline", "no-key")
    assert (no_route["status"], no_route["service"], no_route["refusal"], no_route["upstream"]) == (
        404, None, "no-route", None,
    )  # fmt: skip
    assert (refused["status"], refused["refusal"], refused["path"]) == (400, "host-invalid", '/"q"')


async def test_the_query_is_logged_only_when_asked(tmp_path: Path, origins: dict[str, Origin]) -> None:
    log = tmp_path / "access.log"
    settings = RouterSettings(access_log=str(log), access_log_query=True)
    async with running_router(_table(origins), settings) as server:
        await exchange(server.address[1], b"GET /x?token=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert _lines(log)[0]["path"] == "/x?token=1"


async def test_the_text_format_is_one_readable_line(tmp_path: Path, origins: dict[str, Origin]) -> None:
    log = tmp_path / "access.log"
    settings = RouterSettings(access_log=str(log), access_log_format="text")
    async with running_router(_table(origins), settings) as server:
        raw = b"GET /x HTTP/1.1\r\nHost: a\r\nbaggage: devstack=alice\r\nConnection: close\r\n\r\n"
        await exchange(server.address[1], raw)
    (line,) = log.read_text().splitlines()
    assert ' 127.0.0.1 "GET a/x" 200 ' in line
    assert "key=alice service=a target=override reason=override upstream=" + origins["alice"].url in line
    assert line.endswith("refusal=-")


async def test_sampling_keeps_one_success_in_n_and_every_error(tmp_path: Path, origins: dict[str, Origin]) -> None:
    log = tmp_path / "access.log"
    settings = RouterSettings(access_log=str(log), access_log_sample=5)
    async with running_router(_table(origins), settings) as server:
        ok = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 10
        missing = b"GET / HTTP/1.1\r\nHost: nowhere\r\n\r\n" * 3
        last = b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        data, _ = await exchange(server.address[1], ok + missing + last)
        assert len(split_responses(data)) == 14
    statuses = [line["status"] for line in _lines(log)]
    assert statuses.count(404) == 3  # every error
    assert statuses.count(200) == 2  # 11 successes, one in five


async def test_a_destination_that_stops_reading_never_stalls_requests(
    tmp_path: Path, origins: dict[str, Origin]
) -> None:
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader that never reads: the pipe fills
    access_log = AccessLog(str(fifo), capacity=50)
    server = RouterServer(RouterSettings(), _table(origins))
    server.access_log = access_log
    await server.start(("127.0.0.1", 0))
    try:
        count = 2000
        data, _ = await exchange(
            server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * (count - 1) + b"GET / HTTP/1.1\r\nHost: a\r\n"
            b"Connection: close\r\n\r\n", timeout=30
        )
        assert [s for s, _, _ in split_responses(data)] == [200] * count  # every request answered
        # The pipe holds about 64 KiB (some 200 lines), the writer one slice, the queue 50: the
        # rest was dropped and counted, not held.
        assert access_log.dropped > 0
        assert access_log.written + access_log.dropped + len(access_log._queue) <= count
    finally:
        drained = threading.Thread(target=_drain_fifo, args=(reader,), daemon=True)
        drained.start()  # lets the blocked writer finish so the router can close
        await server.close()
        drained.join(timeout=10)


def _drain_fifo(fd: int) -> None:
    os.set_blocking(fd, True)
    try:
        while os.read(fd, 65536):
            pass
    finally:
        os.close(fd)


@pytest.mark.parametrize("sample", [0, -1])
def test_a_sample_below_one_is_refused(sample: int) -> None:
    with pytest.raises(ValueError, match="--access-log-sample"):
        RouterSettings(access_log_sample=sample)


async def test_a_cut_exchange_is_logged_with_499(tmp_path: Path) -> None:
    # An upstream that accepts and never answers: the client gives up and the line says so.
    silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    log = tmp_path / "access.log"
    table = make_table({"a": {"baseline": f"http://127.0.0.1:{port}"}})
    try:
        async with running_router(table, RouterSettings(access_log=str(log))) as server:
            _, writer = await asyncio.open_connection("127.0.0.1", server.address[1])
            writer.write(b"GET /wait HTTP/1.1\r\nHost: a\r\n\r\n")
            await writer.drain()
            async with asyncio.timeout(5):
                while not server.stats.upstream_connections:  # the request has reached the upstream
                    await asyncio.sleep(0.01)
            reset(writer)  # not a FIN: a half-closed client would still be waiting for its answer
            async with asyncio.timeout(5):
                while server.stats.open_connections:  # the router has seen the client go
                    await asyncio.sleep(0.01)
    finally:
        silent.close()
    (line,) = _lines(log)
    assert (line["status"], line["path"], line["bytes"]) == (499, "/wait", 0)

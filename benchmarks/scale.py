"""Scale scenarios for the router alone: a huge table, table swaps under load, idle connections.

Each compares against its own control in the same run (one-service table, no swaps, no idle
connections), interleaved where it is timed. This module drives load and reads counters; it
never changes the router, only its route file and signals it as an operator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from benchmarks import configs
from benchmarks.configs import SERVICE
from benchmarks.correctness import check_proxy
from benchmarks.processes import ProcSample
from benchmarks.report import Cell
from benchmarks.scenarios import GET_ALICE
from benchmarks.stack import PROXY_CPU, Candidate, Quiet, Stack, measure

__all__ = [
    "IDLE_CONNECTIONS",
    "LARGE_OVERRIDES",
    "LARGE_SERVICES",
    "Swapper",
    "idle_connections",
    "large_table",
    "large_table_reload",
    "settled_version",
    "table_swaps",
]

RELOAD_RUN: Final = 30.0
"""Seconds of load around a reload of the large table: parsing it takes longer than a cell."""
LARGE_SERVICES: Final = 10_000
LARGE_OVERRIDES: Final = 100_000
IDLE_CONNECTIONS: Final = 10_000
SWAP_INTERVAL: Final = 0.1
_NO_WAIT: Final = Quiet(max_wait=0)
_OPEN_BATCH: Final = 500
"""Connections opened concurrently: below the router's accept backlog (4096) and somaxconn."""

Log = Callable[[str], None]


def large_table(
    stack: Stack, *, reps: int, duration: float, warmup: float, log: Log
) -> tuple[list[Cell], dict[str, Any], Candidate]:
    """c50 alice against a one-service router and a 10k-service / 100k-override router.

    Returns the large-table router still running (for ``large_table_reload``); the caller stops it.
    """
    text = configs.route_yaml_large(
        stack.upstreams, services=LARGE_SERVICES, overrides_per_service=LARGE_OVERRIDES // LARGE_SERVICES
    )
    small, small_ready = stack.start_router("router-1-service")
    log(f"  loading {LARGE_SERVICES} services / {LARGE_OVERRIDES} overrides ({len(text) / 1e6:.1f} MB YAML)")
    large, large_ready = stack.start_router("router-10k-services", text, ready_within=900)
    routes = large.admin_json("/readyz")
    for candidate in (small, large):
        check_proxy(candidate.name, candidate.port or 0)
    info: dict[str, Any] = {
        "yaml_bytes": len(text),
        "services": LARGE_SERVICES,
        "overrides": LARGE_OVERRIDES,
        "seconds_to_ready": {small.name: small_ready, large.name: large_ready},
        "rss_kib_loaded": {c.name: ProcSample.read(c.pid or 0).rss_kib for c in (small, large)},
        "readyz": routes,
    }
    cells = []
    for rep in range(reps):
        for candidate in (small, large):
            cell = measure(stack, candidate, GET_ALICE, rep=rep, duration=duration, warmup=warmup)
            log(f"  rep {rep + 1} {candidate.name}: {cell.value:,.0f} req/s, {cell.errors} errors")
            cells.append(cell)
    stack.procs.stop(small.proc)  # type: ignore[arg-type]
    return cells, info, large


def _version(router: Candidate) -> int:
    return int(router.admin_json("/readyz")["version"])


def large_table_reload(
    stack: Stack, router: Candidate, *, warmup: float, log: Log
) -> tuple[list[Cell], dict[str, Any]]:
    """c50 alice on the large-table router for 30 s, without and then with a reload (SIGHUP) in it.

    The route file is parsed in a worker thread, so the question is what the GIL it holds costs
    the event loop while the proxy is busy: throughput and tail latency during the reload.
    """
    assert router.routes_path is not None and router.pid is not None
    text = configs.route_yaml_large(
        stack.upstreams, services=LARGE_SERVICES, overrides_per_service=LARGE_OVERRIDES // LARGE_SERVICES, variant=1
    )
    cells = [measure(stack, router, GET_ALICE, rep=0, duration=RELOAD_RUN, warmup=warmup, label="no reload")]
    log(f"  no reload: {cells[0].value:,.0f} req/s, p99 {cells[0].detail['latency_us'].get('99', 0) / 1000:.1f} ms")
    path = router.routes_path
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    before = _version(router)
    published: dict[str, float] = {}

    def reload_and_watch() -> None:
        # Replace the file only now: the router also polls its mtime every second, and an early
        # replace would have it reloading during the warm-up instead of in the timed run.
        time.sleep(1.0)
        started = time.monotonic()
        os.replace(tmp, path)
        os.kill(router.pid or 0, signal.SIGHUP)
        while time.monotonic() - started < RELOAD_RUN + 300:
            with contextlib.suppress(OSError, ValueError):
                if _version(router) > before:
                    published["seconds"] = time.monotonic() - started
                    return
            time.sleep(0.25)

    watcher = threading.Thread(target=reload_and_watch, name="reload-watch", daemon=True)
    cell = measure(
        stack,
        router,
        GET_ALICE,
        rep=0,
        duration=RELOAD_RUN,
        warmup=warmup,
        label="SIGHUP reload during run",
        on_timed_start=watcher.start,
    )
    watcher.join(RELOAD_RUN + 330)
    cells.append(cell)
    seconds = published.get("seconds")
    log(
        f"  reload: {cell.value:,.0f} req/s, p99 {cell.detail['latency_us'].get('99', 0) / 1000:.1f} ms, "
        f"{cell.errors} errors; new table published after {seconds if seconds is None else round(seconds, 1)} s"
    )
    return cells, {"run_seconds": RELOAD_RUN, "reload_to_publish_seconds": seconds}


def settled_version(router: Candidate, *, settle: float = 0.5, limit: float = 10.0) -> int:
    """The router's table version once it has stopped changing for ``settle`` seconds: the last
    reload may still be parsing when the swapping stops."""
    version, since = _version(router), time.monotonic()
    deadline = since + limit
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now_version = _version(router)
        if now_version != version:
            version, since = now_version, time.monotonic()
        elif time.monotonic() - since >= settle:
            break
    return version


class Swapper:
    """Rewrites the route file (atomically) and sends SIGHUP every interval until stopped.

    ``router`` is whatever reads the file (a router, or a controller for the feed rows);
    ``render(n)`` is the file's text for the n-th swap (default: the two swap tables, alternating).
    """

    def __init__(
        self, stack: Stack, router: Candidate, interval: float, render: Callable[[int], str] | None = None
    ) -> None:
        self._stack = stack
        self._router = router
        self._interval = interval
        self._render = render or (lambda n: configs.route_yaml_swap(stack.upstreams, n))
        self._stop = threading.Event()
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name="table-swapper", daemon=True)

    def _run(self) -> None:
        path = self._router.routes_path
        assert path is not None and self._router.pid is not None
        tmp = path.with_suffix(".tmp")
        next_at = time.monotonic()
        while not self._stop.is_set():
            tmp.write_text(self._render(self.sent + 1))
            os.replace(tmp, path)
            os.kill(self._router.pid, signal.SIGHUP)
            self.sent += 1
            next_at += self._interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Swapper:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(10)


def table_swaps(
    stack: Stack, *, reps: int, duration: float, warmup: float, log: Log
) -> tuple[list[Cell], dict[str, Any]]:
    """c50 alice with every body checked, without and with a table swap every 100 ms."""
    router, _ = stack.start_router("router-swaps", configs.route_yaml_swap(stack.upstreams, 0))
    check_proxy(router.name, router.port or 0, upload=False)
    cells = []
    swaps: list[dict[str, Any]] = []
    for rep in range(reps):
        for swapping in (False, True):
            label = "swap every 100 ms" if swapping else "no swaps"
            version_before = _version(router)
            if swapping and stack.quiet is not None:
                # Wait for a quiet host before swapping starts: the swaps' own reloads are load.
                stack.quiet.wait()
            swapper = Swapper(stack, router, SWAP_INTERVAL) if swapping else None
            with swapper if swapper is not None else contextlib.nullcontext():
                cell = measure(
                    stack,
                    router,
                    GET_ALICE,
                    rep=rep,
                    duration=duration,
                    warmup=warmup,
                    script="check-alice",
                    label=label,
                    quiet=_NO_WAIT if swapping else None,
                )
            if swapper is not None:
                published = settled_version(router) - version_before
                swaps.append({"rep": rep, "sighups": swapper.sent, "versions_published": published})
                log(f"  rep {rep + 1} {label}: {swapper.sent} SIGHUPs, {published} tables published")
            log(f"  rep {rep + 1} {label}: {cell.value:,.0f} req/s, {cell.errors} errors ({cell.detail})")
            cells.append(cell)
    readyz = router.admin_json("/readyz")
    stack.procs.stop(router.proc)  # type: ignore[arg-type]
    return cells, {"interval_s": SWAP_INTERVAL, "swaps": swaps, "readyz_after": readyz}


_OPEN_GAUGE: Final = re.compile(r"^devstack_open_connections (\S+)$", re.MULTILINE)


def _open_connections(router: Candidate) -> int:
    m = _OPEN_GAUGE.search(router.admin_text("/metrics"))
    return int(float(m[1])) if m else -1


async def _open_idle(port: int, count: int) -> tuple[list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], int]:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    failures = 0
    for start in range(0, count, _OPEN_BATCH):
        batch = min(_OPEN_BATCH, count - start)
        results = await asyncio.gather(
            *(asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10) for _ in range(batch)),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                failures += 1
            else:
                conns.append(result)
    return conns, failures


_REQUEST: Final = f"GET / HTTP/1.1\r\nHost: {SERVICE}\r\nbaggage: devstack=alice\r\n\r\n".encode()


async def _one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
    writer.write(_REQUEST)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    body = await asyncio.wait_for(reader.readexactly(int(m[1])), 10) if m else b""
    return head.startswith(b"HTTP/1.1 200") and body == b"alice"


async def _request_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> int:
    failures = 0
    for start in range(0, len(conns), _OPEN_BATCH):
        results = await asyncio.gather(
            *(_one_request(r, w) for r, w in conns[start : start + _OPEN_BATCH]), return_exceptions=True
        )
        failures += sum(1 for ok in results if ok is not True)
    return failures


async def _close_all(conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in conns:
        writer.close()
    for _, writer in conns:
        with contextlib.suppress(OSError, asyncio.TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1)


def idle_connections(
    stack: Stack, *, duration: float, warmup: float, count: int, log: Log
) -> tuple[list[Cell], dict[str, Any]]:
    """Router RSS per idle keep-alive connection, and c50 throughput with them held open."""
    router, _ = stack.start_router("router-idle", extra=("--max-connections", str(2 * count)))
    check_proxy(router.name, router.port or 0, upload=False)
    pid = router.pid or 0
    cells = [measure(stack, router, GET_ALICE, rep=0, duration=duration, warmup=warmup, label="no idle connections")]
    time.sleep(1)
    rss_before = ProcSample.read(pid).rss_kib
    loop = asyncio.new_event_loop()
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        started = time.monotonic()
        conns, connect_failures = loop.run_until_complete(_open_idle(router.port or 0, count))
        connect_seconds = time.monotonic() - started
        held = len(conns)
        time.sleep(0.5)
        rss_connected = ProcSample.read(pid).rss_kib
        open_connected = _open_connections(router)
        log(f"  {held} open in {connect_seconds:.1f}s ({connect_failures} failed); router counts {open_connected}")
        request_failures = loop.run_until_complete(_request_all(conns))
        time.sleep(0.5)
        rss_after_request = ProcSample.read(pid).rss_kib
        open_after_request = _open_connections(router)
        log(f"  one request on each: {request_failures} failed; router sees {open_after_request}")
        cells.append(
            measure(
                stack,
                router,
                GET_ALICE,
                rep=0,
                duration=duration,
                warmup=warmup,
                label=f"{count} idle connections held",
            )
        )
        rss_loaded = ProcSample.read(pid).rss_kib
        still_open = _open_connections(router)
        loop.run_until_complete(_close_all(conns))
        conns = []
    finally:
        if conns:
            loop.run_until_complete(_close_all(conns))
        loop.close()
    time.sleep(2)
    rss_closed = ProcSample.read(pid).rss_kib
    open_closed = _open_connections(router)
    info = {
        "connections": count,
        "held": held,
        "connect_failures": connect_failures,
        "connect_seconds": connect_seconds,
        "request_failures": request_failures,
        "router_open_connections": {
            "connected": open_connected,
            "after_one_request": open_after_request,
            "after_c50_run": still_open,
            "after_close": open_closed,
        },
        "rss_kib": {
            "before": rss_before,
            "connected": rss_connected,
            "after_one_request": rss_after_request,
            "after_c50_run": rss_loaded,
            "after_close": rss_closed,
        },
        "kib_per_connection": {
            "connected": (rss_connected - rss_before) / max(1, held),
            "after_one_request": (rss_after_request - rss_before) / max(1, held),
        },
    }
    stack.procs.stop(router.proc)  # type: ignore[arg-type]
    return cells, info


def workers_per_core(
    stack: Stack, *, reps: int, duration: float, warmup: float, log: Callable[[str], None]
) -> tuple[list[Cell], dict[str, Any]]:
    """c50 alice through ``--workers 1`` and ``--workers 2``, both confined to the proxy core,
    interleaved: requests per second and CPU per request of the whole process tree (parent and
    workers). Two cores cannot show scaling (the load generator needs the other one); what this
    shows is what a second worker costs per request on the same core."""
    routers = [stack.start_router(f"router-workers-{n}", extra=["--workers", str(n)])[0] for n in (1, 2)]
    for router in routers:
        check_proxy(router.name, router.port or 0, upload=False)
    cells: list[Cell] = []
    for rep in range(reps):
        for router in routers:
            cell = measure(stack, router, GET_ALICE, rep=rep, duration=duration, warmup=warmup, process_tree=True)
            cells.append(cell)
            log(
                f"  rep {rep + 1} {router.name}: {cell.value:,.0f} req/s, "
                f"{cell.cpu_us_per_request or 0:.1f} us CPU per request (parent and workers), {cell.errors} errors"
            )
    for router in routers:
        if router.proc is not None:
            stack.procs.stop(router.proc)
    return cells, {"workers": [1, 2], "cpu": PROXY_CPU}

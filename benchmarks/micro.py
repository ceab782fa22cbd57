"""The router's own CPU cost per exchange, without sockets: a repeatable yardstick for hot-path work.

One exchange is a keep-alive ``GET`` with ``baggage: devstack=alice`` fed to a ``ClientConnection``
and an nginx-like 200 response fed to its pooled ``UpstreamConnection``; transports are stubs,
so what is measured is parsing, routing, head rendering and bookkeeping (the kernel's share of a
real request is not). Two measures:

- ``python -m benchmarks.micro``: microseconds per exchange (best of five; noisy on a shared host).
- ``python -m benchmarks.micro --instructions``: instructions per exchange counted by valgrind's
  callgrind (runs with 0 and N exchanges, subtracts): the same figure on every run of the same
  build, whatever else the machine is doing. Needs the Debian package ``valgrind``.

benchmarks/RESULTS.md keeps the instruction counts over time; ``router.HOT_PATH_MODE`` says whether
the compiled or the interpreted hot path was measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import uvloop

import router
from router.accesslog import AccessLog
from router.proxy import ClientConnection, ProxyContext, TableSlot
from router.settings import RouterSettings
from router.table import Override, Routes, RouteTable, Target
from router.upstream import UpstreamConnection, _AddressPool

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nbaggage: devstack=alice\r\n\r\n"
REQUEST_NO_KEY = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
"""``--no-key``: the baseline path (the override's pooled connection is the baseline's then)."""
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 6\r\nLast-Modified: Sun, 22 Nov 2026 09:00:00 GMT\r\n"
    b'Connection: keep-alive\r\nETag: "6-a"\r\nAccept-Ranges: bytes\r\n\r\nalice\n'
)
ALICE = ("127.0.0.1", 9802)
BASELINE = ("127.0.0.1", 9801)


class _Transport:
    """Stands in for uvloop's transport: accepts writes and forgets them."""

    def __init__(self) -> None:
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1

    def writelines(self, data: Any) -> None:
        self.writes += 1

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def is_closing(self) -> bool:
        return False

    def close(self) -> None: ...

    def abort(self) -> None: ...


def _exchange_pair(
    loop: asyncio.AbstractEventLoop, access_log: AccessLog | None = None, address: tuple[str, int] = ALICE
) -> tuple[ClientConnection, UpstreamConnection]:
    alice = Override("alice", Target(f"http://{ALICE[0]}:{ALICE[1]}"))
    baseline = Target(f"http://{BASELINE[0]}:{BASELINE[1]}")
    table = RouteTable({"bench": Routes("bench", baseline, {"alice": alice})}, version=1)
    ctx = ProxyContext(loop, RouterSettings(), TableSlot(table), access_log=access_log)
    client = ClientConnection(ctx)
    client.connection_made(_Transport())  # type: ignore[arg-type]
    # One idle pooled connection to the measured address, as after the first request of a run.
    pools: Any = ctx.pool._pools  # a benchmark seeds the pool it measures
    pools[address] = pool = _AddressPool(address)
    upstream = UpstreamConnection(ctx.pool, pool)
    upstream.connection_made(_Transport())  # type: ignore[arg-type]
    pool.total = 1
    upstream.idle_since = upstream.last_io = loop.time()
    pool.idle.append(upstream)
    return client, upstream


async def _run(count: int, timed: bool, access_log: str | None, no_key: bool) -> None:
    # The access log's writer thread formats and writes to /dev/null: callgrind counts its
    # instructions too, so the figure is the whole cost of a logged exchange.
    log = AccessLog(os.devnull, access_log) if access_log else None
    client, upstream = _exchange_pair(asyncio.get_running_loop(), log, BASELINE if no_key else ALICE)
    request = REQUEST_NO_KEY if no_key else REQUEST

    def exchange() -> None:
        client.data_received(request)
        upstream.data_received(RESPONSE)

    for _ in range(200):
        exchange()
    if not timed:
        for _ in range(count):
            exchange()
        if log is not None:
            log.close()
        return
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(count):
            exchange()
        best = min(best, (time.perf_counter() - start) / count)
    if log is not None:
        log.close()
    print(f"{best * 1e6:.2f} us per exchange (best of 5 x {count}), hot path {router.HOT_PATH_MODE}")


def _callgrind(count: int, access_log: str | None, no_key: bool) -> int:
    extra = (["--access-log", access_log] if access_log else []) + (["--no-key"] if no_key else [])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        done = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable, "-m", "benchmarks.micro",
             "--exchanges", str(count), "--untimed", *extra],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    found = re.search(r"refs:\s+([\d,]+)", done.stderr)
    if found is None:
        raise SystemExit(f"no instruction count from valgrind:\n{done.stderr[-2000:]}")
    return int(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instructions", action="store_true", help="count instructions with callgrind")
    parser.add_argument("--exchanges", type=int, default=50_000)
    parser.add_argument("--untimed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--no-key", action="store_true", help="requests without baggage (the baseline path)")
    parser.add_argument(
        "--access-log", choices=("json", "text"), help="with the access log on (written to /dev/null) in this format"
    )
    args = parser.parse_args()
    if args.instructions:
        count = 5000
        per = (_callgrind(count, args.access_log, args.no_key) - _callgrind(0, args.access_log, args.no_key)) / count
        print(f"{per:,.0f} instructions per exchange (callgrind), hot path {router.HOT_PATH_MODE}")
        return
    uvloop.run(_run(args.exchanges, timed=not args.untimed, access_log=args.access_log, no_key=args.no_key))


if __name__ == "__main__":
    main()

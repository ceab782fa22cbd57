"""Route-feed subscribers for the ``--scale`` feed rows: one process, a few hundred streams.

Run as a script by ``benchmarks.feed`` (stdlib only, so it needs no package path):
``python benchmarks/feed_clients.py --port P --path '/v2/routes?since=V&instance=I' --connections N
--out FILE --ready FILE``. It opens N HTTP/1.1 streaming GETs to the controller on loopback (every
``--gzip-every``-th with ``Accept-Encoding: gzip``, as the router's aiohttp client sends it), and for
every line that arrives records (stream, version, CLOCK_MONOTONIC at the line's last byte, raw bytes
read from the socket since the previous line: response framing included). It writes ``--ready``
once every stream has its response head, and ``--out`` (JSON) when SIGTERM ends it. It parses only
a line's first bytes (its version): a 14 MB ``/v1`` table is never decoded as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Final

_VERSION: Final = re.compile(rb'"version":(\d+)')
_HEAD_BYTES: Final = 256
"""A line's leading bytes kept for its version (``"kind"`` and ``"from"`` come before it on /v2)."""
_BATCH: Final = 200
_READ: Final = 256 * 1024


class _Stream:
    """One subscription: de-chunks, un-gzips and splits what arrives into lines, as it arrives."""

    def __init__(self, index: int, gzip: bool, on_line: Callable[[int], None]) -> None:
        self.index = index
        self._on_line = on_line
        self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gzip else None
        self.gzip = gzip
        self.events: list[tuple[int, int, float, int]] = []
        self._raw_since_line = 0
        self._chunk_left = 0
        self._chunk_state = "size"  # "size" (reading the hex line), "data", "crlf" (after data)
        self._pending = b""
        self._head = bytearray()
        self._in_line = False

    def feed_raw(self, data: bytes, now: float) -> None:
        self._raw_since_line += len(data)
        payload = self._dechunk(data)
        if self.inflate is not None and payload:
            payload = self.inflate.decompress(payload)
        if payload:
            self._lines(payload, now)

    def _dechunk(self, data: bytes) -> bytes:
        out: list[bytes] = []
        buf = self._pending + data
        self._pending = b""
        pos = 0
        while pos < len(buf):
            if self._chunk_state == "size":
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    self._pending = buf[pos:]
                    break
                self._chunk_left = int(buf[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                self._chunk_state = "data" if self._chunk_left else "crlf"
            elif self._chunk_state == "data":
                take = min(self._chunk_left, len(buf) - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._chunk_left -= take
                if not self._chunk_left:
                    self._chunk_state = "crlf"
            else:
                if len(buf) - pos < 2:
                    self._pending = buf[pos:]
                    break
                pos += 2
                self._chunk_state = "size"
        return b"".join(out)

    def _lines(self, payload: bytes, now: float) -> None:
        start = 0
        while True:
            end = payload.find(b"\n", start)
            piece = payload[start : end if end >= 0 else len(payload)]
            if piece and len(self._head) < _HEAD_BYTES:
                self._head += piece[: _HEAD_BYTES - len(self._head)]
            self._in_line = self._in_line or bool(piece)
            if end < 0:
                return
            if self._in_line:  # an empty line is a heartbeat
                m = _VERSION.search(self._head)
                version = int(m[1]) if m else -1
                self.events.append((self.index, version, now, self._raw_since_line))
                self._on_line(version)
                self._raw_since_line = 0
            self._head.clear()
            self._in_line = False
            start = end + 1


async def _subscribe(port: int, path: str, stream: _Stream) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    accept = "Accept-Encoding: gzip\r\n" if stream.gzip else ""
    writer.write(
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/x-ndjson\r\n{accept}\r\n".encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
        writer.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode(errors="replace"))
    return reader, writer


async def _follow(reader: asyncio.StreamReader, stream: _Stream) -> None:
    loop = asyncio.get_running_loop()
    while data := await reader.read(_READ):
        # The loop's clock is CLOCK_MONOTONIC, the same in every process on the host.
        stream.feed_raw(data, loop.time())


async def _main(args: argparse.Namespace) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    conns: list[tuple[_Stream, asyncio.StreamReader, asyncio.StreamWriter]] = []
    counts: dict[int, int] = {}

    def on_line(version: int) -> None:
        # Progress for the harness (this process's log): every open stream now holds ``version``.
        counts[version] = counts.get(version, 0) + 1
        if counts[version] == len(conns):
            print(f"all {version} {loop.time():.6f}", flush=True)

    every = args.gzip_every
    streams = [_Stream(i, every > 0 and i % every == every - 1, on_line) for i in range(args.connections)]
    failures: list[str] = []
    started = time.monotonic()
    for first in range(0, len(streams), _BATCH):
        batch = streams[first : first + _BATCH]
        results = await asyncio.gather(*(_subscribe(args.port, args.path, s) for s in batch), return_exceptions=True)
        for stream, result in zip(batch, results):
            if isinstance(result, BaseException):
                failures.append(repr(result))
            else:
                conns.append((stream, *result))
    tasks = [asyncio.create_task(_follow(reader, stream)) for stream, reader, _ in conns]
    ready = {"connected": len(conns), "failures": len(failures), "seconds": time.monotonic() - started}
    tmp = Path(args.ready + ".tmp")
    tmp.write_text(json.dumps(ready))
    os.replace(tmp, args.ready)
    await stop.wait()
    ended = [t for t in tasks if t.done()]
    for task in tasks:
        task.cancel()
    for _, _, writer in conns:
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    return {
        "connections": args.connections,
        "connected": len(conns),
        "failures": failures[:10],
        "failure_count": len(failures),
        "ended_early": len(ended),
        "gzip": [s.index for s in streams if s.gzip],
        "events": [event for s in streams for event in s.events],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", required=True, help="e.g. /v2/routes?since=V&instance=I")
    p.add_argument("--connections", type=int, required=True)
    p.add_argument("--gzip-every", type=int, default=0, help="every Nth stream asks for gzip (0: none)")
    p.add_argument("--ready", required=True, help="written (JSON) once every stream is open")
    p.add_argument("--out", required=True, help="written (JSON) at SIGTERM: every line's arrival")
    args = p.parse_args()
    result = asyncio.run(_main(args))
    tmp = Path(args.out + ".tmp")
    tmp.write_text(json.dumps(result))
    os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The access log: one line per exchange, recorded on the hot path and written by a thread.

The event loop only appends a small tuple per exchange to a bounded queue (``record``); a writer
thread wakes every ``FLUSH_INTERVAL``, formats what is queued (JSON lines or a readable text
line) and writes it in one call. A slow destination (a full pipe, a stalled disk) therefore
blocks the thread, never a request: while it is blocked the queue fills, and past its capacity
lines are dropped and counted (``devstack_access_log_dropped_total``) rather than held without
bound. Wall-clock times are derived when a batch is formatted, from the monotonic clock the hot
path already reads, so recording costs no extra clock call.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import threading
import time
from typing import BinaryIO, Final

from router.errors import Answer
from router.request import Plan
from router.table import Decision

__all__ = ["AccessLog", "FLUSH_INTERVAL"]

FLUSH_INTERVAL: Final = 0.1
"""Seconds between the writer's wake-ups: lines reach the destination within about this."""

_Entry = tuple[Plan, float, float, int, int, Answer | None, bytes]
"""(request's plan, start and end on the perf_counter clock, status, body bytes sent, the
router's own answer if it made one, client address)."""



class AccessLog:
    def __init__(
        self, destination: str, fmt: str = "json", *, query: bool = False, sample: int = 1, capacity: int = 65536
    ) -> None:
        """``destination``: ``"-"`` for stdout or a file path (opened for appending)."""
        self.destination = destination
        self.sample = sample
        """Log one successful exchange in ``sample`` (answers of 400 and above are always logged)."""
        self._unsampled = 0
        self.fmt = fmt
        self.query = query
        """Whether the path is logged with its query string (queries may carry secrets)."""
        self.capacity = capacity
        self.dropped = 0
        """Lines dropped because the writer fell behind by ``capacity`` lines."""
        self.written = 0
        self._queue: collections.deque[_Entry] = collections.deque()
        self._formatter = _Formatter(query)
        self._wake = threading.Event()
        self._stopping = False
        self._out: BinaryIO = sys.stdout.buffer if destination == "-" else open(destination, "ab")  # noqa: SIM115
        self._writer = threading.Thread(target=self._run, name="devstack-access-log", daemon=True)
        self._writer.start()

    def record(
        self, req: Plan, started: float, ended: float, status: int, sent: int, answer: Answer | None, peer: bytes
    ) -> None:
        """Called on the event loop once per exchange: a tuple and an append, nothing else."""
        if self.sample > 1 and status < 400:
            self._unsampled += 1
            if self._unsampled < self.sample:
                return
            self._unsampled = 0
        queue = self._queue
        if len(queue) >= self.capacity:
            self.dropped += 1
            return
        queue.append((req, started, ended, status, sent, answer, peer))

    def close(self) -> None:
        """Write what is queued and stop the writer (at shutdown, after the last exchange)."""
        self._stopping = True
        self._wake.set()
        self._writer.join(timeout=5)
        if self._out is not sys.stdout.buffer:
            self._out.close()

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(FLUSH_INTERVAL)
            self._drain()
        self._drain()

    def _drain(self) -> None:
        queue = self._queue
        count = len(queue)
        if not count:
            return
        # One offset per batch turns the hot path's perf_counter readings into wall-clock time.
        offset = time.time() - time.perf_counter()
        line = self._formatter.text_line if self.fmt == "text" else self._formatter.json_line
        while count:
            # Slices, each ended by a write that releases the GIL: formatting a large batch at
            # once would hold the event loop's thread off for a whole switch interval (5 ms).
            size = min(count, _SLICE)
            count -= size
            lines = [line(queue.popleft(), offset) for _ in range(size)]
            try:
                self._out.write(b"".join(lines))
                self._out.flush()
            except OSError:
                self.dropped += size  # a destination that went away: the router goes on without it
                continue
            self.written += size


_SLICE: Final = 256
"""Lines formatted and written at a time (about 0.4 ms of the GIL)."""

_UNSAFE: Final = re.compile(rb'["\\\x00-\x1f\x7f-\xff]')
"""Bytes a request target may hold that a JSON string cannot carry as they are."""


_NO_DECISION: Final = (
    b'"upstream":null,"service":null,"target":null,"reason":null',
    b"service=- target=- reason=- upstream=-",
)
"""A request refused before routing."""


class _Formatter:
    """Renders entries, caching what repeats: the second's timestamp and each decision's fields.
    Only the request target is client-chosen text; method, authority and client address were
    validated on the hot path, and the rest are labels from the table and the catalogue."""

    def __init__(self, query: bool) -> None:
        self.query = query
        self._second = -1
        self._stamp = b""
        self._decisions: dict[int, tuple[object, bytes, bytes]] = {}
        """id(decision) → (decision, its JSON fields, its text fields): decisions are shared by
        every request they route, so each is rendered once (the object is kept, so its id
        cannot be reused while cached)."""

    def _time(self, wall: float) -> tuple[bytes, int]:
        second = int(wall)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return self._stamp, int((wall - second) * 1000)

    def _path(self, req: Plan) -> bytes:
        target = req.target
        if not self.query:
            cut = target.find(b"?")
            if cut >= 0:
                target = target[:cut]
        return target

    def _decision(self, decision: Decision | None) -> tuple[bytes, bytes]:
        if decision is None:
            return _NO_DECISION
        cached = self._decisions.get(id(decision))
        if cached is None or cached[0] is not decision:
            if len(self._decisions) > 10000:
                self._decisions.clear()  # tables come and go; rendering again is cheap
            url = decision.target.url if decision.target is not None else None
            service, kind, reason = decision.service, decision.kind.value, decision.reason
            fields = {"upstream": url, "service": service, "target": kind, "reason": reason}
            as_json = json.dumps(fields, separators=(",", ":"))[1:-1].encode()
            as_text = f"service={service} target={kind} reason={reason} upstream={url or '-'}".encode()
            cached = self._decisions[id(decision)] = (decision, as_json, as_text)
        return cached[1], cached[2]

    def json_line(self, entry: _Entry, offset: float) -> bytes:
        req, started, ended, status, sent, answer, peer = entry
        stamp, millis = self._time(ended + offset)
        path = self._path(req)
        if _UNSAFE.search(path) is None:
            quoted_path = b'"' + path + b'"'
        else:
            quoted_path = json.dumps(path.decode("latin-1")).encode()
        key = b"null" if req.key is None else b'"' + req.key.encode() + b'"'
        refusal = b"null" if answer is None else b'"' + answer.reason.encode() + b'"'
        fields, _ = self._decision(req.decision)
        # Integer microseconds, not %.3f: formatting a float costs more than the rest of the line.
        micros = int((ended - started) * 1e6)
        return b'{"time":"%s.%03dZ","client":"%s","method":"%s","authority":"%s","path":%s,"status":%d,"bytes":%d,' \
            b'"duration_ms":%d.%03d,"key":%s,%s,"refusal":%s}\n' % (
                stamp, millis, peer, req.method, req.authority, quoted_path, status, sent,
                micros // 1000, micros % 1000, key, fields, refusal,
            )  # fmt: skip

    def text_line(self, entry: _Entry, offset: float) -> bytes:
        req, started, ended, status, sent, answer, peer = entry
        stamp, millis = self._time(ended + offset)
        path = self._path(req)
        if _UNSAFE.search(path) is not None:
            path = json.dumps(path.decode("latin-1"))[1:-1].encode()  # escaped, so one line stays one line
        _, fields = self._decision(req.decision)
        micros = int((ended - started) * 1e6)
        return b'%s.%03dZ %s "%s %s%s" %d %d %d.%03dms key=%s %s refusal=%s\n' % (
            stamp, millis, peer, req.method, req.authority, path, status, sent, micros // 1000, micros % 1000,
            req.key.encode() if req.key is not None else b"-", fields,
            answer.reason.encode() if answer is not None else b"-",
        )  # fmt: skip

"""The pool behind ``devstack router --workers N``: N proxy processes fed by one route source.

Its single responsibility is supervising worker processes. Each worker runs a ``RouterServer``
on the same proxy port (SO_REUSEPORT: the kernel spreads new connections over the workers'
accept queues); the parent keeps everything else: the one route source (whatever the composition
root wires to ``swap``), the table, the admin listener and readiness. The parent hands every new
table to every worker as JSON over a socket pair: a worker's first table whole
(``RouteTable.to_json``, read back by the ``decode`` function the composition root supplies, since
the router cannot import the controller's validator), and after that, as a delta from the table
before (the services set and removed, applied by the root's ``decode_delta``, so a one-service
change of a 10,000-service table costs each worker one service and the host index, not seconds of
parsing); a worker that cannot apply a delta asks for the whole table again. It asks the workers
for their counters when ``/metrics`` or the dashboard is read, drains them on ``close``, and
restarts one that dies, with backoff. It must never read a route source in a worker, accept a
proxy connection in the parent, or fork a process whose event loop is running: workers start
with the ``spawn`` method, a fresh interpreter each.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import gc
import json
import logging
import multiprocessing
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias, cast

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from router import dashboard
from router.admin import AdminState
from router.errors import Answer
from router.server import RouterServer, start_admin_listener
from router.settings import RouterSettings
from router.stats import Histogram, RouterStats
from router.table import EMPTY_TABLE, Routes, RouteTable

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess

__all__ = ["DeltaDecoder", "TableDecoder", "WorkerPool"]

log = logging.getLogger(__name__)

Message: TypeAlias = dict[str, Any]
"""One JSON object on a worker's channel; ``op`` says what it is (see ``_frame``)."""
TableDecoder: TypeAlias = Callable[[Any], RouteTable]
"""A ``RouteTable.to_json()`` document back into the table; must be a module-level function,
because a worker receives it by reference (pickled by name)."""
DeltaDecoder: TypeAlias = Callable[[RouteTable, Mapping[str, object], Message], RouteTable]
"""A ``delta`` message applied to the table it starts from (whose route groups, as the parent
wrote them, are the second argument) → the new table, sharing every ``Routes`` the delta does not
set; raises ValueError for one that does not apply. Module-level, as ``TableDecoder``."""
Readiness: TypeAlias = Callable[[], tuple[bool, dict[str, Any]]]

START_TIMEOUT: Final = 60.0
"""Seconds a new worker has to import the router, bind and say so. A fresh interpreter needs
about half a second; a shared machine under a test suite can need many times that."""
STATS_TIMEOUT: Final = 1.0
"""Seconds a scrape waits for each worker's counters; a worker slower than that (busy, or
stopped) is shown with its last report rather than holding up every scrape."""
EXIT_GRACE: Final = 5.0
"""Seconds past its drain deadline a worker gets to exit (flush its access log and spans)
before it is killed."""
RESTART_BACKOFF: Final = 0.25
"""Seconds before restarting a worker that crashed, doubled for each crash in a row, so a
worker that cannot start (a broken certificate, a port taken) costs a spawn per
``RESTART_BACKOFF_MAX``, not a spinning core."""
RESTART_BACKOFF_MAX: Final = 10.0
STABLE_AFTER: Final = 30.0
"""A worker that served this long crashed for a new reason: its restart backoff starts over."""
DELTA_SHARE: Final = 0.5
"""A change to more than this share of the services goes to the workers as a whole table: a delta
that large costs about as much to encode and to apply, and the whole table is the simpler message."""

_LENGTH: Final = struct.Struct("!I")


def _frame(message: Message) -> bytes:
    """One message on a channel: its length (4 bytes, big-endian), then compact JSON.

    Parent to worker: ``table`` (make ``table`` current, answer ``ack``), ``delta`` (the table
    after version ``from``: ``version``, ``sources`` and ``groups`` whole, the services in ``set``
    and ``removed`` changed; make it current and answer ``ack`` if ``from`` is current, else answer
    ``resync``), ``stats`` (answer ``stats`` with the same ``id``), ``drain`` (stop accepting,
    finish within ``seconds``, exit).
    Worker to parent: ``started`` (listening, with ``pid`` and table ``version``), ``failed``
    (cannot listen: ``errno``, ``message``), ``ack`` (``version`` is current), ``resync`` (a
    delta did not apply to ``version``, which it holds: send the whole table), ``stats`` (a
    report; ``id`` None for the last one, sent as the worker exits)."""
    body = json.dumps(message, separators=(",", ":")).encode()
    return _LENGTH.pack(len(body)) + body


async def _receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None when the other end has gone."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        message: Message = json.loads(await reader.readexactly(_LENGTH.unpack(head)[0]))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    except ValueError:
        log.error("router worker channel: a message that is not JSON; closing the channel")
        return None  # both ends are ours: a garbled channel is a broken process, replaced as one
    return message


# -- counters: a worker reports them as JSON, the parent adds reports up


def _report(stats: RouterStats, access_log_lines: int, access_log_dropped: int, cpu_seconds: float) -> Message:
    """Counters as plain JSON: the worker sends this, and the parent keeps sums in the same shape."""
    return {
        "requests": [[*labels, count] for labels, count in stats.requests.items()],
        "upstream_errors": dict(stats.upstream_errors),
        "rejected": {answer.name: count for answer, count in stats.rejected.items()},
        "durations": [[*labels, h.counts, h.total] for labels, h in stats.durations.items()],
        "upstream_connect": [stats.upstream_connect.counts, stats.upstream_connect.total],
        "upstream_head": [stats.upstream_head.counts, stats.upstream_head.total],
        "refused_connections": stats.refused_connections,
        "h2_connections": stats.h2_connections,
        "h2_goaway": dict(stats.h2_goaway),
        "open_connections": stats.open_connections,
        "upstream_connections": stats.upstream_connections,
        "tunnels_open": stats.tunnels_open,
        "access_log_lines": access_log_lines,
        "access_log_dropped": access_log_dropped,
        "cpu_seconds": cpu_seconds,
    }


def _add_histogram(into: Histogram, counts: list[int], total: float) -> None:
    into.counts = [a + b for a, b in zip(into.counts, counts, strict=True)]
    into.total += total


class _Counts:
    """Reports added up: one worker's over its restarts, or the whole pool's."""

    def __init__(self) -> None:
        self.stats = RouterStats()
        self.access_log_lines = 0
        self.access_log_dropped = 0
        self.cpu_seconds = 0.0

    @property
    def routed(self) -> int:
        return sum(self.stats.requests.values())

    def add(self, report: Message, *, gauges: bool) -> None:
        """Add ``report``; its gauges (open connections, tunnels) only if ``gauges``: a worker
        that has exited holds no connection, but what it counted stays counted."""
        stats = self.stats
        for service, kind, count in report["requests"]:
            stats.requests[(service, kind)] += count
        for kind, count in report["upstream_errors"].items():
            stats.upstream_errors[kind] += count
        for name, count in report["rejected"].items():
            stats.rejected[Answer[name]] += count
        for service, kind, counts, total in report["durations"]:
            histogram = stats.durations.get((service, kind))
            if histogram is None:
                histogram = stats.durations[(service, kind)] = Histogram()
            _add_histogram(histogram, counts, total)
        _add_histogram(stats.upstream_connect, *report["upstream_connect"])
        _add_histogram(stats.upstream_head, *report["upstream_head"])
        stats.refused_connections += report["refused_connections"]
        stats.h2_connections += report["h2_connections"]
        for reason, count in report["h2_goaway"].items():
            stats.h2_goaway[reason] += count
        if gauges:
            stats.open_connections += report["open_connections"]
            stats.upstream_connections += report["upstream_connections"]
            stats.tunnels_open += report["tunnels_open"]
        self.access_log_lines += report["access_log_lines"]
        self.access_log_dropped += report["access_log_dropped"]
        self.cpu_seconds += report["cpu_seconds"]

    def report(self) -> Message:
        return _report(self.stats, self.access_log_lines, self.access_log_dropped, self.cpu_seconds)


# -- the worker process


@dataclasses.dataclass(frozen=True, slots=True)
class _Fields:
    """A dataclass instance taken apart for pickling: the compiled (mypyc) frozen settings
    classes cannot be unpickled, but they can be constructed again from their fields."""

    cls: type
    values: dict[str, object]

    @classmethod
    def of(cls, value: object) -> _Fields:
        values = {}
        for field in dataclasses.fields(cast(Any, value)):
            item = getattr(value, field.name)
            is_instance = dataclasses.is_dataclass(item) and not isinstance(item, type)
            values[field.name] = cls.of(item) if is_instance else item
        return cls(type(value), values)

    def build(self) -> Any:
        return self.cls(**{name: v.build() if isinstance(v, _Fields) else v for name, v in self.values.items()})


@dataclasses.dataclass(frozen=True, slots=True)
class _WorkerSpec:
    """What a worker process is started with (pickled into it by ``spawn``)."""

    index: int
    listen: tuple[str, int]
    settings: _Fields
    decode: TableDecoder
    decode_delta: DeltaDecoder
    prepare: Callable[[], None] | None
    """The composition root's set-up of a router process (logging, event loop policy)."""
    trace: bool


def _worker_main(spec: _WorkerSpec, channel: socket.socket) -> None:
    """A worker process's entry point: set up, serve until told to drain, exit."""
    # Ctrl-C and a terminal hang-up reach the whole process group: the parent drains the
    # workers on the first and re-reads its route file on the second, so both are its alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if spec.prepare is not None:
        spec.prepare()
    sys.exit(asyncio.run(_serve(spec, channel)))


class _Follower:
    """A worker's end of the table protocol, without I/O: makes the tables the parent sends
    current on ``server``, and says what to answer.

    The parent's channel is ordered and every delta starts from the table sent before it, so a
    delta that does not start from the table held here can only follow a table that did not load
    (a bug): it is never applied (the services it does not carry may differ), and the whole table
    is asked for instead."""

    def __init__(self, server: RouterServer, decode: TableDecoder, decode_delta: DeltaDecoder) -> None:
        self._server = server
        self._decode = decode
        self._decode_delta = decode_delta
        self._groups: Mapping[str, object] = {}
        """The current table's route groups as the parent wrote them: a delta with others regroups every service."""
        self.wants_table = False
        """A whole table was asked for: deltas are dropped until it comes (those already on their
        way start from tables this worker never held; the whole table brings it past them)."""

    def take(self, message: Message) -> Message | None:
        """Apply a ``table`` or ``delta`` message; the answer for the parent, if any."""
        held = self._server.table.version
        if message["op"] == "table":
            self.wants_table = False
            return self._ack() if self._whole(message["table"]) else None
        if self.wants_table:
            return None
        if message["from"] == held:
            try:
                table = self._decode_delta(self._server.table, self._groups, message)
            except ValueError:
                log.exception("router worker: the delta to v%d does not apply to v%d", message["version"], held)
            else:
                self._server.swap(table)
                self._groups = message["groups"]
                return self._ack()
        else:
            log.warning("router worker: a delta from v%d, but this worker holds v%d", message["from"], held)
        self.wants_table = True
        return {"op": "resync", "version": held}

    def _whole(self, document: Any) -> bool:
        """Make a whole table current; whether it was."""
        try:
            table = self._decode(document)
        except ValueError:
            # The parent validated this table; failing here is a bug. Not acknowledging it keeps
            # the pod unready, which says so louder than this line.
            log.exception(
                "router worker: the table from the parent does not load; keeping v%d", self._server.table.version
            )
            return False
        if table.version == 0:
            return False  # the parent has no table yet
        self._server.swap(table)
        self._groups = document["groups"]
        return True

    def _ack(self) -> Message:
        return {"op": "ack", "version": self._server.table.version}


def _worker_report(server: RouterServer) -> Message:
    times = os.times()
    access_log = server.access_log
    lines, dropped = (access_log.written, access_log.dropped) if access_log is not None else (0, 0)
    return _report(server.stats, lines, dropped, times.user + times.system)


async def _serve(spec: _WorkerSpec, channel: socket.socket) -> int:
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_unix_connection(sock=channel)
    settings: RouterSettings = spec.settings.build()
    tracer = None
    if spec.trace:
        from router.tracing import make_tracer_from_env  # noqa: PLC0415 - the SDK loads only when asked

        tracer = make_tracer_from_env()
    server = RouterServer(settings, tracer=tracer)
    follower = _Follower(server, spec.decode, spec.decode_delta)
    first = await _receive(reader)
    if first is None:
        return 0  # the parent went away before this worker was of use
    # The table before the listener: a restarted worker must never answer from an empty table.
    follower.take(first)  # the whole table (``WorkerPool._spawn``), acknowledged by ``started``
    try:
        await server.start(spec.listen, reuse_port=True)
    except OSError as exc:
        writer.write(_frame({"op": "failed", "errno": exc.errno or 0, "message": exc.strerror or str(exc)}))
        await writer.drain()
        await server.close(drain=0)
        return 1
    writer.write(_frame({"op": "started", "pid": os.getpid(), "version": server.table.version}))
    gc.freeze()  # as devstack.cli's run_router: start-up's objects kept out of the GC's full passes
    stopping: asyncio.Future[float] = loop.create_future()

    def stop(seconds: float) -> None:
        if not stopping.done():
            stopping.set_result(seconds)

    loop.add_signal_handler(signal.SIGTERM, stop, settings.timeouts.drain)

    async def follow() -> None:
        try:
            while (message := await _receive(reader)) is not None:
                op = message["op"]
                if op in ("table", "delta"):
                    if (answer := follower.take(message)) is not None:
                        writer.write(_frame(answer))
                elif op == "stats":
                    writer.write(_frame({"op": "stats", "id": message["id"], "stats": _worker_report(server)}))
                elif op == "drain":
                    stop(float(message["seconds"]))
        finally:
            # The parent died, or this channel broke: nobody would feed or restart this worker.
            stop(settings.timeouts.drain)

    channel_task = loop.create_task(follow(), name=f"router-worker-{spec.index}-channel")
    seconds = await stopping
    await server.close(drain=seconds)
    channel_task.cancel()
    if not writer.is_closing():  # else the parent is gone, and so are the counters
        # What it counted since the last scrape, so the pool's counters never go back.
        writer.write(_frame({"op": "stats", "id": None, "stats": _worker_report(server)}))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
    return 0


# -- the parent


class _StartFailed(Exception):
    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.errno = code


async def _exited(process: SpawnProcess, timeout: float | None) -> bool:
    """Wait (bounded) until ``process`` has exited; whether it did. Its sentinel becomes
    readable at exit, so no thread blocks in ``join``."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def exited() -> None:
        if not done.done():
            done.set_result(None)

    loop.add_reader(process.sentinel, exited)
    try:
        await asyncio.wait_for(done, timeout)
    except TimeoutError:
        return False
    finally:
        loop.remove_reader(process.sentinel)
    process.join()
    return True


def _ending(pid: int | None, code: int | None) -> str:
    if code is not None and code < 0:
        return f"(pid {pid}) was killed by {signal.Signals(-code).name}"
    return f"(pid {pid}) exited with status {code}"


class _Slot:
    """One of the pool's N places: the worker process filling it now, and what it reported."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.process: SpawnProcess | None = None
        self.pid: int | None = None
        """Set once the process listens; None while it starts or is down."""
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.acked: int | None = None
        """The table version the worker last made current; None while it is down."""
        self.report: Message | None = None
        """The live process's latest counters."""
        self.retired = _Counts()
        """Counters of this slot's earlier processes: a restart does not take them back."""
        self.total = _Counts()
        """``retired`` plus ``report``, as of the last gathering."""
        self.restarts = 0
        self.updates = {"whole": 0, "delta": 0}
        """Tables sent to this slot's workers (its restarts included), whole and as deltas."""
        self.asked: dict[int, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None] | None = None


def _delta(previous: RouteTable, table: RouteTable) -> Message | None:
    """The ``delta`` message from ``previous`` to ``table``, or None when the whole table is the one
    to send: there was no table before, or more than ``DELTA_SHARE`` of the services changed. A
    service is unchanged when it is the same ``Routes`` (a source that shares structure, as the
    controller feed's follower does) or an equal one (a source that builds every service again, as
    the route file's does), as ``controller.feed`` tells them apart."""
    if previous.version == 0:
        return None
    before = previous.services
    limit = DELTA_SHARE * len(table.services)
    changed: dict[str, Routes] = {}
    for name, routes in table.services.items():
        old = before.get(name)
        if old is not routes and old != routes:
            changed[name] = routes
            if len(changed) > limit:
                return None  # no need to look further, nor to encode what was found
    removed = [name for name in before if name not in table.services]
    if len(changed) + len(removed) > limit:
        return None
    return {
        "op": "delta",
        "from": previous.version,
        "version": table.version,
        "sources": list(table.sources),
        "groups": table.groups_json(),
        "set": {name: routes.to_json() for name, routes in changed.items()},
        "removed": removed,
    }


class WorkerPool:
    """N worker processes behind one proxy port, one table, one admin listener.

    Shaped like ``RouterServer`` where the composition root uses it (``swap``, ``table``,
    ``stats``, ``start``, ``close``, ``address``, ``admin_address``, ``access_log``), so the
    sources feed it the same way.
    """

    def __init__(
        self,
        settings: RouterSettings,
        *,
        workers: int,
        decode: TableDecoder,
        decode_delta: DeltaDecoder,
        readiness: Readiness | None = None,
        prepare: Callable[[], None] | None = None,
        trace: bool = False,
    ) -> None:
        if workers < 2:
            raise ValueError("a worker pool has two workers or more; one is RouterServer")
        self.settings = settings
        self.stats = RouterStats()
        """The route sources' counters (the composition root fills them in); requests are counted
        by the workers and gathered into ``AdminState.stats`` per scrape."""
        self._decode = decode
        self._decode_delta = decode_delta
        self._readiness = readiness
        self._prepare = prepare
        self._trace = trace
        self._table = EMPTY_TABLE
        self._whole: bytes | None = None
        """The current table's ``table`` message, encoded when a worker first needs it whole."""
        self._slots = [_Slot(index) for index in range(workers)]
        self._context = multiprocessing.get_context("spawn")
        self._listen: tuple[str, int] = ("", 0)
        self._reservation: socket.socket | None = None
        self._admin_runner: web.AppRunner | None = None
        self._admin: AdminState | None = None
        self._asked = 0
        self._counts = _Counts()
        """The whole pool's counters as of the last gathering (``_gather``)."""
        self._closing = False
        self._closed = asyncio.Event()
        self.address: tuple[str, int] = ("", 0)
        self.admin_address: tuple[str, int] = ("", 0)
        self.access_log: str | None = None
        """The access log destination once checked (each worker writes its own lines to it)."""

    @property
    def table(self) -> RouteTable:
        return self._table

    def swap(self, table: RouteTable) -> None:
        """Make ``table`` current and send it to every worker, encoded once for all: as a delta
        from the table before when few services changed (``_delta``), else whole.

        Every open channel has been sent every table since its worker's first, in order (``_spawn``
        sends the current one whole, with no await before the channel is open to ``swap``), so the
        delta starts from what each worker holds once it has read the channel; a worker for which
        it does not (one of its tables did not load) answers ``resync``, and is sent the whole table."""
        previous = self._table
        self._table = table
        self._whole = None
        if not any(slot.writer is not None for slot in self._slots):
            return  # every worker is starting again: each is sent the current table whole
        delta = _delta(previous, table)
        frame, sent_as = (self._whole_frame(), "whole") if delta is None else (_frame(delta), "delta")
        for slot in self._slots:
            if slot.writer is not None:
                slot.writer.write(frame)
                slot.updates[sent_as] += 1

    def _whole_frame(self) -> bytes:
        if self._whole is None:
            self._whole = _frame({"op": "table", "table": self._table.to_json()})
        return self._whole

    def _send_whole(self, slot: _Slot) -> None:
        assert slot.writer is not None
        slot.writer.write(self._whole_frame())
        slot.updates["whole"] += 1

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """The composition root's readiness, and every worker on the current table."""
        ready, detail = self._readiness() if self._readiness is not None else (self._table.version > 0, {})
        version = self._table.version
        workers = [{"worker": slot.index, "pid": slot.pid, "version": slot.acked} for slot in self._slots]
        return (ready and all(slot.acked == version for slot in self._slots), {**detail, "workers": workers})

    async def start(self, listen: tuple[str, int], admin: tuple[str, int] | None = None) -> None:
        """Start every worker on ``listen``, then the admin listener. An ``OSError`` leaves
        ``access_log`` None if the access log failed, ``address`` unset if listening failed."""
        destination = self.settings.access_log
        if destination is not None and destination != "-":
            # Each worker opens it; a path that cannot be is the user's to fix, found here once.
            with open(destination, "a", encoding="utf-8"):
                pass
        self.access_log = destination
        self._reservation = await _reserve(listen)
        self._listen = (listen[0], self._reservation.getsockname()[1])
        results = await asyncio.gather(*(self._spawn(slot) for slot in self._slots), return_exceptions=True)
        for result in results:
            if isinstance(result, _StartFailed):
                raise OSError(result.errno, str(result))
            if isinstance(result, BaseException):
                raise result
        self.address = self._listen
        for slot in self._slots:
            slot.task = asyncio.create_task(self._supervise(slot), name=f"router-worker-{slot.index}")
        if admin is not None:
            links = dashboard.Links.for_router(self.settings.preview_domain, self.address)
            self._admin = AdminState(
                lambda: self._table,
                self.stats,
                self.readiness,
                links=links,
                refresh=self._gather,
                collectors=[_PoolCollector(self._slots, lambda: self._counts, access_log=destination is not None)],
            )
            self._admin_runner, self.admin_address = await start_admin_listener(self._admin, admin)

    async def close(self, drain: float | None = None) -> None:
        """Drain every worker (each stops accepting and finishes in-flight exchanges within
        ``drain`` seconds), kill any still there ``EXIT_GRACE`` later, then close the admin."""
        seconds = self.settings.timeouts.drain if drain is None else drain
        self._closing = True
        self._closed.set()
        waiting: list[asyncio.Task[Any]] = []
        for slot in self._slots:
            if slot.writer is not None:
                slot.writer.write(_frame({"op": "drain", "seconds": seconds}))
            if slot.task is not None:
                waiting.append(slot.task)
            elif slot.process is not None:  # started, but the pool never was (another failed)
                waiting.append(asyncio.create_task(self._end(slot), name=f"router-worker-{slot.index}-end"))
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=seconds + EXIT_GRACE)
            if late:
                for slot in self._slots:
                    if slot.process is not None and slot.process.exitcode is None:
                        slot.process.kill()
                await asyncio.wait(late)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
            self._admin_runner = None
        if self._reservation is not None:
            self._reservation.close()
            self._reservation = None

    async def _spawn(self, slot: _Slot) -> None:
        """Start a worker in ``slot`` and wait until it listens; ``_StartFailed`` if it does not."""
        ours, theirs = socket.socketpair()
        spec = _WorkerSpec(
            index=slot.index,
            listen=self._listen,
            settings=_Fields.of(self.settings),
            decode=self._decode,
            decode_delta=self._decode_delta,
            prepare=self._prepare,
            trace=self._trace,
        )
        process = self._context.Process(
            target=_worker_main, args=(spec, theirs), name=f"router-worker-{slot.index}", daemon=True
        )
        try:
            process.start()
        except OSError as exc:  # out of processes or file descriptors
            ours.close()
            raise _StartFailed(f"router worker {slot.index}: {exc.strerror or exc}", exc.errno or 0) from None
        finally:
            theirs.close()
        slot.process = process
        slot.reader, slot.writer = await asyncio.open_unix_connection(sock=ours)
        self._send_whole(slot)  # with no await since the writer was set: no table is missed
        if self._closing:
            slot.writer.write(_frame({"op": "drain", "seconds": 0}))
        try:
            message = await asyncio.wait_for(_receive(slot.reader), START_TIMEOUT)
        except TimeoutError:
            message = {"op": "failed", "errno": errno.ETIMEDOUT, "message": f"silent for {START_TIMEOUT:.0f}s"}
        if message is not None and message["op"] == "started":
            slot.pid = message["pid"]
            slot.acked = message["version"]
            return
        how = await self._end(slot)
        if message is None:
            raise _StartFailed(f"router worker {slot.index} {how} before it listened")
        raise _StartFailed(f"router worker {slot.index}: {message['message']}", message["errno"])

    async def _follow(self, slot: _Slot) -> None:
        """Read the worker's messages until its channel ends (it exited)."""
        assert slot.reader is not None
        while (message := await _receive(slot.reader)) is not None:
            op = message["op"]
            if op == "ack":
                slot.acked = message["version"]
            elif op == "resync":
                self._send_whole(slot)  # the worker logged why the delta did not apply
            elif op == "stats":
                slot.report = message["stats"]
                asked = slot.asked.pop(message["id"], None) if message["id"] is not None else None
                if asked is not None and not asked.done():
                    asked.set_result(None)

    async def _end(self, slot: _Slot) -> str:
        """After its channel ended or it failed to start: reap the process (killing it if it
        lingers), keep what it counted, empty the slot. How it ended, for the log."""
        process = slot.process
        assert process is not None
        if slot.writer is not None:
            slot.writer.close()
        if not await _exited(process, EXIT_GRACE):
            process.kill()
            await _exited(process, None)
        if slot.report is not None:
            slot.retired.add(slot.report, gauges=False)
        how = _ending(slot.pid or process.pid, process.exitcode)
        for asked in slot.asked.values():
            if not asked.done():
                asked.set_result(None)
        slot.asked.clear()
        slot.process = slot.pid = slot.acked = slot.report = slot.reader = slot.writer = None
        return how

    async def _supervise(self, slot: _Slot) -> None:
        """Follow the slot's worker; when it ends, start another, after a backoff that doubles
        with every crash in a row (one log line per crash)."""
        loop = asyncio.get_running_loop()
        crashes = 0
        while True:
            began = loop.time()
            await self._follow(slot)
            how = await self._end(slot)
            while True:
                if self._closing:
                    return
                crashes = 1 if loop.time() - began >= STABLE_AFTER else crashes + 1
                delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (crashes - 1))
                slot.restarts += 1
                log.warning("router worker %d %s; starting another in %.2gs", slot.index, how, delay)
                try:
                    await asyncio.wait_for(self._closed.wait(), delay)
                    return
                except TimeoutError:
                    pass
                began = loop.time()
                try:
                    await self._spawn(slot)
                    break
                except _StartFailed as exc:
                    how = f"did not start ({exc})"

    async def _gather(self) -> None:
        """Ask every worker for its counters (bounded wait), then add them up for the admin."""
        loop = asyncio.get_running_loop()
        waiting: list[asyncio.Future[None]] = []
        for slot in self._slots:
            if slot.writer is not None and slot.pid is not None:
                self._asked += 1
                asked = slot.asked[self._asked] = loop.create_future()
                slot.writer.write(_frame({"op": "stats", "id": self._asked}))
                waiting.append(asked)
        if waiting:
            await asyncio.wait(waiting, timeout=STATS_TIMEOUT)
        pool = _Counts()
        for slot in self._slots:
            for number in [number for number, asked in slot.asked.items() if not asked.done()]:
                del slot.asked[number]  # its answer, when it comes, still updates the report
            total = _Counts()
            total.add(slot.retired.report(), gauges=False)
            if slot.report is not None:
                total.add(slot.report, gauges=True)
            slot.total = total
            pool.add(total.report(), gauges=True)
        pool.stats.table_failures = self.stats.table_failures
        pool.stats.source_confirmed = self.stats.source_confirmed
        if self._admin is not None:
            self._admin.stats = pool.stats
        self._counts = pool


class _PoolCollector(Collector):
    """The pool's own metrics, read after ``WorkerPool._gather``: workers up, restarts, and
    what each worker served, so an uneven spread over the workers shows."""

    def __init__(self, slots: list[_Slot], counts: Callable[[], _Counts], *, access_log: bool) -> None:
        self._slots = slots
        self._counts = counts
        self._access_log = access_log

    def collect(self) -> Iterator[Metric]:
        slots = self._slots
        yield GaugeMetricFamily(
            "devstack_workers",
            "Worker processes listening (of --workers).",
            value=sum(s.pid is not None for s in slots),
        )
        restarts = CounterMetricFamily("devstack_worker_restarts", "Worker processes replaced.", labels=["worker"])
        routed = CounterMetricFamily(
            "devstack_worker_requests", "Requests routed by each worker (its restarts included).", labels=["worker"]
        )
        cpu = CounterMetricFamily(
            "devstack_worker_cpu_seconds", "CPU time of each worker (its restarts included).", labels=["worker"]
        )
        updates = CounterMetricFamily(
            "devstack_worker_table_updates",
            "Route tables sent to each worker (its restarts included): whole, or as a delta from the one before.",
            labels=["worker", "sent_as"],
        )
        version = GaugeMetricFamily(
            "devstack_worker_route_table_version",
            "Route table version each worker serves (-1 while it is down).",
            labels=["worker"],
        )
        for slot in slots:
            label = [str(slot.index)]
            restarts.add_metric(label, slot.restarts)
            routed.add_metric(label, slot.total.routed)
            cpu.add_metric(label, slot.total.cpu_seconds)
            for sent_as, count in slot.updates.items():
                updates.add_metric([*label, sent_as], count)
            version.add_metric(label, -1 if slot.acked is None else slot.acked)
        yield from (restarts, routed, cpu, updates, version)
        counts = self._counts()
        if self._access_log:
            yield CounterMetricFamily(
                "devstack_access_log_lines", "Access log lines written.", value=counts.access_log_lines
            )
            yield CounterMetricFamily(
                "devstack_access_log_dropped",
                "Access log lines dropped because the destination fell behind.",
                value=counts.access_log_dropped,
            )


async def _reserve(listen: tuple[str, int]) -> socket.socket:
    """Hold the proxy port for the pool's lifetime: bound with SO_REUSEPORT, so workers (and
    their replacements) can join it, but never listening, so the kernel queues no connection on
    it. A port another server holds is refused first by a plain bind, as without ``--workers``:
    SO_REUSEPORT alone would let two routers of one user share a port without a word."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(listen[0], listen[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(address)
        port = probe.getsockname()[1]  # port 0 chosen once, for every worker
    held = socket.socket(family, kind, proto)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((address[0], port, *address[2:]))
    except OSError:
        held.close()
        raise
    return held

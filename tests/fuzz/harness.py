"""The request fuzz's harness: one router and two recording origins (baseline and alice) on a
uvloop loop in a background thread for a whole module, and each Hypothesis example's exchange
with its invariants, checked against independent parses (``Harness.check``, which lists them).
Each example is a coroutine submitted to that loop from a new client address; nothing is mocked:
every example is real bytes over loopback TCP. The connection-lifecycle fuzz (``lifecycle``)
builds on this harness and its origins; this module never depends on it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import gc
import itertools
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import uvloop

from router.server import RouterServer
from router.settings import RouterSettings
from tests.fuzz.config import PATIENCE, SLACK, STRICT, TIMEOUTS, TIMER_SLACK
from tests.fuzz.expectations import compare, expected_origin
from tests.fuzz.origins import RecordingOrigin
from tests.fuzz.reference import Reference, reference_parse
from tests.fuzz.responses import Response, split_responses
from tests.fuzz.strategies import Case
from tests.support import make_table

T = TypeVar("T")


class _Client(asyncio.Protocol):
    """The fuzzing client: keeps every byte it received even when the router resets."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False
        self.wake = asyncio.Event()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.wake.set()

    def eof_received(self) -> bool:
        self.closed = True
        self.wake.set()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.wake.set()


@dataclasses.dataclass
class Outcome:
    requests: int = 0
    forwarded: int = 0
    refused: int = 0
    responses: int = 0
    statuses: collections.Counter[int] = dataclasses.field(default_factory=collections.Counter)
    hits: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    closed: bool = False
    elapsed: float = 0.0


class Harness:
    """A uvloop loop in a thread running one router and two recording origins for a whole module."""

    def __init__(self, settings: RouterSettings | None = None) -> None:
        self.settings = settings or RouterSettings(timeouts=TIMEOUTS)
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="fuzz-loop", daemon=True)
        self.counter = itertools.count()
        self.origins = {name: RecordingOrigin(name, self.counter) for name in ("baseline", "alice")}
        self.router: RouterServer | None = None
        self.examples = 0
        self._peers = itertools.count()
        self.peers: set[bytes] = set()
        """Every client address used so far (each example connects from its own 127.1.x.y)."""
        self._beat = 0.0
        self.worst_lag = 0.0
        self.totals = Outcome()
        self.started = time.monotonic()
        self.gc_max = 0.0
        self._gc_started = 0.0

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_started = now
        elif self._gc_started:
            self.gc_max = max(self.gc_max, now - self._gc_started)
            self._gc_started = 0.0

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self._beat:
            self.worst_lag = max(self.worst_lag, now - self._beat - 0.05)
        self._beat = now
        self.loop.call_later(0.05, self._heartbeat)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise AssertionError(f"the exchange did not finish within {timeout:.1f} s (harness bound)") from None

    def start(self) -> None:
        gc.callbacks.append(self._gc)
        self.thread.start()
        self.run(self._start(), 10)

    async def _start(self) -> None:
        for origin in self.origins.values():
            await origin.start()
        table = make_table(
            {"a": {"baseline": self.origins["baseline"].url, "overrides": {"alice": self.origins["alice"].url}}}
        )
        self.router = RouterServer(self.settings, table)
        await self.router.start(("127.0.0.1", 0))
        self.loop.call_soon(self._heartbeat)

    def stop(self) -> None:
        gc.callbacks.remove(self._gc)
        gc.unfreeze()
        gc.collect()  # now, not in a later test's event loop
        try:
            self.run(self._stop(), 10)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def _stop(self) -> None:
        if self.router is not None:
            await self.router.close(drain=0.5)
        for origin in self.origins.values():
            await origin.close()

    def _count_example(self) -> None:
        if self.examples % 100 == 0:
            # Between examples, with the loop idle: collect, then exempt everything alive from
            # future collections. Hypothesis' own bookkeeping grows with every example, and a full
            # collection over it, run by whichever thread allocates, would stall the router's loop
            # for a second after a few thousand examples.
            gc.collect()
            gc.freeze()
        self.examples += 1

    def _next_peer(self) -> str:
        """A client address of its own for each example (127.1.x.y): X-Forwarded-For tells the
        origins which example a request came from."""
        n = next(self._peers)
        peer = f"127.1.{(n // 254) % 250}.{n % 254 + 1}"
        self.peers.add(peer.encode())
        return peer

    def check(self, case: Case) -> Outcome:
        """Run one example on the loop and check its invariants, all against independent parses:

        1. no crash: a control request to each origin still gets its 200 afterwards, the router's
           connection counters return to zero and its event loop was never blocked for a second;
        2. no hang: the client's exchange ends (all answers in, or the router closes) within the
           router's own deadline for that situation plus slack;
        3. well-framed answers: the client's bytes split into complete HTTP/1.1 responses (httptools'
           response parser, HEAD-aware), one per request at most, in order; refusals close;
        4. nothing smuggled: every request an origin parsed from what the router forwarded equals the
           request the reference parser (httptools on the client's raw bytes) found at the same position
           — method, origin-form path, body and every end-to-end header; the origin never sees more
           requests than the reference accepted, never one the router refused (4xx), and every
           forwarded head and body is strictly framed (CRLF only, one Host, exactly one of
           Content-Length or chunked when there is a body, chunked re-encoded canonically);
        5. routing: ``baggage: devstack=alice`` reaches the alice origin, everything else the baseline.
        """
        self._count_example()
        outcome = self.run(self._check(case), 30)
        totals = self.totals
        for field in ("requests", "forwarded", "refused", "responses"):
            setattr(totals, field, getattr(totals, field) + getattr(outcome, field))
        totals.statuses.update(outcome.statuses)
        totals.hits.update(outcome.hits)
        return outcome

    def summary(self, profile: str) -> str:
        t = self.totals
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(t.statuses.items()))
        hits = ", ".join(f"{k}: {n}" for k, n in sorted(t.hits.items())) or "none"
        return (
            f"fuzz[{profile}]: {self.examples} examples in {time.monotonic() - self.started:.1f} s; "
            f"{t.requests} requests parsed by the reference, {t.forwarded} forwarded to origins, "
            f"{t.refused} refused by the router; responses by status {{{statuses}}}; known-bug hits: {hits}; "
            f"longest GC pause {self.gc_max:.2f} s"
        )

    # -- one example -------------------------------------------------------------------------

    async def _check(self, case: Case) -> Outcome:
        assert self.router is not None
        ctx = self.router.ctx
        assert ctx is not None
        peer = self._next_peer()
        for origin in self.origins.values():
            origin.records.clear()
            origin.problems.clear()
            origin.hits.clear()
        self.worst_lag = 0.0
        ref = reference_parse(case.raw)
        outcome = Outcome(requests=len(ref.requests))
        hits = outcome.hits
        loop = asyncio.get_running_loop()
        started = loop.time()

        is_head = ref.is_head
        data, closed = await self._exchange(case, ref, peer, is_head)
        outcome.closed = closed
        outcome.elapsed = loop.time() - started
        await asyncio.sleep(0.01)  # let the origins finish anything the router flushed at close

        problems: list[str] = []
        responses, framing_problem = split_responses(data, is_head, hits)
        if framing_problem:
            problems.append(framing_problem)
        outcome.responses = len(responses)
        outcome.statuses.update(r.status for r in responses)
        outcome.refused = sum(1 for r in responses if r.origin is None)
        problems += self._check_responses(case, ref, responses, closed, outcome)
        problems += self._check_forwarded(case, ref, responses, peer.encode(), outcome)
        problems += await self._check_alive(ctx)
        if problems:
            raise AssertionError(
                f"{len(problems)} invariant(s) broken for {case!r}\n  reference: {len(ref.requests)} complete, "
                f"partial={ref.partial is not None}, error={ref.error!r}, upgraded={ref.upgraded}; "
                f"closed={closed} after {outcome.elapsed:.2f} s\n  client got: {data[:600]!r}\n  - "
                + "\n  - ".join(problems)
            )
        return outcome

    @staticmethod
    def _deadline(case: Case, ref: Reference) -> float:
        """When the exchange must be over by the router's own deadlines."""
        t = TIMEOUTS
        if ref.partial is not None and not case.half_close and ref.cut is None:
            # The router must end it with its header_read or body_idle timer (408, close), also
            # for a head pipelined behind another exchange (once given keepalive_idle instead).
            return max(t.header_read, t.body_idle) + TIMER_SLACK
        # Otherwise nothing waits on a timer: the origins answer at once.
        return t.upstream_response + SLACK

    async def _exchange(
        self, case: Case, ref: Reference, peer: str, is_head: Callable[[int, int | None], bool]
    ) -> tuple[bytes, bool]:
        """Send the case's segments and read until the router closes or nothing more is due."""
        assert self.router is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PATIENCE
        transport, client = await loop.create_connection(_Client, *self.router.address, local_addr=(peer, 0))
        try:
            segments = case.segments()
            for i, segment in enumerate(segments):
                if client.closed:
                    break  # the router refused and closed early; what it said is in client.data
                transport.write(segment)
                if i + 1 < len(segments):
                    await asyncio.sleep(0.003)
            if case.half_close and not client.closed:
                try:
                    transport.write_eof()
                except OSError:
                    pass
            # Stop reading on our own only when nothing more is due: every complete request has
            # an answer, nothing was left half-sent, and no answer announced a close.
            quiet = not case.half_close and ref.partial is None and ref.error is None and ref.cut is None
            grace_until: float | None = loop.time() + 0.02 if quiet and not ref.requests else None
            seen = 0
            while not client.closed:
                if quiet and grace_until is None and len(client.data) > seen:
                    seen = len(client.data)
                    responses, problem = split_responses(bytes(client.data), is_head, collections.Counter())
                    if len(responses) >= len(ref.requests) and problem is None and not any(r.closes for r in responses):
                        grace_until = loop.time() + 0.02
                limit = deadline if grace_until is None else min(deadline, grace_until)
                if loop.time() >= limit:
                    break
                client.wake.clear()
                try:
                    await asyncio.wait_for(client.wake.wait(), limit - loop.time())
                except TimeoutError:
                    break
        finally:
            transport.abort()
        return bytes(client.data), client.closed

    def _check_responses(
        self, case: Case, ref: Reference, responses: list[Response], closed: bool, outcome: Outcome
    ) -> list[str]:
        problems = []
        strict_bound = self._deadline(case, ref)
        finished = closed or (not case.half_close and ref.partial is None and ref.error is None and ref.cut is None
                              and len(responses) >= len(ref.requests))  # fmt: skip
        if not finished:
            problems.append(f"hang: the router neither answered everything nor closed within {PATIENCE:.1f} s")
        elif outcome.elapsed > strict_bound:
            problems.append(f"the exchange took {outcome.elapsed:.2f} s, past its {strict_bound:.1f} s deadline")
        for i, r in enumerate(responses):
            if r.version != "1.1":
                problems.append(f"response #{i} has version {r.version!r}")
            if len(r.header(b"content-length")) > 1 or (r.header(b"content-length") and r.header(b"transfer-encoding")):
                problems.append(f"response #{i} has ambiguous framing: {r.headers!r}")
            if r.origin is not None and i >= len(ref.requests):
                problems.append(f"response #{i} came from origin {r.origin} but the reference has no such request")
            if r.origin is None and r.status in (400, 405, 408, 413, 414, 431, 501, 505) and not r.closes:
                problems.append(f"router refused request #{i} with {r.status} without Connection: close")
            if r.origin is None and r.status < 400:
                problems.append(f"router itself answered request #{i} with {r.status}")
        extra = len(responses) - len(ref.requests)
        if extra > 1:
            problems.append(f"{len(responses)} responses for {len(ref.requests)} requests")
        elif extra == 1 and (responses[-1].origin is not None or responses[-1].status < 400):
            problems.append(f"an extra response for a request the reference did not accept: {responses[-1].status}")
        if ref.error is not None and len(responses) > len(ref.requests):
            # The router has every byte of an unparseable request at once: it answers at once
            # (a timeout status means it waited, and so went on with a request it knew was bad).
            last = responses[-1]
            if not last.closes:
                problems.append("the answer to an unparseable request does not close")
            if last.status in (408, 504):
                if STRICT or not (last.status == 408 and ref.failed is not None and ref.failed.head_done):
                    problems.append(f"an unparseable request was answered {last.status}, after a timeout")
                else:
                    outcome.hits["queued-malformed-forwarded"] += 1
        if case.half_close and ref.partial is not None:
            return problems  # "a half-close mid-request ends the exchange" (and those before it)
        # Every request up to the first that ends the connection is answered, unless an earlier
        # answer announced the close; a half-close after whole requests still gets their answers.
        due = len(ref.requests) if ref.cut is None else ref.cut + 1
        announced = next((i for i, r in enumerate(responses) if r.closes), None)
        if announced is not None:
            due = min(due, announced + 1)
        if len(responses) < due:
            problems.append(f"only {len(responses)} of {due} due responses arrived")
        if ref.cut is not None and len(responses) > ref.cut and not responses[ref.cut].closes:
            problems.append(f"request #{ref.cut} ends the connection but its answer does not say close")
        if ref.cut is not None and len(responses) > ref.cut and not closed:
            problems.append(f"request #{ref.cut} ends the connection but the router kept it open")
        if (ref.error is not None and announced is None and ref.cut is None
                and len(responses) == len(ref.requests)):  # fmt: skip
            problems.append(f"the router did not answer an unparseable request ({ref.error}) before closing")
        return problems

    def _check_forwarded(
        self, case: Case, ref: Reference, responses: list[Response], peer: bytes, outcome: Outcome
    ) -> list[str]:
        problems = []
        for origin in self.origins.values():
            problems += origin.problems
            outcome.hits.update(origin.hits)
        all_records = [r for origin in self.origins.values() for r in origin.records]
        records = {(r.origin, r.seq): r for r in all_records if r.peer == peer}
        for r in all_records:
            # Late arrivals from an earlier example are someone else's business; a request no
            # client sent (no or unknown X-Forwarded-For) was smuggled through the router.
            if r.peer != peer and r.peer not in self.peers:
                problems.append(f"origin {r.origin} saw a request no client sent (X-Forwarded-For peer "
                                f"{r.peer!r}): {r.method!r} {r.url!r} {r.headers!r}")  # fmt: skip
        outcome.forwarded = len(records)
        if len(records) > len(ref.requests):
            problems.append(f"origins saw {len(records)} requests, the reference parser only {len(ref.requests)}")
        mapped: dict[tuple[str, int], int] = {}
        for i, response in enumerate(responses):
            if response.origin is None:
                continue
            seq = response.header(b"x-seq")
            key = (response.origin, int(seq[0]) if seq and seq[0].isdigit() else -1)
            rec = records.get(key)
            if rec is None:
                problems.append(f"response #{i} names origin request {key} that this client never sent")
                continue
            if key in mapped:
                problems.append(f"responses #{mapped[key]} and #{i} both answer origin request {key}")
            mapped[key] = i
            if i < len(ref.requests):
                req = ref.requests[i]
                problems += compare(req, rec, i)
                want = expected_origin(req)
                if want is not None and rec.origin != want:
                    problems.append(f"request #{i} with baggage {req.header(b'baggage')!r} went to {rec.origin}")
        # Requests an origin completed whose answer the client never saw: only legitimate when the
        # client half-closed mid-request (the router then drops the exchange). They must still be
        # requests the reference accepted, in order, and never ones the router answered itself.
        unmapped = sorted((r for k, r in records.items() if k not in mapped), key=lambda r: r.seq)
        if unmapped and not (case.half_close and ref.partial is not None):
            problems.append(f"origins completed {len(unmapped)} request(s) whose answers never reached the client")
        refused = {i for i, r in enumerate(responses) if r.origin is None}
        taken = set(mapped.values())
        j = 0
        for rec in unmapped:
            while j < len(ref.requests) and (j in taken or j in refused or compare(ref.requests[j], rec, j)):
                j += 1
            if j >= len(ref.requests):
                problems.append(f"origin {rec.origin} saw a request matching no unanswered reference request: "
                                f"{rec.method!r} {rec.url!r} {rec.headers!r} body={rec.body[:80]!r}")  # fmt: skip
                break
            j += 1
        return problems

    async def _check_alive(self, ctx: Any) -> list[str]:
        problems = []
        assert self.router is not None
        for name, baggage in (("alice", b"baggage: devstack=alice\r\n"), ("baseline", b"")):
            raw = b"GET /__control HTTP/1.1\r\nHost: a\r\n" + baggage + b"Connection: close\r\n\r\n"
            reader, writer = await asyncio.open_connection(*self.router.address)
            try:
                writer.write(raw)
                data = await asyncio.wait_for(reader.read(), TIMEOUTS.upstream_response + SLACK)
            except (TimeoutError, ConnectionError) as exc:
                problems.append(f"control request to {name} failed: {exc!r}")
                continue
            finally:
                writer.close()
            if not data.startswith(b"HTTP/1.1 200 ") or b"x-origin: " + name.encode() not in data:
                problems.append(f"control request to {name} got {data[:200]!r}")
            control = [r for r in self.origins[name].records if r.peer == b"127.0.0.1"]
            if [(r.method, r.url) for r in control] != [(b"GET", b"/__control")]:
                problems.append(f"origin {name} saw {len(control)} requests from the control client: {control!r}")
            self.origins[name].records[:] = [r for r in self.origins[name].records if r.peer != b"127.0.0.1"]
        loop = asyncio.get_running_loop()
        end = loop.time() + 1.0
        while ctx.connections and loop.time() < end:
            await asyncio.sleep(0.005)
        stats = self.router.stats
        if ctx.connections or stats.open_connections != 0:
            problems.append(f"router still tracks {len(ctx.connections)} client connections "
                            f"(open_connections={stats.open_connections})")  # fmt: skip
        if not 0 <= stats.upstream_connections <= 32:
            problems.append(f"router counts {stats.upstream_connections} upstream connections")
        if self.worst_lag > 1.0:
            problems.append(f"the event loop was blocked for {self.worst_lag:.2f} s")
        return problems

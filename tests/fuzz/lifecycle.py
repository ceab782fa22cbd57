"""The connection-lifecycle fuzz for tests/test_fuzz.py: WebSocket tunnels and drip-fed bodies,
checked against the lifecycle the README promises rather than against a reference parse.

Its examples run on their own router (``LifecycleHarness``: the request fuzz's ``Harness`` on
LIFECYCLE_SETTINGS' sub-second timers, with the same recording origins). Two shapes: a WebSocket
upgrade whose client and origin then send, half-close (FIN) and reset (RST) in a random order,
some of it before the origin's 101 (``TunnelRun``); and request bodies sent in pieces with pauses:
honest, slower than Limits.body_min_rate, stalled past body_idle, abandoned (``DripRun``). What
each must see is in those classes' docstrings; common to both, nothing outlives its exchange
(``LifecycleHarness._check_released``): no client connection, open tunnel or upstream connection
in use is left, and every idle pooled connection is one its origin holds open as plain HTTP, never
a tunnel's; and the router still answers control requests with its loop never blocked for a second
(``Harness._check_alive``). As in the request fuzz (``harness``), nothing is mocked: every
example is real bytes over loopback TCP.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import json
import random
import time
from collections.abc import Callable
from typing import Final

from hypothesis import strategies as st

from router.settings import Limits, RouterSettings, Timeouts
from tests.fuzz.config import SLACK, TIMER_SLACK
from tests.fuzz.harness import Harness
from tests.fuzz.origins import TUNNEL_PATH, HeldUpgrade, PeerEnd, Record
from tests.fuzz.reference import reference_parse, upgrade_protocols
from tests.fuzz.responses import Response, split_responses

LIFECYCLE_TIMEOUTS = Timeouts(
    header_read=1,
    keepalive_idle=3,
    body_idle=0.3,
    upstream_response=2,
    tunnel_idle=1.0,
    linger=0.5,
    linger_pause=0.2,
)
"""Deadlines that end a drip, a stall, a lingering close or an idle tunnel well inside a second.
body_idle (also the rate check's grace) stays far above the 0.05 s between drip pieces, so a
drip's pauses alone never trip it; tunnel_idle stays far above the few milliseconds a tunnel
example leaves between two actions."""
LIFECYCLE_LIMITS = Limits(body_min_rate=2000)
"""2000 B/s: at least four times below the steady drips (8000 B/s and up) and two and a half
times above the slow ones (800 B/s at most), so neither lands near it on a loaded machine."""
LIFECYCLE_SETTINGS = RouterSettings(timeouts=LIFECYCLE_TIMEOUTS, limits=LIFECYCLE_LIMITS)

SETTLE: Final = 1.0
"""Seconds for bytes and FINs to cross loopback and the router: milliseconds, but a loaded
two-core machine gets a wide margin; a wait stops as soon as its condition holds."""


async def until(condition: Callable[[], bool], timeout: float) -> bool:
    """Whether ``condition`` holds within ``timeout`` seconds. Polled (every 2 ms) because what
    it reads is spread over two sockets and the router's counters, none with an event of its own;
    the deadline, not a sleep, decides."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        if loop.time() >= end:
            return condition()
        await asyncio.sleep(0.002)
    return True


def pattern(size: int) -> bytes:
    """``size`` pseudo-random bytes, the same for the same size: large payloads without asking
    Hypothesis for them byte by byte, and no period that could hide reordered pieces."""
    return random.Random(size).randbytes(size)


class _PeerProtocol(asyncio.Protocol):
    def __init__(self, end: PeerEnd) -> None:
        self.end = end

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.end.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.end.received += data

    def eof_received(self) -> bool:
        return self.end.on_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.end.lost = True


# -- tunnel examples ---------------------------------------------------------------------------

Action = tuple[str, bytes | int]
"""(what, payload): client-send / origin-send (bytes, or a size for ``pattern``), client-fin,
origin-fin, client-rst, origin-rst, or settle (wait until everything sent so far has arrived)."""

UPGRADES = [b"websocket"] * 5 + [b"WebSocket", b"websocket/13", b"h2c, websocket", b"h2c", b"foo", b"foo/2, bar"]
UPGRADE_CONNECTIONS = [b"Upgrade", b"Upgrade", b"upgrade", b"keep-alive, Upgrade", b"Upgrade, keep-alive"]
_SEND = st.one_of(st.binary(min_size=1, max_size=24), st.binary(min_size=1, max_size=24), st.integers(4096, 1 << 18))
_BEFORE_101 = st.one_of(
    st.tuples(st.just("client-send"), _SEND),
    st.tuples(st.sampled_from(["client-fin", "client-rst"]), st.just(b"")),
)
_AFTER_101 = st.one_of(
    st.tuples(st.sampled_from(["client-send", "origin-send"]), _SEND),
    st.tuples(st.sampled_from(["settle", "client-fin", "origin-fin"] * 2 + ["client-rst", "origin-rst"]), st.just(b"")),
)
ANSWERS = ["accept"] * 6 + ["decline", "reset", "close"]
FINISHES = [("client-fin", "origin-fin")] * 5 + [("origin-fin", "client-fin")] * 5 + [
    ("client-rst",), ("origin-rst",), ("client-fin", "origin-rst"), ("origin-fin", "client-rst"), ("idle",)
]  # fmt: skip
"""How the ends still open at the end of the actions finish; ("idle",) waits for tunnel_idle, so it
is rare: each costs a second."""


@dataclasses.dataclass(frozen=True)
class TunnelCase:
    head: bytes
    """The upgrade request on TUNNEL_PATH, as sent."""
    early: bytes = b""
    """Tunnel bytes sent in the same write as the head, before any answer."""
    before: tuple[Action, ...] = ()
    """Client actions while the origin holds its answer."""
    answers: tuple[str, ...] = ("accept",)
    """The origin's answer (accept, decline, reset, close), then its answer to the router's retry."""
    first: bytes = b""
    """Tunnel bytes the origin sends in the same write as its 101."""
    after: tuple[Action, ...] = ()
    finish: tuple[str, ...] = ("client-fin", "origin-fin")
    pipelined: bool = False
    """A refused upgrade: the following request goes out without waiting for the first answer."""

    @property
    def alice(self) -> bool:
        return b"devstack=alice" in self.head


@st.composite
def tunnel_cases(draw: st.DrawFn) -> TunnelCase:
    """A WebSocket upgrade (sometimes h2c or an unknown protocol, sometimes HTTP/1.0) and what its
    two ends then do; only an HTTP/1.1 websocket upgrade opens a tunnel, the others get actions
    of no use to them and are checked as plain requests."""
    pick = st.sampled_from
    version = draw(pick([b"HTTP/1.1"] * 5 + [b"HTTP/1.0"]))
    lines = [b"GET " + TUNNEL_PATH + b" " + version, b"Host: a", b"Connection: " + draw(pick(UPGRADE_CONNECTIONS)),
             b"Upgrade: " + draw(pick(UPGRADES)), b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
             b"Sec-WebSocket-Version: 13"]  # fmt: skip
    if draw(st.booleans()):
        lines.append(b"baggage: devstack=alice")
    if draw(st.booleans()):
        lines.append(b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
    order = draw(st.permutations(range(1, len(lines))))
    head = b"\r\n".join([lines[0]] + [lines[i] for i in order]) + b"\r\n\r\n"
    if not reference_parse(head).upgraded:
        return TunnelCase(head=head, pipelined=draw(st.booleans()))
    return TunnelCase(
        head=head,
        early=draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=16))),
        before=tuple(draw(st.lists(_BEFORE_101, max_size=3))),
        answers=(draw(pick(ANSWERS)), draw(pick(ANSWERS))),
        first=draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=16))),
        after=tuple(draw(st.lists(_AFTER_101, max_size=10))),
        finish=draw(pick(FINISHES)),
    )


class _Run:
    """What every lifecycle example holds: the router, the origin it should reach, the client's
    end, and what went wrong (problems) and happened (log) for the failure report."""

    def __init__(self, harness: LifecycleHarness, alice: bool, peer: str) -> None:
        assert harness.router is not None
        self.router = harness.router
        self.harness = harness
        self.peer = peer
        self.origin = harness.origins["alice" if alice else "baseline"]
        self.client = PeerEnd()
        self.problems: list[str] = []
        self.log: list[str] = []


class TunnelRun(_Run):
    """One tunnel example: drives both ends and knows what each must have seen.

    The model: with no reset so far, every byte sent either way arrives, in order, and a FIN from
    one end reaches the other as EOF while the opposite direction keeps working; once both ends
    sent FIN, or one reset while still sending, the router closes both within SETTLE, and its
    counters go back to zero. A reset loses what was in flight, so then only prefixes are checked.
    """

    def __init__(self, harness: LifecycleHarness, case: TunnelCase, peer: str) -> None:
        super().__init__(harness, case.alice, peer)
        self.case = case
        self.far: PeerEnd | None = None
        """The origin's end of the tunnel, once it has sent its 101."""
        self.expected: tuple[int, str | None] | None = None
        """(status, origin or None for the router) of the answer that refuses the upgrade."""
        self.held_expected = 1

    def _held(self) -> list[HeldUpgrade]:
        return [h for o in self.harness.origins.values() for h in o.held if h.record.peer == self.peer.encode()]

    def _head_len(self) -> int | None:
        end = self.client.received.find(b"\r\n\r\n")
        return None if end < 0 else end + 4

    @property
    def reset(self) -> bool:
        return self.client.rst_sent or (self.far is not None and self.far.rst_sent)

    def _must_end(self) -> bool:
        """Whether the router must have closed the tunnel: an end reset while still sending, or
        both ends have finished (FIN, or a reset after FIN)."""
        ends = [self.client] if self.far is None else [self.client, self.far]
        if any(e.rst_sent and not e.rst_after_fin for e in ends):
            return True
        return self.far is not None and all(e.fin_sent or e.rst_sent for e in ends)

    def _torn_down(self) -> bool:
        stats = self.router.stats
        c, f = self.client, self.far
        return (
            stats.open_connections == 0
            and stats.tunnels_open == 0
            and self.harness.in_use() == 0
            and (c.rst_sent or c.lost or c.eof_at is not None)
            and (f is None or f.rst_sent or f.lost or f.eof_at is not None)
        )

    def _delivered(self) -> bool:
        c, f = self.client, self.far
        start = self._head_len()
        if f is None or start is None:
            return False
        return (
            f.received == c.sent
            and f.eof_at == (len(c.sent) if c.fin_sent else None)
            and c.received[start:] == f.sent
            and c.eof_at == (len(c.received) if f.fin_sent else None)
        )

    def _state(self) -> str:
        c, f = self.client, self.far
        stats = self.router.stats
        start = self._head_len() or 0
        far = "no tunnel" if f is None else (
            f"origin sent {len(f.sent)} B, got {len(f.received)} B, eof_at={f.eof_at}, fin={f.fin_sent}, "
            f"rst={f.rst_sent}, lost={f.lost}"
        )  # fmt: skip
        return (
            f"client sent {len(c.sent)} B, got {len(c.received) - start} B after {start} B of head "
            f"({bytes(c.received[:start])[:40]!r}), eof_at={c.eof_at}, fin={c.fin_sent}, rst={c.rst_sent}, "
            f"lost={c.lost}; {far}; router: open_connections={stats.open_connections}, "
            f"tunnels_open={stats.tunnels_open}, upstream in use={self.harness.in_use()}"
        )

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_connection(
            lambda: _PeerProtocol(self.client), *self.router.address, local_addr=(self.peer, 0)
        )
        ref = reference_parse(self.case.head)
        if ref.upgraded:
            await self._tunnel()
        else:
            self.held_expected = 0
            await self._refused(ref.requests[0].keep_alive)
        if not await until(self._torn_down, SETTLE):
            self.problems.append(f"the exchange outlived its ends: {self._state()}")
        if len(self._held()) != self.held_expected:
            self.problems.append(f"the origins got {len(self._held())} upgrade requests, expected {self.held_expected}")
        self._check_streams()

    async def _tunnel(self) -> None:
        assert self.client.transport is not None
        self.client.transport.write(self.case.head + self.case.early)
        self.client.sent += self.case.early
        held = await self._next_held(0)
        if held is None:
            return
        self._check_forwarded_upgrade(held.record)
        for action in self.case.before:
            await self._act(action)
        if self.client.rst_sent and not self.client.rst_after_fin:
            # The exchange is over: the router closed the upstream connection, so whatever the
            # origin would answer now meets a closed socket and nothing is retried.
            await self._expect_early_release()
            return
        if await self._answer(held):
            for action in self.case.after:
                await self._act(action)
            await self._finish()
        elif not self.client.rst_sent:
            await self._expect_refusal()

    async def _expect_early_release(self) -> None:
        """The client reset before any answer: its exchange is over, so its connection and the
        upstream connection waiting for the 101 go now, not when the origin answers."""
        stats = self.router.stats
        if not await until(lambda: stats.open_connections == 0 and self.harness.in_use() == 0, SETTLE):
            self.problems.append(f"the client reset before the 101 but the router kept its exchange: {self._state()}")

    async def _next_held(self, index: int) -> HeldUpgrade | None:
        if not await until(lambda: len(self._held()) > index, SETTLE + self.router.settings.timeouts.upstream_connect):
            what = "the upgrade request" if index == 0 else "the retry of the upgrade request"
            self.problems.append(f"{what} never reached an origin; {self._state()}")
            return None
        return self._held()[index]

    def _check_forwarded_upgrade(self, record: Record) -> None:
        if record.origin != self.origin.name:
            self.problems.append(f"the upgrade went to {record.origin}, not {self.origin.name}")
        protocols = upgrade_protocols(record.header(b"upgrade"))
        if not protocols or set(protocols) != {b"websocket"}:
            self.problems.append(f"the origin was offered Upgrade {record.header(b'upgrade')!r}, not only websocket")
        if record.header(b"http2-settings"):
            self.problems.append("HTTP2-Settings reached the origin")

    async def _act(self, action: Action) -> None:
        kind, payload = action
        who, _, verb = kind.partition("-")
        end = self.client if who == "client" else self.far
        if verb == "" and who == "settle":
            await self._settle()
            self.log.append("settle")
            return
        done = False
        if end is not None:
            if verb == "send":
                done = end.send(payload if isinstance(payload, bytes) else pattern(payload))
            elif verb == "fin":
                done = end.fin()
            else:
                done = end.rst()
        if done and verb == "rst":
            self.harness.tally[f"{kind}{' after fin' if end is not None and end.rst_after_fin else ''}"] += 1
        size = len(payload) if isinstance(payload, bytes) else payload
        self.log.append(f"{kind}{f' {size} B' if verb == 'send' else ''}{'' if done else ' (skipped)'}")

    async def _retried_despite_the_reset(self, index: int) -> bool:
        """The client reset after its FIN, before the origin failed: whether the router retried.
        A router that had read up to the FIN sees that reset only at its next write, so it
        retries; one that had paused reading with bytes unread (a large early send held for the
        tunnel) sees it at once and has ended the exchange, so nothing is left to retry for.
        Both are right; what is checked is that one of them happens."""
        stats = self.router.stats
        ended = await until(
            lambda: len(self._held()) > index or stats.open_connections == 0,
            SETTLE + self.router.settings.timeouts.upstream_connect,
        )
        if not ended:
            self.problems.append(f"after the client's reset the router neither retried nor ended: {self._state()}")
        if len(self._held()) > index:
            return True
        self.harness.tally["client reset seen before a retry"] += 1
        return False

    async def _answer(self, held: HeldUpgrade) -> bool:
        """The origin answers (and answers the router's retry, if one is due); whether it accepted."""
        for i, answer in enumerate(self.case.answers):
            self.log.append(f"origin answers {answer}{' (retry)' if i else ''}")
            if answer == "accept":
                self.far = held.accept(self.case.first)
                self.harness.tally["tunnels accepted"] += 1
                return True
            if answer == "decline":
                held.decline()
                self.expected = (403, self.origin.name)
                return False
            if answer == "reset":
                held.reset()
            else:
                held.close()
            if not held.reused:
                self.expected = (502, None)  # a fresh connection that failed is not tried again
                return False
            # A pooled connection failing before any answer may have been closed by the upstream
            # as we reused it: the router retries the idempotent GET once, on a fresh connection.
            if self.client.rst_sent and not await self._retried_despite_the_reset(i + 1):
                return False
            self.harness.tally["upgrade retried"] += 1
            self.held_expected += 1
            retry = await self._next_held(i + 1)
            if retry is None:
                return False
            if retry.reused:
                self.problems.append("the retried upgrade went out on a reused connection")
            held = retry
        self.expected = (502, None)
        return False

    async def _settle(self) -> None:
        if self._must_end():
            if not await until(self._torn_down, SETTLE):
                self.problems.append(f"after {self.log} the router kept the tunnel: {self._state()}")
            return
        if self.reset:
            return  # a reset after its own FIN: noticed only when the router next writes there
        if not await until(self._delivered, SETTLE):
            self.problems.append(f"after {self.log} not everything sent arrived: {self._state()}")
        elif self.client.lost or (self.far is not None and self.far.lost):
            self.problems.append(f"after {self.log} the router closed an end before both sent FIN: {self._state()}")

    async def _finish(self) -> None:
        if self.case.finish == ("idle",):
            self.log.append("idle")
            self.harness.tally["idle tunnel ends"] += 1
            if not await until(self._torn_down, self.router.settings.timeouts.tunnel_idle + TIMER_SLACK):
                self.problems.append(f"an idle tunnel outlived tunnel_idle: {self._state()}")
            return
        for kind in self.case.finish:
            await self._act((kind, b""))
        # Whatever the finish did not end (an end that had already finished one way) ends by FIN.
        for end, kind in ((self.client, "client-fin"), (self.far, "origin-fin")):
            if end is not None and not end.ended:
                await self._act((kind, b""))
        if not await until(self._torn_down, SETTLE):
            self.problems.append(f"after {self.log} the router kept the tunnel: {self._state()}")

    async def _expect_refusal(self) -> None:
        """The upgrade failed (origin declined, or reset/closed without answering): the client gets
        that answer with Connection: close, and the router closes."""
        assert self.expected is not None
        status, origin = self.expected
        c = self.client
        await until(lambda: c.eof_at is not None or c.lost, SETTLE + self.router.settings.timeouts.upstream_response)
        responses, problem = split_responses(bytes(c.received), lambda i, s: False, collections.Counter())
        if problem is not None or len(responses) != 1:
            self.problems.append(f"expected one {status} answer, got {bytes(c.received)[:300]!r} ({problem})")
            return
        (response,) = responses
        if (response.status, response.origin) != (status, origin) or not response.closes:
            self.problems.append(f"expected {status} from {origin or 'the router'} with Connection: close, got "
                                 f"{response.status} from {response.origin}: {response.headers!r}")  # fmt: skip
        self.harness.tally[f"upgrade answered {status}"] += 1

    def _check_streams(self) -> None:
        c, f = self.client, self.far
        if f is None:
            return
        start = self._head_len()
        if not c.rst_sent and not c.lost and start is None:
            self.problems.append(f"the client never got the 101: {bytes(c.received)[:200]!r}")
        if start is not None:
            head = bytes(c.received[:start])
            if not head.startswith(b"HTTP/1.1 101 ") or b"\r\nUpgrade: websocket\r\n" not in head:
                self.problems.append(f"the client's 101 head is wrong: {head!r}")
            elif b"Sec-WebSocket-Accept: " not in head:
                self.problems.append(f"the 101 lost the origin's Sec-WebSocket-Accept: {head!r}")
        tunnel = bytes(c.received[start or len(c.received) :])
        if self.reset or start is None:
            if not bytes(c.sent).startswith(bytes(f.received)):
                self.problems.append("what the origin got is not a prefix of what the client sent")
            if not bytes(f.sent).startswith(tunnel):
                self.problems.append("what the client got is not a prefix of what the origin sent")
            return
        # No reset: everything arrived, then EOF, both ways (after both FINs or the idle close).
        if f.received != c.sent or f.eof_at != len(c.sent):
            self.problems.append(f"client to origin: sent {len(c.sent)} B, origin got {len(f.received)} B "
                                 f"then EOF at {f.eof_at}")  # fmt: skip
        if tunnel != f.sent or c.eof_at != len(c.received):
            self.problems.append(f"origin to client: sent {len(f.sent)} B, client got {len(tunnel)} B "
                                 f"then EOF at {c.eof_at}")  # fmt: skip

    async def _refused(self, keep_alive: bool) -> None:
        """Not a tunnel (h2c, an unknown protocol, HTTP/1.0): a plain request without Upgrade,
        Connection: upgrade or HTTP2-Settings, and the connection serves the next one."""
        self.harness.tally["upgrades forwarded plainly"] += 1
        c = self.client
        assert c.transport is not None
        baggage = b"baggage: devstack=alice\r\n" if self.case.alice else b""
        follow = b"GET /__after HTTP/1.1\r\nHost: a\r\n" + baggage + b"\r\n"
        c.transport.write(self.case.head + (follow if self.case.pipelined else b""))
        patience = SETTLE + self.router.settings.timeouts.upstream_response

        def answered(n: int) -> Callable[[], bool]:
            def check() -> bool:
                got, _ = split_responses(bytes(c.received), lambda i, s: False, collections.Counter())
                return len(got) >= n or c.eof_at is not None or c.lost

            return check

        await until(answered(1), patience)
        if keep_alive and not self.case.pipelined:
            c.send(follow)
        due = 2 if keep_alive else 1
        await until(answered(due), patience)
        if not keep_alive:
            await until(lambda: c.eof_at is not None or c.lost, SETTLE)
        responses, problem = split_responses(bytes(c.received), lambda i, s: False, collections.Counter())
        statuses = [(r.status, r.origin) for r in responses]
        if problem is not None or statuses != [(200, self.origin.name)] * due:
            self.problems.append(f"expected {due} answers from {self.origin.name}, got {statuses} ({problem}): "
                                 f"{bytes(c.received)[:300]!r}")  # fmt: skip
        if not keep_alive and not (responses and responses[0].closes and (c.eof_at is not None or c.lost)):
            self.problems.append("an upgrade request that does not keep the connection alive did not close it")
        records = [r for o in self.harness.origins.values() for r in o.records if r.peer == self.peer.encode()]
        urls = [(r.origin, r.url) for r in records]
        want = [(self.origin.name, TUNNEL_PATH)] + ([(self.origin.name, b"/__after")] if keep_alive else [])
        if urls != want:
            self.problems.append(f"the origins saw {urls}, expected {want}")
        if records:
            first = records[0]
            bad = [(k, v) for k, v in first.headers if k.lower() in (b"upgrade", b"http2-settings")
                   or (k.lower() == b"connection" and b"upgrade" in v.lower())]  # fmt: skip
            if bad:
                self.problems.append(f"a refused upgrade reached the origin with {bad!r}")
        c.fin()  # done: the router closes (checked by run's teardown wait)


# -- drip-fed bodies ---------------------------------------------------------------------------

DRIP_PAUSE: Final = 0.05
"""Seconds between the pieces of a steady or slow drip: far below body_idle, so only the rate can
end one early."""
STALL: Final = LIFECYCLE_TIMEOUTS.body_idle + 0.25
"""A pause the body_idle timer must end."""
PACES = ["fast"] * 4 + ["steady"] * 2 + ["slow"] * 3 + ["stall", "abandon", "abandon"]


@dataclasses.dataclass(frozen=True)
class DripCase:
    framing: str
    """small (Content-Length <= Limits.small_body), large (Content-Length above it) or chunked."""
    pace: str
    """fast (up to six pieces, at most 10 ms apart), steady (8-16 pieces DRIP_PAUSE apart, 8000 B/s
    and up: past the rate check's grace), slow (DRIP_PAUSE apart, 800 B/s at most), stall (fast,
    then STALL before piece ``stop_at``), abandon (fast, then FIN or RST instead of piece ``stop_at``)."""
    size: int
    """Body bytes (before chunked encoding)."""
    chunk: int = 0
    """Chunk size of a chunked body."""
    cuts: tuple[int, ...] = ()
    """Where a fast/stall/abandon body is cut into pieces (offsets modulo its length)."""
    step: int = 0
    """Piece size of a steady or slow drip."""
    pause: float = 0.0
    """Between the pieces of a fast drip."""
    stop_at: int = 0
    end: str = ""
    """After the last piece sent: "" nothing, "fin" half-close, "rst" reset."""
    alice: bool = False
    keeps_sending: bool = False
    """After an early answer, go on sending until the router closes (its lingering close)."""

    def wire(self) -> tuple[bytes, bytes, bytes]:
        """(head, body as sent, body as the origin must get it)."""
        data = pattern(self.size)
        framing = b"Content-Length: %d\r\n" % self.size
        body = data
        if self.framing == "chunked":
            framing = b"Transfer-Encoding: chunked\r\n"
            body = b"".join(
                b"%x\r\n" % len(data[i : i + self.chunk]) + data[i : i + self.chunk] + b"\r\n"
                for i in range(0, len(data), self.chunk)
            ) + b"0\r\n\r\n"  # fmt: skip
        baggage = b"baggage: devstack=alice\r\n" if self.alice else b""
        return b"POST /drip HTTP/1.1\r\nHost: a\r\n" + baggage + framing + b"\r\n", body, data

    def plan(self) -> list[tuple[float, bytes]]:
        """(pause before, bytes) for each write; the head goes whole with the first piece."""
        head, body, _ = self.wire()
        if self.pace in ("steady", "slow"):
            bounds = list(range(self.step, len(body), self.step))
        else:
            bounds = sorted({1 + c % (len(body) - 1) for c in self.cuts}) if len(body) > 1 else []
        edges = [0, *bounds, len(body)]
        pieces = [body[a:b] for a, b in itertools.pairwise(edges)]
        pause = DRIP_PAUSE if self.pace in ("steady", "slow") else self.pause
        plan = [(0.0 if i == 0 else pause, piece) for i, piece in enumerate(pieces)]
        plan[0] = (0.0, head + plan[0][1])
        if self.pace == "stall":
            plan[self.stop_at] = (STALL, plan[self.stop_at][1])
        elif self.pace == "abandon":
            plan = plan[: self.stop_at]
        return plan


@st.composite
def drip_cases(draw: st.DrawFn) -> DripCase:
    """A POST whose body arrives in pieces with pauses: honest (fast, or steady past the rate
    check's grace), slower than the minimum rate, stalled past body_idle, or abandoned."""
    small_body = LIFECYCLE_LIMITS.small_body
    pace = draw(st.sampled_from(PACES))
    framing = draw(st.sampled_from(["small", "large", "chunked"] if pace != "steady" else ["large", "chunked"]))
    alice = draw(st.booleans())
    chunk = draw(st.integers(1, 4096)) if framing == "chunked" else 0
    lingers = st.sampled_from([False, False, True])  # a client still sending after the 408 costs linger
    if pace == "steady":
        # 8-16 pieces of at least 6400 / 16 = 400 bytes each: 8000 B/s and up, for 0.35-0.75 s.
        size = draw(st.integers(small_body + 1, 16000) if framing == "large" else st.integers(6400, 16000))
        case = DripCase(framing, pace, size, chunk, alice=alice, end=draw(st.sampled_from(["", "fin"])))
        return dataclasses.replace(case, step=-(-len(case.wire()[1]) // draw(st.integers(8, 16))))
    if pace == "slow":
        size = draw({"small": st.integers(2000, small_body), "large": st.integers(small_body + 1, 30000),
                     "chunked": st.integers(3000, 20000)}[framing])  # fmt: skip
        return DripCase(framing, pace, size, chunk, step=draw(st.integers(20, 40)), alice=alice,
                        keeps_sending=draw(lingers))  # fmt: skip
    size = draw({"small": st.integers(2, small_body), "large": st.integers(small_body + 1, 60000),
                 "chunked": st.integers(2, 20000)}[framing])  # fmt: skip
    cuts = tuple(draw(st.lists(st.integers(0, 1 << 20), min_size=0 if pace == "fast" else 1, max_size=5)))
    case = DripCase(framing, "fast", size, chunk, cuts, pause=draw(st.sampled_from([0.0, 0.002, 0.01])), alice=alice)
    if pace == "fast":
        return dataclasses.replace(case, end=draw(st.sampled_from(["", "", "fin"])))
    stop_at = draw(st.integers(1, len(case.plan()) - 1))  # the piece the stall or the abandon comes before
    case = dataclasses.replace(case, pace=pace)
    if pace == "stall":
        return dataclasses.replace(case, stop_at=stop_at, keeps_sending=draw(lingers))
    return dataclasses.replace(case, stop_at=stop_at, end=draw(st.sampled_from(["fin", "rst"])))


class DripRun(_Run):
    """One drip example: sends the plan, then checks what the README promises for it.

    An honest body (fast, or steady past the grace) reaches the right origin intact and is
    answered 200, also after a half-close. A body slower than the minimum rate, or stalled past
    body_idle, is answered 408 (body-too-slow, or body-read-timeout for a small body, which the
    router reads whole first) with Connection: close by its deadline; its upstream connection is
    free at once, while the router lingers over the rest, and the connection is closed within the
    lingering bounds. A small body, until it is whole, holds no upstream connection. An abandoned
    body (FIN or RST mid-way) is never answered 2xx. No origin completes a request whose body the
    client did not finish.
    """

    def __init__(self, harness: LifecycleHarness, case: DripCase, peer: str) -> None:
        super().__init__(harness, case.alice, peer)
        self.case = case

    def _responses(self) -> list[Response]:
        return split_responses(bytes(self.client.received), lambda i, s: False, collections.Counter())[0]

    def _router_done(self) -> bool:
        stats = self.router.stats
        return stats.open_connections == 0 and self.harness.in_use() == 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeouts = self.router.settings.timeouts
        case, c = self.case, self.client
        await loop.create_connection(lambda: _PeerProtocol(c), *self.router.address, local_addr=(self.peer, 0))
        honest = case.pace in ("fast", "steady")
        start = loop.time()
        answer_by: float | None = start + 2 * timeouts.body_idle + TIMER_SLACK if case.pace == "slow" else None
        answered_at: float | None = None
        linger_until = 0.0
        held_upstream = 0
        for i, (pause, piece) in enumerate(case.plan()):
            if pause:
                await asyncio.sleep(pause)  # the drip itself: its pauses are what is under test
            now = loop.time()
            if pause > timeouts.body_idle:
                answer_by = now + TIMER_SLACK  # the stall ended with this piece: the 408 is due by now
            if answered_at is None and self._responses():
                answered_at = now
                linger_until = now + timeouts.linger + timeouts.linger_pause + 0.3
            if answered_at is not None and (not case.keeps_sending or now > linger_until):
                break
            if answered_at is None and answer_by is not None and now > answer_by:
                break
            if case.framing == "small" and i > 0 and answered_at is None:
                held_upstream = max(held_upstream, self.harness.in_use())
            if not c.send(piece):
                break
        self.log.append(f"sent {len(c.sent)} B in {loop.time() - start:.2f} s")
        if case.end == "fin":
            c.fin()
        elif case.end == "rst":
            c.rst()
        if held_upstream:
            self.problems.append(f"a small body still being sent held {held_upstream} upstream connection(s)")
        if honest:
            await self._expect_delivery()
        elif case.pace == "abandon":
            await self._expect_abandoned()
        else:
            await self._expect_refusal(answer_by or start + SETTLE)
        records = [r for o in self.harness.origins.values() for r in o.records if r.peer == self.peer.encode()]
        if not honest and records:
            self.problems.append(f"an origin completed a request the client never finished: {records[0].url!r}")

    async def _expect_delivery(self) -> None:
        c = self.client
        _, _, data = self.case.wire()
        timeouts = self.router.settings.timeouts
        await until(lambda: bool(self._responses()) or c.lost or c.eof_at is not None,
                    timeouts.upstream_response + SLACK)  # fmt: skip
        got = [(r.status, r.origin) for r in self._responses()]
        if got != [(200, self.origin.name)]:
            self.problems.append(f"an honest body got {got}, not one 200 from {self.origin.name}: "
                                 f"{bytes(c.received)[:300]!r}")  # fmt: skip
        records = [r for o in self.harness.origins.values() for r in o.records if r.peer == self.peer.encode()]
        if len(records) != 1 or records[0].body != data or records[0].origin != self.origin.name:
            seen = [(r.origin, len(r.body), r.body == data) for r in records]
            self.problems.append(f"the origins saw {seen} (origin, body bytes, intact), expected one intact "
                                 f"{len(data)}-byte body at {self.origin.name}")  # fmt: skip
        self.harness.tally[f"honest {self.case.framing} bodies delivered"] += 1
        c.fin()  # the client is done; the router closes
        if not await until(self._router_done, SETTLE):
            self.problems.append("the router kept the connection after the client finished")

    async def _expect_abandoned(self) -> None:
        self.harness.tally[f"abandoned by {self.case.end}"] += 1
        if not await until(self._router_done, SETTLE):
            self.problems.append(
                f"the router kept an abandoned exchange: open_connections="
                f"{self.router.stats.open_connections}, upstream in use={self.harness.in_use()}"
            )
        bad = [r.status for r in self._responses() if r.status < 400 or not r.closes]
        if bad:
            self.problems.append(f"an abandoned body was answered {bad}")

    async def _expect_refusal(self, answer_by: float) -> None:
        """A drip below the minimum rate, or stalled: 408 with Connection: close in time, its
        upstream connection released at once (while the router lingers over the rest), then the
        connection closed within the lingering bounds."""
        loop = asyncio.get_running_loop()
        c = self.client
        timeouts = self.router.settings.timeouts
        await until(lambda: bool(self._responses()), max(answer_by - loop.time(), 0.0))
        responses = self._responses()
        if not responses:
            self.problems.append(f"no answer by the {self.case.pace} drip's deadline: {bytes(c.received)[:200]!r}; "
                                 f"{self.log}")  # fmt: skip
            return
        answer = responses[0]
        try:
            reason = json.loads(answer.body).get("reason")
        except ValueError:
            reason = None
        allowed = {"body-read-timeout"} if self.case.framing == "small" else {"body-too-slow"}
        if self.case.pace == "stall":
            allowed = {"body-read-timeout", "body-too-slow"}
        if answer.status != 408 or not answer.closes or reason not in allowed or len(responses) != 1:
            self.problems.append(f"a {self.case.pace} {self.case.framing} body got {[r.status for r in responses]} "
                                 f"(reason {reason!r}, close={answer.closes}), expected one 408 {sorted(allowed)} "
                                 f"with Connection: close")  # fmt: skip
        self.harness.tally[f"408 {reason}"] += 1
        if not await until(lambda: self.harness.in_use() == 0, 0.25):
            self.problems.append(f"the upstream connection was still in use after the 408 ({self.harness.in_use()})")
        if not await until(self._router_done, timeouts.linger + timeouts.linger_pause + TIMER_SLACK):
            self.problems.append(f"the connection outlived its lingering close: {self.router.stats.open_connections}")


# -- the harness ---------------------------------------------------------------------------


class LifecycleHarness(Harness):
    """The request fuzz's harness on LIFECYCLE_SETTINGS (the examples' pauses are timed against
    them), running tunnel and drip examples and tallying what they did."""

    def __init__(self) -> None:
        super().__init__(LIFECYCLE_SETTINGS)
        self.tally: collections.Counter[str] = collections.Counter()
        """What the lifecycle examples did (tunnels opened, resets, 408s...), for the summary."""
        self._tally_from = (0, self.started)

    def check_tunnel(self, case: TunnelCase) -> None:
        peer = self._next_example()
        self.run(self._lifecycle(TunnelRun(self, case, peer), case), 30)

    def check_drip(self, case: DripCase) -> None:
        peer = self._next_example()
        self.run(self._lifecycle(DripRun(self, case, peer), case), 30)

    def start_tally(self) -> None:
        """A new test on this harness: its summary counts from here."""
        self.tally.clear()
        self._tally_from = (self.examples, time.monotonic())

    def lifecycle_summary(self, name: str) -> str:
        tally = ", ".join(f"{k}: {n}" for k, n in sorted(self.tally.items())) or "nothing"
        examples, started = self._tally_from
        return (
            f"{name}: {self.examples - examples} examples in {time.monotonic() - started:.1f} s; {tally}; "
            f"longest GC pause {self.gc_max:.2f} s"
        )

    def in_use(self) -> int:
        """Upstream connections the router counts minus those idle in its pool: the ones an
        exchange holds (or that leaked)."""
        assert self.router is not None and self.router.ctx is not None
        pool = self.router.ctx.pool
        return self.router.stats.upstream_connections - sum(pool.idle_count(o.address) for o in self.origins.values())

    def _next_example(self) -> str:
        """Book-keeping between two lifecycle examples; returns the client address for the next."""
        self._count_example()
        self.worst_lag = 0.0
        for origin in self.origins.values():
            origin.records.clear()
            origin.problems.clear()
            origin.held.clear()
        return self._next_peer()

    async def _lifecycle(self, run: TunnelRun | DripRun, case: object) -> None:
        assert self.router is not None and self.router.ctx is not None
        try:
            await run.run()
        finally:
            # Whatever the test's ends still hold open goes now, but only after run() checked
            # that the router closed its side: closing ours first would hide a leak.
            run.client.discard()
            for origin in self.origins.values():
                for held in origin.held:
                    if held.conn.tunnel is not None:
                        held.conn.tunnel.discard()
                    elif held.conn.held is not None and held.conn.transport is not None:
                        held.conn.transport.abort()  # never answered: the example failed early
        problems = list(run.problems)
        for origin in self.origins.values():
            problems += origin.problems
        problems += await self._check_released()
        problems += await self._check_alive(self.router.ctx)
        if problems:
            raise AssertionError(
                f"{len(problems)} invariant(s) broken for {case!r}\n  actions: {run.log}\n  - "
                + "\n  - ".join(problems)
            )

    async def _check_released(self) -> list[str]:
        """Nothing of the example is left: no client connection, open tunnel or upstream
        connection in an exchange, and every idle pooled connection is one its origin holds open
        as plain HTTP: never a tunnel's."""
        assert self.router is not None and self.router.ctx is not None
        ctx, stats = self.router.ctx, self.router.stats

        def released() -> bool:
            return (
                not ctx.connections
                and stats.open_connections == 0
                and stats.tunnels_open == 0
                and self.in_use() == 0
                and all(ctx.pool.idle_count(o.address) == o.plain_open() for o in self.origins.values())
            )

        if await until(released, SETTLE):
            return []
        pooled = {o.name: (ctx.pool.idle_count(o.address), o.plain_open(), len(o.live)) for o in self.origins.values()}
        return [
            f"left behind: {len(ctx.connections)} client connections (open_connections={stats.open_connections}), "
            f"tunnels_open={stats.tunnels_open}, {self.in_use()} upstream connections in use; (idle in the pool, "
            f"open plain at the origin, open at the origin) by origin: {pooled}"
        ]

"""Recording origins for the fuzz: raw-TCP servers that parse what the router forwards one byte at
a time, record every request (``Record``) with any fault in its framing by strict RFC 9112
(``strict_framing_problems``), and answer each with a small 200 naming the origin and the
request's sequence number (``RecordingOrigin``). On TUNNEL_PATH they hold a WebSocket upgrade
unanswered until the test accepts, declines, resets or closes it (``HeldUpgrade``); ``PeerEnd``
is one end of a connection a test drives (the client, or an origin's tunnel end), keeping every
byte it got and its own FIN and RST.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import re
import socket
import struct
from typing import Final

import httptools

from tests.fuzz.reference import upgrade_protocols


@dataclasses.dataclass
class Record:
    origin: str
    seq: int
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    peer: bytes
    """The client address the router appended to X-Forwarded-For: which example sent it."""

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


_TOKEN_RE = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(_TOKEN_RE + rb" [\x21-\x7e\x80-\xff]+ HTTP/1\.1")
_FIELD_LINE = re.compile(rb"(" + _TOKEN_RE + rb"): ?([\t\x20-\x7e\x80-\xff]*)")
_CHUNK_SIZE = re.compile(rb"([0-9a-f]+)\r\n")


def strict_framing_problems(head: bytes, body: bytes) -> list[str]:
    """What is wrong with a request head and body as the router forwarded them (strict RFC 9112)."""
    problems = []
    if not head.endswith(b"\r\n\r\n"):
        return [f"forwarded head does not end in CRLF CRLF: {head[-20:]!r}"]
    lines = head[:-4].split(b"\r\n")
    if any(b"\r" in line or b"\n" in line for line in lines):
        problems.append("bare CR or LF in the forwarded head")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        problems.append(f"forwarded request line is not strict: {lines[0][:80]!r}")
    names = []
    cl: list[bytes] = []
    te: list[bytes] = []
    for line in lines[1:]:
        m = _FIELD_LINE.fullmatch(line)
        if m is None:
            problems.append(f"forwarded field line is not strict: {line[:80]!r}")
            continue
        name = m.group(1).lower()
        names.append(name)
        if name == b"content-length":
            cl.append(m.group(2))
        elif name == b"transfer-encoding":
            te.append(m.group(2))
        elif name.startswith(b"x-devstack-"):
            problems.append(f"forwarded a router header: {line[:80]!r}")
    if names.count(b"host") != 1:
        problems.append(f"forwarded {names.count(b'host')} Host lines")
    if cl and te:
        problems.append("forwarded both Content-Length and Transfer-Encoding")
    if len(cl) > 1 or len(te) > 1:
        problems.append(f"forwarded framing headers repeated: CL={cl!r} TE={te!r}")
    if te and te[0] != b"chunked":
        problems.append(f"forwarded Transfer-Encoding {te[0]!r}")
    if cl and not cl[0].isdigit():
        problems.append(f"forwarded Content-Length {cl[0]!r}")
    if te:
        pos = 0
        while True:
            m = _CHUNK_SIZE.match(body, pos)
            if m is None:
                problems.append(f"forwarded chunked body not canonical at {pos}: {body[pos : pos + 20]!r}")
                break
            size = int(m.group(1), 16)
            pos = m.end()
            if size == 0:
                if body[pos:] != b"\r\n":
                    problems.append(f"forwarded last chunk not followed by bare CRLF: {body[pos:][:20]!r}")
                break
            if body[pos + size : pos + size + 2] != b"\r\n":
                problems.append("forwarded chunk data not followed by CRLF")
                break
            pos += size + 2
    elif cl and cl[0].isdigit() and int(cl[0]) != len(body):
        problems.append(f"forwarded Content-Length {cl[0]!r} but {len(body)} body bytes")
    elif not cl and body:
        problems.append("forwarded a body without framing")
    return problems


class _OriginConnection(asyncio.Protocol):
    """Parses what the router forwards one byte at a time, so every message's exact bytes are known."""

    def __init__(self, origin: RecordingOrigin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.stream = bytearray()
        """Bytes received since ``base`` (the offset of stream[0]); trimmed after each message."""
        self.base = 0
        self.offset = 0
        self.done = False
        self.served = 0
        """Requests parsed on this connection so far: more than one means the router reused it."""
        self.held: HeldUpgrade | None = None
        """A WebSocket upgrade on TUNNEL_PATH waiting for the test's answer."""
        self.early = bytearray()
        """Bytes after a held upgrade's head: the router must keep them until our 101."""
        self.tunnel: PeerEnd | None = None
        """This origin's end of the tunnel once it has sent its 101."""
        self._new_parser()

    def _new_parser(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.start = self.head_end = self.offset
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.in_head = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.origin.connections += 1
        self.origin.live.add(self)

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            return self.tunnel.on_eof()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.origin.live.discard(self)
        if self.tunnel is not None:
            self.tunnel.lost = True

    def data_received(self, data: bytes) -> None:
        if self.tunnel is not None:
            self.tunnel.received += data
            return
        if self.held is not None:
            self.early += data
            return
        self.stream += data
        for i in range(len(data)):
            if self.done:
                return
            try:
                self.parser.feed_data(data[i : i + 1])
            except httptools.HttpParserUpgrade:
                if self.held is not None:
                    # Whatever follows the held head is tunnel data, not another request.
                    self.offset += 1
                    rest = data[i + 1 :]
                    self.early += rest
                    if rest:
                        del self.stream[-len(rest) :]
                    return
                self._new_parser()  # we answered 200, not 101: the connection stays HTTP
            except httptools.HttpParserError as exc:
                self.origin.problems.append(
                    f"origin {self.origin.name} could not parse forwarded bytes ({exc}): "
                    f"{bytes(self.stream[max(self.start - self.base, 0) : self.offset + 1 - self.base])[-300:]!r}"
                )
                assert self.transport is not None
                self.transport.abort()
                return
            self.offset += 1

    def on_message_begin(self) -> None:
        self.start = self.offset
        self.url = b""
        self.headers = []
        self.body = []
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.in_head:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_end = self.offset + 1

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        origin = self.origin
        base = self.base
        head = bytes(self.stream[self.start - base : self.head_end - base])
        raw_body = bytes(self.stream[self.head_end - base : self.offset + 1 - base])
        del self.stream[: self.offset + 1 - base]
        self.base = self.offset + 1
        xff = [v for k, v in self.headers if k.lower() == b"x-forwarded-for"]
        peer = xff[-1].rsplit(b",", 1)[-1].strip() if xff else b""
        seq = next(origin.counter)
        method = self.parser.get_method()
        record = Record(origin.name, seq, method, self.url, self.headers, b"".join(self.body), peer)
        origin.records.append(record)
        self.served += 1
        problems = strict_framing_problems(head, raw_body)
        framed = any(
            k.lower() == b"transfer-encoding" or (k.lower() == b"content-length" and v != b"0") for k, v in self.headers
        )
        if self.parser.should_upgrade() and framed:
            # httptools (here as in the router) takes what follows an Upgrade head for tunnel data,
            # so a framing header on one promises a body nobody forwards (fixed: now refused, 400).
            # What follows the head is undefined for us too: answer, then close.
            problems = [f"Upgrade request forwarded with body framing: {head[-200:]!r}"]
            self.done = True
        for problem in problems:
            origin.problems.append(f"origin {origin.name} request #{seq} from {peer!r}: {problem}")
        if self.url == TUNNEL_PATH and self.parser.should_upgrade() and not self.done:
            protocols = upgrade_protocols([v for k, v in self.headers if k.lower() == b"upgrade"])
            if b"websocket" in protocols:
                # A WebSocket server's upgrade: held until the test answers (HeldUpgrade).
                self.held = HeldUpgrade(self, record, reused=self.served > 1)
                origin.held.append(self.held)
                return
        response = b"HTTP/1.1 200 OK\r\nx-origin: %s\r\nx-seq: %d\r\ncontent-length: 2\r\n\r\n" % (
            origin.name.encode(),
            seq,
        )
        assert self.transport is not None
        self.transport.write(response if method == b"HEAD" else response + b"ok")
        if self.done:
            self.transport.close()


class RecordingOrigin:
    """A raw TCP origin: records every request it parses and answers each with a small 200."""

    def __init__(self, name: str, counter: itertools.count[int]) -> None:
        self.name = name
        self.counter = counter
        self.records: list[Record] = []
        self.problems: list[str] = []
        self.hits: collections.Counter[str] = collections.Counter()
        self.connections = 0
        self.live: set[_OriginConnection] = set()
        """Connections open on our side (closed by us or by the router: gone)."""
        self.held: list[HeldUpgrade] = []
        """Upgrade requests on TUNNEL_PATH, held for the test to answer, in arrival order."""
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> tuple[str, int]:
        """The router's pool key for this origin (``UpstreamPool.idle_count``)."""
        return ("127.0.0.1", self.port)

    def plain_open(self) -> int:
        """Open connections speaking HTTP: the only kind an idle pooled connection may be."""
        return sum(1 for conn in self.live if conn.tunnel is None and conn.held is None)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _OriginConnection(self), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


# -- the origins' WebSocket side: held upgrades and tunnel ends ---------------------------------

TUNNEL_PATH: Final = b"/__ws"
"""Where the recording origins speak WebSocket (holding each upgrade for the test to answer). No
generated request names it (their paths have no "w"), so the request fuzz keeps its plain 200s."""
_SWITCHING: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)
_DECLINED: Final = b"HTTP/1.1 403 Forbidden\r\nx-origin: %s\r\ncontent-length: 8\r\n\r\ndeclined"


def _reset(transport: asyncio.Transport) -> None:
    """Close with RST: SO_LINGER 0 makes the kernel reset the connection instead of sending FIN."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class PeerEnd:
    """One end of a connection that a test drives (the client, or an origin once it has sent its
    101): every byte it got and where EOF came, and its own FIN or RST. A FIN received leaves its
    own side open (a half-close is a message, not the end); once both directions are done it closes."""

    def __init__(self, transport: asyncio.Transport | None = None) -> None:
        self.transport = transport
        self.received = bytearray()
        self.sent = bytearray()
        self.eof_at: int | None = None
        """len(received) when EOF arrived; None while the other side may still send."""
        self.lost = False
        self.fin_sent = False
        self.rst_sent = False
        self.rst_after_fin = False
        """Reset after its own FIN: the router, which reads no more after an EOF, learns of it only
        when it next writes to this end (or the other end finishes too)."""

    @property
    def ended(self) -> bool:
        """This end sends nothing more."""
        return self.fin_sent or self.rst_sent or self.lost

    def _writable(self) -> asyncio.Transport | None:
        transport = self.transport
        if transport is None or self.ended or transport.is_closing():
            return None
        return transport

    def send(self, data: bytes) -> bool:
        transport = self._writable()
        if transport is None:
            return False
        self.sent += data
        transport.write(data)
        return True

    def fin(self) -> bool:
        transport = self._writable()
        if transport is None:
            return False
        transport.write_eof()
        self.fin_sent = True
        if self.eof_at is not None:
            transport.close()  # both directions are done
        return True

    def rst(self) -> bool:
        transport = self.transport
        if transport is None or self.rst_sent or self.lost or transport.is_closing():
            return False
        _reset(transport)
        self.rst_after_fin = self.fin_sent
        self.rst_sent = True
        return True

    def on_eof(self) -> bool:
        self.eof_at = len(self.received)
        return not self.fin_sent  # False: both directions are done and the transport closes

    def discard(self) -> None:
        """The example is over: drop whatever is still open on the test's side."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()


class HeldUpgrade:
    """A WebSocket upgrade an origin received and holds unanswered until the test answers it."""

    def __init__(self, conn: _OriginConnection, record: Record, *, reused: bool) -> None:
        self.conn = conn
        self.record = record
        self.reused = reused
        """The router sent it on a connection that had carried a request before (from its pool)."""

    def _answerable(self) -> asyncio.Transport | None:
        conn = self.conn
        conn.held = None
        if conn.early:
            conn.origin.problems.append(
                f"the router forwarded {len(conn.early)} tunnel bytes before the origin's answer: "
                f"{bytes(conn.early)[:60]!r}"
            )
        transport = conn.transport
        return transport if transport is not None and not transport.is_closing() else None

    def accept(self, first: bytes) -> PeerEnd:
        """Answer 101 (with ``first`` tunnel bytes in the same write); the connection is a tunnel."""
        transport = self._answerable()
        end = self.conn.tunnel = PeerEnd(transport)
        end.received += self.conn.early
        if transport is None:
            end.lost = True
            return end
        end.sent += first
        transport.write(_SWITCHING + first)
        return end

    def decline(self) -> None:
        """Answer 403 and stay HTTP, as a WebSocket server refusing the handshake does."""
        transport = self._answerable()
        if transport is None:
            return
        self.conn._new_parser()
        transport.write(_DECLINED % self.conn.origin.name.encode())
        if self.conn.early:
            transport.close()  # what the router sent after the head is not ours to parse

    def reset(self) -> None:
        transport = self._answerable()
        if transport is not None:
            _reset(transport)

    def close(self) -> None:
        transport = self._answerable()
        if transport is not None:
            transport.close()

"""Relaying one exchange's response to the client: its head, its body, its end.

The upstream side reports a response as a validated head, body pieces and an end. A
``ResponseRelay`` turns them into what the client receives: the head forwarded as received when
only plain keep-alive fields had to go (the fast path), or rebuilt field by field (hop-by-hop
fields and those a Connection header names removed, the router's own framing, ``Connection:
close`` when the client connection will end); the body re-chunked when the client gets chunked
framing; interim (1xx) heads passed on to HTTP/1.1 clients. A final head is held back until the
first body bytes, so a small response leaves in one write. One relay serves a connection's
exchanges one after another; it decides nothing about routing or the connection's lifecycle.
"""

from __future__ import annotations

import asyncio
from typing import Final

from router.errors import Answer
from router.http import HOP_BY_HOP, PROTECTED, connection_tokens, head_fields, reason_phrase, status_reason
from router.request import Plan
from router.upstream import Framing, UnexpectedUpgrade

__all__ = ["ResponseRelay"]

_CRLF: Final = b"\r\n"
_CHUNK_END: Final = b"0\r\n\r\n"


class ResponseRelay:
    __slots__ = ("transport", "pending_head", "head_sent", "chunked", "keep_alive", "status", "sent", "answer")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        """The client's transport; None once the client connection is gone."""
        self.pending_head: bytes | None = None
        """The final head, held until the first body bytes (or the end) go with it."""
        self.head_sent = False
        """Part of the response is with the client: a failure now can only cut the connection."""
        self.chunked = False
        self.keep_alive = True
        """Whether the client connection stays open after this response."""
        self.status = 0
        self.sent = 0
        """Body bytes written for this response (the access log's bytes)."""
        self.answer: Answer | None = None
        """The router's own answer, when it made one instead of relaying."""

    def begin(self, keep_alive: bool) -> None:
        """A new exchange starts; ``keep_alive`` is the request's own wish."""
        self.pending_head = None
        self.head_sent = False
        self.chunked = False
        self.status = 0
        self.sent = 0
        self.answer = None
        self.keep_alive = keep_alive

    def answered(self, answer: Answer, keep_alive: bool, body_bytes: int) -> None:
        """The router wrote its own whole answer instead of a relayed one."""
        self.pending_head = None
        self.answer = answer
        self.status = answer.status
        self.sent = body_bytes
        self.keep_alive = keep_alive

    def interim(self, req: Plan, status: int, head: bytes) -> None:
        transport = self.transport
        if not req.http11 or transport is None:
            return  # HTTP/1.0 clients get no 1xx (RFC 9110 15.2)
        out = [b"HTTP/1.1 %d %s\r\n" % (status, status_reason(head) or reason_phrase(status))]
        for name, value in head_fields(head):
            if name.lower() not in HOP_BY_HOP:
                out += (name, b": ", value, _CRLF)
        out.append(_CRLF)
        transport.write(b"".join(out))

    def head(
        self, req: Plan, status: int, head: bytes, passthrough: bytes | None, framing: Framing, keep_alive: bool
    ) -> None:
        """The final head. ``keep_alive``: whether the client connection may stay open after it."""
        self.status = status
        if passthrough is not None and keep_alive and framing is Framing.LENGTH and req.http11 and status != 101:
            # Fast path: forward the validated head as received, adding only what we must. A
            # client connection about to close takes the rebuilding path, which says so.
            self.keep_alive = True
            if req.debug and req.decision is not None:
                route = req.route_header()
                passthrough = passthrough[:-2] + b"x-devstack-route: " + route + _CRLF + _CRLF
            self.pending_head = passthrough
            return
        self._rebuild(req, status, head, framing, keep_alive)

    def _rebuild(self, req: Plan, status: int, head: bytes, framing: Framing, keep_alive: bool) -> None:
        """Render a response head field by field: hop-by-hop removal, our own framing."""
        fields = head_fields(head)
        lowered = [name.lower() for name, _ in fields]
        stripped: frozenset[bytes] = frozenset()
        if b"connection" in lowered:
            values = [value for lower, (_, value) in zip(lowered, fields) if lower == b"connection"]
            stripped = connection_tokens(values) - PROTECTED
        out = [b"HTTP/1.1 %d %s\r\n" % (status, status_reason(head) or reason_phrase(status))]
        content_length: bytes | None = None
        upgrade = b""
        for lower, (name, value) in zip(lowered, fields):
            if lower in HOP_BY_HOP or lower in stripped:
                if lower == b"content-length":
                    content_length = value
                elif lower == b"upgrade":
                    upgrade = value
                continue
            out += (name, b": ", value, _CRLF)
        if req.debug and req.decision is not None:
            out += (b"x-devstack-route: ", req.route_header(), _CRLF)
        if status == 101:
            if not req.upgrade:
                raise UnexpectedUpgrade
            out += (b"Connection: Upgrade\r\nUpgrade: ", upgrade, _CRLF, _CRLF)
            assert self.transport is not None
            self.transport.write(b"".join(out))
            self.head_sent = True
            return
        if framing is Framing.NONE:
            if content_length is not None and status != 204:
                out += (b"Content-Length: ", content_length, _CRLF)
        elif framing is Framing.LENGTH:
            assert content_length is not None
            out += (b"Content-Length: ", content_length, _CRLF)
        elif req.http11:
            self.chunked = True
            out.append(b"Transfer-Encoding: chunked\r\n")
        else:
            keep_alive = False  # an HTTP/1.0 client reads a body of unknown length to the close
        if not keep_alive:
            out.append(b"Connection: close\r\n")
        elif not req.http11:
            out.append(b"Connection: keep-alive\r\n")
        self.keep_alive = keep_alive
        out.append(_CRLF)
        self.pending_head = b"".join(out)

    def body(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        self.sent += len(data)
        head = self.pending_head
        if head is not None:
            self.pending_head = None
            self.head_sent = True
            if self.chunked:
                transport.writelines((head, b"%x\r\n" % len(data), data, _CRLF))
            else:
                transport.writelines((head, data))
            return
        if self.chunked:
            transport.writelines((b"%x\r\n" % len(data), data, _CRLF))
        else:
            transport.write(data)

    def end(self) -> None:
        """The response is complete: send a head still held back, and the last chunk."""
        transport = self.transport
        if transport is None:
            return
        head = self.pending_head
        self.pending_head = None
        if head is not None:
            self.head_sent = True
            transport.write(head + _CHUNK_END if self.chunked else head)
        elif self.chunked:
            transport.write(_CHUNK_END)

"""The independent reference parse of a client's bytes: httptools run over the raw stream the
client sent, apart from the router, giving the complete requests in order, the partial or failed
one after them and whether the stream became a tunnel (``reference_parse``, ``Reference``,
``Message``). It holds the README's rule for which Upgrade requests the router tunnels
(``tunnels``, ``upgrade_protocols``), since a refused upgrade's stream goes on as HTTP. Pure: it
never touches a socket.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Final

import httptools


@dataclasses.dataclass
class Message:
    method: bytes = b""
    url: bytes = b""
    version: str = ""
    headers: list[tuple[bytes, bytes]] = dataclasses.field(default_factory=list)
    body: bytes = b""
    keep_alive: bool = True
    upgrade: bool = False
    head_done: bool = False

    def header(self, name: bytes) -> list[bytes]:
        return [v for k, v in self.headers if k.lower() == name]


class _Collector:
    """httptools callbacks gathering whole messages."""

    def __init__(self) -> None:
        self.parser: Any = None
        self.current: Message | None = None
        self.done: list[Message] = []
        self._body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.current = Message()
        self._body = []

    def on_url(self, url: bytes) -> None:
        assert self.current is not None
        if not self.current.url:
            self.current.method = self.parser.get_method()
        self.current.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.current is not None and not self.current.head_done:  # trailers are not headers
            # Whitespace after a value is not part of it (RFC 9110 5.5); llhttp keeps it. The
            # router trims it from Host, the value it judges; every other field goes byte-exact.
            if name.lower() == b"host":
                value = value.rstrip(b" \t")
            self.current.headers.append((name, value))

    def on_headers_complete(self) -> None:
        assert self.current is not None
        self.current.head_done = True
        self.current.method = self.parser.get_method()
        self.current.version = self.parser.get_http_version()
        self.current.upgrade = self.parser.should_upgrade()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        assert self.current is not None
        self.current.body = b"".join(self._body)
        self.current.keep_alive = self.parser.should_keep_alive()
        self.done.append(self.current)
        self.current = None


_LIMIT_STATUSES: Final = frozenset({413, 414, 431})


@dataclasses.dataclass
class Reference:
    requests: list[Message]
    """Complete requests, in order."""
    partial: Message | None
    """A request begun but not finished when the bytes ran out."""
    error: str | None
    failed: Message | None
    """The request being parsed when the error hit (its head may be complete)."""
    upgraded: bool

    @property
    def last(self) -> Message | None:
        """The request after the complete ones: the partial or the failed one."""
        return self.partial or self.failed

    def is_head(self, i: int, status: int | None = None) -> bool:
        """Whether response ``i`` (of ``status``, once its head is read) answers a HEAD request, so
        carries no body. For the request after the complete ones this is known if its head was
        whole, or if a size limit (413/414/431) stopped it after its request line: the router
        answers such a well-formed-so-far request by its method, even if a byte further on would
        have made it unparseable."""
        if i < len(self.requests):
            return self.requests[i].method == b"HEAD"
        last = self.last
        if i != len(self.requests) or last is None or last.method != b"HEAD":
            return False
        return last.head_done or status in _LIMIT_STATUSES

    @property
    def cut(self) -> int | None:
        """Index of the first request after which the connection cannot carry more requests."""
        for i, req in enumerate(self.requests):
            if not req.keep_alive or req.upgrade:
                return i
        return None


TUNNELLED: Final = frozenset({b"websocket"})
"""README "WebSockets": the Upgrade protocols the router tunnels by default."""


def upgrade_protocols(values: list[bytes]) -> list[bytes]:
    """The protocol names of ``Upgrade`` values, lower case, versions stripped (``websocket/13``)."""
    return [t.strip(b" \t").partition(b"/")[0].lower() for v in values for t in v.split(b",")]


def tunnels(req: Message) -> bool:
    """Whether the router opens a tunnel for a request llhttp upgrades: HTTP/1.1 only, and only
    for an allowed protocol; any other Upgrade is dropped and the request goes on as a plain one."""
    return req.version == "1.1" and any(t in TUNNELLED for t in upgrade_protocols(req.header(b"upgrade")))


def _declares_body(req: Message) -> bool:
    lengths = req.header(b"content-length")
    return bool(req.header(b"transfer-encoding")) or any(v.strip() not in (b"", b"0") for v in lengths)


def reference_parse(raw: bytes) -> Reference:
    collector = _Collector()
    error: str | None = None
    upgraded = False
    offset = 0
    while True:
        parser = httptools.HttpRequestParser(collector)
        collector.parser = parser
        try:
            parser.feed_data(raw[offset:])
        except httptools.HttpParserUpgrade as exc:
            last = collector.done[-1] if collector.done else None
            if last is not None and last.upgrade and not tunnels(last) and not _declares_body(last):
                # A refused Upgrade: forwarded plainly, and what follows is parsed afresh.
                last.upgrade = False
                offset += exc.args[0]
                if offset < len(raw):
                    continue
            else:
                upgraded = True
        except httptools.HttpParserError as exc:
            error = str(exc) or type(exc).__name__
        break
    partial = collector.current if error is None and not upgraded else None
    failed = collector.current if error is not None else None
    return Reference(collector.done, partial, error, failed, upgraded)

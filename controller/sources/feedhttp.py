"""The route feed's HTTP transport: one streaming HTTP/1.1 GET on plain asyncio streams.

``controller.sources.remote`` decides what to ask for and what the lines mean; this module only
opens the connection, sends the request, parses the response head and yields the decoded body as
it arrives (chunked framing removed by httptools' strict parser, gzip undone with zlib). It uses
nothing the router does not load anyway, so a sidecar following a controller never imports an
HTTP client library (aiohttp alone would add about 14 MiB resident). It never retries, follows no
redirects and never interprets the body: failures are raised (``OSError``, ``TimeoutError``,
``ValueError``) for the remote source's backoff to handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import zlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Final, Protocol
from urllib.parse import urlsplit

import httptools

if TYPE_CHECKING:
    import ssl

__all__ = ["FeedClient", "FeedResponse", "FeedTransport"]

READ_BYTES: Final = 64 * 1024
"""One socket read; the line splitter above joins reads into lines of any length."""
MAX_HEAD_BYTES: Final = 64 * 1024
"""A controller's response head is a status line and a handful of headers."""
DECODED_PIECE: Final = 256 * 1024
"""Most bytes one gzip piece may expand to at a time, so a small compressed read of a large
table cannot allocate the whole table at once (the line splitter bounds the total)."""


class FeedResponse(Protocol):
    """What the remote source reads of a response: its status and its decoded body, piece by piece."""

    @property
    def status(self) -> int: ...

    def body(self) -> AsyncIterator[bytes]: ...


class FeedTransport(Protocol):
    """Opens one streaming GET; the response is closed when the context ends."""

    def get(self, url: str, headers: dict[str, str]) -> contextlib.AbstractAsyncContextManager[FeedResponse]: ...


class _Head:
    """httptools callbacks: the response head, and body bytes as the parser frees them."""

    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.complete_head = False
        self.complete_message = False
        self.pieces: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        # Repeated fields combine, as RFC 9110 allows for list-valued ones like Content-Encoding.
        self.headers[name] = self.headers[name] + b", " + value if name in self.headers else value

    def on_headers_complete(self) -> None:
        self.complete_head = True

    def on_body(self, body: bytes) -> None:
        self.pieces.append(body)

    def on_message_complete(self) -> None:
        self.complete_message = True


class _Response:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        parser: httptools.HttpResponseParser,
        head: _Head,
        idle_timeout: float,
    ) -> None:
        self._reader = reader
        self._parser = parser
        self._head = head
        self._idle_timeout = idle_timeout
        self.status: int = parser.get_status_code()
        encoding = head.headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"identity", b"gzip"):
            raise ValueError(f"unsupported Content-Encoding {encoding.decode('latin-1')!r} (asked for gzip)")
        self._gzip = zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == b"gzip" else None

    async def body(self) -> AsyncIterator[bytes]:
        """The decoded body, as it arrives; ends when the message or the connection does."""
        head = self._head
        while True:
            pieces, head.pieces = head.pieces, []
            for piece in pieces:
                for decoded in self._decode(piece):
                    yield decoded
            if head.complete_message:
                return
            data = await _read(self._reader, self._idle_timeout)
            if not data:
                return  # the controller closed the stream; the remote source reconnects
            _feed(self._parser, data)

    def _decode(self, piece: bytes) -> list[bytes]:
        gzip = self._gzip
        if gzip is None:
            return [piece]
        decoded: list[bytes] = []
        data = piece
        while not gzip.eof:
            out = gzip.decompress(data, DECODED_PIECE)
            if out:
                decoded.append(out)
            data = gzip.unconsumed_tail
            # A full piece may leave output inside zlib even with no input left: ask again for it.
            if not data and len(out) < DECODED_PIECE:
                break
        return decoded


async def _connect(
    host: str, port: int, tls: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection``, except that an ASCII host name is resolved here, as bytes.

    asyncio hands a name to ``getaddrinfo`` as a str, which loads the idna codec and
    ``unicodedata`` (0.4 MiB resident for the life of the process) to encode what is ASCII
    already. An address needs no resolving, and a name that is not ASCII keeps asyncio's way."""
    if not host.isascii() or _is_address(host):
        return await asyncio.open_connection(host, port, ssl=tls)
    loop = asyncio.get_running_loop()
    failure: OSError = OSError(f"{host}: no address")
    for family, _, _, _, address in await loop.getaddrinfo(host.encode("ascii"), port, type=socket.SOCK_STREAM):
        try:  # each address in turn, as asyncio would
            return await asyncio.open_connection(
                str(address[0]), port, ssl=tls, family=family, server_hostname=host if tls is not None else None
            )
        except OSError as exc:
            failure = exc
    raise failure


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _read(reader: asyncio.StreamReader, idle_timeout: float) -> bytes:
    async with asyncio.timeout(idle_timeout):
        return await reader.read(READ_BYTES)


def _feed(parser: httptools.HttpResponseParser, data: bytes) -> None:
    try:
        parser.feed_data(data)
    except httptools.HttpParserError as exc:
        raise ValueError(f"malformed HTTP response: {exc}") from None


class FeedClient:
    """The default transport: a new connection per GET (the feed holds one open for hours)."""

    def __init__(self, *, connect_timeout: float, idle_timeout: float) -> None:
        self.connect_timeout = connect_timeout
        """Bounds the TCP (and TLS) connect."""
        self.idle_timeout = idle_timeout
        """Bounds every wait for bytes: the response head and each read of the body."""
        self._tls: ssl.SSLContext | None = None

    @contextlib.asynccontextmanager
    async def get(self, url: str, headers: dict[str, str]) -> AsyncIterator[FeedResponse]:
        parts = urlsplit(url)
        secure = parts.scheme == "https"
        host = parts.hostname
        if parts.scheme not in ("http", "https") or not host:
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        port = parts.port or (443 if secure else 80)
        async with asyncio.timeout(self.connect_timeout):
            reader, writer = await _connect(host, port, self._tls_context() if secure else None)
        try:
            target = parts.path or "/"
            if parts.query:
                target += "?" + parts.query
            authority = parts.netloc.rpartition("@")[2]
            fields = {
                "Host": authority,
                "User-Agent": "devstack-router",
                "Accept-Encoding": "gzip",
                "Connection": "close",
                **headers,
            }
            head = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
            writer.write(f"GET {target} HTTP/1.1\r\n{head}\r\n".encode("latin-1"))
            callbacks = _Head()
            parser = httptools.HttpResponseParser(callbacks)
            received = 0
            while not callbacks.complete_head:
                data = await _read(reader, self.idle_timeout)
                if not data:
                    raise ConnectionError("the controller closed the connection before answering")
                received += len(data)
                _feed(parser, data)
                if not callbacks.complete_head and received > MAX_HEAD_BYTES:
                    raise ValueError(f"a response head longer than {MAX_HEAD_BYTES} bytes")
            yield _Response(reader, parser, callbacks, self.idle_timeout)
        finally:
            # Abort, not close: the stream is abandoned mid-body, and a TLS close could wait on the peer.
            writer.transport.abort()

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            import ssl  # noqa: PLC0415 - asyncio has loaded it; the CA bundle is read only for https

            self._tls = ssl.create_default_context()
        return self._tls

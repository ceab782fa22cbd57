"""A small HTTP/2 test client over a real socket (h2's state machine, prior knowledge or TLS).

It opens one connection and runs any number of requests on it concurrently, each on its own
stream, and returns each response's headers, body and trailers as received: what the tests need
to check that one connection's streams are routed independently.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import h2.config
import h2.connection
import h2.events
import h2.settings


@dataclasses.dataclass
class Response:
    headers: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    body: bytes = b""
    trailers: dict[bytes, bytes] = dataclasses.field(default_factory=dict)
    reset: int | None = None
    """The RST_STREAM error code, if the stream was reset."""
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def status(self) -> int:
        return int(self.headers.get(b":status", b"0"))


class H2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.responses: dict[int, Response] = {}
        self.goaway: int | None = None
        self._pump: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, port: int, *, tls: ssl.SSLContext | None = None, server_name: str | None = None) -> H2Client:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls, server_hostname=server_name)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        writer.write(client.conn.data_to_send())
        client._pump = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        while True:
            data = await self.reader.read(65536)
            if not data:
                break
            for event in self.conn.receive_data(data):
                stream_id = getattr(event, "stream_id", 0)
                response = self.responses.get(stream_id)
                if isinstance(event, h2.events.ResponseReceived) and response is not None:
                    response.headers = dict(event.headers)  # type: ignore[arg-type]
                elif isinstance(event, h2.events.DataReceived) and response is not None:
                    response.body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.TrailersReceived) and response is not None:
                    response.trailers = dict(event.headers)  # type: ignore[arg-type]
                elif isinstance(event, h2.events.StreamEnded) and response is not None:
                    response.done.set()
                elif isinstance(event, h2.events.StreamReset) and response is not None:
                    response.reset = int(event.error_code or 0)
                    response.done.set()
                elif isinstance(event, h2.events.ConnectionTerminated):
                    self.goaway = int(event.error_code or 0)
            self.writer.write(self.conn.data_to_send())
        for response in self.responses.values():
            response.done.set()

    def start(
        self,
        authority: str,
        path: str,
        headers: list[tuple[str, str]] = (),
        *,
        method: str = "GET",
        body: bytes = b"",  # type: ignore[assignment]
    ) -> Response:
        stream_id = self.conn.get_next_available_stream_id()
        fields = [(":method", method), (":scheme", "http"), (":authority", authority), (":path", path), *headers]
        self.conn.send_headers(stream_id, fields, end_stream=not body)
        if body:
            self.conn.send_data(stream_id, body, end_stream=True)
        response = self.responses[stream_id] = Response()
        self.writer.write(self.conn.data_to_send())
        return response

    async def request(self, authority: str, path: str, headers: list[tuple[str, str]] = (), **kw: object) -> Response:  # type: ignore[assignment]
        response = self.start(authority, path, headers, **kw)  # type: ignore[arg-type]
        await asyncio.wait_for(response.done.wait(), 10)
        return response

    async def close(self) -> None:
        self.writer.close()
        if self._pump is not None:
            self._pump.cancel()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass

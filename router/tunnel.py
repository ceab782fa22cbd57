"""One upgraded (WebSocket) connection after the upstream's 101: bytes both ways, unparsed.

A ``Tunnel`` is made when the client's Upgrade head has gone upstream: until the 101 arrives
it holds what the client sends next (reading goes on, so a reset is seen at once, up to a limit,
past which the paused socket is probed for one);
after it, bytes pass straight through in both directions. A FIN from either side is passed on
as a half-close and the other direction goes on (RFC 9293 3.6); the tunnel is over when both
sides have sent theirs. It decides nothing about timers or the client connection's lifecycle:
it tells the connection whether the tunnel has ended, and the connection closes it.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Final

from router.flow import UPGRADE, FlowControl
from router.upstream import UpstreamConnection

__all__ = ["Tunnel"]

_HOLD_LIMIT: Final = 256 * 1024
"""Client bytes held while the 101 is awaited before reading is paused."""
_PROBE_EVERY: Final = 0.1
"""While reading is paused for the 101, how often the client socket is checked for a reset."""


class Tunnel:
    __slots__ = ("client", "flow", "upstream", "held", "held_bytes", "open", "client_eof", "upstream_eof")

    def __init__(self, client: asyncio.Transport, flow: FlowControl) -> None:
        self.client = client
        self.flow = flow
        self.upstream: UpstreamConnection | None = None
        """Set once the 101 has arrived; None again once the tunnel has ended."""
        self.held: list[bytes] = []
        self.held_bytes = 0
        self.open = False
        """Between the 101 and the end: counted in ``devstack_tunnels_open``."""
        self.client_eof = False
        self.upstream_eof = False

    def hold(self, data: bytes) -> None:
        """Client bytes before the 101. Reading is paused only past the limit: a paused socket
        would not notice a reset, and a client that gives up before the 101 must release its
        upstream connection at once."""
        if data:
            self.held.append(data)
            self.held_bytes += len(data)
            if self.held_bytes > _HOLD_LIMIT and not self.flow.paused & UPGRADE:
                self.flow.pause(UPGRADE)
                asyncio.get_running_loop().call_later(_PROBE_EVERY, self._probe)

    def _probe(self) -> None:
        """Paused, the client socket is not watched, so a client that resets would keep its
        upstream connection until the 101 came. The kernel keeps the reset as the socket's pending
        error (SO_ERROR): while the pause lasts, look for it, and end the exchange if it is there."""
        client = self.client
        if self.upstream is not None or not self.flow.paused & UPGRADE or client.is_closing():
            return
        sock = client.get_extra_info("socket")
        if sock is not None and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            client.abort()  # connection_lost releases the upstream connection
            return
        asyncio.get_running_loop().call_later(_PROBE_EVERY, self._probe)

    def start(self, upstream: UpstreamConnection, rest: bytes) -> None:
        """The upstream answered 101; ``rest`` is what it sent after its head."""
        self.upstream = upstream
        self.open = True
        if rest:
            self.client.write(rest)
        held, self.held = self.held, []
        for chunk in held:
            upstream.tunnel_write(chunk)
        if self.client_eof:
            upstream.tunnel_eof()  # the client half-closed while the upgrade was on its way

    def to_upstream(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.tunnel_write(data)

    def to_client(self, data: bytes) -> None:
        self.client.write(data)

    def client_half_closed(self) -> bool:
        """The client sent FIN: pass it on. Whether the tunnel is now over."""
        self.client_eof = True
        upstream = self.upstream
        if upstream is not None and not self.upstream_eof:
            upstream.tunnel_eof()
            return False
        return True

    def upstream_half_closed(self) -> bool:
        """The upstream sent FIN: pass it on. Whether the tunnel is now over."""
        self.upstream_eof = True
        if self.client_eof:
            return True
        if self.client.can_write_eof():
            self.client.write_eof()
        return False

    def end(self) -> None:
        """Both directions are done, or the tunnel idled out: flush the upstream's side and
        close it (its pool slot is given back here, not when the client goes)."""
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close(flush=True)

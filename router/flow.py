"""Flow control of one client connection: why its reading is paused, and whether its writing is.

Reading a client socket stops for independent reasons (a pipelined request waits for its turn,
a body is held while the upstream connects, the upstream cannot take more, bytes after an
Upgrade wait for the 101, the connection has read its last request) and resumes only when none
is left, so the reasons are one bit mask here rather than flags spread over the connection. The
other direction is one flag: the client's socket buffer is full, so the upstream stops being
read. No I/O of its own: it calls the transport's pause and resume, and nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Final

__all__ = ["BUFFER", "DONE", "PIPELINE", "UPGRADE", "UPSTREAM", "FlowControl"]

PIPELINE: Final = 1
"""A request was parsed while another exchange runs: it waits its turn."""
BUFFER: Final = 2
"""Request body bytes held while an upstream connection is set up passed the limit."""
UPSTREAM: Final = 4
"""The upstream connection's write buffer is full (its backpressure reaches the client)."""
UPGRADE: Final = 8
"""Bytes sent after an Upgrade head, held until the upstream answers, passed the limit."""
DONE: Final = 16
"""The connection reads no further request (Connection: close, a refusal, a half-close)."""


class FlowControl:
    __slots__ = ("transport", "paused", "write_paused", "closed")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.paused = 0
        """The reasons reading is paused, or 0 while it runs."""
        self.write_paused = False
        """The client's transport asked us to stop writing: the upstream is not read meanwhile."""
        self.closed = False
        """The transport is gone: nothing is paused or resumed any more."""

    def pause(self, reason: int) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reasons: int) -> None:
        if not self.paused & reasons:
            return
        self.paused &= ~reasons
        if not self.paused and self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def resume_all(self) -> None:
        """Read again whatever the reasons (the connection only discards from now on)."""
        if self.paused:
            self.paused = 0
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

"""What is measured: each scenario's load shape, headers, metric, and the sets each mode runs.

Pure data. A scenario names the routing key its requests carry, so the ``direct`` candidate can
send the same load straight to the upstream that a correct proxy would pick. HTTP/1.1 scenarios
are driven by wrk; gRPC ones (``protocol`` GRPC) by h2load, against h2c proxies and upstreams.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from benchmarks.configs import (
    BAGGAGE_ALICE,
    BAGGAGE_REALISTIC,
    BODY_FILE_BYTES,
    GRPC_CONTENT_TYPE,
    GRPC_METHOD,
    UPLOAD_BYTES,
)
from benchmarks.report import MIBS, P50, REQS, STREAMS, Metric

__all__ = ["BY_NAME", "DEFAULT", "GRPC", "GRPC_QUICK", "HTTP1", "PROFILED", "QUICK", "Scenario"]

HTTP1: Final = "http1"
GRPC: Final = "grpc"


@dataclasses.dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    connections: int
    metric: Metric
    baggage: str | None = None
    key: str | None = None
    """The override a correct proxy routes these requests to (None: baseline)."""
    path: str = "/"
    bytes_per_request: int = 0
    """Body bytes moved per request, for MiB/s."""
    script: str | None = None
    """A wrk Lua script name: ``upload`` or ``check-<body>``."""
    timeout: float = 10.0
    needs_upload: bool = False
    protocol: str = HTTP1
    """HTTP1 (wrk, HTTP/1.1 keep-alive) or GRPC (h2load, unary calls over h2c)."""
    streams_per_connection: int = 1
    """GRPC: streams h2load keeps in flight on each connection (``-m``)."""

    def __post_init__(self) -> None:
        if self.protocol not in (HTTP1, GRPC):
            raise ValueError(f"{self.name}: protocol {self.protocol!r} is neither {HTTP1!r} nor {GRPC!r}")
        if self.protocol == GRPC and (self.script or self.needs_upload):
            raise ValueError(f"{self.name}: wrk scripts and uploads are HTTP/1.1 only")

    def headers(self, host: str) -> list[tuple[str, str]]:
        if self.protocol == GRPC:
            headers = [(":authority", host), ("content-type", GRPC_CONTENT_TYPE), ("te", "trailers")]
            return headers + ([("baggage", self.baggage)] if self.baggage is not None else [])
        headers = [("Host", host)]
        if self.baggage is not None:
            headers.append(("baggage", self.baggage))
        return headers


GET_NONE: Final = Scenario("get c50 no baggage", 50, REQS)
GET_ALICE: Final = Scenario("get c50 devstack=alice", 50, REQS, BAGGAGE_ALICE, "alice")
GET_REALISTIC: Final = Scenario("get c50 6-member baggage", 50, REQS, BAGGAGE_REALISTIC, "alice")
LATENCY: Final = Scenario("latency c1 devstack=alice", 1, P50, BAGGAGE_ALICE, "alice")
DOWNLOAD: Final = Scenario("1 MiB GET c10", 10, MIBS, BAGGAGE_ALICE, "alice", "/1m", BODY_FILE_BYTES)
UPLOAD: Final = Scenario(
    "64 MiB POST c1", 1, MIBS, BAGGAGE_ALICE, "alice", "/upload", UPLOAD_BYTES, "upload", 60.0, needs_upload=True
)
GRPC_ALICE: Final = Scenario(
    "grpc unary c50 devstack=alice", 50, STREAMS, BAGGAGE_ALICE, "alice", GRPC_METHOD, protocol=GRPC
)
"""50 connections with one stream in flight each: the same 50 outstanding calls as the HTTP/1.1
c50 rows, as 50 client processes with a channel each would make them. More streams per
connection would measure how well a proxy batches frames, not what a call costs."""

DEFAULT: Final = (GET_NONE, GET_ALICE, GET_REALISTIC, LATENCY, DOWNLOAD, UPLOAD, GRPC_ALICE)
BY_NAME: Final = {
    "none": GET_NONE,
    "alice": GET_ALICE,
    "baggage6": GET_REALISTIC,
    "latency": LATENCY,
    "download": DOWNLOAD,
    "upload": UPLOAD,
    "grpc-alice": GRPC_ALICE,
}
"""Short names for ``--scenarios``."""
PROFILED: Final = {"get": GET_ALICE, "baggage6": GET_REALISTIC, "download": DOWNLOAD, "upload": UPLOAD}
"""``--profile-scenario`` choices."""
QUICK: Final = (GET_ALICE,)
GRPC_QUICK: Final = (GRPC_ALICE,)
"""``--quick``'s gRPC smoke, run once h2load is installed."""

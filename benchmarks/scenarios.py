"""What is measured: each scenario's load shape, headers, metric, and the sets each mode runs.

Pure data. A scenario names the routing key its requests carry, so the ``direct`` candidate can
send the same load straight to the upstream that a correct proxy would pick.
"""

from __future__ import annotations

import dataclasses
from typing import Final

from benchmarks.configs import BAGGAGE_ALICE, BAGGAGE_REALISTIC, BODY_FILE_BYTES, UPLOAD_BYTES
from benchmarks.report import MIBS, P50, REQS, Metric

__all__ = ["BY_NAME", "DEFAULT", "PROFILED", "QUICK", "Scenario"]


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

    def headers(self, host: str) -> list[tuple[str, str]]:
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

DEFAULT: Final = (GET_NONE, GET_ALICE, GET_REALISTIC, LATENCY, DOWNLOAD, UPLOAD)
BY_NAME: Final = {
    "none": GET_NONE,
    "alice": GET_ALICE,
    "baggage6": GET_REALISTIC,
    "latency": LATENCY,
    "download": DOWNLOAD,
    "upload": UPLOAD,
}
"""Short names for ``--scenarios``."""
PROFILED: Final = {"get": GET_ALICE, "baggage6": GET_REALISTIC, "download": DOWNLOAD, "upload": UPLOAD}
"""``--profile-scenario`` choices."""
QUICK: Final = (GET_ALICE,)

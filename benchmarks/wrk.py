"""Running wrk and reading its report: the only module that knows wrk's command line and output.

``parse_wrk`` is pure (text in, ``WrkResult`` out) so the format is tested without wrk;
``run_wrk`` pins wrk to a core, bounds it in time, and never retries: a failed run is reported.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Sequence
from typing import Final

__all__ = ["WrkError", "WrkResult", "parse_wrk", "run_wrk"]

_UNITS: Final = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}
_SECONDS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SUMMARY: Final = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h), ")
_PERCENTILE: Final = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$")
_SOCKET: Final = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON2XX: Final = re.compile(r"Non-2xx or 3xx responses: (\d+)")
_RPS: Final = re.compile(r"^Requests/sec:\s+([\d.]+)")
_MISMATCH: Final = re.compile(r"^BODY_MISMATCHES (\d+)")


class WrkError(RuntimeError):
    """wrk did not run or printed no summary."""


@dataclasses.dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    seconds: float
    requests_per_second: float
    latency_us: dict[str, float]
    """Percentile ("50", "75", "90", "99") → microseconds, when run with ``--latency``."""
    non_2xx: int = 0
    """wrk's "Non-2xx or 3xx responses" (it counts statuses above 399)."""
    socket_errors: dict[str, int] = dataclasses.field(default_factory=dict)
    body_mismatches: int | None = None
    """From the body-check script, when one was used."""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values()) + (self.body_mismatches or 0)

    def error_detail(self) -> dict[str, object]:
        return {"non_2xx": self.non_2xx, "socket_errors": self.socket_errors, "body_mismatches": self.body_mismatches}

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def parse_wrk(text: str) -> WrkResult:
    requests = -1
    seconds = 0.0
    rps = 0.0
    latency: dict[str, float] = {}
    non_2xx = 0
    sockets: dict[str, int] = {}
    mismatches: int | None = None
    for line in text.splitlines():
        if m := _SUMMARY.match(line):
            requests = int(m[1])
            seconds = float(m[2]) * _SECONDS[m[3]]
        elif m := _PERCENTILE.match(line):
            latency[m[1]] = float(m[2]) * _UNITS[m[3]]
        elif m := _SOCKET.search(line):
            sockets = {"connect": int(m[1]), "read": int(m[2]), "write": int(m[3]), "timeout": int(m[4])}
        elif m := _NON2XX.search(line):
            non_2xx = int(m[1])
        elif m := _RPS.match(line):
            rps = float(m[1])
        elif m := _MISMATCH.match(line):
            mismatches = int(m[1])
    if requests < 0 or seconds <= 0:
        raise WrkError(f"no summary in wrk output:\n{text}")
    return WrkResult(requests, seconds, rps, latency, non_2xx, sockets, mismatches)


def run_wrk(
    url: str,
    *,
    connections: int,
    duration: float,
    headers: Sequence[tuple[str, str]] = (),
    script: str | None = None,
    timeout: float = 10.0,
    cpu: int = 0,
) -> WrkResult:
    """One wrk run with one thread on ``cpu``; raises ``WrkError`` if it fails or hangs."""
    argv = [
        "taskset", "-c", str(cpu), "wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
        "--latency", f"--timeout={timeout:g}s",
    ]  # fmt: skip
    for name, value in headers:
        argv += ["-H", f"{name}: {value}"]
    if script is not None:
        argv += ["-s", script]
    argv.append(url)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + timeout + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish: {' '.join(argv)}") from exc
    if done.returncode != 0:
        raise WrkError(f"wrk exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_wrk(done.stdout)

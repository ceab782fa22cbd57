"""Running h2load and reading its report: the only module that knows h2load's command line and output.

``parse_h2load`` (the summary) and ``latency_percentiles`` (its per-request log) are pure, so
the formats are tested without h2load; ``run_h2load`` pins h2load to a core, bounds it in time,
and never retries: a failed run is reported.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Final

__all__ = ["H2loadError", "H2loadResult", "latency_percentiles", "parse_h2load", "run_h2load"]

_SECONDS: Final = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_FINISHED: Final = re.compile(r"^finished in ([\d.]+)(us|ms|s|m|h), ")
_REQUESTS: Final = re.compile(
    r"^requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_STATUS: Final = re.compile(r"^status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
PERCENTILES: Final = (50, 75, 90, 99)
"""The latency percentiles reported, as wrk reports them."""


class H2loadError(RuntimeError):
    """h2load did not run, printed no summary, or completed no request at all."""


@dataclasses.dataclass(frozen=True, slots=True)
class H2loadResult:
    requests: int
    """Streams that ended with a 2xx or 3xx status (h2load's "succeeded")."""
    seconds: float
    """The timed duration (h2load's "finished in")."""
    done: int
    """Streams that ended in any way during the timed duration."""
    failed: int
    """Streams that ended with a status >= 400 or were reset (h2load's "failed", which includes "errored")."""
    errored: int
    """Streams that were reset or whose connection broke."""
    timeouts: int
    non_2xx: int
    """4xx and 5xx statuses, as wrk's "Non-2xx or 3xx responses"."""
    latency_us: dict[str, float] = dataclasses.field(default_factory=dict)
    """Percentile ("50", "75", "90", "99") → microseconds from request to end of stream, from the log."""

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def errors(self) -> int:
        return self.failed + self.timeouts

    def error_detail(self) -> dict[str, int]:
        return {"non_2xx": self.non_2xx, "failed": self.failed, "errored": self.errored, "timeouts": self.timeouts}

    def to_json(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def parse_h2load(text: str) -> H2loadResult:
    seconds = 0.0
    counts: tuple[int, ...] = ()
    statuses: tuple[int, ...] = (0, 0, 0, 0)
    for line in text.splitlines():
        if m := _FINISHED.match(line):
            seconds = float(m[1]) * _SECONDS[m[2]]
        elif m := _REQUESTS.match(line):
            counts = tuple(int(v) for v in m.groups())
        elif m := _STATUS.match(line):
            statuses = tuple(int(v) for v in m.groups())
    if not counts or seconds <= 0:
        raise H2loadError(f"no summary in h2load output:\n{text}")
    _, _, done, succeeded, failed, errored, timeouts = counts
    if done == 0:
        raise H2loadError(f"h2load completed no request (could it connect?):\n{text}")
    return H2loadResult(succeeded, seconds, done, failed, errored, timeouts, statuses[2] + statuses[3])


def latency_percentiles(log_lines: Iterable[str]) -> dict[str, float]:
    """Nearest-rank percentiles of the third column of h2load's ``--log-file`` (start time µs,
    status, µs until the end of the response), over every logged stream."""
    times = sorted(int(fields[2]) for line in log_lines if len(fields := line.split("\t")) >= 3)
    if not times:
        return {}
    return {str(p): float(times[min(len(times) - 1, max(0, -(-p * len(times) // 100) - 1))]) for p in PERCENTILES}


def run_h2load(
    url: str,
    *,
    connections: int,
    streams_per_connection: int,
    duration: float,
    headers: Sequence[tuple[str, str]] = (),
    data: Path | None = None,
    timeout: float = 10.0,
    cpu: int = 0,
) -> H2loadResult:
    """One h2load run with one thread on ``cpu``, HTTP/2 with prior knowledge (``http://``);
    ``data`` makes every request a POST of that file. Raises ``H2loadError`` if it fails or hangs."""
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        log = Path(tmp) / "requests.tsv"
        argv = [
            "taskset", "-c", str(cpu), "h2load", "-t1", f"-c{connections}", f"-m{streams_per_connection}",
            f"-D{max(1, round(duration * 1000))}ms", f"--log-file={log}",
        ]  # fmt: skip
        for name, value in headers:
            argv += ["-H", f"{name}: {value}"]
        if data is not None:
            argv += ["-d", str(data)]
        argv.append(url)
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + timeout + 30, check=False)
        except subprocess.TimeoutExpired as exc:
            raise H2loadError(f"h2load did not finish: {' '.join(argv)}") from exc
        if done.returncode != 0:
            raise H2loadError(f"h2load exited {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
        result = parse_h2load(done.stdout)
        with log.open() as lines:
            return dataclasses.replace(result, latency_us=latency_percentiles(lines))

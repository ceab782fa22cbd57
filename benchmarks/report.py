"""Results: per-run cells in, medians with ranges and ratios out, as JSON and a Markdown table.

Pure functions over plain data. The median over interleaved repetitions is the figure, the
min–max range shows how far the host drifted, and ratios are taken between medians of the same
run only (never against numbers from another day).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

__all__ = ["Cell", "Metric", "Summary", "markdown_table", "summarize", "write_results"]


@dataclasses.dataclass(frozen=True, slots=True)
class Metric:
    name: str
    unit: str
    higher_is_better: bool


REQS: Final = Metric("req/s", "req/s", True)
P50: Final = Metric("p50 latency", "µs", False)
MIBS: Final = Metric("throughput", "MiB/s", True)
STREAMS: Final = Metric("streams/s", "streams/s", True)
"""gRPC unary calls completed per second: one HTTP/2 stream each."""


@dataclasses.dataclass(frozen=True, slots=True)
class Cell:
    """One timed wrk run of one candidate in one scenario and repetition."""

    rep: int
    scenario: str
    candidate: str
    value: float
    """The scenario's metric (req/s, µs p50, or MiB/s)."""
    requests: int
    seconds: float
    requests_per_second: float
    errors: int
    cpu_us_per_request: float | None
    """Proxy CPU time (user + system, /proc/PID/stat) over the run divided by requests."""
    cpu_utilisation: float | None
    """Proxy CPU seconds per wall second: near 1.0 means the proxy's core was the bottleneck."""
    rss_kib: int | None
    background_cores: float | None = None
    """CPU used by other processes on the host during the run, in cores (a lower bound)."""
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class Summary:
    scenario: str
    candidate: str
    metric: Metric
    median: float
    low: float
    high: float
    reps: int
    errors: int
    cpu_us_per_request: float | None
    cpu_utilisation: float | None
    rss_kib: int | None
    background_cores: float | None
    vs: dict[str, float]
    """Reference candidate → ratio of medians (this / reference)."""
    p50_us: float | None = None
    """Median over repetitions of each run's p50 latency, when the load tool reported it."""


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _max(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def summarize(
    cells: Sequence[Cell],
    metrics: Mapping[str, Metric],
    *,
    references: Sequence[str] = ("nginx", "direct"),
) -> list[Summary]:
    """Group cells by (scenario, candidate), in first-seen order, with ratios to references."""
    groups: dict[tuple[str, str], list[Cell]] = {}
    for cell in cells:
        groups.setdefault((cell.scenario, cell.candidate), []).append(cell)
    medians = {key: statistics.median(c.value for c in group) for key, group in groups.items()}
    out = []
    for (scenario, candidate), group in groups.items():
        median = medians[(scenario, candidate)]
        vs = {}
        for ref in references:
            ref_median = medians.get((scenario, ref))
            if ref_median and ref != candidate:
                vs[ref] = median / ref_median
        rss = _median(c.rss_kib for c in group)
        out.append(
            Summary(
                scenario=scenario,
                candidate=candidate,
                metric=metrics[scenario],
                median=median,
                low=min(c.value for c in group),
                high=max(c.value for c in group),
                reps=len(group),
                errors=sum(c.errors for c in group),
                cpu_us_per_request=_median(c.cpu_us_per_request for c in group),
                cpu_utilisation=_median(c.cpu_utilisation for c in group),
                rss_kib=int(rss) if rss is not None else None,
                background_cores=_max(c.background_cores for c in group),
                vs=vs,
                p50_us=_median(c.detail.get("latency_us", {}).get("50") for c in group),
            )
        )
    return out


def _num(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown_table(
    summaries: Sequence[Summary],
    *,
    references: Sequence[str] = ("nginx", "direct"),
    latency: bool = False,
    per: str = "req",
) -> str:
    """One row per (scenario, candidate); ``latency`` adds each row's p50 (from the same runs),
    ``per`` names what the proxy's CPU time is divided by (a request, a gRPC stream)."""
    ref_cols = "".join(f" ×{ref} |" for ref in references)
    lines = [
        f"| scenario | candidate | median | min–max | unit |{ref_cols}{' p50 µs |' if latency else ''}"
        f" proxy CPU µs/{per} | proxy CPU % | RSS MiB | errors | other load % |",
        "|---|---|---:|---:|---|" + "---:|" * (len(references) + (1 if latency else 0)) + "---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        ratios = "".join(f" {s.vs[ref]:.2f} |" if ref in s.vs else " – |" for ref in references)
        if latency:
            ratios += f" {_num(s.p50_us) if s.p50_us is not None else '–'} |"
        cpu = _num(s.cpu_us_per_request) if s.cpu_us_per_request is not None else "–"
        util = f"{100 * s.cpu_utilisation:.0f}" if s.cpu_utilisation is not None else "–"
        rss = f"{s.rss_kib / 1024:.1f}" if s.rss_kib is not None else "–"
        other = f"{100 * s.background_cores:.0f}" if s.background_cores is not None else "–"
        lines.append(
            f"| {s.scenario} | {s.candidate} | {_num(s.median)} | {_num(s.low)}–{_num(s.high)} | {s.metric.unit} |"
            f"{ratios} {cpu} | {util} | {rss} | {s.errors} | {other} |"
        )
    return "\n".join(lines) + "\n"


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def write_results(directory: Path, stem: str, document: Mapping[str, Any], markdown: str) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    json_path = directory / f"{stem}.json"
    md_path = directory / f"{stem}.md"
    json_path.write_text(json.dumps(_jsonable(document), indent=2, ensure_ascii=False) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path

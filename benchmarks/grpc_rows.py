"""The gRPC rows: unary calls over h2c through each candidate, checked first, timed interleaved.

An h2c upstream nginx starts on the load core beside h2load; nginx (``grpc_pass``), haproxy (h2
on both sides) and the router (a ``protocol: h2c`` route file) start on the proxy core. Each must
answer the routing checks as gRPC calls before it is timed. A candidate that fails is marked
``Untimed`` and left out while the others go on: this phase never raises for a candidate, so
the HTTP/1.1 rows measured before it are always written. The caller turns failures into an exit
status; this module only measures (``stack.measure``), summarises and describes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Final

from benchmarks.correctness import PROXY_CHECKS, RoutingError, check_grpc_direct, check_grpc_proxy
from benchmarks.h2c import http2_refusal
from benchmarks.h2load import H2loadError
from benchmarks.processes import StartError
from benchmarks.report import Cell, Summary, markdown_table, summarize
from benchmarks.scenarios import Scenario
from benchmarks.stack import LOAD_CPU, PROXY_CPU, Candidate, Stack, measure

__all__ = ["CANDIDATES", "PEERS", "TARGET", "GrpcRows", "Untimed", "run_grpc_rows"]

CANDIDATES: Final = ("direct", "nginx", "haproxy", "router")
PEERS: Final = ("nginx", "haproxy")
TARGET: Final = 0.3
"""The router should serve at least this fraction of the better peer's streams/s in the same run
(the issue's target). Reported on every run, enforced nowhere yet: the router's HTTP/2 front end
is new, and CI should not fail on a figure nobody has measured."""
REFERENCES: Final = ("nginx", "haproxy", "direct")


@dataclasses.dataclass(frozen=True, slots=True)
class Untimed:
    """A candidate that was not timed, or stopped being timed, and why."""

    candidate: str
    reason: str
    failure: bool
    """True: it misbehaved (the exit status says so). False: it lacks the feature (a router
    without an HTTP/2 front end), which is reported and not held against the run."""


@dataclasses.dataclass(frozen=True, slots=True)
class GrpcRows:
    cells: list[Cell]
    summaries: list[Summary]
    untimed: list[Untimed]
    target: list[str]
    """Per scenario, one line: the router's streams/s against the better peer's and ``TARGET``."""
    markdown: str

    def failures(self, *, router: bool) -> list[str]:
        """What failed: the router's reasons (``router``) or everyone else's, the upstream's included."""
        return [f"{u.candidate}: {u.reason}" for u in self.untimed if u.failure and (u.candidate == "router") == router]


def _start(stack: Stack, name: str, log: Callable[[str], None]) -> Candidate:
    if name == "direct":
        return stack.direct()
    if name == "nginx":
        return stack.start_nginx_grpc()
    if name == "haproxy":
        return stack.start_haproxy(grpc=True)
    router, took = stack.start_router_grpc()
    log(f"  router ready in {took:.2f}s")
    return router


def _stop(stack: Stack, candidate: Candidate) -> None:
    if candidate.proc is not None:
        stack.procs.stop(candidate.proc)


def _ready(stack: Stack, names: Sequence[str], log: Callable[[str], None]) -> tuple[list[Candidate], list[Untimed]]:
    """Start each candidate and ask it the checks; those that answer all of them are timed. A
    router that does not start with an h2c route file, or whose listener does not speak HTTP/2,
    lacks the feature; every other wrong answer is a failure."""
    ready: list[Candidate] = []
    untimed: list[Untimed] = []
    for name in names:
        try:
            candidate = _start(stack, name, log)
        except StartError as exc:
            if name == "router":
                untimed.append(Untimed(name, f"did not start with a `protocol: h2c` route file: {exc}", False))
            else:
                untimed.append(Untimed(name, f"did not start: {exc}", True))
            continue
        if name == "router" and (refusal := http2_refusal(candidate.port or 0)) is not None:
            untimed.append(Untimed(name, f"no HTTP/2 front end: its listener {refusal}", False))
            _stop(stack, candidate)
            continue
        try:
            if name == "direct":
                count = check_grpc_direct(stack.grpc_upstreams)
            else:
                count = check_grpc_proxy(name, candidate.port or 0)
        except RoutingError as exc:
            untimed.append(Untimed(name, str(exc), True))
            _stop(stack, candidate)
            continue
        log(f"  {name}: {count} gRPC routing checks passed")
        ready.append(candidate)
    return ready, untimed


def run_grpc_rows(
    stack: Stack,
    names: Sequence[str],
    plan: Sequence[Scenario],
    *,
    reps: int,
    duration: float,
    warmup: float,
    log: Callable[[str], None],
    h2load_version: str = "h2load",
) -> GrpcRows:
    """Start the h2c upstream and ``names``, check them, then time ``plan`` (A B C A B C …)."""
    log(f"gRPC over h2c: upstream nginx on core {LOAD_CPU} at {dict(stack.grpc_upstreams.by_name())}")
    cells: list[Cell] = []
    try:
        stack.start_grpc_upstream()
        check_grpc_direct(stack.grpc_upstreams)
    except (StartError, RoutingError, ValueError) as exc:
        return _rows(plan, cells, [Untimed("upstream", f"the gRPC upstream failed: {exc}", True)], h2load_version)
    log(f"starting gRPC candidates on core {PROXY_CPU} and checking routing")
    candidates, untimed = _ready(stack, names, log)
    total = reps * len(plan) * len(candidates)
    done = 0
    for rep in range(reps):
        for scenario in plan:
            for candidate in list(candidates):
                done += 1
                where = f"[{done}/{total}] rep {rep + 1} {scenario.name} / {candidate.name}"
                try:
                    cell = measure(stack, candidate, scenario, rep=rep, duration=duration, warmup=warmup)
                except (StartError, H2loadError) as exc:
                    log(f"{where}: FAILED, left out from now on: {exc}")
                    untimed.append(Untimed(candidate.name, f"failed in {where}: {exc}", True))
                    candidates.remove(candidate)
                    _stop(stack, candidate)
                    continue
                cells.append(cell)
                cpu = f"{cell.cpu_us_per_request:.1f} µs/stream" if cell.cpu_us_per_request else "–"
                log(
                    f"{where}: {cell.value:,.0f} {scenario.metric.unit}, p50 "
                    f"{cell.detail['latency_us'].get('50', float('nan')):,.0f} µs, proxy {cpu}, {cell.errors} errors"
                )
    for candidate in candidates:
        _stop(stack, candidate)
    return _rows(plan, cells, untimed, h2load_version)


def target_line(summaries: Sequence[Summary], scenario: Scenario, untimed: Sequence[Untimed]) -> str:
    """The router's median streams/s over the better peer's, against ``TARGET``."""
    by = {s.candidate: s for s in summaries if s.scenario == scenario.name}
    peers = [by[p] for p in PEERS if p in by]
    router = by.get("router")
    if router is None:
        why = next((u.reason for u in untimed if u.candidate == "router"), "not among the candidates")
        return f"{scenario.name}: router not timed ({why.splitlines()[0]})"
    if not peers:
        return f"{scenario.name}: no peer timed, nothing to compare the router with"
    best = max(peers, key=lambda s: s.median)
    ratio = router.median / best.median
    verdict = "met" if ratio >= TARGET else "NOT met"
    return (
        f"{scenario.name}: router {router.median:,.0f} streams/s = {ratio:.2f}× {best.candidate} "
        f"({best.median:,.0f} streams/s, the better peer); target ≥ {TARGET}×: {verdict}"
    )


def _untimed_notes(untimed: Sequence[Untimed]) -> str:
    lines = []
    for u in untimed:
        first, *rest = u.reason.splitlines()
        lines.append(f"- **{u.candidate}** {'FAILED' if u.failure else 'skipped'}: {first}")
        lines.extend(f"  - {line.strip()}" for line in rest if line.strip())
    return "\n".join(lines) + "\n"


def _rows(plan: Sequence[Scenario], cells: list[Cell], untimed: list[Untimed], h2load_version: str) -> GrpcRows:
    summaries = summarize(cells, {s.name: s.metric for s in plan}, references=REFERENCES)
    target = [target_line(summaries, scenario, untimed) for scenario in plan]
    connections = ", ".join(f"`-c{s.connections} -m{s.streams_per_connection}`" for s in plan)
    markdown = (
        "\n## gRPC over h2c (unary calls)\n\n"
        f"Core {LOAD_CPU}: {h2load_version} (`-t1`, {connections}) and an upstream nginx (h2c, one worker) that "
        "reads each call's message and answers with one length-prefixed message naming itself and the trailer "
        f"`grpc-status: 0`; core {PROXY_CPU}: the proxy under test alone. Every call POSTs one small message to "
        "`/bench.Bench/Call` with `content-type: application/grpc`, `te: trailers` and the scenario's baggage. "
        "streams/s: streams that ended with a 2xx status over h2load's timed duration; p50: median over the "
        "repetitions of each run's median call time (h2load's per-request log); proxy CPU µs/stream as for the "
        "HTTP/1.1 rows. h2load does not read trailers, so before timing each candidate answered the "
        f"{len(PROXY_CHECKS)} routing checks as unary calls (the right upstream's message and `x-served-by`, "
        "`grpc-status: 0`).\n\n"
        + (markdown_table(summaries, references=REFERENCES, latency=True, per="stream") + "\n" if summaries else "")
        + "".join(f"- {line}\n" for line in target)
        + (f"\nNot timed:\n\n{_untimed_notes(untimed)}" if untimed else "")
    )
    return GrpcRows(cells, summaries, untimed, target, markdown)

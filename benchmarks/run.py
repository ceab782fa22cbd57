"""``python -m benchmarks.run``: the one command that benchmarks the router against its peers.

Modes (one per invocation):
  (default)   direct, nginx, haproxy, router × six HTTP/1.1 scenarios, interleaved repetitions,
              then the gRPC rows (unary calls over h2c, h2load; ``grpc_rows``)
  --quick     CI smoke: correctness + c50 alice for direct, nginx, router; fails on regressions;
              then, if h2load is installed, a one-repetition gRPC smoke for nginx and the router
  --scale     router only: 10k-service table, table swaps every 100 ms, 10k idle connections;
              the controller's feed fanned out to 1,000 subscribers, a router following it under changes
              (``--scale-only ROWS`` runs some of these rows only)
  --profile   py-spy profile of the router under c50 alice load

Results go to ``benchmarks/results/<date>[-mode].{json,md}``. This module plans and reports;
it never measures anything itself (``stack.measure`` does) and always stops what it started.

Exit status: 0 ok; 1 the router routed wrongly, crashed, had errors, or (``--quick``) fell
below 0.3× nginx; 2 the harness or its environment failed (missing tools, a peer misbehaved).
In the gRPC rows a failing candidate is left out and the run goes on; the status says so at the
end (1 for the router, 2 for a peer). A router without an HTTP/2 front end is skipped, not failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final, TypeVar

import router
from benchmarks import configs, feed, grpc_rows, profiling, scale, scenarios
from benchmarks.correctness import RoutingError, check_direct, check_proxy
from benchmarks.grpc_rows import GrpcRows, run_grpc_rows
from benchmarks.processes import INSTALL_HINT, Processes, ProcSample, StartError, missing_tools, raise_fd_limit
from benchmarks.report import Cell, Summary, markdown_table, summarize, write_results
from benchmarks.scenarios import Scenario
from benchmarks.stack import LOAD_CPU, PROXY_CPU, Candidate, Quiet, Stack, measure
from benchmarks.wrk import WrkError, run_wrk

RESULTS: Final = Path(__file__).resolve().parent / "results"
QUICK_FLOOR: Final = 0.3
"""--quick fails when the router serves less than this fraction of nginx's req/s in the same run:
far below the expected ~0.4-0.5x on two cores, so only a real regression (not host noise) trips it."""
ALL_CANDIDATES: Final = ("direct", "nginx", "haproxy", "router")
SCALE_ROWS: Final = ("large-table", "swaps", "idle", "feed", "router-feed", "scoped", "workers")
"""``--scale``'s rows, in run order (``large-table`` includes the reload of that table)."""
_T = TypeVar("_T")


class RouterFailure(Exception):
    """The router itself misbehaved: exit 1."""


class PeerFailure(Exception):
    """A peer or the harness's own upstream misbehaved in the gRPC rows (after results were written): exit 2."""


def _log(message: str) -> None:
    print(message, flush=True)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CI smoke: a few seconds, one rep, fails on regressions")
    mode.add_argument("--scale", action="store_true", help="router scale scenarios (large table, swaps, idle conns)")
    mode.add_argument("--profile", action="store_true", help="py-spy profile of the router under c50 alice load")
    p.add_argument(
        "--profile-scenario", choices=sorted(scenarios.PROFILED), default="get", help="--profile: load (default get)"
    )
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 3; --quick 1)")
    p.add_argument("--duration", type=float, help="seconds per timed cell (default 10; --quick 3; --profile 20)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of untimed load before each cell (default 1)")
    p.add_argument(
        "--candidates",
        default=",".join(ALL_CANDIDATES),
        help=f"default mode: comma-separated subset of {ALL_CANDIDATES} (the gRPC rows take the same names)",
    )
    p.add_argument(
        "--quiet-threshold", type=float, default=0.2, help="cores of other load tolerated before a cell (default 0.2)"
    )
    p.add_argument(
        "--quiet-wait", type=float, default=30.0, help="max seconds to wait for that before a cell (0: never)"
    )
    p.add_argument(
        "--scenarios",
        default=",".join(scenarios.BY_NAME),
        help=f"default mode: comma-separated subset of {tuple(scenarios.BY_NAME)}",
    )
    p.add_argument(
        "--against",
        type=Path,
        metavar="CHECKOUT",
        help="default mode: also run the router of another checkout (a git worktree, built in place) as "
        "candidate router-base, interleaved with this one: how a change compares with the code before it",
    )
    p.add_argument("--idle-connections", type=int, default=scale.IDLE_CONNECTIONS, help="--scale: idle connections")
    p.add_argument(
        "--scale-only",
        metavar="ROWS",
        help=f"--scale (implied): only these comma-separated rows of {SCALE_ROWS}, e.g. feed,router-feed",
    )
    p.add_argument("--output-dir", type=Path, default=RESULTS, help=f"where results go (default {RESULTS})")
    args = p.parse_args(argv)
    if args.scale_only is not None:
        if args.quick or args.profile:
            p.error("--scale-only goes with --scale only")
        args.scale = True
        args.scale_only = [r.strip() for r in args.scale_only.split(",") if r.strip()]
        if unknown := set(args.scale_only) - set(SCALE_ROWS):
            p.error(f"unknown --scale-only rows: {sorted(unknown)} (choose from {SCALE_ROWS})")
    rows = args.scale_only or SCALE_ROWS
    args.scale_rows = [r for r in SCALE_ROWS if r in rows]
    args.reps = args.reps or (1 if args.quick or args.profile else 3)
    args.duration = args.duration or (3.0 if args.quick else 20.0 if args.profile else 10.0)
    if args.reps < 1 or args.duration < 1 or args.warmup < 0:
        p.error("--reps and --duration must be at least 1, --warmup not negative")
    args.candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := set(args.scenarios) - set(scenarios.BY_NAME):
        p.error(f"unknown scenarios: {sorted(unknown)}")
    if unknown := set(args.candidates) - set(ALL_CANDIDATES):
        p.error(f"unknown candidates: {sorted(unknown)}")
    if args.against is not None:
        if not (args.against / "devstack" / "__main__.py").exists():
            p.error(f"--against {args.against}: not a devstack checkout (no devstack/__main__.py)")
        args.candidates.append("router-base")
    return args


def _host_info() -> dict[str, Any]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
        except OSError as exc:
            return str(exc)
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else ""

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    repo = Path(__file__).resolve().parent.parent
    versions: dict[str, str | None] = {}
    for dist in ("devstack", "uvloop", "httptools"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": versions,
        "nginx": first_line(["nginx", "-v"]),
        "haproxy": first_line(["haproxy", "-v"]),
        "wrk": first_line(["wrk", "-v"]),
        "h2load": first_line(["h2load", "--version"]) if shutil.which("h2load") else None,
        "git_commit": first_line(["git", "-C", str(repo), "rev-parse", "HEAD"]),
        "router_hot_path": router.HOT_PATH_MODE,
        "git_dirty_router": bool(first_line(["git", "-C", str(repo), "status", "--porcelain", "router"])),
    }


def _stem(suffix: str) -> str:
    day = datetime.date.today().isoformat()
    return f"{day}-{suffix}" if suffix else day


def _echo_module() -> str | None:
    return configs.ECHO_MODULE if Path(configs.ECHO_MODULE).exists() else None


def _check_candidate(stack: Stack, candidate: Candidate) -> None:
    if candidate.name == "direct":
        count = check_direct(stack.upstreams, upload=stack.can_upload)
    else:
        count = check_proxy(candidate.name, candidate.port or 0, upload=stack.can_upload)
    _log(f"  {candidate.name}: {count} routing checks passed")


def _start_candidates(stack: Stack, names: Sequence[str], against: Path | None = None) -> list[Candidate]:
    started = []
    for name in names:
        if name == "direct":
            started.append(stack.direct())
        elif name == "nginx":
            started.append(stack.start_nginx())
        elif name == "haproxy":
            started.append(stack.start_haproxy())
        else:
            # router-base: the same interpreter running another checkout's code (--against).
            command = None if against is None or name != "router-base" else ["env", f"PYTHONPATH={against.resolve()}"]
            try:
                router, took = stack.start_router(name, launcher=command)
            except StartError as exc:
                raise RouterFailure(f"router did not start: {exc}") from exc
            _log(f"  {name} ready in {took:.2f}s")
            started.append(router)
    return started


def _measure_checked(stack: Stack, candidate: Candidate, scenario: Scenario, **kw: Any) -> Cell:
    try:
        return measure(stack, candidate, scenario, **kw)
    except (StartError, WrkError) as exc:
        if candidate.name.startswith("router"):
            raise RouterFailure(f"{candidate.name} failed in {scenario.name!r}: {exc}") from exc
        raise


def _format_cell(cell: Cell, unit: str) -> str:
    cpu = (
        f", proxy {cell.cpu_us_per_request:.1f} µs/req ({100 * (cell.cpu_utilisation or 0):.0f}% CPU)"
        if cell.cpu_us_per_request
        else ""
    )
    return f"{cell.value:,.1f} {unit}{cpu}, {cell.errors} errors"


def _memory(candidates: Sequence[Candidate]) -> dict[str, dict[str, int]]:
    out = {}
    for c in candidates:
        if c.pid:
            sample = ProcSample.read(c.pid)
            out[c.name] = {"rss_kib": sample.rss_kib, "hwm_kib": sample.hwm_kib}
    return out


def _memory_table(idle: dict[str, dict[str, int]], end: dict[str, dict[str, int]]) -> str:
    lines = ["| proxy | RSS idle after start (MiB) | RSS at end (MiB) | peak RSS (MiB) |", "|---|---:|---:|---:|"]
    for name, sample in end.items():
        start = idle.get(name, {}).get("rss_kib", 0)
        lines.append(
            f"| {name} | {start / 1024:.1f} | {sample['rss_kib'] / 1024:.1f} | {sample['hwm_kib'] / 1024:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _header(title: str, args: argparse.Namespace, host: dict[str, Any]) -> str:
    return (
        f"# {title}\n\n"
        f"{datetime.datetime.now().isoformat(timespec='seconds')}, {host['cpu']} ({host['cpus']} CPUs), kernel "
        f"{host['kernel']}, Python {host['python']}, {host['nginx']}, {host['haproxy'].split(' - ')[0]}, wrk "
        f"{host['wrk'].split(' [')[0].removeprefix('wrk ')}, commit {host['git_commit'][:12]}"
        f"{' (router/ modified)' if host['git_dirty_router'] else ''}, router hot path {host['router_hot_path']}.\n"
        f"Core {LOAD_CPU}: wrk -t1 + upstream nginx (1 worker); core {PROXY_CPU}: the proxy under test alone. "
        f"{args.reps} interleaved repetition(s) × {args.duration:g}s per cell after {args.warmup:g}s warm-up, each "
        f"started once other load was below {args.quiet_threshold:g} cores (waiting at most {args.quiet_wait:g}s); "
        "median, min–max across repetitions; ratios are between medians of this run.\n\n"
    )


def _plans(args: argparse.Namespace, stack: Stack, *, quick: bool) -> tuple[tuple[Scenario, ...], tuple[Scenario, ...]]:
    """The HTTP/1.1 scenarios and the gRPC ones this run times (quick: the gRPC smoke if it can)."""
    if quick:
        skipped = _grpc_unavailable(stack)
        if skipped:
            _log(f"gRPC smoke skipped: {skipped}")
        return scenarios.QUICK, () if skipped else scenarios.GRPC_QUICK
    planned = tuple(scenarios.BY_NAME[name] for name in args.scenarios)
    http1 = tuple(s for s in planned if s.protocol == scenarios.HTTP1 and (stack.can_upload or not s.needs_upload))
    return http1, tuple(s for s in planned if s.protocol == scenarios.GRPC)


def _grpc_unavailable(stack: Stack) -> str | None:
    if missing := missing_tools(["h2load"]):
        return f"{', '.join(missing)} not installed ({INSTALL_HINT})"
    if not stack.can_upload:
        return f"{configs.ECHO_MODULE} missing: the gRPC upstream needs it ({INSTALL_HINT})"
    return None


def run_default(stack: Stack, args: argparse.Namespace, host: dict[str, Any], *, quick: bool) -> int:
    names = ["direct", "nginx", "router"] if quick else args.candidates
    plan, grpc_plan = _plans(args, stack, quick=quick)
    title = "devstack router benchmark (quick)" if quick else "devstack router benchmark"
    markdown = _header(title, args, host)
    cells: list[Cell] = []
    summaries: list[Summary] = []
    memory: dict[str, Any] = {}
    if plan:
        cells, summaries, memory = _run_http1(stack, args, names, plan, against=None if quick else args.against)
        markdown += (
            markdown_table(summaries)
            + "\nRatios ×nginx/×direct: this candidate's median over the reference's (for p50 latency lower is "
            "better). Proxy CPU µs/req: utime+stime of the proxy process over the timed run / requests "
            "(per 1 MiB response or 64 MiB upload in those rows); proxy CPU %: of one core. Other load %: the most "
            "CPU (in % of one core) that processes outside this harness used during any repetition of the row: the "
            "host is shared, so rows with high values are suspect.\n\n"
            + _memory_table(memory["idle_after_start"], memory["end"])
        )
    grpc: GrpcRows | None = None
    if grpc_plan:
        grpc = run_grpc_rows(
            stack,
            ["nginx", "router"] if quick else [name for name in args.candidates if name in grpc_rows.CANDIDATES],
            grpc_plan,
            reps=1 if quick else args.reps,
            duration=args.duration,
            warmup=args.warmup,
            log=_log,
            h2load_version=host["h2load"] or "h2load",
        )
        markdown += grpc.markdown
    elif quick:
        markdown += f"\n(gRPC smoke skipped: {_grpc_unavailable(stack)})\n"
    verdict = _quick_verdict(summaries, grpc) if quick else None
    if verdict:
        markdown += f"\n**QUICK CHECK FAILED**: {verdict}\n"
    document = {
        "mode": "quick" if quick else "default",
        "host": host,
        "settings": {"reps": args.reps, "duration_s": args.duration, "warmup_s": args.warmup, "candidates": names},
        "scenarios": [dataclasses.asdict(s) for s in (*plan, *grpc_plan)],
        "cells": cells + (grpc.cells if grpc else []),
        "summary": summaries + (grpc.summaries if grpc else []),
        "memory": memory,
        "grpc": {"untimed": grpc.untimed, "target": grpc.target} if grpc else None,
        "quick_failure": verdict,
    }
    _finish(args, "quick" if quick else "", document, markdown)
    if verdict:
        raise RouterFailure(verdict)
    if grpc and (failures := grpc.failures(router=True)):
        raise RouterFailure("gRPC rows: " + "; ".join(failures))
    if grpc and (failures := grpc.failures(router=False)):
        raise PeerFailure("gRPC rows: " + "; ".join(failures))
    return 0


def _run_http1(
    stack: Stack, args: argparse.Namespace, names: Sequence[str], plan: Sequence[Scenario], *, against: Path | None
) -> tuple[list[Cell], list[Summary], dict[str, Any]]:
    """The HTTP/1.1 rows: candidates started and checked (a wrong answer stops the run), timed
    interleaved, then stopped so the gRPC rows have the proxy core to themselves."""
    _log("starting candidates on core 1 and checking routing")
    candidates = _start_candidates(stack, names, against)
    for candidate in candidates:
        try:
            _check_candidate(stack, candidate)
        except RoutingError as exc:
            if candidate.name == "router":
                raise RouterFailure(str(exc)) from exc
            raise
    idle_memory = _memory(candidates)
    cells: list[Cell] = []
    total = args.reps * len(plan) * len(candidates)
    done = 0
    for rep in range(args.reps):
        for scenario in plan:
            for candidate in candidates:
                done += 1
                cell = _measure_checked(stack, candidate, scenario, rep=rep, duration=args.duration, warmup=args.warmup)
                cells.append(cell)
                where = f"[{done}/{total}] rep {rep + 1} {scenario.name} / {candidate.name}"
                _log(f"{where}: {_format_cell(cell, scenario.metric.unit)}")
    end_memory = _memory(candidates)
    for candidate in candidates:
        if candidate.proc is not None:
            stack.procs.stop(candidate.proc)
    summaries = summarize(cells, {s.name: s.metric for s in plan})
    return cells, summaries, {"idle_after_start": idle_memory, "end": end_memory}


def _quick_verdict(summaries: Sequence[Summary], grpc: GrpcRows | None) -> str | None:
    """--quick fails on the router's HTTP/1.1 errors or ratio, and on its gRPC failures or errors
    (a router without an HTTP/2 front end is skipped, not failed; no gRPC floor yet: see grpc_rows.TARGET)."""
    problems = [verdict] if (verdict := _http1_quick_verdict(summaries)) else []
    if grpc is not None:
        problems += [f"gRPC {reason.splitlines()[0]}" for reason in grpc.failures(router=True)]
        problems += [
            f"{s.scenario}: router had {s.errors} failed gRPC streams"
            for s in grpc.summaries
            if s.candidate == "router" and s.errors
        ]
    return "; ".join(problems) or None


def _http1_quick_verdict(summaries: Sequence[Summary]) -> str | None:
    problems = []
    by = {(s.scenario, s.candidate): s for s in summaries}
    for (scenario, candidate), s in by.items():
        if candidate != "router":
            continue
        if s.errors:
            problems.append(f"{scenario}: router had {s.errors} non-2xx/socket errors")
        ratio = s.vs.get("nginx")
        if ratio is not None and ratio < QUICK_FLOOR:
            problems.append(f"{scenario}: router at {ratio:.2f}x nginx req/s (floor {QUICK_FLOOR}x)")
    return "; ".join(problems) or None


def run_scale(stack: Stack, args: argparse.Namespace, host: dict[str, Any]) -> int:
    kw = {"duration": args.duration, "warmup": args.warmup, "log": _log}
    sections: list[str] = []
    document: dict[str, Any] = {
        "mode": "scale",
        "host": host,
        "settings": {"reps": args.reps, "duration_s": args.duration, "rows": args.scale_rows},
    }
    rows = args.scale_rows

    def section(title: str, key: str, cells: list[Cell], info: dict[str, Any], reference: str, notes: str) -> None:
        summaries = summarize(cells, {scenarios.GET_ALICE.name: scenarios.GET_ALICE.metric}, references=(reference,))
        table = markdown_table(summaries, references=(reference,)).replace(f"×{reference}", f"× {reference}")
        sections.append(f"## {title}\n\n{table}\n{notes}\n")
        document[key] = {"cells": cells, "summary": summaries, "info": info}
        _log(f"\n## {title}\n{table}{notes}")

    if "large-table" in rows:
        _log(f"large table: {scale.LARGE_SERVICES} services, {scale.LARGE_OVERRIDES} overrides vs one service")
        cells, info, large = _router_step(lambda: scale.large_table(stack, reps=args.reps, **kw))
        ready = info["seconds_to_ready"]
        rss = info["rss_kib_loaded"]
        section(
            "route table: 1 service vs 10k services / 100k overrides (c50 devstack=alice)",
            "large_table",
            cells,
            info,
            "router-1-service",
            f"Route file {info['yaml_bytes'] / 1e6:.1f} MB; start to ready: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in ready.items())
            + "; RSS once loaded: "
            + ", ".join(f"{k} {v / 1024:.1f} MiB" for k, v in rss.items())
            + ".\n",
        )
        _log("reload of the large table (SIGHUP) during c50")
        cells, info = _router_step(lambda: scale.large_table_reload(stack, large, warmup=args.warmup, log=_log))
        stack.procs.stop(large.proc)  # type: ignore[arg-type]
        seconds = info["reload_to_publish_seconds"]
        section(
            f"reload of the 10k-service table under c50 devstack=alice ({scale.RELOAD_RUN:g} s runs)",
            "large_table_reload",
            cells,
            info,
            "no reload",
            "SIGHUP one second into the timed run; new table published "
            + (f"{seconds:.1f} s after the signal" if seconds is not None else "NOT within the deadline")
            + ". The route file is parsed in a worker thread that shares the GIL with the event loop. wrk p99 latency: "
            + ", ".join(f"{c.candidate} {c.detail['latency_us'].get('99', 0) / 1000:.1f} ms" for c in cells)
            + ".\n",
        )
    if "swaps" in rows:
        _log("table swaps: route file rewritten + SIGHUP every 100 ms during c50 (every body checked)")
        cells, info = _router_step(lambda: scale.table_swaps(stack, reps=args.reps, **kw))
        swaps = info["swaps"]
        section(
            "table swaps every 100 ms (c50 devstack=alice, every response body checked by wrk Lua)",
            "table_swaps",
            cells,
            info,
            "no swaps",
            "SIGHUPs sent / tables published per swapping run: "
            + ", ".join(f"{s['sighups']}/{s['versions_published']}" for s in swaps)
            + ". Errors include responses whose body was not `alice`.\n",
        )
    if "idle" in rows:
        _log(f"idle connections: {args.idle_connections} keep-alive connections held open")
        cells, info = _router_step(
            lambda: scale.idle_connections(
                stack, duration=args.duration, warmup=args.warmup, count=args.idle_connections, log=_log
            )
        )
        rss = info["rss_kib"]
        per = info["kib_per_connection"]
        section(
            f"{args.idle_connections} idle keep-alive connections (c50 devstack=alice alongside)",
            "idle_connections",
            cells,
            info,
            "no idle connections",
            f"Held {info['held']} connections ({info['connect_failures']} connect failures, {info['request_failures']} "
            f"failed first requests, opened in {info['connect_seconds']:.1f}s). Router RSS: before "
            f"{rss['before'] / 1024:.1f} MiB, connected {rss['connected'] / 1024:.1f} MiB, after one request each "
            f"{rss['after_one_request'] / 1024:.1f} MiB, after closing {rss['after_close'] / 1024:.1f} MiB → "
            f"{per['connected']:.1f} KiB per connected socket, {per['after_one_request']:.1f} KiB per used keep-alive "
            f"connection. Router's open-connection gauge: {info['router_open_connections']}.\n",
        )
    if "feed" in rows:
        _log(
            f"route feed fan-out: a controller with {scale.LARGE_SERVICES} services, {feed.FEED_SUBSCRIBERS} /v2 "
            f"subscribers, {feed.FEED_CHANGES} one-override changes; then {feed.V1_SUBSCRIBERS} /v1 subscribers"
        )
        info = _router_step(lambda: feed.feed_fanout(stack, log=_log))
        title = (
            f"route feed: one override changed in a {scale.LARGE_SERVICES // 1000}k-service controller, "
            f"{feed.FEED_SUBSCRIBERS} /v2 subscribers"
        )
        v2 = info["v2"]
        notes = (
            f"The controller (`devstack controller --routes`, {info['yaml_bytes'] / 1e6:.1f} MB route file, ready in "
            f"{info['seconds_to_ready']:.1f} s) on core {PROXY_CPU}; subscribers on core {LOAD_CPU}: /v2 "
            f"{v2['connected']} streams in {v2['client_processes']} processes ({v2['gzip_subscribers']} with "
            f"`Accept-Encoding: gzip`, as routers send it), resumed from v{v2['position']['version']} with "
            f"`since`/`instance` (the snapshot they skipped: {v2['position']['snapshot_bytes'] / 1e6:.1f} MB, "
            f"{v2['position']['snapshot_gzip_bytes'] / 1e6:.2f} MB gzip), /v1 {info['v1']['connected']} streams "
            f"(`watch=1&since=`; each change sends each of them the whole table, so 1,000 would be ~14 GB per "
            "change). Each change: the route file replaced (one override of one service moved) and SIGHUP, the "
            'next one once every subscriber had the previous. "published": the controller\'s own log line, once '
            "the re-read table is built, diffed and current (wall-clock ms mapped onto CLOCK_MONOTONIC); a "
            "subscriber has a change when the line's last byte is read. Bytes: raw bytes read per subscriber per "
            "change, chunked framing included (mean; the gzip column is the gzip streams). Controller CPU "
            "(utime+stime from /proc, sampled every 10 ms) split at the publish: re-reading the file vs fanning "
            "out. With 10 changes p99 is the largest. Subscribers missing a change: "
            f"/v2 {v2['missed']}, /v1 {info['v1']['missed']}.\n\n"
        )
        table = feed.fanout_markdown(info)
        sections.append(f"## {title}\n\n{table}\n{notes}")
        document["feed_fanout"] = info
        _log(f"\n## {title}\n{table}{notes}")
    if "workers" in rows:
        _log("--workers 1 against --workers 2 on the proxy core (c50 devstack=alice)")
        cells, info = _router_step(lambda: scale.workers_per_core(stack, reps=args.reps, **kw))
        section(
            "--workers 1 and 2, both on the proxy core (c50 devstack=alice)",
            "workers",
            cells,
            info,
            "router-workers-1",
            f"Both routers confined to core {PROXY_CPU} (their workers inherit it), wrk and the upstream on "
            f"core {LOAD_CPU}; CPU per request is the parent's and the workers' together (/proc, the process "
            "tree). This host has two cores and the load generator needs one of them, so it cannot show a "
            "second worker adding throughput; it shows what a second worker costs per request on one core "
            "(scheduling two event loops, the kernel spreading accepts over two queues). On a pod with N free "
            "cores each worker is a whole router: throughput should grow with N until the upstreams or the "
            "load balancer bind, which needs a bigger machine to show.\n",
        )
    if "scoped" in rows:
        _log(f"scoped sidecars: following a {scale.LARGE_SERVICES}-service controller, whole or scoped")
        info = _router_step(lambda: feed.scoped_sidecars(stack, log=_log))
        title = f"sidecars following a {scale.LARGE_SERVICES // 1000}k-service controller: every service or a scope"
        learned = info["rows"].get("--learn-services", {})
        notes = (
            "Each sidecar (`devstack router --mode sidecar --routes-from`, lite admin) alone on the proxy core, "
            "measured a second after it is ready. Feed bytes: what its connection to the controller received "
            "(kernel tcp_info by `ss`; gzip, as routers ask). The learning sidecar holds nothing until its app's "
            "first requests, each held until the feed answered for its authority: "
            + ", ".join(f"{status} in {seconds * 1000:.0f} ms" for status, seconds in learned.get("first_use", []))
            + "; its bytes are its last subscription's (it subscribes again when its scope grows).\n"
        )
        table = feed.scoped_markdown(info)
        sections.append(f"## {title}\n\n{table}\n{notes}")
        document["scoped_sidecars"] = info
        _log(f"\n## {title}\n{table}{notes}")
    if "router-feed" in rows:
        _log("router following a controller under c50 while one service changes every 100 ms")
        cells, info = _router_step(
            lambda: feed.router_under_changes(stack, duration=args.duration, warmup=args.warmup, log=_log)
        )
        p99 = info["p99_us"]
        ratio = info["p99_ratio"]
        section(
            f"router following a controller: a service changing every {feed.CHURN_INTERVAL * 1000:.0f} ms "
            "(c50 devstack=alice, bodies checked)",
            "router_feed_changes",
            cells,
            info,
            "no changes",
            f"`devstack router --routes-from` a controller (route file: bench plus one service whose override is "
            f"renamed every {feed.CHURN_INTERVAL * 1000:.0f} ms, file replaced + SIGHUP; controller on core "
            f"{LOAD_CPU} beside wrk and the upstream). p99 (median of {feed.ROUTER_REPS}): no changes "
            f"{(p99['no changes'] or 0) / 1000:.2f} ms, with changes {(p99['changes'] or 0) / 1000:.2f} ms → "
            + (f"{ratio:.2f}x" if ratio is not None else "–")
            + f" (target ≤ {feed.TARGET_P99_RATIO:g}x: "
            + ("met" if ratio is not None and ratio <= feed.TARGET_P99_RATIO else "NOT met")
            + f"); errors {info['errors']} (non-2xx, socket, or a body not `alice`). Per changing run, files "
            "written / versions the controller published / tables the router applied, and seconds until the "
            "router routed as the controller's last table: "
            + ", ".join(
                f"{r['files_written']}/{r['controller_versions']}/{r['router_versions']}, "
                + (f"{r['router_caught_up_s']:.2f} s" if r["router_caught_up_s"] is not None else "NEVER")
                for r in info["runs"]
                if "files_written" in r
            )
            + (". Every change applied." if info["all_applied"] else ". NOT every change applied.")
            + " The controller serves a small table here: re-reading the 10k-service file takes it ~7 s, so a "
            "change every 100 ms cannot come from a 10k-service route file.\n",
        )
    markdown = _header("devstack router scale benchmarks", args, host) + "\n".join(sections)
    _finish(args, "scale", document, markdown, echo=False)
    return 0


def _router_step(step: Callable[[], _T]) -> _T:
    try:
        return step()
    except RoutingError as exc:
        raise RouterFailure(str(exc)) from exc
    except (StartError, WrkError) as exc:
        raise RouterFailure(f"router failed: {exc}") from exc


def run_profile(stack: Stack, args: argparse.Namespace, host: dict[str, Any]) -> int:
    if profiling.py_spy() is None:
        _log("py-spy is not installed: .venv/bin/pip install py-spy (a dev tool; not a project dependency)")
        return 2
    router, _ = stack.start_router()
    check_proxy(router.name, router.port or 0, upload=stack.can_upload)
    scenario = scenarios.PROFILED[args.profile_scenario]
    if scenario.needs_upload and not stack.can_upload:
        _log(f"{configs.ECHO_MODULE} missing (the upload scenario needs it); install with: {INSTALL_HINT}")
        return 2
    url = router.url(scenario, stack.upstreams)
    result: dict[str, Any] = {}

    def load() -> None:
        result["wrk"] = run_wrk(
            url,
            connections=scenario.connections,
            duration=args.duration + 4,
            headers=scenario.headers(configs.SERVICE),
            script=stack.script(scenario.script) if scenario.script else None,
            timeout=scenario.timeout,
        )

    if stack.quiet is not None:
        stack.quiet.wait()
    loader = threading.Thread(target=load, name="wrk-load", daemon=True)
    loader.start()
    time.sleep(2)
    suffix = "profile" if args.profile_scenario == "get" else f"profile-{args.profile_scenario}"
    raw = args.output_dir / f"{_stem(suffix)}.collapsed.txt"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    profiling.record(router.pid or 0, args.duration, raw, cpu=LOAD_CPU)
    loader.join(args.duration + 60)
    profile = profiling.fold(raw.read_text().splitlines())
    total = profile.samples or 1

    def rows(funcs: list[profiling.FunctionCost]) -> str:
        out = ["| # | function | self % | inclusive % |", "|---:|---|---:|---:|"]
        out += [
            f"| {i} | `{f.function}` | {100 * f.self_samples / total:.1f} | {100 * f.total_samples / total:.1f} |"
            for i, f in enumerate(funcs, 1)
        ]
        return "\n".join(out) + "\n"

    wrk = result.get("wrk")
    own_self = sum(f.self_samples for f in profile.functions if f.function.split(" (", 1)[-1].startswith("router/"))
    markdown = (
        _header(f"devstack router profile (py-spy, {scenario.name})", args, host)
        + f"{profile.samples} samples at 250 Hz over {args.duration:g}s (py-spy --nonblocking; idle time not "
        "sampled); load "
        + (f"{wrk.requests_per_second:,.0f} req/s, {wrk.errors} errors" if wrk else "(wrk failed)")
        + f". Samples with router/ code innermost: {100 * own_self / total:.1f}%. 'self' = the innermost Python "
        "frame (time in C calls it makes, e.g. transport.write or httptools, counts there). Collapsed stacks: "
        f"`{raw.name}` (flamegraph.pl / speedscope).\n\n"
        "## Router code, by self samples\n\n"
        + rows(profile.top(15, prefix="router/"))
        + "\n## Router code, by inclusive samples\n\n"
        + rows(profile.top(15, prefix="router/", by="total"))
        + "\n## Everything, by self samples\n\n"
        + rows(profile.top(15))
    )
    document = {
        "mode": "profile",
        "scenario": scenario.name,
        "host": host,
        "samples": profile.samples,
        "wrk": wrk.to_json() if wrk else None,
        "router_self": profile.top(15, prefix="router/"),
        "router_inclusive": profile.top(15, prefix="router/", by="total"),
        "all_self": profile.top(30),
    }
    _finish(args, suffix, document, markdown)
    return 0


def _finish(
    args: argparse.Namespace, suffix: str, document: dict[str, Any], markdown: str, *, echo: bool = True
) -> None:
    json_path, md_path = write_results(args.output_dir, _stem(suffix), document, markdown)
    if echo:
        _log("\n" + markdown)
    _log(f"wrote {json_path} and {md_path}")


def _raise_on_sigterm(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    if (os.cpu_count() or 1) < 2:
        _log("the benchmark needs two CPUs (core 0: load + upstream, core 1: proxy)")
        return 2
    default = not (args.quick or args.scale or args.profile)
    planned = {scenarios.BY_NAME[name].protocol for name in args.scenarios} if default else {scenarios.HTTP1}
    needed = ["nginx", "taskset"] + (["wrk"] if scenarios.HTTP1 in planned else [])
    needed += ["haproxy"] if default and "haproxy" in args.candidates else []
    needed += ["h2load"] if scenarios.GRPC in planned else []
    if missing := missing_tools(needed):
        _log(f"missing tools: {', '.join(missing)}; install with: {INSTALL_HINT}")
        return 2
    echo = _echo_module()
    if echo is None and default and ("upload" in args.scenarios or scenarios.GRPC in planned):
        _log(f"{configs.ECHO_MODULE} missing (the upload and gRPC scenarios need it); install with: {INSTALL_HINT}")
        return 2
    os.sched_setaffinity(0, {LOAD_CPU})
    limit = raise_fd_limit(65536)
    if args.scale and limit < args.idle_connections + 1000:
        _log(f"open-file limit {limit} is too low for {args.idle_connections} idle connections; using {limit - 1000}")
        args.idle_connections = max(0, limit - 1000)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    host = _host_info()
    with tempfile.TemporaryDirectory(prefix="devstack-bench-") as tmp, Processes(Path(tmp)) as procs:
        try:
            stack = Stack(procs, Path(tmp), echo_module=echo)
            if args.quiet_wait > 0:
                stack.quiet = Quiet(args.quiet_threshold, args.quiet_wait)
            if scenarios.HTTP1 in planned:
                _log(f"upstream nginx on core {LOAD_CPU}: {stack.upstreams.by_name()}")
                stack.start_upstream()
                check_direct(stack.upstreams, upload=stack.can_upload)
            if args.scale:
                return run_scale(stack, args, host)
            if args.profile:
                return run_profile(stack, args, host)
            return run_default(stack, args, host, quick=args.quick)
        except RouterFailure as exc:
            _log(f"\nROUTER FAILURE: {exc}")
            return 1
        except (PeerFailure, RoutingError, StartError, WrkError) as exc:
            _log(f"\nHARNESS FAILURE ({type(exc).__name__}): {exc}")
            return 2
        except KeyboardInterrupt:
            _log("\ninterrupted; stopping every process")
            return 130


if __name__ == "__main__":
    sys.exit(main())

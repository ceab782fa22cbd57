"""The controller's route feed at scale (``--scale``): one change fanned out to 1,000 subscribers,
and a router following a controller while a service changes every 100 ms.

``feed_fanout``: a ``devstack controller --routes FILE`` holding the 10,000-service / 100,000-override
table (on the proxy core), and subscribers on the load core (``feed_clients.py``, a few hundred
asyncio streams per process) following ``/v2/routes`` from the current version (``since`` and
``instance`` taken from one snapshot first, so no subscriber is sent the 14 MB snapshot), or
``/v1/routes?watch=1&since=V`` (whole tables). One override is then changed in the route file
(rewritten atomically, then SIGHUP, which the controller answers by re-reading it at once; it also
polls the file's mtime every second) a number of times, one change after every subscriber had the
previous one. Per change: when the controller published it (its own "route table vN published"
log line, whose wall-clock time is mapped onto CLOCK_MONOTONIC), when each subscriber had the line
(CLOCK_MONOTONIC, read in the client processes), the raw bytes each received, and the
controller's CPU time (``/proc``), split at the publish into re-reading the file and fanning out.

``router_under_changes``: ``devstack router --routes-from`` a small-table controller (on the load
core, beside wrk and the upstream), timed under c50 alice with every body checked, interleaved:
without changes and with one service's override rewritten every 100 ms; then whether the router
caught up with the controller's last table.

This module never changes the controller or the router: it edits route files and sends signals
as an operator would, and reads their HTTP endpoints, logs and ``/proc``.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import datetime
import http.client
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks import configs, scale
from benchmarks.configs import Upstreams
from benchmarks.correctness import check_proxy
from benchmarks.processes import ProcSample, StartError
from benchmarks.report import Cell
from benchmarks.scenarios import GET_ALICE
from benchmarks.stack import LOAD_CPU, Candidate, Quiet, Stack, measure

__all__ = [
    "CHURN_INTERVAL",
    "FEED_CHANGES",
    "FEED_SUBSCRIBERS",
    "V1_CHANGES",
    "V1_SUBSCRIBERS",
    "feed_fanout",
    "churn_yaml",
    "fanout_markdown",
    "router_under_changes",
    "scoped_markdown",
    "scoped_sidecars",
]

FEED_SUBSCRIBERS: Final = 1_000
FEED_CLIENT_PROCESSES: Final = 4
FEED_CHANGES: Final = 10
V1_SUBSCRIBERS: Final = 50
"""/v1 sends every subscriber the whole 14 MB table per change: 1,000 of them would be 14 GB per
change through one Python process, minutes per change; 50 show the cost per subscriber."""
V1_CHANGES: Final = 3
CHANGE_GAP: Final = 0.5
"""Seconds between one change reaching every subscriber and the next change."""
DELIVERY_DEADLINE: Final = 120.0
"""Per change, from the file change to every subscriber holding it (re-reading the file takes ~7 s)."""
ROUTER_REPS: Final = 2
CHURN_INTERVAL: Final = 0.1
TARGET_FANOUT_P99_S: Final = 1.0
TARGET_BYTES: Final = 10_000
TARGET_P99_RATIO: Final = 1.5
_NO_WAIT: Final = Quiet(max_wait=0)
_CLIENT_SCRIPT: Final = Path(__file__).resolve().with_name("feed_clients.py")
_PUBLISHED: Final = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \S+ controller\.aggregator: route table v(\d+) published", re.MULTILINE
)
_ALL: Final = re.compile(r"^all (\d+) ", re.MULTILINE)

Log = Callable[[str], None]


# --- measuring instruments ------------------------------------------------------------------------


class _CpuTrace:
    """The controller's CPU seconds sampled every 10 ms in a thread, to split a change's CPU at its publish."""

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self._pid = pid
        self._interval = interval
        self._stop = threading.Event()
        self.times: list[float] = []
        self.cpu: list[float] = []
        self._thread = threading.Thread(target=self._run, name="cpu-trace", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                cpu = ProcSample.read(self._pid).cpu_seconds
                self.times.append(time.monotonic())
                self.cpu.append(cpu)
            self._stop.wait(self._interval)

    def at(self, moment: float) -> float | None:
        """CPU seconds at the last sample taken at or before ``moment``."""
        index = bisect.bisect_right(self.times, moment) - 1
        return self.cpu[index] if index >= 0 else None

    def __enter__(self) -> _CpuTrace:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _publish_times(log: Path, offset: float) -> dict[int, float]:
    """Version → CLOCK_MONOTONIC of the controller's "route table vN published" line (ms resolution).

    ``offset`` is ``time.time() - time.monotonic()`` in this process: the log's local wall-clock
    time mapped onto the clock the subscribers stamp their lines with."""
    out: dict[int, float] = {}
    for m in _PUBLISHED.finditer(log.read_text(errors="replace")):
        wall = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        out[int(m[2])] = wall - offset
    return out


def _feed_position(port: int) -> dict[str, Any]:
    """Read one ``/v2/routes`` snapshot line (gzip, as a router asks): the current version and instance."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("GET", "/v2/routes", headers={"Accept-Encoding": "gzip", "Accept": "application/x-ndjson"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise StartError(f"/v2/routes answered {resp.status}")
        inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        head = b""
        plain = compressed = 0
        while True:
            data = resp.read1(1 << 16)
            if not data:
                raise StartError("/v2/routes ended before its first line")
            compressed += len(data)
            text = inflate.decompress(data)
            head += text[: max(0, 512 - len(head))]
            end = text.find(b"\n")
            if end >= 0:
                plain += end + 1
                break
            plain += len(text)
    finally:
        conn.close()
    version = re.search(rb'"version":(\d+)', head)
    instance = re.search(rb'"instance":"([^"]+)"', head)
    if version is None or instance is None:
        raise StartError(f"no version or instance in the snapshot's first bytes: {head[:200]!r}")
    return {
        "version": int(version[1]),
        "instance": instance[1].decode(),
        "snapshot_bytes": plain,
        "snapshot_gzip_bytes": compressed,
    }


def _gauge(controller: Candidate, name: str) -> float | None:
    m = re.search(rf"^{name} (\S+)$", controller.admin_text("/metrics"), re.MULTILINE)
    return float(m[1]) if m else None


def _percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (with 10 values, p99 is the largest)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(len(ordered) * q / 100) - 1))]


# --- subscriber processes -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Clients:
    procs: list[subprocess.Popen[bytes]]
    logs: list[Path]
    outs: list[Path]
    ready: list[dict[str, Any]]

    @property
    def connected(self) -> int:
        return sum(int(r["connected"]) for r in self.ready)

    def all_hold(self, version: int) -> bool:
        """Every client process has printed that each of its streams received ``version``."""
        for log, ready in zip(self.logs, self.ready):
            if ready["connected"] and str(version) not in _ALL.findall(log.read_text(errors="replace")):
                return False
        return True


def _start_clients(
    stack: Stack, name: str, port: int, path: str, total: int, processes: int, *, gzip_every: int
) -> _Clients:
    per = [total // processes + (1 if i < total % processes else 0) for i in range(processes)]
    procs, logs, outs, readies = [], [], [], []
    for i, count in enumerate(per):
        label = f"{name}-{i}"
        ready, out = stack.workdir / f"{label}.ready.json", stack.workdir / f"{label}.out.json"
        for stale in (ready, out):
            stale.unlink(missing_ok=True)
        argv = [
            sys.executable, str(_CLIENT_SCRIPT), "--port", str(port), "--path", path,
            "--connections", str(count), "--gzip-every", str(gzip_every), "--ready", str(ready), "--out", str(out),
        ]  # fmt: skip
        procs.append(stack.procs.start(label, argv, cpu=LOAD_CPU))
        logs.append(stack.procs.log_path(label))
        outs.append(out)
        readies.append(ready)
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in readies):
        stack.procs.check_alive()
        if time.monotonic() > deadline:
            raise StartError(f"{name}: subscribers not connected after 60 s")
        time.sleep(0.05)
    return _Clients(procs, logs, outs, [json.loads(r.read_text()) for r in readies])


def _stop_clients(stack: Stack, clients: _Clients) -> list[dict[str, Any]]:
    for proc in clients.procs:
        stack.procs.stop(proc, grace=15)
    return [json.loads(out.read_text()) if out.exists() else {"events": [], "gzip": []} for out in clients.outs]


# --- feed fan-out ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class _Change:
    version: int | None
    changed_at: float
    published_at: float | None
    done_at: float
    cpu_total: float
    cpu_reread: float | None
    delivered: bool


def _change_file(controller: Candidate, text: str) -> float:
    """Replace the route file atomically and SIGHUP the controller; returns when (monotonic)."""
    path = controller.routes_path
    assert path is not None and controller.pid is not None
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    changed = time.monotonic()
    os.replace(tmp, path)
    os.kill(controller.pid, signal.SIGHUP)
    return changed


def _run_changes(
    stack: Stack, controller: Candidate, clients: _Clients, texts: Sequence[str], changes: int, first: int, log: Log
) -> list[_Change]:
    """``changes`` changes, the n-th writing ``texts[(first + n + 1) % len(texts)]`` (the file holds
    ``texts[first % len(texts)]``), each once every subscriber had the previous one."""
    pid = controller.pid or 0
    controller_log = stack.procs.log_path(controller.name)
    offset = time.time() - time.monotonic()
    done: list[_Change] = []
    with _CpuTrace(pid) as trace:
        for n in range(changes):
            known = _publish_times(controller_log, offset)
            last = max(known, default=0)
            cpu_before = ProcSample.read(pid).cpu_seconds
            changed = _change_file(controller, texts[(first + n + 1) % len(texts)])
            deadline = changed + DELIVERY_DEADLINE
            version: int | None = None
            published: float | None = None
            delivered = False
            while time.monotonic() < deadline:
                stack.procs.check_alive()
                if version is None:
                    newer = {v: t for v, t in _publish_times(controller_log, offset).items() if v > last}
                    if newer:
                        version = min(newer)
                        published = newer[version]
                if version is not None and clients.all_hold(version):
                    delivered = True
                    break
                time.sleep(0.02)
            done_at = time.monotonic()
            cpu_after = ProcSample.read(pid).cpu_seconds
            at_publish = trace.at(published) if published is not None else None
            done.append(
                _Change(
                    version,
                    changed,
                    published,
                    done_at,
                    cpu_after - cpu_before,
                    at_publish - cpu_before if at_publish is not None else None,
                    delivered,
                )
            )
            log(
                f"  change {n + 1}/{changes}: v{version} published "
                + (f"{published - changed:.2f}s after the file change" if published is not None else "NEVER")
                + (f", every subscriber had it {done_at - changed:.2f}s after" if delivered else ", NOT delivered")
                + f"; controller CPU {cpu_after - cpu_before:.2f}s"
            )
            time.sleep(CHANGE_GAP)
    return done


def _analyse(changes: Sequence[_Change], outputs: Sequence[dict[str, Any]], subscribers: int) -> dict[str, Any]:
    """Per change: first/last arrival against the publish and the file change, bytes per subscriber."""
    arrivals: dict[int, list[tuple[float, int, bool]]] = {}
    for output in outputs:
        gzip = set(output.get("gzip", []))
        for stream, version, at, raw in output["events"]:
            arrivals.setdefault(version, []).append((at, raw, stream in gzip))
    rows: list[dict[str, Any]] = []
    for change in changes:
        got = arrivals.get(change.version, []) if change.version is not None else []
        times = [at for at, _, _ in got]
        plain = [raw for _, raw, gz in got if not gz]
        gzipped = [raw for _, raw, gz in got if gz]
        pub = change.published_at
        rows.append(
            {
                "version": change.version,
                "received": len(got),
                "change_to_publish_s": pub - change.changed_at if pub is not None else None,
                "publish_to_first_s": min(times) - pub if times and pub is not None else None,
                "publish_to_last_s": max(times) - pub if times and pub is not None else None,
                "change_to_last_s": max(times) - change.changed_at if times else None,
                "bytes_plain_mean": statistics.fmean(plain) if plain else None,
                "bytes_plain_max": max(plain, default=None),
                "bytes_gzip_mean": statistics.fmean(gzipped) if gzipped else None,
                "bytes_gzip_max": max(gzipped, default=None),
                "cpu_s": change.cpu_total,
                "cpu_reread_s": change.cpu_reread,
                "cpu_fanout_s": change.cpu_total - change.cpu_reread if change.cpu_reread is not None else None,
                "delivered_to_all": change.delivered and len(got) >= subscribers,
            }
        )

    def column(key: str) -> list[float]:
        return [float(r[key]) for r in rows if r[key] is not None]

    def dist(key: str) -> dict[str, float | None]:
        values = column(key)
        return {
            "p50": _percentile(values, 50),
            "p99": _percentile(values, 99),
            "max": max(values, default=None),
            "mean": statistics.fmean(values) if values else None,
        }

    return {
        "changes": rows,
        "change_to_publish_s": dist("change_to_publish_s"),
        "publish_to_first_s": dist("publish_to_first_s"),
        "publish_to_last_s": dist("publish_to_last_s"),
        "change_to_last_s": dist("change_to_last_s"),
        "bytes_plain": dist("bytes_plain_mean"),
        "bytes_plain_max": max(column("bytes_plain_max"), default=None),
        "bytes_gzip": dist("bytes_gzip_mean"),
        "bytes_gzip_max": max(column("bytes_gzip_max"), default=None),
        "cpu_s": dist("cpu_s"),
        "cpu_reread_s": dist("cpu_reread_s"),
        "cpu_fanout_s": dist("cpu_fanout_s"),
        "missed": sum(subscribers - int(r["received"]) for r in rows),
        "delivered_to_all": sum(1 for r in rows if r["delivered_to_all"]),
    }


def _fanout_phase(
    stack: Stack,
    controller: Candidate,
    texts: Sequence[str],
    *,
    feed: str,
    subscribers: int,
    processes: int,
    changes: int,
    first: int,
    log: Log,
) -> dict[str, Any]:
    position = _feed_position(controller.port or 0)
    since, instance = position["version"], position["instance"]
    if feed == "v2":
        path, gauge, gzip_every = f"/v2/routes?since={since}&instance={instance}", "feed_subscribers", 2
    else:
        path, gauge, gzip_every = f"/v1/routes?watch=1&since={since}&instance={instance}", "subscribers", 0
    rss_before = ProcSample.read(controller.pid or 0)
    started = time.monotonic()
    clients = _start_clients(stack, f"feed-{feed}", controller.port or 0, path, subscribers, processes,
                             gzip_every=gzip_every)  # fmt: skip
    connect_seconds = time.monotonic() - started
    seen = _gauge(controller, f"devstack_controller_{gauge}")
    log(
        f"  /{feed}: {clients.connected}/{subscribers} subscribers from v{since} in {connect_seconds:.1f}s "
        f"({processes} processes); the controller counts {seen:.0f}"
        + (" (the snapshot's closed stream too, until its next write)" if feed == "v2" else "")
    )
    rss_connected = ProcSample.read(controller.pid or 0)
    try:
        done = _run_changes(stack, controller, clients, texts, changes, first, log)
    finally:
        outputs = _stop_clients(stack, clients)
    rss_end = ProcSample.read(controller.pid or 0)
    result = _analyse(done, outputs, clients.connected)
    result.update(
        feed=feed,
        path=path.split("?", 1)[0],
        subscribers=subscribers,
        connected=clients.connected,
        connect_failures=sum(int(r["failures"]) for r in clients.ready),
        controller_counted=seen,
        client_processes=processes,
        gzip_subscribers=sum(len(o.get("gzip", [])) for o in outputs),
        position=position,
        rss_kib={"before": rss_before.rss_kib, "connected": rss_connected.rss_kib, "end": rss_end.rss_kib},
        hwm_kib=rss_end.hwm_kib,
    )
    return result


def feed_fanout(stack: Stack, *, log: Log) -> dict[str, Any]:
    """The 10k-service controller, /v2 with 1,000 subscribers, then /v1 with fewer; stops the controller."""
    texts = [
        configs.route_yaml_large(
            stack.upstreams,
            services=scale.LARGE_SERVICES,
            overrides_per_service=scale.LARGE_OVERRIDES // scale.LARGE_SERVICES,
            variant=variant,
        )
        for variant in (0, 1)
    ]
    log(f"  controller: {scale.LARGE_SERVICES} services ({len(texts[0]) / 1e6:.1f} MB YAML) on the proxy core")
    controller, ready = stack.start_controller("controller-10k", texts[0])
    info: dict[str, Any] = {
        "services": scale.LARGE_SERVICES,
        "overrides": scale.LARGE_OVERRIDES,
        "yaml_bytes": len(texts[0]),
        "seconds_to_ready": ready,
        "rss_kib_ready": ProcSample.read(controller.pid or 0).rss_kib,
    }
    log(f"  controller ready in {ready:.1f}s")
    try:
        info["v2"] = _fanout_phase(
            stack, controller, texts, feed="v2", subscribers=FEED_SUBSCRIBERS, processes=FEED_CLIENT_PROCESSES,
            changes=FEED_CHANGES, first=0, log=log,
        )  # fmt: skip
        info["v1"] = _fanout_phase(
            stack, controller, texts, feed="v1", subscribers=V1_SUBSCRIBERS, processes=1, changes=V1_CHANGES,
            first=FEED_CHANGES, log=log,
        )  # fmt: skip
    finally:
        if controller.proc is not None:
            stack.procs.stop(controller.proc)
    return info


def _fmt(value: float | None, scale_by: float = 1.0, digits: int = 2) -> str:
    return "–" if value is None else f"{value * scale_by:,.{digits}f}"


def fanout_markdown(info: dict[str, Any]) -> str:
    """The fan-out rows' table and the targets, for the scale report."""
    lines = [
        "| feed | subscribers | changes (all delivered) | file change → published p50 / p99 (s) | published → "
        "last subscriber p50 / p99 (s) | file change → last subscriber p50 / p99 (s) | bytes / subscriber / change "
        "plain · gzip | controller CPU s / change: re-read + fan-out | controller RSS MiB: ready · with subscribers |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key in ("v2", "v1"):
        row = info.get(key)
        if not row:
            continue
        rss = row["rss_kib"]
        lines.append(
            f"| `{row['path']}` | {row['connected']} | {len(row['changes'])} ({row['delivered_to_all']}) "
            f"| {_fmt(row['change_to_publish_s']['p50'])} / {_fmt(row['change_to_publish_s']['p99'])} "
            f"| {_fmt(row['publish_to_last_s']['p50'], digits=3)} / {_fmt(row['publish_to_last_s']['p99'], digits=3)} "
            f"| {_fmt(row['change_to_last_s']['p50'])} / {_fmt(row['change_to_last_s']['p99'])} "
            f"| {_fmt(row['bytes_plain']['mean'], digits=0)} · {_fmt(row['bytes_gzip']['mean'], digits=0)} "
            f"| {_fmt(row['cpu_reread_s']['mean'])} + {_fmt(row['cpu_fanout_s']['mean'], digits=3)} "
            f"| {rss['before'] / 1024:.0f} · {rss['connected'] / 1024:.0f} |"
        )
    v2 = info.get("v2") or {}
    p99 = (v2.get("publish_to_last_s") or {}).get("p99")
    worst_bytes = max((v for v in (v2.get("bytes_plain_max"), v2.get("bytes_gzip_max")) if v is not None), default=None)
    verdict = []
    if p99 is not None:
        verdict.append(
            f"published → 1,000th subscriber p99 {p99:.3f} s (target < {TARGET_FANOUT_P99_S:g} s: "
            + ("met" if p99 < TARGET_FANOUT_P99_S else "NOT met")
            + ")"
        )
    if worst_bytes is not None:
        verdict.append(
            f"largest delta received {worst_bytes:,.0f} bytes (target < {TARGET_BYTES:,} bytes per subscriber per "
            "change: " + ("met" if worst_bytes < TARGET_BYTES else "NOT met") + ")"
        )
    change_p99 = (v2.get("change_to_last_s") or {}).get("p99")
    if change_p99 is not None:
        verdict.append(
            f"from the file change it is {change_p99:.2f} s at p99 ("
            + ("within" if change_p99 < TARGET_FANOUT_P99_S else "over")
            + " 1 s): the file source re-reads and rebuilds the whole 5 MB file on every change"
        )
    return "\n".join(lines) + "\n\n" + ("Targets (/v2): " + "; ".join(verdict) + ".\n" if verdict else "")


# --- a router following a controller under load -----------------------------------------------------


def churn_yaml(upstreams: Upstreams, generation: int) -> str:
    """The one-service table plus ``churn``, whose one override is named after ``generation``:
    every generation is a different table (one service changed) and routes ``bench`` alike."""
    return (
        configs.route_yaml(upstreams)
        + f"""  churn:
    hosts: [churn]
    baseline: http://127.0.0.1:{upstreams.baseline}
    overrides:
      gen{generation}: {{url: http://127.0.0.1:{upstreams.bob}}}
"""
    )


def _converged(router: Candidate, controller: Candidate, limit: float = 10.0) -> float | None:
    """Seconds until the router's table routes as the controller's current one does; None if not within ``limit``."""
    started = time.monotonic()
    want = controller.admin_json("/v1/routes")["services"]
    while time.monotonic() - started < limit:
        if router.admin_json("/routes")["services"] == want:
            return time.monotonic() - started
        time.sleep(0.05)
    return None


def router_under_changes(
    stack: Stack, *, duration: float, warmup: float, log: Log
) -> tuple[list[Cell], dict[str, Any]]:
    """c50 alice (bodies checked) through a router following a controller, with and without a
    one-service change every 100 ms, interleaved ``ROUTER_REPS`` times."""
    controller, _ = stack.start_controller("controller-churn", churn_yaml(stack.upstreams, 0), cpu=LOAD_CPU)
    router, took = stack.start_router("router-feed", routes_from=f"http://127.0.0.1:{controller.port}")
    if _converged(router, controller) is None:
        raise StartError("the router following the controller never got its table")
    check_proxy(router.name, router.port or 0, upload=False)
    log(f"  router following the controller ready in {took:.1f}s")
    cells: list[Cell] = []
    runs: list[dict[str, Any]] = []
    for rep in range(ROUTER_REPS):
        for changing in (False, True):
            label = "a service changes every 100 ms" if changing else "no changes"
            controller_before = scale.settled_version(controller)
            router_before = scale.settled_version(router)
            if changing and stack.quiet is not None:
                stack.quiet.wait()
            base = (rep + 1) * 100_000

            def render(n: int, base: int = base) -> str:
                return churn_yaml(stack.upstreams, base + n)

            swapper = scale.Swapper(stack, controller, CHURN_INTERVAL, render) if changing else None
            with swapper if swapper is not None else contextlib.nullcontext():
                cell = measure(
                    stack, router, GET_ALICE, rep=rep, duration=duration, warmup=warmup, script="check-alice",
                    label=label, quiet=_NO_WAIT if changing else None,
                )  # fmt: skip
            cells.append(cell)
            run: dict[str, Any] = {"rep": rep, "label": label, "p99_us": cell.detail["latency_us"].get("99")}
            if swapper is not None:
                caught_up = _converged(router, controller)
                last = controller.admin_json("/v1/routes")["services"]["churn"]["overrides"]
                run.update(
                    files_written=swapper.sent,
                    controller_versions=scale.settled_version(controller) - controller_before,
                    router_versions=scale.settled_version(router) - router_before,
                    controller_has_last=f"gen{base + swapper.sent}" in last,
                    router_caught_up_s=caught_up,
                )
            runs.append(run)
            log(
                f"  rep {rep + 1} {label}: {cell.value:,.0f} req/s, p99 {(run['p99_us'] or 0) / 1000:.2f} ms, "
                f"{cell.errors} errors"
                + (
                    f"; {run['files_written']} files written, controller published {run['controller_versions']}, "
                    f"router applied {run['router_versions']}, caught up: {run['router_caught_up_s']}"
                    if changing
                    else ""
                )
            )
    readyz = router.admin_json("/readyz")
    for proc in (router.proc, controller.proc):
        if proc is not None:
            stack.procs.stop(proc)

    def median_p99(label: str) -> float | None:
        values = [r["p99_us"] for r in runs if r["label"] == label and r["p99_us"] is not None]
        return statistics.median(values) if values else None

    quiet_p99, busy_p99 = median_p99("no changes"), median_p99("a service changes every 100 ms")
    ratio = busy_p99 / quiet_p99 if quiet_p99 and busy_p99 is not None else None
    changing_runs = [r for r in runs if "files_written" in r]
    return cells, {
        "interval_s": CHURN_INTERVAL,
        "runs": runs,
        "p99_us": {"no changes": quiet_p99, "changes": busy_p99},
        "p99_ratio": ratio,
        "target_ratio": TARGET_P99_RATIO,
        "all_applied": all(r["router_caught_up_s"] is not None and r["controller_has_last"] for r in changing_runs),
        "errors": sum(c.errors for c in cells),
        "readyz_after": readyz,
    }


# --- scoped sidecars ------------------------------------------------------------------------------

SCOPED_SERVICES: Final = (configs.SERVICE, "svc00001", "svc00002")
"""The three services a scoped sidecar's app calls, of the large table's 10,000."""


def _feed_bytes(pid: int, port: int) -> int:
    """Bytes ``pid`` has received on its open connections to ``port`` (the kernel's tcp_info, by ``ss``)."""
    out = subprocess.run(
        ["ss", "-Htinp", f"( dport = :{port} )"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    total = 0
    mine = False
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            mine = f"pid={pid}," in line
        elif mine and (found := re.search(r"bytes_received:(\d+)", line)):
            total += int(found.group(1))
    return total


def _first_use(port: int, host: str) -> tuple[int, float]:
    """One request through a sidecar (absolute form, as ``HTTP_PROXY`` makes clients send it)."""
    started = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", f"http://{host}/", headers={"Host": host, "baggage": "devstack=alice"})
        response = conn.getresponse()
        response.read()
        return response.status, time.monotonic() - started
    finally:
        conn.close()


def scoped_sidecars(stack: Stack, *, log: Log) -> dict[str, Any]:
    """Sidecars following the 10k-service controller: every service, ``--services`` three of them,
    and ``--learn-services`` after requests for three; their RSS, table size and feed bytes."""
    text = configs.route_yaml_large(
        stack.upstreams,
        services=scale.LARGE_SERVICES,
        overrides_per_service=scale.LARGE_OVERRIDES // scale.LARGE_SERVICES,
    )
    controller, ready = stack.start_controller("controller-scoped", text)
    url = f"http://127.0.0.1:{controller.port}"
    log(f"  controller with {scale.LARGE_SERVICES} services ready in {ready:.1f}s")
    sidecar = ["--mode", "sidecar"]
    variants: dict[str, list[str]] = {
        "every service": sidecar,
        f"--services ({len(SCOPED_SERVICES)})": [*sidecar, "--services", ",".join(SCOPED_SERVICES)],
        "--learn-services": [*sidecar, "--learn-services"],
    }
    rows: dict[str, dict[str, Any]] = {}
    try:
        for label, extra in variants.items():
            name = "sidecar-" + re.sub(r"[^a-z]+", "-", label).strip("-")
            router, took = stack.start_router(name, routes_from=url, extra=extra, ready_within=180)
            row: dict[str, Any] = {"seconds_to_ready": took}
            if "--learn-services" in extra:
                row["first_use"] = [_first_use(router.port or 0, host) for host in SCOPED_SERVICES]
                row["again"] = [_first_use(router.port or 0, host) for host in SCOPED_SERVICES]
            time.sleep(1.0)  # settle: the feed's lines applied, allocator quiet (a reading, not a condition)
            sample = ProcSample.read(router.pid or 0)
            row.update(
                services=len(router.admin_json("/routes")["services"]),
                rss_kib=sample.rss_kib,
                hwm_kib=sample.hwm_kib,
                feed_bytes=_feed_bytes(router.pid or 0, controller.port or 0),
            )
            rows[label] = row
            log(
                f"  {label}: {row['services']} services held, RSS {row['rss_kib'] / 1024:.1f} MiB "
                f"(peak {row['hwm_kib'] / 1024:.1f}), {row['feed_bytes']:,} feed bytes on its connection, "
                f"ready in {took:.1f}s"
                + (
                    "; first requests "
                    + ", ".join(f"{status} in {seconds * 1000:.0f} ms" for status, seconds in row["first_use"])
                    + ", again "
                    + ", ".join(f"{status} in {seconds * 1000:.1f} ms" for status, seconds in row["again"])
                    if "first_use" in row
                    else ""
                )
            )
            if router.proc is not None:
                stack.procs.stop(router.proc)
    finally:
        if controller.proc is not None:
            stack.procs.stop(controller.proc)
    return {"services": scale.LARGE_SERVICES, "rows": rows}


def scoped_markdown(info: dict[str, Any]) -> str:
    lines = [
        "| sidecar following the controller | services held | RSS MiB (peak) | feed bytes received | ready s |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, row in info["rows"].items():
        lines.append(
            f"| {label} | {row['services']:,} | {row['rss_kib'] / 1024:.1f} ({row['hwm_kib'] / 1024:.1f}) "
            f"| {row['feed_bytes']:,} | {row['seconds_to_ready']:.1f} |"
        )
    return "\n".join(lines) + "\n"

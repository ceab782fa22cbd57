"""The stack under test: upstream nginx on core 0, candidate proxies on core 1, one timed cell.

``Stack`` writes each process's configuration into the run's temporary directory, starts it
through ``Processes`` (so it is always stopped) and waits until it answers. ``measure`` times one
(candidate, scenario) cell: a warm-up, then wrk (HTTP/1.1) or h2load (gRPC over h2c) with the
proxy's /proc counters read on both sides. Candidates are started once per run and stay up,
idle, while others are timed. The gRPC rows have their own upstream nginx (h2c, core 0) and
their own candidates, started when a gRPC scenario is planned.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from benchmarks import configs
from benchmarks.configs import SERVICE, Upstreams
from benchmarks.h2load import H2loadResult, run_h2load
from benchmarks.processes import Background, Processes, ProcSample, busy_cores, free_ports, wait_http, wait_port
from benchmarks.report import MIBS, P50, REQS, STREAMS, Cell
from benchmarks.scenarios import GRPC, Scenario
from benchmarks.wrk import WrkResult, run_wrk

__all__ = ["LOAD_CPU", "PROXY_CPU", "Candidate", "Quiet", "Stack", "measure", "router_command"]

LOAD_CPU: Final = 0
"""wrk, the upstream nginx, and this harness."""
PROXY_CPU: Final = 1
"""The proxy under test, alone."""
_MIB: Final = 1024 * 1024


@dataclasses.dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    port: int | None
    """The proxy's listener; None for ``direct`` (each scenario then targets its upstream)."""
    proc: subprocess.Popen[bytes] | None = None
    admin_port: int | None = None
    routes_path: Path | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def url(self, scenario: Scenario, upstreams: Upstreams) -> str:
        port = self.port if self.port is not None else upstreams.port_for(scenario.key)
        return f"http://127.0.0.1:{port}{scenario.path}"

    def admin_json(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as resp:
            return json.loads(resp.read())

    def admin_text(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=10) as resp:
            text: str = resp.read().decode()
            return text


def router_command() -> list[str]:
    """The venv's ``devstack`` console script next to this interpreter, else ``python -m devstack``."""
    script = Path(sys.executable).with_name("devstack")
    return [str(script)] if script.exists() else [sys.executable, "-m", "devstack"]


class Stack:
    def __init__(self, procs: Processes, workdir: Path, *, echo_module: str | None) -> None:
        self.procs = procs
        self.workdir = workdir
        self.echo_module = echo_module
        baseline, alice, bob, grpc_baseline, grpc_alice, grpc_bob = free_ports(6)
        self.upstreams = Upstreams(baseline, alice, bob)
        self.grpc_upstreams = Upstreams(grpc_baseline, grpc_alice, grpc_bob)
        """The h2c upstream's ports (gRPC rows), served by a second nginx once started."""
        self._scripts: dict[str, str] = {}
        self.quiet: Quiet | None = None
        """Applied before every measured cell unless a cell passes its own."""

    @property
    def can_upload(self) -> bool:
        return self.echo_module is not None

    def _write(self, name: str, text: str) -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def upstreams_for(self, scenario: Scenario) -> Upstreams:
        return self.grpc_upstreams if scenario.protocol == GRPC else self.upstreams

    @functools.cached_property
    def grpc_request(self) -> Path:
        """The body h2load posts with every call (one length-prefixed message), written on first use."""
        path = self.workdir / "grpc-request.bin"
        path.write_bytes(configs.GRPC_REQUEST)
        return path

    def script(self, name: str) -> str:
        """Path of a wrk Lua script by scenario script name, written on first use."""
        if name not in self._scripts:
            if name == "upload":
                text = configs.upload_lua()
            elif name.startswith("check-"):
                text = configs.body_check_lua(name.removeprefix("check-"))
            else:
                raise ValueError(f"unknown wrk script {name!r}")
            self._scripts[name] = str(self._write(f"{name}.lua", text))
        return self._scripts[name]

    def start_upstream(self) -> None:
        docroot = self.workdir / "www"
        docroot.mkdir()
        (docroot / "1m.bin").write_bytes(os.urandom(configs.BODY_FILE_BYTES))
        conf = self._write(
            "upstream.conf",
            configs.nginx_upstream_conf(str(self.workdir), self.upstreams, str(docroot), echo_module=self.echo_module),
        )
        proc = self._nginx("upstream", conf, cpu=LOAD_CPU)
        for port in self.upstreams.by_name().values():
            wait_port(port, 10, proc, self.procs.log_path("upstream"))

    def start_grpc_upstream(self) -> None:
        """The h2c upstream of the gRPC rows: one nginx worker on core 0 (needs the echo module)."""
        if self.echo_module is None:
            raise ValueError("the gRPC upstream needs nginx's echo module")
        conf = self._write(
            "grpc-upstream.conf",
            configs.nginx_grpc_upstream_conf(str(self.workdir), self.grpc_upstreams, echo_module=self.echo_module),
        )
        proc = self._nginx("grpc-upstream", conf, cpu=LOAD_CPU)
        for port in self.grpc_upstreams.by_name().values():
            wait_port(port, 10, proc, self.procs.log_path("grpc-upstream"))

    def _nginx(self, name: str, conf: Path, *, cpu: int) -> subprocess.Popen[bytes]:
        argv = ["nginx", "-p", str(self.workdir), "-e", str(self.workdir / f"{name}-error.log"), "-c", str(conf)]
        return self.procs.start(name, argv, cpu=cpu)

    def direct(self) -> Candidate:
        return Candidate("direct", None)

    def start_nginx(self) -> Candidate:
        (port,) = free_ports(1)
        conf = self._write("nginx-proxy.conf", configs.nginx_proxy_conf(str(self.workdir), port, self.upstreams))
        proc = self._nginx("nginx-proxy", conf, cpu=PROXY_CPU)
        wait_port(port, 10, proc, self.procs.log_path("nginx-proxy"))
        return Candidate("nginx", port, proc)

    def start_nginx_grpc(self) -> Candidate:
        """nginx with an h2c listener and ``grpc_pass`` (files and logs named ``nginx-grpc``)."""
        (port,) = free_ports(1)
        conf = self._write(
            "nginx-grpc.conf", configs.nginx_grpc_proxy_conf(str(self.workdir), port, self.grpc_upstreams)
        )
        proc = self._nginx("nginx-grpc", conf, cpu=PROXY_CPU)
        wait_port(port, 10, proc, self.procs.log_path("nginx-grpc"))
        return Candidate("nginx", port, proc)

    def start_haproxy(self, *, grpc: bool = False) -> Candidate:
        """haproxy; ``grpc``: h2 on both sides to the gRPC upstream (files and logs ``haproxy-grpc``)."""
        (port,) = free_ports(1)
        name = "haproxy-grpc" if grpc else "haproxy"
        upstreams = self.grpc_upstreams if grpc else self.upstreams
        cfg = self._write(f"{name}.cfg", configs.haproxy_proxy_cfg(port, upstreams, h2=grpc))
        proc = self.procs.start(name, ["haproxy", "-db", "-f", str(cfg)], cpu=PROXY_CPU)
        wait_port(port, 10, proc, self.procs.log_path(name))
        return Candidate("haproxy", port, proc)

    def start_router_grpc(self, *, ready_within: float = 60) -> tuple[Candidate, float]:
        """The router with the gRPC upstream's route file (``protocol: h2c``), named ``router``
        in results; its files and logs are ``router-grpc``."""
        routes = configs.route_yaml(self.grpc_upstreams, protocol="h2c")
        router, took = self.start_router("router-grpc", routes, ready_within=ready_within)
        return dataclasses.replace(router, name="router"), took

    def start_router(
        self,
        name: str = "router",
        routes: str | None = None,
        *,
        extra: Sequence[str] = (),
        ready_within: float = 60,
        launcher: Sequence[str] | None = None,
        routes_from: str | None = None,
    ) -> tuple[Candidate, float]:
        """Start the devstack router on the proxy core; returns it and the seconds until ready.
        ``launcher`` (e.g. ``env PYTHONPATH=...``) runs ``python -m devstack`` under it instead
        of this checkout's command. ``routes_from`` (a controller's URL) makes it follow that
        controller's feed (``--routes-from``) instead of a route file."""
        port, admin = free_ports(2)
        path: Path | None = None
        if routes_from is None:
            text = routes if routes is not None else configs.route_yaml(self.upstreams)
            path = self._write(f"{name}-routes.yaml", text)
        argv = [
            *(router_command() if launcher is None else [*launcher, sys.executable, "-m", "devstack"]),
            "router", *(["--routes", str(path)] if routes_from is None else ["--routes-from", routes_from]),
            # Like the nginx and haproxy configs, no access log: what is measured is proxying. (An
            # older checkout given with --against has no such flag, and no access log either.)
            *(["--access-log", "off"] if launcher is None else []),
            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--log-level", "WARNING", *extra,
        ]  # fmt: skip
        proc = self.procs.start(name, argv, cpu=PROXY_CPU)
        took = wait_http(f"http://127.0.0.1:{admin}/readyz", ready_within, proc, self.procs.log_path(name))
        wait_port(port, 10, proc, self.procs.log_path(name))
        return Candidate(name, port, proc, admin, path), took

    def start_controller(
        self, name: str, routes: str, *, cpu: int = PROXY_CPU, ready_within: float = 120
    ) -> tuple[Candidate, float]:
        """``devstack controller --routes FILE`` (logging at INFO: its "route table vN published"
        lines time each publish); returns it and the seconds until ready. Its listener serves the
        feeds and its health endpoints alike, so the candidate's ``port`` and ``admin_port`` are one."""
        (port,) = free_ports(1)
        path = self._write(f"{name}-routes.yaml", routes)
        argv = [
            *router_command(), "controller", "--routes", str(path),
            "--listen", f"127.0.0.1:{port}", "--log-level", "INFO",
        ]  # fmt: skip
        proc = self.procs.start(name, argv, cpu=cpu)
        took = wait_http(f"http://127.0.0.1:{port}/readyz", ready_within, proc, self.procs.log_path(name))
        return Candidate(name, port, proc, port, path), took


@dataclasses.dataclass(frozen=True, slots=True)
class Quiet:
    """Before a cell, wait (bounded) until other processes use less than ``threshold`` cores.

    The host is shared: a test suite started by someone else during a cell costs a candidate a
    quarter of its throughput. Waiting for a quiet moment, and recording the load that remained
    (``Cell.background_cores``), keeps such cells rare and visible.
    """

    threshold: float = 0.2
    max_wait: float = 30.0

    def wait(self) -> float:
        started = time.monotonic()
        while time.monotonic() - started < self.max_wait and busy_cores(0.5) > self.threshold:
            pass
        return time.monotonic() - started


def _load(
    stack: Stack, candidate: Candidate, scenario: Scenario, *, host: str, script: str | None
) -> Callable[..., WrkResult | H2loadResult]:
    """The scenario's load generator aimed at ``candidate``, waiting only for ``duration=``."""
    url = candidate.url(scenario, stack.upstreams_for(scenario))
    if scenario.protocol == GRPC:
        return functools.partial(
            run_h2load,
            url,
            connections=scenario.connections,
            streams_per_connection=scenario.streams_per_connection,
            headers=scenario.headers(host),
            data=stack.grpc_request,
            timeout=scenario.timeout,
            cpu=LOAD_CPU,
        )
    script_name = script or scenario.script
    return functools.partial(
        run_wrk,
        url,
        connections=scenario.connections,
        headers=scenario.headers(host),
        script=stack.script(script_name) if script_name else None,
        timeout=scenario.timeout,
        cpu=LOAD_CPU,
    )


def _value(scenario: Scenario, requests: int, seconds: float, rps: float, latency: dict[str, float]) -> float:
    if scenario.metric is REQS or scenario.metric is STREAMS:
        return rps
    if scenario.metric is P50:
        return latency.get("50", float("nan"))
    if scenario.metric is MIBS:
        return requests * scenario.bytes_per_request / seconds / _MIB
    raise ValueError(f"unknown metric {scenario.metric}")


def measure(
    stack: Stack,
    candidate: Candidate,
    scenario: Scenario,
    *,
    rep: int,
    duration: float,
    warmup: float,
    host: str = SERVICE,
    script: str | None = None,
    label: str | None = None,
    quiet: Quiet | None = None,
    on_timed_start: Callable[[], None] | None = None,
    process_tree: bool = False,
) -> Cell:
    """Wait for a quiet host, warm up, then one timed load run (wrk, or h2load for gRPC), the
    proxy's /proc read around it."""
    load = _load(stack, candidate, scenario, host=host, script=script)
    quiet = quiet or stack.quiet
    waited = quiet.wait() if quiet is not None else 0.0
    if warmup > 0:
        load(duration=warmup)
    pid = candidate.pid
    sample = ProcSample.read_tree if process_tree else ProcSample.read  # the tree: a --workers router
    before = sample(pid) if pid else None
    background = Background()
    background.start()
    started = time.monotonic()
    if on_timed_start is not None:
        on_timed_start()
    result = load(duration=duration)
    wall = time.monotonic() - started
    other = background.stop()
    after = sample(pid) if pid else None
    stack.procs.check_alive()
    cpu_us = util = None
    if before is not None and after is not None:
        spent = after.cpu_seconds - before.cpu_seconds
        cpu_us = spent / result.requests * 1e6 if result.requests else None
        util = spent / wall
    value = _value(scenario, result.requests, result.seconds, result.requests_per_second, result.latency_us)
    return Cell(
        rep=rep,
        scenario=scenario.name,
        candidate=label or candidate.name,
        value=value,
        requests=result.requests,
        seconds=result.seconds,
        requests_per_second=result.requests_per_second,
        errors=result.errors,
        cpu_us_per_request=cpu_us,
        cpu_utilisation=util,
        rss_kib=after.rss_kib if after else None,
        background_cores=other,
        detail={
            "waited_for_quiet_s": waited,
            "latency_us": result.latency_us,
            **result.error_detail(),
            "rss_hwm_kib": after.hwm_kib if after else None,
        },
    )

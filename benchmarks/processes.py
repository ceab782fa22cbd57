"""Child processes of a benchmark run: tools check, start pinned, watch via /proc, always stop.

``Processes`` owns every process it starts in its own process group and kills the groups on
exit, whatever happened; waits are bounded by deadlines. ``ProcSample`` reads CPU time and
memory of one process from /proc. This module never decides what to measure.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Final

__all__ = [
    "INSTALL_HINT",
    "Background",
    "busy_cores",
    "ProcSample",
    "Processes",
    "StartError",
    "free_ports",
    "missing_tools",
    "raise_fd_limit",
    "wait_http",
    "wait_port",
]

INSTALL_HINT: Final = "apt-get install wrk nginx-light libnginx-mod-http-echo haproxy nghttp2-client util-linux"
_CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A process exited or never became ready; the message carries its log's tail."""


def missing_tools(tools: Sequence[str]) -> list[str]:
    return [tool for tool in tools if shutil.which(tool) is None]


def raise_fd_limit(wanted: int) -> int:
    """Raise the soft RLIMIT_NOFILE towards ``wanted`` (children inherit it); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (bound together, then released: good enough on one host)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


@dataclasses.dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds (user + system, all threads) and memory of one process at one instant."""

    cpu_seconds: float
    rss_kib: int
    hwm_kib: int

    @classmethod
    def read(cls, pid: int) -> ProcSample:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[0] is field 3 (state): utime is field 14, stime field 15.
        cpu = (int(fields[11]) + int(fields[12])) / _CLK_TCK
        rss = hwm = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
        return cls(cpu, rss, hwm)

    @classmethod
    def read_tree(cls, pid: int) -> ProcSample:
        """The process and all its descendants, added up (a ``--workers`` router's parent and workers)."""
        total = cls.read(pid)
        for child in _children(pid):
            sample = cls.read_tree(child)
            total = cls(total.cpu_seconds + sample.cpu_seconds, total.rss_kib + sample.rss_kib,
                        total.hwm_kib + sample.hwm_kib)  # fmt: skip
        return total


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            children += [int(child) for child in (task / "children").read_text().split()]
    return children


def busy_cores(seconds: float) -> float:
    """Cores' worth of non-idle CPU on the whole host over ``seconds`` (from /proc/stat)."""

    def snap() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields[:8]) - idle, idle

    busy0, idle0 = snap()
    time.sleep(seconds)
    busy1, idle1 = snap()
    total = (busy1 - busy0) + (idle1 - idle0)
    return (os.cpu_count() or 1) * (busy1 - busy0) / total if total else 0.0


class Background:
    """CPU used by processes outside this harness's tree (other users of the host) over a window.

    Reads every /proc/PID/stat at ``start`` and ``stop``; kernel threads are left out because
    loopback softirq work of our own traffic lands there. Processes that both start and exit
    inside the window are missed, so this is a lower bound, good enough to flag a noisy cell.
    """

    def __init__(self) -> None:
        self._start: dict[int, float] = {}
        self._started_at = 0.0

    @staticmethod
    def _snapshot() -> dict[int, tuple[int, float]]:
        out: dict[int, tuple[int, float]] = {}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            ppid = int(fields[1])
            if ppid == 2 or entry.name == "2":
                continue
            out[int(entry.name)] = (ppid, (int(fields[11]) + int(fields[12])) / _CLK_TCK)
        return out

    @staticmethod
    def _foreign(snapshot: dict[int, tuple[int, float]]) -> dict[int, float]:
        ours = {os.getpid()}
        changed = True
        while changed:
            changed = False
            for pid, (ppid, _) in snapshot.items():
                if ppid in ours and pid not in ours:
                    ours.add(pid)
                    changed = True
        return {pid: cpu for pid, (_, cpu) in snapshot.items() if pid not in ours}

    def start(self) -> None:
        self._start = self._foreign(self._snapshot())
        self._started_at = time.monotonic()

    def stop(self) -> float:
        """Cores' worth of foreign CPU since ``start``."""
        end = self._foreign(self._snapshot())
        spent = sum(cpu - self._start.get(pid, 0.0) for pid, cpu in end.items() if cpu >= self._start.get(pid, 0.0))
        return spent / max(1e-6, time.monotonic() - self._started_at)


def wait_port(port: int, deadline: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise StartError(f"exited with {proc.returncode} before listening on {port}{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise StartError(f"nothing listening on 127.0.0.1:{port} after {deadline:.0f}s{_tail(log)}")


def wait_http(url: str, deadline: float, proc: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> float:
    """Poll ``url`` until it answers 200; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < deadline:
        if proc is not None and proc.poll() is not None:
            raise StartError(f"exited with {proc.returncode} before {url} answered{_tail(log)}")
        with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as resp:
            if resp.status == 200:
                return time.monotonic() - start
        time.sleep(0.1)
    raise StartError(f"{url} not ready after {deadline:.0f}s{_tail(log)}")


def _tail(log: Path | None, lines: int = 15) -> str:
    if log is None or not log.exists():
        return ""
    text = log.read_text(errors="replace").splitlines()[-lines:]
    return "\n  " + "\n  ".join(text) if text else ""


class Processes:
    """Every process of one run, each started in its own process group and pinned to a core."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stop_all()

    def log_path(self, name: str) -> Path:
        return self.logdir / f"{name}.log"

    def start(self, name: str, argv: Sequence[str], *, cpu: int | None) -> subprocess.Popen[bytes]:
        """Start ``argv`` (pinned to ``cpu`` via taskset, which execs: the pid is the tool's)."""
        full = ["taskset", "-c", str(cpu), *argv] if cpu is not None else list(argv)
        with self.log_path(name).open("ab") as log:
            proc = subprocess.Popen(
                full, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
            )
        self._procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        # Anything the process left in its group goes too (it was the group's leader).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        self._procs = [(n, p) for n, p in self._procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self._procs)):
            self.stop(proc)

    def check_alive(self) -> None:
        dead = [f"{name} (exit {proc.returncode})" for name, proc in self._procs if proc.poll() is not None]
        if dead:
            raise StartError("died during the run: " + ", ".join(dead) + _tail(self.log_path(self._name_of(dead[0]))))

    def _name_of(self, label: str) -> str:
        return label.split(" ", 1)[0]

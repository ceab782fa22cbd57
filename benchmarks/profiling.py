"""Where the router spends its CPU under load: py-spy samples folded into per-function totals.

``record`` attaches py-spy to a running router (it must be installed: ``pip install py-spy``,
a developer tool, not a project dependency) while the caller drives load; ``fold`` turns
py-spy's collapsed stacks into self and inclusive sample counts per function. Pure except
``record``, which only runs py-spy.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Final

__all__ = ["FunctionCost", "Profile", "fold", "py_spy", "record"]

_IDLE_LEAF: Final = re.compile(r"^_worker \((?:.*/)?concurrent/futures/thread\.py")
"""An executor thread waiting for work (``asyncio.to_thread``) is not CPU, whatever py-spy thinks."""
_FRAME: Final = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclasses.dataclass(frozen=True, slots=True)
class FunctionCost:
    function: str
    """``name (path:first line)``, path shortened to the project or library root."""
    self_samples: int
    total_samples: int


@dataclasses.dataclass(frozen=True, slots=True)
class Profile:
    samples: int
    functions: list[FunctionCost]

    def top(self, count: int, *, prefix: str = "", by: str = "self") -> list[FunctionCost]:
        chosen = [f for f in self.functions if f.function.split(" (", 1)[-1].startswith(prefix)]
        key = (lambda f: f.self_samples) if by == "self" else (lambda f: f.total_samples)
        return sorted(chosen, key=key, reverse=True)[:count]


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


def record(pid: int, seconds: float, output: Path, *, rate: int = 250, cpu: int = 0) -> None:
    """Sample ``pid`` for ``seconds`` into collapsed stacks (``--function``: one line per function).

    ``--nonblocking``: pausing the router for every sample (py-spy's default) halved its
    throughput here and over-weighted frames that make syscalls; unpaused sampling can tear a
    stack now and then, which blurs inclusive figures a little but leaves the innermost frame,
    the one "self" counts, reliable.
    """
    tool = py_spy()
    if tool is None:
        raise RuntimeError("py-spy not installed: .venv/bin/pip install py-spy")
    argv = [
        "taskset", "-c", str(cpu), tool, "record", "--pid", str(pid), "--duration", str(round(seconds)),
        "--rate", str(rate), "--function", "--format", "raw", "--output", str(output), "--nonblocking",
    ]  # fmt: skip
    subprocess.run(argv, check=True, capture_output=True, timeout=seconds + 60)


def _short(frame: str) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    path = m["file"]
    for marker in ("/site-packages/", "/lib/python3."):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3.":
                path = "stdlib/" + path.split("/", 1)[-1]
            break
    else:
        for root in ("router/", "controller/", "propagation/"):
            at = path.find("/" + root)
            if at >= 0:
                path = path[at + 1 :]
                break
    line = f":{m['line']}" if m["line"] else ""
    return f"{m['func']} ({path}{line})"


def fold(lines: Iterable[str]) -> Profile:
    """Collapsed stacks (``frame;frame;... count``, outermost first) → per-function costs."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    samples = 0
    for raw in lines:
        raw = raw.rstrip("\n")
        stack, _, count_text = raw.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _short(frame) for frame in stack.split(";") if frame and not frame.startswith(("process ", "thread "))
        ]
        if not frames or _IDLE_LEAF.match(frames[-1]):
            continue
        samples += count
        self_counts[frames[-1]] += count
        for function in set(frames):
            total_counts[function] += count
    functions = [FunctionCost(name, self_counts.get(name, 0), total) for name, total in total_counts.items()]
    return Profile(samples, functions)

"""Running the real ``devstack`` command in a subprocess, and reading what it told the user.

The command is ``sys.executable -m devstack`` with this checkout first on the path, exactly what a
user runs; nothing is imported or patched in-process. ``user_error`` picks the one line addressed
to the user (``devstack: ...`` or ``devstack <command>: ...``) out of stderr, which may also hold
log lines and interpreter warnings (a stale compiled build warns on import).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK_ANY = "127.0.0.1:0"


def devstack_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), **(extra or {})}


def run_devstack(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``devstack ARGS`` to completion (a command that should fail must not hang the suite)."""
    return subprocess.run(
        [sys.executable, "-m", "devstack", *args],
        capture_output=True,
        text=True,
        env=devstack_env(env),
        timeout=timeout,
        check=False,
    )


def user_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single line stderr addresses to the user; fails if there is none, several, or a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("devstack")]
    assert len(lines) == 1, result.stderr
    return lines[0]


@contextmanager
def occupied_port() -> Iterator[int]:
    """A loopback port held by a listening socket, so binding it fails with EADDRINUSE."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])

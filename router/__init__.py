"""devstack router: the baggage-routed HTTP/1.1 proxy (hot path, admin listener, CLI).

This file also decides, once per process, whether the hot path runs compiled. ``setup.py``
may compile the hot-path modules with mypyc, build the hand-written C helpers beside them, and
record the hashes of the sources it built; extensions whose sources have changed since (an
edited checkout) or ``DEVSTACK_INTERPRETED=1`` make the package import those modules from
source and leave the C helpers unused, so a stale build never runs.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

__version__ = "0.1.0"

HOT_PATH_MODULES: tuple[str, ...] = ("http", "keys", "proxy", "settings", "stats", "table", "upstream")
"""Modules setup.py compiles; keep the two lists equal."""
NATIVE_HELPERS: tuple[str, ...] = ("_speedups",)
"""Hand-written C extensions (``router/<name>.c``) that setup.py builds with the hot path. Each
function in them has a Python original that defines its behaviour; they are used only when the
hot path runs compiled, so the interpreted router is pure Python."""

_HERE = Path(__file__).resolve().parent


class _SourceFirst(importlib.abc.MetaPathFinder):
    """Imports the hot-path modules from their .py files even where extensions sit beside them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in HOT_PATH_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _HERE / f"{name}.py")


def _source(name: str) -> Path:
    return _HERE / (f"{name}.c" if name in NATIVE_HELPERS else f"{name}.py")


def _digest(name: str) -> str | None:
    try:
        return hashlib.sha256(_source(name).read_bytes()).hexdigest()
    except OSError:
        return None  # a source missing from an install: its build cannot be vouched for


def _compiled_state() -> tuple[bool, str]:
    """(compiled extensions usable, why not): read once at import."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    built = HOT_PATH_MODULES + NATIVE_HELPERS
    present = [name for name in built if (_HERE / f"{name}{suffix}").exists()]
    if not present:
        return False, "not compiled"
    if os.environ.get("DEVSTACK_INTERPRETED") == "1":
        return False, "DEVSTACK_INTERPRETED=1"
    try:
        recorded = json.loads((_HERE / "_compiled.json").read_text())
    except (OSError, ValueError):
        return False, "no build manifest"
    stale = [name for name in built if name not in present or recorded.get(name) != _digest(name)]
    if stale:
        changed = ", ".join(_source(name).name for name in stale)
        warnings.warn(
            f"devstack: compiled router modules are stale ({changed} changed since the build); "
            "running them interpreted. Rebuild with `make compile`.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False, "stale build"
    return True, "compiled"


COMPILED, HOT_PATH_MODE = _compiled_state()
"""Whether the hot path runs as mypyc extensions, and a word on why (for logs and benchmarks)."""

if not COMPILED and HOT_PATH_MODE != "not compiled":
    sys.meta_path.insert(0, _SourceFirst())

"""devstack router: the baggage-routed HTTP/1.1 proxy (hot path, admin listener, CLI).

This file also decides, once per process, whether the hot path runs compiled. ``setup.py``
may compile the hot-path modules with mypyc and records the hashes of the sources it compiled;
extensions whose sources have changed since (an edited checkout) or ``DEVSTACK_INTERPRETED=1``
make the package import those modules from source instead, so a stale build never runs.
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


def _compiled_state() -> tuple[bool, str]:
    """(compiled extensions usable, why not): read once at import."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    present = [name for name in HOT_PATH_MODULES if (_HERE / f"{name}{suffix}").exists()]
    if not present:
        return False, "not compiled"
    if os.environ.get("DEVSTACK_INTERPRETED") == "1":
        return False, "DEVSTACK_INTERPRETED=1"
    try:
        recorded = json.loads((_HERE / "_compiled.json").read_text())
    except (OSError, ValueError):
        return False, "no build manifest"
    stale = [
        name
        for name in HOT_PATH_MODULES
        if name not in present or recorded.get(name) != hashlib.sha256((_HERE / f"{name}.py").read_bytes()).hexdigest()
    ]
    if stale:
        changed = ", ".join(f"{name}.py" for name in stale)
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

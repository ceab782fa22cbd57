"""devstack router: the baggage-routed HTTP/1.1 proxy (hot path, admin listener, CLI).

This file also decides, once per process, whether the hot path runs compiled: ``router._native``
defines what the native build compiles and judges whether a build still matches its sources.
Extensions whose sources have changed since (an edited checkout) or ``DEVSTACK_INTERPRETED=1``
make the package import those modules from source and leave the C helpers unused, so a stale
build never runs.
"""

from __future__ import annotations

import sys
import warnings

from router._native import HOT_PATH_MODULES, NATIVE_HELPERS, ROUTER_DIR, compiled_state

__all__ = ["COMPILED", "HOT_PATH_MODE", "HOT_PATH_MODULES", "NATIVE_HELPERS", "__version__"]

__version__ = "0.1.0"


def _import_from_source() -> None:
    """Import the hot-path modules from their .py files even where extensions sit beside them.

    Defined only when needed: ``importlib.abc`` brings ``importlib.resources`` and the archive
    modules (about 1 MiB resident), which a router running its compiled build never uses."""
    import importlib.abc  # noqa: PLC0415
    import importlib.machinery  # noqa: PLC0415
    import importlib.util  # noqa: PLC0415
    from collections.abc import Sequence  # noqa: PLC0415
    from types import ModuleType  # noqa: PLC0415

    class SourceFirst(importlib.abc.MetaPathFinder):
        def find_spec(
            self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
        ) -> importlib.machinery.ModuleSpec | None:
            package, _, name = fullname.rpartition(".")
            if package != __name__ or name not in HOT_PATH_MODULES:
                return None
            return importlib.util.spec_from_file_location(fullname, ROUTER_DIR / f"{name}.py")

    sys.meta_path.insert(0, SourceFirst())


def _compiled_state() -> tuple[bool, str]:
    """(compiled extensions usable, why not): read once at import, warning about a stale build."""
    usable, mode, stale = compiled_state()
    if stale:
        warnings.warn(
            f"devstack: compiled router modules are stale ({', '.join(stale)} changed since the build); "
            "running them interpreted. Rebuild with `make compile`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return usable, mode


COMPILED, HOT_PATH_MODE = _compiled_state()
"""Whether the hot path runs as mypyc extensions, and a word on why (for logs and benchmarks)."""

if not COMPILED and HOT_PATH_MODE != "not compiled":
    _import_from_source()

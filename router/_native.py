"""The native build of the hot path, defined once: which modules are compiled, and whether a build
may run.

``setup.py`` reads the lists here to compile them (mypyc for the typed modules, a C compiler for
the hand-written helpers) and records a hash of every source it built; ``router/__init__.py``
asks :func:`compiled_state` once per process whether those extensions still match their sources;
the ``Makefile`` asks ``python router/_native.py sources`` which files a rebuild depends on. It
uses the standard library only and imports nothing from ``router``, so the build can load it by
path before the package is importable. The hash is the interpreter's own BLAKE2, not ``hashlib``,
whose OpenSSL bindings would cost every router 0.6 MiB resident to notice an edited source.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
from pathlib import Path

try:
    from _blake2 import blake2b as _hash
except ImportError:  # pragma: no cover - an interpreter built without its own BLAKE2: build and check agree
    from hashlib import sha256 as _hash  # type: ignore[assignment]

HOT_PATH_MODULES: tuple[str, ...] = (
    "accesslog", "errors", "flow", "h1bridge", "h2upstream", "http", "http2", "keys", "proxy", "relay", "request",
    "settings", "stats", "table", "tunnel", "upstream",
)
"""Typed modules compiled together with mypyc (``router/<name>.py``)."""
NATIVE_HELPERS: tuple[str, ...] = ("_speedups", "_ngrecord")
"""Hand-written C extensions (``router/<name>.c``). Each function in them has a Python original
that defines its behaviour; they are used only when the hot path runs compiled, so the
interpreted router is pure Python."""
MANIFEST = "_compiled.json"
"""Written beside the extensions by the build: the hash of each source it compiled."""

ROUTER_DIR = Path(__file__).resolve().parent


_BUILT = HOT_PATH_MODULES + NATIVE_HELPERS


def source(name: str, root: Path = ROUTER_DIR) -> Path:
    return root / (f"{name}.c" if name in NATIVE_HELPERS else f"{name}.py")


def sources(root: Path = ROUTER_DIR) -> list[Path]:
    """Every source the native build compiles, in a stable order."""
    return [source(name, root) for name in _BUILT]


def digest_of(source_bytes: bytes) -> str:
    """The hash the manifest records for a source (BLAKE2b, or SHA-256 where it is missing)."""
    return _hash(source_bytes).hexdigest()


def digests(root: Path = ROUTER_DIR) -> dict[str, str]:
    """What the build records in the manifest: a hash of each compiled source."""
    return {name: digest_of(path.read_bytes()) for name, path in zip(_BUILT, sources(root))}


def _digest(name: str, root: Path) -> str | None:
    try:
        return digest_of(source(name, root).read_bytes())
    except OSError:
        return None  # a source missing from an install: its build cannot be vouched for


def compiled_state(root: Path = ROUTER_DIR) -> tuple[bool, str, list[str]]:
    """(compiled extensions usable, a word on why not, the changed sources if the build is stale)."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    present = [name for name in _BUILT if (root / f"{name}{suffix}").exists()]
    if not present:
        return False, "not compiled", []
    if os.environ.get("DEVSTACK_INTERPRETED") == "1":
        return False, "DEVSTACK_INTERPRETED=1", []
    try:
        recorded = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False, "no build manifest", []
    stale = [
        source(name, root).name for name in _BUILT if name not in present or recorded.get(name) != _digest(name, root)
    ]
    if stale:
        return False, "stale build", stale
    return True, "compiled", []


if __name__ == "__main__":
    # `python router/_native.py sources`: the Makefile's rebuild dependencies, relative paths.
    if sys.argv[1:] != ["sources"]:
        raise SystemExit("usage: python router/_native.py sources")
    print(" ".join(str(path.relative_to(Path.cwd())) for path in sources()))

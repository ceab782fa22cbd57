"""devstack's composition root: the ``devstack`` command, which wires the router (data plane), the
controller and its sources (control plane) and the demo together. Nothing below this package
imports it; it is the only place where the two planes meet."""

import importlib.util
import sys

_ROUTER_EXTRA = ("uvloop", "httptools", "yaml")
"""Modules of the ``router`` extra that every command path may need. Looked up, not imported: the
command imports only what it uses (a small sidecar never loads aiohttp), so an SDK-only install
would otherwise get as far as ``--help`` and fail later."""


def main() -> int:
    """The ``devstack`` console script. The command needs the ``router`` extra; an install of the
    SDK alone (``pip install devstack-router``) still has the script, so say what to install
    instead of a traceback about a missing module."""
    missing = next((name for name in _ROUTER_EXTRA if importlib.util.find_spec(name) is None), None)
    try:
        if missing is not None:
            raise ModuleNotFoundError(name=missing)
        from devstack.cli import main as run  # noqa: PLC0415 - the import may fail too
    except ModuleNotFoundError as exc:
        print(
            f"devstack: this install has the propagation SDK only (no module {exc.name!r}); "
            "for the devstack command: pip install 'devstack-router[router]'",
            file=sys.stderr,
        )
        return 2
    return run()


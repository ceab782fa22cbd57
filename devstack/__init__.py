"""devstack's composition root: the ``devstack`` command, which wires the router (data plane), the
controller and its sources (control plane) and the demo together. Nothing below this package
imports it; it is the only place where the two planes meet."""

import sys


def main() -> int:
    """The ``devstack`` console script. The command needs the ``router`` extra; an install of the
    SDK alone (``pip install devstack-router``) still has the script, so say what to install
    instead of a traceback about a missing module."""
    try:
        from devstack.cli import main as run  # noqa: PLC0415 - the import is what may fail
    except ModuleNotFoundError as exc:
        print(
            f"devstack: this install has the propagation SDK only (no module {exc.name!r}); "
            "for the devstack command: pip install 'devstack-router[router]'",
            file=sys.stderr,
        )
        return 2
    return run()


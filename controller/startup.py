"""What a ``devstack`` command says when it cannot start: one line naming the flag and the reason.

This module owns the wording of start-up failures shared by the router, the controller and the
demo: ``StartupError`` (raised by whatever part finds the problem, printed by the command as
``devstack: <message>`` with no traceback), ``parse_listen`` for ``host:port`` flags, and
``start_router``, which binds a router's listeners and turns a failed bind (or an access log it
cannot open) into a ``StartupError`` naming the flag that asked for it. It knows no flag values
itself and imports nothing from the router: the router's server is described by a protocol.
"""

from __future__ import annotations

import os
from typing import Protocol

__all__ = ["StartupError", "bind_failure", "os_reason", "parse_listen", "start_router"]


class StartupError(Exception):
    """A command cannot start because of something the user can fix; ``str()`` is the whole message."""


def os_reason(exc: OSError) -> str:
    """``address already in use``, ``permission denied``: the reason without errno or repeated address."""
    if exc.errno is not None and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    # getaddrinfo errors carry negative codes os.strerror does not know; their strerror is the text.
    return (exc.strerror or str(exc)).lower()


def bind_failure(what: str, exc: OSError) -> StartupError:
    """``what`` (e.g. ``--listen 127.0.0.1:8080``) could not be bound."""
    return StartupError(f"{what}: {os_reason(exc)}")


def parse_listen(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``host:port``, ``:port`` or ``[::1]:port`` → (host, port), for every listener flag."""
    if value.startswith("["):
        host, _, port = value[1:].partition("]:")
    else:
        host, _, port = value.rpartition(":")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return (host or default_host, int(port))


class RouterLike(Protocol):
    """The part of ``router.server.RouterServer`` that starting it needs."""

    address: tuple[str, int]

    @property
    def access_log(self) -> object: ...

    async def start(self, listen: tuple[str, int], admin: tuple[str, int] | None = None) -> None: ...

    async def close(self, drain: float | None = None) -> None: ...


async def start_router(server: RouterLike, listen: str, admin: str, *, access_log: str | None = None) -> None:
    """Start ``server`` on ``listen`` (``--listen``) and ``admin`` (``--admin``).

    ``RouterServer.start`` opens the access log, binds the proxy listener, then the admin one, so
    which step failed shows in what it had set up when the ``OSError`` came: no access log yet,
    no proxy address yet, or both. Whatever was opened is closed before raising, so a failed
    start leaves no listener or writer thread behind.
    """
    try:
        await server.start(parse_listen(listen), parse_listen(admin))
    except OSError as exc:
        if access_log is not None and server.access_log is None:
            what = f"--access-log {access_log}"
        elif server.address == ("", 0):
            what = f"--listen {listen}"
        else:
            what = f"--admin {admin}"
        await server.close(drain=0)
        raise bind_failure(what, exc) from None

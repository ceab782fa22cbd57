"""The scope of a sidecar that follows only some services: which names it follows, and who waits.

A sidecar started with ``--services a,b`` or ``--learn-services`` asks the controller's feed for
the services those names cover instead of the whole cluster's table (``/v2/routes?services=``).
This module owns that set of names, shared by the two sides that meet here: the front ends, which
learn a name from a request the table has no route for and hold that request until the feed has
answered for the name (or a bounded wait ends), and the feed source, which subscribes again when
the set grows and says which names its newest snapshot answered. It is pure bookkeeping with
callbacks: no I/O, no timers (the waiting connection owns its deadline), no asyncio.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Final

__all__ = ["RouteScope", "scope_name"]

Resume = Callable[[], None]

MAX_LEARNED: Final = 1024
"""Names a learning sidecar adds at most: past this its app is calling something like the whole
cluster (or making up hosts), and each new name would cost every later subscription bytes."""


def scope_name(authority: bytes) -> str:
    """A request's authority as a scope names it: lowercased, as the table matches hosts (a port
    is kept: the controller resolves ``payments:8080`` as the router would)."""
    return authority.decode("latin-1").lower()


class RouteScope:
    """The names a scoped sidecar follows; the requests waiting for a name's first answer."""

    __slots__ = ("_waiters", "answered", "learn", "names", "on_grow", "wait")

    def __init__(self, names: Iterable[str] = (), *, learn: bool = False, wait: float = 2.0) -> None:
        self.names: set[str] = {name.strip().lower() for name in names if name.strip()}
        """Every name asked for: the next subscription carries all of them."""
        self.answered: set[str] = set()
        """Names a snapshot subscribed with them has arrived for: routes (or their absence) are known."""
        self.learn = learn
        """Add the authority of a request without a route, and hold the request for its routes."""
        self.wait = wait
        """Longest a request is held for its name's first answer (the controller may be down)."""
        self.on_grow: Callable[[], None] | None = None
        """Set by the feed source: subscribe again, with the names now in ``names``."""
        self._waiters: dict[str, list[Resume]] = {}

    def first_use(self, name: str, resume: Resume) -> bool:
        """A request for ``name`` found no route: True when it should wait for ``resume`` (called
        once the feed has answered for the name; the caller bounds the wait by ``self.wait`` and
        calls ``forget``); False when there is nothing to wait for (the feed answered already, or
        this scope does not learn, or has learned its fill)."""
        if name in self.answered or not self.note(name):
            return False
        self._waiters.setdefault(name, []).append(resume)
        return True

    def note(self, name: str) -> bool:
        """Learn ``name`` without waiting for it (a front end that cannot hold its request); whether
        it is in the scope now (False: this scope does not learn, or has learned its fill)."""
        if name in self.names:
            return self.learn
        if not self.learn or len(self.names) >= MAX_LEARNED:
            return False
        self.names.add(name)
        if self.on_grow is not None:
            self.on_grow()
        return True

    def forget(self, name: str, resume: Resume) -> None:
        """A waiter gave up (its deadline passed, its connection closed)."""
        waiters = self._waiters.get(name)
        if waiters is not None and resume in waiters:
            waiters.remove(resume)
            if not waiters:
                del self._waiters[name]

    def answer(self, names: Iterable[str]) -> None:
        """A snapshot subscribed with ``names`` was applied: their waiters resume (and later
        requests for them do not wait, routed or not: the feed sends their routes if they appear)."""
        for name in names:
            self.answered.add(name)
            for resume in self._waiters.pop(name, ()):
                resume()

    @property
    def waiting(self) -> int:
        """Requests held for a first answer now (a metric, and for tests)."""
        return sum(len(waiters) for waiters in self._waiters.values())

"""The routing key: reading and setting the ``devstack`` baggage member of the current context.

This module answers "which developer's override is this work for?" inside a service, e.g. for a
queue consumer deciding whether a message is meant for it, and lets code start work under a key.
It only ever hands out values that are DNS-1123 labels and never parses headers itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from opentelemetry import baggage
from opentelemetry.context import Context, attach, detach, get_current

from propagation.propagators import ROUTING_MEMBER

__all__ = ["MAX_ROUTING_KEY", "current_routing_key", "is_valid_routing_key", "with_routing_key"]

MAX_ROUTING_KEY: Final = 63
"""DNS-1123 label length: a key names Kubernetes objects (Deployments labelled with it)."""
_LABEL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


def is_valid_routing_key(value: object) -> bool:
    """True for a DNS-1123 label: 1-63 of ``[a-z0-9-]``, starting and ending alphanumeric."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ROUTING_KEY
        and _LABEL_CHARS.issuperset(value)
        and value[0] != "-"
        and value[-1] != "-"
    )


def current_routing_key(context: Context | None = None, *, member: str = ROUTING_MEMBER) -> str | None:
    """The routing key in ``context`` (default: current), or None if absent or not a valid label."""
    value = baggage.get_baggage(member, context)
    return value if isinstance(value, str) and is_valid_routing_key(value) else None


@contextmanager
def with_routing_key(key: str, *, member: str = ROUTING_MEMBER) -> Iterator[Context]:
    """Runs the ``with`` block in a context whose baggage carries ``key``; yields that context.

    Raises ``ValueError`` for a key that is not a DNS-1123 label: unlike header input, this is the
    program's own value, and sending it anyway would silently route to the baseline.
    """
    if not is_valid_routing_key(key):
        raise ValueError(f"routing key {key!r} is not a DNS-1123 label (1-63 of [a-z0-9-])")
    context = baggage.set_baggage(member, key, get_current())
    token = attach(context)
    try:
        yield context
    finally:
        detach(token)

"""devstack propagation SDK: carries the routing key (W3C baggage) and trace context across hops.

This package is the public face of the SDK: the routing-key helpers, ``inject``/``extract`` for any
header container, and the framework middleware in the submodules ``propagation.aiohttp``,
``propagation.asgi`` and ``propagation.wsgi`` and the gRPC interceptors in ``propagation.grpc``,
which are imported only when first used so that importing this package never pulls in a web
framework or grpcio. It must never import ``router`` or ``controller``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from propagation.carriers import extract, inject
from propagation.propagators import PROPAGATOR, ROUTING_MEMBER, DevstackBaggagePropagator, baggage_properties
from propagation.routing import current_routing_key, is_valid_routing_key, with_routing_key
from propagation.tracecontext import DevstackTraceContextPropagator

__all__ = [
    "PROPAGATOR",
    "ROUTING_MEMBER",
    "DevstackBaggagePropagator",
    "DevstackTraceContextPropagator",
    "baggage_properties",
    "current_routing_key",
    "extract",
    "inject",
    "is_valid_routing_key",
    "with_routing_key",
]

_FRAMEWORK_MODULES = frozenset({"aiohttp", "asgi", "grpc", "wsgi"})


def __getattr__(name: str) -> ModuleType:
    # PEP 562: `propagation.aiohttp.middleware` works after a bare `import propagation`, while
    # services that never touch aiohttp (or grpcio) never import it.
    if name in _FRAMEWORK_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

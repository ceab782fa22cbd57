"""devstack router: the baggage-routed HTTP/1.1 proxy (hot path, admin listener, CLI)."""

__version__ = "0.1.0"

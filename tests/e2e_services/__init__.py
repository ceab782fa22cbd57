"""Small services for the end-to-end propagation test, one per framework, each run in its own process.

Every service answers ``GET /healthz`` and, on any other path, a JSON report of what it saw
(``common.report``) including the report of the next hop, which it calls through its own sidecar
router (``HTTP_PROXY``) at ``DOWNSTREAM``. Configuration is by environment: ``SERVICE``,
``VERSION``, ``LISTEN_FD`` (a listening socket the test bound and passed down), ``DOWNSTREAM`` and
``HTTP_PROXY``.
"""

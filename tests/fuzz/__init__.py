"""The fuzz harness behind tests/test_fuzz.py: generated and mutated HTTP/1.1 through a real
router to recording origins, checked against independent parses. Its modules, each importing
only those listed before it: ``config`` (the deadlines under test, the slack past them, strict or
tolerant of known bugs), ``strategies`` (``Case`` and the Hypothesis request generators),
``reference`` (the independent parse of the client's bytes), ``origins`` (recording raw-TCP
origins, held WebSocket upgrades, tunnel ends), ``responses`` (the strict response splitter),
``expectations`` (what an origin must receive for a request the reference accepted), ``harness``
(the router on a loop thread and the per-example checker), ``lifecycle`` (the tunnel and drip
fuzz on a router of its own) and ``http2`` (frame-level HTTP/2 cases and their checker, behind
tests/test_fuzz_http2.py).
"""

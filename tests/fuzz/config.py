"""What the request fuzz runs under: the router deadlines it exercises, how far past them an
exchange may run before it counts as late or hung, and whether the known bugs fail an example or
are counted. Every bug this suite found is fixed and pinned by a regression test in test_fuzz.py,
so it runs strict by default; ``DEVSTACK_FUZZ_STRICT=0`` tolerates and counts the KNOWN_BUGS
patterns instead (for bisecting an old commit). Constants only, so every other module may read
them.
"""

from __future__ import annotations

import os

from router.settings import Timeouts

STRICT = os.environ.get("DEVSTACK_FUZZ_STRICT", "1") == "1"
"""Fail on the known bugs too (for checking a fix), instead of counting them."""

TIMEOUTS = Timeouts(header_read=1, body_idle=1, upstream_response=2, keepalive_idle=3)
"""Small deadlines so timeouts are exercised quickly. keepalive_idle is small too (a stalled
connection ends in 3 s, not 75) but well apart from header_read, so the two can be told apart."""
TIMER_SLACK = 1.0
"""Seconds past a router timer before the exchange counts as late (a loaded 2-core box)."""
SLACK = 2.0
"""Seconds past the longest deadline before we stop waiting and call the exchange hung."""
PATIENCE = max(TIMEOUTS.keepalive_idle, TIMEOUTS.upstream_response) + SLACK

KNOWN_BUGS = {
    "queued-malformed-forwarded": "a pipelined request whose body turns out malformed while it waits in the queue "
    "is forwarded anyway and answered 408 after body_idle, not 400",
    "head-answer-body": "the router's answers to HEAD decided before it reads the method (505, HTTP/0.9) carry a body",
}
"""Open bugs the fuzzer tolerates (and counts); fixed ones are plain regression tests in test_fuzz.py."""

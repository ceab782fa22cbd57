"""Upstream failures are logged at WARNING with the upstream and the cause, at a bounded rate
(router/failures.py): through a real router whose upstream refuses connections, and the rate
limit itself on a clock the test moves."""

from __future__ import annotations

import logging

import pytest

from router.errors import Answer
from router.failures import FailureLog
from tests.support import exchange, free_port, make_table, running_router, split_responses


async def test_a_refusing_upstream_is_logged_once_with_its_address_and_cause(caplog: pytest.LogCaptureFixture) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens: every connect is refused
    caplog.set_level(logging.WARNING, logger="router.failures")
    async with running_router(make_table({"a": {"baseline": url}})) as server:
        data, _ = await exchange(server.address[1], b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 5)
        assert [status for status, _, _ in split_responses(data)] == [502] * 5
    lines = [r.getMessage() for r in caplog.records if r.name == "router.failures"]
    assert lines == [f"upstream {url} (service a) failed: connect, answered 502"]
    assert all(r.levelno == logging.WARNING for r in caplog.records if r.name == "router.failures")


def test_one_line_per_upstream_per_interval_and_the_count_of_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    failures = FailureLog(clock=lambda: now[0], interval=10.0)
    caplog.set_level(logging.WARNING, logger="router.failures")
    assert failures.report("http://a:1", Answer.UPSTREAM_RESET, "a")
    assert not failures.report("http://a:1", Answer.UPSTREAM_RESET, "a")
    assert not failures.report("http://a:1", Answer.UPSTREAM_TIMEOUT, "a")
    assert failures.report("http://b:1", Answer.POOL_FULL, "b")  # another upstream has its own budget
    now[0] = 110.0
    assert failures.report("http://a:1", Answer.UPSTREAM_TIMEOUT, "a")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "upstream http://a:1 (service a) failed: reset, answered 502",
        "upstream http://b:1 (service b) failed: pool-full, answered 503",
        "upstream http://a:1 (service a) failed: timeout, answered 504"
        " (2 more failures of it in the last 10s not logged)",
    ]

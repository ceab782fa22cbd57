"""The catalogue of the router's own answers (router/errors.py): the README documents exactly it,
and every answer renders as the JSON body the README promises.

A new answer added to the catalogue fails here until the README's table says what it means.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path

import pytest

from router.errors import Answer, markdown_table, render

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_error_table_is_the_catalogue() -> None:
    text = README.read_text()
    section = text[text.index("## Errors\n") : text.index("\n## ", text.index("## Errors\n") + 1)]
    start = section.index("| status | reason |")
    table = section[start : section.index("\n\n", start) + 1]
    assert table == markdown_table(), "README.md's error table is stale: paste `python -m router.errors`"


def test_a_reason_names_one_status_except_where_the_mode_decides() -> None:
    statuses: dict[str, set[int]] = {}
    for answer in Answer:
        statuses.setdefault(answer.reason, set()).add(answer.status)
    assert {reason: s for reason, s in statuses.items() if len(s) > 1} == {"no-route": {403, 404}}


def test_what_closes_is_what_the_client_sent_wrong() -> None:
    # A refusal of the request itself closes (its framing is suspect); routing and upstream
    # answers keep a keep-alive connection open.
    kept_open = {Answer.NO_ROUTE, Answer.NO_ROUTE_SIDECAR, Answer.EDGE_KEY_INVALID, Answer.KEY_COOKIE}
    assert {a for a in Answer if a.closes} == {a for a in Answer if a.status < 500 and a not in kept_open} | {
        Answer.TE_UNSUPPORTED,
        Answer.VERSION,
    }
    assert {a for a in Answer if a.upstream} == {
        Answer.UPSTREAM_CONNECT,
        Answer.UPSTREAM_RESET,
        Answer.BAD_RESPONSE,
        Answer.POOL_FULL,
        Answer.UPSTREAM_TIMEOUT,
    }


@pytest.mark.parametrize("answer", list(Answer), ids=[a.name for a in Answer])
def test_every_answer_renders_its_status_reason_and_framing(answer: Answer) -> None:
    raw = render(answer, service="a", key="alice", target=None, close=answer.closes)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % answer.status)
    assert b"content-length: %d" % len(body) in head
    assert (b"connection: close" in head) == answer.closes
    assert json.loads(body) == {
        "error": HTTPStatus(answer.status).phrase,
        "service": "a",
        "key": "alice",
        "target": None,
        "reason": answer.reason,
        "detail": None,
    }
    assert render(answer, head_only=True).endswith(b"\r\n\r\n")  # HEAD: the same head, no body

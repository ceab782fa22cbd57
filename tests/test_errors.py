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
    start = section.index("| status | gRPC status | reason |")
    table = section[start : section.index("\n\n", start) + 1]
    paste = "python -c 'from router.errors import markdown_table as t; print(t())'"
    assert table == markdown_table(), f"README.md's error table is stale: paste `{paste}`"


def test_grpc_statuses_follow_grpcs_http_mapping_made_precise() -> None:
    # gRPC's HTTP-to-status mapping (doc/http-grpc-status-mapping.md): 403 PERMISSION_DENIED,
    # 404 UNIMPLEMENTED, 502/503/504 UNAVAILABLE, the rest INTERNAL; a timeout is a deadline.
    assert Answer.NO_ROUTE.grpc_status == 12
    assert Answer.NO_ROUTE_SIDECAR.grpc_status == 7
    assert Answer.OVERRIDE_NOT_READY.grpc_status == 14
    assert Answer.UPSTREAM_CONNECT.grpc_status == 14
    assert Answer.GRPC_NEEDS_H2C.grpc_status == 14
    assert Answer.UPSTREAM_TIMEOUT.grpc_status == Answer.DEADLINE.grpc_status == 4
    assert Answer.BODY_TOO_LARGE.grpc_status == 8
    assert Answer.MALFORMED.grpc_status == 13


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

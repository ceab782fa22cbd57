"""The catalogue of every answer the router makes itself, instead of forwarding a request.

Each ``Answer`` is one status, one reason label (the ``reason`` of the JSON body, the
``x-devstack-route`` reason, the metrics label), whether the client connection closes after it,
and one sentence on when it is given. Refusals of a request, upstream failures and timeouts all
go through here, so the README's error table, the metrics and the wire agree by construction
(tests/test_errors.py holds the README table equal to :func:`markdown_table`). Pure: standard
library only, no I/O.
"""

from __future__ import annotations

import enum
import json
from http import HTTPStatus

__all__ = ["Answer", "render", "render_body", "markdown_table"]


class Answer(enum.Enum):
    """(status, reason label, connection closes, when)."""

    # -- the request itself: refused before anything is forwarded; the connection's state is suspect
    MALFORMED = (400, "malformed-request", True, "the parser refused the bytes: any framing ambiguity (CL+TE, "
                 "duplicate or non-numeric Content-Length, a bad chunk, obs-fold, bare LF, NUL/CR in values, "
                 "invalid method or field name); the JSON `detail` says what")  # fmt: skip
    HTTP_09 = (400, "http-0.9", True, "an HTTP/0.9 request line")
    NO_HOST = (400, "host-missing", True, "an HTTP/1.1 request without Host")
    HOST_REPEATED = (400, "host-repeated", True, "more than one Host line")
    HOST_INVALID = (400, "host-invalid", True, "a Host that is not a host with an optional port "
                    "(`svc:evil.com`, `svc:+80`, `svc:99999`; the port is empty or 1-65535)")  # fmt: skip
    TE_REPEATED = (400, "transfer-encoding-repeated", True, "more than one Transfer-Encoding line")
    TE_IN_HTTP10 = (400, "transfer-encoding-in-http-1.0", True, "Transfer-Encoding in an HTTP/1.0 request")
    UPGRADE_WITH_BODY = (400, "upgrade-with-body", True, "an Upgrade request that carries a body")
    TARGET_AUTHORITY = (400, "target-authority-invalid", True, "an absolute-form target whose authority has "
                        "userinfo or is not a host with an optional port")  # fmt: skip
    TARGET_FORM = (400, "target-form-unsupported", True, "a target that is not origin-form, `http://` "
                   "absolute-form, or `*` with OPTIONS")  # fmt: skip
    NO_AUTHORITY = (400, "authority-missing", True, "an HTTP/1.0 request with neither Host nor an absolute target")
    CONNECT = (405, "connect-refused", True, "`CONNECT`: the router never opens tunnels on request")
    HEADER_TIMEOUT = (408, "header-read-timeout", True, "the request head did not arrive within `--header-timeout`")
    BODY_TIMEOUT = (408, "body-read-timeout", True, "the rest of a request body did not arrive within "
                    "`--body-timeout`")  # fmt: skip
    SLOW_BODY = (408, "body-too-slow", True, "the request body fell below `--body-min-rate` on average")
    BODY_TOO_LARGE = (413, "body-too-large", True, "the request body is larger than `--max-body`")
    TARGET_TOO_LONG = (414, "target-too-long", True, "the request target is longer than 16 KiB "
                       "(`Limits.max_request_line`)")  # fmt: skip
    HEADERS_TOO_LARGE = (431, "headers-too-large", True, "the header fields exceed `--max-header-bytes` or "
                         "`--max-headers`")  # fmt: skip
    TE_UNSUPPORTED = (501, "transfer-coding-unsupported", True, "a transfer coding other than `chunked`")
    VERSION = (505, "version-not-supported", True, "an HTTP version other than 1.0 and 1.1")
    EDGE_KEY_INVALID = (400, "edge-key-invalid", False, "`?devstack=KEY` with a key that is not a DNS-1123 label "
                        "(the cookie is left as it was)")  # fmt: skip
    # -- the key cookie: the router answers a navigation itself
    KEY_COOKIE = (302, "key-cookie", False, "a navigation with `?devstack=KEY` (with `--key-cookie`): the "
                  "`devstack-key` cookie is set (cleared by `?devstack=`) and the browser sent back to the URL "
                  "without the parameter")  # fmt: skip
    # -- routing: the request was well formed, the table says no
    NO_ROUTE = (404, "no-route", False, "the authority names no service (ingress mode)")
    NO_ROUTE_SIDECAR = (403, "no-route", False, "the authority names no service (sidecar mode: the router is "
                        "not an open proxy)")  # fmt: skip
    OVERRIDE_NOT_READY = (503, "override-not-ready", False, "the key's override has no ready replica "
                          "(without `fallback: baseline`)")  # fmt: skip
    OVERRIDE_EXPIRED = (503, "override-expired", False, "the key's override is past its TTL "
                        "(without `fallback: baseline`)")  # fmt: skip
    HTTP1_TO_H2C = (502, "grpc-over-http1", False, "a gRPC call over HTTP/1.1 to a service whose upstreams "
                    "speak h2c (`protocol: h2c`): gRPC needs HTTP/2 end to end (its trailers), so send it over HTTP/2 "
                    "(other HTTP/1.1 requests are carried to h2c upstreams)")  # fmt: skip
    GRPC_NEEDS_H2C = (502, "upstream-not-h2c", False, "a gRPC call to a service whose upstream speaks HTTP/1.1, "
                      "which cannot carry trailers (give the service `protocol: h2c`)")  # fmt: skip
    # -- the upstream: nothing of a response had reached the client yet
    UPSTREAM_CONNECT = (502, "connect", False, "the upstream refused or could not be reached")
    UPSTREAM_RESET = (502, "reset", False, "the upstream closed or reset the connection before a whole response")
    BAD_RESPONSE = (502, "bad-response", False, "the upstream's response is malformed or ambiguously framed "
                    "(that connection is discarded)")  # fmt: skip
    POOL_FULL = (503, "pool-full", False, "the upstream's connection pool and its wait queue are full")
    UPSTREAM_TIMEOUT = (504, "timeout", False, "the upstream did not connect or answer within its timeout")
    DEADLINE = (504, "deadline-exceeded", False, "an HTTP/2 request's `grpc-timeout` ran out before the "
                "upstream answered (the upstream call is cancelled)")  # fmt: skip

    # Properties over the value rather than an __init__: compiled (mypyc) enums take no custom __init__.
    @property
    def status(self) -> int:
        status: int = self.value[0]
        return status

    @property
    def reason(self) -> str:
        reason: str = self.value[1]
        return reason

    @property
    def closes(self) -> bool:
        """After this answer the client connection closes: what the client sent cannot be trusted
        to end where the router thinks it does, or the request is one that never should have come."""
        closes: bool = self.value[2]
        return closes

    @property
    def when(self) -> str:
        when: str = self.value[3]
        return when

    @property
    def upstream(self) -> bool:
        """An upstream's failure (counted in ``devstack_upstream_errors``), not the client's."""
        return self.status in (502, 503, 504) and self not in _ROUTING

    @property
    def grpc_status(self) -> int:
        """The status of the trailers-only gRPC response this answer is given as to a gRPC call:
        gRPC's own mapping of HTTP statuses, made precise where the catalogue knows more (a
        timeout is DEADLINE_EXCEEDED, a size limit RESOURCE_EXHAUSTED)."""
        known = _GRPC_STATUS.get(self)
        if known is not None:
            return known
        status = self.status
        if status >= 500:
            return 14  # UNAVAILABLE: not ready, upstream down or unreachable
        if status == 403:
            return 7  # PERMISSION_DENIED
        if status == 404:
            return 12  # UNIMPLEMENTED
        return 13  # INTERNAL: a request the router could not take


# 5xx answers that are no upstream's failure: the table's, the service's protocol, the caller's deadline.
_ROUTING = frozenset(
    {Answer.OVERRIDE_NOT_READY, Answer.OVERRIDE_EXPIRED, Answer.HTTP1_TO_H2C, Answer.GRPC_NEEDS_H2C, Answer.DEADLINE}
)
_GRPC_STATUS = {
    Answer.UPSTREAM_TIMEOUT: 4,  # DEADLINE_EXCEEDED
    Answer.DEADLINE: 4,
    Answer.HEADER_TIMEOUT: 4,
    Answer.BODY_TIMEOUT: 4,
    Answer.SLOW_BODY: 4,
    Answer.BODY_TOO_LARGE: 8,  # RESOURCE_EXHAUSTED
    Answer.HEADERS_TOO_LARGE: 8,
}
GRPC_CODES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}  # fmt: skip


def render_body(
    answer: Answer,
    *,
    detail: str | None = None,
    service: str | None = None,
    key: str | None = None,
    target: str | None = None,
) -> bytes:
    """The JSON body of ``answer`` (the HTTP/1.1 response below; an HTTP/2 stream's DATA)."""
    return json.dumps(
        {
            "error": HTTPStatus(answer.status).phrase,
            "service": service,
            "key": key,
            "target": target,
            "reason": answer.reason,
            "detail": detail,
        },
        separators=(",", ":"),
    ).encode()


def render(
    answer: Answer,
    *,
    detail: str | None = None,
    service: str | None = None,
    key: str | None = None,
    target: str | None = None,
    close: bool = False,
    route_header: bytes | None = None,
    head_only: bool = False,
    extra_head: bytes = b"",
) -> bytes:
    """The whole response for ``answer``: a small JSON body naming what the router knew.

    ``service`` and ``key`` come from the route table and the validated key (labels), so they
    cannot inject anything; the JSON encoder escapes them regardless. ``detail`` is the parser's
    own message for a malformed request (None otherwise). ``head_only`` answers a HEAD request.
    """
    status = answer.status
    phrase = HTTPStatus(status).phrase
    body = render_body(answer, detail=detail, service=service, key=key, target=target)
    head = [
        b"HTTP/1.1 %d %s\r\n" % (status, phrase.encode()),
        b"content-type: application/json\r\n",
        b"content-length: %d\r\n" % len(body),
    ]
    if route_header is not None:
        head.append(b"x-devstack-route: " + route_header + b"\r\n")
    if close:
        head.append(b"connection: close\r\n")
    if extra_head:
        head.append(extra_head)  # fields the answer itself needs (Location, Set-Cookie), CRLF-terminated
    head.append(b"\r\n")
    if not head_only:
        head.append(body)  # the same head with no body for HEAD (RFC 9110 9.3.2)
    return b"".join(head)


def markdown_table() -> str:
    """The README's error table, one row per answer, in catalogue order."""
    rows = ["| status | gRPC status | reason | closes | when |", "|---|---|---|---|---|"]
    for answer in Answer:
        closes = "yes" if answer.closes else "no"
        grpc = GRPC_CODES[answer.grpc_status]
        rows.append(f"| {answer.status} | {grpc} | `{answer.reason}` | {closes} | {answer.when} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")  # the README's table, to paste after changing the catalogue

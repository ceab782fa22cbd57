"""Routing correctness of a candidate, checked before it is timed: a wrong proxy has no speed.

Every check is one request with a given Host and baggage and the body (or status) it must get:
each upstream answers ``/`` with its own name. The gRPC checks are the same list asked as unary
calls over h2c: the upstream's name must come back in ``x-served-by`` and in the one message,
with ``grpc-status: 0`` in the trailers. This module only asks and compares; it raises
``RoutingError`` listing every failed check, never retries and never fixes anything up.
"""

from __future__ import annotations

import dataclasses
import http.client
from collections.abc import Sequence
from typing import Final

from benchmarks.configs import BAGGAGE_REALISTIC, BODY_FILE_BYTES, GRPC_CONTENT_TYPE, SERVICE, Upstreams, grpc_reply
from benchmarks.h2c import H2cError, UnaryAnswer, unary_call

__all__ = [
    "PROXY_CHECKS",
    "Check",
    "RoutingError",
    "check_direct",
    "check_grpc_direct",
    "check_grpc_proxy",
    "check_proxy",
    "grpc_code",
    "grpc_mismatch",
]


class RoutingError(AssertionError):
    """A candidate answered a check wrongly; the message lists every failure."""


@dataclasses.dataclass(frozen=True, slots=True)
class Check:
    name: str
    baggage: tuple[str, ...]
    """Baggage header lines to send (none, one, or several)."""
    expect_body: str | None
    expect_status: int = 200
    host: str = SERVICE


PROXY_CHECKS: Final = (
    Check("no baggage → baseline", (), "baseline"),
    Check("devstack=alice → alice", ("devstack=alice",), "alice"),
    Check("devstack=bob → bob", ("devstack=bob",), "bob"),
    Check("six members with properties → alice", (BAGGAGE_REALISTIC,), "alice"),
    Check("OWS and a property → bob", ("region=eu, devstack = bob ;p=1",), "bob"),
    Check("key without override → baseline", ("devstack=carol",), "baseline"),
    Check("look-alike members → baseline", ("xdevstack=bob,userId=alice,devstackx=alice",), "baseline"),
    Check("alternate host name → alice", ("devstack=alice",), "alice", host="bench.local"),
    Check("unknown host → 404", (), None, 404, host="nope"),
)


def _request(
    port: int, method: str, path: str, headers: Sequence[tuple[str, str]], body: bytes | None = None
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _transfer_checks(port: int, host: str, failures: list[str], *, upload: bool) -> None:
    status, body = _request(port, "GET", "/1m", [("Host", host)])
    if status != 200 or len(body) != BODY_FILE_BYTES:
        failures.append(f"GET /1m: status {status}, {len(body)} bytes (want 200, {BODY_FILE_BYTES})")
    if upload:
        payload = b"x" * (4 * 1024 * 1024)
        status, body = _request(port, "POST", "/upload", [("Host", host)], payload)
        if status != 200 or body.strip() != b"ok":
            failures.append(f"POST /upload 4 MiB: status {status}, body {body[:40]!r} (want 200, 'ok')")


def check_proxy(name: str, port: int, *, upload: bool = True) -> int:
    """Run ``PROXY_CHECKS`` and the transfer checks against a proxy; returns the check count."""
    failures: list[str] = []
    for check in PROXY_CHECKS:
        headers = [("Host", check.host), *(("baggage", line) for line in check.baggage)]
        try:
            status, body = _request(port, "GET", "/", headers)
        except (OSError, http.client.HTTPException) as exc:
            failures.append(f"{check.name}: {type(exc).__name__}: {exc}")
            continue
        if status != check.expect_status or (
            check.expect_body is not None and body.decode(errors="replace") != check.expect_body
        ):
            failures.append(
                f"{check.name}: got {status} {body[:60]!r}, want {check.expect_status} {check.expect_body or ''!r}"
            )
    try:
        _transfer_checks(port, SERVICE, failures, upload=upload)
    except (OSError, http.client.HTTPException) as exc:
        failures.append(f"transfer: {type(exc).__name__}: {exc}")
    if failures:
        raise RoutingError(f"{name} routes wrongly:\n  " + "\n  ".join(failures))
    return len(PROXY_CHECKS) + 1 + int(upload)


def check_direct(upstreams: Upstreams, *, upload: bool = True) -> int:
    """The upstream itself: every port answers its own name and serves the transfer paths."""
    failures: list[str] = []
    for name, port in upstreams.by_name().items():
        status, body = _request(port, "GET", "/", [("Host", SERVICE)])
        if status != 200 or body != name.encode():
            failures.append(f"port {port}: got {status} {body[:60]!r}, want 200 {name!r}")
    _transfer_checks(upstreams.baseline, SERVICE, failures, upload=upload)
    if failures:
        raise RoutingError("the upstream answers wrongly:\n  " + "\n  ".join(failures))
    return len(upstreams.by_name()) + 1 + int(upload)


_GRPC_FROM_HTTP: Final = {400: 13, 401: 16, 403: 7, 404: 12, 429: 14, 502: 14, 503: 14, 504: 14}
"""gRPC's mapping of a non-200 HTTP status to the status a client reports (its doc
http-grpc-status-mapping.md); anything else is UNKNOWN (2)."""


def grpc_code(answer: UnaryAnswer) -> int | None:
    """The gRPC status a client would report for ``answer``: from the HTTP status when it is
    not 200, else from ``grpc-status`` in the trailers, or in the head of a trailers-only
    response; None when a 200 carries no ``grpc-status`` at all."""
    if answer.status != 200:
        return _GRPC_FROM_HTTP.get(answer.status, 2)
    value = answer.trailers.get("grpc-status", answer.headers.get("grpc-status"))
    return int(value) if value is not None and value.isdigit() else None


def grpc_mismatch(answer: UnaryAnswer, expect_target: str | None, expect_status: int = 200) -> str | None:
    """What is wrong with a unary call's answer, or None. With ``expect_target``: a successful
    call answered by that upstream (its name in ``x-served-by`` and in the one message) with
    ``grpc-status: 0`` in the trailers. Without: a refusal that no upstream answered, which a
    client reports as ``expect_status`` would be (404: an HTTP 404, or a trailers-only response
    with UNIMPLEMENTED, the router's way of refusing a gRPC call)."""
    served_by = answer.headers.get("x-served-by")
    got = (
        f"status {answer.status}, x-served-by {served_by!r}, grpc-status {grpc_code(answer)}, body "
        f"{answer.body[:40]!r}" + (f", reset {answer.reset}" if answer.reset is not None else "")
    )
    if expect_target is None:
        want = _GRPC_FROM_HTTP.get(expect_status, 2)
        if served_by is not None or grpc_code(answer) != want or answer.reset is not None:
            return f"got {got}; want a refusal a client sees as HTTP {expect_status} (gRPC status {want})"
        return None
    problems = []
    if answer.status != 200 or answer.reset is not None:
        problems.append("not a complete 200")
    if answer.headers.get("content-type") != GRPC_CONTENT_TYPE:
        problems.append(f"content-type {answer.headers.get('content-type')!r}")
    if served_by != expect_target or answer.body != grpc_reply(expect_target):
        problems.append(f"not answered by {expect_target!r}")
    if answer.trailers.get("grpc-status") != "0":
        problems.append("no trailer grpc-status: 0")
    return f"{', '.join(problems)} (got {got})" if problems else None


def check_grpc_proxy(name: str, port: int) -> int:
    """``PROXY_CHECKS`` as gRPC unary calls over h2c against a proxy; returns the check count."""
    failures: list[str] = []
    for check in PROXY_CHECKS:
        try:
            answer = unary_call(port, authority=check.host, metadata=[("baggage", line) for line in check.baggage])
        except H2cError as exc:
            failures.append(f"{check.name}: {exc}")
            continue
        if problem := grpc_mismatch(answer, check.expect_body, check.expect_status):
            failures.append(f"{check.name}: {problem}")
    if failures:
        raise RoutingError(f"{name} routes gRPC calls wrongly:\n  " + "\n  ".join(failures))
    return len(PROXY_CHECKS)


def check_grpc_direct(upstreams: Upstreams) -> int:
    """The gRPC upstream itself: every port answers a unary call with its own name."""
    failures: list[str] = []
    for name, port in upstreams.by_name().items():
        try:
            problem = grpc_mismatch(unary_call(port, authority=SERVICE), name)
        except H2cError as exc:
            problem = str(exc)
        if problem:
            failures.append(f"port {port}: {problem}")
    if failures:
        raise RoutingError("the gRPC upstream answers wrongly:\n  " + "\n  ".join(failures))
    return len(upstreams.by_name())

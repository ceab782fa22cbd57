"""Routing correctness of a candidate, checked before it is timed: a wrong proxy has no speed.

Every check is one request with a given Host and baggage and the body (or status) it must get:
each upstream answers ``/`` with its own name. This module only asks and compares; it raises
``RoutingError`` listing every failed check, never retries and never fixes anything up.
"""

from __future__ import annotations

import dataclasses
import http.client
from collections.abc import Sequence
from typing import Final

from benchmarks.configs import BAGGAGE_REALISTIC, BODY_FILE_BYTES, SERVICE, Upstreams

__all__ = ["PROXY_CHECKS", "Check", "RoutingError", "check_direct", "check_proxy"]


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

"""router.http's response-head scan against an obviously-correct reference, field by field."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.http import TE_CHUNKED, TE_NONE, TE_OTHER, scan_response_head
from tests.fuzz_support import HOP_BY_HOP as FUZZ_HOP_BY_HOP

# The fuzz suite's independent list (it also counts Content-Length, a framing field, not a
# hop-by-hop one for this purpose): the reference must not borrow the router's own table.
HOP = FUZZ_HOP_BY_HOP - {b"content-length"}


def reference(buf: bytes) -> tuple[int, int, int, bytes | None]:
    """The same answer computed the slow way: split into lines, look at every field."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return -1, -1, TE_NONE, None
    end += 4
    lines = buf[: end - 4].split(b"\r\n")
    kept = [lines[0]]
    content_length, coding, ok = -1, TE_NONE, lines[0].startswith(b"HTTP/1.1 ")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        lower, value = name.lower(), value.strip(b" \t").lower()
        if lower == b"content-length":
            content_length = int(value)
        if lower == b"transfer-encoding":
            coding = TE_CHUNKED if value.endswith(b"chunked") else TE_OTHER
        if lower == b"keep-alive" or (lower == b"connection" and value in {b"close", b""}):
            continue
        if lower == b"connection" and value == b"keep-alive":
            kept.append(line)
            continue
        if lower in HOP:
            ok = False
        kept.append(line)
    return end, content_length, coding, b"\r\n".join(kept) + b"\r\n\r\n" if ok else None


NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 22 Nov 2026 10:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 6\r\nConnection: keep-alive\r\nETag: \"6-a\"\r\n\r\n"
)


@pytest.mark.parametrize(
    ("head", "length", "coding", "forwarded"),
    [
        (NGINX, 6, TE_NONE, NGINX),
        (b"HTTP/1.1 204 No Content\r\n\r\n", -1, TE_NONE, b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nconnection:close\r\nkeep-alive: timeout=5\r\ncontent-length: 0\r\n\r\n", 0, TE_NONE,
         b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", -1, TE_CHUNKED, None),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", -1, TE_OTHER, None),
        (b"HTTP/1.1 200 OK\r\nConnection: x-secret\r\nX-Secret: 1\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        (b"HTTP/1.1 200 OK\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        (b"HTTP/1.1 200 OK\r\nTE: trailers\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", 1, TE_NONE, None),
        # Names that merely start like a hop-by-hop field are ordinary fields.
        (b"HTTP/1.1 200 OK\r\nConnectionX: a\r\nTrailers-Seen: b\r\nContent-Length: 2\r\n\r\n", 2, TE_NONE,
         b"HTTP/1.1 200 OK\r\nConnectionX: a\r\nTrailers-Seen: b\r\nContent-Length: 2\r\n\r\n"),
    ],
)  # fmt: skip
def test_scan_response_head(head: bytes, length: int, coding: int, forwarded: bytes | None) -> None:
    body = b"abcdef"
    end, got_length, got_coding, passthrough = scan_response_head(head + body)
    assert (end, got_length, got_coding, passthrough) == (len(head), length, coding, forwarded)
    assert reference(head + body) == (end, got_length, got_coding, passthrough)


@pytest.mark.parametrize("fields", [0, 1, 38, 39, 40, 41, 100])
@pytest.mark.parametrize("body", [b"", b"\r\n", b"\r\n\r\n" * 50, b"x\r\n" * 100])
def test_scan_finds_the_end_of_long_heads_followed_by_bodies_full_of_crlf(fields: int, body: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-F%d: v\r\n" % i for i in range(fields))
    head += b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(body)
    got = scan_response_head(head + body)
    assert got == reference(head + body)
    assert got[0] == len(head) and got[1] == len(body)
    assert got[3] == head


def test_an_unfinished_head_has_no_end() -> None:
    assert scan_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n")[0] == -1
    assert scan_response_head(b"HTTP/1.1 200 OK")[0] == -1
    assert scan_response_head(b"HTTP/1.1 200 OK\r\n")[0] == -1
    long = b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 60
    assert scan_response_head(long)[0] == -1


FIELD_NAMES = st.sampled_from(
    [
        b"Connection", b"connection", b"Keep-Alive", b"Content-Type", b"Content-Length", b"Transfer-Encoding", b"TE",
        b"Trailer", b"Upgrade", b"Proxy-Connection", b"Proxy-Authenticate", b"Cache-Control", b"ETag", b"Tk", b"Up",
        b"Server", b"Date", b"Kept", b"Pragma", b"Via", b"uPgRaDe", b"content-length", b"CONTENT-TYPE", b"Content-Typo",
    ]
)  # fmt: skip
FIELD_VALUES = st.sampled_from([b"keep-alive", b"close", b"", b"chunked", b"gzip, chunked", b"x-other", b"1", b" 42 "])


@settings(max_examples=300, deadline=None)
@given(
    status=st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.1 101 Switching", b"HTTP/1.0 200 OK", b"HTTP/1.1 304 "]),
    fields=st.lists(st.tuples(FIELD_NAMES, FIELD_VALUES), max_size=8),
    body=st.binary(max_size=20),
)
def test_scan_agrees_with_the_reference(status: bytes, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
    if sum(name.lower() == b"content-length" for name, _ in fields) > 1:
        return  # llhttp refuses these heads before the scan ever sees them
    fields = [(n, v if n.lower() != b"content-length" else b"7") for n, v in fields]
    head = status + b"\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in fields) + b"\r\n"
    assert scan_response_head(head + body) == reference(head + body)
